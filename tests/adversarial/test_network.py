"""Network escapes: a jail with a network of its own reaches nothing of the host's.

Each case listens or looks on the host, attacks from inside, then checks what the host got.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from collections.abc import Iterator

import pytest
from attack import needs_jail
from attack import needs_nft
from attack import root_mode

from pytest_jail import Jail
from pytest_jail import JailSpec
from pytest_jail import JailWarning

pytestmark = needs_jail


def _python(code: str, spec: JailSpec | None = None) -> str:
    result = Jail(spec or JailSpec()).run([sys.executable, "-c", textwrap.dedent(code)])
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _nothing_waiting(server: socket.socket) -> bool:
    server.setblocking(False)
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


def test_sys_class_net_lists_only_the_jails_devices() -> None:
    """The jail's /sys is a sysfs of its own network namespace: the host's interfaces (their
    names, addresses, statistics) are not listed; with net="host" the host's are, read-only."""
    def hosts(names: list[str]) -> list[str]:  # (other tests' bridged jails come and go meanwhile)
        return sorted(n for n in names if not n.startswith("pj"))  # (pjtest, pjpriv: test fixtures)

    host = hosts(os.listdir("/sys/class/net"))
    listed = _python("import os; print(sorted(os.listdir('/sys/class/net')))")
    assert listed in ("['blocked0', 'lo']", "['lo']")  # (no recorder where /dev/net/tun is missing)
    shared = _python("import os; print(os.listdir('/sys/class/net'))", JailSpec(net="host"))
    assert hosts(eval(shared)) == host
    assert hosts(os.listdir("/sys/class/net")) == host


def test_a_server_on_the_host_loopback_is_unreachable() -> None:
    """A daemon a CI job left on 127.0.0.1 (a database, a debug port): not the jail's loopback."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        got = _python(f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2)
                print("CONNECTED")
            except OSError as exc:
                print(exc.errno)
        """)
        assert got == str(errno.ECONNREFUSED)
        assert _nothing_waiting(server)


def test_an_abstract_unix_socket_of_the_host_is_unreachable() -> None:
    """Abstract unix sockets (X11's, D-Bus's, containerd's shim) belong to a network namespace, not
    to a file: the host's are out of reach of a jail with a network of its own."""
    name = f"\0pj-abstract-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(name)
        server.listen()
        got = _python(f"""
            import socket
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect({name!r})
                print("CONNECTED")
            except OSError as exc:
                print(exc.errno)
        """)
        assert got == str(errno.ECONNREFUSED)
        assert _nothing_waiting(server)


@root_mode
def test_daemon_sockets_under_run_are_hidden() -> None:
    """/run (and /var/run) hold the host's live sockets (docker.sock, systemd's, dbus): the host view
    shows an empty /run in their place."""
    path = f"/run/pj-daemon-{os.getpid()}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen()
        try:
            got = _python(f"""
                import socket
                for path in ({path!r}, {path.replace('/run', '/var/run')!r}):
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    try:
                        s.connect(path)
                        print("CONNECTED")
                    except OSError as exc:
                        print(exc.errno)
            """)
            assert got.split() == [str(errno.ENOENT)] * 2
            assert _nothing_waiting(server)
        finally:
            os.unlink(path)


RAW = """
    import socket
    for family, kind, proto in ((socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
                                (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6),
                                (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)):
        try:
            socket.socket(family, kind, proto).close()
            print("RAW")
        except OSError as exc:
            print(exc.errno)
"""


@pytest.mark.parametrize("net", ["none", "host"])
def test_raw_sockets_need_cap_add(net: str) -> None:
    """No CAP_NET_RAW by default (raw sockets forge packets, and with net="host" would see the
    host's traffic); ``cap_add=["NET_RAW"]`` gives it back, in the jail's own network only."""
    assert _python(RAW, JailSpec(net=net)).split() == [str(errno.EPERM)] * 3
    expected = ["RAW"] * 3 if net == "none" else [str(errno.EPERM)] * 3  # the host's network is not the jail's
    assert _python(RAW, JailSpec(net=net, cap_add=["NET_RAW"])).split() == expected


def test_ping_works_without_raw_sockets() -> None:
    """``ping`` uses an ICMP datagram socket, which every group of the jail may open in its own
    network (as Docker does): an echo to the jail's loopback is answered."""
    got = _python("""
        import socket, struct
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
        s.settimeout(2)
        s.sendto(struct.pack("!BBHHH", 8, 0, 0, 0, 1) + b"ping", ("127.0.0.1", 0))
        reply, _ = s.recvfrom(64)
        print(reply[0], reply[-4:].decode())
    """)
    assert got == "0 ping"  # an echo reply, carrying what was sent


def test_host_interfaces_cannot_be_changed() -> None:
    """Without CAP_NET_ADMIN the jail cannot add, address or bring down links, even its own; with
    net="host" the host's links are as they were after the attempts."""
    before = set(os.listdir("/sys/class/net"))
    attack = textwrap.dedent("""
        import socket, struct
        errors = []
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
        # RTM_NEWLINK for a dummy link named pj0: enough for the kernel to check our capability
        name = b"pj0\\0"
        kind = b"dummy\\0"
        linkinfo = struct.pack("=HH", 4 + 4 + len(kind) + (-len(kind) % 4), 18) + struct.pack("=HH", 4 + len(kind), 1) \\
            + kind + b"\\0" * (-len(kind) % 4)
        attrs = struct.pack("=HH", 4 + len(name), 3) + name + b"\\0" * (-len(name) % 4) + linkinfo
        body = struct.pack("=BxHiII", 0, 0, 0, 0, 0) + attrs
        msg = struct.pack("=IHHII", 16 + len(body), 16, 0x1 | 0x4 | 0x400 | 0x200, 1, 0) + body
        s.sendto(msg, (0, 0))
        reply = s.recv(4096)
        print(-struct.unpack("=i", reply[16:20])[0])
    """)
    for net in ("none", "host"):
        result = Jail(JailSpec(net=net)).run([sys.executable, "-c", attack])
        assert result.stdout.strip() == str(errno.EPERM), (net, result.stdout, result.stderr)
    after = set(os.listdir("/sys/class/net"))  # (other tests' bridged jails come and go meanwhile)
    assert "pj0" not in after and all(n.startswith("pj") for n in before - after)


@pytest.fixture
def private_network() -> Iterator[tuple[str, Callable[[], list[str]]]]:
    """A network of the host's that the LAN must not reach (a docker0, a VPN): a namespace behind a
    veth (host side 10.99.0.1/24, its side 10.99.0.2) with a UDP sink on port 7000. Yields its
    address and a function returning what the sink got."""
    name = f"pjpriv{os.getpid() % 100000}"
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("ip", "netns", "add", name)
    sink = None
    try:
        run("ip", "link", "add", f"{name}h", "type", "veth", "peer", "name", "eth0", "netns", name)
        run("ip", "addr", "add", "10.99.0.1/24", "dev", f"{name}h")
        run("ip", "link", "set", f"{name}h", "up")
        for args in (["addr", "add", "10.99.0.2/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                     ["route", "add", "default", "via", "10.99.0.1"]):
            run("ip", "netns", "exec", name, "ip", *args)
        code = ("import socket, sys\n"
                "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', 7000))\n"
                "print('ready', flush=True)\n"
                "while True:\n"
                "    data, peer = s.recvfrom(100); print(data.decode(), peer[0], flush=True)\n")
        sink = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-c", code], stdout=subprocess.PIPE,
                                text=True)
        assert sink.stdout is not None and sink.stdout.readline() == "ready\n"
        os.set_blocking(sink.stdout.fileno(), False)

        def received() -> list[str]:
            assert sink is not None and sink.stdout is not None
            return [line.strip() for line in sink.stdout.readlines()]

        yield "10.99.0.2", received
    finally:
        if sink is not None:
            sink.kill()
            sink.wait()
        subprocess.run(["ip", "link", "del", f"{name}h"], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _send_from_the_lan(outside: str, target: str, word: str) -> None:
    """A host on the uplink's LAN (the ``outside`` namespace) sends datagrams to ``target``,
    routed through this host."""
    netns = next(n for n in os.listdir("/run/netns") if n.startswith("pjtest"))
    subprocess.run(["ip", "netns", "exec", netns, "ip", "route", "replace", "10.99.0.0/24", "via", "203.0.113.1"],
                   check=True, capture_output=True)
    code = ("import socket, time\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"for _ in range(5): s.sendto(b'{word}', ('{target}', 7000)); time.sleep(0.05)\n")
    subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code], check=True)
    time.sleep(0.3)


@root_mode
def test_the_lan_cannot_route_through_a_jails_way_out(outside: str,
                                                      private_network: tuple[str, Callable[[], list[str]]]) -> None:
    """A way out (nat=True, allow=) needs forwarding on the uplink, which would forward whatever
    the LAN sends there to every other network of the host (a VPN, docker0): while a jail with a
    way out runs, a LAN host's datagrams to a private network of the host arrive nowhere. Without
    the uplink's guard table (what the jail did before) they arrive, so the case can fail."""
    from pytest_jail._linux import firewall

    target, received = private_network
    uplink = next(n for n in os.listdir("/sys/class/net") if n.startswith("pjtest") and n.endswith("h"))
    with Jail(JailSpec(net="bridge:lan", allow=[f"{outside}:8080"])).spawn(["sleep", "30"]) as jail:
        assert open(f"/proc/sys/net/ipv4/conf/{uplink}/forwarding").read() == "1\n"  # the jail's way out is on
        _send_from_the_lan(outside, target, "through-the-jail")
        assert received() == []
        subprocess.run(["nft", "delete", "table", "inet", firewall.guard_table(uplink)], check=True)
        try:
            _send_from_the_lan(outside, target, "unguarded")
            got = received()
            assert got and set(got) == {"unguarded 203.0.113.2"}, got
        finally:
            firewall.apply(firewall.guard(uplink))  # as this session's holder of the setting left it
        jail.terminate()


@root_mode
def test_a_rule_nft_cannot_remove_is_reported_and_its_address_not_reused(
    outside: str, tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A jail's allow rule must go with it; when nft refuses (here an nft that fails once the jail
    is running), the failure is a warning naming the address, and the next jail on the segment
    gets another address, never the one whose rule stayed (before: swallowed, and the next jail
    given that address inherited the rule)."""
    import shutil

    real = shutil.which("nft")
    assert real is not None
    broken = os.path.join(tmp_path, "broken")
    wrapper = os.path.join(tmp_path, "nft")
    with open(wrapper, "w") as f:
        f.write(f"#!/bin/sh\n[ -e {broken} ] && {{ echo 'Error: Could not process rule' >&2; exit 1; }}\n"
                f"exec {real} \"$@\"\n")
    os.chmod(wrapper, 0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    segment = f"bridge:rel{os.getpid() % 10000}"
    first = Jail(JailSpec(net=segment, allow=[f"{outside}:8080"])).spawn(["sleep", "30"])
    address = first.ip
    open(broken, "w").close()
    with pytest.warns(JailWarning, match=rf"the way out of the jail at {address} could not be removed"):
        first.kill()
    os.unlink(broken)
    second = Jail(JailSpec(net=segment)).spawn(["sleep", "30"])
    try:
        assert second.ip != address
    finally:
        second.kill()


@root_mode
@needs_nft
def test_start_up_cleanup_keeps_the_table_of_a_segment_leased_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start-up cleanup lists the leases, then deletes the tables of segments nobody leases: a
    session that leased a segment and wrote its table between the two kept losing it. The
    listing is made to miss the lease here (as the race does); the table must stay."""
    import fcntl

    from pytest_jail._linux import firewall
    from pytest_jail._linux import net

    index = 200 + os.getpid() % 50
    path = os.path.join(net.LEASES, str(index))
    os.makedirs(net.LEASES, exist_ok=True)
    lease = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    fcntl.flock(lease, fcntl.LOCK_EX)  # the other session holds it
    try:
        firewall.apply(f"table inet {firewall.table(index)} {{}}\n")
        real_listdir = os.listdir
        monkeypatch.setattr(net.os, "listdir", lambda p=".": [] if p == net.LEASES else real_listdir(p))
        net.clean_stale()
        assert index in firewall.tables()
    finally:
        subprocess.run(["nft", "delete", "table", "inet", firewall.table(index)], capture_output=True)
        os.unlink(path)
        os.close(lease)
