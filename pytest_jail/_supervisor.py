"""One running jail, seen from the caller: its helper, init's pidfd, the wire, the output pipes,
its cgroup and its place on a bridge; reading until it ends, killing it at its timeout, and a
teardown that always completes and never waits forever."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import selectors
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING
from typing import Any

from . import _wire
from ._cgroups import Group
from ._cgroups import Usage
from ._errors import JailSetupError
from ._probe import explain
from ._spec import format_size
from ._teardown import Teardowns
from ._teardown import release
from .rootfs._build import remove_tree

if TYPE_CHECKING:
    from ._child import Launch
    from ._linux.net import Attachment
    from ._linux.net import Networks

__all__ = ["SETUP_TIMEOUT", "Output", "Supervisor", "close_all", "close_quietly", "returncode"]

SETUP_TIMEOUT = 60.0  # seconds for a jail to be built (its own timeout starts after)


class Output:
    """What a jail wrote on one pipe, up to ``limit`` bytes (the first ones, or with ``tail`` the
    last ones); the rest is counted, never kept, so a jail cannot make pytest grow without end."""

    def __init__(self, limit: int, *, tail: bool = False) -> None:
        self.data = bytearray()
        self.limit = limit
        self.tail = tail
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        if self.tail:
            self.data += chunk
            if len(self.data) > self.limit:
                self.dropped += len(self.data) - self.limit
                del self.data[: len(self.data) - self.limit]
            return
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]
        self.dropped += max(0, len(chunk) - max(room, 0))


@dataclass(eq=False)  # identity: each is one running jail
class Supervisor:
    """A jail being run: the helper's pid, the parent's ends of the pipes, and what it holds."""

    pid: int
    status: int
    control: int
    started: float
    teardowns: Teardowns
    networks: Callable[[], Networks] | None = None  # where its place on a bridge goes back to
    reader: _wire.Reader = field(default_factory=_wire.Reader)
    messages: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    ended: float = 0.0
    init: int | None = None  # a pidfd of the jail's init, once the helper names it
    group: Group | None = None  # the jail's cgroup, removed when the jail is gone
    usage: Usage | None = None
    rusage_cpu: float | None = None
    attachment: Attachment | None = None  # its place on a bridge, released when it is gone
    init_pid: int = 0  # the host pid of the jail's init
    killed: bool = False  # killed on purpose (JailProcess.kill), not by a limit
    launch: Launch | None = None  # what the child side was given (a body enters with it)
    memory: int | None = None  # its memory limit
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # the pipes, across threads
    layer: str | None = None  # a host directory holding its rootfs's writable layer
    map_pending: bool = False  # root mode, a jail prepared ahead: its id map is still to be written
    rootfs: str | None = None  # its rootfs directory (for the id-mapped tree sent with the map)
    scratch_layer: bool = False  # its layer is on disk only because tmpfs keeps no xattrs: remove it all
    overlay_by_parent: bool = False  # its rootfs's overlay is made by the parent (kernels before 5.11)...
    overlay_size: int | None = None  # ...with a layer of this size

    # -- the wire -----------------------------------------------------------------------------

    def descriptors(self) -> tuple[int, ...]:
        """The parent's handles on this jail: a body entering any jail must not keep them."""
        return tuple(fd for fd in (self.status, self.control, self.init) if fd is not None and fd >= 0)

    def close_pipes(self) -> None:
        """Close our ends of the wire, once (a closed number may already be someone else's)."""
        with self.lock:
            for name in ("status", "control"):
                fd = getattr(self, name)
                if fd >= 0:
                    close_quietly(fd)
                    setattr(self, name, -1)

    def order(self, what: bytes) -> None:
        """Tell the jail's init something ("t": SIGTERM the command), if it still listens."""
        with self.lock:
            if self.control >= 0:
                try:
                    os.write(self.control, what)
                except OSError:
                    pass

    def receive(self, chunk: bytes) -> None:
        try:
            messages = self.reader.feed(chunk)
        except _wire.WireError as exc:
            # A protocol error is a setup error (see raise_setup_error); the jail goes at once.
            messages = [{"kind": "error", "step": "wire", "errno": errno.EPROTO, "detail": str(exc), "path": None}]
            self.kill()
        for message in messages:
            if message["kind"] == "init" and self.init is None:
                self.init_pid = message["pid"]
                try:
                    self.init = os.pidfd_open(message["pid"])
                except ProcessLookupError:
                    pass
            self.messages.append(message)

    def next_message(self, kind: str) -> dict[str, Any] | None:
        """Wait for a message of ``kind`` (``None`` on an error or EOF); setup has a time limit."""
        deadline = time.monotonic() + SETUP_TIMEOUT
        while True:
            for message in self.messages:
                if message["kind"] in (kind, "error"):
                    return message if message["kind"] == kind else None
            poller = select.poll()  # (never select(): it fails on a descriptor numbered 1024 or more)
            poller.register(self.status, select.POLLIN)
            if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                raise JailSetupError(kind, errno.ETIMEDOUT, f"the jail was not ready after {SETUP_TIMEOUT:.0f}s "
                                     "(a bind source on a hung network filesystem?)")
            chunk = os.read(self.status, 65536)
            if not chunk:
                self.finished = True
                return None
            self.receive(chunk)

    def collect(
        self,
        timeout: float | None,
        outputs: dict[int, Output] | None = None,
        stdin: int | None = None,
        data: bytes | None = None,
        since: float | None = None,
    ) -> bool:
        """Read the wire (and a command's outputs, and feed its stdin) until the jail is gone;
        kill it ``timeout`` seconds after ``since`` (default: its start). Timed out?"""
        outputs = outputs or {}
        deadline = None if timeout is None else (self.started if since is None else since) + timeout
        sel = selectors.DefaultSelector()
        sel.register(self.status, selectors.EVENT_READ)
        for fd in outputs:
            sel.register(fd, selectors.EVENT_READ)
        pending = memoryview(data or b"")
        if stdin is not None:
            if pending:
                os.set_blocking(stdin, False)
                sel.register(stdin, selectors.EVENT_WRITE)
            else:
                os.close(stdin)
        timed_out = orphaned = False
        try:
            while sel.get_map():
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                if wait == 0 and orphaned:
                    break
                if wait == 0 and not timed_out:
                    timed_out = True
                    self.kill()
                    deadline = time.monotonic() + self.teardowns.grace
                    continue
                events = sel.select(wait)
                if not events and (timed_out or orphaned):
                    break  # a process we cannot kill (D state): stop waiting, never hang
                for key, _ in events:
                    fd = key.fd
                    if fd == stdin:
                        try:
                            pending = pending[os.write(fd, pending[:65536]):]
                        except BrokenPipeError:
                            pending = pending[:0]
                        if not pending:
                            sel.unregister(fd)
                            os.close(fd)
                        continue
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        sel.unregister(fd)
                        if fd == self.status and not timed_out:
                            # init is gone; what still holds an output and outlives it by
                            # the grace cannot die (D state): stop waiting then, never hang.
                            grace = time.monotonic() + self.teardowns.grace
                            deadline = grace if deadline is None else min(deadline, grace)
                            orphaned = True
                    elif fd == self.status:
                        self.receive(chunk)
                    else:
                        outputs[fd].add(chunk)
                if outputs and not any(fd in outputs for fd in sel.get_map()) and self.exit_status() is not None:
                    break  # init reported the status once nothing of the jail was left: done
        finally:
            for key in list(sel.get_map().values()):
                if key.fd == stdin:
                    os.close(key.fd)
            sel.close()
            for fd in outputs:
                close_quietly(fd)
            self.close_pipes()
            self.finished = True
            self.ended = time.monotonic()
        return timed_out

    def read_until_closed(
        self, outputs: dict[int, Output], timeout: float | None, side: tuple[int, Callable[[], None]] | None = None
    ) -> bool:
        """Read a body's ``outputs`` until every one is closed; kill the jail at ``timeout``. Timed out?

        ``side``: a descriptor and what to do once it is readable, meanwhile (the next jail, being
        prepared, asks for its id map)."""
        deadline = None if timeout is None else self.started + timeout
        poller = select.poll()
        for fd in outputs:
            poller.register(fd, select.POLLIN)
        if side is not None:
            poller.register(side[0], select.POLLIN)
        open_fds = set(outputs)
        timed_out = False
        try:
            while open_fds:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                if wait == 0:
                    if timed_out:
                        break  # a process we cannot kill (D state): stop waiting, never hang
                    timed_out = True
                    self.kill()
                    deadline = time.monotonic() + self.teardowns.grace
                    continue
                for fd, _ in poller.poll(None if wait is None else wait * 1000):
                    if side is not None and fd == side[0]:
                        poller.unregister(fd)
                        side[1]()
                        side = None
                        continue
                    chunk = os.read(fd, 65536)
                    if chunk:
                        outputs[fd].add(chunk)
                    else:
                        poller.unregister(fd)
                        open_fds.discard(fd)
        finally:
            for fd in outputs:
                close_quietly(fd)
            self.ended = time.monotonic()
        return timed_out

    # -- ending it ----------------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL the jail's init: the kernel then kills every process of its pid namespace.

        The helper reaps init only once that is done, so waiting for the helper waits for the
        whole tree; the helper itself is left alive to do so (killed with the rest of the cgroup,
        it would leave init a zombie for the host's pid 1, which in a container may never reap
        it). Before init is known, killing the helper makes init follow (PDEATHSIG), and the
        cgroup goes at once.
        """
        if self.init is not None:
            with contextlib.suppress(ProcessLookupError):  # (gone already: the helper reaps it)
                signal.pidfd_send_signal(self.init, signal.SIGKILL)
            return
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if self.group is not None:
            self.group.kill()  # and whatever else is in its cgroup, in one go

    def abandon(self) -> None:
        """Kill and reap a jail whose caller is leaving (an exception): nothing stays behind."""
        if self.pid:
            self.kill()
        self.close_pipes()
        self.finished = True
        if self.pid:
            self.teardown()

    def teardown(self) -> int | None:
        """Reap the helper and release everything the jail held, each step whatever the others
        did, never waiting forever; return the payload's raw wait status if it ran to the end.

        A step that fails is a :class:`JailWarning` (the test's outcome is known by now, and
        the host's state is worth a word, not a failure): a process that does not die (D state)
        is left to a later reap, a group that cannot be removed to the next run's clean-up.
        """
        if not self.pid:
            return self.exit_status()
        pid, self.pid = self.pid, 0
        group = self.group
        if group is not None and self.attachment is None and self.layer is None:
            # Everything the result needs is known: the rest of the teardown (the helper's and
            # init's exits, unmounting, the group's removal, ~3 ms) happens off the critical
            # path, by the next jail's launch or at exit.
            release([("usage", lambda: setattr(self, "usage", group.usage())), ("init's pidfd", self._forget_init)])
            self.teardowns.defer(pid, group)
            self.group = None
            return self.exit_status()
        steps: list[tuple[str, Callable[[], object]]] = [
            ("reap", lambda: setattr(self, "rusage_cpu", self.teardowns.reap_within(pid, self.kill, "the jail"))),
            ("init's pidfd", self._forget_init),
        ]
        if group is not None:
            steps += [("usage", lambda: setattr(self, "usage", group.usage())), ("cgroup kill", group.kill),
                      ("cgroup removal", group.remove)]
        attachment, networks = self.attachment, self.networks
        if attachment is not None and networks is not None:
            steps.append(("network", lambda: networks().release(attachment)))
        if self.layer is not None:
            # What the jail wrote is in upper/; overlayfs's scratch (work/, with a mode 0000
            # directory in it) would only stop pytest from removing its old temp dirs.
            layer = self.layer
            kept = os.path.join(layer, "work") if not self.scratch_layer else layer
            steps.append(("writable layer", lambda: remove_tree(kept)))
        release(steps)
        self.group = self.attachment = None
        return self.exit_status()

    def _forget_init(self) -> None:  # (a closed number could become another jail's pidfd)
        init, self.init = self.init, None
        if init is not None:
            close_quietly(init)

    # -- what it said -------------------------------------------------------------------------

    def exit_status(self) -> int | None:
        """The payload's raw wait status, as init reported it."""
        for message in self.messages:
            if message["kind"] == "exit":
                return int(message["status"])
        return None

    def raise_setup_error(self) -> None:
        """Raise what stopped the jail being built, if something did."""
        if self.usage is not None and self.usage.oom_kills > 0:
            limit = "" if self.memory is None else f" ({format_size(self.memory)})"
            raise JailSetupError(
                "memory limit", errno.ENOMEM, f"the OOM killer killed the jail while it was being built: its "
                f"memory limit{limit} is too small for the jail itself; give it more (a test body, a fork of "
                "pytest, needs some megabytes more than a command)")
        for message in self.messages:
            if message["kind"] == "error":
                error = JailSetupError(message["step"], message.get("errno"), message["detail"], message.get("path"))
                raise explain(error) or error  # a host's (or an outer jail's) refusal has a remedy

    def cpu_time(self) -> float | None:
        if self.usage is not None and self.usage.cpu_time is not None:
            return self.usage.cpu_time
        return self.rusage_cpu

    def blocked(self) -> list[str] | None:
        """What it tried to reach outside, as the recorder saw it."""
        for message in self.messages:
            if message["kind"] == "blocked":
                attempts = list(message["attempts"])
                if message.get("dropped"):
                    attempts.append(f"... and {message['dropped']} more")
                return attempts
        return None

    def refused(self) -> list[str] | None:
        """The system calls init refused the command, or ``None`` without a filter."""
        for message in self.messages:
            if message["kind"] == "syscalls":
                return [str(call) for call in message["calls"]][:64]
        return [] if self.launch is not None and self.launch.filter is not None else None


def returncode(status: int | None) -> int:
    """A raw wait status as :mod:`subprocess` says it (``-N``: killed by signal N)."""
    if status is None:
        return -signal.SIGKILL
    return os.waitstatus_to_exitcode(status)


def close_all(fds: list[int]) -> None:
    """Close and forget descriptors (the list empties: a second call does nothing)."""
    while fds:
        close_quietly(fds.pop())


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
