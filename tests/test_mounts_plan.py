"""Unit tests of the mount plan (pure logic, no privileges): order, masks, shadows."""

from __future__ import annotations

import os
import stat

from pytest_jail._linux.mounts import Exposure
from pytest_jail._linux.mounts import closed_ancestors
from pytest_jail._linux.mounts import plan_mounts


def _verbs(plan: list[tuple]) -> list[str]:
    return [" ".join(str(a) for a in op if isinstance(a, str)) for op in plan]


def test_host_view_order() -> None:
    """Propagation is private before anything is mounted; the host / is bound read-only; pivot last."""
    plan = _verbs(plan_mounts(None, []))
    assert plan[0] == "mount /"  # MS_REC|MS_PRIVATE on /
    assert plan.index("pivot_root /tmp /tmp/oldroot") < plan.index("bind /oldroot /newroot")
    assert plan.index("bind /oldroot /newroot") + 1 == plan.index("readonly /newroot")
    assert "mount proc /newroot/proc proc" in plan
    assert "mount tmpfs /newroot/tmp tmpfs mode=1777" in plan
    assert plan[-4:] == ["chdir /newroot", "pivot_root . .", "umount .", "chdir /"]


def test_minimal_dev() -> None:
    """/dev holds null, zero, full, random, urandom, tty, a private devpts and shm; nothing else."""
    plan = _verbs(plan_mounts(None, []))
    binds = sorted(op.split()[-1] for op in plan if op.startswith("bind /oldroot/dev/"))
    assert binds == sorted(f"/newroot/dev/{d}" for d in ("null", "zero", "full", "random", "urandom", "tty"))
    assert "mount devpts /newroot/dev/pts devpts newinstance,ptmxmode=0666,mode=620" in plan
    assert "symlink pts/ptmx /newroot/dev/ptmx" in plan


def test_writable_exposure_under_private_tmp() -> None:
    """tmp_path lives in the private /tmp: its mount point is made there, bound writable."""
    path = "/tmp/pytest-of-u/pytest-1/test_x0"
    plan = _verbs(plan_mounts(None, [Exposure(path, path, writable=True)], exists=lambda p: True, isdir=lambda p: True))
    i = plan.index(f"mkdir_p /newroot{path}")
    assert plan[i + 1] == f"bind /oldroot{path} /newroot{path}"
    assert f"readonly /newroot{path}" not in plan
    assert plan.index("mount tmpfs /newroot/tmp tmpfs mode=1777") < i


def test_masks_hide_closed_dirs_but_expose_what_is_needed() -> None:
    """Root mode: a 0700 /root is masked by a tmpfs; the runtime under it is bound read-only."""
    runtime = "/root/.pyenv/versions/3.11"
    plan = _verbs(plan_mounts(None, [Exposure(runtime, runtime)], closed=["/root", "/tmp/pytest-of-root"],
                              exists=lambda p: True, isdir=lambda p: True))
    assert "mount tmpfs /newroot/root tmpfs mode=0755" in plan
    assert not any("pytest-of-root" in op for op in plan)  # under the private /tmp anyway
    assert plan.index("mount tmpfs /newroot/root tmpfs mode=0755") < plan.index(f"bind /oldroot{runtime} /newroot{runtime}")
    assert f"readonly /newroot{runtime}" in plan
    assert "readonly /newroot/root" in plan  # the mask itself becomes read-only


def test_rootfs_is_shadowed_and_gets_fresh_mountpoints() -> None:
    """A custom rootfs: a tmpfs root with its entries bound read-only; proc/dev/tmp/sys made fresh."""
    tree = {"/r": ["bin", "etc", "proc", "lib64"], "/r/bin": [], "/r/etc": []}
    plan = _verbs(plan_mounts(
        "/r", [],
        exists=lambda p: p in tree or p == "/r/lib64",
        isdir=lambda p: p in tree,
        listdir=lambda p: tree[p],
        islink=lambda p: p == "/r/lib64",
        readlink=lambda p: "usr/lib64",
    ))
    assert "mount tmpfs /newroot tmpfs mode=0755" in plan
    assert "bind /oldroot/r/bin /newroot/bin" in plan and "readonly /newroot/bin" in plan
    assert "symlink usr/lib64 /newroot/lib64" in plan
    assert "bind /oldroot/r/proc /newroot/proc" not in plan
    assert "mkdir /newroot/proc" in plan
    assert "readonly /newroot" in plan


def test_rootfs_exposure_shadows_the_deepest_existing_dir() -> None:
    """To bind the runtime at /usr/lib/python3 in a rootfs that has /usr/lib, /usr/lib is shadowed."""
    tree = {"/r": ["usr"], "/r/usr": ["lib"], "/r/usr/lib": ["libc.so"]}
    files = {"/r/usr/lib/libc.so"}
    plan = _verbs(plan_mounts(
        "/r", [Exposure("/usr/lib/python3", "/usr/lib/python3")],
        exists=lambda p: p in tree or p in files or p == "/usr/lib/python3",
        isdir=lambda p: p in tree or p == "/usr/lib/python3",
        listdir=lambda p: tree[p],
        islink=lambda p: False,
        readlink=os.readlink,
    ))
    assert "mount tmpfs /newroot/usr/lib tmpfs mode=0755" in plan
    assert "bind /oldroot/r/usr/lib/libc.so /newroot/usr/lib/libc.so" in plan
    assert plan.index("mkdir_p /newroot/usr/lib/python3") < plan.index("bind /oldroot/usr/lib/python3 /newroot/usr/lib/python3")


def test_closed_ancestors() -> None:
    """Only the first directory others cannot search is reported, per path."""
    modes = {"/root": 0o700, "/root/.pyenv": 0o755, "/work": 0o755, "/work/p": 0o700}

    def lstat(path: str) -> os.stat_result:
        return os.stat_result((stat.S_IFDIR | modes[path], 0, 0, 0, 0, 0, 0, 0, 0, 0))

    found = closed_ancestors(["/root/.pyenv/x", "/work/p/q/r", "/work/ok"], lstat=lambda p: lstat(p) if p in modes else _missing(p))
    assert found == {"/root", "/work/p"}


def test_closed_dir_inside_an_exposure_is_masked_on_the_way() -> None:
    """A 0700 directory inside a read-only exposure is masked only on the way to a deeper exposure."""
    root, tmp = "/tmp/p/project", "/tmp/p/project/run-0/test_x0"
    plan = _verbs(plan_mounts(None, [Exposure(root, root), Exposure(tmp, tmp, writable=True)],
                              closed=["/tmp/p/project/run-0"], exists=lambda p: True, isdir=lambda p: True))
    assert plan.index(f"bind /oldroot{root} /newroot{root}") < plan.index("mount tmpfs /newroot/tmp/p/project/run-0 tmpfs mode=0755")
    assert plan.index("mount tmpfs /newroot/tmp/p/project/run-0 tmpfs mode=0755") < plan.index(f"bind /oldroot{tmp} /newroot{tmp}")


def _missing(path: str) -> os.stat_result:
    raise FileNotFoundError(path)


def test_new_top_level_bind_shadows_root_without_the_hosts_proc_dev_tmp() -> None:
    """A bind to a new top-level path (/data) shadows / : the host's entries come back read-only,
    but /proc, /dev and /tmp are made fresh, never the host's; a closed /root is still masked."""
    host = {"/": ["bin", "proc", "dev", "tmp", "root", "sys"], "/root": [".pyenv"]}
    dirs = set(host) | {"/bin", "/proc", "/dev", "/tmp", "/sys", "/root/.pyenv", "/root/.pyenv/py", "/srv/d"}
    plan = _verbs(plan_mounts(
        None, [Exposure("/srv/d", "/data"), Exposure("/root/.pyenv/py", "/root/.pyenv/py")], closed=["/root"],
        exists=lambda p: p in dirs, isdir=lambda p: p in dirs, listdir=lambda p: host[p],
        islink=lambda p: False, readlink=os.readlink,
    ))
    assert "mount tmpfs /newroot tmpfs mode=0755" in plan
    assert "bind /oldroot/bin /newroot/bin" in plan and "bind /oldroot/sys /newroot/sys" in plan
    assert not any(op.startswith(("bind /oldroot/proc ", "bind /oldroot/tmp ", "bind /oldroot/dev ")) for op in plan)
    assert plan.index("mount tmpfs /newroot tmpfs mode=0755") < plan.index("mount proc /newroot/proc proc")
    assert "mount tmpfs /newroot/root tmpfs mode=0755" in plan  # masked after being re-bound
    assert plan.index("mount tmpfs /newroot/root tmpfs mode=0755") < plan.index("bind /oldroot/root/.pyenv/py /newroot/root/.pyenv/py")
