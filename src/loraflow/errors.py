"""Errors that are the user's to fix: entry points print them plainly, without a traceback."""


class UserError(Exception):
    """Bad input: the message names the problem and what to do about it."""


class JobFailed(Exception):
    """A job that ran and failed (not the input's fault): entry points print `<what> failed: ...`."""

    what = "the job"


def parse_bool(name: str, text: str) -> bool:
    """An entry point's true/false parameter (MLflow passes every parameter as text)."""
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise UserError(f"{name} must be true or false, not {text!r}.")
    return value in ("true", "1", "yes")
