"""The jail's system call filter: a small classic-BPF program, built here (no libseccomp).

Docker's default profile is the baseline, with flatpak's lessons: what reaches kernel attack
surface a test has no use for is refused (keyrings, BPF, perf, userfaultfd, io_uring, modules,
kexec, reboot, swap, clock setting, file handles), and so are the namespaces and mounts a jail is
made of, unless the jail must hold jails (``nested``); ``clone3`` and the new mount API answer
ENOSYS, so libc and libmount fall back to what can be checked; sockets are UNIX, INET, INET6 and
NETLINK only; ``TIOCSTI`` and ``TIOCLINUX`` (keystrokes into a terminal) are refused, compared on
their 32 bits (CVE-2019-10063); foreign architectures (i386, x32) are killed.

A refused call is not answered by the kernel but handed to the jail's supervisor (init, or the
process a test body entered through) with SECCOMP_RET_USER_NOTIF: it records the call's name and
answers with an errno, so a test that hits the filter fails saying which call it was.
Why not libseccomp: its Python bindings are not on PyPI, and the program is some forty
instructions that a test reads back (``program``), so the dependency would cost more than it saves.
"""

from __future__ import annotations

import errno
import platform
import socket
import struct
from dataclasses import dataclass
from functools import lru_cache

from .syscall_numbers import SYSCALLS

ARCHES = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}  # AUDIT_ARCH_*

#: Refused always: kernel surface no test needs (Docker's default profile).
DENIED = (
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "open_by_handle_at", "name_to_handle_at", "lookup_dcookie", "uselib", "iopl",
    "ioperm", "fanotify_init",
)
#: What a jail is made of: refused unless the jail holds jails (``syscalls="nested"``).
NESTING = ("unshare", "setns", "mount", "umount2", "pivot_root")
#: Answered ENOSYS, silently, so callers fall back (glibc's clone3 to clone, libmount's new API to
#: mount(2)): clone3's flags are in a struct a filter cannot read.
FALLBACK = ("clone3",)
NEW_MOUNT_API = ("open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr")

CLONE_NEW = 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x00020000 | 0x00000080
SOCKET_FAMILIES = {1: "AF_UNIX", 2: "AF_INET", 10: "AF_INET6", 16: "AF_NETLINK"}
IOCTLS = {0x5412: "TIOCSTI", 0x541C: "TIOCLINUX"}
KEYCTL_JOIN_SESSION_KEYRING = 1

RET_KILL_PROCESS = 0x80000000
RET_USER_NOTIF = 0x7FC00000
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000

_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_INSN = struct.Struct("=HBBI")


def _arg(index: int) -> int:
    """Offset of the low 32 bits of argument ``index`` in struct seccomp_data (little-endian)."""
    return 16 + 8 * index


@dataclass(frozen=True)
class Policy:
    """What the filter refuses: the defaults, ``nested`` (a jail in the jail may be made),
    and calls named to ``allow`` or to ``deny`` on top."""

    nested: bool = False
    allow: frozenset[str] = frozenset()
    deny: frozenset[str] = frozenset()

    def refused(self) -> tuple[str, ...]:
        names = set(DENIED) | set(self.deny)
        if not self.nested:
            names |= set(NESTING)
        return tuple(sorted(names - set(self.allow)))

    def silenced(self) -> tuple[str, ...]:
        names = set(FALLBACK) | (set() if self.nested else set(NEW_MOUNT_API))
        return tuple(sorted(names - set(self.allow)))


def program(policy: Policy, machine: str | None = None, *, notify: bool = True) -> bytes:
    """The filter, as the array of struct sock_filter that seccomp(2) takes. With ``notify``,
    refused calls go to a supervisor (SECCOMP_RET_USER_NOTIF); without, they fail at once: a
    process already under a filter with a supervisor (a jail in a jail) cannot have another."""
    return _program(policy, machine or platform.machine(), notify)


@lru_cache(maxsize=16)
def _program(policy: Policy, machine: str, notify: bool) -> bytes:
    numbers = SYSCALLS[machine]
    refuse = RET_USER_NOTIF if notify else RET_ERRNO | errno.EPERM
    refuse_family = RET_USER_NOTIF if notify else RET_ERRNO | errno.EAFNOSUPPORT
    code: list[tuple[int, int, int, int]] = [
        (_LD_W_ABS, 0, 0, 4), (_JEQ, 1, 0, ARCHES[machine]), (_RET, 0, 0, RET_KILL_PROCESS),
        (_LD_W_ABS, 0, 0, 0),
    ]
    if machine == "x86_64":  # the x32 ABI: syscall numbers with bit 30 set
        code += [(_JGE, 0, 1, 0x40000000), (_RET, 0, 0, RET_KILL_PROCESS)]
    for name in policy.silenced():
        if name in numbers:
            code += [(_JEQ, 0, 1, numbers[name]), (_RET, 0, 0, RET_ERRNO | errno.ENOSYS)]
    refused = policy.refused()
    if "keyctl" in refused:  # all but joining a new, anonymous session keyring (a jail in the jail does)
        check = [(_LD_W_ABS, 0, 0, _arg(0)), (_JEQ, 0, 4, KEYCTL_JOIN_SESSION_KEYRING),
                 (_LD_W_ABS, 0, 0, _arg(1)), (_JEQ, 0, 2, 0), (_LD_W_ABS, 0, 0, _arg(1) + 4),
                 (_JEQ, 1, 0, 0), (_RET, 0, 0, refuse), (_RET, 0, 0, RET_ALLOW)]
        code += [(_JEQ, 0, len(check), numbers["keyctl"]), *check]
    for name in refused:
        if name in numbers and name != "keyctl":
            code += [(_JEQ, 0, 1, numbers[name]), (_RET, 0, 0, refuse)]
    if not policy.nested and "clone" not in policy.allow:  # clone(2) with a CLONE_NEW* flag
        check = [(_LD_W_ABS, 0, 0, _arg(0)), (_JSET, 0, 1, CLONE_NEW), (_RET, 0, 0, refuse),
                 (_RET, 0, 0, RET_ALLOW)]
        code += [(_JEQ, 0, len(check), numbers["clone"]), *check]
    families = sorted(SOCKET_FAMILIES)
    for call in ("socket", "socketpair"):
        check = [(_LD_W_ABS, 0, 0, _arg(0))]
        check += [(_JEQ, len(families) - i, 0, family) for i, family in enumerate(families)]
        check += [(_RET, 0, 0, refuse_family), (_RET, 0, 0, RET_ALLOW)]
        code += [(_JEQ, 0, len(check), numbers[call]), *check]
    check = [(_LD_W_ABS, 0, 0, _arg(1)), (_JEQ, 2, 0, 0x5412), (_JEQ, 1, 0, 0x541C), (_RET, 0, 0, RET_ALLOW),
             (_RET, 0, 0, refuse)]
    code += [(_JEQ, 0, len(check), numbers["ioctl"]), *check]
    code.append((_RET, 0, 0, RET_ALLOW))
    return b"".join(_INSN.pack(*insn) for insn in code)


def verdict(nr: int, args: list[int], machine: str | None = None) -> tuple[str, int]:
    """How a refused call reads in a report (``bpf``, ``socket(AF_PACKET)``, ``ioctl(TIOCSTI)``,
    ``clone(CLONE_NEW*)``) and the errno its caller gets."""
    names = {number: name for name, number in SYSCALLS[machine or platform.machine()].items()}
    name = names.get(nr, f"syscall {nr}")
    if name in ("socket", "socketpair"):
        family = args[0] & 0xFFFFFFFF
        try:
            shown = socket.AddressFamily(family).name
        except ValueError:
            shown = f"family {family}"
        return f"{name}({shown})", errno.EAFNOSUPPORT
    if name == "ioctl":
        return f"ioctl({IOCTLS.get(args[1] & 0xFFFFFFFF, hex(args[1]))})", errno.EPERM
    if name == "clone":
        return "clone with new namespaces", errno.EPERM
    return name, errno.EPERM


def unknown(names: tuple[str, ...], machine: str | None = None) -> list[str]:
    """The names in ``names`` that are no system call of this machine."""
    return sorted(set(names) - set(SYSCALLS[machine or platform.machine()]))
