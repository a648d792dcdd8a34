"""Supervisor faults: jails outlive the thread that started them, die with pytest's process, and
are signalled only through what cannot be someone else's."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from attack import needs_jail
from attack import root_mode
from conftest import wait_until
from leftovers import named

from pytest_jail import Jail
from pytest_jail import JailProcess

pytestmark = needs_jail


def test_a_jail_outlives_the_thread_that_spawned_it() -> None:
    """PR_SET_PDEATHSIG follows the *thread* that forked: a jail spawned from a thread that then
    exits was killed. Jails now watch pytest's process instead."""
    spawned: list[JailProcess] = []
    thread = threading.Thread(target=lambda: spawned.append(Jail().spawn(["sleep", "30"])))
    thread.start()
    thread.join()
    process = spawned[0]
    try:
        time.sleep(0.3)
        assert process.returncode is None  # still running, its thread long gone
    finally:
        result = process.kill()
    assert result.returncode == -9


def test_a_jail_dies_with_pytests_process() -> None:
    """...and the jail goes when the process that started it goes, however it goes (SIGKILL)."""
    tag = f"pj-orphan-{os.getpid()}"
    script = (
        "import sys, time\n"
        "from pytest_jail import Jail\n"
        f"Jail().spawn(['bash', '-c', 'exec -a {tag} sleep 300'])\n"  # (dash has no exec -a)
        "print('spawned', flush=True)\n"
        "time.sleep(300)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "spawned\n"
    assert wait_until(lambda: named(tag))  # the jail's command runs
    child.kill()
    child.wait()
    assert wait_until(lambda: not named(tag)), named(tag)


def test_terminate_goes_through_the_jails_init() -> None:
    """JailProcess.terminate() asks the jail's init to SIGTERM its pid 2 (init's own child: its
    pid cannot be reused before init reaps it), not os.kill() on a pid read from /proc."""
    with Jail().spawn(["sh", "-c", "trap 'echo got TERM; exit 3' TERM; echo ready; sleep 300 & wait"]) as process:
        wait_until(lambda: process.stdout == "ready\n")  # the trap must be set before the signal
        result = process.terminate()
    assert (result.returncode, result.stdout) == (3, "ready\ngot TERM\n")


@root_mode
def test_a_frozen_stale_cgroup_is_cleaned_at_once(tmp_path: os.PathLike[str]) -> None:
    """A pytest killed while it froze a jail's group (v1's way to kill) left a frozen group: the
    next start thaws it, kills what is in it and removes it, without waiting (before: ~32 s)."""
    from pytest_jail._cgroups.detect import detect
    from pytest_jail._cgroups.manager import PREFIX
    from pytest_jail._cgroups.manager import clean_stale_everywhere

    layout = detect()
    freezer = layout.v1.get("freezer")
    if freezer is None:
        pytest.skip("needs a v1 freezer hierarchy (this host's is hybrid; a pure v2 kernel has no such state)")
    dead = next(n for n in range(4_000_000, 4_100_000) if not os.path.exists(f"/proc/{n}"))  # no such process
    stale = os.path.join(freezer, f"{PREFIX}{dead}.stale", "j0")
    os.makedirs(stale)
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        with open(os.path.join(stale, "cgroup.procs"), "w") as f:
            f.write(str(sleeper.pid))
        with open(os.path.join(stale, "freezer.state"), "w") as f:
            f.write("FROZEN")
        started = time.monotonic()
        clean_stale_everywhere()
        took = time.monotonic() - started
        assert not os.path.exists(os.path.dirname(stale))
        assert sleeper.wait(timeout=5) == -9 and took < 5, took
    finally:
        if sleeper.poll() is None:
            sleeper.kill()


@root_mode
def test_stale_parents_next_to_our_group_are_cleaned() -> None:
    """A run killed while it lived in another group than this one (each CI job or session scope
    in a group of its own) left its parents beside ours, where no later run looked: they go at
    the next start too; one named in another pid namespace, or still holding a process, stays."""
    from pytest_jail._cgroups.detect import detect
    from pytest_jail._cgroups.manager import PREFIX
    from pytest_jail._cgroups.manager import clean_stale_everywhere

    layout = detect()
    own = layout.v1.get("memory") or layout.v2
    assert own is not None
    parent = os.path.dirname(own)
    if not os.path.exists(os.path.join(parent, "cgroup.procs")):
        pytest.skip(f"this process's group {own} is a hierarchy's root: it has no neighbours")
    dead = next(n for n in range(4_000_000, 4_100_000) if not os.path.exists(f"/proc/{n}"))
    pidns = os.stat("/proc/self/ns/pid").st_ino
    neighbour = os.path.join(parent, f"pj-neighbour-{os.getpid()}")
    ours = os.path.join(neighbour, f"{PREFIX}{dead}.0badcafe.{pidns}")
    legacy = os.path.join(neighbour, f"{PREFIX}{dead}.0ddba11")  # named before the namespace was
    foreign = os.path.join(neighbour, f"{PREFIX}{dead}.feedface.{pidns + 1}")
    busy = os.path.join(neighbour, f"{PREFIX}{dead + 1}.5ca1ab1e")
    for path in (ours, legacy, foreign, busy):
        os.makedirs(os.path.join(path, "j1"))
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with open(os.path.join(busy, "j1", "cgroup.procs"), "w") as f:
            f.write(str(sleeper.pid))
        clean_stale_everywhere()
        assert not os.path.exists(ours) and not os.path.exists(legacy)
        assert os.path.isdir(foreign) and os.path.isdir(busy)
    finally:
        sleeper.kill()
        sleeper.wait()
        for path in (busy, foreign, ours, legacy):
            for group in (os.path.join(path, "j1"), path):
                if os.path.isdir(group):
                    os.rmdir(group)
        os.rmdir(neighbour)
