"""A snapshot of what jails could leave on a host: processes, mounts, links, cgroups, temp dirs.

``python tests/leftovers.py save FILE`` before a run and ``python tests/leftovers.py check FILE``
after it fail loudly on anything new; the cleanup tests use :func:`snapshot` directly.
"""

from __future__ import annotations

import json
import os
import sys


def _ppid(pid: str) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _foreign_pid_ns_processes(orphans_only: bool) -> set[str]:
    """Processes in another pid namespace than ours: every jail process is one.

    With ``orphans_only``, only those whose parent is gone (re-parented to pid 1): a jail that
    outlived its run; the jails of tests running at the same time (xdist) still have parents.
    """
    ours = os.readlink("/proc/self/ns/pid")
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") != ours and (not orphans_only or _ppid(pid) == 1):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                found.add(f"{pid} {cmdline}")
        except OSError:
            continue
    return found


def _command_lines() -> dict[str, bytes]:
    """Every process's command line, by pid (its arguments NUL-separated); those that end while
    being read are left out."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found[pid] = f.read()
        except OSError:
            continue
    return found


def tagged(tag: str) -> list[str]:
    """The pids of processes whose command line holds ``tag`` (tests tag what they start)."""
    return [pid for pid, cmdline in _command_lines().items() if tag.encode() in cmdline]


def named(name: str) -> list[str]:
    """The pids of processes whose ``argv[0]`` is ``name`` (``exec -a`` sets it at a daemon's last
    exec). Unlike ``tagged``, never true for the shells that start it, which hold the name in
    their arguments: waiting on those, a check can see the name an instant, then not."""
    return [pid for pid, cmdline in _command_lines().items() if cmdline.split(b"\0", 1)[0] == name.encode()]


def _jail_cgroups(orphans_only: bool = False) -> set[str]:
    """Groups named for jails; with ``orphans_only``, not those of a live session (pytest-jail.<pid>.*
    of a running pytest: the jails of tests running at the same time)."""
    found = set()
    for top in ("/sys/fs/cgroup",):
        for parent, dirs, _ in os.walk(top):
            if parent.count("/") > 6:
                dirs.clear()
            found.update(os.path.join(parent, d) for d in dirs if "jail" in d and not (orphans_only and _live(d)))
    return found


def _live(name: str) -> bool:
    parts = name.split(".")
    return name.startswith("pytest-jail.") and len(parts) > 1 and parts[1].isdigit() and os.path.exists(f"/proc/{parts[1]}")


def _leased(link: str) -> bool:
    """Whether ``link`` (a bridge ``pjbrN`` or veth ``pjvN...``) belongs to a segment a live
    process leases: its lease file is locked (the jails of a test running at the same time)."""
    import fcntl

    from pytest_jail._linux.net import LEASES

    digits = link.removeprefix("pjbr").removeprefix("pjv").split("x")[0]
    if not link.startswith(("pjbr", "pjv")) or not digits.isdigit():
        return False
    try:
        fd = os.open(os.path.join(LEASES, digits), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a lessee holds it exclusively
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def snapshot(orphans_only: bool = False) -> dict[str, list[str]]:
    """What is on the host now; with ``orphans_only``, without what live sessions hold (the
    processes and bridges of tests running at the same time)."""
    with open("/proc/self/mountinfo") as f:
        mounts = {line.split()[4] for line in f}
    return {
        "processes": sorted(_foreign_pid_ns_processes(orphans_only)),
        "mounts": sorted(mounts),
        "links": sorted(n for n in os.listdir("/sys/class/net") if not (orphans_only and _leased(n))),
        "cgroups": sorted(_jail_cgroups(orphans_only)),
        "temp dirs": sorted(n for n in os.listdir("/tmp") if "jail" in n.lower()),
    }


def new_since(before: dict[str, list[str]], after: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """What ``after`` (default: now, orphans only) holds that ``before`` did not; empty when clean."""
    after = after or snapshot(orphans_only=True)
    return {kind: sorted(set(after[kind]) - set(before[kind])) for kind in after if set(after[kind]) - set(before[kind])}


def main(argv: list[str]) -> int:
    command, path = argv
    if command == "save":
        with open(path, "w") as f:
            json.dump(snapshot(), f)
        return 0
    with open(path) as f:
        leaked = new_since(json.load(f), snapshot())
    if leaked:
        print(f"pytest-jail left things behind: {leaked}", file=sys.stderr)
        return 1
    print("leftovers: none (no new jail processes, mounts, links, cgroups or temp dirs)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
