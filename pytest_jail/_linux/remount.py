"""Mount attributes on kernels without ``mount_setattr`` (before Linux 5.12): each mount of a tree
remounted on its own, its other flags kept (bubblewrap's way).

A mount that came from a more privileged namespace has its flags locked: a remount that would
drop one of them (``nodev``, ``noexec``, an atime mode...) is refused, so every remount repeats
the flags the mount has now and only adds (or clears) the ones asked for.
"""

from __future__ import annotations

import errno
import os
import re

from .syscalls import MS_BIND
from .syscalls import MS_NOATIME
from .syscalls import MS_NODEV
from .syscalls import MS_NODIRATIME
from .syscalls import MS_NOEXEC
from .syscalls import MS_NOSUID
from .syscalls import MS_NOSYMFOLLOW
from .syscalls import MS_RDONLY
from .syscalls import MS_REC
from .syscalls import MS_RELATIME
from .syscalls import MS_REMOUNT
from .syscalls import MS_STRICTATIME
from .syscalls import Syscalls

# statvfs(3)'s ST_* bits and the mount(2) flag each one stands for (only the per-mount ones).
_FROM_STATVFS = (
    (os.ST_RDONLY, MS_RDONLY), (os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME),
    (0x2000, MS_NOSYMFOLLOW),  # ST_NOSYMFOLLOW (Linux 5.10)
)


def flags_of(statvfs_flags: int) -> int:
    """The mount(2) flags that repeat a mount's present state (statvfs's ``f_flag``)."""
    flags = 0
    for st, ms in _FROM_STATVFS:
        if statvfs_flags & st:
            flags |= ms
    if not flags & (MS_NOATIME | MS_RELATIME):  # neither: strictatime, which a remount must say
        flags |= MS_STRICTATIME
    return flags


def submounts(mountinfo: str, top: int) -> list[tuple[int, str]]:
    """The mounts below mount ``top`` (not itself), each with its mount point, from proc(5)'s
    mountinfo text: its fifth field, relative to the reader's root, with octal escapes undone."""
    children: dict[int, list[tuple[int, str]]] = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        children.setdefault(int(fields[1]), []).append((int(fields[0]), _unescape(fields[4])))
    found: list[tuple[int, str]] = []
    todo = [top]
    while todo:
        for child in children.pop(todo.pop(), ()):  # pop: a loop in the table cannot loop here
            if child[0] != top:
                found.append(child)
                todo.append(child[0])
    return found


def _unescape(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def mount_id(fd: int, proc: str = "/proc") -> int:
    """The id of the mount ``fd`` is on (its fdinfo's ``mnt_id``)."""
    with open(f"{proc}/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.ENOTSUP, "no mnt_id in fdinfo", f"{proc}/self/fdinfo/{fd}")


def remount(sys: Syscalls, fd: int, add: int, *, proc: str = "/proc", name: str) -> None:
    """Remount the mount whose root ``fd`` (O_PATH) is, its flags kept and ``add`` set; an error
    names the mount by ``name``."""
    flags = flags_of(os.fstatvfs(fd).f_flag) | add
    try:
        sys.mount(None, f"{proc}/self/fd/{fd}", None, MS_REMOUNT | MS_BIND | flags, None)
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror} (remounting it: this kernel has no mount_setattr)", name) from None


def remount_tree(sys: Syscalls, fd: int, add: int, *, recursive: bool, proc: str = "/proc", name: str) -> None:
    """:func:`remount` the mount at ``fd`` (``name``) and, if ``recursive``, each mount below it.

    A mount below is reached by its mount point and remounted only if that path still leads to
    it: one hidden under another mount, or behind a directory this process cannot search, is one
    the jail cannot reach either.
    """
    remount(sys, fd, add, proc=proc, name=name)
    if not recursive:
        return
    with open(f"{proc}/self/mountinfo") as f:
        below = submounts(f.read(), mount_id(fd, proc))
    for mid, path in below:
        try:
            sub = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except (FileNotFoundError, PermissionError, NotADirectoryError):
            continue
        try:
            if mount_id(sub, proc) == mid:
                remount(sys, sub, add, proc=proc, name=path)
        finally:
            os.close(sub)


def make_writable(sys: Syscalls, path: str) -> None:
    """A writable mount of ``path`` on top of the read-only one it is in: a bind of it on itself,
    remounted without ``ro`` (mounts below it keep their own state)."""
    sys.mount(path, path, None, MS_BIND | MS_REC, None)
    flags = flags_of(os.statvfs(path).f_flag) & ~MS_RDONLY
    sys.mount(None, path, None, MS_REMOUNT | MS_BIND | flags, None)
