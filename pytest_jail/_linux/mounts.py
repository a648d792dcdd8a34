"""The jail's filesystem as an ordered plan of mount operations, and the code that carries it out.

The plan is computed in the parent, where it can look at the host freely and be unit-tested; the
jail's init only executes it, step by step (bubblewrap's ``setup_newroot`` is the model). Host
paths in the plan are plain host paths; the executor reaches them under ``/oldroot`` after the
first ``pivot_root``, so nothing we mount over can hide a source.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .blackhole import RESOLV_CONF
from .remount import remount_tree
from .syscalls import MNT_DETACH
from .syscalls import MOUNT_ATTR_NODEV
from .syscalls import MOUNT_ATTR_NOSUID
from .syscalls import MOUNT_ATTR_RDONLY
from .syscalls import MS_BIND
from .syscalls import MS_NODEV
from .syscalls import MS_NOEXEC
from .syscalls import MS_NOSUID
from .syscalls import MS_PRIVATE
from .syscalls import MS_RDONLY
from .syscalls import MS_REC
from .syscalls import RESOLVE_IN_ROOT
from .syscalls import RESOLVE_NO_MAGICLINKS
from .syscalls import Syscalls

STAGE = "/tmp"  # any directory that exists everywhere; a tmpfs goes over it in our mount ns only
OLD = "/oldroot"
NEW = "/newroot"
LOWER = "/lower"  # the rootfs, on the staging tmpfs, before it becomes an overlay's lower layer
LAYER = "/layer"  # the overlay's upper and work directories
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
#: Pseudo-terminals one jail may open: the host's pool (kernel.pty.max) is shared by every jail.
MAX_PTYS = 256
_FRESH = ("proc", "dev", "tmp", "sys")

# An operation is a tuple: (verb, *arguments). Verbs are the methods of Executor.
Op = tuple[Any, ...]


@dataclass(frozen=True)
class Exposure:
    """A host path made visible at ``target`` inside the jail.

    ``mapped`` (root mode): shown through an id-mapped mount, so that what the host's root owns
    there belongs to the jail's root, and what the jail's root writes is the host root's on disk.
    """

    source: str
    target: str
    writable: bool = False
    mapped: bool = False


def plan_mounts(
    rootfs: str | None,
    exposures: Sequence[Exposure],
    *,
    closed: Iterable[str] = (),
    tmp_size: int | None = None,
    layer: str | None = None,
    overlay_made: bool = False,
    scratch: Sequence[tuple[str, str]] = (),
    hidden: Sequence[str] = (),
    resolv: str | None = None,
    cgroups: Sequence[CgroupMount] = (),
    own_net: bool = False,
    exists: Callable[[str], bool] = os.path.lexists,
    isdir: Callable[[str], bool] = os.path.isdir,
    listdir: Callable[[str], list[str]] = os.listdir,
    islink: Callable[[str], bool] = os.path.islink,
    readlink: Callable[[str], str] = os.readlink,
) -> list[Op]:
    """Return the ordered mount plan of one jail.

    :param rootfs: ``None`` for a read-only view of the host's ``/``, else the tree to use as ``/``,
        under a fresh writable layer (overlayfs): the tree itself never changes.
    :param exposures: host paths to show inside (the test's temp dir, the Python runtime, binds).
    :param tmp_size: bytes for each private tmpfs (``/tmp``, ``/dev/shm``, ``/run``, the writable
        layer); ``None``: the kernel's default.
    :param layer: a host directory to hold the rootfs's writable layer (kept for a failed test);
        ``None``: a tmpfs that goes with the jail.
    :param overlay_made: the rootfs's overlay comes whole from the parent (root mode on a kernel
        that refuses overlayfs in a user namespace), as the executor's tree; ``layer`` is its.
    :param scratch: host-view directories replaced by an empty, writable tmpfs, with its mode
        (``("/run", "0755")``): where a host keeps live sockets.
    :param hidden: host-view paths replaced by something empty and read-only (``~/.ssh``).
    :param resolv: the jail path of its resolv.conf, to cover with one naming the jail's recorder
        of blocked attempts (``None``: leave it).
    :param closed: host directories the jail's user cannot search (root mode); one on the way to an
        exposure is hidden behind an empty tmpfs in which the exposure's mount point is made.
    :param cgroups: the host's cgroup filesystems under ``/sys/fs/cgroup`` (:func:`cgroup_mounts`),
        mounted again in the jail's own cgroup namespace, so the jail reads its own limits there.
    :param own_net: the jail has a network namespace of its own: its ``/sys`` is a fresh sysfs
        (``/sys/class/net`` lists its devices, not the host's); else the host's, read-only.
    """
    ops: list[Op] = [
        # Propagation first: nothing we mount may leak back to the host (mount_namespaces(7)).
        ("mount", None, "/", None, MS_REC | MS_PRIVATE, None),
        ("mount", "tmpfs", STAGE, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
        ("mkdir", STAGE + NEW),
        ("mkdir", STAGE + OLD),
        # The staging tmpfs becomes / and the host's / moves to /oldroot (bubblewrap does the same).
        ("pivot_root", STAGE, STAGE + OLD),
        ("chdir", "/"),
    ]
    size = f",size={tmp_size}" if tmp_size else ""
    tree = _Tree(ops, exists, isdir, listdir, islink, readlink, frozenset(closed))
    if rootfs is None:
        ops.append(("bind", OLD, NEW, True))
        ops.append(("readonly", NEW, True))
        tree.base["/"] = "/"
        for path, mode in scratch:
            tree.tmpfs(path, f"mode={mode}{size}")
            tree.writable.add(path)
    else:
        if overlay_made:
            ops.append(("made_overlay", NEW))
        else:
            _plan_overlay(ops, rootfs, layer, size)
        tree.overlay = True
        for name in _FRESH:
            ops.append(("mkdir", NEW + "/" + name))
        if not own_net:
            ops.append(("bind", OLD + "/sys", NEW + "/sys", True))
            ops.append(("readonly", NEW + "/sys", True))
    if own_net:
        ops.append(("mount", "sysfs", NEW + "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, None))
    # Exposures first (one may have to shadow a whole directory, / included), then the fresh
    # /proc, /dev and /tmp on top, then what lives inside the fresh /tmp (the test's tmp_path).
    ordered = sorted(exposures, key=lambda e: e.target.count("/"))
    in_fresh = [e for e in ordered if any(under(e.target, "/" + f) for f in _FRESH if f != "sys")]
    for exposure in ordered:
        if exposure not in in_fresh:
            tree.expose(exposure)
    _plan_proc(ops, exists, isdir)
    _plan_dev(ops, size)
    _plan_sys(ops, exists, resolv, own_net)
    _plan_cgroups(ops, cgroups)
    tree.tmpfs("/tmp", "mode=1777" + size)
    for exposure in in_fresh:
        tree.expose(exposure)
    for path in hidden:  # last: a secret inside an exposure (a home in the rootdir) is hidden too
        if tree._owner(path) in tree.base:
            tree.hide(path)
    for path in sorted(tree.made_tmpfs - tree.writable, key=len, reverse=True):
        if path != "/tmp":
            ops.append(("readonly", _new(path), False))
    ops += [("chdir", NEW), ("pivot_root", ".", "."), ("umount", ".", MNT_DETACH), ("chdir", "/")]
    return ops


def _plan_overlay(ops: list[Op], rootfs: str, layer: str | None, size: str) -> None:
    """The rootfs as the lower layer of an overlay whose upper layer is fresh for every jail.

    Both layers are first mounted at fixed places of the staging tmpfs, so the overlay's options
    never have to quote a user's path (a comma or colon in it would break them).
    """
    ops += [("mkdir", LOWER), ("lower", OLD + rootfs, LOWER), ("mkdir", LAYER)]
    if layer is None:
        ops.append(("mount", "tmpfs", LAYER, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755" + size))
    else:
        ops.append(("bind", OLD + layer, LAYER, False))
    ops += [
        ("mkdir", LAYER + "/upper"),
        ("mkdir", LAYER + "/work"),
        # userxattr: the overlay's own bookkeeping in user.* xattrs, which a user namespace may
        # write (overlayfs docs, "Permission model"); trusted.* needs the host's root.
        ("mount", "overlay", NEW, "overlay", MS_NOSUID | MS_NODEV,
         f"lowerdir={LOWER},upperdir={LAYER}/upper,workdir={LAYER}/work,userxattr"),
    ]


# What the kernel shows in /proc that a test has no business reading or changing: masked (an empty
# file or directory) or read-only, as runc's and moby's defaults do (security.md, FS-08).
PROC_MASKED = ("kcore", "keys", "latency_stats", "timer_list", "timer_stats", "sched_debug", "acpi", "scsi",
               "asound")
PROC_READONLY = ("bus", "fs", "irq", "sys", "sysrq-trigger")
HIDDEN_PROC = "/dev/.pytest-jail"


def _plan_proc(ops: list[Op], exists: Callable[[str], bool], isdir: Callable[[str], bool]) -> None:
    proc = NEW + "/proc"
    ops.append(("mount", "proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None))
    for name in PROC_MASKED:
        host = "/proc/" + name
        if not exists(host):
            continue
        if isdir(host):
            ops.append(("mount", "tmpfs", f"{proc}/{name}", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY,
                        "mode=0555,size=0"))
        else:
            ops.append(("bind", OLD + "/dev/null", f"{proc}/{name}", False))
    for name in PROC_READONLY:
        if exists("/proc/" + name):
            ops += [("bind", f"{proc}/{name}", f"{proc}/{name}", True), ("readonly", f"{proc}/{name}", True)]


def _plan_sys(ops: list[Op], exists: Callable[[str], bool], resolv: str | None, own_net: bool) -> None:
    if exists("/sys/firmware"):  # ACPI tables, EFI variables: the machine's, not the test's
        ops.append(("mount", "tmpfs", NEW + "/sys/firmware", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY,
                    "mode=0555,size=0"))
    # A full, uncovered proc (and sysfs) must exist in a mount namespace for a jail nested in this
    # one to mount its own (the kernel's "mnt_already_visible" check); the masks above cover this
    # one. This second proc and sysfs are mounted, then buried under an empty read-only tmpfs: the
    # kernel still counts them, nothing in the jail can reach them.
    ops.append(("mkdir", NEW + HIDDEN_PROC))
    if resolv is not None:  # written in the directory about to be buried; the bind keeps the file
        ops += [
            ("write", NEW + HIDDEN_PROC + "/resolv.conf", RESOLV_CONF),
            ("bind", NEW + HIDDEN_PROC + "/resolv.conf", NEW + resolv, False),
            ("seal", NEW + resolv, False),
        ]
    ops += [
        ("mkdir", NEW + HIDDEN_PROC + "/proc"),
        ("mount", "proc", NEW + HIDDEN_PROC + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
        ("mkdir", NEW + HIDDEN_PROC + "/sys"),
        ("mount", "sysfs", NEW + HIDDEN_PROC + "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, None)
        if own_net else ("bind", OLD + "/sys", NEW + HIDDEN_PROC + "/sys", True),
        ("mount", "tmpfs", NEW + HIDDEN_PROC, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY,
         "mode=0000,size=0"),
    ]


@dataclass(frozen=True)
class CgroupMount:
    """One cgroup filesystem of the host under ``/sys/fs/cgroup``: ``path`` is relative to it
    (``""`` for a pure cgroup v2 host, ``"memory"``...), ``fstype`` is ``cgroup`` or ``cgroup2``,
    ``options`` its own (``memory``, ``xattr,name=systemd``); a symlink has ``link``."""

    path: str
    fstype: str = "cgroup2"
    options: str = ""
    link: str | None = None


CGROUP_ROOT = "/sys/fs/cgroup"


def cgroup_mounts(mountinfo: str, links: dict[str, str]) -> tuple[CgroupMount, ...]:
    """The cgroup filesystems mounted under ``/sys/fs/cgroup`` in ``mountinfo`` (proc(5)), and the
    symlinks there (``cpu -> cpu,cpuacct``): what a container shows as its own."""
    found = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 10:
            continue
        dash = fields.index("-")
        point, fstype, options = fields[4], fields[dash + 1], fields[dash + 3]
        if fstype not in ("cgroup", "cgroup2") or not (point == CGROUP_ROOT or point.startswith(CGROUP_ROOT + "/")):
            continue
        path = point[len(CGROUP_ROOT):].lstrip("/")
        if fstype == "cgroup2":
            found.append(CgroupMount(path))
            continue
        # An existing v1 hierarchy is mounted again with its own options (a mismatch is EBUSY).
        found.append(CgroupMount(path, "cgroup", ",".join(o for o in options.split(",") if o not in ("rw", "ro"))))
    found += [CgroupMount(name, link=target) for name, target in sorted(links.items())]
    return tuple(found)


def _plan_cgroups(ops: list[Op], cgroups: Sequence[CgroupMount]) -> None:
    """The jail's own cgroups at /sys/fs/cgroup, read-only, as a container shows them: mounted in
    its cgroup namespace, their root is the jail's own group, its limits are at the top. A host
    whose cgroups cannot be mounted here (a container's policy) leaves the place empty."""
    if not cgroups:
        return
    root = NEW + CGROUP_ROOT
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY
    # A tmpfs first: the kernel refuses a cgroup filesystem right on top of the same one (EBUSY),
    # and the host's hierarchies must not show through where one cannot be mounted.
    ops.append(("mount", "tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=0"))
    if any(c.path == "" for c in cgroups):  # pure cgroup v2
        ops.append(("optional_mount", "cgroup2", root, "cgroup2", flags, None))
        return
    for mount in cgroups:
        if mount.link is not None:
            ops.append(("symlink", mount.link, f"{root}/{mount.path}"))
        else:
            target = f"{root}/{mount.path}"
            ops.append(("mkdir", target))
            ops.append(("optional_mount", mount.fstype, target, mount.fstype, flags, mount.options or None))
    ops.append(("readonly", root, False))


def _plan_dev(ops: list[Op], size: str) -> None:
    dev = NEW + "/dev"
    ops.append(("mount", "tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755"))
    for name in DEVICES:
        ops += [("touch", f"{dev}/{name}"), ("bind", f"{OLD}/dev/{name}", f"{dev}/{name}", False)]
    ops += [
        ("mkdir", dev + "/pts"),
        ("mount", "devpts", dev + "/pts", "devpts", MS_NOSUID | MS_NOEXEC,
         f"newinstance,ptmxmode=0666,mode=620,max={MAX_PTYS}"),
        ("symlink", "pts/ptmx", dev + "/ptmx"),
        ("mkdir", dev + "/shm"),
        ("mount", "tmpfs", dev + "/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777" + size),
        ("symlink", "/proc/self/fd", dev + "/fd"),
        ("symlink", "/proc/self/fd/0", dev + "/stdin"),
        ("symlink", "/proc/self/fd/1", dev + "/stdout"),
        ("symlink", "/proc/self/fd/2", dev + "/stderr"),
    ]


class _Tree:
    """What the new root looks like while the plan is being written."""

    def __init__(
        self,
        ops: list[Op],
        exists: Callable[[str], bool],
        isdir: Callable[[str], bool],
        listdir: Callable[[str], list[str]],
        islink: Callable[[str], bool],
        readlink: Callable[[str], str],
        closed: frozenset[str],
    ) -> None:
        self.ops = ops
        self.closed: frozenset[str] = closed
        self.base: dict[str, str] = {}  # jail path -> host path of a read-only bind
        self.made_tmpfs: set[str] = set()  # jail paths of tmpfs mounts we own (we may mkdir there)
        self.writable: set[str] = set()  # ...of those, the ones that stay writable
        self.made: set[str] = set()  # jail paths we created
        self.overlay = False  # the root is a writable overlay: mount points can be made anywhere
        self._exists, self._isdir, self._listdir = exists, isdir, listdir
        self._islink, self._readlink = islink, readlink

    def tmpfs(self, path: str, data: str) -> None:
        self.ops.append(("mkdir_p", _new(path)))
        self.ops.append(("mount", "tmpfs", _new(path), "tmpfs", MS_NOSUID | MS_NODEV, data))
        self.made_tmpfs.add(path)
        self.base = {k: v for k, v in self.base.items() if not under(k, path)}

    def hide(self, path: str) -> None:
        """Replace a host path by an empty read-only directory, or an empty file."""
        if self._isdir(path):
            self.tmpfs(path, "mode=0755,size=0")
        else:
            self.ops.append(("bind", OLD + "/dev/null", NEW + path, False))

    def shadow(self, path: str, host_dir: str, skip: Iterable[str] = ()) -> None:
        """A tmpfs at ``path`` re-populated with read-only binds of ``host_dir``'s entries."""
        self.tmpfs(path, "mode=0755")
        for name in sorted(self._listdir(host_dir)):
            if name in skip:
                continue
            source, target = os.path.join(host_dir, name), _join(path, name)
            if self._islink(source):
                self.ops.append(("symlink", self._readlink(source), NEW + target))
            elif self._isdir(source):
                self.ops += [("mkdir", NEW + target), ("bind", OLD + source, NEW + target, True)]
                self.ops.append(("readonly", NEW + target, True))
                self.base[target] = source
            else:
                self.ops += [("touch", NEW + target), ("bind", OLD + source, NEW + target, False)]
                self.ops.append(("readonly", NEW + target, False))
            self.made.add(target)

    def expose(self, exposure: Exposure) -> None:
        target = exposure.target
        make = "mkdir_p" if self._isdir(exposure.source) else "touch_p"
        if self.overlay and not any(under(target, p) for p in [*self.made_tmpfs, *self.base]):
            self.ops.append((make, NEW + target))  # in the fresh writable layer: never the rootfs
            self._bind(exposure)
            return
        owner = self._owner(target)
        if owner in self.base:
            self._mask_closed(target, owner)
            owner = self._owner(target)
        if owner in self.base:
            host = _join(self.base[owner], target[len(owner):].lstrip("/")) if owner != target else self.base[owner]
            if not self._exists(host):
                self._shadow_down_to(target, owner)
        if not self._present(target):
            self.ops.append((make, NEW + target))
        self._bind(exposure)

    def _bind(self, exposure: Exposure) -> None:
        target = exposure.target
        self.ops.append(("bind", OLD + exposure.source, NEW + target, True))
        # Never a set-uid program or a device node through a bind, writable or not.
        self.ops.append(("readonly" if not exposure.writable else "seal", NEW + target, True))
        self.base[target] = exposure.source
        self.made.add(target)

    def _owner(self, target: str) -> str:
        """The jail path of the deepest mount we planned that holds ``target``."""
        return max((p for p in [*self.made_tmpfs, *self.base] if under(target, p)), key=len)

    def _mask_closed(self, target: str, owner: str) -> None:
        """Hide the first directory on the way to ``target`` that the jail cannot search."""
        rel = target[len(owner):].strip("/").split("/")[:-1]
        for i in range(len(rel) + 1):
            path = _join(owner, "/".join(rel[:i])) if i else owner
            if _join(self.base[owner], "/".join(rel[:i])) in self.closed:
                self.tmpfs(path, "mode=0755")
                return

    def _present(self, target: str) -> bool:
        owner = self._owner(target)
        if owner in self.made_tmpfs:
            return target in self.made
        return self._exists(_join(self.base[owner], target[len(owner):].lstrip("/")))

    def _shadow_down_to(self, target: str, owner: str) -> None:
        """Find the deepest existing directory above ``target`` in a read-only base; shadow it."""
        parts = target[len(owner):].strip("/").split("/")
        deepest = owner
        for i in range(len(parts)):
            candidate = _join(owner, "/".join(parts[: i + 1]))
            host = _join(self.base[owner], "/".join(parts[: i + 1]))
            if self._isdir(host) and not self._islink(host):
                deepest = candidate
            else:
                break
        host_dir = _join(self.base[owner], deepest[len(owner):].lstrip("/"))
        if deepest == "/":  # a new top-level directory: the fresh ones must not be the host's
            self.shadow("/", host_dir, skip=_FRESH[:3])
            for name in _FRESH[:3]:
                self.ops.append(("mkdir", NEW + "/" + name))
        else:
            self.shadow(deepest, host_dir)


def _new(path: str) -> str:
    """The place of jail path ``path`` while the new root is being built."""
    return NEW if path == "/" else NEW + path


def under(path: str, parent: str) -> bool:
    return parent == "/" or path == parent or path.startswith(parent.rstrip("/") + "/")


def _join(base: str, rest: str) -> str:
    return base.rstrip("/") + "/" + rest if rest else base


def closed_ancestors(paths: Iterable[str], *, lstat: Callable[[str], os.stat_result] = os.lstat) -> set[str]:
    """Directories above ``paths`` that others may not search (``/root`` with mode 0700).

    In root mode the jail's root is an unprivileged host uid, so such a directory would hide the
    Python runtime behind it; the plan masks it with a tmpfs and exposes only what is needed.
    """
    closed = set()
    for path in paths:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:i])
            try:
                mode = lstat(ancestor).st_mode
            except OSError:
                break
            if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
                closed.add(ancestor)
    return closed


class Executor:
    """Carries out a plan made by :func:`plan_mounts`; each failure names the operation.

    Paths in the new root (``/newroot/...``) are resolved at the moment of use, with the kernel
    confining symlinks and ``..`` to the new root (openat2 RESOLVE_IN_ROOT), and acted on through
    the descriptor found: a rootfs that something swaps between a directory and a symlink to a
    host path while the jail is built cannot lead a mount point or a mount there.
    """

    def __init__(
        self,
        sys: Syscalls,
        sources: dict[str, int] | None = None,
        tree: int | None = None,
        trees: dict[str, int] | None = None,
    ) -> None:
        self.sys = sys
        self.tree = tree
        # Bind sources the parent opened (O_PATH) before the fork: reached through
        # /proc/self/fd, they need no search permission on their ancestors (``/root`` is 0700).
        self.sources = sources or {}
        # Mapped exposures: detached id-mapped trees the parent made (root mode), by host path.
        self.trees = trees or {}

    def run(self, plan: Iterable[Op]) -> None:
        for op in plan:
            getattr(self, op[0])(*op[1:])

    # -- resolving paths in the new root ------------------------------------------------------

    def _open(self, path: str, *, directory: bool = False) -> int:
        """An O_PATH descriptor of ``path``: in the new root, resolved inside it."""
        flags = os.O_PATH | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
        if not under(path, NEW) or path == "/":
            return os.open(path, flags)
        root = os.open(NEW, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)  # anew: mounts on NEW change it
        try:
            return self.sys.openat2(root, path[len(NEW):].lstrip("/") or ".", flags,
                                    RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
        finally:
            os.close(root)

    @contextmanager
    def _at(self, path: str) -> Iterator[str]:
        """``path`` as the place found now, for a call that takes a path (mount(2)): the magic link
        of its descriptor, which the kernel follows to exactly that place. (Paths of the staging
        root are ours alone: they are used as they are.)"""
        if not under(path, NEW) or path == "/":
            yield path
            return
        fd = self._open(path)
        try:
            yield f"{OLD}/proc/self/fd/{fd}"
        finally:
            os.close(fd)

    @contextmanager
    def _in_parent(self, path: str) -> Iterator[tuple[int, str]]:
        """The directory that holds ``path`` (found as above) and the last name in it."""
        parent, name = os.path.split(path.rstrip("/"))
        fd = self._open(parent, directory=True)
        try:
            yield fd, name
        finally:
            os.close(fd)

    # -- the verbs of a plan ------------------------------------------------------------------

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
        with self._at(target) as place:
            self.sys.mount(source, place, fstype, flags, data)

    def optional_mount(self, source: str, target: str, fstype: str, flags: int, data: str | None) -> None:
        """A mount the jail can do without (a container may refuse cgroup filesystems)."""
        try:
            self.mount(source, target, fstype, flags, data)
        except OSError:
            pass

    def bind(self, source: str, target: str, recursive: bool) -> None:
        host = source[len(OLD):] if source.startswith(OLD + "/") else source
        with self._at(target) as place:
            if host in self.trees:
                self.sys.attach_tree(self.trees[host], place)
                return
            fd = self.sources.get(host)
            if fd is not None:
                source = f"{OLD}/proc/self/fd/{fd}"
            self.sys.mount(source, place, None, MS_BIND | (MS_REC if recursive else 0), None)

    def readonly(self, target: str, recursive: bool) -> None:
        self._restrict(target, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, recursive)

    def seal(self, target: str, recursive: bool) -> None:
        """Writable, but no set-uid programs and no device nodes."""
        self._restrict(target, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, recursive)

    def _restrict(self, target: str, attributes: int, recursive: bool) -> None:
        if self.sys.has("mount_setattr"):
            with self._at(target) as place:
                self.sys.mount_setattr(place, attributes, recursive=recursive)
            return
        # Before Linux 5.12: each mount remounted (the MOUNT_ATTR_ bits named are MS_'s too).
        fd = self._open(target)
        try:
            remount_tree(self.sys, fd, attributes, recursive=recursive, proc=OLD + "/proc", name=target)
        finally:
            os.close(fd)

    def lower(self, source: str, target: str) -> None:
        """The rootfs as an overlay's lower layer: a tree the parent cloned (and id-mapped) if it
        did, else a bind."""
        if self.tree is not None:
            self.sys.attach_tree(self.tree, target)
        else:
            self.bind(source, target, True)

    def made_overlay(self, target: str) -> None:
        """The rootfs with its writable layer, an overlay the parent made (never the bare rootfs)."""
        if self.tree is None:
            raise OSError(errno.EINVAL, "the parent sent no overlay of the rootfs", target)
        self.sys.attach_tree(self.tree, target)

    def umount(self, target: str, flags: int) -> None:
        self.sys.umount2(target, flags)

    def pivot_root(self, new_root: str, put_old: str) -> None:
        self.sys.pivot_root(new_root, put_old)

    def chdir(self, path: str) -> None:
        os.chdir(path)

    def mkdir(self, path: str) -> None:
        with self._in_parent(path) as (parent, name):
            try:
                os.mkdir(name, 0o755, dir_fd=parent)
            except FileExistsError:
                pass

    def mkdir_p(self, path: str) -> None:
        """Each missing directory on the way made in its parent as found then, never through a
        symlink (one that appears leads the next lookup inside the new root, or fails)."""
        parts = path.rstrip("/").split("/")
        for i in range(2, len(parts) + 1):
            self.mkdir("/".join(parts[:i]))

    def touch(self, path: str) -> None:
        with self._in_parent(path) as (parent, name):
            try:  # O_EXCL: opening an existing file of an overlay for writing would copy it up
                flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW
                os.close(os.open(name, flags, 0o644, dir_fd=parent))
            except FileExistsError:
                pass

    def touch_p(self, path: str) -> None:
        self.mkdir_p(os.path.dirname(path))
        self.touch(path)

    def symlink(self, target: str, path: str) -> None:
        with self._in_parent(path) as (parent, name):
            os.symlink(target, name, dir_fd=parent)

    def write(self, path: str, text: str) -> None:
        with self._in_parent(path) as (parent, name):
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
            fd = os.open(name, flags, 0o644, dir_fd=parent)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)


class _MountPoints(Executor):
    """The directories and files a plan makes in its new root, made in a tree held by descriptor
    (``root``), resolved inside it as the executor resolves them in the new root."""

    def __init__(self, sys: Syscalls, root: int) -> None:
        super().__init__(sys)
        self.root = root

    def _open(self, path: str, *, directory: bool = False) -> int:
        if not under(path, NEW):
            raise OSError(errno.EINVAL, "not in the new root", path)
        flags = os.O_PATH | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
        return self.sys.openat2(self.root, path[len(NEW):].lstrip("/") or ".", flags,
                                RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)

    def mkdir(self, path: str) -> None:
        if path != NEW:
            super().mkdir(path)


def make_mount_points(sys: Syscalls, root: int, plan: Iterable[Op]) -> None:
    """Make ahead, in the tree at ``root``, the mount points ``plan`` makes in its new root: for an
    overlay the parent made (root mode before Linux 5.11), whose directories the jail's root does
    not own (no id-mapped mounts there). Each one that fails is left for the jail to report."""
    maker = _MountPoints(sys, root)
    for op in plan:
        if op[0] in ("mkdir", "mkdir_p", "touch", "touch_p") and under(op[1], NEW) and op[1] != NEW:
            try:
                getattr(maker, op[0])(op[1])
            except OSError:
                pass
