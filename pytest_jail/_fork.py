"""Forking this process, quietly and cheaply: the engine forks pytest's interpreter (a jail's
helper, a test body, a probe), never through :func:`os.fork` directly."""

from __future__ import annotations

import contextlib
import gc
import os
import warnings
from collections.abc import Callable

__all__ = ["fork"]


def fork(child: Callable[[], None]) -> int:
    """``os.fork()``; the child runs ``child`` first. The garbage collector's objects are frozen
    around it, so the child's first collection does not copy every page (gc.freeze docs)."""
    # Python 3.12 warns about fork() in a threaded process (pytest-xdist has one); what the child
    # runs is pytest code, as pytest-forked's children do. One filter for that message, added and
    # then removed by itself: warnings.catch_warnings() would put back the whole filter list,
    # undoing what another thread changed meanwhile (it is not thread-safe).
    warnings.filterwarnings("ignore", message=FORK_WARNING, category=DeprecationWarning)
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


FORK_WARNING = r"This process \(pid=\d+\) is multi-threaded, use of fork\(\) may lead to deadlocks"
