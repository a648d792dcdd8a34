"""CI secrets: pytest's environment, memory and keyring are out of a jail's reach."""

from __future__ import annotations

import os
import sys

import pytest
from attack import SEARCH_KEY
from attack import add_session_key
from attack import needs_jail
from attack import unlink_key

from pytest_jail import Jail
from pytest_jail import JailSpec

pytestmark = needs_jail

TOKEN = "ghp_pj_adversarial_secret"


def test_init_environment_and_memory_are_unreadable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The jail's init is a fork of pytest: /proc/1/environ, /proc/1/mem and /proc/1/maps would
    show pytest's secrets (a command found a conftest's secret in /proc/1/mem as root). init is
    not dumpable: they belong to the host's root, and ptrace is refused."""
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    script = "cat /proc/1/environ; head -c 4096 /proc/1/maps; python3 -c 'open(\"/proc/1/mem\", \"rb\")'"
    result = Jail().run(["sh", "-c", script])
    assert TOKEN not in result.stdout + result.stderr
    assert result.stderr.count("Permission denied") >= 3


def test_env_replaces_what_a_command_and_a_body_see(jailed_pytester: pytest.Pytester,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With env={...}, /proc/self/environ of a command and of a body (a fork of pytest, started
    with pytest's environment) shows only what was given, and so do their children."""
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    result = Jail(JailSpec(env={"ONLY": "this"})).run(["sh", "-c", "tr '\\0' '\\n' < /proc/self/environ; env"])
    assert TOKEN not in result.stdout and "ONLY=this" in result.stdout
    jailed_pytester.makepyfile(
        f"""
        import os, subprocess, pytest

        @pytest.mark.jail(env={{"ONLY": "this"}})
        def test_environ():
            own = open("/proc/self/environ", "rb").read()
            child = subprocess.run(["sh", "-c", "env; cat /proc/self/environ"], capture_output=True).stdout
            assert b"{TOKEN}" not in own + child, (own, child)
            assert os.environ == {{"ONLY": "this"}}
        """
    )
    jailed_pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_session_keyring_is_not_shared(jailed_pytester: pytest.Pytester) -> None:
    """A key in pytest's session keyring (a CI agent's credentials) is found from neither a
    command nor a body: each jail joins a fresh, empty session keyring."""
    serial = add_session_key("pj-secret", b"hunter2")
    try:
        result = Jail().run([sys.executable, "-c", SEARCH_KEY])
        assert result.stdout.startswith("NOT FOUND"), result.stdout + result.stderr
        jailed_pytester.makepyfile(
            test_key=f"""
            import subprocess, sys, pytest

            @pytest.mark.jail
            def test_search():
                out = subprocess.run([sys.executable, "-c", {SEARCH_KEY!r}], capture_output=True, text=True).stdout
                assert out.startswith("NOT FOUND"), out
            """
        )
        # The pytest it runs is a child of this process: it starts in the same session keyring.
        jailed_pytester.runpytest_subprocess().assert_outcomes(passed=1)
    finally:
        unlink_key(serial)


def test_a_command_cannot_read_pytests_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """No process of the jail can see pytest's process at all: pids are the jail's own, and
    process_vm_readv on pytest's host pid finds nothing."""
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    probe = (
        "import ctypes, os, sys\n"
        f"pid = {os.getpid()}\n"
        "print(os.path.exists(f'/proc/{pid}/environ') and os.getpid() != pid)\n"
        "try:\n"
        "    os.kill(pid, 0); print('SIGNALLED')\n"
        "except OSError as e: print('kill', e.errno)\n"
    )
    result = Jail().run([sys.executable, "-c", probe])
    assert result.stdout.splitlines() == ["False", "kill 3"]  # ESRCH: no such process, from the jail


def test_home_secrets_are_empty_in_the_host_view(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """~/.ssh, ~/.aws, ~/.netrc... of the user running pytest read as empty in the host view,
    even where the home is otherwise shown; nothing written there reaches the host."""
    home = os.path.join(tmp_path, "home")
    os.makedirs(os.path.join(home, ".ssh"))
    os.makedirs(os.path.join(home, ".aws"))
    secrets = {".ssh/id_ed25519": "PRIVATE KEY", ".aws/credentials": "aws_secret_access_key", ".netrc": "password"}
    for name, content in secrets.items():
        with open(os.path.join(home, name), "w") as f:
            f.write(content)
    os.chmod(home, 0o755)
    monkeypatch.setenv("HOME", home)
    result = Jail().run(["sh", "-c", "cat ~/.ssh/id_ed25519 ~/.aws/credentials ~/.netrc; ls -A ~/.ssh ~/.aws; "
                         "echo evil > ~/.ssh/authorized_keys"])
    assert not any(content in result.stdout for content in secrets.values()), result.stdout
    assert not os.path.exists(os.path.join(home, ".ssh", "authorized_keys"))


def test_pytests_process_is_not_in_the_jails_proc() -> None:
    """/proc lists the jail's processes only: pytest's command line, environment and descriptors
    are not there to read."""
    listed = Jail().run(["sh", "-c", "ls /proc | grep -E '^[0-9]+$'; for p in /proc/[0-9]*; do "
                         "echo \"$(tr '\\0' ' ' < $p/cmdline)|$(cat $p/comm)\"; done"])
    pids = [line for line in listed.stdout.splitlines() if line.isdigit()]
    assert all(int(pid) < 10 for pid in pids), pids
    with open("/proc/self/cmdline", "rb") as f:
        ours = f.read().replace(b"\0", b" ").decode().strip()
    assert ours not in listed.stdout
    processes = [line.rsplit("|", 1) for line in listed.stdout.splitlines() if "|" in line]
    assert ["jail-init", "jail-init"] in [[cmdline.strip(), comm] for cmdline, comm in processes], processes


def test_a_body_cannot_read_pytests_memory_through_its_parent(jailed_pytester: pytest.Pytester) -> None:
    """A body's parent (the process that entered the jail) is outside its pid namespace; the jail's
    init is not dumpable: neither /proc/1/mem nor process_vm_readv of anything reaches pytest."""
    jailed_pytester.makepyfile(
        """
        import os, pytest

        @pytest.mark.jail
        def test_read():
            assert os.getppid() == 0
            with pytest.raises(PermissionError):
                open("/proc/1/mem", "rb").read(1)
            with pytest.raises(PermissionError):
                open("/proc/1/environ", "rb").read()
        """
    )
    jailed_pytester.runpytest_subprocess().assert_outcomes(passed=1)
