"""A long-running command in its own jail (:meth:`Jail.spawn`): a service a test talks to."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING
from typing import final

from ._errors import JailConfigError
from ._errors import JailProcessError
from ._errors import JailTimeoutError
from ._result import JailResult

if TYPE_CHECKING:
    from ._jail import Command


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
                self._command.jail._abandon(self._command.run)  # never a jail left running
