"""Fidelity (issue 9): a jailed test behaves like an unjailed one, to pytest and to the plugins
people use. Each test runs a small project through pytester with the real plugins installed
(the test command installs them), usually twice, plain and with --jail-all, and compares.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import sys
import xml.etree.ElementTree as ET

import pytest
from conftest import needs_jail
from conftest import skip_unless_shown_id_mapped

pytestmark = needs_jail
PYTEST_9 = int(pytest.__version__.split(".")[0]) >= 9


def needs(module: str, package: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None, reason=f"needs the real plugin: pip install {package}"
    )


def outcomes(result: pytest.RunResult) -> dict[str, int]:
    return {k: v for k, v in result.parseoutcomes().items() if k not in ("warning", "warnings")}


def junit(path: os.PathLike[str]) -> dict[str, dict[str, object]]:
    """Each test case of a JUnit XML file: its outcome, properties, attributes, system-out."""
    root = ET.parse(path).getroot()
    cases = {}
    for case in root.iter("testcase"):
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        props = {p.get("name"): p.get("value") for p in case.iter("property") if not p.get("name", "").startswith("jail_")}
        out = case.find("system-out")
        cases[case.get("name", "")] = {
            "outcome": outcome, "properties": props, "attrs": {k: v for k, v in case.attrib.items() if k == "owner"},
            "stdout": "" if out is None or out.text is None else out.text,
        }
    return cases


# -- 1. The call phase, as pytest runs it ---------------------------------------------------------------


CAPTURE_TESTS = """
import logging, os, sys, pytest

def test_capsys(capsys):
    print("to capsys")
    assert capsys.readouterr().out == "to capsys\\n"

def test_capfd(capfd):
    os.write(1, b"fd one\\n")
    assert capfd.readouterr().out == "fd one\\n"

def test_caplog(caplog):
    logging.getLogger("app").warning("careful")
    assert caplog.records[0].getMessage() == "careful"

def test_noisy_failure():
    print("OUT-OF-THE-BODY")
    print("ERR-OF-THE-BODY", file=sys.stderr)
    logging.getLogger("app").error("LOG-OF-THE-BODY")
    assert False
"""


@pytest.mark.parametrize("capture", ["fd", "sys", "tee-sys", "no"])
def test_every_capture_mode_and_fixture(jailed_pytester: pytest.Pytester, capture: str) -> None:
    """--capture=fd|sys|tee-sys|no with capsys, capfd, caplog (and capteesys on pytest >= 8.4):
    the same outcomes as without the jail, and a failure's output where pytest puts it
    (faulthandler on, as by default: a body once died at start under --capture=sys)."""
    source = CAPTURE_TESTS
    if hasattr(pytest, "CaptureFixture") and _has_fixture("capteesys"):
        source += '\ndef test_capteesys(capteesys):\n    print("tee")\n    assert capteesys.readouterr().out == "tee\\n"\n'
    jailed_pytester.makepyfile(test_capture=source)
    plain = jailed_pytester.runpytest_subprocess(f"--capture={capture}")
    jailed = jailed_pytester.runpytest_subprocess(f"--capture={capture}", "--jail-all")
    assert outcomes(jailed) == outcomes(plain) and outcomes(plain)["failed"] == 1
    for text in ("OUT-OF-THE-BODY", "ERR-OF-THE-BODY"):
        assert text in jailed.stdout.str() + jailed.stderr.str()
    if capture != "no":
        jailed.stdout.fnmatch_lines(["*- Captured stdout call -*", "OUT-OF-THE-BODY",
                                     "*- Captured stderr call -*", "ERR-OF-THE-BODY",
                                     "*- Captured log call -*", "ERROR    app:*LOG-OF-THE-BODY"])


def _has_fixture(name: str) -> bool:
    from _pytest import capture

    return hasattr(capture, name)


def test_body_starts_after_the_setup_report(jailed_pytester: pytest.Pytester) -> None:
    """State a plugin prepares while the setup report is made and logged reaches the body
    (pytest-rerunfailures, only installed, once broke every jailed body this way)."""
    jailed_pytester.makeconftest(
        """
        import pytest

        @pytest.hookimpl(wrapper=True)
        def pytest_runtest_makereport(item, call):
            report = yield
            if report.when == "setup":
                item.made_at_setup_report = "made"
            return report

        def pytest_runtest_logreport(report):
            if report.when == "setup":
                pytest.LOGGED_SETUP = report.nodeid
        """
    )
    jailed_pytester.makepyfile(
        """
        import pytest

        def test_state(request):
            assert request.node.made_at_setup_report == "made"
            assert pytest.LOGGED_SETUP == request.node.nodeid
        """
    )
    jailed_pytester.runpytest_subprocess("--jail-all").assert_outcomes(passed=1)


@needs("pytest_rerunfailures", "pytest-rerunfailures")
def test_rerunfailures_every_attempt_in_a_fresh_jail(jailed_pytester: pytest.Pytester) -> None:
    """Installed, it changes nothing; with --reruns a flaky jailed test passes on its third
    attempt, and each attempt had a fresh jail (its /tmp empty at start)."""
    jailed_pytester.makepyfile(
        """
        import os, pytest

        @pytest.mark.jail
        def test_flaky(request):
            assert os.listdir("/tmp") == [] or all(n.startswith("pytest-of") for n in os.listdir("/tmp"))
            open("/tmp/left-by-an-attempt", "w").close()
            assert request.node.execution_count >= 3

        @pytest.mark.jail
        def test_plain():
            pass
        """
    )
    result = jailed_pytester.runpytest_subprocess("--reruns", "2", "-rR")
    assert outcomes(result) == {"passed": 2, "rerun": 2}
    jailed_pytester.runpytest_subprocess("-k", "plain").assert_outcomes(passed=1, deselected=1)


def test_properties_attributes_and_output_reach_junit_xml(jailed_pytester: pytest.Pytester) -> None:
    """record_property, record_xml_attribute, record_testsuite_property and, with
    junit_logging=all, the body's output: the same JUnit XML as without the jail."""
    jailed_pytester.makeini("[pytest]\njunit_logging = all\njunit_family = xunit1\n")
    jailed_pytester.makepyfile(
        """
        def test_records(record_property, record_xml_attribute, record_testsuite_property):
            record_property("answer", 42)
            record_xml_attribute("owner", "team-a")
            record_testsuite_property("build", "123")
            print("PRINTED-IN-THE-BODY")
        """
    )
    plain = jailed_pytester.path / "plain.xml"
    jailed = jailed_pytester.path / "jailed.xml"
    jailed_pytester.runpytest_subprocess(f"--junitxml={plain}").assert_outcomes(passed=1)
    jailed_pytester.runpytest_subprocess("--jail-all", f"--junitxml={jailed}").assert_outcomes(passed=1)
    assert junit(jailed) == junit(plain)
    case = junit(jailed)["test_records"]
    assert case["properties"] == {"answer": "42"} and case["attrs"] == {"owner": "team-a"}
    assert "PRINTED-IN-THE-BODY" in str(case["stdout"])
    suite = ET.parse(jailed).getroot().find(".//properties")
    assert suite is not None and [(p.get("name"), p.get("value")) for p in suite] == [("build", "123")]


def test_warnings_reach_the_summary(jailed_pytester: pytest.Pytester) -> None:
    """Warnings a body raises are counted and shown as without the jail, those recwarn and
    pytest.warns take are theirs (structlog's suite found them missing); -W error still fails."""
    jailed_pytester.makepyfile(
        """
        import warnings, pytest

        def test_warns():
            warnings.warn("old api", DeprecationWarning)
            warnings.warn("careful")

        def test_recwarn_takes_its_own(recwarn):
            warnings.warn("for recwarn")
            assert [str(w.message) for w in recwarn.list] == ["for recwarn"]

        def test_pytest_warns_takes_its_own():
            with pytest.warns(UserWarning, match="for pytest.warns"):
                warnings.warn("for pytest.warns")
        """
    )
    plain = jailed_pytester.runpytest_subprocess()
    jailed = jailed_pytester.runpytest_subprocess("--jail-all")
    assert jailed.parseoutcomes() == plain.parseoutcomes() == {"passed": 3, "warnings": 2}
    jailed.stdout.fnmatch_lines(["*DeprecationWarning: old api*", "*UserWarning: careful*"])
    jailed_pytester.runpytest_subprocess("--jail-all", "-W", "error:careful").assert_outcomes(failed=1, passed=2)


@pytest.mark.skipif(not PYTEST_9, reason="subtests are built into pytest 9")
@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "xdist"])
def test_subtests_counted_once(jailed_pytester: pytest.Pytester, workers: list[str]) -> None:
    """A failing subtest fails the test and each subtest is reported once, under xdist too."""
    if workers:
        pytest.importorskip("xdist", reason="needs pytest-xdist: pip install pytest-xdist")
    jailed_pytester.makepyfile(
        """
        def test_many(subtests):
            for i in range(3):
                with subtests.test(i=i):
                    assert i != 1
        """
    )
    plain = jailed_pytester.runpytest_subprocess(*workers)
    jailed = jailed_pytester.runpytest_subprocess("--jail-all", *workers)
    assert jailed.parseoutcomes() == plain.parseoutcomes() and jailed.parseoutcomes()["failed"] == 2
    subfailed = [line for line in plain.stdout.lines if line.startswith("SUBFAILED")]
    assert len(subfailed) == 1 and [line for line in jailed.stdout.lines if line.startswith("SUBFAILED")] == subfailed


# -- 2. A body that dies says why ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "args", [["--capture=fd"], ["--capture=sys"], ["--capture=no"], ["-n", "2"]], ids=["fd", "sys", "no", "xdist"]
)
def test_a_dying_body_says_why(jailed_pytester: pytest.Pytester, args: list[str]) -> None:
    """A segfault, and a plugin that breaks in the body after the test (as pytest-rerunfailures
    once did): the failure names the signal or status and holds the traceback the body printed
    (faulthandler's, or the plugin's)."""
    if "-n" in args:
        pytest.importorskip("xdist", reason="needs pytest-xdist: pip install pytest-xdist")
    jailed_pytester.makeconftest(
        """
        import os, pytest

        @pytest.hookimpl(wrapper=True)
        def pytest_runtest_makereport(item, call):
            report = yield
            if report.when == "call" and item.name == "test_plugin_breaks" and os.getpid() == 2:
                raise RuntimeError("the plugin broke in the body")
            return report
        """
    )
    jailed_pytester.makepyfile(
        """
        import ctypes, pytest

        def crash_here():
            ctypes.string_at(0)

        @pytest.mark.jail
        def test_segfault():
            crash_here()

        @pytest.mark.jail
        def test_plugin_breaks():
            pass
        """
    )
    result = jailed_pytester.runpytest_subprocess(*args)
    result.assert_outcomes(failed=2)
    text = result.stdout.str()
    assert "jail: the test body was killed by signal 11 (SIGSEGV) before it reported an outcome" in text
    assert "Fatal Python error: Segmentation fault" in text and re.search(r"line \d+ in crash_here", text)
    assert "jail: the test body exited with status 1 before it reported an outcome" in text
    assert "RuntimeError: the plugin broke in the body" in text


# -- 3. Coverage --------------------------------------------------------------------------------------

COVERED = """
def only_in_jails(x):
    if x > 0:
        return "positive"
    return "other"


def never_called():
    return None
"""


@needs("pytest_cov", "pytest-cov")
@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "xdist"])
def test_coverage_counts_jailed_bodies(jailed_pytester: pytest.Pytester, workers: list[str]) -> None:
    """pytest --cov counts the lines jailed bodies ran, as without the jail (the module is used
    by jailed tests only), under xdist too; nothing in the jail writes the project tree."""
    jailed_pytester.makepyfile(covered=COVERED)
    jailed_pytester.makepyfile(
        test_cov="""
        import covered, pytest

        @pytest.mark.jail
        def test_positive():
            assert covered.only_in_jails(1) == "positive"

        @pytest.mark.jail
        def test_other():
            assert covered.only_in_jails(0) == "other"
        """
    )
    args = ["--cov=covered", "--cov-report=term-missing", *workers]
    result = jailed_pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["covered.py * 6 * 1 * 83% * 8"])  # only never_called's body is missed
    jailed_pytester.runpytest_subprocess(*args, "-p", "no:jail", "-W", "ignore::pytest.PytestUnknownMarkWarning")\
        .stdout.fnmatch_lines(["covered.py * 6 * 1 * 83% * 8"])


@needs("pytest_cov", "pytest-cov")
def test_coverage_of_programs_jail_run_starts(jailed_pytester: pytest.Pytester) -> None:
    """With coverage's subprocess support configured, a Python program a jail.run() command starts
    is measured too."""
    jailed_pytester.makepyfile(covered=COVERED)
    (jailed_pytester.path / ".coveragerc").write_text("[run]\npatch = subprocess\n")
    jailed_pytester.makepyfile(
        test_sub=f"""
        import sys

        def test_sub(jail):
            r = jail.run([{sys.executable!r}, "-c", "import covered; covered.only_in_jails(1)"])
            assert r.returncode == 0, r.stderr
        """
    )
    result = jailed_pytester.runpytest_subprocess("--cov=covered", "--cov-report=term-missing")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["covered.py * 6 * 2 * 67% * 4, 8"])


# -- 4. The plugins people use ------------------------------------------------------------------------


@needs("xdist", "pytest-xdist")
@pytest.mark.parametrize("dist", ["loadfile", "loadgroup"])
def test_xdist_distribution_modes(jailed_pytester: pytest.Pytester, dist: str) -> None:
    """--dist loadfile and loadgroup: the same outcomes as without the jail."""
    for name in ("a", "b"):
        jailed_pytester.makepyfile(**{f"test_{name}": f"""
            import pytest, socket

            @pytest.mark.xdist_group("g{name}")
            @pytest.mark.parametrize("n", range(3))
            def test_{name}(n):
                assert socket.gethostname() == "jail" or n >= 0
                assert n != 2
            """})
    plain = jailed_pytester.runpytest_subprocess("-n", "2", f"--dist={dist}")
    jailed = jailed_pytester.runpytest_subprocess("-n", "2", f"--dist={dist}", "--jail-all")
    assert outcomes(jailed) == outcomes(plain) == {"passed": 4, "failed": 2}


@needs("pytest_timeout", "pytest-timeout")
@pytest.mark.parametrize("method", ["signal", "thread"])
def test_pytest_timeout_shows_the_bodys_own_stack(jailed_pytester: pytest.Pytester, method: str) -> None:
    """A hung jailed test fails at pytest-timeout's limit with the stack of the body, where it
    hung (not pytest-jail's wait); the session goes on. (The limit is the call's alone,
    ``func_only``: the jail is built in the setup phase, which an emulated kernel made last over
    a second.)"""
    jailed_pytester.makepyfile(
        f"""
        import time, pytest

        def where_it_hangs():
            time.sleep(300)

        @pytest.mark.jail
        @pytest.mark.timeout(3, method="{method}", func_only=True)
        def test_hangs():
            where_it_hangs()

        def test_next():
            pass
        """
    )
    result = jailed_pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1, passed=1)
    failure = result.stdout.str().split("_ test_hangs _")[1].split("short test summary")[0]
    assert "Timeout (>3.0s) from pytest-timeout" in failure
    assert "where_it_hangs" in failure  # the body's own frame...
    assert "_read_until_closed" not in failure and "_jailed_runtest" not in failure.split("where_it_hangs")[0]


@needs("hypothesis", "hypothesis")
def test_hypothesis_database_persists(jailed_pytester: pytest.Pytester) -> None:
    """Hypothesis saves its failing example from a jailed body, with no warning, and the next
    run replays it, as without the jail."""
    skip_unless_shown_id_mapped(str(jailed_pytester.path), "hypothesis's database in the rootdir")
    # Hypothesis loads its "ci" profile (no database) where CI is set, as in CI: not this project.
    jailed_pytester.makeconftest("from hypothesis import settings\nsettings.load_profile('default')\n")
    jailed_pytester.makepyfile(
        """
        import pytest
        from hypothesis import given, settings, strategies as st

        @pytest.mark.jail
        @settings(derandomize=False)
        @given(st.integers())
        def test_property(x):
            assert x < 1000
        """
    )
    first = jailed_pytester.runpytest_subprocess()
    first.assert_outcomes(failed=1)
    assert "HypothesisWarning" not in first.stdout.str() + first.stderr.str()
    examples = jailed_pytester.path / ".hypothesis" / "examples"
    assert examples.is_dir() and any(examples.iterdir())
    second = jailed_pytester.runpytest_subprocess("--hypothesis-show-statistics")
    second.assert_outcomes(failed=1)
    second.stdout.fnmatch_lines([  # (the statistics cross the jail too)
        "*during reuse phase*", "*0 passing, 1 failing*", "*Found 1 distinct error in this phase*",
    ])


@needs("pytest_randomly", "pytest-randomly")
def test_randomly_orders_and_seeds_as_without_the_jail(jailed_pytester: pytest.Pytester,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """pytest-randomly, with a seed: the same order and the same random values in jailed bodies."""
    monkeypatch.delenv("PYTEST_ADDOPTS")
    jailed_pytester.makepyfile(
        """
        import random, pytest

        @pytest.mark.parametrize("n", range(6))
        def test_value(n):
            print(f"VALUE {n} {random.random()}")
        """
    )

    def values(*args: str) -> list[str]:
        result = jailed_pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", "--randomly-seed=1234", *args)
        return re.findall(r"VALUE \d+ [\d.e-]+", result.stdout.str())

    plain = values()
    assert len(plain) == 6 and plain != sorted(plain)  # shuffled, and seeded
    assert values("--jail-all") == plain


@needs("pytest_asyncio", "pytest-asyncio")
@needs("pytest_mock", "pytest-mock")
def test_asyncio_and_mock(jailed_pytester: pytest.Pytester) -> None:
    """An async jailed test (pytest-asyncio) and the mocker fixture (pytest-mock)."""
    jailed_pytester.makepyfile(
        """
        import asyncio, os, pytest

        @pytest.mark.asyncio
        @pytest.mark.jail
        async def test_async():
            await asyncio.sleep(0.01)
            assert os.getpid() == 2

        @pytest.mark.jail
        def test_mocker(mocker):
            mocker.patch("os.getcwd", return_value="/mocked")
            assert os.getcwd() == "/mocked"
        """
    )
    jailed_pytester.runpytest_subprocess().assert_outcomes(passed=2)


def test_pdb_and_breakpoint_on_a_terminal(jailed_pytester: pytest.Pytester) -> None:
    """--pdb stops in a jailed body's failure with its locals; breakpoint() works in a body."""
    pty = pytest.importorskip("pty", reason="needs a pseudo-terminal")
    import select
    import time

    jailed_pytester.makepyfile(
        """
        import pytest

        @pytest.mark.jail
        def test_fails():
            secret = 41
            assert secret == 42

        @pytest.mark.jail
        def test_breaks():
            value = 7
            breakpoint()
        """
    )

    def drive(*args: str) -> str:
        pid, fd = pty.fork()
        if pid == 0:
            os.chdir(jailed_pytester.path)
            os.execv(sys.executable, [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly",
                                      *args])
        out, answers = b"", [b"p secret\n", b"p value\n", b"c\n"]
        deadline = time.monotonic() + 240  # a bound, not a speed: emulated kernels are slow
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
                if answers and out.rstrip().endswith(b"(Pdb)"):
                    os.write(fd, answers.pop(0))
        os.kill(pid, signal.SIGKILL)  # (if it still waits at a prompt)
        os.waitpid(pid, 0)
        return out.decode(errors="replace")

    post_mortem = drive("--pdb", "test_pdb_and_breakpoint_on_a_terminal.py::test_fails")
    assert "(Pdb) p secret\r\n41" in post_mortem and "1 failed" in post_mortem, post_mortem
    stopped = drive("test_pdb_and_breakpoint_on_a_terminal.py::test_breaks")
    assert "(Pdb) p value\r\n7" in stopped and "1 passed" in stopped, stopped


def test_exitfirst_lastfailed_keyword_durations(jailed_pytester: pytest.Pytester,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """-x stops at the first jailed failure; --lf and --ff know jailed failures (pytest's cache is
    written in pytest's process); -k selects; --durations lists the body's own call time."""
    monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:randomly")
    jailed_pytester.makepyfile(
        """
        import time

        def test_a_fails():
            assert False

        def test_b_slow():
            time.sleep(0.3)

        def test_c_fails():
            assert False
        """
    )
    jailed_pytester.runpytest_subprocess("--jail-all", "-x").assert_outcomes(failed=1)
    jailed_pytester.runpytest_subprocess("--jail-all").assert_outcomes(failed=2, passed=1)
    lf = jailed_pytester.runpytest_subprocess("--jail-all", "--lf")
    assert outcomes(lf) == {"failed": 2, "deselected": 1} or outcomes(lf) == {"failed": 2}
    lf.stdout.fnmatch_lines(["run-last-failure: rerun previous 2 failures*"])
    ff = jailed_pytester.runpytest_subprocess("--jail-all", "--ff", "-v")
    ran = [line.split("::")[1].split()[0] for line in ff.stdout.lines if re.search(r"::test_\w+ (PASSED|FAILED)", line)]
    assert ran == ["test_a_fails", "test_c_fails", "test_b_slow"], ran
    jailed_pytester.runpytest_subprocess("--jail-all", "-k", "slow").assert_outcomes(passed=1, deselected=2)
    durations = jailed_pytester.runpytest_subprocess("--jail-all", "-k", "slow", "--durations=0")  # setup may be slower
    (line,) = [line for line in durations.stdout.lines if re.search(r"s call .*test_b_slow", line)]
    assert float(line.split("s call")[0]) >= 0.3, line  # the body's own time, however slow the machine


# -- 5. Session data, and the network it had ----------------------------------------------------------


def test_session_temp_dir_is_visible_read_only(jailed_pytester: pytest.Pytester) -> None:
    """What a session fixture made with tmp_path_factory is readable (a 0600 file too), not
    writable; the test's own tmp_path inside it is writable."""
    skip_unless_shown_id_mapped(str(jailed_pytester.path), "the session's base temp dir")
    jailed_pytester.makepyfile(
        """
        import os, pytest

        @pytest.fixture(scope="session")
        def data(tmp_path_factory):
            d = tmp_path_factory.mktemp("data")
            (d / "secret.txt").write_text("session data")
            os.chmod(d / "secret.txt", 0o600)
            return d

        @pytest.mark.jail
        def test_reads(data, tmp_path):
            assert (data / "secret.txt").read_text() == "session data"
            with pytest.raises(OSError, match="Read-only file system"):
                (data / "new.txt").write_text("no")
            (tmp_path / "mine.txt").write_text("yes")
            assert (tmp_path / "mine.txt").read_text() == "yes"
        """
    )
    jailed_pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_refused_connection_names_the_network(jailed_pytester: pytest.Pytester) -> None:
    """A jailed test that cannot reach a fixture's server on the host's loopback says in one line
    which network it had and the way out."""
    jailed_pytester.makepyfile(
        """
        import socket, pytest

        @pytest.fixture
        def port():
            server = socket.create_server(("127.0.0.1", 0))
            yield server.getsockname()[1]
            server.close()

        @pytest.mark.jail
        def test_client(port):
            socket.create_connection(("127.0.0.1", port), timeout=2)

        @pytest.mark.jail(net="host")
        def test_host_network(port):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        """
    )
    result = jailed_pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines([
        "jail: this test had net='none' (its own loopback only): a server on the host's loopback, a fixture's "
        "included, is out of its reach; use net='host', or start the server in the test body",
        "*ConnectionRefusedError*",
    ])


# -- 6. The jail's own cgroup, inside ----------------------------------------------------------------


def test_a_program_reads_its_jails_limits(jailed_pytester: pytest.Pytester) -> None:
    """With memory='64M', /sys/fs/cgroup in the jail shows the jail's own group and that limit
    (v1 and v2), as a container shows it; /proc/self/cgroup shows the jail's group as /."""
    from pytest_jail._cgroups.manager import Unavailable
    from pytest_jail._host import host

    try:
        host().cgroups()
    except Unavailable as exc:
        pytest.skip(f"no cgroups for jails here: {exc.reason}")
    jailed_pytester.makepyfile(
        """
        import os, pytest

        @pytest.mark.jail(memory="64M", pids=50)
        def test_limits():
            if os.path.exists("/sys/fs/cgroup/memory.max"):
                limit = open("/sys/fs/cgroup/memory.max").read()
            else:
                limit = open("/sys/fs/cgroup/memory/memory.limit_in_bytes").read()
            assert int(limit) == 64 << 20
            assert all(line.endswith(":/") for line in open("/proc/self/cgroup").read().split())
        """
    )
    jailed_pytester.runpytest_subprocess().assert_outcomes(passed=1)


# -- 7. Rough edges a new user hit --------------------------------------------------------------------


def test_bad_inputs_are_one_line(jailed_pytester: pytest.Pytester) -> None:
    """memory below the minimum, ini jail_all=maybe: one line each, naming the source."""
    jailed_pytester.makepyfile("def test_x(): pass")
    result = jailed_pytester.runpytest_subprocess("--jail-memory=10")
    result.stderr.fnmatch_lines(["ERROR: --jail-memory: memory='10' is not valid; allowed: a size of at least 4M*"])
    jailed_pytester.makeini("[pytest]\njail_all = maybe\n")
    result = jailed_pytester.runpytest_subprocess()
    result.stderr.fnmatch_lines(["ERROR: ini jail_all (*tox.ini): 'maybe' is not valid; allowed: true or false*"])
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_jail_net_help_names_every_mode(jailed_pytester: pytest.Pytester) -> None:
    result = jailed_pytester.runpytest_subprocess("--help")
    text = " ".join(result.stdout.str().split())
    assert "--jail-net=JAIL_NET default network of jails: none" in text
    assert all(mode in text.split("--jail-net")[1][:200] for mode in ("none", "host", "bridge", "bridge:NAME"))


def test_a_missing_program_is_not_found(jailed_pytester: pytest.Pytester) -> None:
    """jail.run(['ls -l']) says no such program, with the hint, and is a FileNotFoundError."""
    jailed_pytester.makepyfile(
        """
        import pytest

        def test_missing(jail):
            with pytest.raises(FileNotFoundError, match=r"cannot run 'ls -l': no such program on PATH .*"
                               r"argv is a list of words.*\\['ls', '-l'\\]"):
                jail.run(["ls -l"])
        """
    )
    jailed_pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_oom_while_the_jail_is_built_says_so(jailed_pytester: pytest.Pytester) -> None:
    """A jail its own memory limit kills while it is built is a setup error naming the limit."""
    from pytest_jail._cgroups.manager import Unavailable
    from pytest_jail._host import host

    try:
        host().cgroups()
    except Unavailable as exc:
        pytest.skip(f"no cgroups for jails here: {exc.reason}")
    jailed_pytester.makeconftest("BIG = bytearray(3 << 30)  # a big pytest: forks of it need page tables\n")
    jailed_pytester.makepyfile(
        """
        import pytest

        @pytest.mark.jail(memory="4M")
        def test_small():
            pass
        """
    )
    result = jailed_pytester.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        "*JailSetupError: jail setup failed at step 'memory limit': the OOM killer killed the jail while it was "
        "being built: its memory limit (4M) is too small for the jail itself*"
    ])


def test_console_script_usage_and_broken_archives(tmp_path: os.PathLike[str]) -> None:
    """pytest-jail with no command, and rootfs with no kind, print their usage and exit 2; a
    truncated or garbage archive to import is one line (exit 2), and nothing is left half-built."""
    import subprocess

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pytest_jail.cli", *args], capture_output=True, text=True)

    for args, usage in (((), "usage: pytest-jail [-h] COMMAND"), (("rootfs",), "usage: pytest-jail rootfs [-h] KIND")):
        done = cli(*args)
        assert done.returncode == 2 and done.stderr.startswith(usage), done.stderr
    broken = os.path.join(tmp_path, "image.tar.gz")
    with open(broken, "wb") as f:
        f.write(b"\x1f\x8b\x08\x00truncated")
    target = os.path.join(tmp_path, "tree")
    done = cli("rootfs", "import", broken, target)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "not a tar archive (plain, gzip, bzip2 or xz)" in done.stderr and not os.path.exists(target)
