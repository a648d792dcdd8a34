"""Filesystem escapes: writes that must never reach the host, whatever the jail tries."""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
import sys
import threading

import pytest
from attack import needs_jail
from attack import root_mode
from attack import untouched

from pytest_jail import Jail
from pytest_jail import JailError
from pytest_jail import JailSpec
from pytest_jail._view import uses_root_map

pytestmark = needs_jail


def test_init_descriptors_lead_nowhere(tmp_path: os.PathLike[str]) -> None:
    """The reproduction of issue 10: init kept directory descriptors (the O_PATH bind sources, and
    any directory pytest held); ``/proc/1/fd/N/../../..`` walked to the host's /tmp. Now /proc/1
    is not the jail's to read, and init holds none of them."""
    held = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)  # a directory pytest holds, as a fixture might
    try:
        target = f"pj-pwned-{os.getpid()}"
        attack = ("for f in /proc/1/fd/*; do [ -d $f ] && touch $f/../../../../../../../tmp/" + target
                  + " && echo ESCAPED && break; done; ls /proc/1/fd 2>&1 | head -n 1")
        result = Jail().run(["sh", "-c", attack])
    finally:
        os.close(held)
    assert "ESCAPED" not in result.stdout
    if not (os.geteuid() == 0 and not uses_root_map()):
        # (a container's root runs its jails as uid 0: init's fd list is its own to read, the
        # descriptors, of a process that cannot be traced, still lead nowhere)
        assert "Permission denied" in result.stdout
    assert not os.path.exists(f"/tmp/{target}")


def test_host_view_writes_fail_and_change_nothing() -> None:
    """/, /etc, /usr and the home directory are read-only; the host's files are unchanged."""
    with untouched("/etc/hostname", "/etc/passwd"):
        result = Jail().run(["sh", "-c", "echo x > /etc/hostname; echo x >> /etc/passwd; touch /usr/pj-was-here; "
                             "touch ~/pj-was-here; echo done"])
    # (Read-only file system, or Permission denied where the jail's uid may not write anyway)
    assert result.stdout == "done\n" and len(result.stderr.splitlines()) == 4
    assert not os.path.exists("/usr/pj-was-here") and not os.path.exists(os.path.expanduser("~/pj-was-here"))


@pytest.mark.parametrize("knob", ["/proc/sys/kernel/core_pattern", "/proc/sys/kernel/hostname", "/proc/sysrq-trigger"])
def test_kernel_knobs_are_read_only(knob: str) -> None:
    """/proc/sys and sysrq-trigger cannot be written (core_pattern would run a program as the
    host's root); the host's value is unchanged."""
    before = open(knob).read() if knob != "/proc/sysrq-trigger" else ""
    result = Jail().run(["sh", "-c", f"echo '|/tmp/evil' > {knob} && echo WROTE"])
    assert "WROTE" not in result.stdout
    if knob != "/proc/sysrq-trigger":
        assert open(knob).read() == before


def test_rootfs_swapped_for_a_symlink_while_the_jail_is_built(tmp_path: os.PathLike[str]) -> None:
    """The race of issue 10: a rootfs whose ``mnt`` is swapped between a directory and a symlink to
    ``/oldroot/<host dir>`` (renameat2 RENAME_EXCHANGE in a loop) while jails are built: mount
    points are found through descriptors at the moment of use, inside the new root, so nothing
    is ever made on the host (before, within 1-7 starts)."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("needs a static busybox: apt-get install busybox-static")
    root = os.path.join(tmp_path, "rootfs")
    victim = os.path.join(tmp_path, "victim")
    os.makedirs(os.path.join(root, "bin"))
    os.makedirs(victim)
    for name in ("proc", "dev", "tmp", "sys", "mnt"):
        os.mkdir(os.path.join(root, name))
    shutil.copy(busybox, os.path.join(root, "bin", "sh"))
    os.symlink("/oldroot" + victim, os.path.join(root, "mnt-swap"))
    for path in (tmp_path, root, victim):
        os.chmod(path, 0o755)
    source = os.path.join(tmp_path, "source")
    os.mkdir(source)
    os.chmod(source, 0o755)
    libc = ctypes.CDLL(None, use_errno=True)
    stop = threading.Event()

    def swap() -> None:
        a, b = os.path.join(root, "mnt").encode(), os.path.join(root, "mnt-swap").encode()
        while not stop.is_set():
            libc.renameat2(-100, a, -100, b, 2)  # RENAME_EXCHANGE

    racer = threading.Thread(target=swap, daemon=True)
    racer.start()
    try:
        for _ in range(25):
            try:
                Jail(JailSpec(rootfs=root, binds=[f"{source}:/mnt/deep/x"])).run(["/bin/sh", "-c", "true"])
            except JailError:
                pass  # the symlink's target does not exist in the new root: the jail is refused
    finally:
        stop.set()
        racer.join()
    assert os.listdir(victim) == []


@root_mode
def test_tmp_path_swapped_for_a_symlink_never_rechowns_a_host_file(tmp_path: os.PathLike[str]) -> None:
    """The other race of issue 10: pytest, as root, re-owned the test's temp dir by path before each
    jail, and a jail that swapped a directory there for a symlink had a root-owned 0600 host file
    chowned to it. The temp dir is now shown through an id-mapped mount: nothing is chowned."""
    secret = os.path.join(os.path.dirname(tmp_path), f"pj-secret-{os.getpid()}")
    with open(secret, "w") as f:
        f.write("root only")
    os.chmod(secret, 0o600)
    work = os.path.join(tmp_path, "work")
    os.mkdir(work)
    try:
        from pytest_jail._places import exposures

        class Config:  # what exposures() reads of pytest's config
            rootpath = tmp_path
            _tmp_path_factory = None
            cache = None

        with untouched(secret):
            for _ in range(5):
                jail = Jail(exposures=exposures(Config(), None, tmp_path, body=False))
                jail.run(["sh", "-c", f"rm -rf {work}; ln -s {secret} {work}; sleep 0.01; rm {work}; mkdir {work}"])
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600 and os.stat(secret).st_uid == 0
    finally:
        os.unlink(secret)


@root_mode
def test_the_chown_fallback_never_follows_a_swapped_directory(tmp_path: os.PathLike[str]) -> None:
    """Where the filesystem cannot be id-mapped, root mode hands the temp dir to the jail's uid
    by walking it; a jailed process swapping a directory there for a symlink to a host directory,
    as fast as it can, must get nothing outside re-owned (the walk goes through descriptors)."""
    from pytest_jail._places import _chown_tree

    host_dir = os.path.join(os.path.dirname(tmp_path), f"pj-host-{os.getpid()}")
    os.mkdir(host_dir, 0o700)
    victim = os.path.join(host_dir, "victim")
    with open(victim, "w") as f:
        f.write("root only")
    tree = os.path.join(tmp_path, "tree")
    os.makedirs(os.path.join(tree, "d", "e"))
    stop = threading.Event()

    link = os.path.join(tree, "l")
    os.symlink(host_dir, link)

    def swap() -> None:
        while not stop.is_set():
            _exchange(os.path.join(tree, "d"), link)

    racer = threading.Thread(target=swap)
    racer.start()
    try:
        with untouched(victim):
            for _ in range(300):
                _chown_tree(tree, 123456)
        assert os.stat(host_dir).st_uid == 0
    finally:
        stop.set()
        racer.join()
        shutil.rmtree(host_dir)


def _exchange(a: str, b: str) -> None:
    """renameat2(RENAME_EXCHANGE): swap two names atomically, whatever they are."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.renameat2(-100, a.encode(), -100, b.encode(), 2)


def test_no_hard_link_to_a_host_file(tmp_path: os.PathLike[str]) -> None:
    """A jail cannot hard-link a host file into its writable temp dir (to write it through
    there): the link crosses mounts."""
    writable = os.path.join(tmp_path, "out")
    os.mkdir(writable)
    os.chmod(writable, 0o777)
    with untouched("/etc/passwd"):
        result = Jail(JailSpec(binds=[f"{writable}:/out:rw"])).run(
            ["sh", "-c", "ln /etc/passwd /out/passwd && echo LINKED; echo x >> /out/passwd"])
    assert "LINKED" not in result.stdout


def test_device_nodes_are_useless(tmp_path: os.PathLike[str]) -> None:
    """The jail's root may mknod (Docker's set), but no mount it can write to lets a node be
    opened (nodev), and /dev holds only the harmless devices."""
    result = Jail().run(["sh", "-c", "mknod /tmp/disk b 8 0; head -c 1 /tmp/disk > /dev/null && echo OPENED"])
    assert "OPENED" not in result.stdout
    listed = set(Jail().run(["ls", "-A", "/dev"]).stdout.split())
    assert listed <= {"null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm", "fd", "stdin",
                      "stdout", "stderr", ".pytest-jail"}, listed


def test_body_cwd_is_inside_the_jail(jailed_pytester: pytest.Pytester) -> None:
    """A body's working directory is inside the jail (runc's CVE-2024-21626 was a cwd left on the
    host): its /proc/self/cwd is a path of the jail, and ``..`` from it never leaves the root."""
    jailed_pytester.makepyfile(
        """
        import os, pytest

        @pytest.mark.jail
        def test_cwd():
            os.chdir("../../../../../../../..")
            assert os.getcwd() == "/" and os.listdir(".") == os.listdir("/")
            assert sorted(os.listdir("/proc/self/fd")) == sorted(os.listdir("/dev/fd"))
        """
    )
    jailed_pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_body_holds_no_directory_descriptor(jailed_pytester: pytest.Pytester) -> None:
    """A body is a fork of pytest: its descriptors stay open for its fixtures, but none is a
    directory (``openat(dirfd, "..")`` would walk out) nor one of pytest-jail's own."""
    jailed_pytester.makepyfile(
        """
        import os, stat, pytest

        @pytest.fixture
        def held(tmp_path):
            fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
            yield fd

        @pytest.mark.jail
        def test_descriptors(held):
            kinds = {}
            for name in os.listdir("/proc/self/fd"):
                try:
                    kinds[int(name)] = os.fstat(int(name)).st_mode
                except OSError:
                    pass
            assert not any(stat.S_ISDIR(mode) for mode in kinds.values()), kinds
            assert held not in kinds
        """
    )
    jailed_pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_command_gets_only_stdio() -> None:
    """A command starts with stdin, stdout and stderr only."""
    result = Jail().run([sys.executable, "-c", "import os; print(sorted(os.listdir('/proc/self/fd')))"])
    assert result.stdout.strip() == "['0', '1', '2', '3']"  # 3: the listing itself
