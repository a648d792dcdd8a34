"""What a jail shows of the host: its ids, its mount plan, its working directory.

Computed in the parent from the host as it is (and cached), so the jail's child side only
executes a plan.
"""

from __future__ import annotations

import os
import stat
import sys
from functools import lru_cache
from typing import Any

from ._errors import JailUnavailableError
from ._linux.mounts import OLD
from ._linux.mounts import Exposure
from ._linux.mounts import closed_ancestors
from ._linux.mounts import plan_mounts

#: In root mode the jail's uids and gids 0..65535 are host ids ROOT_MAP_BASE..ROOT_MAP_BASE+65535,
#: so the jail's root is never the host's root. The range sits just below 2**31, far from the
#: ranges useradd hands out in /etc/subuid (100000 upwards), so no user on the host owns it.
ROOT_MAP_BASE = 2**31 - 2 * 65536
ROOT_MAP_SIZE = 65536


def in_initial_user_namespace() -> bool:
    """True when this process sees the host's full id range (so ``uid 0`` is the host's root)."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False


def uses_root_map() -> bool:
    """Root mode: real root in the initial user namespace maps the jail to unprivileged host ids."""
    return _root_map(os.getpid(), os.geteuid())


@lru_cache(maxsize=4)
def _root_map(pid: int, euid: int) -> bool:  # per process: a jailed body is a fork in another userns
    return euid == 0 and in_initial_user_namespace()


def runtime_paths() -> list[str]:
    """Where this Python's code lives: what a test body needs to import and format tracebacks."""
    return list(_runtime_paths(tuple(sys.path), os.getcwd()))


@lru_cache(maxsize=8)
def _runtime_paths(path: tuple[str, ...], cwd: str) -> tuple[str, ...]:
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    paths.update(p for p in path if p and os.path.isdir(p))
    paths.add(cwd)
    return tuple(_outermost(os.path.realpath(p) for p in paths))


def _outermost(paths: Any) -> list[str]:
    result: list[str] = []
    for path in sorted(set(paths)):
        if path == "/" or any(path.startswith(r.rstrip("/") + "/") for r in result):
            continue
        result.append(path)
    return result


def plan_for(rootfs: str | None, exposures: tuple[Exposure, ...], root_map: bool, tmp_size: int | None) -> list[Any]:
    closed = closed_ancestors(e.source for e in exposures) if root_map else set()
    # The rootfs's modification time is in the key: its top-level entries are in the plan.
    version = os.stat(rootfs).st_mtime_ns if rootfs is not None else 0
    return _cached_plan(rootfs, version, exposures, frozenset(closed), tmp_size)


@lru_cache(maxsize=64)
def _cached_plan(
    rootfs: str | None, version: int, exposures: tuple[Exposure, ...], closed: frozenset[str], tmp_size: int | None
) -> list[Any]:
    return plan_mounts(rootfs, exposures, closed=closed, tmp_size=tmp_size)


def check_readable_by_jail(exposures: tuple[Exposure, ...]) -> None:
    """Root mode: the jail runs as an unprivileged host uid; a 0700 directory it needs is a host limit."""
    for exposure in exposures:
        try:
            st = os.stat(exposure.source)
        except OSError:
            continue
        mode = st.st_mode
        if st.st_uid == ROOT_MAP_BASE:  # the test's temp dir, handed to the jail's root
            mode >>= 6
        elif st.st_gid == ROOT_MAP_BASE:
            mode >>= 3
        needed = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(st.st_mode) else 0)
        if mode & needed != needed:
            raise JailUnavailableError(
                f"the jail's root is host uid {ROOT_MAP_BASE} (pytest runs as root), which cannot read "
                f"{exposure.source} (mode {stat.S_IMODE(st.st_mode):04o})",
                f"make it readable (chmod o+rx {exposure.source}), or run pytest as an unprivileged user",
            )


def bind_sources(plan: list[Any]) -> dict[str, int]:
    """Root mode: every host path the plan binds, to be opened while still the host's root."""
    prefix = OLD + "/"
    return {op[1][len(OLD):]: -1 for op in plan if op[0] == "bind" and op[1].startswith(prefix)}


def jail_cwd(cwd: str | None, rootfs: str | None, exposures: tuple[Exposure, ...]) -> str:
    """The caller's directory where the jail shows it (never /tmp, which is private), else ``/``."""
    if cwd is not None:
        return cwd
    here = os.getcwd()
    if any(_is_under(here, e.target) for e in exposures):
        return here
    if rootfs is None and not any(_is_under(here, p) for p in ("/tmp", "/proc", "/dev")):
        return here
    return "/"


def _is_under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")
