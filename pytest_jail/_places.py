"""What of the host a jailed test sees besides the host view: its session's temporary
directories, the Python runtime and the rootdir, and the places its ecosystem writes.

Decided in pytest's process before a jail is built; the objects come from pytest (its config,
its temporary path factory, its cache) but are only read here, so this module needs no pytest.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import sys
import tempfile
import uuid
from typing import Any

from ._linux.mounts import Exposure
from ._linux.mounts import under
from ._view import ROOT_MAP_BASE
from ._view import idmap_works
from ._view import runtime_paths
from ._view import uses_root_map


def exposures(config: Any, rootfs: str | None, tmp: Any, *, body: bool) -> list[Exposure]:
    """The test's own temp dir (writable) inside its session's base temp dir (read-only, so what a
    session fixture prepared there can be read), the places the ecosystem writes (a body's
    hypothesis database, pytest's cache), and the runtime and rootdir (read-only) where needed.

    A body needs the runtime to import and format tracebacks (in a custom rootfs only what is on
    sys.path); a command in the host view gets it too (``jail.run([sys.executable, ...])`` must
    work when Python lives under a 0700 ``/root``); a command in a custom rootfs gets none of it.

    As root, the jail's root is an unprivileged host uid: these places are shown id-mapped (the
    host root's files there are the jail root's), or, where the filesystem cannot be id-mapped,
    the test's temp dir is handed to the jail's root and the rest is not shown.
    """
    root_map = uses_root_map()
    found: list[Exposure] = []

    def add(path: str, writable: bool) -> None:
        mapped = root_map and idmap_works(path)
        if root_map and not mapped:
            if path != tmp_path:
                return
            _chown_tree(path, ROOT_MAP_BASE)
        found.append(Exposure(path, path, writable=writable, mapped=mapped))

    tmp_path = None if tmp is None else str(tmp)
    base = basetemp(config)
    if base is not None:
        add(base, False)
    if tmp_path is not None:
        add(tmp_path, True)
    if body:
        for path in ecosystem_dirs(config):
            add(path, True)
    if body or rootfs is None:
        taken = [e.target for e in found]
        for path in [*runtime_paths(imports_only=rootfs is not None), str(config.rootpath)]:
            if not any(path == t or path.startswith(t + "/") for t in taken):
                found.append(Exposure(path, path))
                taken.append(path)
    handed_over = [e for e in found if root_map and e.target == tmp_path and not e.mapped]
    if handed_over and base is not None:
        _searchable_way(handed_over[0].target, base, [e.target for e in found if e is not handed_over[0]])
    return found


def writable_on_entry(found: list[Exposure], tmp: Any) -> tuple[list[Exposure], tuple[str, ...]]:
    """Take the test's temp dir out of the jail's plan when a read-only exposure above it (the
    session's base temp dir) already shows it: the body makes it writable as it enters (see
    ``Entry.writable``), so the jail does not depend on the test and can be prepared ahead."""
    if tmp is None:
        return found, ()
    tmp_path = str(tmp)
    own = [e for e in found if e.target == tmp_path and e.writable]
    above = sorted((e for e in found if not e.writable and tmp_path.startswith(e.target.rstrip("/") + "/")),
                   key=lambda e: -len(e.target))  # the closest: the mount the body sees it through
    if len(own) != 1 or not above or above[0].mapped != own[0].mapped or above[0].source != above[0].target:
        return found, ()
    return [e for e in found if e is not own[0]], (tmp_path,)


def basetemp(config: Any) -> str | None:
    """The session's base temporary directory, if the session made one (never made here)."""
    factory = getattr(config, "_tmp_path_factory", None)
    made = getattr(factory, "_basetemp", None)
    return str(made) if made is not None and os.path.isdir(made) else None


def ecosystem_dirs(config: Any) -> list[str]:
    """Directories the test ecosystem writes to from a test body, made as their owners make them:
    hypothesis's example database (its home, ``.hypothesis``), pytest's cache (``cache.set``)."""
    found = []
    hypothesis = sys.modules.get("hypothesis.configuration")
    if hypothesis is not None:
        try:
            home = hypothesis.storage_directory("examples", intent_to_write=False)
            home.create_if_missing()
            found.append(str(home.home_directory))
        except (AttributeError, TypeError, OSError):  # another hypothesis: its own path, as a Path
            try:
                path = hypothesis.storage_directory("examples")
                path.mkdir(parents=True, exist_ok=True)
                found.append(str(path.parent))
            except (AttributeError, TypeError, OSError):
                pass
    cache = getattr(config, "cache", None)
    cachedir = getattr(cache, "_cachedir", None)
    if cache is not None and cachedir is not None:
        try:
            cache._ensure_cache_dir_and_supporting_files()
            found.append(str(cachedir))
        except (AttributeError, OSError):
            pass
    return [os.path.realpath(p) for p in found if os.path.isdir(p)]


class SubprocessCoverage:
    """Coverage data of Python programs a ``jail.run`` command starts, where coverage's subprocess
    support is configured (``patch = subprocess``, or ``COVERAGE_PROCESS_START``): they write it to
    a directory of their own, and it is moved where coverage combines parallel data (pytest-cov's
    combine step), since the project tree is read-only in a jail."""

    def __init__(self, directory: str, data_file: str) -> None:
        self.directory = directory
        self.data_file = data_file
        self.exposure = Exposure(directory, directory, writable=True, mapped=uses_root_map())

    @classmethod
    def wanted(cls, env: Any, config: Any) -> SubprocessCoverage | None:
        if not ({"COVERAGE_PROCESS_CONFIG", "COVERAGE_PROCESS_START"} & set(env)) or "coverage" not in sys.modules:
            return None
        cov = sys.modules["coverage"].Coverage.current()
        base = basetemp(config) or getattr(getattr(config, "_tmp_path_factory", None), "getbasetemp", lambda: None)()
        if cov is None or base is None:
            return None
        directory = tempfile.mkdtemp(prefix="jail-coverage-", dir=str(base))
        os.chmod(directory, 0o777)  # whoever the jail's user is, as root mode fallback too
        return cls(directory, os.path.abspath(cov.config.data_file))

    def environ(self, env: Any) -> dict[str, str]:
        """``env`` with coverage's data file in the directory: ``COVERAGE_FILE`` for a config file
        (``COVERAGE_PROCESS_START``), and in the serialized config that ``patch = subprocess``
        passes (``COVERAGE_PROCESS_CONFIG``, base64 of JSON), which ``COVERAGE_FILE`` does not reach."""
        data_file = os.path.join(self.directory, ".coverage")
        changed = {**env, "COVERAGE_FILE": data_file}
        if "COVERAGE_PROCESS_CONFIG" in env:
            try:
                config = json.loads(base64.b64decode(env["COVERAGE_PROCESS_CONFIG"]))
                config["data_file"] = data_file
                changed["COVERAGE_PROCESS_CONFIG"] = base64.b64encode(json.dumps(config).encode()).decode()
            except ValueError:  # another coverage's format: its programs write where they would
                pass
        return changed

    def collect(self) -> None:
        """Move what the programs wrote next to the data file, as parallel data to combine."""
        for name in sorted(os.listdir(self.directory)):
            entry = os.lstat(os.path.join(self.directory, name))
            if name.startswith(".coverage") and stat.S_ISREG(entry.st_mode):  # a jail's symlink moves nothing
                os.replace(os.path.join(self.directory, name),
                           f"{self.data_file}.pytest-jail.{os.getpid()}.{uuid.uuid4().hex[:12]}")
        shutil.rmtree(self.directory, ignore_errors=True)


def _searchable_way(tmp_path: str, base: str, shown: list[str]) -> None:
    """Root mode, where the filesystem cannot be id-mapped: where the test's temp dir lies under
    another place the jail shows as it is (the rootdir, when pytest's base temp dir is inside it,
    as in pytester's runs), the jail's root must be let through pytest's own directories on the way
    (mode 0700, root's): they get search permission for others, never read permission."""
    above = [t for t in shown if t != tmp_path and under(tmp_path, t)]
    if not above:  # the jail makes the way in its own /tmp
        return
    closest = max(above, key=len)
    way = os.path.dirname(tmp_path)
    while way != closest and under(way, base):
        mode = os.stat(way, follow_symlinks=False).st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(way, stat.S_IMODE(mode) | stat.S_IXOTH, follow_symlinks=False)
        way = os.path.dirname(way)


def _chown_tree(path: str, uid: int) -> None:
    """Root mode, where the filesystem cannot be id-mapped: hand the test's temp dir to the jail's
    root (an unprivileged host uid).

    Walked through directory descriptors, never by path (``os.fwalk`` opens each directory with
    ``O_NOFOLLOW`` and checks it is the one it listed): a jail that swaps a directory of the tree
    for a symlink to ``/etc`` between two walks gets nothing re-owned outside the tree. Files with
    other hard links are left alone: the link may be a host file (``/etc/passwd`` linked in by a
    fixture) that must not change owner.
    """
    os.chown(path, uid, uid, follow_symlinks=False)
    for _, dirs, files, dir_fd in os.fwalk(path, follow_symlinks=False):
        for name in dirs + files:
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode) or st.st_nlink == 1:
                    os.chown(name, uid, uid, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:  # gone meanwhile: nothing to hand over
                pass
