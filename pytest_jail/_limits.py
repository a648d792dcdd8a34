"""A jail's cgroup: its limits, the disks its IO limit applies to, and what it counted."""

from __future__ import annotations

import os
from typing import Any

from ._cgroups import Group
from ._cgroups import Limits
from ._cgroups import Usage
from ._cgroups.manager import Unavailable
from ._errors import JailSetupError
from ._errors import JailUnavailableError
from ._host import host
from ._linux.mounts import Exposure
from ._spec import JailSpec

#: The process cap of a jail that names none: a fork bomb stops here, not at the host's limit.
DEFAULT_PIDS = 4096


def cgroup_for(spec: JailSpec, exposures: tuple[Exposure, ...]) -> Group | None:
    """The jail's cgroup with its limits applied; ``None`` where cgroups are unavailable and no
    limit was asked for. A limit is never silently ignored."""
    try:
        cgroups = host().cgroups()
    except Unavailable as exc:
        if spec.limits:
            names = ", ".join(spec.limits)
            raise JailUnavailableError(f"cannot enforce {names}: {exc.reason}", exc.remedy) from None
        return None
    io = spec.io or {}
    devices: tuple[str, ...] = ()
    if io:
        writable = ["/", *(e.source for e in exposures if e.writable)]
        devices = disks(writable)
        if not devices:
            raise JailUnavailableError(
                "cannot enforce io: the jail writes to no block device here (only memory filesystems)",
                "drop the io limit, or bind a directory on a disk with binds=[...:rw]",
            )
    limits = Limits(memory=spec.memory, cpus=spec.cpus, pids=spec.pids or DEFAULT_PIDS,
                    io_read=io.get("read"), io_write=io.get("write"), io_devices=devices)
    try:
        return cgroups.new_group(limits)
    except Unavailable as exc:
        raise JailUnavailableError(f"cannot enforce io: {exc.reason}", exc.remedy) from None
    except OSError as exc:
        raise JailSetupError("cgroup", exc.errno, exc.strerror or str(exc), exc.filename) from None


def disks(paths: list[str]) -> tuple[str, ...]:
    """The whole disks ("major:minor") under the filesystems of ``paths``; partitions map to
    their disk, since the kernel throttles IO per disk."""
    disks = []
    for path in paths:
        try:
            dev = os.stat(path).st_dev
        except OSError:
            continue
        sysfs = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
        if not os.path.exists(sysfs):
            continue  # tmpfs, overlay and other filesystems without a block device
        if os.path.exists(os.path.join(sysfs, "partition")):
            with open(os.path.join(sysfs, "..", "dev")) as f:
                disks.append(f.read().strip())
        else:
            disks.append(f"{os.major(dev)}:{os.minor(dev)}")
    return tuple(sorted(set(disks)))


def usage_fields(usage: Usage | None, spec: JailSpec) -> dict[str, Any]:
    """What the jail's cgroup counted, as JailResult fields."""
    if usage is None:
        return {}
    return {
        "oom_killed": usage.oom_kills > 0,
        "peak_memory": usage.peak_memory,
        "pids_limit_hit": usage.pids_denied,
        "memory_limit": spec.memory,
        "memory_budget": host().memory_budget,
        "pids_limit": spec.pids or DEFAULT_PIDS,
    }
