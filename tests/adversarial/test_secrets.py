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
