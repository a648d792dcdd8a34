"""Per-process parent groups for jails, their creation, and the clean-up of stale ones.

Jails of one process live in ``<our own group>/pytest-jail.<pid>.<token>/`` under each controller
(so the limits of whatever runs us, a CI job or an xdist worker's pytest, still apply), each in a
group named ``j<n>`` that is removed when the jail ends. A parent left by a killed run is found at
the next start by its dead owner pid, emptied and removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import secrets
from collections.abc import Iterator

from .base import Group
from .base import Limits
from .base import read
from .base import rmdir_when_empty
from .base import write
from .detect import Layout
from .detect import detect
from .v1 import CONTROLLERS as V1_CONTROLLERS
from .v1 import V1Group
from .v2 import V2Group

PREFIX = "pytest-jail."
V2_CONTROLLERS = ("memory", "cpu", "pids")


class Unavailable(Exception):
    """cgroups cannot be used here: ``reason`` and ``remedy``."""

    def __init__(self, reason: str, remedy: str) -> None:
        super().__init__(reason, remedy)
        self.reason, self.remedy = reason, remedy


class Manager:
    """Creates the groups of this process's jails."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        # pid, token, and the pid namespace the pid is read in (see clean_stale_everywhere)
        self.name = f"{PREFIX}{os.getpid()}.{secrets.token_hex(4)}.{_pid_namespace()}"
        self._counter = itertools.count(1)
        self.parents: dict[str, str] = {}
        self.v2_parent: str | None = None
        self.budget: int | None = None
        clean_stale_everywhere(layout)  # what killed runs left: removed when a run first needs groups
        if layout.kind in ("v1", "hybrid"):
            self._make_v1_parents()
        elif layout.kind == "v2":
            self._make_v2_parent()
        else:
            raise Unavailable("this host has no cgroup hierarchy mounted", "mount cgroup2 at /sys/fs/cgroup")

    def _make_v1_parents(self) -> None:
        missing = [c for c in (*V1_CONTROLLERS, "cpu") if c not in self.layout.v1]
        if missing:
            raise Unavailable(f"the v1 cgroup controllers {', '.join(missing)} are not mounted",
                              "mount them under /sys/fs/cgroup, or boot with cgroup v2")
        for controller, own in self.layout.v1.items():
            if controller not in (*V1_CONTROLLERS, "cpu", "blkio"):
                continue
            path = os.path.join(own, self.name)
            try:
                os.mkdir(path)
            except OSError:
                self.close()
                raise _not_writable(own, "v1") from None
            self.parents[controller] = path

    def _make_v2_parent(self) -> None:
        assert self.layout.v2 is not None
        own = delegated_root(self.layout.v2)
        # One session's processes (xdist's workers) do this at once: one at a time, each reading
        # what ``own`` was given (not its own group's, which another may have just made a leaf).
        with _locked(own):
            given = read(os.path.join(own, "cgroup.controllers")).split()
            missing = [c for c in V2_CONTROLLERS if c not in given]
            if missing:
                raise Unavailable(
                    f"the cgroup v2 controllers {', '.join(missing)} are not delegated to {own}",
                    "delegate them (systemd: Delegate=yes, or systemd-run --user --scope -p Delegate=yes pytest)",
                )
            enable_children(own, self.layout)
        path = os.path.join(own, self.name)
        try:
            os.mkdir(path)
            with open(os.path.join(path, "cgroup.subtree_control"), "w") as f:
                f.write(_enable_line(self.layout))
        except OSError:
            raise _not_writable(own, "v2") from None
        self.v2_parent = path

    def set_budget(self, memory: int | None) -> None:
        """Cap the memory of all of this process's jails together (``--jail-memory-total``)."""
        if memory is None:
            return
        if self.v2_parent is not None:
            write(os.path.join(self.v2_parent, "memory.max"), str(memory))
            swap = os.path.join(self.v2_parent, "memory.swap.max")
            if os.path.exists(swap):
                write(swap, "0")
        else:
            parent = self.parents["memory"]
            write(os.path.join(parent, "memory.limit_in_bytes"), str(memory))
            memsw = os.path.join(parent, "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):
                write(memsw, str(memory))
        self.budget = memory

    def new_group(self, limits: Limits) -> Group:
        """A fresh group for one jail, with ``limits`` applied."""
        name = f"j{next(self._counter)}"
        group: Group
        if self.v2_parent is not None:
            group = V2Group(self.v2_parent, name)
        else:
            io = bool(limits.io_read or limits.io_write)
            if io and "blkio" not in self.parents:
                raise Unavailable("the blkio cgroup controller is not mounted", "mount it, or drop the io limit")
            group = V1Group(self.parents, name, cpu=limits.cpus is not None, io=io)
        try:
            group.apply(limits)
        except BaseException:
            group.remove()
            raise
        return group

    def close(self) -> None:
        """Remove this process's parent groups (their jails are gone by now)."""
        if os.getpid() != int(self.name.split(".")[1]):
            return  # a forked child: the parent owns them
        for path in [*self.parents.values(), *([self.v2_parent] if self.v2_parent else [])]:
            _remove_tree(path)
        self.parents.clear()
        self.v2_parent = None


@contextlib.contextmanager
def _locked(group: str) -> Iterator[None]:
    """An exclusive flock(2) on a group's directory, released with its descriptor."""
    fd = os.open(group, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _enable_line(layout: Layout) -> str:
    optional = [c for c in ("io",) if c in layout.v2_controllers]
    return " ".join(f"+{c}" for c in (*V2_CONTROLLERS, *optional))


def _session_pid() -> int:
    """The pid of this pytest session: pytest-xdist's main process for one of its workers."""
    return os.getppid() if os.environ.get("PYTEST_XDIST_WORKER") else os.getpid()


def _session_leaf(own: str) -> str:
    return os.path.join(own, f"{PREFIX}{_session_pid()}.pytest")


def delegated_root(own: str) -> str:
    """The group to make jails' groups in: ``own``, or its parent when ``own`` is the leaf a
    session's processes were moved to (:func:`enable_children`)."""
    name = os.path.basename(own)
    return os.path.dirname(own) if name.startswith(PREFIX) and name.endswith(".pytest") else own


def enable_children(own: str, layout: Layout) -> None:
    """Let ``own`` give controllers to child groups.

    cgroup v2's "no internal processes" rule (cgroups(7)) refuses that while ``own`` holds
    processes, which it does when pytest runs in a delegated group of its own (systemd-run
    --scope -p Delegate=yes): then this session's processes (this one; for an xdist worker, the
    main process and its workers) move into a leaf, ``<own>/pytest-jail.<session pid>.pytest``.
    That happens when the first limited jail is made, never before: a run that jails nothing
    changes nothing. The leaf is left for a later start to remove (a process cannot remove its
    own group); processes of others in ``own`` make it fail, with the remedy.
    """
    control = os.path.join(own, "cgroup.subtree_control")
    try:
        if set(V2_CONTROLLERS) <= set(read(control).split()):
            return
        write(control, _enable_line(layout))
        return
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise Unavailable(
                f"cannot enable {', '.join(V2_CONTROLLERS)} for child groups of {own} ({exc.strerror})",
                "run pytest in a delegated cgroup (systemd-run --user --scope -p Delegate=yes pytest ...)",
            ) from None
    try:
        leaf = _session_leaf(own)
        os.makedirs(leaf, exist_ok=True)
        for attempt in range(5):  # a process of this session may fork meanwhile: move it too
            for pid in _session_members(own):
                try:
                    write(os.path.join(leaf, "cgroup.procs"), str(pid))
                except ProcessLookupError:
                    pass  # it ended meanwhile
            try:
                write(control, _enable_line(layout))
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or attempt == 4:
                    raise
    except OSError as exc:
        raise Unavailable(
            f"cannot enable {', '.join(V2_CONTROLLERS)} for child groups of {own}: it holds other "
            f"processes than this pytest ({exc.strerror})",
            "run pytest alone in a delegated cgroup (systemd-run --user --scope -p Delegate=yes pytest ...)",
        ) from None


def _session_members(own: str) -> list[int]:
    """The processes in ``own`` that belong to this session: its pid and its descendants."""
    roots = {_session_pid(), os.getpid()}
    return [pid for pid in (int(p) for p in read(os.path.join(own, "cgroup.procs")).split())
            if _descends_from(pid, roots)]


def _descends_from(pid: int | None, roots: set[int]) -> bool:
    """Whether ``pid`` is one of ``roots`` or a descendant of one (following parents to pid 1)."""
    while pid is not None and pid > 1:
        if pid in roots:
            return True
        pid = _parent_of(pid)
    return False


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _not_writable(own: str, kind: str) -> Unavailable:
    """Why groups cannot be made under ``own``: a read-only cgroup filesystem (a container's), or
    a group this user was not given."""
    try:
        read_only = bool(os.statvfs(own).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        return Unavailable(f"the cgroup filesystem at {own} is mounted read-only (a container's default)",
                           "give the container a writable one (docker run -v /sys/fs/cgroup:/sys/fs/cgroup:rw, which "
                           "shows it the host's groups), or run the tests on the host")
    if kind == "v1":
        return Unavailable(f"cannot create cgroups under {own} (v1 cgroups are not delegated to uid {os.geteuid()})",
                           "run pytest as root for limits on a cgroup v1 host, or boot the host with cgroup v2")
    return Unavailable(f"cannot create cgroups under {own} (not writable by uid {os.geteuid()})",
                       "run pytest in a delegated cgroup (systemd-run --user --scope -p Delegate=yes pytest ...)")


def limits_summary(made: Manager | None = None) -> str:
    """What the report header says about limits, found without creating anything (``made``: the
    process's manager, if a jail made it); raises :class:`Unavailable` with the reason a jail's
    limits would fail with."""
    if made is not None:
        return made.layout.describe()
    layout = detect()
    if layout.kind in ("v1", "hybrid"):
        missing = [c for c in V1_CONTROLLERS if c not in layout.v1]
        if missing:
            raise Unavailable(f"the v1 cgroup controllers {', '.join(missing)} are not mounted",
                              "mount them under /sys/fs/cgroup, or boot with cgroup v2")
        for controller, own in layout.v1.items():
            if controller in (*V1_CONTROLLERS, "cpu", "blkio") and not os.access(own, os.W_OK):
                raise _not_writable(own, "v1")
    elif layout.kind == "v2" and layout.v2 is not None:
        own = delegated_root(layout.v2)
        missing = [c for c in V2_CONTROLLERS if c not in layout.v2_controllers]
        if missing:
            raise Unavailable(
                f"the cgroup v2 controllers {', '.join(missing)} are not delegated to {own}",
                "delegate them (systemd: Delegate=yes, or systemd-run --user --scope -p Delegate=yes pytest)",
            )
        if not os.access(own, os.W_OK):
            raise _not_writable(own, "v2")
        inner = os.path.exists(os.path.join(own, "cgroup.type"))  # (the root group may hold processes and give)
        if inner and not set(V2_CONTROLLERS) <= set(read(os.path.join(own, "cgroup.subtree_control")).split()):
            others = {int(p) for p in read(os.path.join(own, "cgroup.procs")).split()} - set(_session_members(own))
            if others:  # what enable_children would meet: no leaf for this session alone
                raise Unavailable(
                    f"cannot enable {', '.join(V2_CONTROLLERS)} for child groups of {own}: it holds other "
                    f"processes than this pytest (pids {', '.join(map(str, sorted(others)[:5]))})",
                    "run pytest alone in a delegated cgroup (systemd-run --user --scope -p Delegate=yes pytest ...)",
                )
    else:
        raise Unavailable("this host has no cgroup hierarchy mounted", "mount cgroup2 at /sys/fs/cgroup")
    return layout.describe()


def clean_stale_everywhere(layout: Layout | None = None) -> None:
    """Remove the parents of runs that were killed, in every hierarchy we can see."""
    try:
        layout = layout or detect()
    except OSError:
        return
    for own in {*layout.v1.values(), *([delegated_root(layout.v2)] if layout.v2 else [])}:
        clean_stale(own)
        # A killed run that lived in another group than ours (a CI job, a session scope: each in
        # a group of its own under a common parent) left its parents next to our group, where no
        # later run would look: those too, if their pid was read in our pid namespace.
        parent = os.path.dirname(own)
        if os.path.exists(os.path.join(parent, "cgroup.procs")):
            for entry in _subgroups(parent):
                if entry != own and not os.path.basename(entry).startswith(PREFIX):
                    clean_stale(entry, same_pid_namespace_only=True)


def clean_stale(own: str, same_pid_namespace_only: bool = False) -> None:
    """Empty and remove parents left by runs whose process is gone (killed, crashed).

    ``same_pid_namespace_only``: only parents named with our pid namespace, or (named before
    that was part of the name) holding no process: a pid read in a container's namespace says
    nothing about a process here."""
    try:
        names = os.listdir(own)
    except OSError:
        return
    ours = str(_pid_namespace())
    for name in names:
        if not name.startswith(PREFIX):
            continue
        parts = name.split(".")
        try:
            pid = int(parts[1])
        except (IndexError, ValueError):
            continue
        path = os.path.join(own, name)
        if same_pid_namespace_only and not (len(parts) > 3 and parts[3] == ours):
            if len(parts) != 3 or parts[2] == "pytest" or _populated(path):
                continue
        if not _alive(pid):
            _remove_tree(path)


def _pid_namespace() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


def _subgroups(path: str) -> list[str]:
    try:
        return [e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _populated(path: str) -> bool:
    """Whether any group of the tree at ``path`` holds a process."""
    for group in _children_first(path):
        try:
            if read(os.path.join(group, "cgroup.procs")).strip():
                return True
        except OSError:
            continue
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_tree(path: str) -> None:
    """Kill what is left in a stale group and remove it, whatever state a killed run left it in:
    a frozen group is thawed first (a frozen process dies only when thawed)."""
    for child in _children_first(path):
        for knob, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0"), ("cgroup.kill", "1")):
            try:
                write(os.path.join(child, knob), value)
            except OSError:
                pass  # not this hierarchy's knob (or no cgroup.kill before Linux 5.14)
        procs = os.path.join(child, "cgroup.procs")
        try:
            for pid in read(procs).split():
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
        except OSError:
            pass
        try:
            rmdir_when_empty(child, timeout=2.0)
        except OSError:
            pass


def _children_first(path: str) -> Iterator[str]:
    try:
        entries = [e for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for entry in entries:
        yield from _children_first(entry.path)
    yield path
