"""Architecture guards: pytest stays at the edge, pyroute2 stays in one module, the API is pinned."""

from __future__ import annotations

import ast
import pathlib

import pytest_jail

PACKAGE = pathlib.Path(pytest_jail.__file__).parent


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


#: The modules that translate between pytest and the engine (DESIGN.md, "Architecture").
PYTEST_EDGE = {"plugin.py", "hooks.py", "_remote.py", "_replay.py"}


def _relative_imports(path: pathlib.Path) -> set[str]:
    return {
        (node.module or "").split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level > 0
    } | {
        alias.name for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level > 0 and not node.module for alias in node.names
    }


def test_only_the_pytest_edge_imports_pytest() -> None:
    """The engine works without pytest: only the edge imports it, and nothing else imports the edge."""
    offenders = {p.name for p in PACKAGE.rglob("*.py") if {"pytest", "_pytest"} & _imports(p)}
    assert offenders <= PYTEST_EDGE
    edge = {name.removesuffix(".py") for name in PYTEST_EDGE}
    engine = [p for p in PACKAGE.rglob("*.py") if p.name not in PYTEST_EDGE]
    assert {p.name for p in engine if edge & _relative_imports(p)} == set()


def test_only_net_module_imports_pyroute2() -> None:
    """All netlink work lives in _linux/net.py."""
    offenders = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "pyroute2" in _imports(p)}
    assert offenders <= {"_linux/net.py"}


def test_only_syscalls_module_uses_ctypes() -> None:
    """ctypes appears in exactly one file."""
    offenders = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "ctypes" in _imports(p)}
    assert offenders == {"_linux/syscalls.py"}


def test_public_api_is_pinned() -> None:
    """The export list is curated, sorted and names the package as each class's module."""
    assert pytest_jail.__all__ == [
        "Bind", "Jail", "JailConfigError", "JailError", "JailProcess", "JailProcessError", "JailResult",
        "JailSetupError", "JailSpec", "JailTimeoutError", "JailUnavailableError", "JailWarning",
    ]
    assert all(getattr(pytest_jail, n).__module__ == "pytest_jail" for n in pytest_jail.__all__)
