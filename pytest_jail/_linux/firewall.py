"""The way out of a bridge segment, when a jail asks for one (``nat=True``, ``allow=[...]``): the
kernel's own NAT and filter, written with the ``nft`` tool, and IPv4 forwarding where it is needed.

One nftables table per segment, ``inet pytest_jail_<N>``, rewritten in one transaction whenever a
jail with a way out joins or leaves it, deleted with the segment. In it, a jail's packets leave
the bridge only towards what it may reach (everything with ``nat=True``, else its ``allow`` list)
and are masqueraded there; anything else from the segment is refused, and nothing from outside
enters but replies.

Forwarding is switched on only on the devices that carry the traffic: the segment's bridge and
the host's device towards each destination (replies come in there). The device's old setting is
kept in ``/run/pytest-jail/net/forwarding.<dev>``; every process that needs it holds a shared
lock on that file, and the last one to let go (or the next start-up, after a crash) puts the old
setting back.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import shutil
import subprocess
from collections.abc import Iterable
from collections.abc import Iterator

from .._errors import JailSetupError
from .._errors import JailUnavailableError

FORWARDING = "/run/pytest-jail/net/forwarding."

Rule = tuple[str, "int | None"]  # (network, port or None)


def table(index: int) -> str:
    return f"pytest_jail_{index}"


def ruleset(index: int, bridge: str, subnet: str, jails: dict[str, tuple[Rule, ...] | None]) -> str:
    """The segment's table: ``jails`` maps a jail's address to what it may reach (``None``: all)."""
    lines = [f"table inet {table(index)} {{}}", f"delete table inet {table(index)}", f"table inet {table(index)} {{",
             "  chain forward {", "    type filter hook forward priority filter - 1; policy accept;"]
    for ip, rules in sorted(jails.items()):
        if rules is None:
            lines.append(f'    iifname "{bridge}" ip saddr {ip} accept')
            continue
        for network, port in rules:
            if port is None:
                lines.append(f'    iifname "{bridge}" ip saddr {ip} ip daddr {network} accept')
            else:
                for proto in ("tcp", "udp"):
                    lines.append(f'    iifname "{bridge}" ip saddr {ip} ip daddr {network} {proto} dport {port} accept')
    lines += [
        f'    iifname "{bridge}" reject with icmp type admin-prohibited',
        f'    oifname "{bridge}" ct state established,related accept',
        f'    oifname "{bridge}" drop',
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f'    ip saddr {subnet} oifname != "{bridge}" masquerade',
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def apply(text: str) -> None:
    """Load a ruleset in one transaction."""
    nft = _nft()
    done = subprocess.run([nft, "-f", "-"], input=text, capture_output=True, text=True)
    if done.returncode != 0:
        raise JailSetupError("network", None, f"nft refused the segment's rules: {done.stderr.strip()}")


def delete(index: int) -> None:
    nft = _find_nft()
    if nft is not None:
        subprocess.run([nft, "delete", "table", "inet", table(index)], capture_output=True)


def tables() -> list[int]:
    """The segments that have a table now (a dead process's ones included)."""
    nft = _find_nft()
    if nft is None:
        return []
    listed = subprocess.run([nft, "list", "tables"], capture_output=True, text=True).stdout.split()
    return [int(name[len("pytest_jail_"):]) for name in listed
            if name.startswith("pytest_jail_") and name[len("pytest_jail_"):].isdigit()]


def _find_nft() -> str | None:
    return shutil.which("nft") or next((p for p in ("/usr/sbin/nft", "/sbin/nft") if os.path.exists(p)), None)


def _nft() -> str:
    nft = _find_nft()
    if nft is None:
        raise JailUnavailableError(
            "nat=True and allow=[...] are written with the nft tool, which is not installed",
            "apt-get install nftables",
        )
    return nft


def parse_allow(text: str) -> Rule:
    """``"203.0.113.7:443"``, ``"10.0.0.0/8"``, ``"10.1.2.3/32:5432"`` -> (network, port)."""
    address, _, port = str(text).partition(":")
    try:
        network = ipaddress.IPv4Network(address, strict=False)
    except ValueError:
        raise ValueError(f"{text!r}: an IPv4 address or network, optionally with :PORT") from None
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{text!r}: the port must be 1-65535")
    return str(network), int(port) if port else None


class Forwarding:
    """IPv4 forwarding on the host devices this process's jails need, given back when done."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}  # device -> descriptor of its locked state file

    def need(self, devices: Iterable[str]) -> None:
        for device in devices:
            if device not in self._held:
                self._held[device] = _hold(device)

    def close(self) -> None:
        for device, fd in self._held.items():
            _let_go(device, fd)
        self._held.clear()


@contextlib.contextmanager
def _deciding() -> Iterator[None]:
    """One process at a time takes, gives back or cleans a forwarding setting."""
    os.makedirs(os.path.dirname(FORWARDING), mode=0o755, exist_ok=True)
    fd = os.open(FORWARDING + "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _hold(device: str) -> int:
    with _deciding():
        fd = os.open(FORWARDING + device, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)  # held while this process needs it
        if not os.pread(fd, 16, 0):  # the first holder: note the old setting, switch it on
            old = _read(device)
            if old is None:
                os.close(fd)
                raise JailSetupError("network", None, f"no forwarding setting for device {device}")
            os.pwrite(fd, old.encode(), 0)
            _write(device, "1")
        return fd


def _let_go(device: str, fd: int) -> None:
    with _deciding():
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # succeeds only for the last holder
        except BlockingIOError:
            pass
        else:
            _restore(device, fd)
        finally:
            os.close(fd)


def _restore(device: str, fd: int) -> None:
    old = os.pread(fd, 16, 0).decode().strip()
    if old in ("0", "1"):
        with contextlib.suppress(OSError):
            _write(device, old)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(FORWARDING + device)


def clean_stale() -> None:
    """Settings whose holders all died: put them back."""
    directory = os.path.dirname(FORWARDING)
    if not os.path.isdir(directory):
        return
    with _deciding():
        for name in os.listdir(directory):
            if not name.startswith("forwarding.") or name == "forwarding.lock":
                continue
            try:
                fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                _restore(name[len("forwarding."):], fd)
            except BlockingIOError:
                pass
            finally:
                os.close(fd)


def _read(device: str) -> str | None:
    try:
        with open(f"/proc/sys/net/ipv4/conf/{device}/forwarding") as f:
            return f.read().strip()
    except OSError:
        return None


def _write(device: str, value: str) -> None:
    with open(f"/proc/sys/net/ipv4/conf/{device}/forwarding", "w") as f:
        f.write(value)
