"""cgroup detection and writers against temporary trees (pure logic; the kernel tests are elsewhere)."""

from __future__ import annotations

import os
import pathlib

import pytest

from pytest_jail._cgroups import Limits
from pytest_jail._cgroups import detect
from pytest_jail._cgroups.v1 import V1Group
from pytest_jail._cgroups.v2 import V2Group

HYBRID_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_OWN = "8:pids:/\n6:freezer:/\n4:memory:/ci/job1\n2:cpuacct:/\n1:cpu:/\n0::/\n"
V2_MOUNTS = "30 23 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V2_OWN = "0::/user.slice/user-1000.slice/session-3.scope\n"
V1_MOUNTS = "\n".join(line for line in HYBRID_MOUNTS.splitlines() if "cgroup2" not in line) + "\n"


def _files(tmp_path: pathlib.Path, mounts: str, own: str) -> tuple[str, str]:
    (tmp_path / "mountinfo").write_text(mounts)
    (tmp_path / "cgroup").write_text(own)
    return str(tmp_path / "mountinfo"), str(tmp_path / "cgroup")


def test_detect_hybrid(tmp_path: pathlib.Path) -> None:
    """v1 controllers plus a cgroup2 mount is 'hybrid'; each controller points at our own group."""
    layout = detect(*_files(tmp_path, HYBRID_MOUNTS, HYBRID_OWN))
    assert layout.kind == "hybrid"
    assert layout.v1["memory"] == "/sys/fs/cgroup/memory/ci/job1"
    assert layout.v1["pids"] == "/sys/fs/cgroup/pids"
    assert layout.v2 == "/sys/fs/cgroup/unified"
    assert layout.describe() == "cgroups: hybrid (v1 memory cpu cpuacct pids freezer)"


def test_detect_v1_and_v2_and_none(tmp_path: pathlib.Path) -> None:
    """Pure v1, pure v2 (our group inside the unified tree) and no cgroups at all."""
    assert detect(*_files(tmp_path, V1_MOUNTS, HYBRID_OWN.replace("0::/\n", ""))).kind == "v1"
    v2 = detect(*_files(tmp_path, V2_MOUNTS, V2_OWN))
    assert (v2.kind, v2.v2) == ("v2", "/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope")
    assert detect(*_files(tmp_path, "", "")).kind == "none"


def _fake_kernel(path: pathlib.Path, names: list[str]) -> None:
    for name in names:
        (path / name).write_text("")


def test_v2_writer(tmp_path: pathlib.Path) -> None:
    """memory.max + memory.swap.max=0 + oom.group, cpu.max as quota/period, pids.max."""
    group = V2Group(str(tmp_path), "jail-1")
    root = tmp_path / "jail-1"
    _fake_kernel(root, ["memory.max", "memory.swap.max", "memory.oom.group", "cpu.max", "pids.max"])
    group.apply(Limits(memory=64 << 20, cpus=0.5, pids=64))
    assert (root / "memory.max").read_text() == str(64 << 20)
    assert (root / "memory.swap.max").read_text() == "0"
    assert (root / "memory.oom.group").read_text() == "1"
    assert (root / "cpu.max").read_text() == "50000 100000"
    assert (root / "pids.max").read_text() == "64"
    assert group.join_files == [str(root / "cgroup.procs")]


def test_v2_usage(tmp_path: pathlib.Path) -> None:
    """Usage comes from the group's own counters: memory.peak, cpu.stat, memory.events, pids.events."""
    group = V2Group(str(tmp_path), "g")
    root = tmp_path / "g"
    (root / "memory.peak").write_text("67108864\n")
    (root / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\n")
    (root / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\n")
    (root / "pids.events").write_text("max 312\n")
    usage = group.usage()
    assert (usage.peak_memory, usage.cpu_time, usage.oom_kills, usage.pids_denied) == (64 << 20, 1.5, 1, 312)


def test_v1_writer_and_usage(tmp_path: pathlib.Path) -> None:
    """v1: a directory per controller; memsw follows the memory limit when swap accounting is on."""
    parents = {c: str(tmp_path / c) for c in ("memory", "cpu", "cpuacct", "pids", "freezer")}
    for path in parents.values():
        os.mkdir(path)
    group = V1Group(parents, "j", cpu=True)
    mem, cpu = tmp_path / "memory" / "j", tmp_path / "cpu" / "j"
    _fake_kernel(mem, ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"])
    _fake_kernel(cpu, ["cpu.cfs_period_us", "cpu.cfs_quota_us"])
    _fake_kernel(tmp_path / "pids" / "j", ["pids.max"])
    group.apply(Limits(memory=1 << 30, cpus=2, pids=10))
    assert (mem / "memory.limit_in_bytes").read_text() == str(1 << 30)
    assert (mem / "memory.memsw.limit_in_bytes").read_text() == str(1 << 30)
    assert (cpu / "cpu.cfs_quota_us").read_text() == "200000"
    assert (tmp_path / "pids" / "j" / "pids.max").read_text() == "10"
    (mem / "memory.max_usage_in_bytes").write_text("1000\n")
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (tmp_path / "cpuacct" / "j" / "cpuacct.usage").write_text("2500000000\n")
    (tmp_path / "pids" / "j" / "pids.events").write_text("max 7\n")
    assert group.usage() == type(group.usage())(1000, 2.5, 2, 7)
    assert sorted(group.join_files) == sorted(str(tmp_path / c / "j" / "tasks") for c in parents)


def test_v1_without_cpu_limit_skips_the_cpu_controller(tmp_path: pathlib.Path) -> None:
    """The cpu controller is joined only when a CPU limit is asked for."""
    parents = {c: str(tmp_path / c) for c in ("memory", "cpu", "cpuacct", "pids", "freezer")}
    for path in parents.values():
        os.mkdir(path)
    group = V1Group(parents, "j", cpu=False)
    assert "cpu" not in group.dirs
    with pytest.raises(FileNotFoundError):
        group.apply(Limits(memory=1))  # the fake kernel has no files: errors name the file


def test_v2_manager_enables_controllers_and_nests_groups(tmp_path: pathlib.Path) -> None:
    """On v2 the manager enables memory, cpu and pids for its children, makes its parent group and
    one group per jail under it, and removes them all on close."""
    from pytest_jail._cgroups.detect import Layout
    from pytest_jail._cgroups.manager import Manager

    own = tmp_path / "own"
    own.mkdir()
    (own / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (own / "cgroup.subtree_control").write_text("")
    manager = Manager(Layout("v2", {}, str(own), frozenset({"cpuset", "cpu", "io", "memory", "pids"})))
    assert (own / "cgroup.subtree_control").read_text() == "+memory +cpu +pids +io"
    parent = own / manager.name
    assert (parent / "cgroup.subtree_control").read_text() == "+memory +cpu +pids +io"
    with pytest.raises(FileNotFoundError):  # the fake kernel makes no files in new groups
        manager.new_group(Limits(pids=4))
    assert not (parent / "j1").exists()  # a group whose limits could not be applied is removed
    (parent / "cgroup.subtree_control").unlink()  # the fake kernel's file (a real rmdir ignores them)
    manager.close()
    assert not parent.exists()


def test_v2_manager_names_missing_delegation(tmp_path: pathlib.Path) -> None:
    """Without the controllers delegated, the manager says which and how to delegate them."""
    from pytest_jail._cgroups.detect import Layout
    from pytest_jail._cgroups.manager import Manager
    from pytest_jail._cgroups.manager import Unavailable

    (tmp_path / "cgroup.controllers").write_text("memory pids\n")  # what the group was given
    with pytest.raises(Unavailable) as info:
        Manager(Layout("v2", {}, str(tmp_path), frozenset({"memory", "pids"})))
    assert "cpu are not delegated" in info.value.reason
    assert "Delegate=yes" in info.value.remedy


def test_io_writers(tmp_path: pathlib.Path) -> None:
    """IO limits: blkio.throttle.*_bps_device per disk on v1, one io.max line per disk on v2."""
    group = V2Group(str(tmp_path), "g")
    _fake_kernel(tmp_path / "g", ["io.max"])
    group.apply(Limits(io_write=2 << 20, io_devices=("254:0",)))
    assert (tmp_path / "g" / "io.max").read_text() == f"254:0 rbps=max wbps={2 << 20}"
    parents = {c: str(tmp_path / c) for c in ("memory", "cpuacct", "pids", "freezer", "blkio")}
    for path in parents.values():
        os.mkdir(path)
    v1 = V1Group(parents, "j", cpu=False, io=True)
    blkio = tmp_path / "blkio" / "j"
    _fake_kernel(blkio, ["blkio.throttle.read_bps_device", "blkio.throttle.write_bps_device"])
    v1.apply(Limits(io_read=1 << 20, io_devices=("8:0",)))
    assert (blkio / "blkio.throttle.read_bps_device").read_text() == f"8:0 {1 << 20}"
    assert (blkio / "blkio.throttle.write_bps_device").read_text() == ""


def test_detect_a_bound_subtree(tmp_path: pathlib.Path) -> None:
    """Inside a container without a cgroup namespace, /proc/self/cgroup names the container's
    group and /sys/fs/cgroup is a bind of that very subtree (mountinfo's root field): our group
    is the mount point itself, not a path under it that does not exist there."""
    mounts = ("30 23 0:27 /docker/abc /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
              "31 23 0:28 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
    layout = detect(*_files(tmp_path, mounts, "4:memory:/docker/abc/sub\n0::/docker/abc\n"))
    assert layout.v2 == "/sys/fs/cgroup"
    assert layout.v1["memory"] == "/sys/fs/cgroup/memory/sub"
    elsewhere = detect(*_files(tmp_path, mounts, "0::/other\n"))  # a group this mount does not show
    assert elsewhere.v2 is None
