"""Root filesystems (issue 4): the busybox builder and its cache, copy-on-write over any tree, the
host view's hygiene, binds and the working directory. Real namespaces and mounts throughout."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import needs_busybox
from conftest import needs_jail
from conftest import needs_rootfs_jail
from conftest import root_mode
from conftest import rootless_mode
from conftest import skip_if_on_overlayfs
from conftest import skip_unless_jail_root_owns
from conftest import tree_digest

from pytest_jail import Jail
from pytest_jail import JailConfigError
from pytest_jail import JailSpec
from pytest_jail import JailUnavailableError
from pytest_jail._host import host
from pytest_jail._linux.mounts import Exposure
from pytest_jail._view import runtime_paths
from pytest_jail._view import uses_root_map
from pytest_jail.rootfs import busybox
from pytest_jail.rootfs import named_rootfs
from pytest_jail.rootfs._build import STAMP

pytestmark = [needs_jail, needs_rootfs_jail]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty rootfs cache, so rootfs='busybox' is built for real by this test."""
    path = tmp_path / "cache"
    monkeypatch.setenv("PYTEST_JAIL_CACHE", str(path))
    os.chmod(tmp_path, 0o755)
    return path


@pytest.fixture
def built(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A busybox tree made by the builder, as `pytest-jail rootfs busybox DIR` makes it."""
    base = tmp_path_factory.mktemp("built")
    os.chmod(base, 0o755)
    target = str(base / "busybox")
    assert busybox.build(target)
    return target


@needs_busybox
def test_busybox_builder_makes_a_small_linux(built: str) -> None:
    """The tree has the standard directories, applet links and /etc files: sh, id, hostname, ls
    and ps behave as on a small Linux."""
    for name in ("bin/sh", "bin/ls", "bin/ps", "usr/bin/id", "etc/passwd", "etc/group", "etc/hosts",
                 "etc/hostname", "etc/resolv.conf"):
        assert os.path.lexists(os.path.join(built, name)), name
    result = Jail(JailSpec(rootfs=built, hostname="tiny")).run(
        ["sh", "-c", "id -un; hostname; ls /; cat /etc/hostname"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines[0] == ("root" if os.geteuid() == 0 else os.environ.get("USER", lines[0]))
    assert lines[1] == "tiny"
    assert {"bin", "dev", "etc", "proc", "root", "sys", "tmp", "usr", "var"} <= set(lines[2:-2])


@needs_busybox
def test_builder_is_idempotent_and_refuses_foreign_dirs(built: str, tmp_path: Path) -> None:
    """Building the same recipe again changes nothing; a non-empty directory it did not make is
    refused in one line, untouched."""
    before = tree_digest(built)
    assert busybox.build(built) is False
    assert tree_digest(built) == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious").write_text("keep")
    with pytest.raises(JailConfigError, match=f"{foreign} is not empty and was not built by pytest-jail"):
        busybox.build(str(foreign))
    assert os.listdir(foreign) == ["precious"]


@needs_busybox
def test_builder_says_which_package_is_missing(tmp_path: Path) -> None:
    """A dynamically linked busybox is refused with the package to install."""
    with pytest.raises(JailUnavailableError, match="dynamically linked.*apt-get install busybox-static"):
        busybox.build(str(tmp_path / "t"), busybox=sys.executable)


@needs_busybox
def test_named_busybox_rootfs_ps_shows_only_the_jail(cache: Path) -> None:
    """rootfs='busybox' on a machine with an empty cache: built once, reused; `ps` lists only the
    jail's processes, pid 1 first."""
    result = Jail(JailSpec(rootfs="busybox")).run(["ps", "-o", "pid,args"])
    assert result.returncode == 0, result.stderr
    rows = [line.split(None, 1) for line in result.stdout.strip().split("\n")[1:]]
    assert [pid for pid, _ in rows] == ["1", "2"]  # init, then ps itself: nothing of the host
    assert rows[1][1].startswith("ps")
    target = cache / "rootfs" / "busybox"
    assert (target / STAMP).is_file()
    stamp_time = (target / STAMP).stat().st_mtime_ns
    assert named_rootfs("busybox") == str(target)
    assert Jail(JailSpec(rootfs="busybox")).run(["true"]).returncode == 0
    assert (target / STAMP).stat().st_mtime_ns == stamp_time  # reused, not rebuilt


@needs_busybox
def test_rootfs_is_copy_on_write_and_never_changes(built: str) -> None:
    """A jail writes, deletes and chmods files all over the rootfs and sees its changes; the tree is
    byte-for-byte unchanged, and the next jail starts from the original again."""
    skip_unless_jail_root_owns(built)
    before = tree_digest(built)
    script = (
        "echo new > /etc/new && cat /etc/new; rm /etc/hostname && echo removed; chmod 700 /bin && echo chmod; "
        "rm -rf /usr && echo rm-rf; echo more >> /etc/passwd && tail -1 /etc/passwd; ls /usr 2>&1 | head -1"
    )
    result = Jail(JailSpec(rootfs=built)).run(["/bin/sh", "-c", script])
    assert result.stdout.split("\n")[:6] == ["new", "removed", "chmod", "rm-rf", "more",
                                             "ls: /usr: No such file or directory"], result.stderr
    assert tree_digest(built) == before
    again = Jail(JailSpec(rootfs=built)).run(["/bin/sh", "-c", "cat /etc/hostname; ls /etc/new"])
    assert again.stdout.split("\n")[0] == "jail" and "No such file" in again.stderr


@root_mode
@needs_busybox
def test_root_owned_tree_belongs_to_the_jails_root(built: str) -> None:
    """Root mode: the tree is owned by the host's root, yet the jail's root (an unprivileged host
    uid) owns it inside, through an id-mapped mount, and can change root-only files in its layer."""
    assert os.stat(os.path.join(built, "etc/shadow")).st_uid == 0
    skip_unless_jail_root_owns(built)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = Jail(JailSpec(rootfs=built)).run(
            ["sh", "-c", "stat -c '%u %a' /etc/shadow; echo 'x:*:1::::::' >> /etc/shadow && echo appended"])
    assert result.stdout == "0 600\nappended\n", result.stderr
    assert "x:*" not in Path(built, "etc/shadow").read_text()


@needs_busybox
def test_kept_layer_holds_what_the_jail_wrote(built: str, tmp_path: Path) -> None:
    """Jail(layer=DIR): the writable layer is a host directory, readable after the jail is gone."""
    skip_unless_jail_root_owns(built)
    skip_if_on_overlayfs(str(tmp_path))
    layer = tmp_path / "layer"
    layer.mkdir()
    if uses_root_map():
        os.chown(layer, 2**31 - 2 * 65536, 2**31 - 2 * 65536)
    Jail(JailSpec(rootfs=built), layer=str(layer)).run(["sh", "-c", "echo evidence > /etc/written; rm /etc/hosts"])
    assert (layer / "upper" / "etc" / "written").read_text() == "evidence\n"
    assert not (layer / "work").exists()  # overlayfs's scratch goes (its 0000 directory would stop pytest's cleanup)
    assert os.path.exists(os.path.join(built, "etc/hosts"))


def test_host_sockets_under_run_are_out_of_reach(tmp_path: Path) -> None:
    """A read-only bind does not stop connect() to a UNIX socket: /run is an empty private tmpfs,
    so a host daemon's socket there cannot be reached (nor seen) from the host view."""
    if not os.access("/run", os.W_OK):
        pytest.skip("needs a writable /run to put a host socket in (root)")
    path = f"/run/pytest-jail-test-{os.getpid()}.sock"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(path)
        server.listen()
        code = f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({path!r})"
        python = Jail(exposures=[Exposure(p, p) for p in runtime_paths()])
        result = python.run([sys.executable, "-c", code], net="host")
        assert "FileNotFoundError" in result.stderr, result.stderr
        listing = Jail().run(["sh", "-c", "ls -A /run; touch /run/mine && echo writable"])
        assert listing.stdout == "writable\n", listing.stderr
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)  # while the host still reaches it
    finally:
        server.close()
        os.unlink(path)


def test_home_secrets_are_hidden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """~/.ssh is empty and ~/.netrc is empty in the host view; the rest of the home stays visible;
    a bind the user asks for explicitly is not hidden."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("PRIVATE KEY")
    (home / ".netrc").write_text("machine x password hunter2")
    (home / "notes.txt").write_text("visible")
    for path in (tmp_path, *tmp_path.rglob("*")):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    monkeypatch.setenv("HOME", str(home))
    jail = Jail(exposures=[Exposure(str(home), str(home))])  # as the rootdir or tmp_path would be
    result = jail.run(["sh", "-c", f"ls -A {home}/.ssh; cat {home}/.netrc; cat {home}/notes.txt"])
    assert result.stdout == "visible", result.stderr
    asked = jail.run(["cat", f"{home}/.ssh/id_ed25519"], binds=[f"{home}/.ssh:{home}/.ssh"])
    assert asked.stdout == "PRIVATE KEY", asked.stderr


def test_proc_and_sys_knobs_are_masked_or_read_only() -> None:
    """/proc/sys and /proc/sysrq-trigger are read-only, /proc/timer_list and friends are empty,
    /sys is read-only: a test cannot read the kernel's secrets or turn its knobs."""
    script = (
        "echo 1 > /proc/sys/net/ipv4/ip_forward; echo h > /proc/sysrq-trigger; touch /sys/x; "
        "for f in /proc/timer_list /proc/sched_debug /proc/keys; do [ -e $f ] && wc -c < $f; done; echo end"
    )
    result = Jail().run(["sh", "-c", script])
    knobs = 2 + os.path.exists("/proc/sysrq-trigger")  # some kernels (Firecracker's) have no sysrq
    assert result.stderr.count("Read-only file system") == knobs, result.stderr
    assert set(result.stdout.split()) <= {"0", "end"}


def test_binds_are_nosuid_and_nodev(tmp_path: Path) -> None:
    """A bind, writable or not, never carries set-uid programs or device nodes."""
    os.chmod(tmp_path, 0o755)
    spec = JailSpec(binds=[f"{tmp_path}:/data", f"{tmp_path}:/out:rw"])
    result = Jail(spec).run(["sh", "-c", "grep -E ' /(data|out) ' /proc/self/mountinfo"])
    lines = result.stdout.strip().split("\n")
    assert len(lines) == 2, result.stderr
    for line in lines:
        options = line.split()[5].split(",")
        assert {"nosuid", "nodev"} <= set(options), line
    assert "ro" in lines[0].split()[5].split(",") and "rw" in lines[1].split()[5].split(",")


@pytest.mark.parametrize("target", ["data", "../etc", "/data/../etc"])
def test_bind_destination_must_be_absolute_without_dotdot(tmp_path: Path, target: str) -> None:
    """A bind's destination is absolute, inside the jail, and has no '..': anything else is one line."""
    with pytest.raises(JailConfigError, match="destination must be an absolute path without '..'"):
        JailSpec(binds=[f"{tmp_path}:{target}"])


def test_workdir(tmp_path: Path) -> None:
    """workdir= sets where commands start; a relative one is refused."""
    assert Jail(JailSpec(workdir="/usr/bin")).run(["pwd"]).stdout == "/usr/bin\n"
    with pytest.raises(JailConfigError, match="workdir='rel' is not valid; allowed: an absolute path"):
        JailSpec(workdir="rel")


def test_cli_builds_and_reports(tmp_path: Path) -> None:
    """`pytest-jail rootfs busybox DIR` builds, then says 'up to date'; a bad DIR is one line."""
    os.chmod(tmp_path, 0o755)
    target = tmp_path / "bb"
    cli = [sys.executable, "-m", "pytest_jail.cli", "rootfs", "busybox"]
    first = subprocess.run([*cli, str(target)], capture_output=True, text=True)
    assert first.returncode == 0 and f"built: {target}" in first.stderr, first.stderr
    second = subprocess.run([*cli, str(target)], capture_output=True, text=True)
    assert second.returncode == 0 and f"up to date: {target}" in second.stderr
    bad = subprocess.run([*cli, "/etc"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "/etc is not empty and was not built by pytest-jail" in bad.stderr


@needs_busybox
def test_keep_failed_keeps_the_layer_of_failed_tests_only(
    jailed_pytester: pytest.Pytester, cache: Path
) -> None:
    """--jail-keep-failed: a failed test's writes over its rootfs stay in pytest's temp dir, named
    in its report; a passing test's layer is removed; rootfs='busybox' works from a marker."""
    skip_unless_jail_root_owns(str(cache.parent))
    skip_if_on_overlayfs(str(cache.parent))
    jailed_pytester.makepyfile(
        test_layers="""
        import pytest

        @pytest.mark.jail(rootfs="busybox")
        def test_passes():
            open("/etc/from-passing", "w").write("p")

        @pytest.mark.jail(rootfs="busybox")
        def test_fails():
            open("/etc/evidence", "w").write("what went wrong")
            assert False, "look at the layer"
        """
    )
    basetemp = jailed_pytester.path / "basetemp"
    result = jailed_pytester.runpytest_subprocess("--jail-keep-failed", f"--basetemp={basetemp}")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*jail: what the test wrote over its rootfs is kept in*", f"{basetemp}/test_fails-layer*/upper"])
    kept = sorted(p.name for p in basetemp.iterdir() if "-layer" in p.name and not p.is_symlink())
    assert kept == ["test_fails-layer0"]
    assert (basetemp / "test_fails-layer0" / "upper" / "etc" / "evidence").read_text() == "what went wrong"


def test_nojail_opts_a_test_out_of_jail_all(jailed_pytester: pytest.Pytester) -> None:
    """Under --jail-all, @pytest.mark.nojail runs a body in pytest's own process (it sees the
    host's hostname) while its jail.run() is still jailed; both markers at once is one line."""
    jailed_pytester.makepyfile(
        test_opt="""
        import socket, pytest

        def test_jailed():
            assert socket.gethostname() == "jail"

        @pytest.mark.nojail
        def test_host_side(jail):
            assert socket.gethostname() != "jail"
            assert jail.run(["hostname"]).stdout == "jail\\n"

        @pytest.mark.nojail
        @pytest.mark.jail
        def test_both():
            pass
        """
    )
    result = jailed_pytester.runpytest_subprocess("--jail-all")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*JailConfigError: test_opt.py::test_both has both the jail and the nojail marker; keep one"])


@needs_busybox
def test_rootfs_symlinks_never_lead_mount_points_to_the_host(built: str, tmp_path: Path) -> None:
    """A rootfs whose /home links to a host path (absolute, or climbing with '..'): a bind into
    /home lands inside the jail's own tree, and nothing is created on the host."""
    victim = tmp_path / "victim"
    victim.mkdir()
    tree = tmp_path / "tree"
    shutil.copytree(built, tree, symlinks=True)
    os.chmod(tmp_path, 0o755)
    os.rmdir(tree / "home") if (tree / "home").is_dir() and not os.listdir(tree / "home") else shutil.rmtree(tree / "home")
    os.symlink(f"/oldroot{victim}", tree / "home")
    os.symlink(f"../../../../../../../../../oldroot{victim}", tree / "up")
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("bound")
    os.chmod(data, 0o755)
    result = Jail(JailSpec(rootfs=str(tree), binds=[f"{data}:/home/me/data", f"{data}:/up/data2"])).run(
        ["sh", "-c", "cat /home/me/data/f /up/data2/f"])
    assert result.stdout == "boundbound", result.stderr
    assert os.listdir(victim) == []


def test_a_directory_of_the_rootfs_can_be_replaced(busybox_rootfs: str) -> None:
    """``rm -rf`` over a directory of the rootfs, then ``mkdir``: overlayfs marks the new directory
    opaque in an xattr of the writable layer. Where the kernel's tmpfs keeps no user.* xattrs
    (before Linux 6.6: this failed with EIO on 6.1, the kernel-guest's 6.1) the layer is on disk
    instead, under the cache, and goes with the jail."""
    skip_unless_jail_root_owns(busybox_rootfs)
    from pytest_jail._probe import try_in_namespaces

    script = "rm -rf /etc && mkdir /etc && touch /etc/new && ls /etc"
    result = Jail(JailSpec(rootfs=busybox_rootfs)).run(["sh", "-c", script])
    assert result.returncode == 0 and result.stdout.split() == ["new"], result
    assert os.path.exists(os.path.join(busybox_rootfs, "etc", "marker"))  # never the tree itself
    layers = host()._layers
    if try_in_namespaces().get("xattr") == "ok":
        assert layers is None  # this kernel's tmpfs does it: no layer on disk
    else:
        assert layers and os.listdir(layers) == [], layers  # it was used, and it is gone


@rootless_mode
@pytest.mark.skipif(os.geteuid() == 0, reason="a root without CAP_SYS_ADMIN (a container's) still writes anywhere")
def test_the_cli_says_in_one_line_where_it_cannot_write(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    done = subprocess.run([sys.executable, "-m", "pytest_jail.cli", "rootfs", "busybox", str(locked / "tree")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"cannot build {locked}/tree: {locked} is not writable here" in done.stderr, done.stderr
