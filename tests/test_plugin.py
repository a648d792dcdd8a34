"""The plugin as users meet it: marker, fixture, options, reports (pytester, real jails)."""

from __future__ import annotations

import os

import pytest
from conftest import CONTAINER_ROOT
from conftest import NO_NESTED_ROOT
from conftest import needs_jail
from conftest import needs_rootfs_jail
from conftest import needs_tun
from conftest import skip_unless_jail_root_owns

pytestmark = needs_jail


def test_outcomes_round_trip(jailed_pytester: pytest.Pytester) -> None:
    """pass, fail (pytest's own assertion message), skip, xfail, xpass and fixture values all cross."""
    jailed_pytester.makepyfile(
        """
        import os, pytest

        @pytest.fixture
        def config():
            return {"answer": 42}

        @pytest.mark.jail
        def test_pass(config):
            assert os.getpid() == 2 and config == {"answer": 42}

        @pytest.mark.jail
        def test_fail():
            left = [1, 2, 3]
            assert left == [1, 2, 4]

        @pytest.mark.jail
        def test_skip():
            pytest.skip("not today")

        @pytest.mark.jail
        @pytest.mark.xfail(reason="known bug")
        def test_xfail():
            assert False

        @pytest.mark.jail
        @pytest.mark.xfail(reason="fixed")
        def test_xpass():
            pass

        @pytest.mark.jail
        @pytest.mark.xfail(strict=True, reason="must fail")
        def test_xpass_strict():
            pass

        @pytest.mark.jail
        @pytest.mark.xfail(raises=ValueError, reason="only ValueError is expected")
        def test_xfail_other_exception():
            raise TypeError("not the expected one")
        """
    )
    result = jailed_pytester.runpytest_subprocess("-rA")
    result.assert_outcomes(passed=1, failed=3, skipped=1, xfailed=1, xpassed=1)
    result.stdout.fnmatch_lines(["FAILED *test_xfail_other_exception - TypeError*"])
    result.stdout.fnmatch_lines([
        "*def test_fail():*",
        "E       assert ?1, 2, 3? == ?1, 2, 4?",
        "*At index 2 diff: 3 != 4*",
        "?XPASS(strict)? must fail",
        "SKIPPED ?1? test_outcomes_round_trip.py:*: not today",
    ])


def test_captured_output_and_logging(jailed_pytester: pytest.Pytester) -> None:
    """stdout, stderr and logging of the body appear in the report sections."""
    jailed_pytester.makepyfile(
        """
        import logging, sys, pytest

        @pytest.mark.jail
        def test_noisy():
            print("to stdout")
            print("to stderr", file=sys.stderr)
            logging.getLogger("app").warning("a warning")
            assert 0
        """
    )
    result = jailed_pytester.runpytest_subprocess()
    result.stdout.fnmatch_lines([
        "*- Captured stdout call -*", "to stdout",
        "*- Captured stderr call -*", "to stderr",
        "*- Captured log call -*", "WARNING  app:*a warning",
    ])


def test_dash_s_shows_output_live(jailed_pytester: pytest.Pytester) -> None:
    """With -s the body's output goes straight to the terminal."""
    jailed_pytester.makepyfile(
        """
        import pytest

        @pytest.mark.jail
        def test_live():
            print("LIVE-OUTPUT")
        """
    )
    result = jailed_pytester.runpytest_subprocess("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*LIVE-OUTPUT*"])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("import ctypes; ctypes.string_at(0)", "jail: the test body was killed by signal 11 (SIGSEGV) before it reported an outcome"),
        ("import os; os._exit(7)", "jail: the test body exited with status 7 before it reported an outcome"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "jail: the test body was killed by signal 9 (SIGKILL)*"),
    ],
    ids=["segv", "os._exit", "sigkill"],
)
def test_body_that_dies(jailed_pytester: pytest.Pytester, body: str, message: str) -> None:
    """A body that dies is a failed report naming the signal or status, with the output so far."""
    jailed_pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.jail
        def test_dies():
            print("output so far")
            {body}

        def test_next():
            pass
        """
    )
    result = jailed_pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([message, "*- Captured stdout call -*", "output so far"])


def test_timeout_from_marker_cli_and_ini(jailed_pytester: pytest.Pytester) -> None:
    """timeout= kills a SIGTERM-ignoring body; the marker wins over CLI, the CLI over ini."""
    jailed_pytester.makeini("[pytest]\njail_timeout = 300\n")
    jailed_pytester.makepyfile(
        """
        import signal, time, pytest

        def stubborn():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("started")
            time.sleep(600)

        @pytest.mark.jail(timeout=0.5)
        def test_marker():
            stubborn()

        @pytest.mark.jail
        def test_cli():
            stubborn()
        """
    )
    result = jailed_pytester.runpytest_subprocess("--jail-timeout=1")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "*_ test_marker _*", "jail: timed out after 0.5s (wall clock); the whole jail was killed",
        "*- Captured stdout call -*", "started",
        "*_ test_cli _*", "jail: timed out after 1.0s (wall clock); the whole jail was killed",
    ])
    assert result.duration < 300  # both killed, long before the ini's timeout (however slow the machine)


def test_jail_all(jailed_pytester: pytest.Pytester) -> None:
    """--jail-all (and ini jail_all) jails every test body."""
    jailed_pytester.makepyfile(
        """
        import socket

        def test_hostname():
            assert socket.gethostname() == "jail"
        """
    )
    jailed_pytester.runpytest_subprocess().assert_outcomes(failed=1)
    jailed_pytester.runpytest_subprocess("--jail-all").assert_outcomes(passed=1)
    jailed_pytester.makeini("[pytest]\njail_all = true\n")
    jailed_pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_tmp_path_writable_and_host_read_only(jailed_pytester: pytest.Pytester) -> None:
    """tmp_path stays writable; the host's / is read-only; /tmp is private."""
    jailed_pytester.makepyfile(
        """
        import os, pytest

        @pytest.fixture
        def data(tmp_path):
            (tmp_path / "in.txt").write_text("from fixture")
            return tmp_path

        @pytest.mark.jail
        def test_files(data, tmp_path):
            assert (data / "in.txt").read_text() == "from fixture"
            (tmp_path / "in.txt").write_text("changed in jail")
            (tmp_path / "out.txt").write_text("written in jail")
            assert os.listdir("/tmp") == [tmp_path.parts[2]]  # only the way to tmp_path, nothing of the host's
            with pytest.raises(OSError, match="Read-only file system"):
                open("/etc/jail-was-here", "w")
            with pytest.raises(OSError, match="Read-only file system"):
                open(os.path.expanduser("~/jail-was-here"), "w")
        """
    )
    result = jailed_pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)


@pytest.mark.skipif(CONTAINER_ROOT, reason=NO_NESTED_ROOT)
def test_jail_fixture_unjailed_and_jailed(jailed_pytester: pytest.Pytester) -> None:
    """jail.run works in a plain test and inside a jailed body; string argv is refused."""
    jailed_pytester.makepyfile(
        """
        import pytest
        from pytest_jail import JailConfigError

        def test_plain(jail):
            r = jail.run(["ps", "-o", "pid="])
            assert r.returncode == 0
            assert r.stdout.split()[0] == "1"

        @pytest.mark.jail(hostname="outer", syscalls="nested")
        def test_nested(jail):
            r = jail.run(["hostname"], hostname="inner")
            assert r.stdout == "inner\\n"

        @pytest.mark.jail
        def test_nested_needs_the_filter_to_allow_it(jail):
            with pytest.raises(JailConfigError, match="syscalls='nested'"):
                jail.run(["hostname"])

        def test_string_refused(jail):
            with pytest.raises(JailConfigError, match="argv must be a non-empty list"):
                jail.run("echo hi")

        def test_timeout_result(jail):
            r = jail.run(["sleep", "30"], timeout=0.3)
            assert r.timed_out and r.returncode == -9
        """
    )
    jailed_pytester.runpytest_subprocess().assert_outcomes(passed=5)


@pytest.mark.parametrize(
    ("args", "source", "expected"),
    [
        ("timeout=-1", "jail marker on test_bad.py::test_bad", "timeout=-1 is not valid; allowed: a positive number"),
        ("net='wifi'", "jail marker on test_bad.py::test_bad", "net='wifi' is not a network mode; allowed: 'none', 'host', 'bridge', 'bridge:NAME'*"),
        ("rootfs='does/not/exist'", "jail marker on test_bad.py::test_bad", "rootfs='*does/not/exist' does not exist*"),
        ("colour='red'", "jail marker on test_bad.py::test_bad", "unknown argument 'colour'; allowed: rootfs, net*"),
    ],
)
def test_bad_marker_values(jailed_pytester: pytest.Pytester, args: str, source: str, expected: str) -> None:
    """A bad marker value errors the test at setup in one line naming the test and what is allowed."""
    jailed_pytester.makepyfile(
        test_bad=f"""
        import pytest

        @pytest.fixture
        def expensive():
            raise AssertionError("fixtures must not run when the jail setting is bad")

        @pytest.mark.jail({args})
        def test_bad(expensive):
            pass
        """
    )
    result = jailed_pytester.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*_ ERROR at setup of test_bad _*", f"pytest_jail.JailConfigError: {source}: {expected}"])
    result.stdout.no_fnmatch_line("*fixtures must not run*")


def test_bad_cli_and_ini_values(jailed_pytester: pytest.Pytester) -> None:
    """Bad option values stop pytest at start-up with one line naming the option or ini key."""
    jailed_pytester.makepyfile("def test_x(): pass")
    result = jailed_pytester.runpytest_subprocess("--jail-net=wifi")
    result.stderr.fnmatch_lines(["ERROR: --jail-net: net='wifi' is not a network mode; allowed: 'none', 'host', 'bridge', 'bridge:NAME'*"])
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    jailed_pytester.makeini("[pytest]\njail_timeout = soon\n")
    result = jailed_pytester.runpytest_subprocess()
    result.stderr.fnmatch_lines(["ERROR: ini jail_timeout (*tox.ini): timeout='soon' is not valid; allowed: a positive number"])
    result = jailed_pytester.runpytest_subprocess("--jail-io=fast", "-o", "jail_timeout=1")
    result.stderr.fnmatch_lines(["ERROR: --jail-io: io='fast' is not valid; allowed: 'read=SIZE,write=SIZE'*"])
    result = jailed_pytester.runpytest_subprocess("--jail-unavailable=maybe", "-o", "jail_timeout=1")
    result.stderr.fnmatch_lines(["ERROR: --jail-unavailable: 'maybe' is not allowed; allowed: fail, skip"])


@needs_tun
def test_precedence_marker_over_cli_over_ini(jailed_pytester: pytest.Pytester) -> None:
    """marker > CLI > ini for every setting (shown with net, through the visible links)."""
    jailed_pytester.makeini("[pytest]\njail_net = host\n")
    jailed_pytester.makepyfile(
        """
        import socket, pytest

        def links():
            return sorted(name for _, name in socket.if_nameindex())

        @pytest.mark.jail
        def test_default():
            print("LINKS", links())

        @pytest.mark.jail(net="none")
        def test_marker():
            assert links() == ["blocked0", "lo"]  # lo, and the recorder of blocked attempts
        """
    )
    result = jailed_pytester.runpytest_subprocess("-s")
    result.assert_outcomes(passed=2)
    assert "LINKS ['blocked0', 'lo']" not in result.stdout.str()
    result = jailed_pytester.runpytest_subprocess("-s", "--jail-net=none")
    result.stdout.fnmatch_lines(["*LINKS ?'blocked0', 'lo'?*"])


def test_report_header(jailed_pytester: pytest.Pytester) -> None:
    """The header shows in one line what this host supports."""
    jailed_pytester.makepyfile("def test_x(): pass")
    result = jailed_pytester.runpytest_subprocess()
    result.stdout.fnmatch_lines(["jail: namespaces user+mnt+pid+net+uts+ipc+cgroup (*)*"])


def test_hooks(jailed_pytester: pytest.Pytester) -> None:
    """pytest_jail_spec changes a test's jail; pytest_jail_result sees how the body ended."""
    jailed_pytester.makeconftest(
        """
        def pytest_jail_spec(item, spec):
            return spec.merged("conftest hook", {"hostname": "hooked"})

        def pytest_jail_result(item, result):
            print(f"RESULT {item.name} rc={result.returncode} timed_out={result.timed_out}")
        """
    )
    jailed_pytester.makepyfile(
        """
        import socket, pytest

        @pytest.mark.jail
        def test_name():
            assert socket.gethostname() == "hooked"
        """
    )
    result = jailed_pytester.runpytest_subprocess("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*RESULT test_name rc=0 timed_out=False*"])


def test_xdist_same_port(jailed_pytester: pytest.Pytester) -> None:
    """Under -n 2, two jailed tests bind the same TCP port at the same time, while the host holds it."""
    import socket

    pytest.importorskip("xdist", reason="needs pytest-xdist: pip install pytest-xdist")
    jailed_pytester.makepyfile(
        """
        import socket, time, pytest

        @pytest.mark.parametrize("n", [1, 2])
        @pytest.mark.jail
        def test_bind(n, tmp_path):
            server = socket.create_server(("127.0.0.1", 8765))
            started = time.time()
            time.sleep(1.0)
            server.close()
            print(f"HELD {started:.3f} {time.time():.3f}")
        """
    )
    host = socket.create_server(("127.0.0.1", 8765))  # the host holds the port all along
    try:
        result = jailed_pytester.runpytest_subprocess("-n", "2", "-p", "xdist", "-rP")
    finally:
        host.close()
    result.assert_outcomes(passed=2)
    spans = sorted(tuple(map(float, line.split()[1:3])) for line in result.stdout.lines if line.startswith("HELD"))
    assert len(spans) == 2 and spans[1][0] < spans[0][1], spans  # both held the port at the same time


@pytest.mark.skipif(__import__("shutil").which("unshare") is None, reason="needs util-linux unshare")
def test_host_without_user_namespaces_errors_or_skips(jailed_pytester: pytest.Pytester) -> None:
    """With user namespaces disabled (a real kernel limit), jailed tests error with cause and remedy
    (or skip with --jail-unavailable=skip); they never run un-jailed; plain tests still pass."""
    import subprocess
    import sys

    jailed_pytester.makepyfile(
        """
        import pytest

        @pytest.mark.jail
        def test_jailed():
            raise AssertionError("ran un-jailed")

        def test_run(jail):
            jail.run(["true"])

        def test_plain():
            pass
        """
    )

    def run(*args: str) -> str:
        # In a child user namespace whose namespace limit is 0, as on a host with
        # user.max_user_namespaces = 0; the limit is the kernel's, nothing is mocked.
        script = "echo 0 > /proc/sys/user/max_user_namespaces && exec \"$@\""
        argv = ["unshare", "--user", "--map-root-user", "sh", "-c", script, "sh",
                sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", *args]
        return subprocess.run(argv, cwd=jailed_pytester.path, capture_output=True, text=True).stdout

    out = run()
    assert "1 passed, 2 errors" in out, out
    assert "ran un-jailed" not in out
    assert "jail: unavailable on this host: user namespaces are disabled (user.max_user_namespaces = 0)" in out
    assert ("JailUnavailableError: user namespaces are disabled (user.max_user_namespaces = 0); "
            "run: sysctl -w user.max_user_namespaces=15000") in out
    out = run("--jail-unavailable=skip")
    assert "1 passed, 2 skipped" in out, out
    assert "jail unavailable: user namespaces are disabled" in out


@needs_rootfs_jail
def test_body_in_a_custom_rootfs(jailed_pytester: pytest.Pytester, busybox_rootfs: str) -> None:
    """A body in rootfs=DIR sees that tree as / (via --jail-rootfs) under a writable layer, imports
    its modules and fails with a proper traceback, because the runtime and rootdir are bound in
    read-only; what it wrote never reaches the tree."""
    skip_unless_jail_root_owns(busybox_rootfs)
    jailed_pytester.makepyfile(
        helper="def answer():\n    return 41\n",
        test_rootfs="""
        import os, pytest
        from helper import answer

        @pytest.mark.jail
        def test_world():
            assert open("/etc/marker").read() == "from the rootfs\\n"
            assert os.path.exists("/bin/busybox")
            with open("/etc/new", "w") as f:
                f.write("written in the jail")
            assert open("/etc/new").read() == "written in the jail"
            with pytest.raises(OSError, match="Read-only file system|Permission denied"):
                open("helper.py", "a")

        @pytest.mark.jail
        def test_traceback():
            assert answer() == 42
        """,
    )
    result = jailed_pytester.runpytest_subprocess(f"--jail-rootfs={busybox_rootfs}")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*def test_traceback():*", ">*assert answer() == 42", "E*assert 41 == 42*"])
    assert not os.path.exists(os.path.join(busybox_rootfs, "etc", "new"))
    assert (jailed_pytester.path / "helper.py").read_text().strip() == "def answer():\n    return 41"


def test_symlinked_rootfs_refused_at_setup(jailed_pytester: pytest.Pytester, tmp_path: os.PathLike[str]) -> None:
    """A rootfs whose /proc is a symlink to the host's is refused with one line, naming the marker."""
    root = os.path.join(tmp_path, "evil")
    os.mkdir(root)
    os.symlink("/proc", os.path.join(root, "proc"))
    jailed_pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.jail(rootfs={root!r})
        def test_x():
            pass
        """
    )
    result = jailed_pytester.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["pytest_jail.JailConfigError: jail marker on *: rootfs='*evil': */evil/proc is a symlink (to /proc)*"])


def test_unittest_and_doctest_items_are_jailed_too(jailed_pytester: pytest.Pytester) -> None:
    """--jail-all jails every kind of item, not only functions: a unittest case and a doctest."""
    jailed_pytester.makepyfile(
        test_kinds='''
        import os, socket, unittest

        def where():
            """
            >>> socket.gethostname(), os.getpid()
            ('jail', 2)
            """

        class Case(unittest.TestCase):
            def test_hostname(self):
                self.assertEqual((socket.gethostname(), os.getpid()), ("jail", 2))
        '''
    )
    result = jailed_pytester.runpytest_subprocess("--jail-all", "--doctest-modules")
    result.assert_outcomes(passed=2)
    jailed_pytester.runpytest_subprocess("--doctest-modules").assert_outcomes(failed=2)


def test_warnings_exit_and_subtests_cross_the_boundary(jailed_pytester: pytest.Pytester) -> None:
    """Warnings a body raises are reported as usual; pytest.exit() in a body ends the session."""
    jailed_pytester.makepyfile(
        test_w="""
        import warnings, pytest

        @pytest.mark.jail
        def test_warns():
            warnings.warn("old api", DeprecationWarning)
            warnings.warn("careful")
        """,
        test_x="""
        import pytest

        @pytest.mark.jail
        def test_exit():
            pytest.exit("enough for today")

        def test_never():
            pass
        """,
    )
    result = jailed_pytester.runpytest_subprocess("test_w.py")
    result.assert_outcomes(passed=1, warnings=2)
    result.stdout.fnmatch_lines(["*DeprecationWarning: old api*", "*UserWarning: careful*"])
    result = jailed_pytester.runpytest_subprocess("test_x.py")
    result.stdout.fnmatch_lines(["*Exit: enough for today*"])
    assert "test_never" not in result.stdout.str()


@pytest.mark.skipif(int(pytest.__version__.split(".")[0]) < 9, reason="subtests are built into pytest 9")
def test_subtests_of_a_jailed_body_are_reported(jailed_pytester: pytest.Pytester) -> None:
    """pytest 9's subtests log reports from inside the body: the parent reports them."""
    jailed_pytester.makepyfile(
        """
        import pytest

        @pytest.mark.jail
        def test_many(subtests):
            for i in range(3):
                with subtests.test(i=i):
                    assert i != 1
        """
    )
    result = jailed_pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*SUBFAIL*i=*1*"])


def test_interrupted_jail_run_does_not_resume_pytest_in_the_jail(jailed_pytester: pytest.Pytester) -> None:
    """An exception while jail.run waits (a test's own timeout, Ctrl-C) kills the jail; no jail
    process ever climbs back into pytest's stack to run the rest of the session."""
    jailed_pytester.makepyfile(
        """
        import os, signal, pytest

        def test_interrupted(jail):
            def stop(*_):
                raise TimeoutError("the test's own timeout")
            signal.signal(signal.SIGALRM, stop)
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            jail.run(["sleep", "5"])

        def test_after():
            print("AFTER in pid", os.getpid())
        """
    )
    result = jailed_pytester.runpytest_subprocess("-s")
    result.assert_outcomes(passed=1, failed=1)
    assert result.stdout.str().count("AFTER in pid") == 1
    assert result.stdout.str().count(" in ") >= 1 and result.stdout.str().count("short test summary") == 1
