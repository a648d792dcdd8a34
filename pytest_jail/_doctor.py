"""``pytest-jail doctor``: what this host and kernel can do for jails, one line per capability,
each found by trying it (in a throwaway child's own namespaces: nothing on the host changes), each
"no" with its remedy, and a verdict on what the configuration asked for needs."""

from __future__ import annotations

import errno
import os
import platform
import shutil
from dataclasses import dataclass
from posix import _exit

from ._cgroups.manager import Unavailable
from ._cgroups.manager import limits_summary
from ._errors import JailUnavailableError
from ._fork import fork
from ._linux.firewall import find_nft
from ._linux.net import try_link
from ._probe import CONTAINER_REMEDY
from ._probe import MASKED_REMEDY
from ._probe import overlay_by_parent
from ._probe import probe_host
from ._probe import try_in_namespaces
from ._view import ROOT_MAP_BASE
from ._view import idmap_works
from ._view import uses_root_map

__all__ = ["Finding", "examine", "render"]


@dataclass(frozen=True)
class Finding:
    """One capability: ``ok`` True/False, or None for a fact (no verdict); ``needed``: the
    configuration asked for it, so a "no" means those jails cannot run."""

    name: str
    ok: bool | None
    detail: str
    remedy: str = ""
    needed: bool = False


def examine(*, rootfs: bool = False, limits: bool = False, bridge: bool = False) -> list[Finding]:
    """Every capability, tried; ``rootfs``, ``limits``, ``bridge``: what the configuration needs
    besides a host-view jail (user, mount, pid, network namespaces)."""
    root = uses_root_map()
    found = [Finding("kernel", None, f"Linux {platform.release()} {platform.machine()}, "
                     + (f"root mode (the jail's root is host uid {ROOT_MAP_BASE})" if root
                        else f"rootless (jails run as uid {os.geteuid()})"))]
    tried = try_in_namespaces()
    found.append(_userns(tried))
    if "userns" in tried and tried["userns"] != "ok":
        return found + [Finding("everything else", None, "not tried: no jail can be made here")]
    if tried.get("keyring", "ok") != "ok":
        found.append(Finding("session keyring", False, f"a system call filter refuses keyctl ({tried['keyring']}): "
                             "a container's seccomp profile", CONTAINER_REMEDY, needed=True))
    fresh = {name: tried.get(name) for name in ("proc", "sysfs")}
    found.append(Finding("fresh /proc and /sys", all(v == "ok" for v in fresh.values()),
                         "a jail mounts its own" if all(v == "ok" for v in fresh.values()) else
                         "refused (" + ", ".join(f"{k}: {v or 'not tried'}" for k, v in fresh.items() if v != "ok")
                         + "): this host's own are masked in part, as in a container", MASKED_REMEDY, needed=True))
    if tried.get("mount_setattr") == "ENOSYS":
        found.append(_finding("read-only host view", tried.get("remount"), True,
                              "each mount remounted read-only (this kernel has no mount_setattr, Linux 5.12)",
                              "neither mount_setattr nor a read-only remount works: run on Linux 5.12 or newer"))
    else:
        found.append(_finding("read-only host view", tried.get("mount_setattr"), True,
                              "mount_setattr works (Linux 5.12)",
                              "mount_setattr is refused: " + CONTAINER_REMEDY))
    if overlay_by_parent(root):
        found.append(Finding("rootfs jails", True, "this kernel refuses overlayfs in a user namespace (before Linux "
                             "5.11): the host's root makes each jail's overlay, its layer on disk under the cache",
                             needed=rootfs))
    else:
        found.append(_finding("rootfs jails", tried.get("overlay"), rootfs, "overlayfs mounts in a user namespace",
                              "this kernel refuses overlayfs in a user namespace (before Linux 5.11) or lacks it: "
                              "upgrade to 5.11 or newer (or run as root), or modprobe overlay"))
    xattrs = tried.get("xattr") == "ok"
    found.append(Finding("tmpfs user xattrs", True if xattrs else None, "overlayfs keeps a rootfs jail's bookkeeping "
                         "in its tmpfs layer (Linux 6.6)" if xattrs else f"none on this kernel's tmpfs (before Linux "
                         f"6.6; {tried.get('xattr')}): a rootfs jail's writable layer goes on disk, under the cache"))
    if root:
        found.append(_idmapped(tried))
    found.append(_limits(limits))
    found.append(_pidfd())
    found.append(_recorder())
    found.append(_bridges(root, bridge))
    found.append(_rootfs_builders(root))
    return found


def render(findings: list[Finding]) -> tuple[str, int]:
    """The report, and the exit status: 1 if something needed says no, else 0."""
    lines, failed = [], []
    for item in findings:
        mark = {True: "ok", False: "NO", None: "--"}[item.ok]
        lines.append(f"{mark:<3} {item.name}: {item.detail}")
        if item.ok is False and item.remedy:
            lines.append(f"    fix: {item.remedy}")
        if item.ok is False and (item.needed or item.name == "user namespaces"):
            failed.append(item.name)
    if failed:
        lines.append(f"verdict: the jails asked for cannot run here ({', '.join(failed)})")
    else:
        lines.append("verdict: the jails asked for can run here")
    return "\n".join(lines), 1 if failed else 0


def _idmapped(tried: dict[str, str]) -> Finding:
    """Root mode: whether a rootfs's files keep their owners for the jail's root."""
    if tried.get("mount_setattr") == "ENOSYS":
        return Finding("id-mapped mounts", False, "this kernel has none (no mount_setattr, Linux 5.12): files the "
                       "host's root owns are read-only to the jail's root", "run on Linux 5.12 or newer")
    works = idmap_works(os.getcwd())
    return Finding("id-mapped mounts", works, "this directory's filesystem can be shown id-mapped" if works
                   else "this directory's filesystem cannot be id-mapped: files the host's root owns are "
                   "read-only to the jail's root", "" if works else "use ext4, xfs or btrfs (Linux 5.12+)")


def _finding(name: str, outcome: str | None, needed: bool, yes: str, no: str) -> Finding:
    if outcome == "ok":
        return Finding(name, True, yes, needed=needed)
    return Finding(name, False, f"{no.split(':')[0]} ({outcome or 'not tried'})", no.partition(": ")[2] or no,
                   needed=needed)


def _userns(tried: dict[str, str]) -> Finding:
    outcome = tried.get("userns", "not tried")
    if outcome == "ok":
        return Finding("user namespaces", True, "unshare and an id map work", needed=True)
    if _filtered():
        return Finding("user namespaces", False, f"a system call filter on this process refuses them ({outcome}): "
                       "a container's seccomp profile", CONTAINER_REMEDY, needed=True)
    support = probe_host()
    if not support.ok:
        return Finding("user namespaces", False, f"{support.reason} ({outcome})", support.remedy, needed=True)
    return Finding("user namespaces", False, f"the kernel refuses them ({outcome})", CONTAINER_REMEDY, needed=True)


def _limits(needed: bool) -> Finding:
    try:
        summary = limits_summary()
    except Unavailable as exc:
        return Finding("limits", False, exc.reason, exc.remedy, needed=needed)
    return Finding("limits", True, summary, needed=needed)


def _pidfd() -> Finding:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError as exc:
        return Finding("pidfd", False, f"pidfd_open fails ({exc.strerror}): jails are supervised through pidfds",
                       "upgrade the kernel to 5.3 or newer", needed=True)
    return Finding("pidfd", True, "pidfd_open works")


def _recorder() -> Finding:
    """The recorder of blocked connections is a tun device in each jail without a network."""
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR))
    except OSError as exc:
        return Finding("blocked-connection recorder", False, f"/dev/net/tun cannot be opened ({exc.strerror}): jails "
                       "still have no network, but say nothing of what they tried to reach",
                       "docker run --device /dev/net/tun (on a host: modprobe tun)")
    return Finding("blocked-connection recorder", True, "/dev/net/tun opens: jails name what they tried to reach")


def _bridges(root: bool, needed: bool) -> Finding:
    if not root and os.geteuid() == 0:  # a container's root
        return Finding("bridges", False, "net='bridge' needs a root with CAP_SYS_ADMIN and CAP_NET_ADMIN (veth pairs "
                       "on the host); this one lacks CAP_SYS_ADMIN, as a container's root does",
                       "docker run --cap-add SYS_ADMIN --cap-add NET_ADMIN, or run the tests on the host",
                       needed=needed)
    if not root:
        return Finding("bridges", False, "net='bridge' needs pytest to run as root (veth pairs on the host)",
                       "run pytest as root for bridged jails; net='none' and 'host' work rootless", needed=needed)
    for kind, code in _try_links().items():
        if code == errno.EOPNOTSUPP:
            return Finding("bridges", False, f"this kernel cannot make a {kind} (EOPNOTSUPP): its driver is neither "
                           "built in nor loaded", f"modprobe {kind} (as root, on the host)", needed=needed)
        if code:
            return Finding("bridges", False, f"making a {kind} is refused here ({errno.errorcode.get(code, code)})",
                           "run pytest as root on the host, outside any system call filter", needed=needed)
    nft = find_nft()
    ways_out = f"ways out (allow=, nat=) by {nft}" if nft else (
        "no nft, so no way out (allow=, nat=): apt-get install nftables")
    return Finding("bridges", True, f"root, and a bridge and a veth pair can be made; {ways_out}", needed=needed)


def _try_links() -> dict[str, int]:
    """Make a bridge and a veth pair, as a bridged jail's network does, each in a throwaway child's
    own network namespace (the kernel loads their drivers on demand where it can): errno per kind."""
    found = {}
    for kind in ("bridge", "veth"):
        pid = fork(lambda kind=kind: _exit(try_link(kind)))  # type: ignore[misc]
        found[kind] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return found


def _rootfs_builders(root: bool) -> Finding:
    from .rootfs.busybox import find_busybox

    try:
        busybox = find_busybox()
    except JailUnavailableError as exc:
        return Finding("rootfs builders", False, exc.reason, exc.remedy)
    debootstrap = shutil.which("debootstrap") or (os.path.exists("/usr/sbin/debootstrap") and "/usr/sbin/debootstrap")
    extra = f"; debootstrap: {debootstrap}" if debootstrap and root else (
        "; debootstrap needs root" if debootstrap else "; no debootstrap (apt-get install debootstrap)")
    return Finding("rootfs builders", True, f"static busybox: {busybox}{extra}")


def _filtered() -> bool:
    try:
        with open("/proc/self/status") as f:
            return any(line.split() == ["Seccomp:", "2"] for line in f)
    except OSError:
        return False
