"""Nothing is left behind: after a run, after failures and timeouts, after pytest is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import needs_jail
from conftest import wait_until
from leftovers import named
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


def _kill_pytest_while(path: object, test: str, how: signal.Signals, started: Callable[[], bool]) -> None:
    """Run pytest on ``test`` in ``path``, wait until ``started()``, then send it ``how``."""
    # One pytest process (no xdist), so the signal reaches the process that holds the jail.
    log = Path(str(path), f"pytest-{test}-{how.name}.log")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            # (faulthandler_timeout: if it hangs before the jail starts, its log shows where)
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-k", test,
             "-o", "faulthandler_timeout=60"],
            cwd=path, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_default_sigint,
        )
    try:
        # (an emulated kernel beside another worker took over 60 s to start pytest and the jail)
        wait_until(lambda: started() or proc.poll() is not None, timeout=180)
        assert started(), (
            f"the jail of {test} never started; pytest {'still runs' if proc.poll() is None else 'ended'}, "
            f"its output:\n{log.read_text(errors='replace')[-6000:]}\nprocesses:\n{_processes()}")
        proc.send_signal(how)
        proc.wait(timeout=120)  # a hang guard: a loaded machine (CI beside a guest) took over 30 s
    finally:
        proc.kill()
        proc.wait()


def _processes() -> str:
    ps = subprocess.run(["ps", "-eo", "pid,ppid,stat,wchan:24,args"], capture_output=True, text=True, check=False)
    return ps.stdout


def _default_sigint() -> None:
    # A background shell starts its jobs with SIGINT ignored, and that survives exec; Ctrl-C
    # must reach pytest as it does at a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.leftovers
def test_suite_leaves_nothing_behind(jailed_pytester: pytest.Pytester) -> None:
    """Passing, failing, timed-out and crashing jails, and daemons in each: nothing survives the run."""
    tag = f"pj-leak-{os.getpid()}"
    jailed_pytester.makepyfile(MESSY_SUITE.replace("{tag}", tag))
    before = snapshot(orphans_only=True)
    result = jailed_pytester.runpytest_subprocess()
    result.assert_outcomes(passed=3, failed=3)
    assert tagged(tag) == []
    # Bounded wait: a concurrent test (xdist) may be killing a pytest of its own right now.
    assert wait_until(lambda: new_since(before) == {}), new_since(before)


@pytest.mark.leftovers
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

        def test_next_run(jail):
            jail.run(["true"])
        """
    )
    before = snapshot(orphans_only=True)
    for test, names in (("command", (f"{tag}-cmd", f"{tag}-cmd2")), ("body", (f"{tag}-body",))):
        _kill_pytest_while(jailed_pytester.path, test, how, lambda names=names: all(named(n) for n in names))
        assert wait_until(lambda: not tagged(tag)), f"still running: {tagged(tag)}"
    # A killed pytest cannot remove its cgroups; the next run does, when it makes its first jail.
    jailed_pytester.runpytest_subprocess("-k", "test_next_run").assert_outcomes(passed=1)
    assert wait_until(lambda: new_since(before) == {}), new_since(before)


@pytest.mark.leftovers
def test_a_run_that_jails_nothing_changes_nothing(jailed_pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Installed, and a session that jails no test (here under -n 2, with the report header):
    no group is made, nothing is moved between groups, no `nft` runs (so no stale clean-up
    either: what a killed run left waits for the first run that makes a jail, which
    test_killed_pytest_leaves_nothing_behind shows removing it)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    calls = bin_dir / "nft-calls"
    (bin_dir / "nft").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nexit 1\n")
    os.chmod(bin_dir / "nft", 0o755)
    jailed_pytester.makepyfile(
        """
        import os

        def test_a(tmp_path):
            pass

        def test_no_group_of_this_session():  # (they would be gone once it exits)
            pids = {str(os.getpid()), str(os.getppid())}  # this xdist worker, the main process
            found = [os.path.join(parent, d) for parent, dirs, _ in os.walk("/sys/fs/cgroup") for d in dirs
                     if d.startswith("pytest-jail.") and d.split(".")[1] in pids]
            assert found == []
        """
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    with open(f"/proc/{os.getpid()}/cgroup") as f:
        groups = f.read()
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2"],
                          cwd=jailed_pytester.path, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "jail: namespaces" in done.stdout  # the header was made, without a group
    assert not calls.exists(), calls.read_text()
    with open(f"/proc/{os.getpid()}/cgroup") as f:
        assert f.read() == groups
