"""Networks between jails (issue 5): bridges and isolated segments on real veth pairs, services
with jail.spawn, addresses that never collide, nothing left behind. Root only (a bridge lives in
the host's network namespace); rootless gets a clear error.

Every address a test aims at is either a jail's (198.18.0.0/15, routed nowhere but our bridges)
or a documentation address a bridged jail has no route to: no packet leaves this machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_busybox
from conftest import needs_jail
from conftest import needs_tun
from conftest import root_mode
from conftest import rootless_mode

from pytest_jail import Jail
from pytest_jail import JailConfigError
from pytest_jail import JailSpec
from pytest_jail import JailUnavailableError

pytestmark = [needs_jail, needs_busybox]


@pytest.fixture(autouse=True)
def one_at_a_time_where_it_counts(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests that look at the host's links and tables as a whole run alone; the others share.
    (A lock file under the session's base temp dir, which pytest-xdist's workers have in common.)"""
    import fcntl

    whole_host = request.node.get_closest_marker("whole_host") is not None
    with open(tmp_path_factory.getbasetemp().parent / "net-tests.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if whole_host else fcntl.LOCK_SH)
        yield


def _links() -> set[str]:
    return {name for name in os.listdir("/sys/class/net") if name.startswith(("pjbr", "pjv"))}


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A directory busybox httpd serves (world-readable: root mode runs the jail as another uid)."""
    (tmp_path / "index.html").write_text("hello from the jail\n")
    os.chmod(tmp_path, 0o755)
    os.chmod(tmp_path / "index.html", 0o644)
    return tmp_path


HTTPD = ["busybox", "httpd", "-f", "-p", "8000", "-h", "/srv"]


@root_mode
def test_jails_on_a_segment_talk_and_other_segments_cannot(site: Path) -> None:
    """A server and a client on bridge:x talk TCP by hostname; a jail on bridge:y cannot reach the
    server (at once: it has no route), and neither can the test process reach beyond the segment."""
    jail = Jail()
    with jail.spawn(HTTPD, net="bridge:x", hostname="server", binds=[f"{site}:/srv"]) as server:
        server.wait_for_port(8000)
        assert server.ip is not None and server.ip.startswith("198.1")
        client = jail.run(["busybox", "wget", "-q", "-O", "-", "http://server:8000/"], net="bridge:x", hostname="client")
        assert client.stdout == "hello from the jail\n", client.stderr
        other = jail.run(["busybox", "nc", "-w", "5", server.ip, "8000"], net="bridge:y", input="GET / HTTP/1.0\r\n\r\n")
        assert other.returncode != 0 and other.stdout == ""
        assert "unreachable" in other.stderr.lower(), other.stderr
        assert "timed out" not in other.stderr  # refused by routing, not left to time out
    assert server.wait().returncode == -signal.SIGTERM


@root_mode
def test_test_process_reaches_a_spawned_server_by_ip(site: Path) -> None:
    """jail.spawn on net='bridge': the test process talks to the service at .ip; the service sees
    the host side as 'gateway'; .pid is the host pid of the command; output is collected."""
    with Jail().spawn([*HTTPD, "-vv"], net="bridge", hostname="web", binds=[f"{site}:/srv"]) as server:
        server.wait_for_port(8000)
        with urllib.request.urlopen(f"http://{server.ip}:8000/index.html", timeout=5) as reply:
            assert reply.read() == b"hello from the jail\n"
        assert server.pid is not None and open(f"/proc/{server.pid}/comm").read().strip() == "busybox"
        hosts = Jail().run(["cat", "/etc/hosts"], net="bridge", hostname="peer").stdout
        assert f"{server.ip}\tweb" in hosts and "\tgateway" in hosts and "\tpeer" in hosts
    result = server.wait()
    assert "GET /index.html" in result.stderr or "index.html" in result.stderr, result.stderr


@root_mode
def test_off_segment_attempts_fail_at_once_and_send_nothing() -> None:
    """A bridged jail has no route off its segment: a connect to a documentation address fails with
    ENETUNREACH at once, its eth0 sends nothing (the host's bridge sees no packet), and the attempt
    is recorded."""
    # /proc/net/dev is the jail's own network namespace (/sys would show the host's devices).
    sent = "awk '$1 == \"eth0:\" {print $11}' /proc/net/dev"
    script = f"{sent}; busybox nc -w 2 203.0.113.7 80 </dev/null; echo rc=$?; {sent}"
    result = Jail().run(["sh", "-c", script], net="bridge:quiet")
    before, rc, after = result.stdout.split()
    assert rc != "rc=0" and "unreachable" in result.stderr.lower(), result.stderr
    assert before == after  # not one packet left the jail's interface
    assert result.blocked == ["tcp 203.0.113.7:80"]  # it went to the recorder instead


@root_mode
def test_wait_for_port_reports_a_jail_that_ended() -> None:
    """wait_for_port on a service that exits says so with its result, not after the timeout."""
    from pytest_jail import JailProcessError

    process = Jail().spawn(["sh", "-c", "echo bye >&2; exit 3"], net="bridge")
    with pytest.raises(JailProcessError) as info:
        process.wait_for_port(8000, timeout=30)
    assert info.value.result.returncode == 3 and info.value.result.stderr == "bye\n"


def test_wait_for_port_needs_a_reachable_network() -> None:
    """A service with net='none' cannot be reached from outside: one clear line, at once."""
    process = Jail().spawn(["sleep", "30"])
    try:
        with pytest.raises(JailConfigError, match="net='none': nothing outside the jail can reach its ports"):
            process.wait_for_port(80)
    finally:
        assert process.kill().returncode == -signal.SIGKILL


@rootless_mode
def test_rootless_bridge_is_refused_with_the_cause() -> None:
    """Rootless, a bridge cannot be made: the error says why and what to do, and nothing runs."""
    # (a container's root, without CAP_SYS_ADMIN, is told which capabilities it lacks)
    with pytest.raises(JailUnavailableError, match="needs (pytest to run as root|a root with CAP_SYS_ADMIN).*net='none'"):
        Jail(JailSpec(net="bridge")).run(["true"])


def test_the_doctors_bridges_line_is_what_a_bridged_jail_does() -> None:
    """The doctor makes a bridge and a veth pair in a throwaway namespace of its own; its verdict is
    what a bridged jail then does (root: both work where the kernel has the drivers; rootless or a
    container's root: both refused)."""
    from pytest_jail._doctor import examine

    (line,) = [f for f in examine(bridge=True) if f.name == "bridges"]
    try:
        Jail(JailSpec(net="bridge")).run(["true"], check=True)
        works = True
    except JailUnavailableError:
        works = False
    assert line.ok == works, line


def test_a_kernel_without_the_bridge_driver_is_named_with_modprobe() -> None:
    """What a kernel whose bridge or veth driver is neither built in nor loadable answers
    (EOPNOTSUPP, as a guest without its modules did) becomes the cause and the fix."""
    import errno

    from pytest_jail._linux.net import _step

    for kind in ("bridge", "veth"):
        with pytest.raises(JailUnavailableError, match=f"cannot make a {kind} .*Operation not supported") as caught:
            with _step(f"{kind} pj0"):
                raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        assert f"modprobe {kind}" in caught.value.remedy


@root_mode
@pytest.mark.whole_host
def test_parallel_sessions_never_share_a_subnet_and_leave_nothing(jailed_pytester: pytest.Pytester) -> None:
    """pytest -n 2, each test on bridge:x: the two workers get different subnets (a segment belongs
    to one process), and no bridge, veth or lease is left after the run."""
    jailed_pytester.makepyfile(
        test_many="""
        import pathlib, time, pytest

        @pytest.mark.parametrize("n", range(6))
        def test_on_segment(jail, n):
            with jail.spawn(["sleep", "1"], net="bridge:x") as p:  # overlap the two workers' jails
                r = jail.run(["sh", "-c", "ip -4 -o addr show eth0"], net="bridge:x")
            assert r.returncode == 0
            pathlib.Path(__file__).with_name(f"addr-{n}").write_text(r.stdout.split()[3] + " " + p.ip)
        """
    )
    before = _links()
    result = jailed_pytester.runpytest_subprocess("-n", "2", "-p", "xdist")
    result.assert_outcomes(passed=6)
    seen = [(jailed_pytester.path / f"addr-{n}").read_text().split() for n in range(6)]
    subnets = {address.rsplit(".", 2)[0] + "." + address.split(".")[2] for address, _ in seen}
    assert len(subnets) == 2, seen  # one segment per worker process, never the same subnet
    from leftovers import _leased

    assert [n for n in _links() - before if not _leased(n)] == []  # (another worker's live ones may come)
    assert [e for e in os.listdir("/run/pytest-jail/net") if e.split(".")[0].isdigit()] == [] or before


@root_mode
@pytest.mark.whole_host
@pytest.mark.leftovers
def test_killed_session_leaves_links_the_next_one_removes(jailed_pytester: pytest.Pytester, outside: str) -> None:
    """SIGKILL pytest while a bridged jail with a way out runs: its bridge, veth, nftables table
    and forwarding setting stay (nobody could remove them); the next pytest start removes them
    when it makes its first jail, and puts the host's forwarding setting back."""
    uplink = next(n for n in os.listdir("/sys/class/net") if n.startswith("pjtest") and n.endswith("h"))
    jailed_pytester.makepyfile(
        test_hang=f"""
        def test_hang(jail):
            p = jail.spawn(["sleep", "60"], net="bridge:x", allow=["{outside}:8080"])
            print("SPAWNED", flush=True)
            import time; time.sleep(60)
        """,
        test_nothing="def test_nothing(jail):\n    jail.run(['true'])\n",
    )
    before = _links()
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-s", "-p", "no:cacheprovider", "test_hang.py"],
                            cwd=jailed_pytester.path, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "SPAWNED" in line:
            break
    proc.kill()
    proc.wait()
    left = _links() - before
    bridges = [n for n in left if n.startswith("pjbr")]
    assert bridges, left  # the dead session's bridge
    from pytest_jail._linux import firewall

    # Its segment's table and its uplink's guard (other workers' own tables may come and go).
    its_tables = {f"pytest_jail_{bridges[0].removeprefix('pjbr')}", firewall.guard_table(uplink)}
    assert its_tables <= set(_tables()), _tables()
    assert open(f"/proc/sys/net/ipv4/conf/{uplink}/forwarding").read() == "1\n"
    time.sleep(2.5)  # a free lease counts as stale once it is 2 s old (not one being taken right now)
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "test_nothing.py"],
                          cwd=jailed_pytester.path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
    assert _links() & left == set()  # what the killed session left is gone
    assert its_tables & set(_tables()) == set()
    assert open(f"/proc/sys/net/ipv4/conf/{uplink}/forwarding").read() == "0\n"

def _tables() -> list[str]:
    listed = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout.split()
    return [t for t in listed if t.startswith("pytest_jail")]


@root_mode
def test_allow_lets_exactly_that_through_with_nat(outside: str) -> None:
    """allow=['203.0.113.2:8080']: that port answers, and sees the host's address (NAT); another
    port of that host is refused by the kernel's filter at once; another host is recorded as
    blocked. With nat=True everything answers. Forwarding and rules are given back after."""
    forwarding_before = open("/proc/sys/net/ipv4/conf/all/forwarding").read()
    script = (
        f"busybox nc -w 3 {outside} 8080 </dev/null; echo rc=$?; "
        f"busybox nc -w 3 {outside} 9090 </dev/null; echo rc=$?; "
        "busybox nc -w 3 203.0.113.77 80 </dev/null; echo rc=$?"
    )
    allowed = Jail().run(["sh", "-c", script], net="bridge:out", allow=[f"{outside}:8080"])
    assert allowed.stdout.split() == ["203.0.113.1", "rc=0", "rc=1", "rc=1"], (allowed.stdout, allowed.stderr)
    # Refused at once, not left to time out: the filter's "prohibited", the recorder's "unreachable".
    assert "No route to host" in allowed.stderr and "Network is unreachable" in allowed.stderr, allowed.stderr
    assert "timed out" not in allowed.stderr
    assert allowed.blocked == ["tcp 203.0.113.77:80"]
    everything = Jail().run(["sh", "-c", f"busybox nc -w 3 {outside} 9090 </dev/null"], net="bridge:out", nat=True)
    assert everything.stdout == "203.0.113.1\n", everything.stderr
    assert open("/proc/sys/net/ipv4/conf/all/forwarding").read() == forwarding_before


def test_nat_and_allow_need_a_bridge() -> None:
    """nat and allow without a bridge, or a malformed allow entry: one line each."""
    with pytest.raises(JailConfigError, match=r"nat=True needs a way out: net='bridge' or 'bridge:NAME' \(got net='none'\)"):
        JailSpec(nat=True)
    with pytest.raises(JailConfigError, match="allow='10.0.0.1' is not valid; allowed: a list"):
        JailSpec(net="bridge", allow="10.0.0.1")
    with pytest.raises(JailConfigError, match="'example.com:443': an IPv4 address or network"):
        JailSpec(net="bridge", allow=["example.com:443"])
    assert JailSpec(net="bridge", allow=["10.1.2.3:5432", "10.0.0.0/8"]).allow == ("10.1.2.3/32:5432", "10.0.0.0/8")


@needs_tun
def test_blocked_attempts_of_a_c_program_are_recorded() -> None:
    """net='none': a connect by a C program (busybox nc) and a name lookup by Python fail at once,
    as without a network, and the result names both; nothing reaches any host interface (the
    recorder's device has no other end)."""
    script = (
        "busybox nc -w 5 93.184.216.34 443 </dev/null; "
        "python3 -c \"import socket; socket.getaddrinfo('example.com', 443)\" 2>&1 | tail -1; "
        "busybox nc -u -w 1 192.0.2.77 5000 </dev/null"
    )
    result = Jail().run(["sh", "-c", script])
    assert "timed out" not in result.stderr  # no connect hung until its timeout
    assert "Network is unreachable" in result.stderr, result.stderr
    assert result.blocked is not None
    assert result.blocked[:2] == ["tcp 93.184.216.34:443", "dns example.com"], result.blocked
    assert result.blocked_line() is not None and result.blocked_line().startswith(
        "network access blocked: tcp 93.184.216.34:443, dns example.com")


@needs_tun
def test_host_network_records_nothing() -> None:
    """net='host' is the host's own network: nothing is recorded (None, not an empty list)."""
    assert Jail().run(["true"], net="host").blocked is None
    assert Jail().run(["true"]).blocked == []


@needs_tun
def test_report_names_what_a_body_tried_to_reach(jailed_pytester: pytest.Pytester) -> None:
    """A jailed body that phones home: its failure starts with what the jail blocked, and a
    passing test's report carries the same section (shown with -rA)."""
    jailed_pytester.makepyfile(
        test_phone="""
        import socket, subprocess, pytest

        @pytest.mark.jail
        def test_update_check():
            subprocess.run(["busybox", "nc", "-w", "3", "93.184.216.34", "443"], stdin=subprocess.DEVNULL)
            socket.create_connection(("203.0.113.5", 80), timeout=3)

        @pytest.mark.jail
        def test_quiet_failure():
            try:
                socket.create_connection(("203.0.113.6", 8080), timeout=3)
            except OSError:
                pass
        """
    )
    result = jailed_pytester.runpytest_subprocess("-rA")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*test_update_check*",
        "jail: network access blocked: tcp 93.184.216.34:443, tcp 203.0.113.5:80",
    ])
    result.stdout.fnmatch_lines(["*jail: network access blocked*", "tcp 203.0.113.6:8080"])
