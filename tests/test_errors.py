"""The error tree: each class is catchable as the builtin it resembles and survives pickle."""

from __future__ import annotations

import pickle
import subprocess

import pytest

from pytest_jail import JailConfigError
from pytest_jail import JailError
from pytest_jail import JailProcessError
from pytest_jail import JailResult
from pytest_jail import JailSetupError
from pytest_jail import JailTimeoutError
from pytest_jail import JailUnavailableError

RESULT = JailResult(args=["false"], returncode=1, stdout="o", stderr="e")

ERRORS = [
    JailConfigError("marker on t: net='wifi' is not a network mode"),
    JailUnavailableError("no user namespaces", "sysctl -w user.max_user_namespaces=15000"),
    JailSetupError("mount", 13, "Permission denied during bind /a /b", "/b"),
    JailTimeoutError("timed out"),
    JailProcessError(RESULT),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_pickle_round_trip(error: JailError) -> None:
    """xdist and the wire move errors between processes."""
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)


def test_builtin_bases() -> None:
    """Each error is also the builtin it resembles."""
    assert isinstance(ERRORS[0], ValueError)
    assert isinstance(ERRORS[2], OSError) and ERRORS[2].errno == 13
    assert isinstance(ERRORS[3], TimeoutError)
    assert isinstance(ERRORS[4], subprocess.CalledProcessError)
    assert all(isinstance(e, JailError) for e in ERRORS)


def test_messages() -> None:
    """Messages say what, where and what next."""
    assert str(ERRORS[1]) == "no user namespaces; sysctl -w user.max_user_namespaces=15000"
    assert str(ERRORS[2]) == "jail setup failed at step 'mount' (/b): Permission denied during bind /a /b"
    assert "exited with status 1" in str(ERRORS[4])
    assert ERRORS[4].result is RESULT


def test_missing_overlayfs_is_explained() -> None:
    """A kernel without overlayfs (ENODEV when the rootfs's layer is mounted) gets cause and remedy."""
    from pytest_jail._errors import JailSetupError
    from pytest_jail._probe import explain

    error = JailSetupError("mount", 19, "No such device during mount overlay /newroot", "/newroot")
    unavailable = explain(error)
    assert unavailable is not None
    assert "no overlayfs" in unavailable.reason and "modprobe overlay" in unavailable.remedy
    assert explain(JailSetupError("mount", 19, "No such device during mount tmpfs /x", "/x")) is None
