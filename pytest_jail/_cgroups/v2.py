"""The cgroup v2 backend: one directory in the unified hierarchy."""

from __future__ import annotations

import os

from .base import CPU_PERIOD_US
from .base import Limits
from .base import Usage
from .base import keyed
from .base import kill_members
from .base import read
from .base import rmdir_when_empty
from .base import write


class V2Group:
    """A jail's group on v2; the parent must have the needed controllers in subtree_control."""

    def __init__(self, parent: str, name: str) -> None:
        self.path = os.path.join(parent, name)
        os.mkdir(self.path)

    @property
    def join_files(self) -> list[str]:
        return [os.path.join(self.path, "cgroup.procs")]

    def apply(self, limits: Limits) -> None:
        if limits.memory is not None:
            write(os.path.join(self.path, "memory.max"), str(limits.memory))
            swap = os.path.join(self.path, "memory.swap.max")
            if os.path.exists(swap):  # no escape into swap: the limit is the whole budget
                write(swap, "0")
            write(os.path.join(self.path, "memory.oom.group"), "1")
        if limits.cpus is not None:
            write(os.path.join(self.path, "cpu.max"), f"{round(limits.cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}")
        if limits.pids is not None:
            write(os.path.join(self.path, "pids.max"), str(limits.pids))
        for device in limits.io_devices if (limits.io_read or limits.io_write) else ():
            rbps, wbps = limits.io_read or "max", limits.io_write or "max"
            write(os.path.join(self.path, "io.max"), f"{device} rbps={rbps} wbps={wbps}")

    def usage(self) -> Usage:
        peak_file = os.path.join(self.path, "memory.peak")  # Linux 5.19
        peak = int(read(peak_file)) if os.path.exists(peak_file) else None
        usec = keyed(os.path.join(self.path, "cpu.stat")).get("usage_usec")
        events = keyed(os.path.join(self.path, "memory.events"))
        oom = events.get("oom_kill", 0)
        if peak is None and oom and events.get("max", 0):  # before 5.19: killed where it reached its own limit
            limit = read(os.path.join(self.path, "memory.max")).strip()
            peak = int(limit) if limit.isdigit() else None
        denied = keyed(os.path.join(self.path, "pids.events")).get("max", 0)
        return Usage(peak, None if usec is None else usec / 1e6, oom, denied)

    def kill(self) -> None:
        """``cgroup.kill`` (Linux 5.14): atomic, and forks racing with it are killed too; before
        5.14, freeze the group (``cgroup.freeze``, 5.2), SIGKILL each member, thaw, until empty."""
        if not keyed(os.path.join(self.path, "cgroup.events")).get("populated", 0):
            return
        kill = os.path.join(self.path, "cgroup.kill")
        if os.path.exists(kill):
            write(kill, "1")
            return
        freeze = os.path.join(self.path, "cgroup.freeze")
        kill_members(os.path.join(self.path, "cgroup.procs"),
                     (lambda frozen: write(freeze, "1" if frozen else "0")) if os.path.exists(freeze) else None)

    def remove(self) -> None:
        rmdir_when_empty(self.path)
