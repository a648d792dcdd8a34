"""A tree from a container image: ``docker export`` output, a ``docker save`` archive, or an OCI
image layout, with layers applied in order and their whiteouts honoured.

Extraction never trusts the archive. Every entry is created relative to a directory descriptor
reached one component at a time without following symlinks, so no entry can land outside the
tree: names with ``..`` and entries that pass through a symlink are refused, and so are
symlinks and hard links whose target climbs out of the tree. Absolute symlinks are kept: every
real image has them (``/etc/alternatives``), and the jail resolves them inside its own root.
Device nodes are never created (a jail gets a fresh ``/dev``). Owners are kept when pytest-jail
runs as root (ids above 65535, which no jail maps, become 65534); a user owns everything it
extracts, and set-uid bits are then dropped.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field
from typing import IO
from typing import Any

from .._errors import JailConfigError
from ._build import Progress
from ._build import building
from ._build import is_current
from ._build import quiet

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
NOBODY = 65534
_LAYER_MEDIA = ("tar", "tar+gzip", "tar+bzip2", "tar+xz")


@dataclass
class _Layer:
    name: str  # how messages name it
    member: str  # its path in the outer archive


def build(tarball: str, target: str, *, progress: Progress = quiet) -> bool:
    """Import ``tarball`` into ``target``. Returns False when that image was already imported there."""
    tarball = os.path.abspath(tarball)
    if not os.path.isfile(tarball):
        raise JailConfigError(f"{tarball}: no such file; give docker export or docker save output, or an OCI layout")
    wanted = {"kind": "image", "sha256": _digest(tarball), "format": 1}
    if is_current(target, wanted):
        return False
    try:
        with building(target, wanted, mode=0o700 if os.geteuid() == 0 else 0o755) as tree, _open(tarball) as outer:
            _import(tarball, tree, outer, progress)
    except _BROKEN as exc:  # a truncated or corrupt archive, found part way (nothing is left half-built)
        raise JailConfigError(f"{tarball}: a broken archive ({type(exc).__name__}: {exc}); give docker "
                              "export or docker save output, or an OCI layout, whole") from None
    return True


#: How a truncated or corrupt archive fails while it is read (gzip.BadGzipFile is an OSError).
_BROKEN = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)


def _import(tarball: str, tree: str, outer: tarfile.TarFile, progress: Progress) -> None:
    """Apply the layers of an opened archive to ``tree``, bottom first."""
    layers = _layers(tarball, outer)
    writer = _Writer(tree, privileged=os.geteuid() == 0)
    try:
        for number, layer in enumerate(layers, 1):
            where = f"{os.path.basename(tarball)}: {layer.name}" if layer.member else os.path.basename(tarball)
            progress(f"layer {number}/{len(layers)}: {layer.name}")
            if layer.member:
                raw = outer.extractfile(layer.member)
                if raw is None:
                    raise JailConfigError(f"{where}: the layer is not a file in the archive")
                with _open_stream(raw, where) as inner:
                    writer.apply(inner, where)
            else:
                writer.apply(outer, where)
    finally:
        writer.close()
    if writer.skipped_devices:
        progress(f"skipped {writer.skipped_devices} device node(s): a jail gets a fresh /dev")


def _digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _open(path: str) -> Iterator[tarfile.TarFile]:
    try:
        archive = tarfile.open(path, "r:*")
    except _BROKEN:
        raise JailConfigError(f"{path}: not a tar archive (plain, gzip, bzip2 or xz); give docker export or "
                              "docker save output, or an OCI layout") from None
    with archive:
        yield archive


@contextmanager
def _open_stream(raw: IO[bytes], where: str) -> Iterator[tarfile.TarFile]:
    head = raw.read(4)
    raw.seek(0)
    if head == b"\x28\xb5\x2f\xfd":
        raise JailConfigError(f"{where}: the layer is compressed with zstd, which this Python cannot read")
    try:
        archive = tarfile.open(fileobj=raw, mode="r:*")
    except _BROKEN:
        raise JailConfigError(f"{where}: the layer is not a tar archive (plain, gzip, bzip2 or xz)") from None
    with archive:
        yield archive


def _layers(path: str, archive: tarfile.TarFile) -> list[_Layer]:
    """The layers, bottom first: one per layer of a saved or OCI image; the archive itself if exported."""
    names = set(archive.getnames())
    if "oci-layout" in names or "./oci-layout" in names:
        return _oci_layers(path, archive)
    if "manifest.json" in names or "./manifest.json" in names:
        manifest = _json(archive, "manifest.json", path)
        if not isinstance(manifest, list) or len(manifest) != 1:
            images = manifest if isinstance(manifest, list) else []
            tags = [t for image in images for t in image.get("RepoTags") or []]
            raise JailConfigError(
                f"{path}: a docker save archive of {len(images)} images ({', '.join(tags) or 'untagged'}); "
                "save one image per archive"
            )
        return [_Layer(f"layer {i} ({member.split('/')[0][:12]})", member)
                for i, member in enumerate(manifest[0]["Layers"], 1)]
    return [_Layer("exported filesystem", "")]


def _oci_layers(path: str, archive: tarfile.TarFile) -> list[_Layer]:
    index = _json(archive, "index.json", path)
    manifests = index.get("manifests", [])
    while True:
        if len(manifests) != 1:
            platforms = [f"{m.get('platform', {}).get('os')}/{m.get('platform', {}).get('architecture')}"
                         for m in manifests]
            wanted = [m for m in manifests if m.get("platform", {}).get("architecture") in (_arch(), None)
                      and m.get("platform", {}).get("os", "linux") == "linux"]
            if len(wanted) != 1:
                raise JailConfigError(
                    f"{path}: an OCI layout with {len(manifests)} manifests ({', '.join(platforms)}); "
                    "export a single-platform image"
                )
            manifests = wanted
        document = _json(archive, _blob(manifests[0]["digest"]), path)
        if "manifests" in document:  # an image index: go one level down
            manifests = document["manifests"]
            continue
        break
    layers = []
    for i, layer in enumerate(document.get("layers", []), 1):
        media = layer.get("mediaType", "")
        if not any(media.endswith(kind) for kind in _LAYER_MEDIA):
            raise JailConfigError(f"{path}: layer {i} has media type {media!r}; allowed: plain, gzip, bzip2 or xz tar")
        layers.append(_Layer(f"layer {i} ({layer['digest'][7:19]})", _blob(layer["digest"])))
    return layers


def _arch() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


def _blob(digest: str) -> str:
    algorithm, _, hexdigest = str(digest).partition(":")
    if algorithm != "sha256" or not hexdigest.isalnum():
        raise JailConfigError(f"digest {digest!r} is not a sha256 digest")
    return f"blobs/sha256/{hexdigest}"


def _json(archive: tarfile.TarFile, name: str, path: str) -> Any:
    for candidate in (name, "./" + name):
        try:
            member = archive.extractfile(candidate)
        except KeyError:
            continue
        if member is not None:
            try:
                return json.load(member)
            except ValueError as exc:
                raise JailConfigError(f"{path}: {name} is not valid JSON ({exc})") from None
    raise JailConfigError(f"{path}: {name} is missing from the archive")


@dataclass
class _Writer:
    """Applies layers to a tree through directory descriptors; never follows a symlink."""

    root: str
    privileged: bool
    skipped_devices: int = 0
    _root_fd: int = -1
    _layer_paths: set[str] = field(default_factory=set)
    _dir_modes: dict[str, tuple[int, int, int, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        # Directory modes last: a 0555 directory must not stop the entries that go into it.
        for path, (mode, uid, gid, mtime) in sorted(self._dir_modes.items(), key=lambda i: -len(i[0])):
            try:
                fd = self._open_dir(path, create=False)
            except (OSError, JailConfigError):
                continue
            try:
                self._own(fd, uid, gid)
                os.chmod(fd, mode)
                os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)
        os.close(self._root_fd)

    def apply(self, archive: tarfile.TarFile, where: str) -> None:
        self._layer_paths = set()
        for member in archive:
            path = _safe_name(member.name, where)
            if path is None:
                continue  # the root directory itself
            base = posixpath.basename(path)
            try:
                if base == OPAQUE:
                    self._clear(posixpath.dirname(path))
                elif base.startswith(WHITEOUT):
                    name = base[len(WHITEOUT):]
                    if name in ("", ".", ".."):  # ".wh.." would remove the directory above the tree
                        raise JailConfigError(f"{where}: whiteout {member.name!r} names no entry: refused")
                    self._remove(posixpath.join(posixpath.dirname(path), name))
                else:
                    self._entry(archive, member, path, where)
                    self._layer_paths.add(path)
            except OSError as exc:
                raise JailConfigError(f"{where}: cannot extract {member.name!r}: {exc.strerror}") from None

    # -- entries -----------------------------------------------------------------------------

    def _entry(self, archive: tarfile.TarFile, member: tarfile.TarInfo, path: str, where: str) -> None:
        parent, name = posixpath.split(path)
        if member.ischr() or member.isblk():
            self.skipped_devices += 1
            return
        dir_fd = self._open_dir(parent, create=True, where=where)
        try:
            existing = _lstat(name, dir_fd)
            if member.isdir():
                if existing is not None and not stat.S_ISDIR(existing.st_mode):
                    os.unlink(name, dir_fd=dir_fd)
                    existing = None
                if existing is None:
                    os.mkdir(name, 0o700, dir_fd=dir_fd)
                self._dir_modes[path] = (self._mode(member), member.uid, member.gid, member.mtime)
                return
            if existing is not None:
                self._delete(dir_fd, name, existing)
            if member.issym():
                _check_symlink(path, member.linkname, where)
                os.symlink(member.linkname, name, dir_fd=dir_fd)
            elif member.islnk():
                source = _safe_name(member.linkname, where, kind=f"hard link {path!r} ->")
                if source is None:
                    raise JailConfigError(f"{where}: hard link {path!r} points at the tree's root: refused")
                source_parent, source_name = posixpath.split(source)
                source_fd = self._open_dir(source_parent, create=False, where=where)
                try:
                    os.link(source_name, name, src_dir_fd=source_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
                finally:
                    os.close(source_fd)
                return
            elif member.isfifo():
                os.mkfifo(name, 0o600, dir_fd=dir_fd)
            elif member.isreg():
                self._write_file(archive, member, name, dir_fd)
                return
            else:
                return
            os.utime(name, (member.mtime, member.mtime), dir_fd=dir_fd, follow_symlinks=False)
            if self.privileged:
                os.chown(name, *self._ids(member), dir_fd=dir_fd, follow_symlinks=False)
        finally:
            os.close(dir_fd)

    def _write_file(self, archive: tarfile.TarFile, member: tarfile.TarInfo, name: str, dir_fd: int) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
        try:
            source = archive.extractfile(member)
            if source is not None:
                with open(fd, "wb", closefd=False) as out:
                    shutil.copyfileobj(source, out, 1 << 20)
            self._own(fd, *self._ids(member))
            os.chmod(fd, self._mode(member))
            os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)

    def _mode(self, member: tarfile.TarInfo) -> int:
        mode = member.mode & 0o7777
        return mode if self.privileged else mode & ~(stat.S_ISUID | stat.S_ISGID)

    def _ids(self, member: tarfile.TarInfo) -> tuple[int, int]:
        return (member.uid if member.uid <= 65535 else NOBODY, member.gid if member.gid <= 65535 else NOBODY)

    def _own(self, fd: int, uid: int, gid: int) -> None:
        if self.privileged:
            os.fchown(fd, uid if uid <= 65535 else NOBODY, gid if gid <= 65535 else NOBODY)

    # -- whiteouts -----------------------------------------------------------------------------

    def _remove(self, path: str) -> None:
        """``.wh.NAME``: what the layers below put at NAME is gone."""
        parent, name = posixpath.split(path)
        try:
            dir_fd = self._open_dir(parent, create=False)
        except FileNotFoundError:
            return
        try:
            existing = _lstat(name, dir_fd)
            if existing is not None:
                self._delete(dir_fd, name, existing)
        finally:
            os.close(dir_fd)

    def _clear(self, path: str) -> None:
        """``.wh..wh..opq``: the directory shows nothing from the layers below."""
        try:
            dir_fd = self._open_dir(path, create=False)
        except FileNotFoundError:
            return
        try:
            for name in os.listdir(dir_fd):
                if posixpath.join(path, name) not in self._layer_paths:
                    self._delete(dir_fd, name, os.lstat(name, dir_fd=dir_fd))
        finally:
            os.close(dir_fd)

    def _delete(self, dir_fd: int, name: str, st: os.stat_result) -> None:
        if stat.S_ISDIR(st.st_mode):
            os.chmod(name, 0o700, dir_fd=dir_fd)
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)

    # -- walking -----------------------------------------------------------------------------

    def _open_dir(self, path: str, *, create: bool, where: str = "") -> int:
        """A descriptor of the tree's directory ``path``, reached without following a symlink."""
        fd = os.dup(self._root_fd)
        walked = ""
        try:
            for part in filter(None, path.split("/")):
                walked = posixpath.join(walked, part)
                st = _lstat(part, fd)
                if st is None and create:
                    os.mkdir(part, 0o755, dir_fd=fd)
                elif st is not None and stat.S_ISLNK(st.st_mode):
                    raise JailConfigError(
                        f"{where}: an entry under {walked!r} would be written through a symlink "
                        f"(to {os.readlink(part, dir_fd=fd)!r}), outside the tree: refused"
                    )
                elif st is not None and not stat.S_ISDIR(st.st_mode):
                    raise OSError(errno.ENOTDIR, f"{walked} is not a directory")
                elif not self.privileged and st is not None and not st.st_mode & stat.S_IWUSR:
                    os.chmod(part, 0o700, dir_fd=fd)  # its real mode comes back in close()
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def _safe_name(name: str, where: str, kind: str = "entry") -> str | None:
    """A member's path relative to the tree's root; ``None`` for the root itself."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise JailConfigError(f"{where}: {kind} {name!r} climbs out of the tree with '..': refused")
    return "/".join(parts) or None


def _check_symlink(path: str, target: str, where: str) -> None:
    """Refuse a relative symlink that climbs above the tree's root (an absolute one is resolved
    in the jail's root, which it cannot leave)."""
    if target.startswith("/"):
        return
    depth = 0
    for part in posixpath.join(posixpath.dirname(path), target).split("/"):
        depth += -1 if part == ".." else 0 if part in ("", ".") else 1
        if depth < 0:
            raise JailConfigError(f"{where}: symlink {path!r} -> {target!r} points out of the tree: refused")
