"""A small, complete Linux tree from one statically linked busybox."""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import shutil
import struct
import subprocess
from functools import lru_cache

from .._errors import JailUnavailableError
from ._build import Progress
from ._build import building
from ._build import is_current
from ._build import quiet

#: Where Debian's busybox-static (and most distributions' busybox) puts the binary.
CANDIDATES = ("/bin/busybox", "/usr/bin/busybox", "/sbin/busybox", "/usr/sbin/busybox")
REMEDY = "apt-get install busybox-static (Debian, Ubuntu; dnf install busybox on Fedora), or give --busybox PATH"

_DIRS = {
    "bin": 0o755, "sbin": 0o755, "usr": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755, "etc": 0o755,
    "root": 0o700, "home": 0o755, "tmp": 0o1777, "proc": 0o555, "dev": 0o755, "sys": 0o555, "run": 0o755,
    "mnt": 0o755, "var": 0o755, "var/tmp": 0o1777, "var/log": 0o755,
}


def find_busybox(path: str | None = None) -> str:
    """A statically linked busybox: ``path``, else the first one on this host."""
    candidates = [path] if path else [*CANDIDATES, shutil.which("busybox") or ""]
    for candidate in filter(None, candidates):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            if _is_static(candidate):
                return os.path.realpath(candidate)
            if path:
                raise JailUnavailableError(
                    f"{path} is dynamically linked; a rootfs needs a statically linked busybox", REMEDY
                )
    raise JailUnavailableError(
        f"a busybox rootfs needs a statically linked busybox, and there is none "
        f"{'at ' + path if path else 'on this host'}",
        REMEDY,
    )


def _is_static(path: str) -> bool:
    """An ELF file without a program interpreter (PT_INTERP) runs without the host's libraries."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:  # 64-bit ELF only (x86_64, aarch64)
            return False
        order = "<" if header[5] == 1 else ">"
        phoff, = struct.unpack_from(order + "Q", header, 32)
        phentsize, phnum = struct.unpack_from(order + "HH", header, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from(order + "I", table, i * phentsize)[0] != 3 for i in range(phnum))


@lru_cache(maxsize=4)
def recipe(busybox: str, _mtime: int = 0, _size: int = 0) -> dict[str, str | int]:
    """What a busybox tree is built from: the binary's digest, and who it is for."""
    with open(busybox, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"kind": "busybox", "busybox_sha256": digest, "uid": os.geteuid(), "format": 1}


def current_recipe(busybox: str) -> dict[str, str | int]:
    st = os.stat(busybox)
    return recipe(busybox, st.st_mtime_ns, st.st_size)


def build(target: str, *, busybox: str | None = None, progress: Progress = quiet) -> bool:
    """Build (or keep) a busybox tree at ``target``. Returns False when it was already there."""
    binary = find_busybox(busybox)
    wanted = current_recipe(binary)
    if is_current(target, wanted):
        return False
    with building(target, wanted) as tree:
        progress(f"busybox tree: directories and /etc in {target}")
        for name, mode in _DIRS.items():
            os.makedirs(os.path.join(tree, name), exist_ok=True)
            os.chmod(os.path.join(tree, name), mode)
        shutil.copy2(binary, os.path.join(tree, "bin/busybox"))
        os.chmod(os.path.join(tree, "bin/busybox"), 0o755)
        _write_etc(tree)
        applets = subprocess.run([binary, "--list-full"], capture_output=True, text=True, check=True).stdout.split()
        progress(f"busybox tree: {len(applets)} applets")
        for applet in applets:
            link = os.path.join(tree, applet.lstrip("/"))
            if os.path.normpath(applet.lstrip("/")) == "bin/busybox" or os.path.lexists(link):
                continue
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.relpath(os.path.join(tree, "bin/busybox"), os.path.dirname(link)), link)
    return True


def _write_etc(tree: str) -> None:
    uid, gid = os.geteuid(), os.getegid()
    passwd = ["root:x:0:0:root:/root:/bin/sh", "nobody:x:65534:65534:nobody:/nonexistent:/bin/false"]
    group = ["root:x:0:", "nogroup:x:65534:"]
    if uid != 0:  # a tree built by a user is used by that user's rootless jails: give it a name
        user = _user_name(uid)
        passwd.append(f"{user}:x:{uid}:{gid}:{user}:/home/{user}:/bin/sh")
        group.append(f"{_group_name(gid)}:x:{gid}:")
        os.makedirs(os.path.join(tree, "home", user), mode=0o755, exist_ok=True)
    files = {
        "etc/passwd": "\n".join(passwd),
        "etc/group": "\n".join(group),
        "etc/shadow": "root:*:1::::::\nnobody:*:1::::::",
        "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback",
        "etc/hostname": "jail",
        "etc/resolv.conf": _host_resolv_conf(),
        "etc/shells": "/bin/sh\n/bin/ash",
        "etc/profile": 'export PATH=/usr/sbin:/usr/bin:/sbin:/bin\nexport PS1="\\u@\\h:\\w\\$ "',
        "etc/os-release": 'NAME="busybox (pytest-jail)"\nID=busybox\nPRETTY_NAME="busybox rootfs built by pytest-jail"',
    }
    for name, text in files.items():
        path = os.path.join(tree, name)
        with open(path, "w") as f:
            f.write(text.rstrip("\n") + "\n")
        os.chmod(path, 0o600 if name == "etc/shadow" else 0o644)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "user"


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return "user"


def _host_resolv_conf() -> str:
    """The host's name servers, copied as debootstrap does (used with ``net="host"``)."""
    try:
        with open("/etc/resolv.conf") as f:
            return f.read()
    except OSError:
        return "# no name servers were known when pytest-jail built this tree"
