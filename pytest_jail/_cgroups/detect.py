"""Which cgroup layout this host has, read from the mount table and the process's own cgroups."""

from __future__ import annotations

import os
from dataclasses import dataclass
from dataclasses import field

V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer", "blkio")


@dataclass(frozen=True)
class Layout:
    """The cgroup hierarchies of this host as this process sees them.

    ``kind`` is ``"v2"`` (one unified hierarchy), ``"v1"`` (one hierarchy per controller),
    ``"hybrid"`` (v1 controllers plus a cgroup2 mount holding few or none), or ``"none"``.
    ``v1`` maps each controller to the directory of this process's own group in it; ``v2`` is
    this process's own group in the unified hierarchy, and ``v2_controllers`` what it offers.
    """

    kind: str
    v1: dict[str, str] = field(default_factory=dict)
    v2: str | None = None
    v2_controllers: frozenset[str] = frozenset()

    def describe(self) -> str:
        if self.kind == "none":
            return "cgroups: none"
        if self.kind == "v2":
            return f"cgroups: v2 ({' '.join(sorted(self.v2_controllers)) or 'no controllers'})"
        return f"cgroups: {self.kind} (v1 {' '.join(c for c in V1_CONTROLLERS if c in self.v1)})"


def detect(mountinfo: str = "/proc/self/mountinfo", own: str = "/proc/self/cgroup") -> Layout:
    """Read the layout; every path is a parameter so tests can hand in a fake host."""
    with open(mountinfo) as f:
        mounts = [line.split() for line in f if " - cgroup" in line]
    with open(own) as f:
        memberships = [line.rstrip("\n").split(":", 2) for line in f if line.strip()]
    own_v1 = {c: path for _, names, path in memberships for c in names.split(",") if names}
    own_v2 = next((path for hid, names, path in memberships if hid == "0" and not names), None)
    v1: dict[str, str] = {}
    v2 = None
    for fields in mounts:
        root, mountpoint, fstype, options = fields[3], fields[4], fields[fields.index("-") + 1], fields[-1]
        if fstype == "cgroup2" and own_v2 is not None:
            v2 = _place(mountpoint, root, own_v2) or v2
        elif fstype == "cgroup":
            for controller in options.split(","):
                if controller in V1_CONTROLLERS and controller in own_v1:
                    place = _place(mountpoint, root, own_v1[controller])
                    if place is not None:
                        v1[controller] = place
    controllers: frozenset[str] = frozenset()
    if v2 is not None:
        try:
            with open(os.path.join(v2, "cgroup.controllers")) as f:
                controllers = frozenset(f.read().split())
        except OSError:
            controllers = frozenset()
    if v1 and v2 is not None:
        kind = "hybrid"
    elif v1:
        kind = "v1"
    elif v2 is not None:
        kind = "v2"
    else:
        kind = "none"
    return Layout(kind, v1, v2, controllers)


def _place(mountpoint: str, root: str, own: str) -> str | None:
    """Where group ``own`` (a path in its hierarchy, as /proc/self/cgroup says) is under a mount
    of that hierarchy's subtree ``root`` (mountinfo's fourth field: a container binds its own
    group at /sys/fs/cgroup); ``None`` if this mount does not show it."""
    root = root.rstrip("/") or "/"
    if root != "/":
        if own != root and not own.startswith(root + "/"):
            return None
        own = own[len(root):] or "/"
    return os.path.normpath(os.path.join(mountpoint, own.lstrip("/")))
