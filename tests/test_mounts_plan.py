"""Unit tests of the mount plan (pure logic, no privileges): order, masks, shadows."""

from __future__ import annotations

import os
import stat

from pytest_jail._linux.mounts import CgroupMount
from pytest_jail._linux.mounts import Exposure
from pytest_jail._linux.mounts import cgroup_mounts
from pytest_jail._linux.mounts import closed_ancestors
from pytest_jail._linux.mounts import plan_mounts
from pytest_jail._linux.syscalls import MS_NODEV
from pytest_jail._linux.syscalls import MS_NOEXEC
from pytest_jail._linux.syscalls import MS_NOSUID
from pytest_jail._linux.syscalls import MS_RDONLY


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
    binds = sorted(op.split()[-1] for op in plan if op.startswith("bind /oldroot/dev/") and " /newroot/dev/" in op)
    assert binds == sorted(f"/newroot/dev/{d}" for d in ("null", "zero", "full", "random", "urandom", "tty"))
    assert "mount devpts /newroot/dev/pts devpts newinstance,ptmxmode=0666,mode=620,max=256" in plan
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


def test_rootfs_is_the_lower_layer_of_a_fresh_overlay() -> None:
    """A custom rootfs: bound at a fixed place, the lower layer of an overlay whose upper layer is a
    fresh tmpfs (sized like /tmp); proc/dev/tmp/sys are made in the overlay, never the tree."""
    plan = _verbs(plan_mounts("/r,odd:path", [], tmp_size=1 << 20))
    assert "lower /oldroot/r,odd:path /lower" in plan
    assert "mount tmpfs /layer tmpfs mode=0755,size=1048576" in plan
    overlay = "mount overlay /newroot overlay lowerdir=/lower,upperdir=/layer/upper,workdir=/layer/work,userxattr"
    assert plan.index("lower /oldroot/r,odd:path /lower") < plan.index(overlay)
    assert plan.index(overlay) < plan.index("mkdir /newroot/proc") < plan.index("mount proc /newroot/proc proc")
    assert "bind /oldroot/sys /newroot/sys" in plan and "readonly /newroot/sys" in plan
    assert not any(op.startswith("readonly /newroot ") or op == "readonly /newroot" for op in plan)


def test_kept_layer_is_a_host_directory() -> None:
    """With layer=DIR the upper layer is that host directory, bound writable (to be read later)."""
    plan = _verbs(plan_mounts("/r", [], layer="/tmp/kept/layer"))
    assert "bind /oldroot/tmp/kept/layer /layer" in plan
    assert not any(op.startswith("mount tmpfs /layer") for op in plan)


def test_rootfs_exposure_is_made_in_the_writable_layer() -> None:
    """The runtime's mount point in a rootfs is made in the overlay (never in the tree), then bound
    read-only, nosuid and nodev; a writable bind is nosuid and nodev too."""
    plan = _verbs(plan_mounts("/r", [Exposure("/usr/lib/python3", "/usr/lib/python3"),
                                     Exposure("/srv/out", "/out", writable=True)], isdir=lambda p: True))
    assert plan.index("mkdir_p /newroot/usr/lib/python3") < plan.index("bind /oldroot/usr/lib/python3 /newroot/usr/lib/python3")
    assert "readonly /newroot/usr/lib/python3" in plan
    assert "seal /newroot/out" in plan and "readonly /newroot/out" not in plan


def test_host_view_hygiene() -> None:
    """Host view: /run becomes an empty writable tmpfs, ~/.ssh an empty read-only one, a secret
    file is covered by /dev/null; /proc's kernel knobs are masked or read-only; /sys/firmware too."""
    dirs = {"/run", "/home/u/.ssh", "/proc/sys", "/proc/acpi", "/sys/firmware"}
    files = {"/home/u/.netrc", "/proc/kcore", "/proc/sysrq-trigger"}
    plan = _verbs(plan_mounts(None, [], scratch=[("/run", "0755")], hidden=["/home/u/.ssh", "/home/u/.netrc"],
                              exists=lambda p: p in dirs | files, isdir=lambda p: p in dirs))
    assert "mount tmpfs /newroot/run tmpfs mode=0755" in plan and "readonly /newroot/run" not in plan
    assert "mount tmpfs /newroot/home/u/.ssh tmpfs mode=0755,size=0" in plan and "readonly /newroot/home/u/.ssh" in plan
    assert "bind /oldroot/dev/null /newroot/home/u/.netrc" in plan
    assert "bind /oldroot/dev/null /newroot/proc/kcore" in plan
    assert "mount tmpfs /newroot/proc/acpi tmpfs mode=0555,size=0" in plan
    assert "bind /newroot/proc/sys /newroot/proc/sys" in plan and "readonly /newroot/proc/sys" in plan
    assert "readonly /newroot/proc/sysrq-trigger" in plan
    assert "mount tmpfs /newroot/sys/firmware tmpfs mode=0555,size=0" in plan
    assert not any("/proc/timer_list" in op for op in plan)  # not on this (fake) host: nothing to mask


def test_hidden_full_proc_for_nested_jails() -> None:
    """A second, unmasked /proc and /sys are buried under an empty read-only tmpfs: the kernel lets
    a nested jail mount its own only if one exists, and nothing in the jail can reach them. With a
    network of its own the jail's /sys is a fresh sysfs (of its network namespace), read-only."""
    plan = _verbs(plan_mounts(None, []))
    buried = plan.index("mount proc /newroot/dev/.pytest-jail/proc proc")
    assert plan[buried + 1:buried + 4] == ["mkdir /newroot/dev/.pytest-jail/sys",
                                           "bind /oldroot/sys /newroot/dev/.pytest-jail/sys",
                                           "mount tmpfs /newroot/dev/.pytest-jail tmpfs mode=0000,size=0"]
    own = _verbs(plan_mounts(None, [], own_net=True))
    assert own.count("mount sysfs /newroot/sys sysfs") == 1
    buried = own.index("mount sysfs /newroot/dev/.pytest-jail/sys sysfs")
    assert own[buried + 1] == "mount tmpfs /newroot/dev/.pytest-jail tmpfs mode=0000,size=0"


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


HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
50 23 0:40 / /mnt/other rw,relatime - cgroup cgroup rw,pids
"""


def test_cgroup_mounts_of_a_hybrid_host() -> None:
    """Each cgroup filesystem under /sys/fs/cgroup, with its controllers, and the symlinks there."""
    found = cgroup_mounts(HYBRID_MOUNTINFO, {"cpu": "cpu,cpuacct"})
    assert found == (
        CgroupMount("cpu,cpuacct", "cgroup", "cpu,cpuacct"),
        CgroupMount("memory", "cgroup", "memory"),
        CgroupMount("systemd", "cgroup", "xattr,name=systemd"),
        CgroupMount("unified", "cgroup2", ""),
        CgroupMount("cpu", link="cpu,cpuacct"),
    )


def test_jail_mounts_its_own_cgroups_read_only() -> None:
    """A hybrid host's hierarchies are mounted again under a read-only tmpfs; a pure v2 host's
    cgroup2 over /sys/fs/cgroup; a refusal leaves the place empty rather than failing the jail."""
    ops = plan_mounts(None, [], cgroups=cgroup_mounts(HYBRID_MOUNTINFO, {"cpu": "cpu,cpuacct"}), )
    root = "/newroot/sys/fs/cgroup"
    at = ops.index(("mount", "tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=0"))
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY
    assert ops[at + 1:at + 10] == [
        ("mkdir", f"{root}/cpu,cpuacct"), ("optional_mount", "cgroup", f"{root}/cpu,cpuacct", "cgroup", flags, "cpu,cpuacct"),
        ("mkdir", f"{root}/memory"), ("optional_mount", "cgroup", f"{root}/memory", "cgroup", flags, "memory"),
        ("mkdir", f"{root}/systemd"), ("optional_mount", "cgroup", f"{root}/systemd", "cgroup", flags, "xattr,name=systemd"),
        ("mkdir", f"{root}/unified"), ("optional_mount", "cgroup2", f"{root}/unified", "cgroup2", flags, None),
        ("symlink", "cpu,cpuacct", f"{root}/cpu"),
    ]
    assert ops[at + 10] == ("readonly", root, False)
    v2 = plan_mounts(None, [], cgroups=cgroup_mounts("9 1 0:2 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n", {}), )
    at = v2.index(("mount", "tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=0"))
    assert v2[at + 1] == ("optional_mount", "cgroup2", root, "cgroup2", flags, None)  # not right over the host's
    assert not any(op[2] == root for op in plan_mounts(None, [], ) if op[0] in ("mount", "optional_mount"))


def test_the_mounts_below_one_are_found_by_parent_ids_with_escapes_undone() -> None:
    from pytest_jail._linux.remount import submounts

    table = "\n".join([
        "20 1 0:1 / / rw - ext4 /dev/vda rw",
        "30 20 0:2 / /newroot rw - ext4 /dev/vda rw",
        "31 30 0:3 / /newroot/a\\040b rw - tmpfs tmpfs rw",
        "32 31 0:4 / /newroot/a\\040b/c rw - tmpfs tmpfs rw",
        "40 20 0:5 / /other rw - tmpfs tmpfs rw",
    ])
    assert submounts(table, 30) == [(31, "/newroot/a b"), (32, "/newroot/a b/c")]
    assert submounts(table, 40) == []


def test_a_remount_repeats_the_flags_a_mount_has() -> None:
    from pytest_jail._linux import syscalls as sc
    from pytest_jail._linux.remount import flags_of

    assert flags_of(os.ST_RDONLY | os.ST_NODEV | os.ST_RELATIME) == sc.MS_RDONLY | sc.MS_NODEV | sc.MS_RELATIME
    assert flags_of(os.ST_NOATIME | os.ST_NOEXEC) == sc.MS_NOATIME | sc.MS_NOEXEC
    assert flags_of(0) == sc.MS_STRICTATIME  # no atime flag at all: strictatime, said out loud
