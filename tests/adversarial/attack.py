"""What the adversarial cases share: the gates, and ways to look at the host from outside.

Every case attacks from inside a jail, the way a hostile test or a careless dependency would,
then checks what the host sees afterwards (files, owners, processes, keys, pytest's memory): a
case passes only if the host is untouched, and fails when its protection is taken away.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import resource
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from pytest_jail._jail import uses_root_map
from pytest_jail._probe import probe_host

_HOST = probe_host()
needs_jail = pytest.mark.skipif(not _HOST.ok, reason=f"{_HOST.reason}; {_HOST.remedy}")
root_mode = pytest.mark.skipif(not uses_root_map(), reason="needs pytest to run as real root (root mode)")
needs_nft = pytest.mark.skipif(shutil.which("nft") is None, reason="needs nftables: apt-get install nftables")


def fingerprint(path: str) -> tuple[int, int, int, str]:
    """Owner, group, mode and content hash of a host file."""
    st = os.lstat(path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return st.st_uid, st.st_gid, st.st_mode, digest


@contextmanager
def untouched(*paths: str) -> Iterator[None]:
    """The host files at ``paths`` are the same afterwards: owner, mode, bytes."""
    before = {p: fingerprint(p) for p in paths}
    yield
    assert {p: fingerprint(p) for p in paths} == before


def peak_rss() -> int:
    """This process's peak resident memory, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_KEY_CALLS = {"x86_64": (248, 250), "aarch64": (217, 219)}


def add_session_key(description: str, payload: bytes) -> int:
    """Put a user key in this process's session keyring (add_key(2)); its serial number."""
    add_key, _ = _KEY_CALLS[platform.machine()]
    libc = ctypes.CDLL(None, use_errno=True)
    serial = libc.syscall(add_key, b"user", description.encode(), payload, len(payload), -3)  # KEY_SPEC_SESSION_KEYRING
    if serial < 0:
        raise OSError(ctypes.get_errno(), "add_key")
    return int(serial)


def unlink_key(serial: int) -> None:
    _, keyctl = _KEY_CALLS[platform.machine()]
    ctypes.CDLL(None, use_errno=True).syscall(keyctl, 9, serial, -3)  # KEYCTL_UNLINK from the session keyring


#: Python run inside a jail to look for the key ``pj-secret`` in the session keyring
#: (keyctl(KEYCTL_SEARCH)); prints FOUND and the payload, or NOT FOUND and the errno.
SEARCH_KEY = f"""
import ctypes, platform
calls = {_KEY_CALLS!r}
libc = ctypes.CDLL(None, use_errno=True)
serial = libc.syscall(calls[platform.machine()][1], 10, -3, b"user", b"pj-secret", 0)  # KEYCTL_SEARCH
if serial < 0:
    print("NOT FOUND", ctypes.get_errno())
else:
    buf = ctypes.create_string_buffer(64)
    n = libc.syscall(calls[platform.machine()][1], 11, serial, buf, 64)  # KEYCTL_READ
    print("FOUND", buf.raw[:max(n, 0)])
"""
