"""The cgroup v1 backend (also used on hybrid hosts): one directory per controller."""

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

#: Controllers a v1 jail group uses: memory and cpuacct for accounting, pids for the default
#: cap, freezer for a race-free kill; cpu only when a CPU limit is asked for.
CONTROLLERS = ("memory", "cpuacct", "pids", "freezer")


class V1Group:
    """A jail's group on v1: ``dirs`` maps each controller to the group's directory."""

    def __init__(self, parents: dict[str, str], name: str, *, cpu: bool, io: bool = False) -> None:
        wanted = CONTROLLERS + (("cpu",) if cpu else ()) + (("blkio",) if io else ())
        self.dirs = {c: os.path.join(parents[c], name) for c in wanted if c in parents}
        for path in self.dirs.values():
            os.mkdir(path)

    @property
    def join_files(self) -> list[str]:
        return [os.path.join(path, "tasks") for path in self.dirs.values()]

    def apply(self, limits: Limits) -> None:
        if limits.memory is not None:
            memory = self.dirs["memory"]
            write(os.path.join(memory, "memory.limit_in_bytes"), str(limits.memory))
            memsw = os.path.join(memory, "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):  # swap accounting on: the limit covers swap too
                write(memsw, str(limits.memory))
        if limits.cpus is not None:
            write(os.path.join(self.dirs["cpu"], "cpu.cfs_period_us"), str(CPU_PERIOD_US))
            write(os.path.join(self.dirs["cpu"], "cpu.cfs_quota_us"), str(round(limits.cpus * CPU_PERIOD_US)))
        if limits.pids is not None:
            write(os.path.join(self.dirs["pids"], "pids.max"), str(limits.pids))
        for kind, bps in (("read", limits.io_read), ("write", limits.io_write)):
            for device in limits.io_devices if bps else ():
                write(os.path.join(self.dirs["blkio"], f"blkio.throttle.{kind}_bps_device"), f"{device} {bps}")

    def usage(self) -> Usage:
        memory = self.dirs.get("memory")
        peak = int(read(os.path.join(memory, "memory.max_usage_in_bytes"))) if memory else None
        cpuacct = self.dirs.get("cpuacct")
        cpu = int(read(os.path.join(cpuacct, "cpuacct.usage"))) / 1e9 if cpuacct else None
        oom = keyed(os.path.join(memory, "memory.oom_control")).get("oom_kill", 0) if memory else 0
        pids = self.dirs.get("pids")
        denied = keyed(os.path.join(pids, "pids.events")).get("max", 0) if pids else 0
        return Usage(peak, cpu, oom, denied)

    def kill(self) -> None:
        """Freeze, SIGKILL every member, thaw; repeat until empty (runc's v1 fallback)."""
        freezer = self.dirs.get("freezer")
        procs = os.path.join(self.dirs.get("pids") or next(iter(self.dirs.values())), "cgroup.procs")

        def freeze(frozen: bool) -> None:
            assert freezer is not None
            write(os.path.join(freezer, "freezer.state"), "FROZEN" if frozen else "THAWED")

        kill_members(procs, freeze if freezer else None)

    def remove(self) -> None:
        for path in self.dirs.values():
            rmdir_when_empty(path)
