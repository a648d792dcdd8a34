"""Hooks that pytest-jail adds to pytest (registered with ``pytest_addhooks``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from ._result import JailResult
    from ._spec import JailSpec


@pytest.hookspec(firstresult=True)
def pytest_jail_spec(item: pytest.Item, spec: JailSpec) -> JailSpec | None:
    """Change the jail of ``item`` before it is built: return a new :class:`JailSpec`, or ``None``.

    ``spec`` already holds the marker, command-line and ini settings; derive from it with
    ``spec.merged("my plugin", {...})`` so bad values name your plugin.
    """


def pytest_jail_result(item: pytest.Item, result: JailResult) -> None:
    """See how the jailed body of ``item`` ended (status, timeout, duration, CPU time)."""
