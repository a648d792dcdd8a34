"""The ``pytest-jail`` console script."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._probe import probe_host


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pytest-jail",
        description="Run pytest test bodies and commands in freshly cloned Linux jails.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("doctor", help="say what this host supports, with the remedy for each 'no'")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        support = probe_host()
        print(support.summary())
        if not support.ok:
            print(f"remedy: {support.remedy}")
        return 0 if support.ok else 1
    parser.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
