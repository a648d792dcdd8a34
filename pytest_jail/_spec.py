"""What a jail is made of (:class:`JailSpec`), with parsing and validation that names its source."""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import stat
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from ._errors import JailConfigError
from ._errors import JailWarning
from ._linux import seccomp
from ._linux.firewall import parse_allow
from .rootfs import NAMES

NET_MODES = ("none", "host", "bridge")
_SEGMENT = re.compile(r"^bridge:[A-Za-z0-9_-]{1,32}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,62})$")
# Directories of a custom rootfs that the jail mounts over; a symlink there could point the
# mount at a host path, so such a rootfs is refused (bubblewrap and runc refuse it too).
ROOTFS_MOUNTPOINTS = ("proc", "dev", "tmp", "sys")


def parse_size(value: object) -> int:
    """``"64M"`` -> 67108864; bytes as ``int`` pass through. Units are powers of 1024."""
    if isinstance(value, bool):
        raise ValueError("a size like 512k, 64M, 1G or a number of bytes, not a bool")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("a positive size like 512k, 64M, 1G or a number of bytes")
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError("a size like 512k, 64M, 1G or a number of bytes")
    number, unit = match.groups()
    size = int(float(number) * 1024 ** "_kmgt".index(unit.lower() or "_"))
    if size <= 0:
        raise ValueError("a positive size like 512k, 64M, 1G or a number of bytes")
    return size


#: What ``cap_add=`` may give back: each reaches only the jail's own namespaces (its network,
#: its processes); none of them can undo the mounts that hide the host.
ADDABLE_CAPABILITIES = ("NET_RAW", "NET_ADMIN", "IPC_LOCK", "SYS_PTRACE", "SYS_NICE", "SYS_RESOURCE")

#: The size of each private tmpfs of a jail without a memory limit (``tmpfs=`` sets another).
DEFAULT_TMPFS = 1 << 30

#: The least memory a jail is given: what a jail itself needs to be built (its helper and init
#: are forks of the caller, their page tables count); a test body needs some megabytes more.
MIN_MEMORY = 4 << 20


def _memory_limit(value: object) -> int:
    try:
        size = parse_size(value)
    except ValueError:
        size = 0
    if size < MIN_MEMORY:
        raise ValueError(f"a size of at least {format_size(MIN_MEMORY)} (what a jail itself needs), like 64M or 1G")
    return size


def _cap_add(value: object) -> tuple[str, ...]:
    names = [n.strip() for n in value.split(",") if n.strip()] if isinstance(value, str) else value
    allowed = ", ".join(ADDABLE_CAPABILITIES)
    if not isinstance(names, (list, tuple)):
        raise ValueError(f"a list of names from {allowed}")
    found = []
    for name in names:
        bare = str(name).upper().removeprefix("CAP_")
        if bare not in ADDABLE_CAPABILITIES:
            raise ValueError(f"a list of names from {allowed}")
        if bare not in found:
            found.append(bare)
    return tuple(found)


def format_size(size: int) -> str:
    """67108864 -> ``"64M"``; the inverse of :func:`parse_size` for round numbers."""
    for unit, scale in (("G", 1024**3), ("M", 1024**2), ("k", 1024)):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


@dataclass(frozen=True)
class Bind:
    """A bind mount ``source`` (host) -> ``target`` (jail), read-only unless ``writable``."""

    source: str
    target: str
    writable: bool = False

    @classmethod
    def parse(cls, text: str) -> Bind:
        """``"SRC:DST[:ro|rw]"`` -> :class:`Bind`."""
        parts = str(text).split(":")
        mode = "ro"
        if len(parts) == 3:
            mode = parts.pop()
        if len(parts) != 2 or mode not in ("ro", "rw") or not all(parts):
            raise ValueError(f"bind {text!r} is not of the form SRC:DST[:ro|rw]")
        source, target = parts
        if not os.path.isabs(target) or ".." in target.split("/"):
            raise ValueError(f"bind {text!r}: destination must be an absolute path without '..'")
        source = os.path.abspath(source)
        if not os.path.exists(source):
            raise ValueError(f"bind {text!r}: source {source} does not exist")
        return cls(source, os.path.normpath(target), mode == "rw")


@dataclass(frozen=True)
class JailSpec:
    """Everything that decides how a jail is built. Immutable; derive with :meth:`merged`.

    :param rootfs: ``None`` for a read-only view of the host's ``/``; a directory used as ``/`` under a
        fresh writable layer; or a name from :data:`pytest_jail.rootfs.NAMES` (``"busybox"``).
    :param net: ``"none"`` (own network namespace, only ``lo``), ``"host"``, ``"bridge"`` (an address
        on a host-side bridge) or ``"bridge:NAME"`` (an isolated segment shared by the jails naming it).
    :param timeout: wall-clock seconds before the whole jail is killed.
    :param hostname: the UTS hostname inside.
    :param env: the environment inside; ``None`` inherits the caller's.
    :param binds: extra bind mounts, ``"SRC:DST[:ro|rw]"`` strings or :class:`Bind`.
    :param memory: memory limit (bytes or ``"64M"``); :param cpus: cores; :param pids: tasks.
    :param tmpfs: size of the private ``/tmp`` (``"100M"``): a disk filler gets ENOSPC.
    :param io: bytes per second read and written on the disks the jail writes to,
        ``{"read": "10M", "write": "10M"}``.
    :param workdir: the working directory inside (default: the caller's, where the jail shows it).
    :param nat: a bridged jail may reach beyond its segment, through the host's NAT.
    :param allow: ...but only these (``"203.0.113.7:443"``, ``"10.0.0.0/8"``); implies the NAT.
    :param cap_add: capabilities given back to the jail's code, inside its own namespaces:
        ``"NET_RAW"`` (raw and packet sockets), ``"NET_ADMIN"``, ``"IPC_LOCK"``, ``"SYS_PTRACE"``,
        ``"SYS_NICE"``, ``"SYS_RESOURCE"``. The jail's root keeps Docker's default set less NET_RAW;
        rootless, the code runs as the user, with only these.
    :param syscalls: the system call filter: ``"default"`` (Docker's baseline), ``"nested"`` (a jail
        may hold jails: namespaces and mounts allowed), ``"unconfined"`` (no filter), or
        ``{"allow": [...], "deny": [...]}`` on top of the default (``"nested": True`` too).
    """

    rootfs: str | None = None
    net: str = "none"
    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None
    timeout: float | None = None
    hostname: str = "jail"
    env: Mapping[str, str] | None = None
    binds: tuple[Bind, ...] = field(default=())
    tmpfs: int | None = None
    io: Mapping[str, int] | None = None
    workdir: str | None = None
    nat: bool = False
    allow: tuple[str, ...] = field(default=())
    syscalls: Any = "default"
    cap_add: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "cap_add", _convert("cap_add", self.cap_add, _cap_add))
        set_(self, "syscalls", _convert("syscalls", self.syscalls, _syscalls))
        if self.rootfs is not None:
            set_(self, "rootfs", _check_rootfs(self.rootfs))
        if self.workdir is not None:
            set_(self, "workdir", _convert("workdir", self.workdir, _jail_path))
        if not isinstance(self.nat, bool):
            raise JailConfigError(f"nat={self.nat!r} is not valid; allowed: True or False")
        allow: object = self.allow
        if isinstance(allow, str) or not isinstance(allow, (list, tuple)):
            raise JailConfigError(
                f"allow={allow!r} is not valid; allowed: a list like ['203.0.113.7:443', '10.0.0.0/8']"
            )
        set_(self, "allow", tuple(_convert("allow", a, _allow_entry) for a in self.allow))
        if (self.nat or self.allow) and self.segment is None:
            raise JailConfigError(
                f"{'nat=True' if self.nat else f'allow={list(self.allow)!r}'} needs a way out: net='bridge' or "
                f"'bridge:NAME' (got net={self.net!r})"
            )
        if not isinstance(self.net, str) or not (self.net in NET_MODES or _SEGMENT.match(self.net)):
            raise JailConfigError(
                f"net={self.net!r} is not a network mode; allowed: {', '.join(map(repr, NET_MODES))}, "
                "'bridge:NAME' (NAME: letters, digits, '-' and '_')"
            )
        if self.memory is not None:
            set_(self, "memory", _convert("memory", self.memory, _memory_limit))
        if self.tmpfs is not None:
            set_(self, "tmpfs", _convert("tmpfs", self.tmpfs, parse_size))
        if self.io is not None:
            set_(self, "io", _convert("io", self.io, _io_limits))
        if self.cpus is not None:
            set_(self, "cpus", _convert("cpus", self.cpus, _positive_float))
        if self.pids is not None:
            set_(self, "pids", _convert("pids", self.pids, _positive_int))
        if self.timeout is not None:
            set_(self, "timeout", _convert("timeout", self.timeout, _positive_float))
        if not isinstance(self.hostname, str) or not _HOSTNAME.match(self.hostname):
            raise JailConfigError(
                f"hostname={self.hostname!r} is not valid; allowed: letters, digits, '-' and '.', "
                "at most 63 characters"
            )
        if self.env is not None:
            if not isinstance(self.env, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.env.items()
            ):
                raise JailConfigError(f"env={self.env!r} is not valid; allowed: a dict of str to str")
            set_(self, "env", dict(self.env))
        if isinstance(self.binds, (str, Bind)):
            raise JailConfigError(f"binds={self.binds!r} is not valid; allowed: a list of 'SRC:DST[:ro|rw]'")
        set_(self, "binds", tuple(_convert("binds", b, _to_bind) for b in self.binds))

    @property
    def way_out(self) -> tuple[tuple[str, int | None], ...] | None:
        """What a bridged jail may reach beyond its segment: ``None`` nothing, ``()`` everything."""
        if self.allow:
            return tuple(parse_allow(a) for a in self.allow)
        return () if self.nat else None

    @property
    def segment(self) -> str | None:
        """The bridge segment this jail joins (``"bridge"`` is a segment too), or ``None``."""
        return self.net if isinstance(self.net, str) and self.net.startswith("bridge") else None

    @property
    def tmpfs_size(self) -> int:
        """The size of each private tmpfs: ``tmpfs``, else half the memory limit (a disk filler
        gets ENOSPC before the OOM killer comes), else 1G (the kernel's default, half the RAM,
        is for every one of them)."""
        if self.tmpfs is not None:
            return self.tmpfs
        return self.memory // 2 if self.memory is not None else DEFAULT_TMPFS

    @property
    def limits(self) -> dict[str, Any]:
        """The resource limits asked for (memory, cpus, pids), without the unset ones."""
        return {
            k: v
            for k, v in (("memory", self.memory), ("cpus", self.cpus), ("pids", self.pids), ("io", self.io))
            if v
        }

    def merged(self, source: str, changes: Mapping[str, Any]) -> JailSpec:
        """A copy with ``changes`` applied; a bad value raises one line naming ``source``."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise JailConfigError(
                f"{source}: unknown argument{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}; allowed: {', '.join(names)}"
            )
        try:
            return dataclasses.replace(self, **changes)
        except JailConfigError as exc:
            raise JailConfigError(f"{source}: {exc}") from None


def _convert(name: str, value: object, convert: Any) -> Any:
    try:
        return convert(value)
    except (TypeError, ValueError) as exc:
        raise JailConfigError(f"{name}={value!r} is not valid; allowed: {exc}") from None


def _positive_float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("a positive number")
    try:
        number = float(value)
    except ValueError:
        raise ValueError("a positive number") from None
    if not number > 0 or number == float("inf"):
        raise ValueError("a positive number")
    return number


def _positive_int(value: object) -> int:
    try:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or int(value) <= 0:
            raise ValueError
    except ValueError:
        raise ValueError("a positive whole number") from None
    return int(value)


def _io_limits(value: object) -> dict[str, int]:
    if isinstance(value, str):  # the command-line and ini form: "read=10M,write=5M"
        try:
            value = dict(part.split("=", 1) for part in value.replace(" ", "").split(",") if part)
        except ValueError:
            raise ValueError("'read=SIZE,write=SIZE' (either or both), e.g. 'write=10M'") from None
    if not isinstance(value, Mapping) or not value or not set(value) <= {"read", "write"}:
        raise ValueError("a dict with 'read' and/or 'write' bytes per second, e.g. {'write': '10M'}")
    return {k: parse_size(v) for k, v in value.items()}


def _to_bind(value: object) -> Bind:
    if isinstance(value, Bind):
        return value
    if not isinstance(value, str):
        raise ValueError("a 'SRC:DST[:ro|rw]' string")
    return Bind.parse(value)


#: What ``syscalls=`` may name as a whole.
SYSCALL_POLICIES = ("default", "nested", "unconfined")
_SYSCALL_NAME = re.compile(r"^[a-z][a-z0-9_]{1,31}$")


def _syscalls(value: object) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """``"default"`` / ``"nested"`` / ``"unconfined"``, or ``{"allow": [...], "deny": [...]}`` (and
    ``"nested": True``), as (base, allowed names, denied names): hashable, comparable."""
    if isinstance(value, tuple) and len(value) == 3 and value[0] in SYSCALL_POLICIES:
        return value  # already converted (a merged spec)
    if isinstance(value, str) and value in SYSCALL_POLICIES:
        return value, (), ()
    if isinstance(value, Mapping) and set(value) <= {"allow", "deny", "nested"}:
        lists = {key: value.get(key, ()) for key in ("allow", "deny")}
        if all(isinstance(v, (list, tuple)) and all(isinstance(n, str) and _SYSCALL_NAME.match(n) for n in v)
               for v in lists.values()) and isinstance(value.get("nested", False), bool):
            base = "nested" if value.get("nested") else "default"
            unknown = seccomp.unknown(tuple(lists["allow"]) + tuple(lists["deny"]))
            if unknown:
                raise ValueError(f"names of system calls of this machine ({platform.machine()}); "
                                 f"{', '.join(map(repr, unknown))} is none")
            return base, tuple(sorted(lists["allow"])), tuple(sorted(lists["deny"]))
    raise ValueError("'default', 'nested', 'unconfined', or {'allow': [names], 'deny': [names]}")


def _allow_entry(value: object) -> str:
    network, port = parse_allow(str(value))
    return network if port is None else f"{network}:{port}"


def _jail_path(value: object) -> str:
    if not isinstance(value, str) or not os.path.isabs(value) or ".." in value.split("/"):
        raise ValueError("an absolute path inside the jail, without '..'")
    return os.path.normpath(value)


def _check_rootfs(value: object) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise JailConfigError(
            f"rootfs={value!r} is not valid; allowed: None, a directory path or a name ({', '.join(NAMES)})"
        )
    if value in NAMES:  # built (or found in the cache) when a jail first needs it
        return str(value)
    path = os.path.abspath(os.fspath(value))
    if not os.path.isdir(path):
        raise JailConfigError(
            f"rootfs={os.fspath(value)!r} does not exist or is not a directory (resolved to {path})"
        )
    for name in ROOTFS_MOUNTPOINTS:
        entry = os.path.join(path, name)
        if os.path.islink(entry):
            raise JailConfigError(
                f"rootfs={os.fspath(value)!r}: {entry} is a symlink (to {os.readlink(entry)}); "
                f"{', '.join(ROOTFS_MOUNTPOINTS)} must be real directories or absent"
            )
    _check_rootfs_owners(os.fspath(value), path)
    return path


#: Directories of a rootfs whose programs and libraries a jail runs: writable by every user, they
#: let anyone on the host choose what jails run (and race their setup).
_TRUSTED_DIRS = ("", "bin", "sbin", "lib", "lib64", "usr", "etc")
_warned_owners: set[str] = set()


def _check_rootfs_owners(given: str, path: str) -> None:
    """Refuse a rootfs that every user may change; warn once about one another user owns."""
    for name in _TRUSTED_DIRS:
        entry = os.path.join(path, name) if name else path
        try:
            st = os.lstat(entry)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            raise JailConfigError(
                f"rootfs={given!r}: {entry} is writable by every user (mode {stat.S_IMODE(st.st_mode):04o}), so "
                f"anyone on this host could change what jails run; fix: chmod o-w {entry}"
            )
    owner = os.stat(path).st_uid
    if owner not in (0, os.geteuid()) and path not in _warned_owners:
        _warned_owners.add(path)
        warnings.warn(JailWarning(
            f"rootfs {path} is owned by uid {owner}, neither you nor root: that user can change what "
            f"your jails run (chown it, or build your own with `pytest-jail rootfs`)"), stacklevel=2)

