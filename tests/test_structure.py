"""The package's structure as DESIGN.md states it: which modules may import what, and where the
engine keeps its state (pure logic: no jail is built here)."""

from __future__ import annotations

import ast
import functools
import importlib
import os
import pkgutil
import weakref
from types import ModuleType

import pytest

import pytest_jail

PACKAGE = os.path.dirname(pytest_jail.__file__)

#: Who may import which third-party module (the rest of the engine works without them).
ONLY_IN = {
    "pytest": {"plugin.py", "hooks.py", "_remote.py", "_replay.py"},
    "_pytest": {"plugin.py", "hooks.py", "_remote.py", "_replay.py"},
    "pyroute2": {"_linux/net.py"},
    "ctypes": {"_linux/syscalls.py"},
}

#: Module-level memory that is not the engine's: each says why it is not in the Host.
NOT_ENGINE_STATE = {
    ("pytest_jail._spec", "_warned_owners"): "the config layer's warn-once memory (one warning per rootfs)",
    ("pytest_jail.rootfs", "_known_current"): "the rootfs builders' memo of trees found up to date",
    ("pytest_jail._host", "_current"): "the one Host of this process",
    ("pytest_jail._linux.seccomp", "_program"): "a pure function's memo (a policy's BPF program), no host fact",
    ("pytest_jail.rootfs.busybox", "recipe"): "the rootfs builders' memo of a busybox binary's recipe",
}


def _modules() -> list[ModuleType]:
    names = ["pytest_jail"] + [m.name for m in pkgutil.walk_packages(pytest_jail.__path__, "pytest_jail.")]
    return [importlib.import_module(name) for name in names]


def _imports(path: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def _sources() -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(root, name), PACKAGE)
        for root, _, names in os.walk(PACKAGE)
        for name in names
        if name.endswith(".py")
    )


@pytest.mark.parametrize("library", sorted(ONLY_IN))
def test_a_library_is_imported_only_where_design_says(library: str) -> None:
    users = {path for path in _sources() if library in _imports(os.path.join(PACKAGE, path))}
    assert users <= ONLY_IN[library], f"{library} imported by {sorted(users - ONLY_IN[library])}"


def test_the_engine_keeps_its_state_in_one_object() -> None:
    """Every cache, registry and handle of the engine lives in the process's Host (a forked body
    gets a fresh one); no module keeps a mutable global or an lru_cache of host facts."""
    found = []
    for module in _modules():
        for name, value in vars(module).items():
            if name.startswith("__") or isinstance(value, (type, ModuleType)):
                continue  # dunders, classes and imported modules
            registry = (list, set, bytearray, weakref.WeakSet, weakref.WeakValueDictionary)
            table = name.lstrip("_").isupper()  # a CONSTANT table may be a dict; a registry is state
            mutable = isinstance(value, registry) or (isinstance(value, dict) and not table)
            cached = isinstance(value, functools._lru_cache_wrapper) and getattr(value, "__module__", "") == module.__name__
            state = not callable(value) and type(value).__module__.startswith("pytest_jail.")
            key = (module.__name__, name)
            if (mutable or cached or state) and key not in NOT_ENGINE_STATE:
                found.append(f"{module.__name__}.{name} ({type(value).__name__})")
    assert not found, "module-level state outside the Host: " + ", ".join(found)


def test_a_forked_child_gets_a_host_of_its_own() -> None:
    from pytest_jail._host import host

    mine = host()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write, b"fresh" if host() is not mine and host().pid == os.getpid() else b"shared")
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 16) == b"fresh"
    os.close(read)
    os.waitpid(pid, 0)
    assert host() is mine
