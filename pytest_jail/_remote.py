"""Inside a jailed test body: the rest of pytest's call phase, and what goes back to pytest.

The body is a fork of pytest made at the moment the call phase runs the test, so it starts from
the item exactly as its setup phase and setup report left it, with the capture mode, the hook
wrappers and the plugins of the run. It runs the call phase as pytest would and stops at the
report: what pytest's own process must see of the call is sent back, and the body ends there.

What goes back (``Inside.finish``): the report as every plugin made it, the reports the body
logged on the way (subtests), its warnings, the plain-data state it changed (the item's
attributes, the item's and the config's stash, JUnit XML's properties), the lines coverage
measured, and a description of the exception, so that pytest's process can replay the phase
(:mod:`pytest_jail._replay`).
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import warnings
from collections.abc import Callable
from posix import _exit  # the real one: coverage's patch=_exit would save from our children
from typing import Any
from typing import NoReturn

import pytest

from ._jail import Call

#: Item attributes that are pytest's own bookkeeping, never copied back (fixture values included).
_NOT_STATE = frozenset({"funcargs", "user_properties", "keywords", "own_markers", "extra_keyword_matches"})
#: A state value bigger than this (as JSON) is not copied back.
_STATE_LIMIT = 1 << 20


class Inside:
    """One jailed call phase, in the body: :meth:`start` right after entering the jail,
    :meth:`finish` when pytest has made the call's report."""

    def __init__(
        self, item: pytest.Item, call: Call, timeout: Any, own_keys: frozenset[Any], log: list[Any] | None
    ) -> None:
        self.item = item
        self.call = call
        self.log = log  # pytest's record of the test's warnings (see warning_log)
        self.logged = 0 if log is None else len(log)
        self.timeout = timeout  # pytest-timeout's budget for this call, or None
        self.own_keys = own_keys  # pytest-jail's own stash keys: never copied back
        self.logreports: list[dict[str, Any]] = []
        self.before: dict[str, str] = {}
        self.junitxml: tuple[Any, int, dict[str, str]] | None = None
        self.ran = False  # the test has returned (or raised): its call's report is next

    def start(self) -> None:
        item, config = self.item, self.item.config
        # Reports the body logs (pytest 9's subtests) are pytest's process's to log: no plugin
        # here may see them (pytest-xdist's worker would send them twice, the terminal print them).
        quiet = self._record
        setattr(config.hook, "pytest_runtest_logreport", quiet)  # noqa: B010 - HookRelay is dynamic
        if item.ihook is not config.hook:
            setattr(item.ihook, "pytest_runtest_logreport", quiet)  # noqa: B010
        # A crash's Python stack goes where the parent reads it, whatever the capture mode.
        faulthandler.enable(file=self.call.crash_fd, all_threads=True)
        if self.timeout is not None:
            arm_timeout(item, self.timeout, self.call.crash_fd)
        self.before = snapshot(item, self.own_keys)
        self.junitxml = _junitxml_before(item)
        _coverage_forget()

    def _record(self, report: pytest.TestReport) -> None:
        config = self.item.config
        self.logreports.append(config.hook.pytest_report_to_serializable(config=config, report=report))

    def finish(self, report: pytest.TestReport, callinfo: pytest.CallInfo[None]) -> NoReturn:
        """Send what pytest's process must see of this call phase; end the body."""
        item, config = self.item, self.item.config
        faulthandler.cancel_dump_traceback_later()
        if self.timeout is not None:
            item.ihook.pytest_timeout_cancel_timer(item=item)
        if _interactive(callinfo, report):  # --pdb: the debugger runs here, where the frames are
            item.ihook.pytest_exception_interact(node=item, call=callinfo, report=report)
        outcome = {
            "report": config.hook.pytest_report_to_serializable(config=config, report=report),
            "exception": describe_exception(callinfo.excinfo.value) if callinfo.excinfo else None,
            "logreports": self.logreports,
            "warnings": self._warnings(),
            "state": changes(item, self.before, self.own_keys),
            "junitxml": _junitxml_changes(self.junitxml),
            "coverage": _coverage_lines(),
        }
        self.call.finish(outcome)

    def leave(self, exc: BaseException) -> NoReturn:
        """The body called ``pytest.exit()`` or raised KeyboardInterrupt: pytest's process ends
        the session the same way."""
        warned = self._warnings()
        if isinstance(exc, KeyboardInterrupt):
            self.call.finish({"interrupt": True, "warnings": warned})
        self.call.finish({"exit": str(getattr(exc, "msg", exc)), "warnings": warned})

    def _warnings(self) -> list[dict[str, Any]]:
        """What the body added to pytest's record of the test's warnings (a warning that
        ``recwarn`` or ``pytest.warns`` took in the body never reaches it, as in place)."""
        return [] if self.log is None else [_warning_to_json(w) for w in self.log[self.logged:]]

    def abort(self, why: str) -> NoReturn:
        """The body cannot go on (a plugin failed after the test, or pytest's stack would carry on
        past the call phase): say why where pytest's process reads it, and end."""
        try:
            os.write(self.call.crash_fd, why.encode(errors="replace"))
        finally:
            _exit(1)


def arm_timeout(item: pytest.Item, budget: Any, crash_fd: int) -> None:
    """pytest-timeout's timer, armed in the body for what is left of the test's budget.

    The signal method raises in the body's own frame, as without a jail. The thread method
    would end the whole process; here a faulthandler watchdog dumps the body's stacks where
    pytest's process reads them and ends the body alone (it also covers a body stuck in C code).
    """
    settings, remaining = budget
    if settings.method == "signal":
        item.ihook.pytest_timeout_set_timer(item=item, settings=settings)  # its message names the budget...
        signal.setitimer(signal.ITIMER_REAL, remaining)  # ...its timer fires when the rest is spent
    else:
        faulthandler.dump_traceback_later(remaining, exit=True, file=crash_fd)


def _interactive(callinfo: pytest.CallInfo[None], report: pytest.TestReport) -> bool:
    """pytest's own test for entering the debugger (runner.check_interactive_exception)."""
    import bdb

    if callinfo.excinfo is None or hasattr(report, "wasxfail"):
        return False
    return not isinstance(callinfo.excinfo.value, (pytest.skip.Exception, bdb.BdbQuit))


def describe_exception(exc: BaseException) -> dict[str, Any]:
    """What pytest's process needs to stand in for the body's exception: its class, text,
    arguments and plain attributes (``msg`` of pytest's outcomes), and its chain."""
    chain: list[dict[str, Any]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(chain) < 16:
        seen.add(id(current))
        cls = type(current)
        attrs = {k: v for k, v in vars(current).items() if _plain(v)} if hasattr(current, "__dict__") else {}
        chain.append({
            "class": f"{cls.__module__}:{cls.__qualname__}",
            "text": _safe_str(current),
            "args": [a if _plain(a) else _safe_str(a) for a in current.args],
            "attrs": attrs,
            "cause": current.__cause__ is not None,
        })
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return {"chain": chain}


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except BaseException:
        return f"<{type(value).__name__}>"


def _plain(value: Any, depth: int = 0) -> bool:
    """JSON's own types, nested: the only state that can be copied back faithfully."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if depth > 16:
        return False
    if isinstance(value, (list, tuple)):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _state(item: pytest.Item, own: frozenset[Any]) -> dict[str, Any]:
    """The plain-data state a call phase may change: item attributes, then both stashes by the
    position of their keys (the same keys in the same order on both sides of the fork)."""
    found = {f"item:{k}": v for k, v in vars(item).items() if k not in _NOT_STATE}
    for where, stash in (("item.stash", item.stash), ("config.stash", item.config.stash)):
        for index, (key, value) in enumerate(_storage(stash).items()):
            if key not in own:
                found[f"{where}:{index}"] = value
    return {k: v for k, v in found.items() if _plain(v)}


def _storage(stash: pytest.Stash) -> dict[Any, Any]:
    storage: dict[Any, Any] = getattr(stash, "_storage", {})
    return storage


def snapshot(item: pytest.Item, own: frozenset[Any]) -> dict[str, str]:
    return {k: _dumps(v) for k, v in _state(item, own).items()}


def changes(item: pytest.Item, before: dict[str, str], own: frozenset[Any]) -> dict[str, Any]:
    """What changed since :func:`snapshot`: new or changed plain values, within size limits."""
    changed = {}
    for key, value in _state(item, own).items():
        text = _dumps(value)
        if before.get(key) != text and len(text) <= _STATE_LIMIT:
            changed[key] = value
    return changed


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _junitxml_before(item: pytest.Item) -> tuple[Any, int, dict[str, str]] | None:
    """JUnit XML's record_xml_attribute/record_testsuite_property write into its reporter's
    memory: note where it stands so the body's additions go back."""
    xml = _junitxml(item.config)
    if xml is None:
        return None
    reporter = xml.node_reporter(item.nodeid)
    return reporter, len(xml.global_properties), dict(reporter.attrs)


def _junitxml(config: pytest.Config) -> Any:
    try:
        from _pytest.junitxml import xml_key
    except ImportError:  # pragma: no cover - pytest moved it
        return None
    return config.stash.get(xml_key, None)


def _junitxml_changes(before: tuple[Any, int, dict[str, str]] | None) -> dict[str, Any] | None:
    if before is None:
        return None
    reporter, count, attrs = before
    xml = reporter.xml
    return {
        "attrs": {k: v for k, v in reporter.attrs.items() if attrs.get(k) != v},
        "properties": [list(p) for p in xml.global_properties[count:]],
    }


def _collector() -> Any:
    """coverage's collector of the measurement running in this process (pytest-cov's), or None."""
    if "coverage" not in sys.modules:
        return None
    cov = sys.modules["coverage"].Coverage.current()
    return getattr(cov, "_collector", None)


def _coverage_forget() -> None:
    """Start the body's measurement empty: what pytest's process measured so far is its own."""
    collector = _collector()
    if collector is not None:
        for lines in getattr(collector, "data", {}).values():
            lines.clear()  # the same set objects: coverage's tracers hold them


def _coverage_lines() -> dict[str, Any] | None:
    """The lines (or arcs) coverage measured in the body, raw, for pytest's process to merge."""
    collector = _collector()
    if collector is None:
        return None
    data = {name: [list(x) if isinstance(x, tuple) else x for x in lines]
            for name, lines in getattr(collector, "data", {}).items() if lines}
    tracers = {k: v for k, v in getattr(collector, "file_tracers", {}).items() if k in data}
    return {"data": data, "file_tracers": tracers}


def warning_log() -> list[Any] | None:
    """The list pytest records a test's warnings in (its ``catch_warnings(record=True)`` around the
    test's protocol), read before the test's fixtures put theirs (``recwarn``) in front of it;
    ``None`` without one (``-p no:warnings``: warnings go to stderr, as they would in place)."""
    impl = getattr(warnings, "_showwarnmsg_impl", None)
    log = getattr(impl, "__self__", None)
    return log if isinstance(log, list) and getattr(impl, "__name__", "") == "append" else None


def _warning_to_json(message: warnings.WarningMessage) -> dict[str, Any]:
    category = message.category
    return {
        "message": str(message.message),
        "category": f"{category.__module__}:{category.__qualname__}",
        "filename": message.filename,
        "lineno": message.lineno,
    }


def call_runtest(runtest: Callable[[], None], inside: Inside) -> None:
    """The test itself, in the body; ``pytest.exit()`` ends the session from pytest's process."""
    try:
        runtest()
    except (pytest.exit.Exception, KeyboardInterrupt) as exc:
        inside.leave(exc)
    finally:
        inside.ran = True  # the next "call" report is the call's own (a subtest's comes before)
