"""jobs.run_job around an entry point's job: the first SIGINT or SIGTERM stops it, and a second one
(`mlflow run` follows Ctrl-C with a SIGTERM of its own) does not cut its cleanup short."""

import os
import signal

import pytest

from loraflow import jobs

pytestmark = pytest.mark.unit  # pure logic: the fast tier (pytest -m unit)


@pytest.fixture(autouse=True)
def _handlers_put_back():
    handlers = {stopping: signal.getsignal(stopping) for stopping in (signal.SIGTERM, signal.SIGINT)}
    yield
    for stopping, handler in handlers.items():
        signal.signal(stopping, handler)


@pytest.mark.parametrize("first, second", [(signal.SIGINT, signal.SIGTERM), (signal.SIGTERM, signal.SIGTERM),
                                           (signal.SIGTERM, signal.SIGINT)])
def test_a_second_signal_during_cleanup_does_not_cut_it_short(first, second, capsys):
    # As a job started from a terminal has it: a test run started in the background (`nohup`, `&`)
    # inherits SIGINT ignored, and run_job then rightly leaves it ignored (the test below).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cleaned = []

    def job():
        try:
            os.kill(os.getpid(), first)
            signal.sigtimedwait([], 0)  # a point where Python runs the handler
            raise AssertionError("the first signal did not stop the job")
        finally:
            os.kill(os.getpid(), second)
            signal.sigtimedwait([], 0)
            cleaned.append("all of it")

    assert jobs.run_job(job, "shutting down", interrupted_code=0) == 0
    assert cleaned == ["all of it"]
    assert capsys.readouterr().err == "shutting down\n"


def test_a_job_started_ignoring_sigint_keeps_ignoring_it():
    """nohup and a shell's `&` start jobs with SIGINT ignored: run_job must not make them listen."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    assert jobs.run_job(lambda: signal.getsignal(signal.SIGINT) is signal.SIG_IGN and 7, "stopped") == 7
