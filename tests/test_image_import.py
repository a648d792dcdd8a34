"""`pytest-jail rootfs import` (issue 4): docker export, docker save and OCI layouts, layers and
whiteouts applied in order, and hostile archives refused before anything lands outside the tree.

The archives are made here with tarfile, byte for byte in the formats Docker and OCI define; the
trees they give are then used as real jails' roots."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

import pytest
from conftest import needs_busybox
from conftest import needs_rootfs_jail
from conftest import tree_digest

from pytest_jail import Jail
from pytest_jail import JailConfigError
from pytest_jail import JailSpec
from pytest_jail.rootfs import busybox
from pytest_jail.rootfs import image

Entry = tuple[str, str, object]  # (name, kind, content): kind is file, dir, symlink, hardlink, chr


def _layer(entries: Iterable[Entry]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, kind, content in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if kind == "file":
                data = str(content).encode()
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
                continue
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, str(content)
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, str(content)
            elif kind == "chr":
                info.type, info.devmajor, info.devminor, info.mode = tarfile.CHRTYPE, 1, 3, 0o666
            tar.addfile(info)
    return buffer.getvalue()


def _archive(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _docker_save(path: Path, layers: list[bytes]) -> Path:
    members = {f"l{i}/layer.tar": data for i, data in enumerate(layers)}
    manifest = [{"Config": "config.json", "RepoTags": ["test:1"], "Layers": list(members)}]
    return _archive(path, {"manifest.json": json.dumps(manifest).encode(), "config.json": b"{}", **members})


def _oci_layout(path: Path, layers: list[bytes]) -> Path:
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[f"blobs/sha256/{digest[7:]}"] = data
        return digest

    described = []
    for data in layers:
        packed = gzip.compress(data)
        described.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                          "digest": blob(packed), "size": len(packed)})
    manifest = {"schemaVersion": 2, "config": {"digest": blob(b"{}"), "size": 2}, "layers": described}
    index = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                                 "digest": blob(json.dumps(manifest).encode())}]}
    return _archive(path, {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
                           "index.json": json.dumps(index).encode(), **blobs})


BASE = [("etc", "dir", None), ("etc/hostname", "file", "base\n"), ("etc/os", "file", "one\n"),
        ("usr", "dir", None), ("usr/share", "dir", None), ("usr/share/doc", "dir", None),
        ("usr/share/doc/old", "file", "old\n"), ("usr/share/doc/gone", "file", "gone\n"),
        ("etc/localtime", "symlink", "/usr/share/zoneinfo/UTC"), ("etc/os-link", "hardlink", "etc/os")]
TOP = [("etc/.wh.hostname", "file", ""), ("usr/share/doc/new", "file", "new\n"),
       ("usr/share/doc/.wh..wh..opq", "file", ""), ("etc/added", "file", "two\n")]


@pytest.mark.parametrize("layout", [_docker_save, _oci_layout], ids=["docker-save", "oci-layout"])
def test_layers_apply_in_order_with_whiteouts(tmp_path: Path, layout: object) -> None:
    """Two layers: a whiteout removes a file of the first, an opaque directory hides everything the
    first put there (but keeps its own entries), links survive; importing again does nothing."""
    archive = layout(tmp_path / "image.tar", [_layer(BASE), _layer(TOP)])  # type: ignore[operator]
    target = tmp_path / "tree"
    assert image.build(str(archive), str(target)) is True
    assert not (target / "etc/hostname").exists()
    assert sorted(os.listdir(target / "usr/share/doc")) == ["new"]
    assert (target / "etc/added").read_text() == "two\n"
    assert os.readlink(target / "etc/localtime") == "/usr/share/zoneinfo/UTC"
    assert os.stat(target / "etc/os-link").st_ino == os.stat(target / "etc/os").st_ino
    before = tree_digest(str(target))
    assert image.build(str(archive), str(target)) is False
    assert tree_digest(str(target)) == before


@needs_rootfs_jail
@needs_busybox
def test_exported_busybox_image_runs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """`docker export` output (one plain tar of a tree) imports into a tree a jail runs, unchanged by it."""
    base = tmp_path_factory.mktemp("export")
    os.chmod(base, 0o755)
    source = base / "source"
    busybox.build(str(source))
    archive = base / "export.tar"
    with tarfile.open(archive, "w") as tar:
        for name in sorted(os.listdir(source)):
            if name != ".pytest-jail-rootfs":
                tar.add(source / name, arcname=name)
    target = base / "imported"
    assert image.build(str(archive), str(target))
    before = tree_digest(str(target))
    result = Jail(JailSpec(rootfs=str(target))).run(["sh", "-c", "cat /etc/hostname; rm /etc/hostname; ps -o pid"])
    assert result.stdout.split() == ["jail", "PID", "1", "2"], result.stderr
    assert tree_digest(str(target)) == before
    if os.geteuid() == 0:
        assert os.stat(target / "root").st_uid == 0  # owners kept when root imports
    else:
        assert os.stat(target / "root").st_uid == os.geteuid()  # a user owns what it extracts


HOSTILE = {
    "dotdot": ([("../escaped", "file", "x")], "entry '../escaped' climbs out of the tree with '..'"),
    "through-symlink": ([("etc", "symlink", "/etc"), ("etc/cron.d/evil", "file", "x")],
                        "would be written through a symlink"),
    "symlink-out": ([("usr", "dir", None), ("usr/up", "symlink", "../../../etc/shadow")],
                    "symlink 'usr/up' -> '../../../etc/shadow' points out of the tree"),
    "hardlink-out": ([("x", "hardlink", "../../etc/shadow")], "hard link 'x' -> '../../etc/shadow' climbs out"),
    "whiteout-up": ([(".wh..", "file", "")], "whiteout '.wh..' names no entry"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused(tmp_path: Path, case: str) -> None:
    """Entries that would land outside the tree are refused in one line naming the entry; nothing is
    written outside, and no half-built tree stays."""
    entries, message = HOSTILE[case]
    outside = tmp_path / "escaped"
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "neighbour").write_text("must survive")
    archive = _docker_save(tmp_path / "image.tar", [_layer(entries)])
    with pytest.raises(JailConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        image.build(str(archive), str(tmp_path / "deep" / "tree"))
    assert "\n" not in str(info.value)
    assert not outside.exists()
    assert not (tmp_path / "deep" / "tree").exists()
    assert [p for p in os.listdir(tmp_path / "deep") if p.startswith(".tree.")] == []
    assert (tmp_path / "deep" / "neighbour").read_text() == "must survive"


def test_device_nodes_are_never_made(tmp_path: Path) -> None:
    """A device node in an image is skipped (a jail gets a fresh /dev), and the import says so."""
    said: list[str] = []
    archive = _docker_save(tmp_path / "image.tar", [_layer([("dev", "dir", None), ("dev/null", "chr", None),
                                                            ("etc", "dir", None)])])
    image.build(str(archive), str(tmp_path / "tree"), progress=said.append)
    assert os.listdir(tmp_path / "tree" / "dev") == []
    assert any("skipped 1 device node" in line for line in said)


def test_not_an_image(tmp_path: Path) -> None:
    """A file that is no tar archive is one line, with what is expected."""
    bogus = tmp_path / "bogus.tar"
    bogus.write_text("hello")
    with pytest.raises(JailConfigError, match="not a tar archive"):
        image.build(str(bogus), str(tmp_path / "tree"))
