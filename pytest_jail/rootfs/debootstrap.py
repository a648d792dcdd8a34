"""A Debian tree from Debian's package registry, with ``debootstrap``."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from collections.abc import Sequence

from .._errors import JailSetupError
from .._errors import JailUnavailableError
from ._build import Progress
from ._build import building
from ._build import is_current
from ._build import quiet

MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
ATTEMPTS = 3  # a download that fails is tried again: registries and networks hiccup


def build(
    target: str,
    *,
    suite: str = SUITE,
    include: Sequence[str] = (),
    mirror: str = MIRROR,
    progress: Progress = quiet,
) -> bool:
    """Build (or keep) a minimal Debian ``suite`` at ``target``, with the ``include`` packages.

    Returns False when a tree of that recipe is already there.
    """
    packages = sorted({p.strip() for p in include if p.strip()})
    wanted = {"kind": "debootstrap", "suite": suite, "include": packages, "mirror": mirror, "format": 1}
    if is_current(target, wanted):
        return False
    if os.geteuid() != 0:
        raise JailUnavailableError(
            "debootstrap needs root (it installs packages as root in the new tree)", "run it with sudo, as root"
        )
    command = shutil.which("debootstrap")
    if command is None:
        raise JailUnavailableError("debootstrap is not installed", "apt-get install debootstrap")
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with building(target, wanted, mode=0o700) as tree:
                _debootstrap(command, packages, suite, tree, mirror, progress, os.path.abspath(target))
            return True
        except _Download as exc:
            if attempt == ATTEMPTS:
                raise JailSetupError("debootstrap", None, f"{exc} (after {ATTEMPTS} attempts)",
                                     os.path.abspath(target)) from None
            progress(f"debootstrap: {exc}; trying again ({attempt + 1}/{ATTEMPTS})")
    return True  # pragma: no cover - the loop returns or raises


class _Download(Exception):
    """A package could not be downloaded: the registry or the network hiccupped."""


def _debootstrap(
    command: str, packages: list[str], suite: str, tree: str, mirror: str, progress: Progress, target: str
) -> None:
    argv = [command, "--variant=minbase"]
    if packages:
        argv.append("--include=" + ",".join(packages))
    argv += [suite, tree, mirror]
    log: list[str] = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as process:
        assert process.stdout is not None
        for line in process.stdout:
            log.append(line.rstrip())
            progress(f"debootstrap: {line.strip()}")
    if process.returncode != 0:
        tail = "; ".join(log[-3:]) or "no output"
        if any("Couldn't download" in line or "Failed getting release file" in line for line in log[-5:]):
            raise _Download(f"exited with status {process.returncode} ({tail})")
        raise JailSetupError("debootstrap", None, f"exited with status {process.returncode} ({tail})", target)
    for deb in glob.glob(os.path.join(tree, "var/cache/apt/archives/*.deb")):
        os.unlink(deb)  # downloaded packages, already installed: only size
