"""The next test body's jail, built while the current body runs.

A test body's jail does not depend on the test (its ``tmp_path`` is made writable as the body
enters): after a body enters its jail, the next one is started with the same recipe, off the
critical path. The next ``Jail.start_call`` takes it if the recipe and the plan (the host as it
is now) match, else it is ended and a jail is built on demand. Nobody ran anything in a prepared
jail: it is as new as one built on demand, and a body closes every descriptor of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import Protocol

from ._errors import JailError

__all__ = ["Pool", "Prepared"]


class Prepared(Protocol):
    """What the pool needs of a jail built ahead (a ``Call`` before its ``fork``)."""

    def plan(self) -> Sequence[Any] | None: ...
    def map_wanted(self) -> int | None: ...
    def write_map(self) -> None: ...
    def ready(self) -> None: ...
    def alive(self) -> bool: ...
    def kill(self) -> None: ...


class Pool:
    """At most one jail prepared ahead, with the recipe it was built from."""

    def __init__(self) -> None:
        self.call: Prepared | None = None
        self.recipe: tuple[Any, ...] | None = None

    def prepare(self, recipe: tuple[Any, ...], build: Callable[[], Prepared]) -> None:
        self.discard()
        try:
            call = build()
        except Exception:  # noqa: BLE001 - the next test builds its own jail, and reports what fails
            return
        self.call, self.recipe = call, recipe

    def side(self) -> tuple[int, Callable[[], None]] | None:
        """While a body runs: the prepared jail's wire, to answer its id-map request on."""
        fd = None if self.call is None else self.call.map_wanted()
        return None if fd is None else (fd, self.service)

    def service(self) -> None:
        """Write the prepared jail's id map (root mode): its helper waits for it to go on."""
        if self.call is None or self.call.map_wanted() is None:
            return
        try:
            self.call.write_map()
        except Exception:  # noqa: BLE001 - a jail that cannot be built is built again, and reports
            self.discard()

    def take(self, recipe: tuple[Any, ...], plan: list[Any]) -> Prepared | None:
        """The prepared jail, if it was built from ``recipe`` with this very ``plan`` and is ready."""
        self.service()
        call, self.call = self.call, None
        if call is None:
            return None
        if self.recipe == recipe and call.plan() is plan and call.alive():
            try:
                call.ready()
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
