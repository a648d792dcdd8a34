"""The ``pytest-jail`` console script: ``doctor``, and the rootfs builders."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ._doctor import examine
from ._doctor import render
from ._errors import JailConfigError
from ._errors import JailError
from .rootfs import busybox
from .rootfs import cache_dir
from .rootfs import debootstrap
from .rootfs import image
from .rootfs._build import Lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("say what to do: doctor, or rootfs")  # its usage, on stderr, and exit status 2
    if args.command == "rootfs" and args.kind is None:
        args.rootfs_parser.error("say which kind: busybox, debootstrap or import")
    if args.command == "doctor":
        report, status = render(examine(rootfs=args.rootfs, limits=args.limits, bridge=args.bridge))
        print(report)
        return status
    if args.command == "rootfs" and args.kind:
        try:
            return _rootfs(args)
        except JailError as exc:
            print(f"pytest-jail: error: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, JailConfigError) else 1
        except KeyboardInterrupt:
            print("pytest-jail: interrupted; nothing was left half-built", file=sys.stderr)
            return 130
    raise AssertionError(f"unhandled command {args.command!r}")  # pragma: no cover - argparse knows them all


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pytest-jail",
        description="Run pytest test bodies and commands in freshly cloned Linux jails.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    doctor = sub.add_parser(
        "doctor", help="say what this host supports, with the remedy for each 'no'",
        description="Try each capability jails need (in a throwaway child's own namespaces: nothing on the "
        "host changes), one line each, with the remedy for each 'no'. Exit status 0 if the jails asked for "
        "can run here (a jail in the host view, and what the options add), else 1.",
    )
    doctor.add_argument("--rootfs", action="store_true", help="the suite uses rootfs jails (rootfs=DIR or a name)")
    doctor.add_argument("--limits", action="store_true", help="the suite sets memory, cpus, pids or io limits")
    doctor.add_argument("--bridge", action="store_true", help="the suite uses net='bridge'")
    rootfs = sub.add_parser(
        "rootfs", help="build a root filesystem for jails (busybox, debootstrap, image import)",
        description="Build a tree to use as rootfs=DIR. Each builder is idempotent: building the same "
        "recipe into a tree it made does nothing; another recipe replaces it in one swap.",
    )
    rootfs.set_defaults(rootfs_parser=rootfs)
    kinds = rootfs.add_subparsers(dest="kind", metavar="KIND")
    bb = kinds.add_parser("busybox", help="a small tree from a static busybox (package busybox-static)")
    bb.add_argument("dir", nargs="?", help=f"where to build it (default: the cache behind rootfs='busybox', "
                                           f"{os.path.join(cache_dir(), 'rootfs', 'busybox')})")
    bb.add_argument("--busybox", metavar="PATH", help="the statically linked busybox to use")
    deb = kinds.add_parser("debootstrap", help="a Debian tree from Debian's package registry (needs root)")
    deb.add_argument("dir")
    deb.add_argument("--suite", default=debootstrap.SUITE, help=f"Debian suite (default: {debootstrap.SUITE})")
    deb.add_argument("--include", default="", metavar="PKG,PKG", help="extra packages, comma-separated")
    deb.add_argument("--mirror", default=debootstrap.MIRROR, help=f"(default: {debootstrap.MIRROR})")
    imp = kinds.add_parser("import", help="a tree from docker export / docker save output or an OCI layout tarball")
    imp.add_argument("tarball")
    imp.add_argument("dir")
    return parser


def _rootfs(args: argparse.Namespace) -> int:
    lines = Lines()
    if args.kind == "busybox":
        target = args.dir or os.path.join(cache_dir(), "rootfs", "busybox")
        built = busybox.build(target, busybox=args.busybox, progress=lines)
    elif args.kind == "debootstrap":
        target = args.dir
        built = debootstrap.build(target, suite=args.suite, include=args.include.split(","), mirror=args.mirror,
                                  progress=lines)
    else:
        target = args.dir
        built = image.build(args.tarball, target, progress=lines)
    lines.done(f"{'built' if built else 'up to date'}: {os.path.abspath(target)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
