"""The pytest side of pytest-jail: options, the ``jail`` marker and fixture, the call-phase takeover.

The only module (with ``hooks.py``) that imports pytest. The test body of a jailed item runs in a
jail forked at the end of its setup phase (after its fixtures, so their values reach the body);
the call phase releases it and takes the report it sends back over the wire.
"""

from __future__ import annotations

import faulthandler
import importlib
import os
import stat
import sys
import warnings
from collections.abc import Generator
from collections.abc import Iterator
from typing import Any

import pytest

from . import hooks
from ._cgroups.manager import clean_stale_everywhere
from ._cgroups.manager import prepare_delegation
from ._cgroups.manager import set_budget
from ._errors import JailConfigError
from ._errors import JailError
from ._errors import JailSetupError
from ._errors import JailUnavailableError
from ._jail import ROOT_MAP_BASE
from ._jail import Call
from ._jail import Jail
from ._jail import runtime_paths
from ._jail import uses_root_map
from ._linux.mounts import Exposure
from ._linux.net import clean_stale as clean_stale_networks
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
    ("--jail-net", "jail_net", "net", "default network of jails: none or host"),
    ("--jail-timeout", "jail_timeout", "timeout", "default wall-clock limit of jails, in seconds"),
    ("--jail-memory", "jail_memory", "memory", "default memory limit of jails (swap included), e.g. 256M"),
    ("--jail-cpus", "jail_cpus", "cpus", "default CPU bandwidth of jails, in cores, e.g. 0.5"),
    ("--jail-pids", "jail_pids", "pids", "default process limit of jails (default 4096)"),
    ("--jail-tmpfs", "jail_tmpfs", "tmpfs", "default size of a jail's private /tmp, e.g. 100M"),
    ("--jail-io", "jail_io", "io", "default disk bandwidth of jails, e.g. read=20M,write=10M (bytes/s)"),
)

base_spec_key = pytest.StashKey[JailSpec]()
host_key = pytest.StashKey[HostSupport]()
spec_key = pytest.StashKey["JailSpec | None"]()
layers_key = pytest.StashKey["_Layers"]()
call_key = pytest.StashKey[Call]()
inside_key = pytest.StashKey[bool]()
result_key = pytest.StashKey[JailResult]()


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
        "hostname='jail', env=None, binds=(), tmpfs=None, io=None, workdir=None): "
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
    set_budget(_memory_total(config))
    if config.option.jail_report:
        config.pluginmanager.register(_Accounting(), "jail-accounting")
    if config.option.jail_keep_failed or config.getini("jail_keep_failed"):
        config.pluginmanager.register(_KeptLayers(), "jail-keep-failed")
    clean_stale_everywhere()  # cgroups left by a killed earlier run (a listdir when there are none)
    if uses_root_map():
        clean_stale_networks()  # ...and bridges (two listdirs when there are none)
    if getattr(config, "workerinput", None) is None and config.getoption("numprocesses", None):
        prepare_delegation()  # pytest-xdist's main process, before it starts its workers
    if _unavailable_policy(config) not in ("fail", "skip"):
        raise pytest.UsageError(
            f"{_unavailable_source(config)}: {_unavailable_policy(config)!r} is not allowed; allowed: fail, skip"
        )


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
    marker = item.get_closest_marker("jail")
    if item.get_closest_marker("nojail") is not None:
        if marker is not None:
            raise JailConfigError(f"{item.nodeid} has both the jail and the nojail marker; keep one")
        return None  # asked for by name: runs in pytest's process, as without the plugin
    jail_all = item.config.option.jail_all or item.config.getini("jail_all")
    if marker is None and not jail_all:
        return None
    spec = item.config.stash[base_spec_key]
    if marker is not None:
        kwargs = dict(marker.kwargs)
        source = f"jail marker on {item.nodeid}"
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
    result = yield
    # After every fixture is set up, since their values must reach the body.
    if spec is not None:
        tmp = getattr(item, "funcargs", {}).get("tmp_path")
        layers = item.stash.get(layers_key, None)
        layer = layers.new() if layers is not None and spec.rootfs is not None else None
        jail = Jail(spec, exposures=_exposures(item, spec.rootfs, tmp, body=True), layer=layer)
        item.stash[call_key] = _guard(item, lambda: jail.start_call(lambda: _run_call(item)))
        # From here on, this process runs the body by releasing the jail (the jail's own copy of
        # the item, forked above, keeps the real runtest). Any kind of item: functions,
        # unittest cases, doctests.
        item.runtest = lambda: _release(item)  # type: ignore[method-assign]
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


def _exposures(item: pytest.Item, rootfs: str | None, tmp: Any, *, body: bool) -> list[Exposure]:
    """The test's temp dir (writable), and the Python runtime and rootdir (read-only) where needed.

    A body needs the runtime to import and format tracebacks (in a custom rootfs only what is on
    sys.path); a command in the host view gets it too (``jail.run([sys.executable, ...])`` must
    work when Python lives under a 0700 ``/root``); a command in a custom rootfs gets none of it.
    """
    exposures = []
    if tmp is not None:
        path = str(tmp)
        if uses_root_map():
            _chown_tree(path, ROOT_MAP_BASE)
        exposures.append(Exposure(path, path, writable=True))
    if body or rootfs is None:
        taken = [e.target for e in exposures]
        for path in [*runtime_paths(imports_only=rootfs is not None), str(item.config.rootpath)]:
            if not any(path == t or path.startswith(t + "/") for t in taken):
                exposures.append(Exposure(path, path))
                taken.append(path)
    return exposures


def _chown_tree(path: str, uid: int) -> None:
    """Root mode: hand the test's temp dir to the jail's root (an unprivileged host uid).

    Files with other hard links are left alone: the link may be a host file (``/etc/passwd``
    linked in by a fixture) that must not change owner.
    """
    os.lchown(path, uid, uid)
    for parent, dirs, files in os.walk(path):
        for name in dirs + files:
            entry = os.path.join(parent, name)
            st = os.lstat(entry)
            if stat.S_ISDIR(st.st_mode) or st.st_nlink == 1:
                os.lchown(entry, uid, uid)


def _run_call(item: pytest.Item) -> dict[str, Any]:
    """Inside the jail: run the call phase as pytest would; return what the parent must replay.

    That is the report, every other report the body logged (pytest 9's subtests), the warnings
    it raised and a ``pytest.exit()``; all serialized with pytest's own hooks.
    """
    config = item.config
    item.stash[inside_key] = True
    if faulthandler.is_enabled():  # a crash's Python traceback goes to the captured stderr
        faulthandler.enable(file=sys.stderr)
    recorder = _Recorder(config)
    config.pluginmanager.register(recorder)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:  # the parent prints the reports this process records
        quiet = config.pluginmanager.subset_hook_caller("pytest_runtest_logreport", remove_plugins=[reporter])
        setattr(config.hook, "pytest_runtest_logreport", quiet)  # noqa: B010 - HookRelay is dynamic
    exit_message = None
    with warnings.catch_warnings(record=True) as caught:
        call = None
        try:
            call = pytest.CallInfo.from_call(
                lambda: item.ihook.pytest_runtest_call(item=item), when="call", reraise=(pytest.exit.Exception,)
            )
        except pytest.exit.Exception as exc:
            exit_message = str(exc.msg)
    report = None
    if call is not None:
        report = config.hook.pytest_report_to_serializable(
            config=config, report=item.ihook.pytest_runtest_makereport(item=item, call=call)
        )
    return {
        "report": report,
        "logreports": recorder.reports,
        "warnings": [_warning_to_json(w) for w in caught],
        "exit": exit_message,
    }


class _Recorder:
    """Inside the jail: keeps the reports the body logs (subtests) for the parent to replay."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.reports: list[dict[str, Any]] = []

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.reports.append(self.config.hook.pytest_report_to_serializable(config=self.config, report=report))


def _warning_to_json(message: warnings.WarningMessage) -> dict[str, Any]:
    category = message.category
    return {
        "message": str(message.message),
        "category": f"{category.__module__}:{category.__qualname__}",
        "filename": message.filename,
        "lineno": message.lineno,
    }


def _replay_warning(data: dict[str, Any]) -> None:
    """In pytest's process: raise again a warning the body raised, so pytest records it as usual."""
    module, _, name = data["category"].partition(":")
    category: type[Warning] = UserWarning
    try:
        found: Any = importlib.import_module(module)
        for part in name.split("."):
            found = getattr(found, part)
        if isinstance(found, type) and issubclass(found, Warning):
            category = found
    except (ImportError, AttributeError):
        pass
    warnings.warn_explicit(data["message"], category, data["filename"], data["lineno"])


def _deserialize(config: pytest.Config, data: dict[str, Any]) -> pytest.TestReport:
    data = dict(data)
    for key in ("longrepr", "location"):  # JSON has no tuples; pytest expects these two as tuples
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])
    report: pytest.TestReport = config.hook.pytest_report_from_serializable(config=config, data=data)
    return report


def _release(item: pytest.Item) -> None:
    """The call phase of a jailed item, in pytest's process: let the body run, wait for it."""
    call = item.stash[call_key]
    spec = item.stash[spec_key]
    assert spec is not None
    try:
        call.go()
        call.wait(spec.timeout)
    finally:
        call.kill()
    item.stash[result_key] = result = call.result([item.nodeid], spec)
    item.user_properties += [  # JUnit XML writes them (it reads the item's, at teardown)
        ("jail_wall_time", round(result.duration, 6)),
        ("jail_cpu_time", None if result.cpu_time is None else round(result.cpu_time, 6)),
        ("jail_peak_memory", result.peak_memory),
    ]
    item.ihook.pytest_jail_result(item=item, result=result)
    outcome = call.report or {}
    for logged in outcome.get("logreports", []):
        item.ihook.pytest_runtest_logreport(report=_deserialize(item.config, logged))
    for warning in outcome.get("warnings", []):
        _replay_warning(warning)
    if outcome.get("exit") is not None:
        pytest.exit(outcome["exit"])
    if call.timed_out or (call.report is None and (result.oom_killed or result.pids_limit_hit)):
        pytest.fail(f"jail: {result.verdict()}", pytrace=False)
    if call.report is None:
        ending = describe_status(result.returncode)
        ending = f"was {ending}" if ending.startswith("killed") else ending
        pytest.fail(f"jail: the test body {ending} before it reported an outcome", pytrace=False)


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outermost: the jail's report is the final word
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Hand pytest the report the jail made (already through every plugin, in the jail), put what
    the jail stopped on top of it, and shorten jail errors to one line."""
    report: pytest.TestReport = yield
    jailed = item.stash.get(call_key, None)
    if call.when == "call" and jailed is not None and not item.stash.get(inside_key, False):
        result = item.stash.get(result_key, None)
        if jailed.report:
            report = _deserialize(item.config, jailed.report["report"])
            if result is not None and report.failed and (result.oom_killed or result.pids_limit_hit):
                report.longrepr = _Headed(f"jail: {result.verdict()}", report.longrepr)  # type: ignore[assignment]
        _note_blocked(report, result)
    if call.excinfo is not None and report.failed and isinstance(call.excinfo.value, JailError):
        error = call.excinfo.value
        report.longrepr = f"{type(error).__module__.split('.')[0]}.{type(error).__name__}: {error}"
    return report


def _note_blocked(report: pytest.TestReport, result: JailResult | None) -> None:
    """What the body tried to reach outside: a section of every report (``-rA`` shows it for
    passing tests too), and the first line of a failure."""
    line = None if result is None else result.blocked_line()
    if line is None or result is None:
        return
    assert result.blocked is not None  # there is a line
    report.sections.append(("jail: network access blocked", "\n".join(result.blocked)))
    if report.failed:
        report.longrepr = _Headed(f"jail: {line}", report.longrepr)  # type: ignore[assignment]


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
        if layers is not None and layers.paths and report.failed and not item.stash.get(inside_key, False):
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
        rootfs = kwargs.get("rootfs", self.spec.rootfs)
        layers = self._item.stash.get(layers_key, None)
        layer = layers.new() if layers is not None and rootfs is not None else None
        return Jail(self.spec, exposures=_exposures(self._item, rootfs, self._tmp, body=False), layer=layer)

    def run(self, argv: Any, **kwargs: Any) -> JailResult:
        """:meth:`Jail.run`, in the jail of this test."""
        jail = self._jail(kwargs)
        result: JailResult = _guard(self._item, lambda: jail.run(argv, **kwargs))
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
