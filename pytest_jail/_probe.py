"""What this host can do for a jail; every "no" carries its reason and its remedy."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from ._cgroups.manager import Unavailable
from ._cgroups.manager import limits_summary
from ._errors import JailSetupError
from ._errors import JailUnavailableError
from ._host import made_host
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
        return f"jail: namespaces user+mnt+pid+net+uts+ipc+cgroup ({who}); {_limits_summary()}"

    def require(self) -> None:
        if not self.ok:
            raise JailUnavailableError(self.reason, self.remedy)


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


def _in_initial_user_namespace() -> bool:
    return (_read("/proc/self/uid_map") or "").split() == ["0", "0", "4294967295"]


def _filtered() -> bool:
    """Whether a seccomp filter applies to this process (proc(5): Seccomp: 2)."""
    return any(line.split() == ["Seccomp:", "2"] for line in (_read("/proc/self/status") or "").splitlines())


def explain(error: JailSetupError) -> JailUnavailableError | None:
    """Turn a setup failure that the host's policy caused into reason + remedy (else ``None``)."""
    if error.step == "mount" and error.errno == errno.ENODEV and "overlay" in error.detail:
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
        if error.errno == errno.ENOSPC:
            return JailUnavailableError("the host's namespace limit is reached (unshare: ENOSPC)",
                                        "raise user.max_user_namespaces (sysctl -w user.max_user_namespaces=15000)")
        return JailUnavailableError(
            f"this host refuses new namespaces (unshare: {error.detail}); typical inside a container "
            "with the default seccomp profile",
            "run the container with --security-opt seccomp=unconfined --security-opt apparmor=unconfined "
            "(or --privileged), or run the tests on the host",
        )
    if error.step == "user namespace id map":
        return JailUnavailableError(f"this host refuses to map ids in a user namespace ({error.detail})",
                                    "on Ubuntu 24.04: sysctl -w kernel.apparmor_restrict_unprivileged_userns=0")
    if error.step == "mount" and "proc" in error.detail:
        return JailUnavailableError(
            f"this host refuses to mount a fresh /proc ({error.detail}); /proc is masked, as in a container",
            "run the container with --security-opt systempaths=unconfined (podman: --security-opt unmask=ALL)",
        )
    return None
