"""Supervising a jail whatever state the caller's process is in: other threads' descriptors,
signal dispositions it changed, descriptor numbers above 1024 (real jails, root and rootless)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import needs_jail
from conftest import needs_rootfs_jail
from conftest import root_mode
from conftest import wait_until

from pytest_jail import Jail
from pytest_jail import JailWarning
from pytest_jail._linux.mounts import Exposure

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


@root_mode
def test_a_process_that_cannot_die_does_not_hang_pytest(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process of the jail in uninterruptible sleep (here frozen in a v1 freezer group of its
    own, which SIGKILL cannot end): killing the jail returns, and finishing its teardown gives up
    after a grace with a warning naming what was left, instead of waiting forever; once the
    process can end, nothing of the jail remains."""
    from pytest_jail._cgroups.detect import detect
    from pytest_jail._host import host

    if "freezer" not in detect().v1:
        pytest.skip("needs a v1 freezer hierarchy (a v2 kernel's frozen processes die of SIGKILL: no D state to make)")
    teardowns = host().teardowns
    monkeypatch.setattr(teardowns, "grace", 0.5)
    service = Jail().spawn(["sh", "-c", "sleep 300 & wait"])
    group = service._command.run.group
    assert group is not None
    freezer = group.dirs["freezer"]  # type: ignore[attr-defined]
    sleeper = None
    for _ in range(200):
        for pid in open(os.path.join(freezer, "cgroup.procs")).read().split():
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read() == b"sleep\x00300\x00":
                    sleeper = pid
        if sleeper:
            break
        time.sleep(0.01)
    assert sleeper is not None
    stuck = os.path.join(freezer, "stuck")
    os.mkdir(stuck)
    try:
        with open(os.path.join(stuck, "cgroup.procs"), "w") as f:
            f.write(sleeper)
        with open(os.path.join(stuck, "freezer.state"), "w") as f:
            f.write("FROZEN")
        result = service.kill()  # returns: the rest of its teardown waits off the critical path
        assert result.returncode == -signal.SIGKILL
        with pytest.warns(JailWarning) as caught:
            teardowns.finish(wait=True)  # as at exit, or with too many pending: bounded, then named
        said = " | ".join(str(w.message) for w in caught)
        assert "SIGKILL does not end: a process in uninterruptible sleep" in said, said
    finally:
        with open(os.path.join(stuck, "freezer.state"), "w") as f:
            f.write("THAWED")
    assert wait_until(lambda: not os.path.exists(f"/proc/{sleeper}"))  # thawed, its pending SIGKILL ended it
    os.rmdir(stuck)
    group.remove()  # nothing else of the jail was left
    Jail().run(["true"])  # (and a later teardown reaps any helper that was given up on)
    assert teardowns.unreaped == set()


def test_launching_a_jail_keeps_what_other_threads_do_to_warning_filters(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fork is wrapped so Python 3.12's warning about forking a threaded process stays quiet,
    without catch_warnings(), which restores the whole filter list on exit and so undid a filter
    another thread added meanwhile (here added from inside the fork call, as a thread would)."""
    import warnings

    real_fork = os.fork

    def fork_while_another_thread_adds_a_filter() -> int:
        warnings.filterwarnings("error", message="pytest-jail sentinel")
        return real_fork()

    monkeypatch.setattr(os, "fork", fork_while_another_thread_adds_a_filter)
    with warnings.catch_warnings():  # (this test's own changes go away after it)
        before = len(warnings.filters)
        assert Jail().run(["true"]).returncode == 0
        assert any(f[1] is not None and f[1].pattern == "pytest-jail sentinel" for f in warnings.filters)
        assert len(warnings.filters) == before + 1  # ours came and went


@needs_rootfs_jail
def test_what_the_host_looked_like_is_not_cached_past_a_change(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch, busybox_rootfs: str
) -> None:
    """Plans are cached per process, but only while what they read still holds: a secret created
    in the home directory after a first jail is hidden from the next one (before: shown), and a
    rootfs changed at the same path is seen as it is now."""
    home = os.path.join(tmp_path, "home")
    os.mkdir(home)
    os.chmod(tmp_path, 0o755)
    os.chmod(home, 0o755)
    monkeypatch.setenv("HOME", home)
    for name, text in (("visible", "plain\n"), (".netrc", "machine example.com password s3cret\n")):
        with open(os.path.join(home, name), "w") as f:
            f.write(text)
        os.chmod(os.path.join(home, name), 0o644)
    shown = Jail(exposures=(Exposure(home, home),))
    os.rename(os.path.join(home, ".netrc"), os.path.join(tmp_path, "netrc"))
    assert shown.run(["cat", f"{home}/visible"]).stdout == "plain\n"  # plans this home: nothing to hide
    os.rename(os.path.join(tmp_path, "netrc"), os.path.join(home, ".netrc"))
    assert shown.run(["cat", f"{home}/visible"]).stdout == "plain\n"
    assert "s3cret" not in shown.run(["cat", f"{home}/.netrc"]).stdout
    extra = os.path.join(busybox_rootfs, "opt")
    assert Jail().run(["ls", "/"], rootfs=busybox_rootfs).stdout.split().count("opt") == 0
    os.mkdir(extra)
    os.chmod(extra, 0o755)
    binds = [f"{tmp_path}:/opt/data:ro"]  # a mount point under a directory that did not exist
    assert Jail().run(["ls", "/opt"], rootfs=busybox_rootfs, binds=binds).stdout.split() == ["data"]
    os.rmdir(extra)
    assert Jail().run(["ls", "/opt"], rootfs=busybox_rootfs, binds=binds).stdout.split() == ["data"]


def test_each_test_body_gets_a_jail_nobody_used(jailed_pytester: pytest.Pytester) -> None:
    """The next test's jail is prepared while a test runs: each body still gets its own, new
    jail (its namespaces, an empty private /tmp, its tmp_path writable and nobody else's), and
    holds no handle on the jail being prepared (no pidfd, no socket of a jail) and sees
    no process but its init (not the next jail's, not pytest's)."""
    jailed_pytester.makepyfile(
        """
        import os
        import pytest

        @pytest.mark.jail
        @pytest.mark.parametrize("i", range(4))
        def test_fresh(i, tmp_path):
            assert not os.path.exists("/tmp/mark")  # what an earlier body left in its /tmp
            open("/tmp/mark", "w").close()
            (tmp_path / "mine").write_text(str(i))
            fds = os.listdir("/proc/self/fd")  # (one of them is listdir's own, closed by now)
            links = [os.readlink(f"/proc/self/fd/{fd}") for fd in fds if os.path.lexists(f"/proc/self/fd/{fd}")]
            assert not [link for link in links if "pidfd" in link], links
            print("SOCKETS", sorted(link for link in links if link.startswith("socket:")))
            assert sorted(int(p) for p in os.listdir("/proc") if p.isdigit()) == [1, os.getpid()]  # no other jail's
            names = " ".join(os.readlink(f"/proc/self/ns/{ns}") for ns in ("pid", "mnt", "net", "user"))
            print("NS", names)
        """
    )
    result = jailed_pytester.runpytest_subprocess("-s")
    result.assert_outcomes(passed=4)
    seen = [line[line.index("NS "):].rstrip(".") for line in result.stdout.lines if "NS " in line]
    # A jail and the next (prepared while it ran) exist together: never the same namespaces.
    # (Namespace numbers of jails that are gone may be given again by the kernel.)
    assert len(seen) == 4 and all(a != b for a, b in zip(seen, seen[1:], strict=False)), seen
    # A body has pytest's own sockets (it is a fork of pytest: an event loop's self-pipe), the
    # same in every body; a socket of a jail (its wire) would differ from one body to the next.
    sockets = {line[line.index("SOCKETS "):] for line in result.stdout.lines if "SOCKETS " in line}
    assert len(sockets) == 1, sockets


def test_what_a_command_left_running_is_dead_when_run_returns(tmp_path: os.PathLike[str]) -> None:
    """run() returns once init has killed and reaped everything the command left (a daemon
    here): nothing of the jail writes after the result is in the caller's hands."""
    out = os.path.join(tmp_path, "out")
    os.makedirs(out)
    os.chmod(tmp_path, 0o755)
    os.chmod(out, 0o777)
    result = Jail(exposures=(Exposure(out, out, writable=True),)).run(
        ["sh", "-c", f"(trap '' TERM HUP; sleep 0.5; touch {out}/late) & echo started"])
    assert result.stdout == "started\n"
    time.sleep(1.5)
    assert os.listdir(out) == []
