"""Errors that are the user's to fix: entry points print them plainly, without a traceback."""


class UserError(Exception):
    """Bad input: the message names the problem and what to do about it."""


class JobFailed(Exception):
    """A job that ran and failed (not the input's fault): entry points print `<what> failed: ...`."""

    what = "the job"
