"""`pytest-jail rootfs debootstrap` (issue 4): a real Debian tree from Debian's package registry,
cached between runs, used as a jail's root, and never changed by what runs in it.

Needs root and deb.debian.org; CI has both. Deselect on a laptop with ``-m 'not debootstrap'``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONTAINER_ROOT
from conftest import needs_jail
from conftest import needs_rootfs_jail
from conftest import tree_digest

from pytest_jail import Jail
from pytest_jail import JailSpec
from pytest_jail.rootfs import cache_dir
from pytest_jail.rootfs import debootstrap
from pytest_jail.rootfs._build import read_stamp

pytestmark = [needs_jail, needs_rootfs_jail, pytest.mark.debootstrap]
needs_debootstrap = [
    pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap needs root"),
    pytest.mark.skipif(shutil.which("debootstrap") is None, reason="needs debootstrap: apt-get install debootstrap"),
]

#: Shared with example_project's sshd test, so CI builds it once.
TREE = os.path.join(cache_dir(), "rootfs", "bookworm-sshd")


@pytest.fixture(scope="module")
def debian() -> str:
    """bookworm (minbase) with openssh-server, built with the console script as a user would."""
    command = [sys.executable, "-m", "pytest_jail.cli", "rootfs", "debootstrap", TREE, "--include", "openssh-server"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.strip().split("\n")[-1] in (f"built: {TREE}", f"up to date: {TREE}")
    return TREE


@needs_debootstrap[0]
@needs_debootstrap[1]
@pytest.mark.skipif(CONTAINER_ROOT, reason="a container's root maps only its own uid into its jails: what the tree "
                    "gives other ids (the shadow group's files) cannot be changed there (EOVERFLOW)")
def test_debian_tree_runs_and_is_left_unchanged(debian: str) -> None:
    """A jail in the Debian tree runs dpkg and apt as its root, removes half the system, and the
    tree is byte-for-byte the same afterwards."""
    assert read_stamp(debian) == {"kind": "debootstrap", "suite": "bookworm", "include": ["openssh-server"],
                                  "mirror": "http://deb.debian.org/debian", "format": 1}
    before = tree_digest(os.path.join(debian, "etc"))
    usr = tree_digest(os.path.join(debian, "usr", "sbin"))
    script = (
        "cat /etc/debian_version; dpkg-query -W -f='${Status}\\n' openssh-server; id -un; "
        "rm -rf /usr/sbin /etc/ssh && echo removed; chmod -R 700 /etc && echo chmod; "
        "echo 'deb http://example.invalid/ x main' > /etc/apt/sources.list && echo written"
    )
    result = Jail(JailSpec(rootfs=debian)).run(["/bin/sh", "-c", script])
    lines = result.stdout.split("\n")
    assert lines[0].startswith("12."), result.stderr
    assert lines[1:6] == ["install ok installed", "root", "removed", "chmod", "written"], result.stderr
    assert tree_digest(os.path.join(debian, "etc")) == before
    assert tree_digest(os.path.join(debian, "usr", "sbin")) == usr


@needs_debootstrap[0]
@needs_debootstrap[1]
def test_rebuilding_the_same_recipe_does_nothing(debian: str) -> None:
    """The builder is idempotent: the same recipe again says 'up to date' and changes nothing."""
    stamp = os.stat(os.path.join(debian, ".pytest-jail-rootfs")).st_mtime_ns
    command = [sys.executable, "-m", "pytest_jail.cli", "rootfs", "debootstrap", debian, "--include", "openssh-server"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr.strip() == f"up to date: {debian}"
    assert os.stat(os.path.join(debian, ".pytest-jail-rootfs")).st_mtime_ns == stamp


@pytest.mark.skipif(os.geteuid() != 0, reason="the debootstrap builder needs root")
def test_a_failed_download_is_tried_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry hiccup ("Couldn't download packages") is tried again, with a fresh tree, and says
    so. (A stand-in debootstrap on PATH: no network needed.)"""
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "debootstrap"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\n"
        f"echo x >> {calls}\n"
        f"if [ $(wc -l < {calls}) -lt 2 ]; then echo \"E: Couldn't download packages: libudev1\"; exit 1; fi\n"
        'mkdir -p "$3/etc" && echo 12.0 > "$3/etc/debian_version"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    said: list[str] = []
    assert debootstrap.build(str(tmp_path / "tree"), progress=said.append) is True
    assert calls.read_text().count("x") == 2
    assert any("trying again (2/3)" in line for line in said)
    assert (tmp_path / "tree" / "etc" / "debian_version").read_text() == "12.0\n"
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []
