"""Resource exhaustion: a jail that eats memory, processes, disk or terminals hurts only itself."""

from __future__ import annotations

import os
import sys

import pytest
from attack import needs_jail
from attack import peak_rss

from pytest_jail import Jail
from pytest_jail import JailSpec

pytestmark = needs_jail


def _limits() -> None:
    from pytest_jail._cgroups.manager import Unavailable
    from pytest_jail._host import host

    try:
        host().cgroups()
    except Unavailable as exc:
        pytest.skip(f"no cgroups for jails here: {exc.reason}")


def test_a_tmp_filler_gets_enospc_not_the_oom_killer() -> None:
    """The private /tmp is sized (half the memory limit here): filling it fails with ENOSPC, a
    clean error the test sees, instead of the jail being OOM-killed for page cache it cannot drop."""
    _limits()
    result = Jail(JailSpec(memory="128M")).run(
        ["sh", "-c", "dd if=/dev/zero of=/tmp/fill bs=1M count=200 2>&1 | grep -o 'No space left on device'; "
         "df -m /tmp | tail -n 1"])
    assert not result.oom_killed and "No space left on device" in result.stdout, result.stdout
    assert result.stdout.split()[-5] == "64"  # the size of /tmp, in MiB


@pytest.mark.parametrize("where", ["/tmp", "/dev/shm"])
def test_private_tmpfs_are_sized_without_limits_too(where: str) -> None:
    """Without a memory limit (rootless on a v1 host has none) /tmp and /dev/shm are 1G, not half
    the machine's RAM; ``tmpfs=`` sets another size, and a filler gets ENOSPC there."""
    sizes = Jail().run(["sh", "-c", f"df -m {where} | tail -n 1"]).stdout.split()
    assert sizes[1] == "1024", sizes
    result = Jail(JailSpec(tmpfs="16M")).run(
        ["sh", "-c", f"dd if=/dev/zero of={where}/fill bs=1M count=100 2>&1 | grep -o 'No space left on device'"])
    assert result.stdout.strip() == "No space left on device", result.stdout


def test_a_fork_bomb_stays_in_its_jail() -> None:
    """A fork bomb meets the jail's process limit; pytest can still fork, and nothing is left."""
    _limits()
    result = Jail(JailSpec(pids=64, timeout=5)).run(["sh", "-c", "b() { b | b & }; b; sleep 2; echo done"])
    assert result.pids_limit_hit
    assert os.fork and Jail().run(["true"]).returncode == 0


def test_a_memory_hog_is_killed_and_pytest_does_not_grow() -> None:
    """A command that allocates 1 GiB at a 64M limit is OOM-killed; the caller's memory is as before."""
    _limits()
    before = peak_rss()
    result = Jail(JailSpec(memory="64M")).run([sys.executable, "-c", "b = bytearray(1 << 30); b[::4096] = b'x' * (1 << 18)"])
    assert result.oom_killed and "OOM killer" in result.verdict()
    assert peak_rss() - before < 64 << 20


def test_a_command_that_never_ends_is_killed_at_the_timeout() -> None:
    """A command that ignores SIGTERM and forks a daemon: the whole tree is gone at the timeout."""
    tag = f"pj-endless-{os.getpid()}"  # (a scan of /proc for "sleep 300" saw other tests' sleepers)
    result = Jail(JailSpec(timeout=1)).run(
        ["bash", "-c", f"trap '' TERM; (setsid bash -c 'exec -a {tag} sleep 300' &); exec -a {tag} sleep 300"])
    assert result.timed_out
    with os.scandir("/proc") as entries:
        sleepers = []
        for entry in entries:
            if entry.name.isdigit():
                try:
                    with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                        if tag.encode() in f.read():
                            sleepers.append(entry.name)
                except OSError:
                    pass
    assert sleepers == []


def test_output_flood_on_stderr_is_capped_too() -> None:
    """The cap holds per stream: stderr floods are counted and dropped like stdout's."""
    with pytest.warns(RuntimeWarning, match=r"dropped \(stderr 1951424 bytes\)"):
        result = Jail().run(["sh", "-c", "head -c 3000000 /dev/zero >&2"], output_limit="1M")
    assert len(result.stderr) == 1 << 20 and result.stderr_dropped == 3000000 - (1 << 20)
