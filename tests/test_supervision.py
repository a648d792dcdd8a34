"""Supervising a jail whatever state the caller's process is in: other threads' descriptors,
signal dispositions it changed, descriptor numbers above 1024 (real jails, root and rootless)."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import textwrap

import pytest
from conftest import needs_jail

from pytest_jail import Jail

pytestmark = needs_jail


def test_a_pipe_the_caller_holds_is_not_kept_open_by_a_jail() -> None:
    """The helper and init keep only what the jail needs: a pipe another thread is reading (its
    own jail.run's output) must see EOF when that thread closes it, not when this jail ends."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    service = Jail().spawn(["sleep", "30"])
    try:
        os.close(write_end)
        poller = select.poll()
        poller.register(read_end, select.POLLIN)
        assert poller.poll(10_000), "the pipe stayed open while the jail ran"
        assert os.read(read_end, 1) == b""
    finally:
        service.kill()
        os.close(read_end)


def _python(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=120)


def test_a_caller_that_ignores_sigchld_still_gets_exit_statuses() -> None:
    """With SIGCHLD ignored the kernel reaps children itself (wait(2)): a jail's helper and the
    process a body enters through must still report how the jail ended (before: `false` gave 0, or
    a setup error); a jail's init starts with default signals (`kill -INT 1` does nothing)."""
    done = _python(
        """
        import signal
        from pytest_jail import Jail
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        print(Jail().run(["false"]).returncode, Jail().run(["sh", "-c", "exit 7"]).returncode)
        print(Jail().run(["sh", "-c", "kill -INT 1; sleep 0.1; echo alive"]).stdout.strip())
        """
    )
    assert done.stdout.split() == ["1", "7", "alive"], done.stderr[-2000:]


def test_a_body_reports_its_outcome_when_pytest_ignores_sigchld(jailed_pytester: pytest.Pytester) -> None:
    jailed_pytester.makeconftest("import signal\nsignal.signal(signal.SIGCHLD, signal.SIG_IGN)\n")
    jailed_pytester.makepyfile(
        """
        import signal
        import pytest

        @pytest.mark.jail
        def test_fails():
            assert signal.getsignal(signal.SIGCHLD) is signal.SIG_IGN  # the body keeps pytest's
            assert 1 == 2

        @pytest.mark.jail
        def test_passes():
            pass
        """
    )
    result = jailed_pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*assert 1 == 2*"])


def test_descriptors_numbered_above_1024(jailed_pytester: pytest.Pytester) -> None:
    """A pytest holding descriptors past FD_SETSIZE (containers with a high `nofile`): a command
    and a body still run (nothing waits with select(2), which cannot watch them)."""
    jailed_pytester.makeconftest(
        """
        import os, resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), max(hard, 2048)))
        HELD = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
        """
    )
    jailed_pytester.makepyfile(
        """
        import os
        import pytest
        from conftest import HELD
        from pytest_jail import Jail

        def test_command():
            assert max(HELD) > 1024
            assert Jail().run(["echo", "hi"]).stdout == "hi\\n"

        @pytest.mark.jail
        def test_body():
            assert max(HELD) > 1024
        """
    )
    jailed_pytester.runpytest_subprocess().assert_outcomes(passed=2)
