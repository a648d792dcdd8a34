"""The engine without pytest's plugin: real namespaces, mounts and processes (root and rootless)."""

from __future__ import annotations

import os
import socket
import sys
import threading

import pytest
from conftest import CONTAINER_ROOT
from conftest import NO_NESTED_ROOT
from conftest import needs_jail
from conftest import needs_tun
from conftest import root_mode
from conftest import rootless_mode

from pytest_jail import Jail
from pytest_jail import JailConfigError
from pytest_jail import JailProcessError
from pytest_jail import JailSetupError
from pytest_jail import JailSpec
from pytest_jail._child import PAYLOAD_CAPABILITIES
from pytest_jail._jail import ROOT_MAP_BASE
from pytest_jail._jail import uses_root_map
from pytest_jail._linux.mounts import Exposure
from pytest_jail._linux.syscalls import CAP_DAC_READ_SEARCH
from pytest_jail._linux.syscalls import CAP_SYS_ADMIN

pytestmark = needs_jail


def sh(script: str, **kw: object) -> str:
    result = Jail(kw.pop("spec", None)).run(["sh", "-c", script], **kw)  # type: ignore[arg-type]
    assert result.returncode == 0, result
    return result.stdout


def test_pid_namespace_with_reaping_init() -> None:
    """The command is pid 2 under a pid 1 init, and it sees only the jail's processes."""
    out = sh("echo $$; cat /proc/1/cmdline | tr '\\0' ' '; echo; ls /proc | grep -E '^[0-9]+$' | sort -n")
    lines = out.split("\n")
    assert lines[0] == "2"
    pids = [int(p) for p in lines[2:] if p]
    assert pids[0] == 1 and max(pids) < 10


def test_session_stdin_and_descriptors() -> None:
    """setsid(); stdin is /dev/null; only stdio survives (the wire is close-on-exec)."""
    fd_r, fd_w = os.pipe()
    os.dup2(fd_r, 50, inheritable=True)  # an inheritable descriptor in the caller must not reach the jail
    try:
        out = sh("ps -o sid= -p $$ 2>/dev/null || cat /proc/self/stat | cut -d' ' -f6; "
                 "readlink /proc/self/fd/0; ls /proc/self/fd")
    finally:
        for fd in (fd_r, fd_w, 50):
            os.close(fd)
    sid, stdin, *fds = out.split()
    assert sid.strip() in ("2", "3")  # the shell's session (pid 2; ps may run as pid 3)
    assert stdin == "/dev/null"
    assert sorted(int(f) for f in fds) == [0, 1, 2, 3]  # 3 is ls's own directory handle


def test_uts_ipc_cgroup_namespaces() -> None:
    """Own hostname, an empty IPC namespace, a cgroup namespace rooted at the jail."""
    out = sh("hostname; cat /proc/sysvipc/shm | wc -l; cat /proc/self/cgroup | cut -d: -f3 | sort -u",
             spec=JailSpec(hostname="box1"))
    hostname, shm_lines, *cgroups = out.split()
    assert hostname == "box1"
    assert shm_lines == "1"  # the header only
    assert set(cgroups) == {"/"}
    for ns in ("uts", "ipc", "cgroup", "net", "mnt", "pid", "user"):
        inside = sh(f"readlink /proc/self/ns/{ns}").strip()
        assert inside != os.readlink(f"/proc/self/ns/{ns}"), ns


@root_mode
def test_root_maps_to_an_unprivileged_host_uid() -> None:
    """Root mode: the jail's root is an unprivileged host uid (ROOT_MAP_BASE), never the host's root."""
    out = sh("id -u; cat /proc/self/uid_map")
    uid, *mapping = out.split()
    assert uid == "0"
    assert mapping == ["0", str(ROOT_MAP_BASE), "65536"]


@rootless_mode
def test_rootless_runs_as_the_caller() -> None:
    """Rootless: the jail runs as the caller's own uid, with no capabilities."""
    out = sh("id -u; grep CapEff /proc/self/status")
    assert out.split()[0] == str(os.geteuid())
    assert out.split()[-1] == "0000000000000000"


def test_host_view_is_read_only_with_private_tmp(tmp_path: os.PathLike[str]) -> None:
    """/ is the host's, read-only; /tmp is private, empty and writable; nothing reaches the host."""
    result = Jail().run(["sh", "-c", "touch /usr/jail-probe /etc/jail-probe; ls -A /tmp; echo x > /tmp/f && cat /tmp/f"])
    assert result.stderr.count("Read-only file system") == 2
    assert result.stdout == "x\n"
    assert not os.path.exists("/usr/jail-probe") and not os.path.exists("/tmp/f")


def test_minimal_dev_and_fresh_proc() -> None:
    """A fresh /proc and a minimal /dev with working nodes and a private devpts."""
    out = sh("ls /dev | sort | tr '\\n' ' '; echo; head -c 4 /dev/zero | wc -c; echo x > /dev/null && echo null-ok; "
             "grep -c . /proc/mounts >/dev/null && echo proc-ok")
    assert out.split("\n")[0].split() == sorted(
        ["fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty", "urandom", "zero"]
    )
    assert "4\nnull-ok\nproc-ok" in out


def test_writable_exposure(tmp_path: os.PathLike[str]) -> None:
    """An exposed directory (the test's tmp_path) is writable inside, and the write lands on the host."""
    path = os.fspath(tmp_path)
    os.chmod(path, 0o777)
    result = Jail(exposures=[Exposure(path, path, writable=True)]).run(["sh", "-c", f"echo hi > {path}/out"])
    assert result.returncode == 0, result
    assert open(os.path.join(path, "out")).read() == "hi\n"


@needs_tun
def test_net_none_has_only_loopback_and_cannot_reach_host_loopback() -> None:
    """net='none': only lo, up (and blocked0, the recorder, with no other end); a server on the
    host's 127.0.0.1 is unreachable."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted: list[object] = []
    server.settimeout(3)
    thread = threading.Thread(target=lambda: _accept(server, accepted))
    thread.start()
    try:
        script = (f"import socket\nprint(sorted(n for _, n in socket.if_nameindex()))\n"
                  f"s = socket.socket(); s.settimeout(2)\nprint(s.connect_ex(('127.0.0.1', {port})))\n")
        result = Jail(exposures=[Exposure(p, p) for p in _runtime()]).run([sys.executable, "-c", script])
    finally:
        thread.join()
        server.close()
    assert result.stdout.split("\n")[:2] == ["['blocked0', 'lo']", "111"], result  # ECONNREFUSED inside
    assert accepted == []


def _accept(server: socket.socket, accepted: list[object]) -> None:
    try:
        accepted.append(server.accept())
    except OSError:
        pass


def _runtime() -> list[str]:
    from pytest_jail._jail import runtime_paths

    return runtime_paths()


def test_net_host_shares_the_host_network() -> None:
    """net='host': the jail sees the host's links."""
    inside = sh("ls /sys/class/net | sort", spec=JailSpec(net="host")).split()
    assert inside == sorted(os.listdir("/sys/class/net"))


def test_returncode_signal_and_check() -> None:
    """returncode is the exit status, -N for signal N; check=True raises JailProcessError."""
    jail = Jail()
    assert jail.run(["sh", "-c", "exit 3"]).returncode == 3
    assert jail.run(["sh", "-c", "kill -SEGV $$"]).returncode == -11
    with pytest.raises(JailProcessError) as info:
        jail.run(["sh", "-c", "echo out; echo err >&2; exit 4"], check=True)
    assert (info.value.returncode, info.value.result.stdout, info.value.result.stderr) == (4, "out\n", "err\n")


def test_input_env_cwd() -> None:
    """input feeds stdin; env replaces the environment; cwd is inside the jail."""
    script = "cat; echo $ONLY; pwd; env | cut -d= -f1"
    result = Jail().run(["sh", "-c", script], input="data\n", env={"ONLY": "1"}, cwd="/etc")
    assert result.stdout.split("\n")[:3] == ["data", "1", "/etc"]
    names = set(result.stdout.split("\n")[3:]) - {""}
    assert "ONLY" in names and names <= {"ONLY", "PWD", "SHLVL", "_", "OLDPWD", "PATH"}, names  # what a shell adds


def test_argv_must_be_a_list() -> None:
    """A string is refused: argv is a list, as with shell=False."""
    with pytest.raises(JailConfigError, match="argv must be a non-empty list of strings"):
        Jail().run("echo hi")  # type: ignore[arg-type]


def test_missing_command_is_a_setup_error() -> None:
    """A command that does not exist is a setup error naming the command, not an exit status."""
    with pytest.raises(JailSetupError, match="cannot run 'no-such-command'"):
        Jail().run(["no-such-command"])


def test_timeout_kills_a_sigterm_ignoring_tree() -> None:
    """The wall-clock limit kills the whole jail, even processes that ignore SIGTERM."""
    result = Jail().run(["sh", "-c", "trap '' TERM; (trap '' TERM; sleep 600) & echo started; sleep 600"], timeout=2.5)
    assert result.timed_out and result.returncode == -9
    assert result.stdout == "started\n"  # (2.5 s: a loaded CI machine starts the shell late)
    assert result.duration < 300  # killed, not slept out (however slow the machine)
    assert "timed out after 2.5s" in result.verdict()


def test_daemon_dies_with_the_jail() -> None:
    """A double-forked daemon does not outlive its jail."""
    tag = f"pj-daemon-{os.getpid()}"
    result = Jail().run(["sh", "-c", f"(setsid bash -c 'exec -a {tag} sleep 60' &); sleep 0.2; "
                                      f"ps -eo args | grep -c '^{tag}'"])
    assert result.stdout == "1\n", result  # the daemon ran, detached, while the jail lived
    assert not [p for p in os.listdir("/proc") if p.isdigit() and tag in _cmdline(p)]


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def test_nested_jail() -> None:
    """A jail whose filter allows it (syscalls="nested") can run a jail (a jailed test body calling
    jail.run); the default filter refuses the namespaces a jail is made of, and says so."""
    code = "from pytest_jail import Jail; r = Jail().run(['sh', '-c', 'echo $$; hostname']); print(r.stdout, end='')"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    outer = Jail(JailSpec(hostname="outer", syscalls="nested"), exposures=[Exposure(p, p) for p in _runtime()])
    result = outer.run([sys.executable, "-c", code], env=env)
    if CONTAINER_ROOT:
        assert "may not map the host's uid 0" in result.stderr, result.stderr[-3000:]
        pytest.skip(NO_NESTED_ROOT)
    assert result.stdout == "2\njail\n", result.stderr[-3000:]
    refused = Jail(exposures=[Exposure(p, p) for p in _runtime()]).run([sys.executable, "-c", code], env=env)
    assert refused.returncode == 1 and refused.blocked_syscalls == ["unshare"]
    assert "syscalls='nested'" in refused.stderr


def test_command_starts_with_default_signals() -> None:
    """Python ignores SIGPIPE; a command in the jail starts with it at its default, as subprocess does."""
    out = sh("grep -E '^Sig(Ign|Blk)' /proc/self/status")
    masks = {line.split(":")[0]: int(line.split()[1], 16) for line in out.split("\n") if line}
    assert not masks["SigIgn"] & (1 << (13 - 1))  # SIGPIPE
    assert masks["SigBlk"] == 0
    assert signal_ignored_here(13)  # ...while pytest's own process ignores it


def signal_ignored_here(signum: int) -> bool:
    with open("/proc/self/status") as f:
        ign = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn"))
    return bool(ign & (1 << (signum - 1)))


def test_no_way_to_undo_the_jail() -> None:
    """Even the jail's root (root mode) has no capability to unmount, remount or mount: the host
    stays hidden and read-only; a nested user namespace only gets locked copies of the mounts."""
    script = (
        "grep CapBnd /proc/self/status; umount /tmp; mount -o remount,rw /; umount /proc; "
        "unshare -Urm sh -c 'umount /tmp || echo nested-umount-refused; touch /usr/jail-x || echo nested-ro'; "
        "ls /proc | grep -cE '^[0-9]+$'"
    )
    result = Jail(JailSpec(syscalls="nested")).run(["sh", "-c", script])  # (the default filter refuses unshare too)
    lines = result.stdout.split("\n")
    bounding = int(lines[0].split()[1], 16)
    # Docker's default set less NET_RAW as the jail's root; rootless, the user's none
    assert bounding == sum(1 << cap for cap in (PAYLOAD_CAPABILITIES if uses_root_map() else ()))
    assert not bounding & (1 << CAP_SYS_ADMIN | 1 << CAP_DAC_READ_SEARCH)
    if os.geteuid() == 0 and not uses_root_map():  # a container's root: a nested namespace may not map it
        assert "uid_map" in result.stderr or "nested-umount-refused" in result.stdout, result.stderr
    else:
        assert "nested-umount-refused" in result.stdout and "nested-ro" in result.stdout
    assert int(lines[-2]) < 10  # /proc is still the jail's own
    # util-linux's words, busybox's, and util-linux's as a user where there is no /etc/fstab
    refusals = ("must be superuser", "permission denied", "operation not permitted", "umount failed")
    assert sum(any(r in line.lower() for r in refusals) for line in result.stderr.splitlines()) >= 3, result.stderr
    assert not os.path.exists("/usr/jail-x")


def test_binds(tmp_path: os.PathLike[str]) -> None:
    """binds=: read-only by default, ':rw' lands on the host, anything else stays unchanged."""
    ro, rw = os.path.join(tmp_path, "ro"), os.path.join(tmp_path, "rw")
    for path in (ro, rw):
        os.mkdir(path)
        os.chmod(path, 0o777)
    os.chmod(tmp_path, 0o755)
    with open(os.path.join(ro, "data.txt"), "w") as f:
        f.write("input\n")
    spec = JailSpec(binds=[f"{ro}:/data", f"{rw}:/out:rw"])
    result = Jail(spec).run(["sh", "-c", "cat /data/data.txt; echo x > /data/new; echo result > /out/r.txt"])
    assert result.stdout == "input\n"
    assert "Read-only file system" in result.stderr
    assert open(os.path.join(rw, "r.txt")).read() == "result\n"
    assert sorted(os.listdir(ro)) == ["data.txt"]


def test_tmpfs_filler_gets_enospc() -> None:
    """tmpfs='8M': a disk filler in /tmp gets ENOSPC, not the host's memory."""
    result = Jail(JailSpec(tmpfs="8M")).run(["sh", "-c", "dd if=/dev/zero of=/tmp/fill bs=1M count=64; df -k /tmp"])
    assert "No space left on device" in result.stderr
    assert result.stdout.split("\n")[1].split()[1] == "8192"  # the size df reports, in KiB


def test_a_command_is_found_on_the_path_it_is_given(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The program is looked up along the PATH of the environment the command gets, as
    subprocess does: the inherited one, or the one of env= (before: along init's own
    environment, which is wiped, so the default path: /bin first, a venv's bin never)."""
    tools = os.path.join(tmp_path, "tools")
    os.makedirs(tools)
    for directory in (tmp_path, tools):
        os.chmod(directory, 0o755)
    with open(os.path.join(tools, "mytool"), "w") as f:
        f.write("#!/bin/sh\necho found on PATH\n")
    os.chmod(os.path.join(tools, "mytool"), 0o755)
    jail = Jail(exposures=(Exposure(tools, tools),))
    given = jail.run(["mytool"], env={"PATH": f"{tools}:/usr/bin:/bin"})
    assert (given.returncode, given.stdout) == (0, "found on PATH\n"), given
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    inherited = jail.run(["mytool"])
    assert (inherited.returncode, inherited.stdout) == (0, "found on PATH\n"), inherited
