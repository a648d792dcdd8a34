"""What a jail shows of the host: its ids, its mount plan, its working directory.

Computed in the parent from the host as it is (and cached), so the jail's child side only
executes a plan.
"""

from __future__ import annotations

import os
import pwd
import stat
import sys
import warnings
from collections.abc import Sequence
from posix import _exit  # the real one: coverage's patch=_exit would save from our children
from typing import Any

from ._errors import JailSetupError
from ._errors import JailUnavailableError
from ._fork import fork
from ._host import Reads
from ._host import host
from ._linux.mounts import CGROUP_ROOT
from ._linux.mounts import OLD
from ._linux.mounts import CgroupMount
from ._linux.mounts import Exposure
from ._linux.mounts import cgroup_mounts
from ._linux.mounts import closed_ancestors
from ._linux.mounts import make_mount_points
from ._linux.mounts import plan_mounts
from ._linux.net import Attachment
from ._linux.syscalls import MOUNT_ATTR_NODEV
from ._linux.syscalls import MOUNT_ATTR_NOSUID
from ._linux.syscalls import Syscalls
from .rootfs import NAMES
from .rootfs import named_rootfs

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
    """Root mode: real root in the initial user namespace maps the jail to unprivileged host ids.

    A root without CAP_SYS_ADMIN (a container's, by default) cannot id-map a mount, make groups
    or bridges: its jails run as those of any user do (rootless), as its own uid."""
    euid = os.geteuid()  # (asked per process: a jailed body is a fork in another user namespace)
    root_map: bool = host().fact(("root map", euid),
                                 lambda: euid == 0 and in_initial_user_namespace() and _has_sys_admin())
    return root_map


def _has_sys_admin() -> bool:
    """Whether CAP_SYS_ADMIN (21) is in this process's effective set (proc(5): CapEff)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 21 & 1)
    except OSError:
        pass
    return False


def runtime_paths(*, imports_only: bool = False) -> list[str]:
    """Where this Python's code lives: what a test body needs to import and format tracebacks.

    With ``imports_only``, the directories on ``sys.path`` alone: enough for a body in a custom
    rootfs, which is a fork of this interpreter (its binary and libraries are already loaded), and
    which must not get the host's whole ``/usr`` over the rootfs's when Python's prefix is ``/usr``.
    """
    path, cwd = tuple(sys.path), os.getcwd()
    found = host().fact(("runtime paths", path, cwd, imports_only), lambda: _runtime_paths(path, cwd, imports_only))
    return list(found)


def _runtime_paths(path: tuple[str, ...], cwd: str, imports_only: bool) -> tuple[str, ...]:
    paths = set() if imports_only else {
        sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))
    }
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


def plan_for(
    rootfs: str | None,
    exposures: tuple[Exposure, ...],
    root_map: bool,
    tmp_size: int | None,
    layer: str | None = None,
    binds: tuple[str, ...] = (),
    record: bool = False,
    own_net: bool = False,
    overlay_made: bool = False,
) -> list[Any]:
    """The mount plan of a jail; ``binds`` are the targets the user bound explicitly, which the
    host view's hygiene leaves alone; ``own_net``: the jail has a network namespace of its own
    (its ``/sys`` is a fresh sysfs that lists its devices)."""
    closed = closed_ancestors(e.source for e in exposures) if root_map else set()
    # A mapped exposure is the jail root's own: its closed directories are not closed to the jail.
    closed = {c for c in closed if not any(_is_under(c, e.source) for e in exposures if e.mapped)}
    # Plans describe the filesystem this process sees: a jail nested in a jailed body (a fork,
    # with these caches) sees another one, so the mount namespace is part of every cache key.
    view = os.stat("/proc/self/ns/mnt").st_ino
    if rootfs is None:
        scratch, hidden, revealed = host_hygiene(view, os.environ.get("HOME"), os.environ.get("XDG_RUNTIME_DIR"))
        if root_map:  # a closed host directory hides what is in it anyway, and the jail could not mount there
            hidden = tuple(
                h for h in hidden if any(_is_under(h, e.target) for e in exposures) or not closed_ancestors([h])
            )
        hidden = tuple(h for h in hidden if not any(_is_under(h, b) or _is_under(b, h) for b in binds))
        exposures = exposures + tuple(r for r in revealed if all(e.target != r.target for e in exposures))
        resolv = _resolv_conf("/") if record and "/etc/resolv.conf" not in binds else None
        return _cached_plan(view, None, exposures, frozenset(closed), tmp_size, None, scratch, hidden, resolv,
                            host_cgroups(view), own_net)
    resolv = _resolv_conf(rootfs) if record and "/etc/resolv.conf" not in binds else None
    # Mount points are made while the host is still in view: a symlink in the rootfs must not
    # lead them there, so each target is first resolved as the jail will see it.
    exposures = tuple(Exposure(e.source, resolve_in_root(rootfs, e.target), e.writable) for e in exposures)
    return _cached_plan(view, rootfs, exposures, frozenset(closed), tmp_size, layer, (), (), resolv, host_cgroups(view),
                        own_net, overlay_made)


def resolve_in_root(root: str, path: str) -> str:
    """``path`` as a process whose root is ``root`` reaches it: symlinks in it are followed inside
    ``root`` (an absolute one from ``root``, ``..`` never above it). Missing parts stay as given."""
    parts = [p for p in path.split("/") if p]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            link = os.readlink(candidate) if hops < 40 else None
        except OSError:  # not a link (or gone): a plain part. A jail swapping it meanwhile gains
            link = None  # nothing: the mount itself resolves the target again, in the new root
        if link is not None:
            hops += 1
            if link.startswith("/"):
                resolved = []
            parts = [p for p in link.split("/") if p] + parts
            continue
        resolved.append(part)
    return "/" + "/".join(resolved)


def _resolv_conf(root: str) -> str | None:
    """Where the jail finds its resolv.conf, resolved as the jail will see it (``/etc/resolv.conf``
    may link into ``/run``), or ``None`` when there is none to cover."""
    if root == "/":
        real = os.path.realpath("/etc/resolv.conf")
        return real if os.path.isfile(real) else None
    inside = resolve_in_root(root, "/etc/resolv.conf")
    path = root.rstrip("/") + inside
    return inside if os.path.isfile(path) and not os.path.islink(path) else None




def _cached_plan(
    view: int,
    rootfs: str | None,
    exposures: tuple[Exposure, ...],
    closed: frozenset[str],
    tmp_size: int | None,
    layer: str | None,
    scratch: tuple[tuple[str, str], ...],
    hidden: tuple[str, ...],
    resolv: str | None,
    cgroups: tuple[CgroupMount, ...],
    own_net: bool,
    overlay_made: bool = False,
) -> list[Any]:
    key = (view, rootfs, exposures, closed, tmp_size, layer, scratch, hidden, resolv, cgroups, own_net, overlay_made)
    plan: list[Any] = host().plans.get(key, lambda reads: plan_mounts(
        rootfs, exposures, closed=closed, tmp_size=tmp_size, layer=layer, overlay_made=overlay_made, scratch=scratch,
        hidden=hidden, resolv=resolv, cgroups=cgroups, own_net=own_net, exists=reads.wrap(os.path.lexists),
        isdir=reads.wrap(os.path.isdir), listdir=reads.wrap(_sorted_listdir), islink=reads.wrap(os.path.islink),
        readlink=reads.wrap(os.readlink),
    ))
    return plan


def _sorted_listdir(path: str) -> list[str]:
    return sorted(os.listdir(path))


def _version(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


def host_cgroups(view: int) -> tuple[CgroupMount, ...]:
    """The cgroup filesystems this process sees under /sys/fs/cgroup (per mount namespace)."""
    mounts: tuple[CgroupMount, ...] = host().fact(("cgroup mounts", view), _cgroup_mounts)
    return mounts


def _cgroup_mounts() -> tuple[CgroupMount, ...]:
    try:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
        names = os.listdir(CGROUP_ROOT)
    except OSError:
        return ()
    paths = {n: os.path.join(CGROUP_ROOT, n) for n in names}
    links = {n: os.readlink(p) for n, p in paths.items() if os.path.islink(p)}
    return cgroup_mounts(mountinfo, links)


#: Where a host keeps live sockets (a read-only bind does not stop ``connect()`` to a UNIX
#: socket): each becomes an empty, private, writable tmpfs in the host view.
SCRATCH = (("/run", "0755"), ("/var/run", "0755"), ("/var/tmp", "1777"))
#: Secrets in a home directory: each becomes empty (and read-only) in the host view.
HOME_SECRETS = (
    ".ssh", ".gnupg", ".aws", ".azure", ".kube", ".docker", ".config/gcloud", ".config/gh",
    ".netrc", ".pypirc", ".git-credentials", ".npmrc",
)


def host_hygiene(
    view: int, home: str | None, runtime_dir: str | None
) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...], tuple[Exposure, ...]]:
    """The host view's scratch directories, hidden secrets, and files brought back from hiding.

    A file in ``/etc`` that is a symlink into a scratch directory (``/etc/resolv.conf`` ->
    ``/run/systemd/resolve/stub-resolv.conf``) keeps working: its target is shown read-only.
    Cached while what it read still holds: a secret created after a first jail is hidden too.
    """
    found: tuple[tuple[tuple[str, str], ...], tuple[str, ...], tuple[Exposure, ...]] = host().hygiene.get(
        (view, home, runtime_dir, os.geteuid()), lambda reads: _host_hygiene(reads, home, runtime_dir))
    return found


def _host_hygiene(
    reads: Reads, home: str | None, runtime_dir: str | None
) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...], tuple[Exposure, ...]]:
    isdir, islink, lexists = reads.wrap(os.path.isdir), reads.wrap(os.path.islink), reads.wrap(os.path.lexists)
    isfile, realpath = reads.wrap(os.path.isfile), reads.wrap(os.path.realpath)
    candidates = list(SCRATCH)
    if runtime_dir and os.path.isabs(runtime_dir):
        candidates.append((os.path.normpath(runtime_dir), "0700"))
    scratch: list[tuple[str, str]] = []
    for path, mode in candidates:
        if isdir(path) and not islink(path) and not any(_is_under(path, s) for s, _ in scratch):
            scratch.append((path, mode))
    homes = {h for h in (home, _home_of(os.geteuid())) if h and os.path.isabs(h) and h != "/"}
    hidden = sorted(
        os.path.join(h, name) for h in homes for name in HOME_SECRETS if lexists(os.path.join(h, name))
    )
    hidden = [h for h in hidden if not islink(h) and not any(_is_under(h, s) for s, _ in scratch)]
    revealed = []
    try:  # an entry of /etc added, removed or replaced (ln -sf) changes the directory's mtime
        reads.wrap(_version)("/etc")
        names = os.listdir("/etc")
    except OSError:
        names = []
    for name in sorted(names):
        path = os.path.join("/etc", name)
        if os.path.islink(path):
            real = realpath(path)
            if isfile(real) and any(_is_under(real, s) for s, _ in scratch):
                revealed.append(Exposure(real, real))
    return tuple(scratch), tuple(hidden), tuple(revealed)


def _home_of(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_dir
    except KeyError:
        return None


def resolve_rootfs(rootfs: str | None) -> str | None:
    """The directory of a rootfs: a path as it is, a name (``"busybox"``) built once and cached."""
    if rootfs is None or rootfs not in NAMES:
        return rootfs
    return named_rootfs(rootfs)


def idmapped_lower(rootfs: str, userns: str) -> int | None:
    """:func:`idmapped_tree` of a rootfs, where overlayfs takes an id-mapped lower layer (Linux
    5.19; before, it refuses one with EINVAL): asked of the kernel once per filesystem."""
    tree = idmapped_tree(rootfs, userns)
    if tree is None:
        return None
    works: bool = host().fact(("idmapped lower", os.stat(rootfs).st_dev), lambda: _overlay_takes(rootfs, userns))
    if not works:
        os.close(tree)
        _warn_not_idmapped(rootfs, "overlayfs refuses an id-mapped lower layer (before Linux 5.19)")
        return None
    return tree


def _overlay_takes(rootfs: str, userns: str) -> bool:
    """Whether an overlay mounts over ``rootfs`` id-mapped through ``userns`` as its lower layer:
    tried by a child in a mount namespace of its own, on a tmpfs of its own, with a tree of its
    own (a detached tree can be attached once: the parent's stays the jail's)."""
    def child() -> None:
        code = 1
        try:
            sys_ = _syscalls()
            tree = sys_.clone_tree(rootfs)
            ns = os.open(userns, os.O_RDONLY | os.O_CLOEXEC)
            sys_.idmap_tree(tree, ns)
            sys_.unshare(0x00020000)  # CLONE_NEWNS
            sys_.mount(None, "/", None, 0x4000 | 1 << 18)  # MS_REC | MS_PRIVATE: nothing leaks out
            sys_.mount("tmpfs", "/tmp", "tmpfs", 0, "mode=0700")
            for name in ("lower", "upper", "work", "merged"):
                os.mkdir(f"/tmp/{name}")
            sys_.attach_tree(tree, "/tmp/lower")
            sys_.mount("overlay", "/tmp/merged", "overlay", 0,
                       "lowerdir=/tmp/lower,upperdir=/tmp/upper,workdir=/tmp/work")
            code = 0
        finally:
            _exit(code)

    pid = fork(child)
    try:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    except ChildProcessError:  # a caller that ignores SIGCHLD: no answer, so no id-mapping
        return False


def idmapped_tree(rootfs: str, userns: str, *, quiet: bool = False) -> int | None:
    """Root mode: a tree (the rootfs, a mapped exposure) as a detached mount in which a file's
    on-disk owner is the jail's id (uid 0 on disk belongs to the jail's root, not to the host's),
    or ``None`` where its filesystem cannot be id-mapped (Linux 5.12; tmpfs 6.3; not NFS): then
    it is bound as it is, and files owned by the host's root are read-only to the jail's root.
    """
    if rootfs in host().not_idmapped:  # it failed once; the filesystem will not change its mind
        return None
    try:
        tree = _syscalls().clone_tree(rootfs)
    except OSError as exc:
        host().not_idmapped[rootfs] = exc.strerror or str(exc)
        return None
    try:
        ns = os.open(userns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _syscalls().idmap_tree(tree, ns)
        finally:
            os.close(ns)
    except OSError as exc:
        os.close(tree)
        if quiet:
            host().not_idmapped[rootfs] = exc.strerror or str(exc)
        else:
            _warn_not_idmapped(rootfs, exc.strerror or str(exc))
        return None
    return tree


def overlay_tree(rootfs: str, layer: str | None, size: int | None, plan: Sequence[Any]) -> int:
    """Root mode on a kernel that refuses overlayfs in a user namespace (before Linux 5.11): the
    jail's root filesystem, the rootfs under a fresh writable layer, made here by the host's root
    as a detached mount the helper attaches. Such a kernel cannot id-map either: the jail's root
    does not own the rootfs's files (it owns ``/`` itself, the layer's root): the mount points
    ``plan`` makes in them are made here."""
    _warn_not_idmapped(rootfs, "no id-mapped mounts before Linux 5.12")
    attributes = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
    lower = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    scratch = -1
    try:
        if layer is None:
            options = {"mode": "0755", **({"size": str(size)} if size else {})}
            scratch = _syscalls().new_mount("tmpfs", options, attributes)
            layer = f"/proc/self/fd/{scratch}"
        for name in ("upper", "work"):
            os.mkdir(os.path.join(layer, name), 0o755)
        upper = os.path.join(layer, "upper")
        os.chmod(upper, os.stat(lower).st_mode & 0o7777)
        os.chown(upper, ROOT_MAP_BASE, ROOT_MAP_BASE)
        # Paths through descriptors: a comma or colon in the user's path cannot break the options.
        tree = _syscalls().new_mount("overlay", {"lowerdir": f"/proc/self/fd/{lower}", "upperdir": upper,
                                                 "workdir": os.path.join(layer, "work")}, attributes)
        make_mount_points(_syscalls(), tree, plan)
        return tree
    except OSError as exc:
        detail = f"{exc.strerror} during overlay of {rootfs} (made by the host's root)"
        raise JailSetupError("overlay", exc.errno, detail, rootfs) from None
    finally:
        for fd in (lower, scratch):
            if fd >= 0:
                os.close(fd)


def filesystem_type(path: str) -> str | None:
    """The type of the filesystem ``path`` is on (the deepest mount above it in mountinfo)."""
    real = os.path.realpath(path)
    found, depth = None, -1
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                before, _, after = line.partition(" - ")
                point = before.split()[4].replace("\\040", " ")
                if _is_under(real, point) and len(point) >= depth:
                    found, depth = after.split()[0], len(point)
    except (OSError, IndexError):
        return None
    return found


def check_layer(layer: str) -> None:
    """A writable layer's directory must not be on overlayfs, which refuses an upper layer there."""
    if filesystem_type(layer) == "overlay":
        raise JailUnavailableError(
            f"a rootfs jail's writable layer would be in {layer}, on overlayfs (a container's own root?), which "
            "overlayfs cannot take as an upper layer",
            "put it on a volume or a tmpfs: the cache with XDG_CACHE_HOME (docker run -v cache:/cache -e "
            "XDG_CACHE_HOME=/cache), kept layers with pytest's --basetemp")


def idmap_works(path: str) -> bool:
    """Root mode: can the filesystem of ``path`` be shown id-mapped (probed once per filesystem
    with a throwaway user namespace; the kernel's answer, not its version)?"""
    try:
        device = os.stat(path).st_dev
    except OSError:
        return False
    works: bool = host().fact(("idmap", device), lambda: _idmap_works(path))
    return works


def _idmap_works(path: str) -> bool:
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    hold_r, hold_w = os.pipe2(os.O_CLOEXEC)

    def child() -> None:  # a user namespace to map through; it lives until the parent is done
        try:
            os.close(hold_w)
            _syscalls().unshare(0x10000000)  # CLONE_NEWUSER
            os.write(ready_w, b"u")
            os.read(hold_r, 1)
        finally:
            _exit(0)

    pid = fork(child)
    try:
        os.close(ready_w)
        if os.read(ready_r, 1) != b"u":
            return False
        for name in ("uid_map", "gid_map"):  # the kernel maps only through a namespace with a map
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(f"0 {ROOT_MAP_BASE} {ROOT_MAP_SIZE}")
        tree = idmapped_tree(path, f"/proc/{pid}/ns/user", quiet=True)
        if tree is None:
            return False
        os.close(tree)
        return True
    finally:
        for fd in (ready_r, hold_r, hold_w):
            os.close(fd)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:  # a caller that ignores SIGCHLD: reaped by the kernel
            pass


def _warn_not_idmapped(rootfs: str, reason: str) -> None:
    """Once per rootfs: the jail's root will not own the host root's files there."""
    if rootfs in host().not_idmapped:
        return
    host().not_idmapped[rootfs] = reason
    where = ("this kernel has" if reason.startswith("no id-mapped") else
             f"{rootfs} is on a filesystem this kernel cannot id-map (NFS, or tmpfs before Linux 6.3):")
    warnings.warn(
        f"pytest-jail: {where} {reason}: in jails of {rootfs}, files owned by the host's root are read-only "
        "to the jail's root",
        RuntimeWarning,
        stacklevel=4,
    )


def _syscalls() -> Syscalls:
    syscalls: Syscalls = host().fact(Syscalls, Syscalls)
    return syscalls


def reserve_address(
    segment: str, hostname: str, root_map: bool, way_out: tuple[tuple[str, int | None], ...] | None = None
) -> Attachment:
    """An address on a bridge segment; bridges need the host's root (their host side is in the
    host's network namespace)."""
    if not root_map and os.geteuid() == 0:  # a container's root
        raise JailUnavailableError(
            f"net={segment!r} needs a root with CAP_SYS_ADMIN and CAP_NET_ADMIN (a bridge and veth pairs in the "
            "host's network namespace); this one lacks CAP_SYS_ADMIN, as a container's root does",
            "docker run --cap-add SYS_ADMIN --cap-add NET_ADMIN, or use net='none' with a server and its client in "
            "one jail")
    if not root_map:
        raise JailUnavailableError(
            f"net={segment!r} needs pytest to run as root (a bridge and veth pairs in the host's network "
            "namespace); rootless jails have net='none' and net='host'",
            "run pytest as root for bridge networks, or use net='none' with a server and its client in one jail",
        )
    return host().networks().reserve(segment, hostname, way_out)


def check_readable_by_jail(exposures: tuple[Exposure, ...]) -> None:
    """Root mode: the jail runs as an unprivileged host uid; a 0700 directory it needs is a host limit."""
    for exposure in exposures:
        if exposure.mapped:  # the jail's root owns what the host's root owns there
            continue
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
    return {op[1][len(OLD):]: -1 for op in plan if op[0] in ("bind", "lower") and op[1].startswith(prefix)}


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
