"""What the jail does not contain, as README's threat model says: each case passes while the gap
is there, so a change that closes one (or a README that stops saying it) shows up here."""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from typing import Any

import pytest
from attack import needs_jail

pytestmark = needs_jail


def test_flock_on_a_shared_host_file_is_shared(tmp_path: os.PathLike[str], jail: Any) -> None:
    """A file two jails (or a jail and the host) see is one inode: a lock on it is one lock, so
    jails can signal each other through it."""
    path = os.path.join(tmp_path, "shared.lock")
    with open(path, "w") as held:
        os.chmod(path, 0o666)
        fcntl.flock(held, fcntl.LOCK_EX)
        script = ("import fcntl, sys\n"
                  f"f = open({path!r})\n"
                  "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); print('FREE')\n"
                  "except BlockingIOError:\n    print('HELD BY SOMEONE')\n")
        result = jail.run([sys.executable, "-c", script])
    assert result.stdout.strip() == "HELD BY SOMEONE", result.stderr


def test_a_unix_socket_in_a_shown_directory_can_be_connected_to(tmp_path: os.PathLike[str], jail: Any) -> None:
    """A read-only mount does not stop connect(): a socket others may write, in a directory the
    host view shows (here the test's temp dir), is reachable from the jail."""
    path = os.path.join(tmp_path, "service.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        os.chmod(path, 0o777)
        server.listen()
        script = ("import socket\n"
                  "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
                  f"s.connect({path!r}); s.sendall(b'hello from the jail')\n")
        result = jail.run([sys.executable, "-c", script])
        assert result.returncode == 0, result.stderr
        server.settimeout(5)
        conn, _ = server.accept()
        with conn:
            assert conn.recv(100) == b"hello from the jail"


def test_a_body_holds_what_pytests_memory_held(jailed_pytester: pytest.Pytester) -> None:
    """A body is a fork of pytest: a value a session fixture loaded (a token in a settings object)
    is in its memory, whatever env= says."""
    jailed_pytester.makepyfile(
        """
        import os, pytest

        @pytest.fixture(scope="session")
        def settings():
            return {"token": "ghp_loaded_by_conftest"}

        @pytest.mark.jail(env={"PATH": "/usr/bin:/bin"})
        def test_body(settings):
            assert "GITHUB_TOKEN" not in os.environ
            assert settings["token"] == "ghp_loaded_by_conftest"
        """
    )
    jailed_pytester.runpytest_subprocess().assert_outcomes(passed=1)
