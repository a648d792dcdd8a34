"""What every rootfs builder shares: the stamp that makes it idempotent, the atomic swap into place,
and progress lines.

A tree we built carries a stamp, ``/.pytest-jail-rootfs``: the recipe it was built from. Building
the same recipe into it again does nothing; a different recipe rebuilds it beside the old one and
swaps it in, so a jail never sees half a tree. A directory without the stamp is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from typing import TextIO

from .._errors import JailConfigError

STAMP = ".pytest-jail-rootfs"

Progress = Callable[[str], None]


def quiet(message: str) -> None:
    """A progress callback that says nothing."""


class Lines:
    """Progress on a stream: on a terminal one line rewritten in place, else one line per step."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._width = 0

    def __call__(self, message: str) -> None:
        if self.tty:
            line = message[:120]
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self.stream.write(message + "\n")
        self.stream.flush()

    def done(self, message: str) -> None:
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(message + "\n")
        self.stream.flush()


def read_stamp(target: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(target, STAMP)) as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def is_current(target: str, recipe: dict[str, Any]) -> bool:
    """True when ``target`` holds a tree built from exactly ``recipe``."""
    return read_stamp(target) == recipe


@contextmanager
def building(target: str, recipe: dict[str, Any], mode: int = 0o755) -> Iterator[str]:
    """Yield an empty directory beside ``target`` to build in; on success it replaces ``target``.

    ``target`` must be absent, empty, or a tree pytest-jail built (it has the stamp). On any error
    the half-built tree is removed. ``mode`` is the tree's own: 0700 for a tree root builds from
    packages or images, whose set-uid programs no user of the host should reach (jails reach it
    through descriptors the parent opens as root).
    """
    target = os.path.abspath(target)
    _check_replaceable(target)
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
        partial = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.partial-", dir=parent)
    except OSError as exc:
        raise JailConfigError(f"cannot build {target}: {parent} is not writable here ({exc.strerror}); "
                              "choose a directory you may write, e.g. under your home") from None
    try:
        os.chmod(partial, mode)
        yield partial
        with open(os.path.join(partial, STAMP), "w") as f:
            json.dump(recipe, f, indent=1, sort_keys=True)
            f.write("\n")
        _swap_in(partial, target)
    except BaseException:
        remove_tree(partial)
        raise


def _check_replaceable(target: str) -> None:
    if os.path.islink(target) or (os.path.lexists(target) and not os.path.isdir(target)):
        raise JailConfigError(f"{target} exists and is not a directory; choose a new or empty directory")
    if os.path.isdir(target) and os.listdir(target) and read_stamp(target) is None:
        raise JailConfigError(
            f"{target} is not empty and was not built by pytest-jail (no {STAMP} in it); "
            "choose a new or empty directory"
        )


def _swap_in(partial: str, target: str) -> None:
    if not os.path.lexists(target):
        os.rename(partial, target)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
    os.rmdir(old)
    os.rename(target, old)  # two renames: a jail starting now sees the old tree or the new one
    os.rename(partial, target)
    remove_tree(old)


def remove_tree(path: str) -> None:
    """Remove a tree even where its modes say no (a 0555 directory from an image, the 0000 work
    directory overlayfs leaves in a writable layer): each directory is made ours before entry."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        _make_ours(path)
        for parent, dirs, _ in os.walk(path):  # top-down: a directory's mode is fixed before entry
            for name in dirs:
                _make_ours(os.path.join(parent, name))
    shutil.rmtree(path)


def _make_ours(path: str) -> None:
    try:
        if not os.path.islink(path):
            os.chmod(path, 0o700)
    except OSError:
        pass


def remove_stale(parent: str, name: str) -> None:
    """Remove half-built or replaced trees a killed earlier build left beside ``name``."""
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        if entry.startswith((f".{name}.partial-", f".{name}.old-")):
            remove_tree(os.path.join(parent, entry))
