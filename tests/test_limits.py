"""Resource limits on the real kernel: OOM named from the cgroup's counters, fork and thread bombs
contained, CPU throttled, accounting in reports (issue 3; runs on this host's cgroup layout)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import pytest
from conftest import needs_jail
from leftovers import tagged

from pytest_jail import Jail
from pytest_jail import JailError
from pytest_jail import JailSpec
from pytest_jail._cgroups.manager import Unavailable
from pytest_jail._host import host
from pytest_jail._view import uses_root_map

try:
    host().cgroups()
    _CGROUPS = ""
except Unavailable as exc:
    _CGROUPS = f"{exc.reason}; {exc.remedy}"

if _CGROUPS and os.environ.get("PYTEST_JAIL_REQUIRE_LIMITS"):  # the v2 guest: a skip would hide a bug
    raise RuntimeError(f"limits are unavailable: {_CGROUPS}")

pytestmark = [needs_jail, pytest.mark.skipif(bool(_CGROUPS), reason=_CGROUPS or "-")]

PY = [sys.executable, "-c"]


def _python_jail(**spec: object) -> Jail:
    from pytest_jail._jail import runtime_paths
    from pytest_jail._linux.mounts import Exposure

    return Jail(JailSpec(**spec), exposures=[Exposure(p, p) for p in runtime_paths()])  # type: ignore[arg-type]


def test_memory_hog_is_oom_killed_and_named() -> None:
    """A 200M allocation in a 64M jail is killed by the OOM killer, read from the cgroup's counters."""
    result = _python_jail(memory="64M").run([*PY, "x = bytearray(200 << 20); print('survived')"])
    assert result.oom_killed and result.returncode == -9
    assert "survived" not in result.stdout
    assert result.verdict() == "killed by the OOM killer (memory limit 64M, peak 64M)"
    after = Jail().run(["true"])  # pytest and the next jail are unaffected
    assert (after.returncode, after.oom_killed) == (0, False)


def test_gradual_hog_is_stopped_at_the_limit() -> None:
    """A process that grows 1M at a time is stopped at the limit, not left to thrash."""
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))"
    result = _python_jail(memory="48M").run([*PY, code], timeout=60)
    assert result.oom_killed and not result.timed_out
    assert result.peak_memory is not None and result.peak_memory <= 48 << 20


def test_fork_bomb_is_contained() -> None:
    """A shell fork bomb under pids=64 hits the limit; not one of its processes is left after."""
    tag = f"pj-bomb-{os.getpid()}"  # every fork of the bomb carries it in its command line
    script = f"exec -a {tag} bash -c 'b() {{ b | b & }}; b; sleep 1'"
    result = Jail(JailSpec(pids=64)).run(["bash", "-c", script], timeout=5)
    assert result.pids_limit_hit > 0
    assert result.verdict().startswith("process limit reached (pids 64): fork failed ")
    assert tagged(tag) == []



def test_thread_bomb_is_contained() -> None:
    """Threads count against pids too: a thread bomb gets an error, not the host's threads."""
    code = (
        "import threading, time\nn = 0\ntry:\n    while True:\n"
        "        threading.Thread(target=time.sleep, args=(5,), daemon=True).start(); n += 1\n"
        "except RuntimeError as e:\n    print('stopped at', n, e)\n"
    )
    result = _python_jail(pids=32).run([*PY, code], timeout=30)
    assert "stopped at" in result.stdout, result
    assert int(result.stdout.split()[2]) < 32
    assert result.pids_limit_hit > 0


def test_cpu_limit_throttles() -> None:
    """cpus=0.5: a spinner gets about half a core: CPU time is about half the wall time."""
    result = Jail(JailSpec(cpus=0.5)).run(["timeout", "2", "sh", "-c", "while :; do :; done"])
    # (busybox's timeout, where it comes first on PATH, ends with the command's own status: -15)
    assert result.returncode == 124, (result, Jail().run(["sh", "-c", "command -v timeout"]).stdout)
    assert result.cpu_time is not None
    assert 0.3 < result.cpu_time / result.duration < 0.7, (result.cpu_time, result.duration)


def _kernel_keeps_peaks() -> bool:
    """cgroup v1 keeps a group's peak memory (memory.max_usage_in_bytes); v2 from Linux 5.19 (memory.peak)."""
    if host().cgroups().v2_parent is None:
        return True
    probe = Jail().spawn(["sleep", "5"])
    try:
        group = probe._command.run.group
        return group is not None and os.path.exists(os.path.join(group.path, "memory.peak"))  # type: ignore[attr-defined]
    finally:
        probe.kill()


def test_accounting_without_limits() -> None:
    """Every jail reports peak memory (where the kernel keeps it) and CPU time from its cgroup."""
    result = _python_jail().run([*PY, "x = bytearray(30 << 20); sum(range(10**6))"])
    assert result.returncode == 0
    if not _kernel_keeps_peaks():
        assert result.peak_memory is None  # "peak unknown" in a report, never a guess
    else:
        assert result.peak_memory is not None and result.peak_memory >= 30 << 20
    assert result.cpu_time is not None and result.cpu_time > 0


def test_marker_memory_limit_report(jailed_pytester: pytest.Pytester) -> None:
    """A jailed body that hits its memory limit fails with one line naming the limit and the peak;
    the accounting lands in JUnit XML; the next test is unaffected."""
    jailed_pytester.makepyfile(
        """
        import pytest

        @pytest.mark.jail(memory="64M")
        def test_hog():
            x = bytearray(300 << 20)

        @pytest.mark.jail
        def test_next():
            pass
        """
    )
    result = jailed_pytester.runpytest_subprocess("--junitxml=out.xml")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["jail: killed by the OOM killer (memory limit 64M, peak 64M)"])
    xml = (jailed_pytester.path / "out.xml").read_text()
    assert '<property name="jail_peak_memory" value="67108864"' in xml
    assert 'name="jail_cpu_time"' in xml and 'name="jail_wall_time"' in xml


def test_marker_fork_bomb_report(jailed_pytester: pytest.Pytester) -> None:
    """A body whose forks fail at the process limit gets that line on top of its own failure."""
    jailed_pytester.makepyfile(
        """
        import os, pytest

        @pytest.mark.jail(pids=16)
        def test_forks():
            children = []
            for _ in range(64):
                children.append(os.fork() or os._exit(0))
        """
    )
    result = jailed_pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["jail: process limit reached (pids 16): fork failed * time*", "*BlockingIOError*"])


def test_limits_from_cli_and_ini(jailed_pytester: pytest.Pytester) -> None:
    """--jail-memory/--jail-pids and their ini twins set defaults; the marker still wins."""
    jailed_pytester.makeini("[pytest]\njail_pids = 40\n")
    jailed_pytester.makepyfile(
        """
        import pytest

        def test_cli_memory():
            x = bytearray(200 << 20)

        @pytest.mark.jail(memory="1G")
        def test_marker_wins():
            x = bytearray(200 << 20)

        def pytest_jail_result(item, result):
            pass
        """
    )
    result = jailed_pytester.runpytest_subprocess("--jail-all", "--jail-memory=64M")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["jail: killed by the OOM killer (memory limit 64M, peak 64M)"])
    result = jailed_pytester.runpytest_subprocess("--jail-all", "--jail-memory=lots")
    result.stderr.fnmatch_lines(["ERROR: --jail-memory: memory='lots' is not valid; allowed: a size of at least 4M*"])


def test_jail_report_lists_the_heaviest_tests(jailed_pytester: pytest.Pytester) -> None:
    """--jail-report lists jailed tests by peak memory and CPU time, under xdist too."""
    pytest.importorskip("xdist", reason="needs pytest-xdist: pip install pytest-xdist")
    jailed_pytester.makepyfile(
        """
        def test_big():
            x = bytearray(80 << 20)

        def test_small():
            pass
        """
    )
    result = jailed_pytester.runpytest_subprocess("--jail-all", "--jail-report", "-n", "2", "-p", "xdist")
    result.assert_outcomes(passed=2)
    biggest = "*M  *test_big*" if _kernel_keeps_peaks() else "  not kept by this kernel (cgroup v2 keeps a peak*"
    result.stdout.fnmatch_lines(["*jail report: the heaviest jailed tests*", "peak memory:", biggest])


def test_session_memory_budget(jailed_pytester: pytest.Pytester) -> None:
    """--jail-memory-total caps all jails of the session together; a jail that breaks it is named."""
    jailed_pytester.makepyfile(
        """
        import pytest

        @pytest.mark.jail
        def test_greedy():
            x = bytearray(200 << 20)

        @pytest.mark.jail
        def test_modest():
            x = bytearray(20 << 20)
        """
    )
    result = jailed_pytester.runpytest_subprocess("--jail-memory-total=96M")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["jail: killed by the OOM killer (memory budget of this pytest process 96M, peak *)"])
    if importlib.util.find_spec("xdist"):  # two workers share the budget: half each
        result = jailed_pytester.runpytest_subprocess("--jail-memory-total=192M", "-n", "2", "-p", "xdist")
        result.stdout.fnmatch_lines(["*memory budget of this pytest process 96M*"])
    result = jailed_pytester.runpytest_subprocess("--jail-memory-total=lots")
    result.stderr.fnmatch_lines(["ERROR: --jail-memory-total: 'lots' is not valid; allowed: a size like*"])


def test_io_write_limit_throttles_the_disk(tmp_path: os.PathLike[str]) -> None:
    """io={'write': '2M'}: direct writes to a disk-backed bind go at about 2 MB/s (timed by the
    jail's duration: a busybox sh runs its own dd, which prints no rate)."""
    from pytest_jail._limits import disks as _disks

    out = os.path.join(tmp_path, "out")
    os.mkdir(out)
    os.chmod(out, 0o777)
    os.chmod(tmp_path, 0o755)
    if not _disks([out]):
        pytest.skip(f"{out} is on no block device (a memory filesystem): nothing to throttle")
    script = "dd if=/dev/zero of=/out/f bs=1M count=6 oflag=direct"
    free = Jail(JailSpec(binds=[f"{out}:/out:rw"])).run(["sh", "-c", script])
    limited = Jail(JailSpec(binds=[f"{out}:/out:rw"], io={"write": "2M"})).run(["sh", "-c", script])
    assert free.returncode == 0 and limited.returncode == 0, (free, limited)
    assert limited.duration >= 2.0, limited  # 6 MiB at 2 MiB/s, minus a first slice
    assert limited.duration > 2 * free.duration, (free, limited)


def test_io_limit_names_what_it_needs() -> None:
    """An io limit on a jail that writes to no disk says why it cannot be enforced."""
    from pytest_jail._limits import disks as _disks

    if _disks(["/"]):
        pytest.skip("/ is on a disk here; the refusal shows only where every writable path is in memory")
    with pytest.raises(Exception, match="cannot enforce io: the jail writes to no block device"):
        Jail(JailSpec(io={"write": "1M"})).run(["true"])


def test_a_group_is_killed_whole_where_the_kernel_has_no_cgroup_kill() -> None:
    """Before Linux 5.14 (no ``cgroup.kill``) a v2 group is frozen, each member killed, thawed,
    until empty; a timeout then sets ``timed_out`` like anywhere else. Runs where the kernel has
    no cgroup.kill: the 5.10 guest of the kernel matrix."""
    cgroups = host().cgroups()
    if cgroups.v2_parent is None:
        pytest.skip("a cgroup v2 fallback: this host's jails use v1 groups (they are frozen and killed anyway)")
    if os.path.exists(os.path.join(cgroups.v2_parent, "cgroup.kill")):
        pytest.skip("this kernel has cgroup.kill (5.14+); the fallback runs on one without it (the 5.10 guest)")
    service = Jail().spawn(["sh", "-c", "sleep 300 & sleep 300 & sleep 300 & wait"])
    group = service._command.run.group
    assert group is not None
    procs = os.path.join(group.path, "cgroup.procs")  # type: ignore[attr-defined]
    for _ in range(500):
        if len(open(procs).read().split()) >= 5:  # helper, init, sh, three sleeps
            break
        time.sleep(0.01)
    group.kill()
    try:  # empty, or already removed: the jail's own teardown may remove the group meanwhile
        left = open(procs).read().split()
    except FileNotFoundError:
        left = []
    assert left == []
    with pytest.raises(JailError, match="the jail ended before"):  # its helper and init went with it
        service.wait(timeout=30)
    timed = Jail(JailSpec(timeout=1)).run(["sh", "-c", "sleep 300 & sleep 300 & wait"])
    assert timed.timed_out and timed.returncode == -9


@pytest.mark.skipif(not uses_root_map(), reason="binding a cgroup subtree over the hierarchy needs root (with CAP_SYS_ADMIN)")
def test_a_bound_cgroup_subtree_is_found_where_it_is_mounted() -> None:
    """As in a container without a cgroup namespace: a process whose group's own subtree is bound
    over the hierarchy's mount point (a mount namespace of its own, nothing changes outside) finds
    its group at the mount point, and a jail with a memory limit works there."""
    from pytest_jail._cgroups.detect import detect

    layout = detect()
    hierarchy = layout.v2 if layout.kind == "v2" else layout.v1.get("memory")
    if hierarchy is None:
        pytest.skip("no memory hierarchy to bind a subtree of")
    mount = next(line.split()[4] for line in open("/proc/self/mountinfo")
                 if line.split()[4] != "/" and hierarchy.startswith(line.split()[4]) and " - cgroup" in line)
    box = os.path.join(hierarchy, f"pytest-jail-test-box-{os.getpid()}")
    os.mkdir(box)
    script = (f'echo $$ > {box}/cgroup.procs && mount --bind {box} {mount} && exec "$0" -c "$1"')
    code = ("from pytest_jail._cgroups.detect import detect; from pytest_jail import Jail, JailSpec; "
            "layout = detect(); print(layout.v2 if layout.kind == 'v2' else layout.v1['memory']); "
            "print(Jail(JailSpec(memory=64 << 20)).run(['true']).returncode)")
    try:
        done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, sys.executable, code],
                              capture_output=True, text=True, timeout=120)
        assert done.stdout.split() == [mount, "0"], done
    finally:  # the box, and what the jail's run left in it (on v2, the leaf its process moved to)
        from pytest_jail._cgroups.base import rmdir_when_empty

        for parent, _, _ in os.walk(box, topdown=False):
            rmdir_when_empty(parent)
