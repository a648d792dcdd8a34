"""Ending jails: teardown steps that always all run, reaping that never waits forever, and the
teardowns finished off the critical path once a jail's result is known."""

from __future__ import annotations

import errno
import os
import select
import warnings
from collections.abc import Callable

from ._cgroups import Group
from ._errors import JailWarning

__all__ = ["KILL_GRACE", "STUCK", "Teardowns", "release"]

KILL_GRACE = 10.0  # seconds to wait for a killed jail's last process before giving up
STUCK = "a process in uninterruptible sleep (D state: a hung network filesystem, a frozen cgroup)"


def release(steps: list[tuple[str, Callable[[], object]]]) -> None:
    """Run every teardown step whatever the others did; each failure is a :class:`JailWarning`."""
    for step, do in steps:
        try:
            do()
        except Exception as exc:  # noqa: BLE001 - every step runs; each failure is named
            if step == "cgroup removal" and getattr(exc, "errno", None) == errno.EBUSY:
                where = getattr(exc, "filename", "")
                warnings.warn(f"jail teardown: its cgroup ({where}) still holds processes that SIGKILL does not "
                              f"end: {STUCK}; they are left behind, the group to a later run's clean-up, and "
                              "pytest goes on", JailWarning, stacklevel=3)
            else:
                warnings.warn(f"jail teardown: {step} failed ({exc}); pytest goes on", JailWarning, stacklevel=3)


class Teardowns:
    """What is left of ended jails, for one process.

    ``deferred``: a jail's helper to reap (it exits once init has, its mount namespace unmounted)
    and its cgroup to remove, once the result is known: finished without waiting by every later
    launch, waited for when more than :attr:`MOST` are pending, and at exit. ``unreaped``:
    children a teardown gave up waiting for (a process of their jail that does not die), reaped
    as soon as they end, never waited for. Nothing is left behind: a pytest killed meanwhile
    takes its helpers with it, and its groups are removed by the next run's clean-up.
    """

    MOST = 4

    def __init__(self) -> None:
        self.deferred: list[tuple[int, Group]] = []
        self.unreaped: set[int] = set()
        self.grace = KILL_GRACE  # how long a killed jail's last process is waited for

    def defer(self, helper: int, group: Group) -> None:
        self.deferred.append((helper, group))
        self.finish(wait=len(self.deferred) > self.MOST)

    def finish(self, wait: bool = False) -> None:
        """Finish the teardowns whose helper has ended (``wait``: all of them, bounded)."""
        left = []
        for helper, group in self.deferred:
            if not wait:
                try:
                    if os.waitpid(helper, os.WNOHANG)[0] == 0:
                        left.append((helper, group))
                        continue
                except ChildProcessError:
                    pass
            else:
                release([("reap", lambda h=helper, g=group: self.reap_within(h, g.kill, "the jail"))])  # type: ignore[misc]
            release([("cgroup kill", group.kill), ("cgroup removal", group.remove)])
        self.deferred = left

    def reap_within(self, pid: int, kill: Callable[[], None], what: str) -> float | None:
        """Reap child ``pid`` and return its CPU seconds (``None`` if the kernel reaped it for a
        caller that ignores SIGCHLD). If it has not ended after :attr:`grace` seconds, ``kill`` and wait
        as long again; then give up with a warning: a process in uninterruptible sleep (a hung
        network filesystem, a frozen cgroup) must not hang pytest."""
        for old in list(self.unreaped):
            try:
                if os.waitpid(old, os.WNOHANG)[0]:
                    self.unreaped.discard(old)
            except ChildProcessError:
                self.unreaped.discard(old)
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            if not poller.poll(self.grace * 1000):
                kill()
                if not poller.poll(self.grace * 1000):
                    self.unreaped.add(pid)
                    warnings.warn(
                        f"{what} did not end {2 * self.grace:.0f}s after it was killed: {STUCK}; it is left "
                        f"behind (host pid {pid} and its children) and pytest goes on", JailWarning, stacklevel=3)
                    return None
        finally:
            os.close(pidfd)
        try:
            _, _, rusage = os.wait4(pid, 0)
        except ChildProcessError:
            return None
        return rusage.ru_utime + rusage.ru_stime
