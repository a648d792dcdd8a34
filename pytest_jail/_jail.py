"""The engine's facade, free of pytest: a :class:`Jail` is a recipe; each run or call makes a plan
and starts a :class:`~pytest_jail._supervisor.Supervisor` for the one jail it builds.

Parent side of the process tree ``caller -> helper -> init (pid 1) -> payload (pid 2)``; the child
side is :mod:`pytest_jail._child`. The orchestration reads as a checklist in :meth:`Jail._launch`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from collections.abc import Sequence
from posix import _exit  # the real one: coverage's patch=_exit would save from our children
from typing import Any
from typing import NoReturn
from typing import final

from . import _child
from . import _wire
from ._errors import JailConfigError
from ._errors import JailSetupError
from ._fork import fork as _fork
from ._host import host
from ._host import made_host
from ._limits import cgroup_for
from ._limits import usage_fields
from ._linux import seccomp
from ._linux.mounts import Exposure
from ._linux.net import Attachment
from ._probe import overlay_by_parent
from ._probe import try_in_namespaces
from ._process import DEFAULT_OUTPUT_LIMIT
from ._process import Command
from ._process import JailProcess
from ._result import JailResult
from ._spec import JailSpec
from ._spec import parse_size
from ._supervisor import Output
from ._supervisor import Supervisor
from ._supervisor import close_all
from ._supervisor import returncode
from ._view import ROOT_MAP_BASE
from ._view import ROOT_MAP_SIZE
from ._view import bind_sources
from ._view import check_layer
from ._view import check_readable_by_jail
from ._view import idmapped_lower
from ._view import idmapped_tree
from ._view import jail_cwd
from ._view import overlay_tree
from ._view import plan_for
from ._view import reserve_address
from ._view import resolve_rootfs
from ._view import runtime_paths
from ._view import uses_root_map
from .rootfs._build import remove_tree

__all__ = ["ROOT_MAP_BASE", "Call", "Jail", "runtime_paths", "set_memory_budget", "uses_root_map"]


def set_memory_budget(memory: int | None) -> None:
    """Memory for all of this process's jails together (``--jail-memory-total``): applied to their
    common parent group when the first jail makes it; no jail is prepared ahead then."""
    host().memory_budget = memory


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
            command.run.abandon()
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
        return Command(run, list(argv), spec, out_r, err_r, in_w, data, output_limit=limit)

    def start_call(self, *, cwd: str | None = None) -> Call:
        """Build a jail for a function of this process, ready for :meth:`Call.fork` to enter.

        Everything that can fail because of the host fails here, before the function runs::

            call = Jail(spec).start_call()
            if call.fork():              # in the jail, as pid 2: the rest of this stack runs there
                call.finish({"value": work()})
            call.wait(timeout=10)        # here: call.outcome, call.result(...)
        """
        key = self._recipe(cwd)
        prepared = host().pool.take(key, self._plan_now(self.spec)) if key is not None else None
        call = prepared if isinstance(prepared, Call) else None
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

    def _launch(self, spec: JailSpec, *, cwd: str | None, defer_map: bool = False, **payload: Any) -> Supervisor:
        host().teardowns.finish()  # earlier jails' teardowns that are done by now
        root_map = uses_root_map()
        if root_map:
            host().clean_networks_once()  # what a killed run left on the host's network (cgroups: the manager)
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
                host().networks().release(attachment)  # (a no-op when the run already released it)
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
    ) -> Supervisor:
        layer = self.layer if rootfs is not None else None
        # A layer on disk that goes with the jail: where an old kernel's tmpfs keeps no xattrs, and
        # where the parent makes the overlay (before 5.11, overlayfs takes no upper layer on a
        # detached tmpfs: it must be in the parent's mount namespace, and the host's is not ours).
        scratch = None
        by_parent = rootfs is not None and overlay_by_parent(root_map)
        if rootfs is not None and layer is None and (by_parent or try_in_namespaces().get("xattr", "ok") != "ok"):
            scratch = layer = host().disk_layer(ROOT_MAP_BASE if root_map else None)
        if layer is not None:
            check_layer(layer)
        record = _records(spec)
        plan = self._plan(spec, rootfs, exposures, root_map, layer)
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
                host().networks().release(attachment)
            if scratch is not None:
                remove_tree(scratch)
            raise JailSetupError("fork", exc.errno, exc.strerror or str(exc)) from None
        for fd in (status_w, control_r):
            os.close(fd)
        engine = host()
        run = Supervisor(pid, status_r, control_w, started, engine.teardowns, networks=engine.networks, group=group,
                         attachment=attachment, launch=launch, memory=spec.memory, layer=layer, rootfs=rootfs,
                         scratch_layer=scratch is not None,
                         overlay_size=spec.tmpfs_size if by_parent else None, overlay_by_parent=by_parent)
        engine.running.add(run)
        try:
            if root_map and defer_map:
                run.map_pending = True  # written when the helper asks (see Pool.service)
            elif root_map:
                self._write_root_map(run, rootfs)
            if attachment is not None:
                self._connect(run, attachment)
        except BaseException:
            run.abandon()
            raise
        return run

    def _plan(self, spec: JailSpec, rootfs: str | None, exposures: tuple[Exposure, ...], root_map: bool,
              layer: str | None = None) -> list[Any]:
        layer = layer if rootfs is not None else None
        binds = tuple(b.target for b in spec.binds)
        by_parent = rootfs is not None and overlay_by_parent(root_map)
        return plan_for(rootfs, exposures, root_map, spec.tmpfs_size, None if by_parent else layer, binds,
                        _records(spec), own_net=spec.net != "host", overlay_made=by_parent)

    def _plan_now(self, spec: JailSpec) -> list[Any]:
        """The plan a jail of this recipe would get now (the host may have changed since one was
        prepared: a secret created in the home directory is hidden from the next jail)."""
        exposures = self.exposures + tuple(Exposure(b.source, b.target, b.writable) for b in spec.binds)
        return self._plan(spec, resolve_rootfs(spec.rootfs), exposures, uses_root_map(), self.layer)

    def _connect(self, run: Supervisor, attachment: Attachment) -> None:
        """Plug the jail into its segment once its network namespace exists; then let init go on."""
        message = run.next_message("init")
        if message is None or run.init is None:
            run.teardown()
            run.raise_setup_error()
            raise JailSetupError("network", None, "the jail ended before its network could be set up")
        host().networks().connect(attachment, f"/proc/{message['pid']}/ns/net")
        os.write(run.control, b"n")

    def _write_root_map(self, run: Supervisor, rootfs: str | None) -> None:
        run.map_pending = False
        message = run.next_message("map")
        if message is None:
            run.teardown()
            run.raise_setup_error()
            raise JailSetupError("user namespace id map", None, "the helper ended before asking for its id map")
        mapping = f"0 {ROOT_MAP_BASE} {ROOT_MAP_SIZE}".encode()
        for name in ("uid_map", "gid_map"):
            fd = os.open(f"/proc/{run.pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, mapping)
            finally:
                os.close(fd)
        userns = f"/proc/{run.pid}/ns/user"
        if rootfs is not None and run.overlay_by_parent:
            tree: int | None = overlay_tree(rootfs, run.layer, run.overlay_size, run.launch.plan if run.launch else [])
        else:
            tree = None if rootfs is None else idmapped_lower(rootfs, userns)
        trees = [idmapped_tree(path, userns, quiet=True) for path in run.launch.mapped] if run.launch else []
        fds = [t for t in [tree, *trees] if t is not None]
        flags = ("r" if tree is not None else "-") + "".join("0" if t is None else "1" for t in trees)
        try:
            with socket.socket(fileno=os.dup(run.control)) as control:
                socket.send_fds(control, [b"m" + flags.encode()], fds)
        finally:
            for fd in fds:
                os.close(fd)


@final
class Call:
    """A jail built for a function of this process: :meth:`fork` enters it, :meth:`wait` collects.

    The function is not started in the jail ahead of time: the caller forks at the moment it
    runs it, so the jailed copy starts from this process as it is then (a test's item after its
    setup phase and setup report, its fixtures' values), and runs the rest of the caller's stack
    as pid 2 of the jail.
    """

    def __init__(self, jail: Jail, run: Supervisor) -> None:
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
        named = self._run.next_message("init") is not None and self._run.init is not None
        if named:
            with socket.socket(fileno=os.dup(self._run.control)) as control:
                _, self._namespaces, _, _ = socket.recv_fds(control, 1, 8)
            for fd in self._namespaces:
                os.set_inheritable(fd, False)
        if not named or self._run.next_message("ready") is None:
            self.kill()
            self._run.raise_setup_error()
            raise JailSetupError("start", None, "the jail ended before the test body was ready")

    def _reap_entering(self) -> None:
        """Reap the process that entered the jail, once its body is gone (bounded)."""
        if self._entering:
            host().teardowns.reap_within(self._entering, self._run.kill, "the test body's jail")
            self._entering = 0

    # -- a jail prepared ahead (see _pool.Prepared) ---------------------------------------------

    def plan(self) -> Sequence[Any] | None:
        return None if self._run.launch is None else self._run.launch.plan

    def map_wanted(self) -> int | None:
        """Root mode: the wire on which its helper asks for its id map, while it waits for it."""
        run = self._run
        return run.status if run.map_pending and run.status >= 0 else None

    def write_map(self) -> None:
        self._jail._write_root_map(self._run, self._run.rootfs)

    def ready(self) -> None:
        self._wait_ready()

    def alive(self) -> bool:
        return not self._run.finished

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
            close=(channel_r, crash_r, *(fd for r in list(host().running) for fd in r.descriptors())),
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
        close_all(self._namespaces)  # the fork that enters has them; nobody else may
        self._entering = pid
        self._outputs = {channel_r: Output(2 * _wire.MAX_FRAME), crash_r: Output(_LAST_WORDS, tail=True)}
        engine = host()
        # While the body runs: the next test's jail, likely the same (not with a memory budget:
        # a jail waiting would take from the memory the running test shares).
        if self._recipe is not None and engine.memory_budget is None:
            jail, cwd = self._jail, self._cwd
            engine.pool.prepare(self._recipe, lambda: Call(jail, jail._launch(jail.spec, cwd=cwd, defer_map=True)))
        return False

    # -- inside -------------------------------------------------------------------------------

    crash_fd = -1  #: inside: a descriptor for last words (``faulthandler.enable(file=...)``)

    def finish(self, outcome: dict[str, Any]) -> NoReturn:
        """Inside: send ``outcome`` to the caller and end the jailed copy, never returning."""
        code = 1
        try:
            engine = made_host()
            if engine is not None:  # jails the body ran itself: their teardowns, their groups
                with contextlib.suppress(Exception):
                    engine.close()
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
        self.timed_out = run.read_until_closed(self._outputs, timeout, side=host().pool.side())
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
        self._reap_entering()
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
            blocked=self._run.blocked(),
            blocked_syscalls=self.refused if self._run.launch and self._run.launch.filter else None,
            **usage_fields(self._run.usage, spec),
        )

    @property
    def cpu_time(self) -> float | None:
        return self._run.cpu_time()

    @property
    def returncode(self) -> int | None:
        return None if self.status is None else returncode(self.status)

    def kill(self) -> None:
        """End the jail (the body is over, or never came) and reap it; safe to call twice."""
        run = self._run
        close_all(self._namespaces)
        if self._entering:  # a body still running: it goes with the jail
            run.kill()
            self._reap_entering()
        if run.pid and not run.finished:
            try:
                os.write(run.control, b"e")  # init reports what was blocked and leaves
            except OSError:
                pass
            try:
                run.collect(run.teardowns.grace, since=time.monotonic())
            except BaseException:
                run.abandon()
                raise
        run.abandon()


#: How much of a dying body's last words the report keeps.
_LAST_WORDS = 64 * 1024




def _filter(spec: JailSpec, *, notify: bool = True) -> bytes | None:
    """The jail's system call filter, as a program (``None``: unconfined)."""
    base, allow, deny = spec.syscalls
    if base == "unconfined":
        return None
    return seccomp.program(seccomp.Policy(base == "nested", frozenset(allow), frozenset(deny)), notify=notify)


def _records(spec: JailSpec) -> bool:
    """What it tries to reach outside is recorded and refused, unless it may reach everything."""
    return spec.net != "host" and spec.way_out != ()


