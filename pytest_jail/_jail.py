"""The engine, free of pytest: build a jail, run a command or a function in it, collect the result.

Parent side of the process tree ``caller -> helper -> init (pid 1) -> payload (pid 2)``; the child
side is :mod:`pytest_jail._child`. The orchestration reads as a checklist in :meth:`Jail._launch`.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import select
import selectors
import signal
import socket
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from posix import _exit  # the real one: coverage's patch=_exit would save from our children
from typing import Any
from typing import NoReturn
from typing import final

from . import _child
from . import _wire
from ._cgroups import Group
from ._cgroups import Usage
from ._cgroups.manager import budget
from ._errors import JailConfigError
from ._errors import JailError
from ._errors import JailSetupError
from ._errors import JailWarning
from ._limits import cgroup_for
from ._limits import usage_fields
from ._linux import seccomp
from ._linux.mounts import Exposure
from ._linux.net import Attachment
from ._linux.net import clean_stale_once
from ._linux.net import networks
from ._probe import explain
from ._process import JailProcess
from ._result import JailResult
from ._spec import JailSpec
from ._spec import format_size
from ._spec import parse_size
from ._view import ROOT_MAP_BASE
from ._view import ROOT_MAP_SIZE
from ._view import bind_sources
from ._view import check_readable_by_jail
from ._view import idmapped_tree
from ._view import jail_cwd
from ._view import plan_for
from ._view import reserve_address
from ._view import resolve_rootfs
from ._view import runtime_paths
from ._view import uses_root_map
from .rootfs._build import remove_tree

__all__ = ["ROOT_MAP_BASE", "Call", "Jail", "runtime_paths", "uses_root_map"]

#: Every jail this process runs: a test body entering one closes the handles of all of them.
_RUNNING: weakref.WeakSet[_Run] = weakref.WeakSet()

#: How much of each of a command's output streams is kept (``jail.run(..., output_limit=...)``).
DEFAULT_OUTPUT_LIMIT = 16 << 20


class _Output:
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


_KILL_GRACE = 10.0  # seconds to wait for a killed jail's last process before giving up
SETUP_TIMEOUT = 60.0  # seconds for a jail to be built (its own timeout starts after)


@dataclass(eq=False)  # identity: each is one running jail
class _Run:
    """A jail being run: the helper's pid and the parent's ends of the pipes."""

    pid: int
    status: int
    control: int
    started: float
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
    launch: _child.Launch | None = None  # what the child side was given (a body enters with it)
    memory: int | None = None  # its memory limit
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # the pipes, across threads
    layer: str | None = None  # a host directory holding its rootfs's writable layer
    map_pending: bool = False  # root mode, a jail prepared ahead: its id map is still to be written
    rootfs: str | None = None  # its rootfs directory (for the id-mapped tree sent with the map)

    def __post_init__(self) -> None:
        _RUNNING.add(self)

    def descriptors(self) -> tuple[int, ...]:
        """The parent's handles on this jail: a body entering any jail must not keep them."""
        return tuple(fd for fd in (self.status, self.control, self.init) if fd is not None and fd >= 0)

    def close_pipes(self) -> None:
        """Close our ends of the wire, once (a closed number may already be someone else's)."""
        with self.lock:
            for name in ("status", "control"):
                fd = getattr(self, name)
                if fd >= 0:
                    _close_quietly(fd)
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
            # A protocol error is a setup error (see _raise_setup_error); the jail goes at once.
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


@final
class Jail:
    """A recipe for jails; every :meth:`run` or :meth:`start_call` clones a fresh one.

    >>> Jail(JailSpec()).run(["hostname"]).stdout
    'jail\\n'
    """

    def __init__(
        self,
        spec: JailSpec | None = None,
        *,
        exposures: Sequence[Exposure] = (),
        layer: str | None = None,
        writable: Sequence[str] = (),
    ) -> None:
        """:param exposures: host paths to show inside, besides the spec's binds.
        :param layer: an empty host directory to hold the writable layer over the rootfs, to be
            read after the jail is gone; by default the layer is a tmpfs that goes with the jail.
        :param writable: directories a read-only exposure shows that a test body may write (its
            ``tmp_path``), made writable as it enters: the jail itself does not depend on them,
            so the next one can be prepared while this one runs.
        """
        self.spec = spec or JailSpec()
        self.exposures = tuple(exposures)
        self.layer = layer
        self.writable = tuple(writable)

    # -- public -------------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | bytes | None = None,
        timeout: float | None = None,
        check: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        output_limit: int | str | None = None,
        **spec_overrides: Any,
    ) -> JailResult:
        """Run ``argv`` in a fresh jail and wait for it, like :func:`subprocess.run`.

        ``spec_overrides`` (``net="host"``, ``rootfs=...``) change this one jail's :class:`JailSpec`.

        .. note:: stdout and stderr are always captured and decoded; stdin is ``/dev/null``
           unless ``input`` is given. ``timeout`` kills the whole jail and sets ``timed_out``
           instead of raising, so the output so far is still in the result. Each stream keeps
           at most ``output_limit`` bytes (default 16M): what was dropped is counted in
           ``stdout_dropped`` / ``stderr_dropped``, and a warning says so.
        """
        command = self._start("jail.run", argv, input, timeout, env, cwd, spec_overrides, output_limit)
        try:
            command.collect()
        except BaseException:  # Ctrl-C, a test's own timeout: the jail goes with the caller
            self._abandon(command.run)
            raise
        return command.result()._checked(check)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        output_limit: int | str | None = None,
        **spec_overrides: Any,
    ) -> JailProcess:
        """Start ``argv`` in a fresh jail and return at once: a service for the caller to talk to.

        Its output is collected in the background; :meth:`JailProcess.wait` gives its
        :class:`JailResult`. Use it as a context manager, or call :meth:`JailProcess.kill`: the
        jail runs until its command ends, its ``timeout``, or the caller's end.
        """
        return JailProcess(self._start("jail.spawn", argv, None, timeout, env, cwd, spec_overrides, output_limit))

    def _start(
        self,
        caller: str,
        argv: Sequence[str],
        input: str | bytes | None,
        timeout: float | None,
        env: Mapping[str, str] | None,
        cwd: str | None,
        spec_overrides: dict[str, Any],
        output_limit: int | str | None = None,
    ) -> Command:
        if isinstance(argv, (str, bytes)) or not argv or not all(isinstance(a, str) for a in argv):
            raise JailConfigError(
                f"{caller}(argv={argv!r}): argv must be a non-empty list of strings, "
                "e.g. ['sh', '-c', 'echo hi'] (a single string is refused, as shell=False)"
            )
        limit = DEFAULT_OUTPUT_LIMIT
        if output_limit is not None:
            try:
                limit = parse_size(output_limit)
            except ValueError as exc:
                raise JailConfigError(f"{caller}(output_limit={output_limit!r}) is not valid; allowed: {exc}") from None
        spec = self.spec
        if timeout is not None:
            spec_overrides["timeout"] = timeout
        if spec_overrides:
            spec = spec.merged(f"{caller}({', '.join(f'{k}=...' for k in spec_overrides)})", spec_overrides)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        in_r = in_w = None
        if input is not None:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
        launch_kw: dict[str, Any] = {
            "argv": list(argv),
            "env": None if env is None else dict(env),
            "stdin": in_r,
            "stdout": out_w,
            "stderr": err_w,
        }
        try:
            run = self._launch(spec, cwd=cwd, **launch_kw)
        except BaseException:
            for fd in (out_r, err_r, in_w):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd in (out_w, err_w, in_r):
                if fd is not None:
                    os.close(fd)
        data = input.encode() if isinstance(input, str) else input
        return Command(self, run, list(argv), spec, out_r, err_r, in_w, data, output_limit=limit)

    def start_call(self, *, cwd: str | None = None) -> Call:
        """Build a jail for a function of this process, ready for :meth:`Call.fork` to enter.

        Everything that can fail because of the host fails here, before the function runs::

            call = Jail(spec).start_call()
            if call.fork():              # in the jail, as pid 2: the rest of this stack runs there
                call.finish({"value": work()})
            call.wait(timeout=10)        # here: call.outcome, call.result(...)
        """
        key = self._recipe(cwd)
        call = _PREPARED.take(key, self._plan_now(self.spec)) if key is not None else None
        if call is None:
            call = Call(self, self._launch(self.spec, cwd=cwd))
            call._wait_ready()
        call._jail, call._recipe, call._cwd = self, key, cwd
        return call

    def _recipe(self, cwd: str | None) -> tuple[Any, ...] | None:
        """What makes two jails the same, for one prepared ahead to serve (``None``: never: a
        layer to keep, or a place on a bridge, is one jail's own)."""
        if self.layer is not None or self.spec.segment is not None:
            return None
        return (self.spec, self.exposures, cwd, os.getpid())

    # -- the checklist ------------------------------------------------------------------------

    def _launch(self, spec: JailSpec, *, cwd: str | None, defer_map: bool = False, **payload: Any) -> _Run:
        _LATER.finish()  # earlier jails' teardowns that are done by now
        root_map = uses_root_map()
        if root_map:
            clean_stale_once()  # what a killed run left on the host's network (cgroups: the manager)
        rootfs = resolve_rootfs(spec.rootfs)
        exposures = self.exposures + tuple(Exposure(b.source, b.target, b.writable) for b in spec.binds)
        if root_map:
            check_readable_by_jail(exposures)
        attachment = None
        if spec.segment is not None:
            attachment = reserve_address(spec.segment, spec.hostname, root_map, spec.way_out)
            # The segment's hosts file, kept up to date as jails join: peers by hostname.
            exposures += (Exposure(attachment.segment.hosts_file, "/etc/hosts"),)
        try:
            return self._fork(spec, rootfs, exposures, root_map, attachment, cwd, payload, defer_map)
        except BaseException:
            if attachment is not None:
                networks().release(attachment)  # (a no-op when the run already released it)
            raise

    def _fork(
        self,
        spec: JailSpec,
        rootfs: str | None,
        exposures: tuple[Exposure, ...],
        root_map: bool,
        attachment: Attachment | None,
        cwd: str | None,
        payload: dict[str, Any],
        defer_map: bool = False,
    ) -> _Run:
        layer = self.layer if rootfs is not None else None
        record = _records(spec)
        plan = self._plan(spec, rootfs, exposures, root_map)
        group = cgroup_for(spec, exposures)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        # A socket, not a pipe: in root mode the parent hands the helper the id-mapped rootfs on it.
        control_r, control_w = (s.detach() for s in socket.socketpair())
        launch = _child.Launch(
            plan=plan,
            hostname=spec.hostname,
            share_net=spec.net == "host",
            wait_net=attachment is not None,
            record=record,
            root_map=root_map,
            cwd=jail_cwd(cwd or spec.workdir, rootfs, exposures),
            status_w=status_w,
            control_r=control_r,
            parent_pid=os.getpid(),
            sources=bind_sources(plan) if root_map else {},
            mapped=tuple(e.source for e in exposures if e.mapped) if root_map else (),
            filter=_filter(spec),
            quiet_filter=_filter(spec, notify=False),
            capabilities=_child.capabilities(spec.cap_add, root_map),
            cgroup_joins=group.join_files if group is not None else [],
            **payload,
        )
        if payload.get("env") is None and spec.env is not None:
            launch.env = dict(spec.env)
        started = time.monotonic()

        def helper() -> None:
            try:
                _child.helper_main(launch)
            finally:
                _exit(1)  # whatever happens, a child never returns into the caller's stack

        try:
            pid = _fork(helper)
        except OSError as exc:
            for fd in (status_r, status_w, control_r, control_w):
                os.close(fd)
            if group is not None:
                group.remove()
            if attachment is not None:
                networks().release(attachment)
            raise JailSetupError("fork", exc.errno, exc.strerror or str(exc)) from None
        for fd in (status_w, control_r):
            os.close(fd)
        run = _Run(pid, status_r, control_w, started, group=group, attachment=attachment, launch=launch,
                   memory=spec.memory, layer=layer, rootfs=rootfs)
        try:
            if root_map and defer_map:
                run.map_pending = True  # written when the helper asks (see _Prepared.service)
            elif root_map:
                self._write_root_map(run, rootfs)
            if attachment is not None:
                self._connect(run, attachment)
        except BaseException:
            self._abandon(run)
            raise
        return run

    def _plan(self, spec: JailSpec, rootfs: str | None, exposures: tuple[Exposure, ...], root_map: bool) -> list[Any]:
        layer = self.layer if rootfs is not None else None
        binds = tuple(b.target for b in spec.binds)
        return plan_for(rootfs, exposures, root_map, spec.tmpfs_size, layer, binds, _records(spec),
                        own_net=spec.net != "host")

    def _plan_now(self, spec: JailSpec) -> list[Any]:
        """The plan a jail of this recipe would get now (the host may have changed since one was
        prepared: a secret created in the home directory is hidden from the next jail)."""
        exposures = self.exposures + tuple(Exposure(b.source, b.target, b.writable) for b in spec.binds)
        return self._plan(spec, resolve_rootfs(spec.rootfs), exposures, uses_root_map())

    def _connect(self, run: _Run, attachment: Attachment) -> None:
        """Plug the jail into its segment once its network namespace exists; then let init go on."""
        message = self._next_message(run, "init")
        if message is None or run.init is None:
            self._exit_status(run)
            self._raise_setup_error(run)
            raise JailSetupError("network", None, "the jail ended before its network could be set up")
        networks().connect(attachment, f"/proc/{message['pid']}/ns/net")
        os.write(run.control, b"n")

    def _write_root_map(self, run: _Run, rootfs: str | None) -> None:
        run.map_pending = False
        message = self._next_message(run, "map")
        if message is None:
            self._exit_status(run)
            self._raise_setup_error(run)
            raise JailSetupError("user namespace id map", None, "the helper ended before asking for its id map")
        mapping = f"0 {ROOT_MAP_BASE} {ROOT_MAP_SIZE}".encode()
        for name in ("uid_map", "gid_map"):
            fd = os.open(f"/proc/{run.pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, mapping)
            finally:
                os.close(fd)
        userns = f"/proc/{run.pid}/ns/user"
        tree = None if rootfs is None else idmapped_tree(rootfs, userns)
        trees = [idmapped_tree(path, userns, quiet=True) for path in run.launch.mapped] if run.launch else []
        fds = [t for t in [tree, *trees] if t is not None]
        flags = ("r" if tree is not None else "-") + "".join("0" if t is None else "1" for t in trees)
        try:
            with socket.socket(fileno=os.dup(run.control)) as control:
                socket.send_fds(control, [b"m" + flags.encode()], fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _next_message(self, run: _Run, kind: str) -> dict[str, Any] | None:
        """Wait for a message of ``kind`` (``None`` on an error or EOF); setup has a time limit."""
        deadline = time.monotonic() + SETUP_TIMEOUT
        while True:
            for message in run.messages:
                if message["kind"] in (kind, "error"):
                    return message if message["kind"] == kind else None
            poller = select.poll()  # (never select(): it fails on a descriptor numbered 1024 or more)
            poller.register(run.status, select.POLLIN)
            if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                raise JailSetupError(kind, errno.ETIMEDOUT, f"the jail was not ready after {SETUP_TIMEOUT:.0f}s "
                                     "(a bind source on a hung network filesystem?)")
            chunk = os.read(run.status, 65536)
            if not chunk:
                run.finished = True
                return None
            run.receive(chunk)

    def _collect(
        self,
        run: _Run,
        timeout: float | None,
        outputs: dict[int, _Output] | None = None,
        stdin: int | None = None,
        data: bytes | None = None,
        since: float | None = None,
    ) -> bool:
        """Read the wire (and outputs) until the jail is gone; kill it ``timeout`` seconds after
        ``since`` (default: its start). Timed out?"""
        outputs = outputs or {}
        deadline = None if timeout is None else (run.started if since is None else since) + timeout
        sel = selectors.DefaultSelector()
        sel.register(run.status, selectors.EVENT_READ)
        for fd in outputs:
            sel.register(fd, selectors.EVENT_READ)
        if stdin is not None:
            if data:
                os.set_blocking(stdin, False)
                sel.register(stdin, selectors.EVENT_WRITE)
                pending = memoryview(data)
            else:
                os.close(stdin)
        timed_out = orphaned = False
        try:
            while sel.get_map():
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                if deadline is not None and wait == 0 and orphaned:
                    break
                if deadline is not None and wait == 0 and not timed_out:
                    timed_out = True
                    run.kill()
                    deadline = time.monotonic() + _KILL_GRACE
                    continue
                events = sel.select(wait)
                if not events and (timed_out or orphaned):
                    break  # a process we cannot kill (D state); give up waiting, never hang
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
                        if fd == run.status and not timed_out:
                            # init is gone; what still holds an output and outlives it for
                            # _KILL_GRACE cannot die (D state): stop waiting, never hang.
                            timed_out_at = time.monotonic() + _KILL_GRACE
                            deadline = timed_out_at if deadline is None else min(deadline, timed_out_at)
                            orphaned = True
                    elif fd == run.status:
                        run.receive(chunk)
                    else:
                        outputs[fd].add(chunk)
                if outputs and not any(fd in outputs for fd in sel.get_map()) and _status(run) is not None:
                    break  # init reported the status once nothing of the jail was left: done
        finally:
            for key in list(sel.get_map().values()):
                if key.fd == stdin:
                    os.close(key.fd)
            sel.close()
            for fd in outputs:
                _close_quietly(fd)
            run.close_pipes()
            run.finished = True
            run.ended = time.monotonic()
        return timed_out

    def _abandon(self, run: _Run) -> None:
        """Kill and reap a jail whose caller is leaving (an exception): nothing stays behind."""
        if run.pid:
            run.kill()
        run.close_pipes()
        run.finished = True
        if run.pid:
            self._exit_status(run)

    def _exit_status(self, run: _Run) -> int | None:
        """Reap the helper and release everything the jail held, each step whatever the others
        did, never waiting forever; return the payload's raw wait status if it ran to the end.

        A step that fails is a :class:`JailWarning` (the test's outcome is known by now, and
        the host's state is worth a word, not a failure): a process that does not die (D state)
        is left to a later reap, a group that cannot be removed to the next run's clean-up.
        """
        if run.pid:
            pid, run.pid = run.pid, 0

            def forget_init() -> None:  # (a closed number could become another jail's pidfd)
                init, run.init = run.init, None
                _close_all([init] if init is not None else [])

            group = run.group
            if group is not None and run.attachment is None and run.layer is None:
                # Everything the result needs is known: the rest of the teardown (the helper's
                # and init's exits, unmounting, the group's removal, ~3 ms) happens off the
                # critical path, by the next jail's launch or at exit.
                _release([("usage", lambda: setattr(run, "usage", group.usage())), ("init's pidfd", forget_init)])
                _LATER.add(pid, group)
                run.group = None
                return _status(run)
            steps: list[tuple[str, Callable[[], object]]] = [
                ("reap", lambda: setattr(run, "rusage_cpu", _reap_within(pid, run.kill, "the jail"))),
                ("init's pidfd", forget_init),
            ]
            if group is not None:
                steps += [("usage", lambda: setattr(run, "usage", group.usage())), ("cgroup kill", group.kill),
                          ("cgroup removal", group.remove)]
            attachment = run.attachment
            if attachment is not None:
                steps.append(("network", lambda: networks().release(attachment)))
            if run.layer is not None:
                # What the jail wrote is in upper/; overlayfs's scratch (work/, with a mode 0000
                # directory in it) would only stop pytest from removing its old temp dirs.
                layer = run.layer
                steps.append(("writable layer", lambda: remove_tree(os.path.join(layer, "work"))))
            _release(steps)
            run.group = run.attachment = None
        return _status(run)

    def _raise_setup_error(self, run: _Run) -> None:
        if run.usage is not None and run.usage.oom_kills > 0:
            limit = "" if run.memory is None else f" ({format_size(run.memory)})"
            raise JailSetupError(
                "memory limit", errno.ENOMEM, f"the OOM killer killed the jail while it was being built: its "
                f"memory limit{limit} is too small for the jail itself; give it more (a test body, a fork of "
                "pytest, needs some megabytes more than a command)")
        for message in run.messages:
            if message["kind"] == "error":
                error = _setup_error(message)
                if error.step == "unshare":  # a host's (or an outer jail's) refusal has a remedy
                    raise explain(error) or error
                raise error


@dataclass
class Command:
    """A command started in a jail: its wire and output pipes, until :meth:`result`."""

    jail: Jail
    run: _Run
    args: list[str]
    spec: JailSpec
    stdout_fd: int
    stderr_fd: int
    stdin_fd: int | None
    data: bytes | None
    timed_out: bool = False
    output_limit: int = DEFAULT_OUTPUT_LIMIT
    outputs: dict[int, _Output] = field(init=False)

    def __post_init__(self) -> None:
        self.outputs = {self.stdout_fd: _Output(self.output_limit), self.stderr_fd: _Output(self.output_limit)}

    @property
    def ip(self) -> str | None:
        return None if self.run.attachment is None else self.run.attachment.ip

    def output(self, fd: int) -> str:
        return bytes(self.outputs[fd].data).decode("utf-8", "replace")

    def collect(self) -> None:
        """Read its output until the jail is gone; kill it at its timeout."""
        self.timed_out = self.jail._collect(self.run, self.spec.timeout, self.outputs, self.stdin_fd, self.data)

    def result(self) -> JailResult:
        """Reap the jail (after :meth:`collect`) and say how it ended."""
        run, timed_out = self.run, self.timed_out
        status = self.jail._exit_status(run)
        returncode = _returncode(status)
        oom = run.usage is not None and run.usage.oom_kills > 0
        if not timed_out and not oom and not run.killed:
            # (With memory.oom.group on cgroup v2, the OOM killer takes init too: no status then.)
            self.jail._raise_setup_error(run)
            if status is None:
                raise JailSetupError("init", None, "the jail ended before it reported the command's status")
        streams = (("stdout", self.stdout_fd), ("stderr", self.stderr_fd))
        dropped = {name: self.outputs[fd].dropped for name, fd in streams}
        if any(dropped.values()):
            lost = ", ".join(f"{name} {n} bytes" for name, n in dropped.items() if n)
            warnings.warn(f"jail.run({self.args!r}): output beyond the limit of {format_size(self.output_limit)} "
                          f"per stream was dropped ({lost}); see output_limit=", RuntimeWarning, stacklevel=3)
        return JailResult(
            args=self.args,
            returncode=-signal.SIGKILL if (timed_out or run.killed) and returncode == 0 else returncode,
            stdout=self.output(self.stdout_fd),
            stderr=self.output(self.stderr_fd),
            stdout_dropped=dropped["stdout"],
            stderr_dropped=dropped["stderr"],
            timed_out=timed_out,
            duration=time.monotonic() - run.started,
            cpu_time=_cpu_time(run),
            timeout=self.spec.timeout,
            blocked=_blocked(run),
            blocked_syscalls=_refused(run),
            **usage_fields(run.usage, self.spec),
        )


@final
class Call:
    """A jail built for a function of this process: :meth:`fork` enters it, :meth:`wait` collects.

    The function is not started in the jail ahead of time: the caller forks at the moment it
    runs it, so the jailed copy starts from this process as it is then (a test's item after its
    setup phase and setup report, its fixtures' values), and runs the rest of the caller's stack
    as pid 2 of the jail.
    """

    def __init__(self, jail: Jail, run: _Run) -> None:
        self._jail = jail
        self._run = run
        self._recipe: tuple[Any, ...] | None = None  # what the next jail prepared ahead must match
        self._cwd: str | None = None
        self._channel = -1  # inside: the body's end of the wire
        self._entering = 0  # outside: the process that entered the jail and reaps the body
        self._reader = _wire.Reader()
        self.timed_out = False
        self.outcome: dict[str, Any] | None = None  # what the body sent with finish()
        self.status: int | None = None  # the body's wait status
        self.error: dict[str, Any] | None = None  # the body could not enter the jail
        self.last_words = b""  # what a dying body wrote on its way out (tracebacks, faulthandler)
        self._ended = 0.0
        self._namespaces: list[int] = []  # the jail's namespaces, the user namespace first
        self.refused: list[str] | None = None  # the system calls the filter refused the body

    def _wait_ready(self) -> None:
        # Both: init says it is ready, the helper names it (two processes, either may come first);
        # the helper sends the jail's namespaces, to enter by, just before it names init.
        named = self._jail._next_message(self._run, "init") is not None and self._run.init is not None
        if named:
            with socket.socket(fileno=os.dup(self._run.control)) as control:
                _, self._namespaces, _, _ = socket.recv_fds(control, 1, 8)
            for fd in self._namespaces:
                os.set_inheritable(fd, False)
        if not named or self._jail._next_message(self._run, "ready") is None:
            self.kill()
            self._jail._raise_setup_error(self._run)
            raise JailSetupError("start", None, "the jail ended before the test body was ready")

    # -- both sides ---------------------------------------------------------------------------

    def fork(self) -> bool:
        """Fork this process into the jail: ``True`` in the jailed copy (pid 2 of the jail, in
        its namespaces and cgroup, with the jail's ids and capabilities), ``False`` here."""
        run = self._run
        assert run.launch is not None and self._namespaces, "fork() once, on a jail start_call() built"
        channel_r, channel_w = os.pipe2(os.O_CLOEXEC)
        crash_r, crash_w = os.pipe2(os.O_CLOEXEC)
        launch = run.launch
        entry = _child.Entry(
            namespaces=self._namespaces,
            root_map=launch.root_map,
            cwd=launch.cwd,
            env=launch.env,
            cgroup_joins=launch.cgroup_joins,
            channel=channel_w,
            crash=crash_w,
            close=(channel_r, crash_r, *(fd for r in list(_RUNNING) for fd in r.descriptors())),
            syscalls=launch.syscalls,
            filter=launch.filter,
            quiet_filter=launch.quiet_filter,
            capabilities=launch.capabilities,
            writable=self._jail.writable,
        )
        run.started = time.monotonic()
        try:
            pid = _fork(lambda: _child.enter_body(entry))
        except OSError as exc:  # EAGAIN, ENOMEM: this process cannot fork now
            for fd in (channel_r, channel_w, crash_r, crash_w):
                os.close(fd)
            raise JailSetupError("fork", exc.errno, exc.strerror or str(exc)) from None
        if pid == 0:
            self._channel = channel_w
            self.crash_fd = crash_w
            return True
        os.close(channel_w)
        os.close(crash_w)
        _close_all(self._namespaces)  # the fork that enters has them; nobody else may
        self._entering = pid
        self._outputs = {channel_r: _Output(2 * _wire.MAX_FRAME), crash_r: _Output(_LAST_WORDS, tail=True)}
        if self._recipe is not None:  # while the body runs: the next test's jail, likely the same
            _PREPARED.prepare(self._jail, self._recipe, self._cwd)
        return False

    # -- inside -------------------------------------------------------------------------------

    crash_fd = -1  #: inside: a descriptor for last words (``faulthandler.enable(file=...)``)

    def finish(self, outcome: dict[str, Any]) -> NoReturn:
        """Inside: send ``outcome`` to the caller and end the jailed copy, never returning."""
        code = 1
        try:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:
                    pass
            _wire.send(self._channel, "outcome", data=outcome)
            code = 0
        finally:
            _exit(code)

    # -- outside ------------------------------------------------------------------------------

    def wait(self, timeout: float | None) -> Call:
        """Collect the body's outcome and status; kill the whole jail at ``timeout``; then end
        the jail and reap it. Safe to call once after :meth:`fork`."""
        run = self._run
        channel, crash = list(self._outputs)
        self.timed_out = _read_until_closed(run, self._outputs, timeout, side=_PREPARED.side())
        try:
            if self._outputs[channel].dropped:
                raise _wire.WireError(f"more than {2 * _wire.MAX_FRAME} bytes on the wire")
            messages = self._reader.feed(bytes(self._outputs[channel].data))
        except _wire.WireError as exc:  # its own doing: the body runs the test's code, and has the pipe
            messages = []
            self.error = {"step": "wire", "errno": errno.EPROTO, "detail": f"the test body broke the wire "
                          f"protocol: {exc}", "path": None}
        for message in messages:
            if message["kind"] == "outcome":
                self.outcome = message["data"]
            elif message["kind"] == "exit":
                self.status = int(message["status"])
            elif message["kind"] == "syscalls":
                self.refused = [str(call) for call in message["calls"]][:64]
            elif message["kind"] == "error":
                self.error = message
        self.last_words = bytes(self._outputs[crash].data)
        self._ended = run.ended
        _reap(self._entering, run.kill)
        self._entering = 0
        self.kill()
        return self

    @property
    def duration(self) -> float:
        return (self._ended or self._run.ended) - self._run.started

    def result(self, args: list[str], spec: JailSpec) -> JailResult:
        """How the body's jail ended, with what its cgroup counted."""
        return JailResult(
            args=args,
            returncode=self.returncode if self.returncode is not None else -signal.SIGKILL,
            timed_out=self.timed_out,
            timeout=spec.timeout,
            duration=self.duration,
            cpu_time=self.cpu_time,
            blocked=_blocked(self._run),
            blocked_syscalls=self.refused if self._run.launch and self._run.launch.filter else None,
            **usage_fields(self._run.usage, spec),
        )

    @property
    def cpu_time(self) -> float | None:
        return _cpu_time(self._run)

    @property
    def returncode(self) -> int | None:
        return None if self.status is None else _returncode(self.status)

    def kill(self) -> None:
        """End the jail (the body is over, or never came) and reap it; safe to call twice."""
        run = self._run
        _close_all(self._namespaces)
        if self._entering:  # a body still running: it goes with the jail
            run.kill()
            _reap(self._entering, run.kill)
            self._entering = 0
        if run.pid and not run.finished:
            try:
                os.write(run.control, b"e")  # init reports what was blocked and leaves
            except OSError:
                pass
            try:
                self._jail._collect(run, _KILL_GRACE, since=time.monotonic())
            except BaseException:
                self._jail._abandon(run)
                raise
        self._jail._abandon(run)


#: How much of a dying body's last words the report keeps.
_LAST_WORDS = 64 * 1024


def _fork(child: Callable[[], None]) -> int:
    """``os.fork()``; the child runs ``child`` first. The garbage collector's objects are frozen
    around it, so the child's first collection does not copy every page (gc.freeze docs)."""
    # Python 3.12 warns about fork() in a threaded process (pytest-xdist has one); what the child
    # runs is pytest code, as pytest-forked's children do. One filter for that message, added and
    # then removed by itself: warnings.catch_warnings() would put back the whole filter list,
    # undoing what another thread changed meanwhile (it is not thread-safe).
    warnings.filterwarnings("ignore", message=_FORK_WARNING, category=DeprecationWarning)
    entry = warnings.filters[0]
    gc.freeze()
    parent = os.getpid()
    try:
        pid = os.fork()
    finally:
        if os.getpid() == parent:
            gc.unfreeze()
        with contextlib.suppress(ValueError):
            warnings.filters.remove(entry)  # type: ignore[attr-defined]  # (a list at run time)
        getattr(warnings, "_filters_mutated", lambda: None)()
    if pid == 0:
        child()
    return pid


_FORK_WARNING = r"This process \(pid=\d+\) is multi-threaded, use of fork\(\) may lead to deadlocks"


def _read_until_closed(
    run: _Run, outputs: dict[int, _Output], timeout: float | None, side: tuple[int, Callable[[], None]] | None = None
) -> bool:
    """Read ``outputs`` until every one is closed; kill the jail at ``timeout``. Timed out?

    ``side``: a descriptor and what to do once it is readable, meanwhile (the next jail, being
    prepared, asks for its id map)."""
    deadline = None if timeout is None else run.started + timeout
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
                run.kill()
                deadline = time.monotonic() + _KILL_GRACE
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
            _close_quietly(fd)
        run.ended = time.monotonic()
    return timed_out


def _close_all(fds: list[int]) -> None:
    """Close and forget descriptors (the list empties: a second call does nothing)."""
    while fds:
        _close_quietly(fds.pop())


def _reap(pid: int, kill: Callable[[], None]) -> None:
    """Reap a child that is ending (the process that entered a jail, once its body is gone)."""
    if pid:
        _reap_within(pid, kill, "the test body's jail")


_STUCK = "a process in uninterruptible sleep (D state: a hung network filesystem, a frozen cgroup)"

#: Children a teardown gave up waiting for (a process of their jail that does not die): reaped
#: as soon as they end, by a later teardown or at exit, never waited for.
_UNREAPED: set[int] = set()


def _reap_within(pid: int, kill: Callable[[], None], what: str) -> float | None:
    """Reap child ``pid`` and return its CPU seconds (``None`` if the kernel reaped it for a caller
    that ignores SIGCHLD). If it has not ended after ``_KILL_GRACE`` s, ``kill`` and wait as long
    again; then give up with a warning: a process in uninterruptible sleep (a hung network
    filesystem, a frozen cgroup) must not hang pytest."""
    for old in list(_UNREAPED):
        try:
            if os.waitpid(old, os.WNOHANG)[0]:
                _UNREAPED.discard(old)
        except ChildProcessError:
            _UNREAPED.discard(old)
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(_KILL_GRACE * 1000):
            kill()
            if not poller.poll(_KILL_GRACE * 1000):
                _UNREAPED.add(pid)
                warnings.warn(
                    f"{what} did not end {2 * _KILL_GRACE:.0f}s after it was killed: {_STUCK}; it is left "
                    f"behind (host pid {pid} and its children) and pytest goes on", JailWarning, stacklevel=3)
                return None
    finally:
        os.close(pidfd)
    try:
        _, _, rusage = os.wait4(pid, 0)
    except ChildProcessError:
        return None
    return rusage.ru_utime + rusage.ru_stime


def _returncode(status: int | None) -> int:
    if status is None:
        return -signal.SIGKILL
    return os.waitstatus_to_exitcode(status)


def _cpu_time(run: _Run) -> float | None:
    return run.usage.cpu_time if run.usage is not None and run.usage.cpu_time is not None else run.rusage_cpu


def _blocked(run: _Run) -> list[str] | None:
    for message in run.messages:
        if message["kind"] == "blocked":
            attempts = list(message["attempts"])
            if message.get("dropped"):
                attempts.append(f"... and {message['dropped']} more")
            return attempts
    return None


def _refused(run: _Run) -> list[str] | None:
    """The system calls init refused the command, or ``None`` without a filter."""
    for message in run.messages:
        if message["kind"] == "syscalls":
            return [str(call) for call in message["calls"]][:64]
    return [] if run.launch is not None and run.launch.filter is not None else None


def _filter(spec: JailSpec, *, notify: bool = True) -> bytes | None:
    """The jail's system call filter, as a program (``None``: unconfined)."""
    base, allow, deny = spec.syscalls
    if base == "unconfined":
        return None
    return seccomp.program(seccomp.Policy(base == "nested", frozenset(allow), frozenset(deny)), notify=notify)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _setup_error(message: dict[str, Any]) -> JailSetupError:
    return JailSetupError(message["step"], message.get("errno"), message["detail"], message.get("path"))


def _records(spec: JailSpec) -> bool:
    """What it tries to reach outside is recorded and refused, unless it may reach everything."""
    return spec.net != "host" and spec.way_out != ()


class _Prepared:
    """The next test body's jail, built while the current body runs (one per process).

    A test body's jail does not depend on the test (its ``tmp_path`` is made writable as the body
    enters): after a body enters its jail, the next one is started with the same recipe, off the
    critical path. The next :meth:`Jail.start_call` takes it if the recipe and the plan (the host
    as it is now) match, else it is ended and a jail is built on demand. Nobody ran anything in a
    prepared jail: it is as new as one built on demand, and a body closes every descriptor of it.
    """

    def __init__(self) -> None:
        self.call: Call | None = None
        self.recipe: tuple[Any, ...] | None = None
        os.register_at_fork(after_in_child=self._forget)

    def prepare(self, jail: Jail, recipe: tuple[Any, ...], cwd: str | None) -> None:
        self.discard()
        if budget() is not None:  # a jail waiting would take from the memory the running test shares
            return
        try:
            run = jail._launch(jail.spec, cwd=cwd, defer_map=True)
        except Exception:  # noqa: BLE001 - the next test builds its own jail, and reports what fails
            return
        self.call, self.recipe = Call(jail, run), recipe
        _finish_at_exit()

    def side(self) -> tuple[int, Callable[[], None]] | None:
        """While a body runs: the prepared jail's wire, to answer its id-map request on."""
        if self.call is None or not self.call._run.map_pending or self.call._run.status < 0:
            return None
        return self.call._run.status, self.service

    def service(self) -> None:
        """Write the prepared jail's id map (root mode): its helper waits for it to go on."""
        call = self.call
        if call is None or not call._run.map_pending:
            return
        try:
            call._jail._write_root_map(call._run, call._run.rootfs)
        except Exception:  # noqa: BLE001 - a jail that cannot be built is built again, and reports
            self.discard()

    def take(self, recipe: tuple[Any, ...], plan: list[Any]) -> Call | None:
        self.service()
        call, self.call = self.call, None
        if call is None:
            return None
        launch = call._run.launch
        if self.recipe == recipe and launch is not None and launch.plan is plan and not call._run.finished:
            try:
                call._wait_ready()
                return call
            except JailError:  # died meanwhile (an OOM kill in a shared memory budget): build anew
                pass
        call.kill()
        return None

    def discard(self) -> None:
        call, self.call = self.call, None
        if call is not None:
            with contextlib.suppress(Exception):
                call.kill()

    def _forget(self) -> None:  # a forked child (a body): the parent's jail is not its own
        self.call = None


_PREPARED = _Prepared()


def _status(run: _Run) -> int | None:
    for message in run.messages:
        if message["kind"] == "exit":
            return int(message["status"])
    return None


def _release(steps: list[tuple[str, Callable[[], object]]]) -> None:
    """Run every teardown step whatever the others did; each failure is a :class:`JailWarning`."""
    for step, do in steps:
        try:
            do()
        except Exception as exc:  # noqa: BLE001 - every step runs; each failure is named
            if step == "cgroup removal" and getattr(exc, "errno", None) == errno.EBUSY:
                where = getattr(exc, "filename", "")
                warnings.warn(f"jail teardown: its cgroup ({where}) still holds processes that SIGKILL does not "
                              f"end: {_STUCK}; they are left behind, the group to a later run's clean-up, and "
                              "pytest goes on", JailWarning, stacklevel=3)
            else:
                warnings.warn(f"jail teardown: {step} failed ({exc}); pytest goes on", JailWarning, stacklevel=3)


class _Later:
    """Teardowns finished off the critical path: a jail's helper to reap (it exits once init has,
    its mount namespace unmounted) and its cgroup to remove, once the result is known.

    Finished without waiting by every later launch and teardown, waited for when more than a few
    are pending, and at exit (bounded: a process that does not die is named, never waited for
    forever). Nothing is left behind: a pytest killed meanwhile takes its helpers with it, and
    its groups are removed by the next run's clean-up.
    """

    MOST = 4

    def __init__(self) -> None:
        self.pending: list[tuple[int, Group]] = []
        self.pid = os.getpid()

    def add(self, helper: int, group: Group) -> None:
        self._mine()
        self.pending.append((helper, group))
        _finish_at_exit()
        self.finish(wait=len(self.pending) > self.MOST)

    def finish(self, wait: bool = False) -> None:
        """Finish the teardowns whose helper has ended (``wait``: all of them)."""
        self._mine()
        left = []
        for helper, group in self.pending:
            if not wait:
                try:
                    if os.waitpid(helper, os.WNOHANG)[0] == 0:
                        left.append((helper, group))
                        continue
                except ChildProcessError:
                    pass
            else:
                _release([("reap", lambda h=helper, g=group: _reap_within(h, g.kill, "the jail"))])  # type: ignore[misc]
            _release([("cgroup kill", group.kill), ("cgroup removal", group.remove)])
        self.pending = left

    def _mine(self) -> None:
        if self.pid != os.getpid():  # a forked child (a test body): the parent finishes its own
            self.pending, self.pid = [], os.getpid()


_LATER = _Later()


_exit_hook_of: int | None = None  # the pid that registered it (a forked body registers its own)


def _finish_at_exit() -> None:
    """At exit: end the jail prepared ahead, then finish every teardown left. Registered when a
    jail first needs it, so it runs before the cgroup manager's own exit hook (registered when
    the first group was made) removes the parent groups (atexit runs the last registered first)."""
    global _exit_hook_of
    if _exit_hook_of != os.getpid():
        import atexit

        _exit_hook_of = os.getpid()
        atexit.register(_at_exit)


def _at_exit() -> None:
    _PREPARED.discard()
    _LATER.finish(wait=True)
