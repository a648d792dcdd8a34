"""In pytest's process: replay a jailed call phase from what its body sent back.

The body ran the call phase and made the report (:mod:`pytest_jail._remote`); here pytest's
process does what the phase would have done in place: the reports the body logged go through
``pytest_runtest_logreport`` (once, under xdist too), its warnings are raised again where
pytest records them, the state it changed is written back, coverage gets its lines, and the
call ends with an exception that stands in for the body's, so that every plugin that looks at
the call (``call.excinfo``) sees what happened.
"""

from __future__ import annotations

import copy
import importlib
import warnings
from typing import Any

import pytest


def report(config: pytest.Config, data: dict[str, Any]) -> pytest.TestReport:
    """A report the body serialized, as pytest's process's own object (a new one each time:
    pytest's deserializer takes its input apart)."""
    data = copy.deepcopy(data)
    for key in ("longrepr", "location"):  # JSON has no tuples; pytest expects these two as tuples
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])
    context = data.get("_subtest.context")
    made = config.hook.pytest_report_from_serializable(config=config, data=data)
    if not isinstance(made, pytest.TestReport):
        raise ValueError(f"not a test report: {type(made).__name__}")
    if isinstance(context, dict) and hasattr(made, "context"):
        # pytest 9 quotes a subtest's arguments again when it reads them (saferepr of saferepr):
        # keep them as the body wrote them, so they print as without the jail.
        object.__setattr__(made.context, "kwargs", dict(context.get("kwargs") or {}))
    return made


def check(item: pytest.Item, outcome: dict[str, Any]) -> None:
    """Raise if what a body sent is not an outcome this module can replay (its report is read
    once here, so a malformed one fails its test, never pytest): reports of this test's call
    phase only."""
    config = item.config
    shapes = {"report": dict, "exception": dict, "logreports": list, "warnings": list, "state": dict,
              "junitxml": dict, "coverage": dict, "exit": str, "interrupt": bool}
    for key, value in outcome.items():
        if key not in shapes or not (value is None or isinstance(value, shapes[key])):
            raise ValueError(f"{key!r} is {type(value).__name__}")
    for data in [outcome.get("report"), *(outcome.get("logreports") or [])]:
        if data is not None:
            made = report(config, data)
            if made.nodeid != item.nodeid or made.when != "call":
                raise ValueError(f"a report of {made.nodeid!r} ({made.when})")
    for warning in outcome.get("warnings") or []:
        if not (isinstance(warning, dict) and isinstance(warning.get("message"), str)
                and isinstance(warning.get("filename"), str) and isinstance(warning.get("lineno"), int)):
            raise ValueError(f"a warning {warning!r}")
    if outcome.get("exception") is not None:
        stand_in(outcome["exception"])


def replay(item: pytest.Item, outcome: dict[str, Any], own_keys: frozenset[Any], log: list[Any] | None) -> None:
    """Everything the body's call phase changed or logged, in the order it happened there.

    :param log: pytest's record of the test's warnings here (``_remote.warning_log``): the body's
        join it as they were recorded there, so pytest reports them at the end of the test.
    """
    restore_state(item, outcome.get("state") or {}, own_keys)
    _junitxml(item, outcome.get("junitxml"))
    _coverage(outcome.get("coverage"))
    for logged in outcome.get("logreports", []):
        made = report(item.config, logged)
        _count_failed_subtest(item.config, made)
        item.ihook.pytest_runtest_logreport(report=made)
    record(log, outcome.get("warnings", []))


def _count_failed_subtest(config: pytest.Config, made: pytest.TestReport) -> None:
    """pytest 9 counts a failed subtest where it runs, then fails a passing test that has one; the
    count is keyed by a node id object that cannot cross as data, so it is counted again here."""
    try:
        from _pytest.subtests import SubtestReport
        from _pytest.subtests import failed_subtests_key
    except ImportError:  # pytest 8: subtests are a plugin of their own
        return
    if isinstance(made, SubtestReport) and made.failed:
        key: Any = getattr(made, "id", made.nodeid)  # a NodeId since pytest 9.2, the node id before
        config.stash[failed_subtests_key][key] += 1


def restore_state(item: pytest.Item, changed: dict[str, Any], own: frozenset[Any]) -> None:
    """Write back the plain-data state the body changed (see ``_remote._state`` for the keys)."""
    stashes = {
        "item.stash": [k for k in _storage(item.stash) if k not in own],
        "config.stash": [k for k in _storage(item.config.stash) if k not in own],
    }
    for name, value in changed.items():
        where, _, key = name.partition(":")
        if where == "item":
            _assign(vars(item), key, value)
            continue
        keys = stashes[where]
        index = int(key)
        if index < len(keys):  # keys the body added have no counterpart here
            _assign(_storage(item.stash if where == "item.stash" else item.config.stash), keys[index], value)


def _storage(stash: pytest.Stash) -> dict[Any, Any]:
    storage: dict[Any, Any] = getattr(stash, "_storage", {})
    return storage


def _assign(container: dict[Any, Any], key: Any, value: Any) -> None:
    """In place where the types allow, so a ``defaultdict`` stays one and references hold."""
    old = container.get(key)
    if isinstance(old, dict) and isinstance(value, dict):
        old.clear()
        old.update(value)
    elif isinstance(old, list) and isinstance(value, list):
        old[:] = value
    elif isinstance(old, tuple) and isinstance(value, list):
        container[key] = tuple(value)
    else:
        container[key] = value


def _junitxml(item: pytest.Item, changes: dict[str, Any] | None) -> None:
    if not changes:
        return
    from _pytest.junitxml import xml_key

    xml = item.config.stash.get(xml_key, None)
    if xml is None:
        return
    xml.node_reporter(item.nodeid).attrs.update(changes["attrs"])
    xml.global_properties.extend(tuple(p) for p in changes["properties"])


def _coverage(measured: dict[str, Any] | None) -> None:
    """Merge the body's lines into this process's measurement; coverage saves them with its own
    (pytest-cov's combine step included), under the context that is current (the test's)."""
    if not measured:
        return
    import sys

    cov = sys.modules["coverage"].Coverage.current() if "coverage" in sys.modules else None
    collector = getattr(cov, "_collector", None)
    if collector is None:
        return
    for name, lines in measured["data"].items():
        target = collector.data.setdefault(name, set())
        target.update(tuple(x) if isinstance(x, list) else x for x in lines)
    collector.file_tracers.update(measured.get("file_tracers") or {})


def record(log: list[Any] | None, found: list[dict[str, Any]]) -> None:
    """Add the warnings the body recorded to pytest's record here, as the same messages."""
    if log is None:
        return
    for data in found:
        category = _resolve(data["category"])
        if not (isinstance(category, type) and issubclass(category, Warning)):
            category = UserWarning
        try:
            message = category(data["message"])
        except Exception:  # a warning class that wants other arguments
            message = UserWarning(data["message"])
        log.append(warnings.WarningMessage(message, type(message), data["filename"], data["lineno"]))


def _resolve(qualified: str) -> Any:
    module, _, name = qualified.partition(":")
    try:
        found: Any = importlib.import_module(module)
        for part in name.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError, ValueError):
        return None
    return found


def stand_in(description: dict[str, Any]) -> BaseException:
    """An exception of the body's exception's class (where it can be made here), with its text,
    arguments, plain attributes and chain, so ``isinstance`` and the message match.

    Its traceback is pytest-jail's: the report the body made already has the real one.
    """
    made: BaseException | None = None
    for link in reversed(description["chain"]):
        exc = _one(link)
        if made is not None:
            if link.get("cause"):
                exc.__cause__ = made
            else:
                exc.__context__ = made
        made = exc
    assert made is not None
    return made


def _one(link: dict[str, Any]) -> BaseException:
    text = link["text"]
    cls = _resolve(link["class"])
    if isinstance(cls, type) and issubclass(cls, BaseException):
        try:
            standin: type[BaseException] = type(cls.__name__, (cls,), {
                "__str__": lambda self: text,
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
            })
            exc = standin.__new__(standin)
            exc.args = tuple(link["args"])
            for key, value in link["attrs"].items():
                setattr(exc, key, value)
            return exc
        except Exception:  # a class that cannot be subclassed or made without its arguments
            pass
    return JailedException(f"{link['class'].replace(':', '.')}: {text}")


class JailedException(Exception):
    """Stands in for an exception of a class pytest's process cannot make (one defined in the body)."""
