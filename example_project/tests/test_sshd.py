"""The seed's scenario: sshd serving on port 23322 from inside a jail, reached from the host.

A Debian tree with openssh-server is built once with ``pytest-jail rootfs debootstrap`` (cached
in ``~/.cache/pytest-jail/rootfs/bookworm-sshd``). The test itself runs on the host side
(``nojail``): it starts sshd in a jail that shares the host's network (``net="host"``), logs in
with ssh, and checks that the login's command ran inside the jail: it sees the jail's hostname
and the jail's own pid namespace, whose pid 1 is the jail's init.

It needs root (debootstrap), the network (Debian's package registry) and an ssh client; skip it
on a laptop with ``-m "not sshd"``.
"""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from pytest_jail.rootfs import cache_dir

PORT = 23322
TREE = os.path.join(cache_dir(), "rootfs", "bookworm-sshd")

pytestmark = [
    pytest.mark.nojail,
    pytest.mark.sshd,
    pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap needs root"),
    pytest.mark.skipif(shutil.which("debootstrap") is None, reason="needs debootstrap: apt-get install debootstrap"),
    pytest.mark.skipif(shutil.which("ssh") is None, reason="needs an ssh client: apt-get install openssh-client"),
]


@pytest.fixture(scope="module")
def debian():
    build = [sys.executable, "-m", "pytest_jail.cli", "rootfs", "debootstrap", TREE, "--include", "openssh-server"]
    subprocess.run(build, check=True, timeout=1800)
    return TREE


def port_open(port, timeout, server):
    """Wait until something accepts on ``port``, unless the server's jail ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not server:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


def test_ssh_login_lands_in_the_jail(jail, debian, tmp_path):
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    os.chmod(key.with_suffix(".pub"), 0o644)
    stop = tmp_path / "stop"
    serve = (
        f"mkdir -p /run/sshd /root/.ssh && install -m 600 {key}.pub /root/.ssh/authorized_keys && ssh-keygen -A && "
        f"/usr/sbin/sshd -D -e -p {PORT} -o UsePAM=no -o PidFile=none & "
        f"while [ ! -e {stop} ]; do sleep 0.1; done; kill $!"
    )
    server = {}

    def run_server():
        try:
            server["result"] = jail.run(["sh", "-c", serve], rootfs=debian, net="host", hostname="sshd-jail",
                                        timeout=120)
        except BaseException as exc:  # shown by the asserts below
            server["error"] = exc

    thread = threading.Thread(target=run_server)
    thread.start()
    login = None
    try:
        if port_open(PORT, timeout=60, server=server):
            login = subprocess.run(
                ["ssh", "-i", str(key), "-p", str(PORT), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                 "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "root@127.0.0.1",
                 "hostname; readlink /proc/self/ns/pid; readlink /proc/1/ns/pid; id -un"],
                capture_output=True, text=True, timeout=60,
            )
    finally:
        stop.touch()
        thread.join(timeout=60)
    assert login is not None and login.returncode == 0, (login, server.get("error") or server["result"].stderr)
    hostname, own_ns, init_ns, user = login.stdout.split()
    assert hostname == "sshd-jail"
    assert own_ns == init_ns != os.readlink("/proc/self/ns/pid")  # the jail's pid 1, not the host's
    assert user == "root"
    assert "Server listening on 0.0.0.0 port 23322" in server["result"].stderr
