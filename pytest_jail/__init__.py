"""pytest-jail: run test bodies and commands in freshly cloned Linux jails."""

from __future__ import annotations

from ._errors import JailConfigError
from ._errors import JailError
from ._errors import JailProcessError
from ._errors import JailSetupError
from ._errors import JailTimeoutError
from ._errors import JailUnavailableError
from ._errors import JailWarning
from ._jail import Jail
from ._process import JailProcess
from ._result import JailResult
from ._spec import Bind
from ._spec import JailSpec

__all__ = [
    "Bind",
    "Jail",
    "JailConfigError",
    "JailError",
    "JailProcess",
    "JailProcessError",
    "JailResult",
    "JailSetupError",
    "JailSpec",
    "JailTimeoutError",
    "JailUnavailableError",
    "JailWarning",
]

for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
