"""A long-running command in its own jail (:meth:`Jail.spawn`): a service a test talks to."""

from __future__ import annotations

import signal
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from dataclasses import field
from types import TracebackType
from typing import final

from ._errors import JailConfigError
from ._errors import JailProcessError
from ._errors import JailSetupError
from ._errors import JailTimeoutError
from ._limits import usage_fields
from ._result import JailResult
from ._spec import JailSpec
from ._spec import format_size
from ._supervisor import Output
from ._supervisor import Supervisor
from ._supervisor import returncode as returncode_of

#: How much of each of a command's output streams is kept (``jail.run(..., output_limit=...)``).
DEFAULT_OUTPUT_LIMIT = 16 << 20


@dataclass
class Command:
    """A command started in a jail: its supervisor and output pipes, until :meth:`result`."""

    run: Supervisor
    args: list[str]
    spec: JailSpec
    stdout_fd: int
    stderr_fd: int
    stdin_fd: int | None
    data: bytes | None
    timed_out: bool = False
    output_limit: int = DEFAULT_OUTPUT_LIMIT
    outputs: dict[int, Output] = field(init=False)

    def __post_init__(self) -> None:
        self.outputs = {self.stdout_fd: Output(self.output_limit), self.stderr_fd: Output(self.output_limit)}

    @property
    def ip(self) -> str | None:
        return None if self.run.attachment is None else self.run.attachment.ip

    def output(self, fd: int) -> str:
        return bytes(self.outputs[fd].data).decode("utf-8", "replace")

    def collect(self) -> None:
        """Read its output until the jail is gone; kill it at its timeout."""
        self.timed_out = self.run.collect(self.spec.timeout, self.outputs, self.stdin_fd, self.data)

    def result(self) -> JailResult:
        """Reap the jail (after :meth:`collect`) and say how it ended."""
        run, timed_out = self.run, self.timed_out
        status = run.teardown()
        returncode = returncode_of(status)
        oom = run.usage is not None and run.usage.oom_kills > 0
        if not timed_out and not oom and not run.killed:
            # (With memory.oom.group on cgroup v2, the OOM killer takes init too: no status then.)
            run.raise_setup_error()
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
            cpu_time=run.cpu_time(),
            timeout=self.spec.timeout,
            blocked=run.blocked(),
            blocked_syscalls=run.refused(),
            **usage_fields(run.usage, self.spec),
        )


@final
class JailProcess:
    """A command running in its own jail, collected in the background (like :class:`subprocess.Popen`).

    ``ip`` is its address on a bridge (``None`` for ``net="none"`` and ``"host"``); ``stdout`` and
    ``stderr`` are its output so far. It runs until its command ends, its timeout, or
    :meth:`kill`; as a context manager it is terminated on exit.
    """

    def __init__(self, command: Command) -> None:
        self._command = command
        self.args = command.args
        self.ip = command.ip
        self.hostname = command.spec.hostname
        self.net = command.spec.net
        self._result: JailResult | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()  # the jail's pidfd is closed by the collector, used by kill()
        self._thread = threading.Thread(target=self._collect, name=f"jail.spawn {self.args[0]}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        state = "running" if self._result is None else f"returncode={self._result.returncode}"
        return f"<JailProcess {self.args!r} ip={self.ip} {state}>"

    # -- what it is doing ---------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The host's pid of the command (pid 2 in its jail), while it runs."""
        if self._result is not None or self._error is not None:
            return None  # its pid may be someone else's by now
        init = self._command.run.init_pid
        try:
            with open(f"/proc/{init}/task/{init}/children") as f:
                children = f.read().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    @property
    def stdout(self) -> str:
        return self._command.output(self._command.stdout_fd)

    @property
    def stderr(self) -> str:
        return self._command.output(self._command.stderr_fd)

    @property
    def returncode(self) -> int | None:
        """``None`` while it runs (as :meth:`subprocess.Popen.poll`)."""
        return None if self._result is None else self._result.returncode

    def wait(self, timeout: float | None = None) -> JailResult:
        """Wait for the jail to end; :class:`JailTimeoutError` if it still runs after ``timeout``."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise JailTimeoutError(f"jail.spawn({self.args!r}) still runs after {timeout}s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def wait_for_port(self, port: int, timeout: float = 10.0) -> None:
        """Wait until TCP ``port`` accepts connections in this jail (at ``ip``, or on the host's
        loopback for ``net="host"``); raise if the jail ends first or ``timeout`` passes."""
        if self.ip is None and self.net != "host":
            raise JailConfigError(
                f"jail.spawn({self.args!r}) has net={self.net!r}: nothing outside the jail can reach its ports; "
                "use net='bridge' (or 'bridge:NAME') to talk to it"
            )
        address = (self.ip or "127.0.0.1", port)
        deadline = time.monotonic() + timeout
        while True:
            with socket.socket() as probe:
                probe.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
                if probe.connect_ex(address) == 0:
                    return
            if not self._thread.is_alive():
                raise JailProcessError(self.wait())
            if time.monotonic() >= deadline:
                raise JailTimeoutError(f"nothing accepts on {address[0]}:{port} after {timeout}s ({self!r})")
            time.sleep(0.05)

    # -- stopping it --------------------------------------------------------------------------

    def terminate(self, grace: float = 5.0) -> JailResult:
        """SIGTERM the command; after ``grace`` seconds kill the whole jail. Returns its result.

        The signal goes through the jail's init, the command's parent: its pid cannot be someone
        else's before init reaps it (a pid read from /proc could be)."""
        if self._result is None:
            self._command.run.order(b"t")
            self._thread.join(grace)
        return self.kill()

    def kill(self) -> JailResult:
        """Kill the whole jail now (if it still runs) and return its result."""
        with self._lock:
            run = self._command.run
            if not run.finished:
                run.killed = True
                run.kill()
        return self.wait()

    def __enter__(self) -> JailProcess:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.terminate()

    # -- the collector thread -----------------------------------------------------------------

    def _collect(self) -> None:
        try:
            self._command.collect()
            with self._lock:
                self._result = self._command.result()
        except BaseException as exc:  # handed to wait()
            self._error = exc
            with self._lock:
                self._command.run.abandon()  # never a jail left running
