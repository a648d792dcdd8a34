"""Nothing is left behind: after a run, after failures and timeouts, after pytest is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import needs_jail
from leftovers import new_since
from leftovers import snapshot
from leftovers import tagged

pytestmark = needs_jail

MESSY_SUITE = """
import os, signal, subprocess, time, ctypes, pytest

def daemon(tag):
    subprocess.run(["sh", "-c", f"(setsid bash -c 'exec -a {tag} sleep 300' &)"], check=True)

@pytest.mark.jail
def test_daemon_and_pass():
    daemon("{tag}-a")

@pytest.mark.jail
def test_daemon_and_fail():
    daemon("{tag}-b")
    assert False

@pytest.mark.jail(timeout=0.5)
def test_daemon_and_timeout():
    daemon("{tag}-c")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(30)

@pytest.mark.jail
def test_daemon_and_segfault():
    daemon("{tag}-d")
    ctypes.string_at(0)

def test_command_daemon(jail):
    jail.run(["sh", "-c", "(setsid bash -c 'exec -a {tag}-e sleep 300' &)"])

def test_command_timeout(jail):
    r = jail.run(["bash", "-c", "(exec -a {tag}-f sleep 300) & wait"], timeout=0.5)
    assert r.timed_out
"""


def _kill_pytest_while(path: object, test: str, how: signal.Signals, started: object) -> None:
    """Run pytest on ``test`` in ``path``, wait until ``started()``, then send it ``how``."""
    # One pytest process (no xdist), so the signal reaches the process that holds the jail.
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-k", test],
        cwd=path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_default_sigint,
    )
    try:
        assert _wait_until(started), f"the jail of {test} never started"
        proc.send_signal(how)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()


def _default_sigint() -> None:
    # A background shell starts its jobs with SIGINT ignored, and that survives exec; Ctrl-C
    # must reach pytest as it does at a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_until(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_suite_leaves_nothing_behind(jailed_pytester: pytest.Pytester) -> None:
    """Passing, failing, timed-out and crashing jails, and daemons in each: nothing survives the run."""
    tag = f"pj-leak-{os.getpid()}"
    jailed_pytester.makepyfile(MESSY_SUITE.replace("{tag}", tag))
    before = snapshot(orphans_only=True)
    result = jailed_pytester.runpytest_subprocess()
    result.assert_outcomes(passed=3, failed=3)
    assert tagged(tag) == []
    # Bounded wait: a concurrent test (xdist) may be killing a pytest of its own right now.
    assert _wait_until(lambda: new_since(before) == {}), new_since(before)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_killed_pytest_leaves_nothing_behind(jailed_pytester: pytest.Pytester, how: signal.Signals) -> None:
    """pytest killed mid-test (or interrupted): the jailed body, a jail.run command and their daemons die."""
    tag = f"pj-kill-{os.getpid()}-{how.name}"
    jailed_pytester.makepyfile(
        f"""
        import subprocess, time, pytest

        def test_command(jail):
            jail.run(["bash", "-c", "(setsid bash -c 'exec -a {tag}-cmd sleep 300' &); exec -a {tag}-cmd2 sleep 300"])

        @pytest.mark.jail
        def test_body():
            subprocess.run(["sh", "-c", "(setsid bash -c 'exec -a {tag}-body sleep 300' &)"], check=True)
            time.sleep(300)
        """
    )
    before = snapshot(orphans_only=True)
    for test, running in (("command", f"{tag}-cmd"), ("body", f"{tag}-body")):
        _kill_pytest_while(jailed_pytester.path, test, how, lambda name=running: bool(tagged(name)))
        assert _wait_until(lambda: not tagged(tag)), f"still running: {tagged(tag)}"
    # A killed pytest cannot remove its cgroups; the next run does, at start-up.
    jailed_pytester.runpytest_subprocess("-k", "nothing-matches")
    assert _wait_until(lambda: new_since(before) == {}), new_since(before)
