"""What this host can do for a jail; every "no" carries its reason and its remedy."""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass
from posix import _exit  # the real one: coverage's patch=_exit would save from our children

from ._cgroups.manager import Unavailable
from ._cgroups.manager import limits_summary
from ._child import join_fresh_keyring
from ._child import write_own_map
from ._errors import JailSetupError
from ._errors import JailUnavailableError
from ._fork import fork
from ._host import host
from ._host import made_host
from ._linux.remount import remount_tree
from ._linux.syscalls import Syscalls
from ._view import ROOT_MAP_BASE
from ._view import uses_root_map


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class HostSupport:
    """One probe of the host, made once per session."""

    ok: bool
    mode: str  # "root" or "rootless"
    reason: str = ""
    remedy: str = ""

    def summary(self) -> str:
        if not self.ok:
            return f"jail: unavailable on this host: {self.reason}"
        who = (
            f"root mode, jail root = host uid {ROOT_MAP_BASE}"
            if self.mode == "root"
            else f"rootless, jail runs as uid {os.geteuid()}"
        )
        line = f"jail: namespaces user+mnt+pid+net+uts+ipc+cgroup ({who}); {_limits_summary()}"
        return line + "".join(f"; {part}" for part in _kernel_summary(self.mode == "root"))

    def require(self) -> None:
        if not self.ok:
            raise JailUnavailableError(self.reason, self.remedy)


def _kernel_summary(root: bool) -> list[str]:
    """What this kernel does differently, from the trial in namespaces (``pytest-jail doctor``
    says the same at length)."""
    tried = try_in_namespaces()
    if tried.get("userns", "ok") != "ok":
        return []
    release = os.uname().release
    parts = [f"{name} refused ({tried[key]}): pytest-jail doctor says why"
             for key, name in (("keyring", "keyctl"), ("proc", "a fresh /proc"), ("sysfs", "a fresh /sys"))
             if tried.get(key, "ok") != "ok"]
    if tried.get("mount_setattr") == "ENOSYS":
        parts.append(f"Linux {release}: the host view is made read-only mount by mount (no mount_setattr)")
    if overlay_by_parent(root):
        parts.append("rootfs overlays made by the host's root (none in a user namespace before 5.11)")
    elif tried.get("overlay", "ok") != "ok":
        parts.append(f"no rootfs jails (overlayfs in a user namespace: {tried['overlay']})")
    if tried.get("xattr", "ok") != "ok" and not overlay_by_parent(root):
        parts.append("rootfs layers on disk (no user xattrs on tmpfs before 6.6)")
    return parts


def _limits_summary() -> str:
    made = made_host()
    try:  # found without creating a group: a run that jails nothing changes nothing on the host
        return f"limits: {limits_summary(made.made_cgroups() if made is not None else None)}"
    except Unavailable as exc:
        return f"limits: unavailable ({exc.reason})"


def probe_host() -> HostSupport:
    """Read the sysctls that decide whether unprivileged user namespaces work, without forking."""
    mode = "root" if uses_root_map() else "rootless"
    if not os.path.exists("/proc/self/ns/user"):
        return HostSupport(False, mode, "the kernel has no user namespaces (CONFIG_USER_NS)",
                           "use a kernel built with CONFIG_USER_NS=y")
    if _read("/proc/sys/user/max_user_namespaces") == "0":
        return HostSupport(False, mode, "user namespaces are disabled (user.max_user_namespaces = 0)",
                           "run: sysctl -w user.max_user_namespaces=15000")
    if mode == "rootless":
        if _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
            return HostSupport(False, mode,
                               "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone = 0)",
                               "run: sysctl -w kernel.unprivileged_userns_clone=1")
        if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
            return HostSupport(False, mode,
                               "AppArmor restricts unprivileged user namespaces "
                               "(kernel.apparmor_restrict_unprivileged_userns = 1)",
                               "run: sysctl -w kernel.apparmor_restrict_unprivileged_userns=0")
    return HostSupport(True, mode)


#: What a container's "no" says to do.
CONTAINER_REMEDY = ("run the container with --security-opt seccomp=unconfined --security-opt systempaths=unconfined "
                    "--security-opt apparmor=unconfined (Docker's default profile refuses unshare and mount; its "
                    "masked /proc and /sys refuse fresh ones), or run the tests on the host")
#: What a container's masked /proc or /sys says to do.
MASKED_REMEDY = ("run the container with --security-opt systempaths=unconfined (podman: --security-opt unmask=ALL), "
                 "or run the tests on the host")
#: What an old kernel's "no" says to do.
KERNEL_REMEDY = ("run on Linux 5.10 or newer (Debian 11, Ubuntu 22.04, RHEL 9, Amazon Linux 2023 and their "
                 "successors; see README, Supported kernels)")


def overlay_by_parent(root_map: bool) -> bool:
    """Whether a rootfs's overlay is made by the parent, the host's root (root mode on a kernel
    that refuses overlayfs in a user namespace: before Linux 5.11), not in the jail."""
    return root_map and try_in_namespaces().get("overlay") == "EPERM"


def _syscalls() -> Syscalls:
    syscalls: Syscalls = host().fact(Syscalls, Syscalls)
    return syscalls


def _in_initial_user_namespace() -> bool:
    return (_read("/proc/self/uid_map") or "").split() == ["0", "0", "4294967295"]


def _maps_host_root() -> bool:
    """Whether this user namespace maps its uid 0 to the host's (proc(5): uid_map)."""
    return any(line.split()[:2] == ["0", "0"] for line in (_read("/proc/self/uid_map") or "").splitlines())


def _filtered() -> bool:
    """Whether a seccomp filter applies to this process (proc(5): Seccomp: 2)."""
    return any(line.split() == ["Seccomp:", "2"] for line in (_read("/proc/self/status") or "").splitlines())


def explain(error: JailSetupError) -> JailUnavailableError | None:
    """Turn a setup failure that the host's policy caused into reason + remedy (else ``None``)."""
    if error.errno == errno.ENOSYS:
        return JailUnavailableError(
            f"this kernel (Linux {os.uname().release}) lacks a system call jails need ({error.step}: {error.detail})",
            KERNEL_REMEDY)
    refused_overlay = error.step == "mount" and error.errno == errno.EPERM and "overlay" in error.detail
    if refused_overlay and try_in_namespaces().get("overlay") not in (None, "ok"):
        return JailUnavailableError(
            f"this kernel (Linux {os.uname().release}) refuses overlayfs in a user namespace, which a rootfs's "
            "writable layer needs (Linux 5.11)", "run pytest as root (the host's root then makes the overlay), "
            "or on Linux 5.11 or newer; jails in the host view (rootfs=None) work here")
    if error.step in ("mount", "overlay") and error.errno == errno.ENODEV and "overlay" in error.detail:
        return JailUnavailableError(
            "this kernel has no overlayfs, which a rootfs's writable layer needs (mount overlay: ENODEV)",
            "load it as root: modprobe overlay (or boot a kernel with CONFIG_OVERLAY_FS)",
        )
    if error.errno not in (errno.EPERM, errno.EACCES, errno.ENOSPC, errno.EINVAL):
        return None
    if error.step == "unshare":
        if _filtered() and not _in_initial_user_namespace():  # a jail: a container's filter has its own line
            return JailUnavailableError(
                f"this process may not make namespaces (unshare: {error.detail}): it runs under a system call "
                "filter, a jailed test's or a container's",
                "in a jailed test, give it @pytest.mark.jail(syscalls='nested') (or JailSpec(syscalls='nested'))",
            )
        support = probe_host()  # a sysctl that says no is the cause, before any guess at a container
        if not support.ok:
            return JailUnavailableError(support.reason, support.remedy)
        if error.errno == errno.ENOSPC:
            return JailUnavailableError("the host's namespace limit is reached (unshare: ENOSPC)",
                                        "raise user.max_user_namespaces (sysctl -w user.max_user_namespaces=15000)")
        return JailUnavailableError(
            f"this host refuses new namespaces (unshare: {error.detail}); typical inside a container "
            "with the default seccomp profile", CONTAINER_REMEDY)
    if error.step == "session keyring":
        return JailUnavailableError(
            f"a system call filter refuses keyctl ({error.detail}), which a jail uses to leave pytest's keys "
            "behind: a container's seccomp profile", CONTAINER_REMEDY)
    if error.step == "user namespace id map":
        if os.geteuid() == 0 and not _in_initial_user_namespace() and _maps_host_root():
            return JailUnavailableError(
                f"a jail in a jail may not map the host's uid 0 ({error.detail}): that needs CAP_SETFCAP over "
                "the outer jail (Linux 5.12), whose root here is the host's root without CAP_SYS_ADMIN",
                "run pytest as a user other than root (or as a root with CAP_SYS_ADMIN: root mode)")
        return JailUnavailableError(f"this host refuses to map ids in a user namespace ({error.detail})",
                                    "on Ubuntu 24.04: sysctl -w kernel.apparmor_restrict_unprivileged_userns=0")
    fresh = re.search(r"during mount (proc|sysfs) ", error.detail)
    if error.step == "mount" and fresh:
        where = "/proc" if fresh.group(1) == "proc" else "/sys"
        return JailUnavailableError(
            f"this host refuses to mount a fresh {where} ({error.detail}): its own {where} is masked in part, as in "
            "a container, and the kernel then refuses a fresh one in a user namespace", MASKED_REMEDY)
    return None


CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_REC, MS_PRIVATE, MS_RDONLY = 0x4000, 1 << 18, 0x1
MOUNT_ATTR_RDONLY = 0x1


def try_in_namespaces() -> dict[str, str]:
    """What a jail's helper can do here, tried once per process (see :func:`_try_in_namespaces`)."""
    found: dict[str, str] = host().fact("tried in namespaces", _try_in_namespaces)
    return found


def _try_in_namespaces() -> dict[str, str]:
    """Fork a child that makes a user and a mount namespace, as a jail's helper does, and tries
    there what jails need; what it found comes back as JSON (errno names for a "no")."""
    read, write = os.pipe2(os.O_CLOEXEC)

    def child() -> None:
        try:
            os.close(read)
            os.write(write, json.dumps(_child_tries()).encode())
        finally:
            _exit(0)

    pid = fork(child)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    try:
        found: dict[str, str] = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        found = {}
    return found


def _child_tries() -> dict[str, str]:
    results: dict[str, str] = {}
    syscalls = Syscalls()
    uid, gid = os.geteuid(), os.getegid()

    def attempt(name: str, action: object) -> bool:
        try:
            action()  # type: ignore[operator]
        except OSError as exc:
            results[name] = errno.errorcode.get(exc.errno or 0, str(exc))
            return False
        results[name] = "ok"
        return True

    def enter() -> None:
        syscalls.unshare(CLONE_NEWUSER | CLONE_NEWNS)
        write_own_map(uid, gid)  # as a jail's helper does (it has every capability in its namespace)
        syscalls.mount(None, "/", None, MS_REC | MS_PRIVATE)
        syscalls.mount("tmpfs", "/tmp", "tmpfs")

    if not attempt("userns", enter):
        return results
    for name in ("lower", "upper", "work", "merged"):
        os.mkdir(f"/tmp/{name}")
    os.mkdir("/tmp/lower/dir")

    def xattr() -> None:
        os.setxattr("/tmp/upper", "user.pytest-jail", b"1")

    attempt("xattr", xattr)

    def overlay() -> None:
        syscalls.mount("overlay", "/tmp/merged", "overlay", 0,
                       "lowerdir=/tmp/lower,upperdir=/tmp/upper,workdir=/tmp/work,userxattr")

    attempt("overlay", overlay)

    def fresh_sysfs() -> None:  # a network namespace's own /sys, as a jail with its own network mounts it
        syscalls.unshare(CLONE_NEWNET)
        os.mkdir("/tmp/sys")
        syscalls.mount("sysfs", "/tmp/sys", "sysfs", MS_RDONLY)

    def fresh_proc() -> None:  # a pid namespace's own /proc: mounted by its first process (last: it is one-off)
        syscalls.unshare(CLONE_NEWPID)
        os.mkdir("/tmp/proc")
        pid = os.fork()
        if pid == 0:
            try:
                syscalls.mount("proc", "/tmp/proc", "proc", 0)
                _exit(0)
            except OSError as exc:
                _exit(exc.errno or 1)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code:
            raise OSError(code, os.strerror(code))

    attempt("keyring", lambda: join_fresh_keyring(syscalls))  # (Docker's default profile refuses keyctl)
    attempt("sysfs", fresh_sysfs)
    attempt("proc", fresh_proc)
    if not attempt("mount_setattr", lambda: syscalls.mount_setattr("/tmp", MOUNT_ATTR_RDONLY, recursive=True)):

        def remount() -> None:  # what a jail does without mount_setattr
            fd = os.open("/tmp", os.O_PATH | os.O_CLOEXEC)
            try:
                remount_tree(syscalls, fd, MOUNT_ATTR_RDONLY, recursive=True, name="/tmp")
            finally:
                os.close(fd)

        attempt("remount", remount)
    return results
