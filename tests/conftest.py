"""Gates for the suite: tests that need a real jail skip with the host probe's own explanation."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from collections.abc import Iterator

import pytest

from pytest_jail._jail import uses_root_map
from pytest_jail._probe import probe_host
from pytest_jail._probe import try_in_namespaces
from pytest_jail._view import filesystem_type
from pytest_jail._view import idmap_works

_HOST = probe_host()

needs_jail = pytest.mark.skipif(not _HOST.ok, reason=f"{_HOST.reason}; {_HOST.remedy}")


def _rootfs_jails() -> str:
    """Why rootfs jails cannot run here ("" if they can): a user namespace may not mount overlayfs
    before Linux 5.11 (root mode has the host's root make the overlay)."""
    if not _HOST.ok:
        return f"{_HOST.reason}; {_HOST.remedy}"
    refused = "" if uses_root_map() else try_in_namespaces().get("overlay", "ok")
    return "" if refused in ("", "ok") else (
        f"this kernel refuses overlayfs in a user namespace ({refused}; before Linux 5.11): rootless rootfs jails "
        "error with that cause (run as root, or on 5.11 or newer)")


_ROOTFS = _rootfs_jails()
needs_rootfs_jail = pytest.mark.skipif(bool(_ROOTFS), reason=_ROOTFS)


def _tun_usable() -> bool:
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR))
        return True
    except OSError:
        return False


needs_tun = pytest.mark.skipif(not _tun_usable(), reason="no usable /dev/net/tun (a container without --device "
                               "/dev/net/tun): jails record no blocked connections here, as the doctor says")
#: A root without CAP_SYS_ADMIN (a container's): its jails run as uid 0, rootless.
CONTAINER_ROOT = os.geteuid() == 0 and not uses_root_map()
NO_NESTED_ROOT = ("a container's root runs its jails as the host's uid 0, which a jail in a jail may not map "
                  "(CAP_SETFCAP, Linux 5.12): that jail errors with this cause")
root_mode = pytest.mark.skipif(not uses_root_map(), reason="needs pytest to run as real root (root mode)")
rootless_mode = pytest.mark.skipif(uses_root_map(), reason="needs an unprivileged user (rootless mode)")
needs_busybox = pytest.mark.skipif(
    shutil.which("busybox") is None, reason="needs a static busybox: apt-get install busybox-static"
)


def wait_until(predicate: Callable[[], object], timeout: float = 60.0) -> bool:
    """Whether ``predicate()`` came true within ``timeout`` seconds, asked every 50 ms. A bound,
    never a speed: emulated kernels under load are many times slower than this host."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def refuse_calls(refusals: dict[str, int]) -> str:
    """Python code that puts on the process running it a seccomp filter answering each named system
    call with its errno, everything else allowed: a kernel without the call (ENOSYS), or a
    container's profile (EPERM), made real on this kernel."""
    return textwrap.dedent(f"""
        import ctypes, struct
        from pytest_jail._linux.syscalls import Syscalls
        numbers = Syscalls()._nr
        code = [(0x20, 0, 0, 0)]                          # load the system call number
        for name, err in {refusals!r}.items():
            code += [(0x15, 0, 1, numbers[name]), (0x06, 0, 0, 0x50000 | err)]  # equal: that errno
        code.append((0x06, 0, 0, 0x7FFF0000))              # allow
        ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)           # PR_SET_NO_NEW_PRIVS
        Syscalls().install_filter(b"".join(struct.pack("<HBBI", *c) for c in code), listener=False)
    """)


def skip_unless_jail_root_owns(path: str) -> None:
    """Root mode: skip where ``path`` cannot be shown id-mapped (a kernel before 5.12, NFS...):
    the jail's root then does not own a rootfs's files there, they are read-only to it."""
    if uses_root_map() and not idmap_works(path):
        pytest.skip(f"root mode, and {path} cannot be id-mapped here (no mount_setattr before Linux 5.12, or its "
                    "filesystem): the jail's root does not own the rootfs's files")


def skip_unless_shown_id_mapped(path: str, what: str) -> None:
    """Root mode: skip where ``path``'s filesystem cannot be id-mapped (a kernel before 5.12, NFS...):
    a body then sees only its own tmp_path there (handed to the jail's root), not ``what``."""
    if uses_root_map() and not idmap_works(path):
        pytest.skip(f"root mode, and {path} cannot be id-mapped here (no mount_setattr before Linux 5.12, or its "
                    f"filesystem): a body sees only its tmp_path there, not {what}")


def skip_if_on_overlayfs(path: str) -> None:
    """A writable layer kept in ``path`` cannot be on overlayfs (a container's root): the jail
    refuses it with that cause; the test has nothing else to show there."""
    if filesystem_type(path) == "overlay":
        pytest.skip(f"{path} is on overlayfs (a container's root): a writable layer cannot be kept there")


@pytest.fixture
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A minimal rootfs: a static busybox and its applet links, world-readable."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("needs a static busybox: apt-get install busybox-static")
    root = tmp_path_factory.mktemp("rootfs")
    os.chmod(root, 0o755)
    for name in ("bin", "etc", "proc", "dev", "tmp", "sys", "root"):
        (root / name).mkdir()
    shutil.copy(busybox, root / "bin" / "busybox")
    for applet in ("sh", "ls", "ps", "cat", "id", "hostname", "touch", "echo", "sleep", "mount", "rm"):
        os.symlink("busybox", root / "bin" / applet)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "marker").write_text("from the rootfs\n")
    for path in (root, *root.rglob("*")):
        if not path.is_symlink():
            os.chmod(path, 0o755)
    return str(root)


@pytest.fixture
def jailed_pytester(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester whose directory the jail can read (root mode runs the jail as an unprivileged host
    uid), whose runs keep the order of their tests (pytest-randomly, where installed, is off)."""
    os.chmod(pytester.path, 0o755)
    monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:randomly")
    return pytester


@pytest.fixture(autouse=True)
def alone_among_leftover_checks(request: pytest.FixtureRequest,
                                tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests marked ``leftovers`` (they kill a pytest, which leaves stale groups for the next
    run, or judge the host's leftovers as a whole) run one at a time, under pytest-xdist too."""
    if request.node.get_closest_marker("leftovers") is None:
        yield
        return
    import fcntl

    with open(tmp_path_factory.getbasetemp().parent / "leftovers.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def tree_digest(root: str) -> str:
    """Every path, mode, owner, size, link target and byte of a tree: equal digests, equal trees."""
    digest = hashlib.sha256()
    for parent, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(dirs + files):
            path = os.path.join(parent, name)
            st = os.lstat(path)
            digest.update(f"{path}\0{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0{st.st_size}\0".encode())
            if os.path.islink(path):
                digest.update(os.readlink(path).encode())
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


@pytest.fixture
def outside() -> Iterator[str]:
    """A stand-in for the world beyond the host, on this machine: a network namespace behind a
    veth (host side 203.0.113.1/24, its side 203.0.113.2) with a TCP echo of the peer's address
    on ports 8080 and 9090. Returns its address; removed after the test."""
    if shutil.which("ip") is None or shutil.which("nft") is None:
        pytest.skip("needs iproute2 and nftables: apt-get install iproute2 nftables")
    import fcntl

    # One at a time on this host: two would both put 203.0.113.1/24 on a host device.
    lock = os.open("/run/pytest-jail-test-outside.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    name = f"pjtest{os.getpid() % 100000}"
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    netns_mounted = _is_mount_point("/run/netns")  # ip mounts it the first time; we put that back
    run("ip", "netns", "add", name)
    server = None
    try:
        run("ip", "link", "add", f"{name}h", "type", "veth", "peer", "name", "eth0", "netns", name)
        run("ip", "addr", "add", "203.0.113.1/24", "dev", f"{name}h")
        run("ip", "link", "set", f"{name}h", "up")
        for args in (["addr", "add", "203.0.113.2/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                     ["link", "set", "lo", "up"]):
            run("ip", "netns", "exec", name, "ip", *args)
        echo = ("import socket, threading\n"
                "def serve(port):\n"
                "    s = socket.create_server(('0.0.0.0', port))\n"
                "    while True:\n"
                "        c, peer = s.accept(); c.sendall(peer[0].encode() + b'\\n'); c.close()\n"
                "for p in (8080, 9090): threading.Thread(target=serve, args=(p,)).start()\n"
                "print('ready', flush=True)\n")
        server = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-c", echo],
                                  stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline() == "ready\n"
        yield "203.0.113.2"
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", f"{name}h"], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        if not netns_mounted and _is_mount_point("/run/netns") and not os.listdir("/run/netns"):
            subprocess.run(["umount", "/run/netns"], capture_output=True)
        os.close(lock)


def _is_mount_point(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)
