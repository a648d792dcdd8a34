"""Root filesystems for jails: builders (busybox, debootstrap, image import) and named trees.

A *name* (``rootfs="busybox"``) is built once into a per-user cache and reused by every jail
after; a *path* (``rootfs="./rootfs"``, anything with a ``/``) is used as it is.
"""

from __future__ import annotations

import fcntl
import os

from .._errors import JailUnavailableError
from . import busybox
from ._build import is_current
from ._build import remove_stale

#: The rootfs names that need no path; each is built on first use.
NAMES = ("busybox",)

__all__ = ["NAMES", "cache_dir", "named_rootfs"]


def cache_dir() -> str:
    """Where this user's named trees live: ``$PYTEST_JAIL_CACHE``, else ``$XDG_CACHE_HOME/pytest-jail``,
    else ``~/.cache/pytest-jail``."""
    explicit = os.environ.get("PYTEST_JAIL_CACHE")
    if explicit:
        return os.path.abspath(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "pytest-jail")


def named_rootfs(name: str) -> str:
    """The directory of a named rootfs, built (once, under a lock) if missing or out of date."""
    if name not in NAMES:
        raise ValueError(f"unknown rootfs name {name!r}; known: {', '.join(NAMES)}")
    target = os.path.join(cache_dir(), "rootfs", name)
    binary = busybox.find_busybox()
    wanted = busybox.current_recipe(binary)
    if (target, binary) in _known_current or is_current(target, wanted):  # the common case: no lock
        _known_current.add((target, binary))
        return target
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        lock = os.open(target + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise JailUnavailableError(
            f"rootfs {name!r} is built in {os.path.dirname(target)}, which cannot be written ({exc.strerror})",
            "set PYTEST_JAIL_CACHE to a writable directory",
        ) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # xdist workers: one builds, the others wait and reuse it
        remove_stale(os.path.dirname(target), name)  # only a killed build leaves these, we hold the lock
        busybox.build(target, busybox=binary)
    finally:
        os.close(lock)
    _known_current.add((target, binary))
    return target


_known_current: set[tuple[str, str]] = set()
