"""What every cgroup backend provides: a group per jail with limits, usage, kill and removal."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Limits:
    """The limits of one jail; ``None`` means no limit of that kind."""

    memory: int | None = None  # bytes, swap included
    cpus: float | None = None  # cores of CPU bandwidth
    pids: int | None = None  # tasks (processes and threads) alive at once
    io_read: int | None = None  # bytes per second, on each of io_devices
    io_write: int | None = None
    io_devices: tuple[str, ...] = ()  # "major:minor" of whole disks


@dataclass(frozen=True)
class Usage:
    """What a jail used, read from its cgroup's own counters."""

    peak_memory: int | None
    cpu_time: float | None
    oom_kills: int
    pids_denied: int  # forks refused at the pids limit


class Group(Protocol):
    """One jail's cgroup (one directory per controller on v1)."""

    @property
    def join_files(self) -> list[str]:
        """Where a single-threaded process writes ``0`` to join the group, in the cheapest way the
        hierarchy has: v1's ``tasks`` (moves the calling thread only, without the global
        ``cgroup_threadgroup_rwsem`` whose RCU grace period made every ``cgroup.procs`` write wait
        4-16 ms at a test's cadence); v2's ``cgroup.procs``."""
        ...

    def apply(self, limits: Limits) -> None: ...

    def usage(self) -> Usage: ...

    def kill(self) -> None:
        """SIGKILL every process in the group, race-free against forks."""
        ...

    def remove(self) -> None: ...


CPU_PERIOD_US = 100_000


def write(path: str, value: str) -> None:
    """Write one cgroup file; the error names the file."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def keyed(path: str) -> dict[str, int]:
    """``key value`` lines (memory.events, cpu.stat, pids.events) as a dict."""
    try:
        text = read(path)
    except FileNotFoundError:
        return {}
    return {k: int(v) for k, v in (line.split()[:2] for line in text.splitlines() if line.strip())}


def rmdir_when_empty(path: str, timeout: float = 5.0) -> None:
    """Remove a group directory; its last processes may need a moment to be released."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def kill_members(procs: str, freeze: Callable[[bool], None] | None) -> None:
    """SIGKILL every process of a group, freezing it meanwhile so a fork cannot slip through;
    repeat until it is empty (what ``cgroup.kill`` does in one write, where the kernel has it).
    A group removed meanwhile (its jail ended and was torn down) is empty."""
    try:
        for _ in range(100):
            if freeze is not None:
                freeze(True)
            members = [int(p) for p in read(procs).split()]
            for pid in members:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if freeze is not None:
                freeze(False)
            if not members:
                return
            time.sleep(0.002)
    except FileNotFoundError:
        return
