"""What a jail run produced: :class:`JailResult`, and how its ending reads in words."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from dataclasses import field


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
    timeout: float | None = field(default=None, repr=False)

    def verdict(self) -> str:
        """One line saying how the jail ended, as the report shows it."""
        if self.timed_out:
            return f"timed out after {self.timeout}s (wall clock); the whole jail was killed"
        if self.oom_killed:
            return "killed by the OOM killer"
        return describe_status(self.returncode)

    def check_returncode(self) -> None:
        """Raise :class:`JailProcessError` if the command failed, timed out or was killed."""
        if self.returncode != 0 or self.timed_out:
            from ._errors import JailProcessError

            raise JailProcessError(self)

    def _checked(self, check: bool) -> JailResult:
        if check:
            self.check_returncode()
        return self

