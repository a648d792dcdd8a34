"""What jails do on a kernel without a feature, made real on this one: the feature's system call
answered ENOSYS by a seccomp filter on the process, which is what an older kernel answers (and
what a container runtime's profile answers for calls newer than itself). The kernel guests run
the same tests on the old kernel itself (scripts/kernel-guest --kernel 5.10)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import needs_jail
from conftest import needs_rootfs_jail
from conftest import refuse_calls
from conftest import root_mode
from conftest import tree_digest

from pytest_jail._view import uses_root_map

pytestmark = needs_jail

#: Answered ENOSYS where the kernel is made to lack it, as before Linux 5.12.
WITHOUT_MOUNT_SETATTR = refuse_calls({"mount_setattr": errno.ENOSYS})

#: Prints, as JSON, the options of each mount a jail's process can reach (the topmost at each
#: mount point it can see: one behind a directory it cannot search is out of its reach either
#: way), and what writing to the host's /etc and to the jail's /tmp did.
INSIDE = textwrap.dedent("""
    import json, os
    tops = {}
    for line in open("/proc/self/mountinfo"):
        point, options = line.split()[4:6]
        if os.path.lexists(point):
            tops[point] = ",".join(o for o in options.split(",") if o in ("ro", "rw", "nosuid", "nodev", "noexec"))
    def write(path):
        try:
            open(path, "w").close()
            return "wrote"
        except OSError as exc:
            return exc.strerror
    print(json.dumps({"mounts": tops, "etc": write("/etc/.pytest-jail-probe"), "tmp": write("/tmp/x")}))
""")
MOUNTS = f"import sys\nfrom pytest_jail import Jail\nprint(Jail().run([sys.executable, '-c', {INSIDE!r}], check=True).stdout)"


def _run(code: str, *, prefix: str = "") -> str:
    done = subprocess.run([sys.executable, "-c", prefix + code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_without_mount_setattr_the_host_view_is_as_read_only() -> None:
    """Each mount remounted on its own gives the jail the same view, mount by mount, as
    mount_setattr on the whole tree: read-only, no set-uid programs, no devices."""
    with_it = json.loads(_run(MOUNTS))
    without = json.loads(_run(MOUNTS, prefix=WITHOUT_MOUNT_SETATTR))
    assert without["mounts"]["/"].startswith("ro,"), without
    assert without["etc"] == "Read-only file system", without
    assert without["tmp"] == "wrote", without
    assert without["mounts"] == with_it["mounts"]


@pytest.mark.parametrize("basetemp", ["default", "in the rootdir"])
def test_without_mount_setattr_a_marked_test_writes_only_its_tmp_path(jailed_pytester: pytest.Pytester,
                                                                       basetemp: str) -> None:
    """A test body's tmp_path, under a read-only exposure, is made writable as the body enters:
    by a bind remounted writable where there is no mount_setattr. As root, with no id-mapped
    mounts either, the tmp_path is handed to the jail's root; with the base temp dir inside the
    rootdir (as pytester's runs have it), the jail's root is let through pytest's 0700 directories
    on the way (before: EACCES)."""
    jailed_pytester.makepyfile(textwrap.dedent("""
        import pytest

        @pytest.mark.jail
        def test_body(tmp_path):
            (tmp_path / "kept").write_text("x")
            with pytest.raises(OSError, match="Read-only file system"):
                open("/etc/.pytest-jail-probe", "w")
    """))
    args = ["-p", "no:cacheprovider", str(jailed_pytester.path)]
    if basetemp != "default":
        args.append(f"--basetemp={jailed_pytester.path / 'base'}")
    code = f"import sys, pytest\nsys.exit(pytest.main({args!r}))"
    done = subprocess.run([sys.executable, "-c", WITHOUT_MOUNT_SETATTR + code], capture_output=True, text=True, timeout=120,
                          cwd=jailed_pytester.path)
    assert "1 passed" in done.stdout, done.stdout + done.stderr


def test_the_doctor_and_the_report_header_say_how_the_host_view_is_made_without_mount_setattr() -> None:
    code = ("from pytest_jail._doctor import examine, render\nfrom pytest_jail._probe import probe_host\n"
            "print(render(examine())[0])\nprint(probe_host().summary())")
    report = _run(code, prefix=WITHOUT_MOUNT_SETATTR)
    assert "ok  read-only host view: each mount remounted read-only (this kernel has no mount_setattr" in report
    assert "; Linux " in report.splitlines()[-1], report  # the header names what this kernel does differently
    assert "the host view is made read-only mount by mount (no mount_setattr)" in report.splitlines()[-1], report


@root_mode
def test_an_overlay_made_by_the_parent_keeps_the_rootfs_unchanged(busybox_rootfs: str) -> None:
    """Root mode where a user namespace may not mount overlayfs (before Linux 5.11): the host's root
    makes the overlay as a detached mount and the jail attaches it. Its writes go to the layer,
    never to the rootfs. (The kernel is asked to do it for real; only
    the choice is forced here, as that kernel's trial would make it: the 5.10 guest runs the
    rootfs tests with it chosen by the kernel.)"""
    before = tree_digest(busybox_rootfs)
    code = textwrap.dedent(f"""
        import warnings
        warnings.simplefilter("ignore")
        from pytest_jail import _jail, Jail, JailSpec
        _jail.overlay_by_parent = lambda root_map: root_map
        script = ("echo new > /made && cat /made && (echo changed 2>/dev/null > /etc/marker || echo refused);"
                  " grep ' / / ' /proc/self/mountinfo")
        print(Jail(JailSpec(rootfs={busybox_rootfs!r})).run(["sh", "-c", script], check=True).stdout)
    """)
    out = _run(code)
    # the jail's root owns / (the layer's root), not the rootfs's files: no id-mapped mounts there
    assert out.startswith("new\nrefused\n"), out
    assert "overlay" in out.splitlines()[2], out
    assert tree_digest(busybox_rootfs) == before


@root_mode
def test_a_test_body_runs_in_an_overlay_made_by_the_parent(jailed_pytester: pytest.Pytester) -> None:
    """A marked test in a busybox rootfs needs this interpreter's directories as mount points in
    directories the jail's root does not own there (no id-mapped mounts): the host's root makes
    them in the overlay it made."""
    jailed_pytester.makepyfile(textwrap.dedent("""
        import os
        import pytest

        @pytest.mark.jail(rootfs="busybox")
        def test_body(tmp_path):
            (tmp_path / "kept").write_text("x")
            assert os.path.exists("/bin/busybox")
    """))
    code = ("import sys, pytest\nfrom pytest_jail import _jail\n_jail.overlay_by_parent = lambda root_map: root_map\n"
            f"sys.exit(pytest.main(['-p', 'no:cacheprovider', '-W', 'ignore', {str(jailed_pytester.path)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=jailed_pytester.path)
    assert "1 passed" in done.stdout, done.stdout + done.stderr


@needs_rootfs_jail
def test_a_layer_on_overlayfs_is_refused_with_the_cause(busybox_rootfs: str, tmp_path: os.PathLike[str]) -> None:
    """As in a container whose root is overlayfs: a writable layer kept there would make the
    overlay mount fail with EINVAL; the jail says why and where to put it instead. (An overlay
    made here as the place: a user and mount namespace of the test's own.)"""
    code = textwrap.dedent(f"""
        import os, subprocess, sys
        base = {str(tmp_path)!r}
        for name in ("lower", "upper", "work", "merged", "merged/layer"):
            os.mkdir(os.path.join(base, name))
        from pytest_jail import Jail, JailSpec, JailUnavailableError
        from pytest_jail._linux.syscalls import Syscalls
        from pytest_jail._view import filesystem_type
        if filesystem_type(base) == "overlay":  # already so (in a container): nothing to make
            pass
        elif {uses_root_map()}:  # a mount namespace of its own
            Syscalls().unshare(0x00020000)
            Syscalls().mount(None, "/", None, 0x4000 | 1 << 18)
            options = ""
        else:  # ...in a user namespace of its own
            uid, gid = os.geteuid(), os.getegid()
            Syscalls().unshare(0x10000000 | 0x00020000)
            open("/proc/self/setgroups", "w").write("deny")
            open("/proc/self/uid_map", "w").write(f"{{uid}} {{uid}} 1")
            open("/proc/self/gid_map", "w").write(f"{{gid}} {{gid}} 1")
            options = ",userxattr"
        if filesystem_type(base) != "overlay":
            Syscalls().mount("overlay", base + "/merged", "overlay", 0,
                             f"lowerdir={{base}}/lower,upperdir={{base}}/upper,workdir={{base}}/work" + options)
            os.mkdir(base + "/merged/layer")
        try:
            Jail(JailSpec(rootfs={busybox_rootfs!r}), layer=base + "/merged/layer").run(["true"])
        except JailUnavailableError as exc:
            print(exc)
    """)
    out = _run(code)
    assert "on overlayfs" in out and "XDG_CACHE_HOME" in out, out
