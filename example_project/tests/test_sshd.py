"""The seed's scenario: sshd serving on port 23322 from inside a jail, reached from the host.

A Debian tree with openssh-server is built once with ``pytest-jail rootfs debootstrap`` (cached
in ``~/.cache/pytest-jail/rootfs/bookworm-sshd``). The test itself runs on the host side
(``nojail``): it starts sshd with ``jail.spawn`` in a jail that shares the host's network
(``net="host"``, as the seed did) or sits on a bridge (``net="bridge"``, reached at its own
address), logs in with ssh, and checks that the login's command ran inside the jail: it sees the
jail's hostname and the jail's own pid namespace, whose pid 1 is the jail's init.

It needs root (debootstrap), the network (Debian's package registry) and an ssh client; skip it
on a laptop with ``-m "not sshd"``.
"""

import os
import shutil
import subprocess
import sys

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


@pytest.mark.parametrize("net", ["host", "bridge"])
def test_ssh_login_lands_in_the_jail(jail, debian, tmp_path, net):
    """sshd in a jail of the Debian tree, on the host's network (the seed's setup) or on a bridge
    (reached at the jail's own address); an ssh login from the host runs inside the jail."""
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    os.chmod(key.with_suffix(".pub"), 0o644)
    serve = (
        f"mkdir -p /run/sshd /root/.ssh && install -m 600 {key}.pub /root/.ssh/authorized_keys && ssh-keygen -A && "
        f"exec /usr/sbin/sshd -D -e -p {PORT} -o UsePAM=no -o PidFile=none"
    )
    with jail.spawn(["sh", "-c", serve], rootfs=debian, net=net, hostname="sshd-jail", timeout=120) as server:
        server.wait_for_port(PORT, timeout=60)
        login = subprocess.run(
            ["ssh", "-i", str(key), "-p", str(PORT), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
             "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", f"root@{server.ip or '127.0.0.1'}",
             "hostname; readlink /proc/self/ns/pid; cat /proc/1/comm; id -un"],
            capture_output=True, text=True, timeout=60,
        )
    assert login.returncode == 0, (login.stderr, server.stderr)
    hostname, own_ns, init, user = login.stdout.split()
    assert hostname == "sshd-jail"
    # The jail's pid 1 (its init, whose /proc/1/ns the jail may not read), not the host's.
    assert init == "jail-init" and own_ns != os.readlink("/proc/self/ns/pid")
    assert user == "root"
    assert f"Server listening on 0.0.0.0 port {PORT}" in server.stderr
