"""The error tree of pytest-jail.

::

    JailError (Exception)
    ├── JailConfigError (ValueError)          a bad marker, ini or CLI value; names its source
    ├── JailUnavailableError                  this host cannot provide a feature; reason + remedy
    ├── JailSetupError (OSError)              a setup step failed; names the step and the path
    │                                         (with ENOENT also a FileNotFoundError, with EACCES or
    │                                         EPERM a PermissionError, as OSError itself maps them)
    ├── JailTimeoutError (TimeoutError)       the wall-clock limit killed the jail
    └── JailProcessError (subprocess.CalledProcessError)   a command failed; carries .result

    JailWarning (UserWarning)                 worth fixing, not worth failing (a rootfs others own)

Every class survives ``pickle`` (xdist and the jail's own wire both move errors between
processes).
"""

from __future__ import annotations

import errno as _errno
import subprocess
from typing import TYPE_CHECKING
from typing import Any

if TYPE_CHECKING:
    from ._result import JailResult


class JailError(Exception):
    """Base class of every error pytest-jail raises."""


class JailWarning(UserWarning):
    """Something about a jail the user should know and may want to fix (a rootfs another user owns)."""


class JailConfigError(JailError, ValueError):
    """A marker, ini or command-line value is wrong: ``message`` says what, where and what is allowed."""


class JailUnavailableError(JailError):
    """This host cannot provide what the jail needs."""

    def __init__(self, reason: str, remedy: str) -> None:
        super().__init__(reason, remedy)
        self.reason = reason
        self.remedy = remedy

    def __str__(self) -> str:
        return f"{self.reason}; {self.remedy}"


class JailSetupError(JailError, OSError):
    """A step of building the jail failed (``jail.run(["no-such-program"])`` included)."""

    def __new__(cls, step: str, errno: int | None, detail: str, path: str | None = None) -> JailSetupError:
        if cls is JailSetupError:  # as OSError(ENOENT, ...) is a FileNotFoundError
            cls = _BY_ERRNO.get(errno or 0, cls)
        made: JailSetupError = OSError.__new__(cls, errno, detail)
        return made

    def __init__(self, step: str, errno: int | None, detail: str, path: str | None = None) -> None:
        OSError.__init__(self, errno, detail)
        self.step = step
        self.detail = detail
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.step, self.errno, self.detail, self.path))

    def __str__(self) -> str:
        where = f" ({self.path})" if self.path else ""
        return f"jail setup failed at step {self.step!r}{where}: {self.detail}"

    def __repr__(self) -> str:
        return f"JailSetupError({self.step!r}, {self.errno!r}, {self.detail!r}, {self.path!r})"


class _SetupNotFound(JailSetupError, FileNotFoundError):
    """A :class:`JailSetupError` with ENOENT (a program that is not there)."""


class _SetupPermission(JailSetupError, PermissionError):
    """A :class:`JailSetupError` with EACCES or EPERM."""


_BY_ERRNO: dict[int, type[JailSetupError]] = {
    _errno.ENOENT: _SetupNotFound, _errno.EACCES: _SetupPermission, _errno.EPERM: _SetupPermission,
}


class JailTimeoutError(JailError, TimeoutError):
    """Waiting for a jail took longer than asked.

    ``Jail.run`` does not raise it: a timed-out run returns a result with ``timed_out`` set, so
    the output so far is kept (and ``check=True`` raises :class:`JailProcessError`).
    """


class JailProcessError(JailError, subprocess.CalledProcessError):
    """A command in the jail failed; ``result`` is its :class:`JailResult`."""

    def __init__(self, result: JailResult) -> None:
        subprocess.CalledProcessError.__init__(
            self, result.returncode, result.args, result.stdout, result.stderr
        )
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.result,))

    def __str__(self) -> str:
        return f"{subprocess.CalledProcessError.__str__(self)} in the jail: {self.result.verdict()}"
