"""Kernel surface: what the default system call filter refuses, and how a test hears of it.

Each case makes the call for real inside a jail (Python's ctypes, the raw system call number) and
checks the errno the caller got and the name the result gives the refusal; then that the host
is as it was where the call would have changed it.
"""

from __future__ import annotations

import errno
import os
import platform
import sys
import textwrap

import pytest
from attack import needs_jail

from pytest_jail import Jail
from pytest_jail import JailSpec
from pytest_jail._linux.syscall_numbers import SYSCALLS

pytestmark = needs_jail

NUMBERS = SYSCALLS[platform.machine()]


def attempt(
    calls: list[tuple[str, tuple[int, ...]]], spec: JailSpec | None = None
) -> tuple[list[int], list[str] | None]:
    """Make each raw system call in a jail; the errno each got (0: it worked), and the refusals
    the jail reported."""
    script = textwrap.dedent(f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        for nr, args in {[(NUMBERS[name], args) for name, args in calls]!r}:
            ret = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
            print(0 if ret >= 0 else ctypes.get_errno())
    """)
    result = Jail(spec or JailSpec()).run([sys.executable, "-c", script])
    assert result.returncode == 0, result.stderr
    return [int(line) for line in result.stdout.split()], result.blocked_syscalls


# Arguments that would do something if the call were let through; none of them can reach the
# filter's supervisor in a way that matters: it answers before the kernel looks at them.
REFUSED = [
    ("bpf", (0, 0, 0)),  # BPF_MAP_CREATE
    ("perf_event_open", (0, 0, -1, -1, 0)),
    ("userfaultfd", (0,)),
    ("io_uring_setup", (8, 0)),
    ("kexec_load", (0, 0, 0, 0)),
    ("init_module", (0, 0, 0)),
    ("finit_module", (0, 0, 0)),
    ("delete_module", (0, 0)),
    ("reboot", (0xFEE1DEAD, 672274793, 0x4321FEDC, 0)),  # LINUX_REBOOT_CMD_POWER_OFF
    ("swapon", (0, 0)),
    ("acct", (0,)),
    ("syslog", (3, 0, 0)),  # SYSLOG_ACTION_READ_ALL
    ("settimeofday", (0, 0)),
    ("clock_settime", (0, 0)),
    ("adjtimex", (0,)),
    ("open_by_handle_at", (-100, 0, 0)),
    ("name_to_handle_at", (-100, 0, 0, 0, 0)),
    ("add_key", (0, 0, 0, 0, 0)),
    ("request_key", (0, 0, 0, 0)),
    ("keyctl", (0, 0)),  # KEYCTL_GET_KEYRING_ID of the thread keyring
    ("quotactl", (0, 0, 0, 0)),
    ("fanotify_init", (0, 0)),
    ("unshare", (0x00020000,)),  # CLONE_NEWNS
    ("setns", (0, 0)),
    ("mount", (0, 0, 0, 0, 0)),
    ("umount2", (0, 2)),
    ("pivot_root", (0, 0)),
]
if platform.machine() == "x86_64":
    REFUSED += [("iopl", (3,)), ("ioperm", (0, 1024, 1))]


@pytest.mark.parametrize(("name", "args"), REFUSED, ids=[name for name, _ in REFUSED])
def test_refused_and_named(name: str, args: tuple[int, ...]) -> None:
    """Docker's default profile as the baseline: the call fails with EPERM and is named."""
    (got,), refused = attempt([(name, args)])
    assert got == errno.EPERM and refused == [name]


@pytest.mark.parametrize("name", ["clone3", "fsopen", "open_tree", "fsmount", "mount_setattr"])
def test_answered_enosys_so_callers_fall_back(name: str) -> None:
    """clone3 (its flags are out of the filter's sight) and the new mount API: ENOSYS, as an older
    kernel would answer, so glibc and libmount fall back to calls the filter can check; not named."""
    (got,), refused = attempt([(name, (0, 0, 0))])
    assert got == errno.ENOSYS and refused == []


@pytest.mark.parametrize(("family", "label"), [(17, "AF_PACKET"), (40, "AF_VSOCK"), (31, "AF_BLUETOOTH"),
                                                (15, "AF_KEY"), (38, "AF_ALG"), (9, "AF_X25")])
def test_socket_families_beyond_unix_inet_netlink(family: int, label: str) -> None:
    """Packet sockets (sniffing), vsock (the hypervisor), Bluetooth, key management, the kernel's
    crypto API: refused with EAFNOSUPPORT, named with their family."""
    (got,), refused = attempt([("socket", (family, 2, 0))])
    assert got == errno.EAFNOSUPPORT and refused == [f"socket({label})"]


def test_ordinary_calls_pass() -> None:
    """The filter lets through what tests use: sockets of the four families, a thread (clone
    without new namespaces), the keyring join a nested jail needs, a tty ioctl other than TIOCSTI."""
    got, refused = attempt([("socket", (1, 1, 0)), ("socket", (2, 2, 0)), ("socket", (10, 1, 0)),
                            ("socket", (16, 3, 0)), ("getpid", ()), ("keyctl", (1, 0))])
    assert got == [0] * 6 and refused == []


def test_terminal_keystroke_injection_is_refused() -> None:
    """TIOCSTI pushes keystrokes into a terminal's input: a jailed process with the terminal of
    the user's shell could type a command there. Refused on the jail's own pty too."""
    script = textwrap.dedent("""
        import fcntl, os, pty, termios
        main, sub = pty.openpty()
        try:
            fcntl.ioctl(sub, termios.TIOCSTI, b"x")
            print("INJECTED")
        except OSError as exc:
            print(exc.errno)
    """)
    result = Jail().run([sys.executable, "-c", script])
    assert result.stdout.strip() == str(errno.EPERM) and result.blocked_syscalls == ["ioctl(TIOCSTI)"]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="i386 and x32 are x86_64's foreign system call ABIs")
@pytest.mark.parametrize("abi", ["int80", "x32"])
def test_foreign_architectures_are_killed(abi: str) -> None:
    """The i386 entry (``int 0x80``) and x32 numbers reach other syscall tables, where a filter
    written for x86_64's numbers would check the wrong calls: the process is killed (SIGSYS)."""
    script = textwrap.dedent(f"""
        import ctypes, mmap
        if {abi!r} == "int80":
            code = bytes.fromhex("b814000000cd80c3")  # mov eax, 20 (i386 getpid); int 0x80; ret
            page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
            page.write(code)
            address = ctypes.addressof(ctypes.c_char.from_buffer(page))
            print(ctypes.CFUNCTYPE(ctypes.c_int)(address)())
        else:
            print(ctypes.CDLL(None).syscall(0x40000000 + 39))  # x32 getpid
        print("SURVIVED")
    """)
    result = Jail().run([sys.executable, "-c", script])
    assert "SURVIVED" not in result.stdout and result.returncode == -31, (result.returncode, result.stderr)


def test_a_body_fails_naming_the_call(jailed_pytester: pytest.Pytester) -> None:
    """A test body that fails after the filter refused it a call has the call named as the first
    line of its failure; one that went on (a library that probes and falls back) passes, and the
    refusal is a section of its report (``-rA``)."""
    jailed_pytester.makepyfile(
        f"""
        import ctypes, pytest

        @pytest.mark.jail
        def test_bpf():
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.syscall({NUMBERS["bpf"]}, 0, 0, 0) >= 0

        @pytest.mark.jail
        def test_probe():
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall({NUMBERS["io_uring_setup"]}, 8, 0)  # refused: the library falls back

        @pytest.mark.jail(syscalls={{"allow": ["perf_event_open"]}})
        def test_allowed():  # the kernel reads the (NULL) attributes before any permission check: EFAULT
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.syscall({NUMBERS["perf_event_open"]}, 0, 0, -1, -1, 0) == -1 and ctypes.get_errno() == 14
        """
    )
    result = jailed_pytester.runpytest_subprocess("-rA")
    result.assert_outcomes(failed=1, passed=2)
    result.stdout.fnmatch_lines(["*_ test_bpf _*", "jail: blocked system call bpf (seccomp)",
                                 "*- jail: system calls refused (seccomp) -*", "io_uring_setup"])


def test_unconfined_and_extended() -> None:
    """``syscalls="unconfined"`` takes the filter away (bpf reaches the kernel: EPERM from it, not
    named); ``deny`` adds a call (here ``uname``)."""
    (got,), refused = attempt([("bpf", (0, 0, 0))], JailSpec(syscalls="unconfined"))
    assert refused is None and got != 0  # None: no filter to report from
    (got,), refused = attempt([("uname", (0,))], JailSpec(syscalls={"deny": ["uname"]}))
    assert got == errno.EPERM and refused == ["uname"]


def test_the_host_kernel_is_unchanged_by_refused_calls() -> None:
    """What the refused calls would change on the host: its modules (where it has any: none is
    unloaded; their use counts move with the jail's own devices), swap, the kernel's log; each call
    was refused and named."""
    def state() -> tuple[set[str], list[str]]:
        modules = set()
        if os.path.exists("/proc/modules"):
            with open("/proc/modules") as f:
                modules = {line.split()[0] for line in f}
        found = []
        for path in ("/proc/swaps", "/proc/sys/kernel/dmesg_restrict"):
            with open(path) as f:
                found.append(f.read())
        return modules, found

    (modules, before) = state()
    got, refused = attempt([("delete_module", (0, 0)), ("swapoff", (0,)), ("syslog", (5, 0, 0))])  # 5: CLEAR
    assert got == [errno.EPERM] * 3 and refused == ["delete_module", "swapoff", "syslog"]
    modules_after, after = state()
    assert modules <= modules_after and after == before


def test_capabilities_are_what_the_readme_says(jailed_pytester: pytest.Pytester) -> None:
    """A command and a body hold Docker's default set less NET_RAW as the jail's root (root mode),
    nothing as a user (rootless: before, a rootless body kept Docker's set); never SYS_ADMIN."""
    from pytest_jail._child import PAYLOAD_CAPABILITIES
    from pytest_jail._jail import uses_root_map

    expected = sum(1 << cap for cap in PAYLOAD_CAPABILITIES) if uses_root_map() else 0
    command = Jail().run(["sh", "-c", "grep CapEff /proc/self/status"]).stdout.split()[1]
    assert int(command, 16) == expected
    jailed_pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.jail
        def test_caps():
            line = [l for l in open("/proc/self/status") if l.startswith("CapEff")][0]
            assert int(line.split()[1], 16) == {expected}
        """
    )
    jailed_pytester.runpytest_subprocess().assert_outcomes(passed=1)
