"""What a jail run produced: :class:`JailResult`, and how its ending reads in words."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from dataclasses import field

from ._spec import format_size


def format_size_rounded(size: int) -> str:
    """67100000 -> ``"64.0M"``: for measured sizes, which are rarely round."""
    for unit, scale in (("G", 1024**3), ("M", 1024**2), ("k", 1024)):
        if size >= scale:
            return format_size(size) if size % scale == 0 else f"{size / scale:.1f}{unit}"
    return str(size)


def describe_status(returncode: int) -> str:
    """``-9`` -> ``killed by signal 9 (SIGKILL)``; ``3`` -> ``exited with status 3``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-returncode} ({name})"
    return f"exited with status {returncode}"


@dataclass(frozen=True)
class JailResult:
    """The outcome of :meth:`Jail.run`, shaped like :class:`subprocess.CompletedProcess`.

    .. note:: ``stdout`` and ``stderr`` are always text (UTF-8, undecodable bytes replaced):
       tests compare strings far more often than bytes.
    """

    args: list[str]
    returncode: int
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    oom_killed: bool = False
    duration: float = 0.0
    peak_memory: int | None = None
    cpu_time: float | None = None
    pids_limit_hit: int = 0  # forks refused at the process limit
    blocked: list[str] | None = None  # what it tried to reach outside; None: not recorded (net="host")
    blocked_syscalls: list[str] | None = None  # what the system call filter refused; None: no filter
    stdout_dropped: int = 0  # bytes of output beyond the output limit, counted and dropped
    stderr_dropped: int = 0
    timeout: float | None = field(default=None, repr=False)
    memory_limit: int | None = field(default=None, repr=False)
    memory_budget: int | None = field(default=None, repr=False)
    pids_limit: int | None = field(default=None, repr=False)

    def verdict(self) -> str:
        """One line saying how the jail ended, as the report shows it."""
        if self.timed_out:
            return f"timed out after {self.timeout}s (wall clock); the whole jail was killed"
        if self.oom_killed:
            limit = "" if self.memory_limit is None else f"memory limit {format_size(self.memory_limit)}, "
            if self.memory_limit is None and self.memory_budget is not None:
                limit = f"memory budget of this pytest process {format_size(self.memory_budget)}, "
            peak = "unknown" if self.peak_memory is None else format_size_rounded(self.peak_memory)
            return f"killed by the OOM killer ({limit}peak {peak})"
        if self.pids_limit_hit:
            return (f"process limit reached (pids {self.pids_limit}): fork failed {self.pids_limit_hit} "
                    f"time{'s' if self.pids_limit_hit != 1 else ''}; {describe_status(self.returncode)}")
        return describe_status(self.returncode)

    def blocked_line(self) -> str | None:
        """``network access blocked: tcp 93.184.216.34:443, dns example.com``, or ``None``."""
        if not self.blocked:
            return None
        return f"network access blocked: {', '.join(self.blocked)}"

    def syscalls_line(self) -> str | None:
        """``blocked system call bpf (seccomp)``, or ``None``."""
        if not self.blocked_syscalls:
            return None
        plural = "s" if len(self.blocked_syscalls) > 1 else ""
        return f"blocked system call{plural} {', '.join(self.blocked_syscalls)} (seccomp)"

    def check_returncode(self) -> None:
        """Raise :class:`JailProcessError` if the command failed, timed out or was killed."""
        if self.returncode != 0 or self.timed_out:
            from ._errors import JailProcessError

            raise JailProcessError(self)

    def _checked(self, check: bool) -> JailResult:
        if check:
            self.check_returncode()
        return self

