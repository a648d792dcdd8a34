"""Process escapes: signals, sessions and the terminal stay inside the jail."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from attack import needs_jail

from pytest_jail import Jail

pytestmark = needs_jail


def _sleeper() -> subprocess.Popen[bytes]:
    """A process of the host in pytest's own session and process group, as a CI agent's are."""
    return subprocess.Popen(["sleep", "30"])


def test_kill_everything_reaches_only_the_jail() -> None:
    """``kill -9 -1`` kills every process the caller may signal: in a jail, only the jail's own."""
    host = _sleeper()
    try:
        Jail().run(["sh", "-c", "kill -9 -1; sleep 0.1"])
        assert host.poll() is None
    finally:
        host.kill()
        host.wait()


def test_process_group_and_session_are_the_jails_own() -> None:
    """``kill 0`` signals the caller's process group: a jail's commands run in a session of their
    own, so pytest's process group never gets the signal (a process in a new pid namespace could
    otherwise reach it: security.md #18)."""
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    received = []
    signal.signal(signal.SIGUSR1, lambda *_: received.append(1))
    try:
        result = Jail().run(["sh", "-c", "trap '' USR1; kill -USR1 0; ps -o sid= -o pgid= -p $$"])
        time.sleep(0.05)
        assert received == []
        sid, pgid = result.stdout.split()
        assert sid == pgid == "2"  # the command leads its own session and group, inside the jail
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_body_cannot_signal_pytest(jailed_pytester: pytest.Pytester) -> None:
    """A body is a fork of pytest, yet pytest's pid is nobody in its pid namespace."""
    jailed_pytester.makepyfile(
        """
        import os, signal, pytest

        @pytest.mark.jail
        def test_signal_parent():
            assert os.getppid() == 0  # its parent is outside the jail, where it cannot look
            with pytest.raises(ProcessLookupError):
                os.kill(int(os.environ["PJ_PYTEST_PID"]), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PJ_PYTEST_PID": str(os.getpid())}
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", "-q",
                             str(jailed_pytester.path)], cwd=jailed_pytester.path, env=env, capture_output=True,
                            text=True)
    assert "1 passed" in result.stdout, result.stdout[-2000:]


def test_init_ignores_what_it_is_not_meant_to_get() -> None:
    """SIGTERM, SIGINT and SIGHUP sent to the jail's init from inside change nothing: pid 1 gets
    only the signals it has a handler for (pid_namespaces(7)); the command runs on."""
    result = Jail().run(["sh", "-c", "kill -TERM 1; kill -INT 1; kill -HUP 1; sleep 0.1; echo alive"])
    assert result.stdout == "alive\n" and result.returncode == 0
