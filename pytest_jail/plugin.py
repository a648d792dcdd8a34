"""The pytest side of pytest-jail: options, the ``jail`` marker and fixture, the call-phase takeover.

The only module (with ``hooks.py``) that imports pytest. The test body of a jailed item runs in a
jail forked at the end of its setup phase (after its fixtures, so their values reach the body);
the call phase releases it and takes the report it sends back over the wire.
"""

from __future__ import annotations

import errno
import faulthandler
import functools
import os
import random
import time
import traceback
from collections.abc import Generator
from collections.abc import Iterator
from typing import Any

import pytest

from . import _remote
from . import _replay
from . import hooks
from ._errors import JailConfigError
from ._errors import JailError
from ._errors import JailSetupError
from ._errors import JailUnavailableError
from ._jail import ROOT_MAP_BASE
from ._jail import Call
from ._jail import Jail
from ._jail import set_memory_budget
from ._jail import uses_root_map
from ._places import SubprocessCoverage
from ._places import exposures
from ._places import writable_on_entry
from ._probe import HostSupport
from ._probe import explain
from ._probe import probe_host
from ._process import JailProcess
from ._result import JailResult
from ._result import describe_status
from ._result import format_size_rounded
from ._spec import JailSpec
from ._spec import parse_size
from .rootfs import NAMES
from .rootfs._build import remove_tree

# (option, ini name, spec field, help)
_OPTIONS = (
    ("--jail-rootfs", "jail_rootfs", "rootfs", "default rootfs of jails: a directory used as /"),
    ("--jail-net", "jail_net", "net", "default network of jails: none (the default: a network of its own), host, "
     "bridge or bridge:NAME (a segment of a bridge on the host; root)"),
    ("--jail-timeout", "jail_timeout", "timeout", "default wall-clock limit of jails, in seconds"),
    ("--jail-memory", "jail_memory", "memory", "default memory limit of jails (swap included), e.g. 256M"),
    ("--jail-cpus", "jail_cpus", "cpus", "default CPU bandwidth of jails, in cores, e.g. 0.5"),
    ("--jail-pids", "jail_pids", "pids", "default process limit of jails (default 4096)"),
    ("--jail-tmpfs", "jail_tmpfs", "tmpfs", "default size of a jail's private /tmp, e.g. 100M"),
    ("--jail-io", "jail_io", "io", "default disk bandwidth of jails, e.g. read=20M,write=10M (bytes/s)"),
    ("--jail-syscalls", "jail_syscalls", "syscalls", "default system call filter of jails: default (Docker's "
     "baseline), nested (jails may hold jails) or unconfined (no filter)"),
    ("--jail-cap-add", "jail_cap_add", "cap_add", "capabilities given back to jailed code, e.g. NET_RAW,SYS_PTRACE"),
)

base_spec_key = pytest.StashKey[JailSpec]()
host_key = pytest.StashKey[HostSupport]()
spec_key = pytest.StashKey["JailSpec | None"]()
layers_key = pytest.StashKey["_Layers"]()
call_key = pytest.StashKey[Call]()
inside_key = pytest.StashKey[_remote.Inside]()  # set in a jailed body only
result_key = pytest.StashKey[JailResult]()
outcome_key = pytest.StashKey["dict[str, Any]"]()  # what a jailed body sent back
timer_key = pytest.StashKey[Any]()  # pytest-timeout's settings for the test, and when it started
warnings_key = pytest.StashKey["list[Any]"]()  # pytest's record of the test's warnings
_OWN_KEYS = frozenset({base_spec_key, host_key, spec_key, layers_key, call_key, inside_key, result_key, outcome_key,
                       timer_key, warnings_key})


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hooks)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("jail", "run tests in Linux jails (pytest-jail)")
    for option, ini, _, help_ in _OPTIONS:
        group.addoption(option, dest=ini, default=None, help=help_)
        parser.addini(ini, help_)
    group.addoption("--jail-all", dest="jail_all", action="store_true", default=None,
                    help="jail every test, as if each had the jail marker")
    parser.addini("jail_all", "jail every test", type="bool", default=False)
    group.addoption("--jail-memory-total", dest="jail_memory_total", default=None,
                    help="memory for all jails of the session together, e.g. 4G (split among xdist workers)")
    parser.addini("jail_memory_total", "memory for all jails of the session together")
    group.addoption("--jail-report", dest="jail_report", action="store_true", default=False,
                    help="list the jailed tests that used the most memory and CPU at the end")
    group.addoption("--jail-keep-failed", dest="jail_keep_failed", action="store_true", default=None,
                    help="keep what failed tests wrote over their rootfs (the jail's writable layer) "
                    "in pytest's temporary directory")
    parser.addini("jail_keep_failed", "keep the writable layer of failed jailed tests", type="bool", default=False)
    group.addoption("--jail-unavailable", dest="jail_unavailable", default=None,
                    help="what a jailed test does when this host cannot jail it: fail (default) or skip")
    parser.addini("jail_unavailable", "fail or skip when this host cannot jail a test", default="fail")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "jail(rootfs=None, *, net='none', memory=None, cpus=None, pids=None, timeout=None, "
        "hostname='jail', env=None, binds=(), tmpfs=None, io=None, workdir=None, nat=False, allow=(), "
        "syscalls='default', cap_add=()): "
        "run the test body in a freshly cloned Linux jail (pytest-jail)",
    )
    config.addinivalue_line(
        "markers",
        "nojail: run this test body in pytest's own process even under --jail-all / jail_all "
        "(its jail.run() calls are still jailed); for tests that drive jails from the host side",
    )
    spec = JailSpec()
    for source, values in _layers(config):
        try:
            spec = spec.merged(source, values)
        except JailConfigError as exc:
            raise pytest.UsageError(str(exc)) from None
    config.stash[base_spec_key] = spec
    set_memory_budget(_memory_total(config))
    for name in ("jail_all", "jail_keep_failed"):
        _ini_bool(config, name)  # a bad value stops pytest here, in one line
    config.pluginmanager.register(_BodyReport(), "jail-body-report")
    if config.option.jail_report:
        config.pluginmanager.register(_Accounting(), "jail-accounting")
    if config.option.jail_keep_failed or _ini_bool(config, "jail_keep_failed"):
        config.pluginmanager.register(_KeptLayers(), "jail-keep-failed")
    # Nothing on the host changes here: what a killed earlier run left (cgroups, bridges) is
    # removed when this run makes its first jail, and a run that jails nothing touches nothing.
    if _unavailable_policy(config) not in ("fail", "skip"):
        raise pytest.UsageError(
            f"{_unavailable_source(config)}: {_unavailable_policy(config)!r} is not allowed; allowed: fail, skip"
        )


def _ini_bool(config: pytest.Config, name: str) -> bool:
    try:
        return bool(config.getini(name))
    except (ValueError, pytest.UsageError) as exc:  # pytest 8, pytest 9: "invalid truth value 'maybe'"
        shown = str(exc).removeprefix("invalid truth value ")
        raise pytest.UsageError(
            f"ini {name} ({config.inipath}): {shown} is not valid; allowed: true or false (also 1/0, yes/no, on/off)"
        ) from None


def _layers(config: pytest.Config) -> Iterator[tuple[str, dict[str, Any]]]:
    """The ini values, then the command-line values (later layers win)."""
    inidir = str(config.inipath.parent) if config.inipath else str(config.rootpath)
    cwd = str(config.invocation_params.dir)
    for _option, ini, field, _ in _OPTIONS:
        value = config.getini(ini)
        if value:
            yield f"ini {ini} ({config.inipath})", {field: _relative(field, value, inidir)}
    for option, ini, field, _ in _OPTIONS:
        value = getattr(config.option, ini)
        if value is not None:
            yield f"{option}", {field: _relative(field, value, cwd)}


def _relative(field: str, value: Any, base: str) -> Any:
    if field == "rootfs" and isinstance(value, str) and value not in ("", "none", "None"):
        return value if value in NAMES else os.path.join(base, value)
    return None if field == "rootfs" else value


def _memory_total(config: pytest.Config) -> int | None:
    """The session's memory budget, as this process's share: each xdist worker gets 1/N."""
    value = config.option.jail_memory_total or config.getini("jail_memory_total")
    if not value:
        return None
    source = "--jail-memory-total" if config.option.jail_memory_total else "ini jail_memory_total"
    try:
        total = parse_size(value)
    except ValueError as exc:
        raise pytest.UsageError(f"{source}: {value!r} is not valid; allowed: {exc}") from None
    workerinput = getattr(config, "workerinput", None)  # set by pytest-xdist on its workers
    return total // int(workerinput["workercount"]) if workerinput else total


def _unavailable_policy(config: pytest.Config) -> str:
    return str(config.option.jail_unavailable or config.getini("jail_unavailable"))


def _unavailable_source(config: pytest.Config) -> str:
    return "--jail-unavailable" if config.option.jail_unavailable else "ini jail_unavailable"


def _host(config: pytest.Config) -> HostSupport:
    if host_key not in config.stash:
        config.stash[host_key] = probe_host()
    return config.stash[host_key]


def pytest_report_header(config: pytest.Config) -> str:
    return _host(config).summary()


def _item_spec(item: pytest.Item) -> JailSpec | None:
    """The test's jail: the defaults (ini, then CLI), then every jail marker from the farthest (a
    module's) to the closest (the function's), each argument from the closest that sets it."""
    markers = list(item.iter_markers_with_node("jail"))
    if item.get_closest_marker("nojail") is not None:
        if markers:
            raise JailConfigError(f"{item.nodeid} has both the jail and the nojail marker; keep one")
        return None  # asked for by name: runs in pytest's process, as without the plugin
    jail_all = item.config.option.jail_all or _ini_bool(item.config, "jail_all")
    if not markers and not jail_all:
        return None
    spec = item.config.stash[base_spec_key]
    for node, marker in reversed(markers):
        kwargs = dict(marker.kwargs)
        source = f"jail marker on {node.nodeid or node.name}"
        if len(marker.args) > 1:
            raise JailConfigError(f"{source}: takes at most one positional argument (rootfs), got {len(marker.args)}")
        if marker.args:
            kwargs["rootfs"] = marker.args[0]
        if isinstance(kwargs.get("rootfs"), (str, os.PathLike)) and kwargs["rootfs"] not in NAMES:
            kwargs["rootfs"] = os.path.join(str(item.config.rootpath), os.fspath(kwargs["rootfs"]))
        spec = spec.merged(source, kwargs)
    changed = item.ihook.pytest_jail_spec(item=item, spec=spec)
    return spec if changed is None else changed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    # Before the fixtures: a bad setting or an unusable host errors without wasting their time.
    item.stash[spec_key] = spec = _item_spec(item)
    if spec is not None:
        _guard(item, _host(item.config).require)
        warnings_log = _remote.warning_log()  # pytest's, before fixtures (recwarn) put theirs in front
        if warnings_log is not None:
            item.stash[warnings_key] = warnings_log
    result = yield
    # After every fixture is set up: the jail is built now, so that what the host cannot do is
    # an error of the setup phase; the body enters it when the call phase runs the test.
    if spec is not None:
        tmp = getattr(item, "funcargs", {}).get("tmp_path")
        layers = item.stash.get(layers_key, None)
        layer = layers.new() if layers is not None and spec.rootfs is not None else None
        shown, writable = writable_on_entry(exposures(item.config, spec.rootfs, tmp, body=True), tmp)
        jail = Jail(spec, exposures=shown, layer=layer, writable=writable)
        item.stash[call_key] = _guard(item, jail.start_call)
        # Any kind of item (functions, unittest cases, doctests): its own runtest runs in the jail.
        item.runtest = functools.partial(_jailed_runtest, item, item.runtest)  # type: ignore[method-assign]
    return result


def _guard(item: pytest.Item, start: Any) -> Any:
    """Run a jail step; host limitations become skips under ``--jail-unavailable=skip``."""
    try:
        return start()
    except JailSetupError as exc:
        unavailable = explain(exc)
        if unavailable is None:
            raise
        error: JailError = unavailable
    except JailUnavailableError as exc:
        error = exc
    if _unavailable_policy(item.config) == "skip":
        pytest.skip(f"jail unavailable: {error}")
    raise error


def _jailed_runtest(item: pytest.Item, runtest: Any) -> None:
    """The call phase of a jailed item: fork into the jail built at setup and run the test there.

    The fork returns twice. In the jail, the test runs and pytest's stack goes on there up to the
    call's report, which goes back (``_remote``). Here, pytest's process waits, then replays
    what the body's call phase did (``_replay``) and ends the call as the body's did.
    """
    call = item.stash[call_key]
    spec = item.stash[spec_key]
    assert spec is not None
    budget = _pause_timeout(item)
    seeded = random.getstate()  # Python reseeds its random module in a child of fork (os.register_at_fork)
    try:
        in_jail = call.fork()
    except BaseException:
        _resume_timeout(item, budget, 0.0)
        raise
    if in_jail:
        random.setstate(seeded)  # as in place: pytest-randomly's seed, a test's own random.seed()
        log = item.stash.get(warnings_key, None)
        inside = item.stash[inside_key] = _remote.Inside(item, call, budget, _OWN_KEYS, log)
        inside.start()
        _remote.call_runtest(runtest, inside)
        return
    try:
        call.wait(spec.timeout)
    finally:
        call.kill()
        _resume_timeout(item, budget, call.duration)
    item.stash[result_key] = result = call.result([item.nodeid], spec)
    outcome = call.outcome
    if outcome is not None:
        try:  # what the body sent is the test's code's to forge: it must make sense before it is used
            _replay.check(item, outcome)
        except Exception as exc:
            raise JailSetupError("wire", errno.EPROTO, f"the test body sent an outcome pytest cannot use ({exc})") \
                from None
        item.stash[outcome_key] = outcome
        if outcome.get("report"):  # JUnit XML reads the item's properties, at teardown
            item.user_properties[:] = [tuple(p) for p in outcome["report"].get("user_properties", [])]
    item.user_properties += [
        ("jail_wall_time", round(result.duration, 6)),
        ("jail_cpu_time", None if result.cpu_time is None else round(result.cpu_time, 6)),
        ("jail_peak_memory", result.peak_memory),
    ]
    item.ihook.pytest_jail_result(item=item, result=result)
    if outcome is not None:
        try:
            _replay.replay(item, outcome, _OWN_KEYS, item.stash.get(warnings_key, None))
        except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a forged outcome's shape
            raise JailSetupError("wire", errno.EPROTO, f"the test body sent an outcome pytest cannot use ({exc!r})") \
                from None
        if outcome.get("interrupt"):
            raise KeyboardInterrupt
        if outcome.get("exit") is not None:
            pytest.exit(outcome["exit"])
    if call.timed_out or (outcome is None and (result.oom_killed or result.pids_limit_hit)):
        pytest.fail(f"jail: {result.verdict()}{_last_words(call.last_words)}", pytrace=False)
    if call.error is not None:
        raise JailSetupError(call.error["step"], call.error.get("errno"), call.error["detail"], call.error.get("path"))
    if outcome is None:
        if budget is not None and call.last_words.startswith(b"Timeout ("):  # pytest-timeout, thread method
            pytest.fail(f"Timeout (>{budget[0].timeout}s) from pytest-timeout: the jailed test body was stopped "
                        f"(the session goes on){_last_words(call.last_words, 'its stacks')}", pytrace=False)
        ending = describe_status(result.returncode)
        ending = f"was {ending}" if ending.startswith("killed") else ending
        pytest.fail(f"jail: the test body {ending} before it reported an outcome{_last_words(call.last_words)}",
                    pytrace=False)
    if outcome.get("exception"):
        raise _replay.stand_in(outcome["exception"])


def _last_words(raw: bytes, title: str = "what it wrote on its way out") -> str:
    """What a dying body wrote on its way out (its traceback, faulthandler's dump), for the report."""
    text = raw.decode(errors="replace").strip()
    return f"\n\n{title}:\n{text}" if text else ""


def _pause_timeout(item: pytest.Item) -> Any:
    """pytest-timeout's timer for this test, stopped here and handed to the body with what is left
    of its budget (so its failure shows where the body hung); ``None`` without one."""
    started = item.stash.get(timer_key, None)
    if started is None:
        return None
    settings, since = started
    item.ihook.pytest_timeout_cancel_timer(item=item)
    return settings, max(settings.timeout - (time.monotonic() - since), 0.001)


def _resume_timeout(item: pytest.Item, budget: Any, spent: float) -> None:
    """Teardown stays under pytest-timeout's timer when it covers the whole test."""
    if budget is None:
        return
    settings, remaining = budget
    if not settings.func_only and remaining - spent > 0:
        item.ihook.pytest_timeout_set_timer(item=item, settings=settings._replace(timeout=remaining - spent))


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # first: note when the timer starts, then let it
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> None:
    if inside_key not in item.stash:  # (before setup: whether the test is jailed is not known yet)
        item.stash[timer_key] = (settings, time.monotonic())


@pytest.hookimpl(optionalhook=True)
def pytest_enter_pdb(config: pytest.Config) -> None:
    faulthandler.cancel_dump_traceback_later()  # a debugging session is not a hang


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outermost: nothing of pytest's stack goes on in a body
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    try:
        return (yield)
    finally:
        inside = item.stash.get(inside_key, None)
        if inside is not None:  # a body is only ever to reach its report (see pytest_runtest_makereport)
            inside.abort(f"jail: the test body left the call phase without its report:\n{traceback.format_exc()}")


class _BodyReport:
    """Registered at configure: in pytest's process, the report of a jailed call is the body's.

    As the innermost result (tryfirst, and makereport takes the first result), so every plugin's
    makereport wrapper here sees the body's report and its exception, as it would in place; the
    outermost wrapper then restores the report exactly as the body made it.
    """

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport | None:
        outcome = item.stash.get(outcome_key, None)
        if call.when != "call" or outcome is None or not outcome.get("report") or inside_key in item.stash:
            return None
        return _replay.report(item.config, outcome["report"])


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outermost: the jail's report is the final word
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """In a body, send the call's report back and end; in pytest's process, take the body's
    report, put what the jail stopped on top of it, and shorten jail errors to one line."""
    inside = item.stash.get(inside_key, None)
    try:
        report: pytest.TestReport = yield
    except BaseException:
        if inside is None:
            raise
        inside.abort(f"jail: making the report of the test body failed:\n{traceback.format_exc()}")
    if inside is not None:
        if call.when == "call" and inside.ran:
            inside.finish(report, call)
        return report
    jailed = item.stash.get(call_key, None)
    if call.when == "call" and jailed is not None:
        result = item.stash.get(result_key, None)
        outcome = item.stash.get(outcome_key, None)
        if outcome is not None and outcome.get("report"):
            report = _replay.report(item.config, outcome["report"])
            call.excinfo = None  # it was the body's, and debugged there (--pdb): nothing to do here
            if result is not None and report.failed and (result.oom_killed or result.pids_limit_hit):
                report.longrepr = _Headed(f"jail: {result.verdict()}", report.longrepr)  # type: ignore[assignment]
        _note_blocked(report, result)
        _note_network(report, item.stash.get(spec_key, None), result)
    if call.excinfo is not None and report.failed and isinstance(call.excinfo.value, JailError):
        error = call.excinfo.value
        public = next(c for c in type(error).__mro__ if not c.__name__.startswith("_"))
        report.longrepr = f"pytest_jail.{public.__name__}: {error}"
    return report


def _note_blocked(report: pytest.TestReport, result: JailResult | None) -> None:
    """What the body tried and the jail refused (network access, system calls): a section of
    every report (``-rA`` shows it for passing tests too), and the first line of a failure."""
    if result is None:
        return
    for line, title, items in (
        (result.syscalls_line(), "jail: system calls refused (seccomp)", result.blocked_syscalls),
        (result.blocked_line(), "jail: network access blocked", result.blocked),
    ):
        if line is not None and items:
            report.sections.append((title, "\n".join(items)))
            if report.failed:
                report.longrepr = _Headed(f"jail: {line}", report.longrepr)  # type: ignore[assignment]


#: How a refused connection reads in a failure (Python, and the C library's words).
_REFUSED = ("ConnectionRefusedError", "Connection refused", "ECONNREFUSED")


def _note_network(report: pytest.TestReport, spec: JailSpec | None, result: JailResult | None) -> None:
    """A jailed test whose connection was refused learns in one line which network it had: a
    server on the host's loopback (a fixture's) is not in a network of its own."""
    if not report.failed or spec is None or spec.net == "host" or (result is not None and result.blocked):
        return
    text = str(report.longrepr) + "".join(content for _, content in report.sections)
    if not any(word in text for word in _REFUSED):
        return
    own = "its own loopback only" if spec.net == "none" else f"its segment {spec.net!r} only"
    report.longrepr = _Headed(  # type: ignore[assignment]
        f"jail: this test had net={spec.net!r} ({own}): a server on the host's loopback, a fixture's "
        "included, is out of its reach; use net='host', or start the server in the test body",
        report.longrepr,
    )


class _Headed:
    """A failure report with one line of what the jail stopped on top."""

    def __init__(self, line: str, inner: object) -> None:
        self.line, self.inner = line, inner

    def toterminal(self, tw: Any) -> None:
        tw.line(self.line, red=True, bold=True)
        if hasattr(self.inner, "toterminal"):
            self.inner.toterminal(tw)
        else:
            tw.line(str(self.inner))

    def __str__(self) -> str:
        return f"{self.line}\n{self.inner}"


class _Accounting:
    """Keeps each jailed test's figures for --jail-report (also on an xdist controller, which sees
    them in the teardown reports' user_properties)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, dict[str, Any]]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "teardown":
            usage = {k: v for k, v in report.user_properties if k.startswith("jail_")}
            if usage:
                self.rows.append((report.nodeid, usage))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.rows:
            return
        terminalreporter.write_sep("=", "jail report: the heaviest jailed tests")
        for key, title in (("jail_peak_memory", "peak memory"), ("jail_cpu_time", "CPU time")):
            rows = sorted((r for r in self.rows if r[1].get(key) is not None), key=lambda r: -float(r[1][key]))
            terminalreporter.write_line(f"{title}:")
            if not rows:
                terminalreporter.write_line("  not kept by this kernel (cgroup v2 keeps a peak from Linux 5.19)"
                                            if key == "jail_peak_memory" else "  none measured")
            for nodeid, usage in rows[:10]:
                value = usage[key]
                shown = format_size_rounded(int(value)) if key == "jail_peak_memory" else f"{float(value):.2f}s"
                wall = float(usage.get("jail_wall_time") or 0)
                terminalreporter.write_line(f"  {shown:>10}  {nodeid}  (wall {wall:.2f}s)")


class _Layers:
    """One test's writable layers, for --jail-keep-failed: kept if it failed, removed if not."""

    def __init__(self, item: pytest.Item, factory: pytest.TempPathFactory) -> None:
        self.item, self.factory = item, factory
        self.paths: list[str] = []
        self.failed = False

    def new(self) -> str:
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.item.name)[:40]
        path = str(self.factory.mktemp(f"{name}-layer", numbered=True))
        os.chmod(path, 0o755)
        if uses_root_map():
            os.chown(path, ROOT_MAP_BASE, ROOT_MAP_BASE)  # the jail's root writes the layer
        self.paths.append(path)
        return path

    def close(self) -> None:
        if self.failed:
            return
        for path in self.paths:
            remove_tree(path)


class _KeptLayers:
    """Registered by --jail-keep-failed: gives each test a place for its writable layers."""

    @pytest.fixture(autouse=True)
    def _jail_layers(self, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
        layers = request.node.stash[layers_key] = _Layers(request.node, tmp_path_factory)
        yield
        layers.close()

    # tryfirst, and registered after the jail's own wrapper: outside it, so this sees the report the
    # jail sent back (in the jail itself, where that report is made, there is nothing to say yet).
    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report: pytest.TestReport = yield
        layers = item.stash.get(layers_key, None)
        if layers is not None and layers.paths and report.failed and inside_key not in item.stash:
            layers.failed = True
            kept = "\n".join(os.path.join(p, "upper") for p in layers.paths)
            report.sections.append(("jail: what the test wrote over its rootfs is kept in", kept))
        return report


@pytest.hookimpl(tryfirst=True)  # kill a jail whose call never came, before fixtures tear down
def pytest_runtest_teardown(item: pytest.Item) -> None:
    call = item.stash.get(call_key, None)
    if call is not None:
        del item.stash[call_key]
        del item.runtest  # back to the class's own
        call.kill()
    for key in (outcome_key, timer_key, warnings_key):
        if key in item.stash:
            del item.stash[key]


@pytest.fixture
def jail(request: pytest.FixtureRequest) -> Iterator[_GuardedJail]:
    """A :class:`Jail` built from this test's marker and the ini/CLI defaults: ``jail.run([...])``,
    ``jail.spawn([...])`` (every spawned jail is killed when the test ends)."""
    item = request.node
    _guard(item, _host(item.config).require)
    spec = item.stash.get(spec_key, None) or _item_spec(item) or item.config.stash[base_spec_key]
    tmp = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    guarded = _GuardedJail(item, spec, tmp)
    try:
        yield guarded
    finally:
        guarded.close()


class _GuardedJail:
    """The ``jail`` fixture: a :class:`Jail` whose host limitations follow ``--jail-unavailable``."""

    def __init__(self, item: pytest.Item, spec: JailSpec, tmp: Any) -> None:
        self._item, self._tmp = item, tmp
        self.spec = spec
        self._spawned: list[JailProcess] = []

    def _jail(self, kwargs: dict[str, Any]) -> Jail:
        inside = self._item.stash.get(inside_key, None)
        body = self._item.stash.get(spec_key, None)
        if inside is not None and body is not None and body.syscalls[0] == "default":
            raise JailConfigError(
                f"jail.run() in the jailed body of {self._item.nodeid} makes a jail inside its jail, which the "
                "default system call filter refuses (it is made of namespaces and mounts): give the test "
                "@pytest.mark.jail(syscalls='nested')"
            )
        rootfs = kwargs.get("rootfs", self.spec.rootfs)
        layers = self._item.stash.get(layers_key, None)
        layer = layers.new() if layers is not None and rootfs is not None else None
        return Jail(self.spec, exposures=exposures(self._item.config, rootfs, self._tmp, body=False), layer=layer)

    def run(self, argv: Any, **kwargs: Any) -> JailResult:
        """:meth:`Jail.run`, in the jail of this test; a Python program it starts is measured by
        coverage where coverage's subprocess support is configured, as without the jail."""
        jail = self._jail(kwargs)
        env = kwargs.get("env", self.spec.env)
        measured = SubprocessCoverage.wanted(os.environ if env is None else env, self._item.config)
        if measured is not None:
            jail.exposures += (measured.exposure,)
            kwargs["env"] = measured.environ(os.environ if env is None else env)
        try:
            result: JailResult = _guard(self._item, lambda: jail.run(argv, **kwargs))
        finally:
            if measured is not None:
                measured.collect()
        return result

    def spawn(self, argv: Any, **kwargs: Any) -> JailProcess:
        """:meth:`Jail.spawn`, killed at the end of the test at the latest."""
        jail = self._jail(kwargs)
        process: JailProcess = _guard(self._item, lambda: jail.spawn(argv, **kwargs))
        self._spawned.append(process)
        return process

    def close(self) -> None:
        """Kill every spawned jail; a jail's own error was the test's to see, not teardown's."""
        for process in self._spawned:
            try:
                process.kill()
            except JailError:
                pass
