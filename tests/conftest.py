"""Gates for the suite: tests that need a real jail skip with the host probe's own explanation."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from pytest_jail._jail import uses_root_map
from pytest_jail._probe import probe_host

_HOST = probe_host()

needs_jail = pytest.mark.skipif(not _HOST.ok, reason=f"{_HOST.reason}; {_HOST.remedy}")
root_mode = pytest.mark.skipif(not uses_root_map(), reason="needs pytest to run as real root (root mode)")
rootless_mode = pytest.mark.skipif(uses_root_map(), reason="needs an unprivileged user (rootless mode)")
needs_busybox = pytest.mark.skipif(
    shutil.which("busybox") is None, reason="needs a static busybox: apt-get install busybox-static"
)


@pytest.fixture
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A minimal rootfs: a static busybox and its applet links, world-readable."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("needs a static busybox: apt-get install busybox-static")
    root = tmp_path_factory.mktemp("rootfs")
    os.chmod(root, 0o755)
    for name in ("bin", "etc", "proc", "dev", "tmp", "sys", "root"):
        (root / name).mkdir()
    shutil.copy(busybox, root / "bin" / "busybox")
    for applet in ("sh", "ls", "ps", "cat", "id", "hostname", "touch", "echo", "sleep", "mount", "rm"):
        os.symlink("busybox", root / "bin" / applet)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "marker").write_text("from the rootfs\n")
    for path in (root, *root.rglob("*")):
        if not path.is_symlink():
            os.chmod(path, 0o755)
    return str(root)


@pytest.fixture
def jailed_pytester(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester whose directory the jail can read (root mode runs the jail as an unprivileged host
    uid), whose runs keep the order of their tests (pytest-randomly, where installed, is off)."""
    os.chmod(pytester.path, 0o755)
    monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:randomly")
    return pytester


def tree_digest(root: str) -> str:
    """Every path, mode, owner, size, link target and byte of a tree: equal digests, equal trees."""
    digest = hashlib.sha256()
    for parent, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(dirs + files):
            path = os.path.join(parent, name)
            st = os.lstat(path)
            digest.update(f"{path}\0{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0{st.st_size}\0".encode())
            if os.path.islink(path):
                digest.update(os.readlink(path).encode())
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()
