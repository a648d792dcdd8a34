"""Everything the engine keeps between jails, in one object per process.

:func:`host` makes it on first use; making it changes nothing on the host. Its parts are made
when a jail first needs them (the cgroup parents, the bridges), and :meth:`Host.close` ends them
all at exit, in order. A forked child (a test body) gets a Host of its own: the parent's jails,
groups and caches are not its own.
"""

from __future__ import annotations

import atexit
import os
import secrets
import weakref
from collections.abc import Callable
from typing import Any

from ._cgroups.detect import detect
from ._cgroups.manager import Manager
from ._cgroups.manager import Unavailable
from ._linux.net import Networks
from ._linux.net import clean_stale as clean_stale_networks
from ._pool import Pool
from ._teardown import Teardowns
from .rootfs import cache_dir
from .rootfs._build import remove_tree

__all__ = ["CheckedCache", "Host", "Reads", "host", "made_host"]


class Host:
    """One process's engine state: its cgroup parents, networks, running jails, the jail prepared
    ahead, teardowns left to finish, and what it learned of the host (validated caches)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.running: weakref.WeakSet[Any] = weakref.WeakSet()  # a body entering one closes all their handles
        self.pool = Pool()
        self.teardowns = Teardowns()
        self.plans = CheckedCache(64)  # mount plans, valid while the directories they listed are unchanged
        self.hygiene = CheckedCache(8)  # the host view's scratch dirs and hidden secrets
        self.memory_budget: int | None = None  # --jail-memory-total
        self.not_idmapped: dict[str, str] = {}  # rootfs directories this kernel could not id-map, and why
        self._facts = CheckedCache(128)
        self._cgroups: Manager | None = None
        self._cgroups_failure: Unavailable | None = None
        self._networks: Networks | None = None
        self._networks_cleaned = False
        self._layers: str | None = None  # this process's directory of on-disk writable layers
        self._layer_count = 0
        atexit.register(self.close)

    def fact(self, key: Any, learn: Callable[[], Any]) -> Any:
        """What ``learn`` says of the host, asked once per process (a kernel's answer to a probe)."""
        return self._facts.get(key, lambda reads: learn())

    def cgroups(self) -> Manager:
        """This process's cgroup parents, made on first use (removing what killed runs left);
        raises :class:`Unavailable` with the cause, every time once it failed."""
        if self._cgroups is None:
            if self._cgroups_failure is not None:
                raise self._cgroups_failure
            try:
                self._cgroups = Manager(detect())
            except Unavailable as exc:
                self._cgroups_failure = exc
                raise
            self._cgroups.set_budget(self.memory_budget)
        return self._cgroups

    def made_cgroups(self) -> Manager | None:
        return self._cgroups

    def clean_networks_once(self) -> None:
        """Remove what a killed earlier run left on the host's network (bridges, forwarding), once,
        when this process makes its first jail as root: a run that jails nothing changes nothing."""
        if not self._networks_cleaned:
            self._networks_cleaned = True
            clean_stale_networks()

    def networks(self) -> Networks:
        """This process's bridge segments, made on first use."""
        if self._networks is None:
            self.clean_networks_once()
            self._networks = Networks()
        return self._networks

    def disk_layer(self, owner: int | None) -> str | None:
        """A fresh, empty directory on disk for one jail's writable layer (owned by ``owner``), for
        kernels whose tmpfs keeps no ``user.*`` xattrs (before Linux 6.6), where overlayfs cannot
        record a replaced directory. Under this process's own directory of the cache, removed at
        exit (a killed run's by the next one); ``None`` if that filesystem keeps no xattrs either."""
        if self._layers is None:
            base = os.path.join(cache_dir(), "layers")
            os.makedirs(base, exist_ok=True)
            _remove_dead_layers(base)
            own = os.path.join(base, f"{os.getpid()}.{secrets.token_hex(4)}")
            os.mkdir(own, 0o755)
            try:
                os.setxattr(own, "user.pytest-jail", b"1")
            except OSError:
                os.rmdir(own)
                self._layers = ""
            else:
                self._layers = own
        if not self._layers:
            return None
        self._layer_count += 1
        path = os.path.join(self._layers, f"j{self._layer_count}")
        os.mkdir(path, 0o755)
        if owner is not None:
            os.chown(path, owner, owner)
        return path

    def close(self) -> None:
        """End everything, in order: the jail prepared ahead, teardowns left (bounded), the
        networks, then the cgroup parents those jails lived in. Only in the process it belongs to."""
        if os.getpid() != self.pid:
            return
        self.pool.discard()
        self.teardowns.finish(wait=True)
        if self._networks is not None:
            self._networks.close()
        if self._cgroups is not None:
            self._cgroups.close()
        if self._layers:
            remove_tree(self._layers)


def _remove_dead_layers(base: str) -> None:
    """Remove the layer directories of runs whose process is gone (killed before their exit)."""
    for name in os.listdir(base):
        try:
            pid = int(name.split(".")[0])
        except ValueError:
            continue
        if not os.path.exists(f"/proc/{pid}"):
            remove_tree(os.path.join(base, name))


_current: Host | None = None


def host() -> Host:
    """This process's :class:`Host`, made on first use."""
    global _current
    if _current is None or _current.pid != os.getpid():
        _current = Host()
    return _current


def made_host() -> Host | None:
    """This process's Host if one was made (a report header must not make one's parts)."""
    return _current if _current is not None and _current.pid == os.getpid() else None


class Reads:
    """The filesystem reads a computation made, with what each returned, so a cached result can
    be checked against the filesystem as it is now (a rootfs rebuilt, a ``~/.aws`` created since)
    at the cost of those few system calls, not of the computation."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, str, Any]] = []

    def wrap(self, read: Any) -> Any:
        def recorded(path: str) -> Any:
            result = _outcome(read, path)
            self.seen.append((read, path, result))
            if isinstance(result, OSError):
                raise result
            return result

        return recorded

    def still_hold(self) -> bool:
        return all(_same(_outcome(read, path), result) for read, path, result in self.seen)


def _outcome(read: Any, path: str) -> Any:
    try:
        return read(path)
    except OSError as exc:
        return exc


def _same(now: Any, then: Any) -> bool:
    if isinstance(now, OSError) or isinstance(then, OSError):
        return type(now) is type(then) and getattr(now, "errno", None) == getattr(then, "errno", None)
    return bool(now == then)


class CheckedCache:
    """Results keyed by their arguments, each returned only while the reads behind it still hold."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: dict[Any, tuple[Any, Reads]] = {}

    def get(self, key: Any, compute: Callable[[Reads], Any]) -> Any:
        hit = self.entries.get(key)
        if hit is not None and hit[1].still_hold():
            return hit[0]
        reads = Reads()
        value = compute(reads)
        if len(self.entries) >= self.size:
            self.entries.pop(next(iter(self.entries)))
        self.entries[key] = (value, reads)
        return value
