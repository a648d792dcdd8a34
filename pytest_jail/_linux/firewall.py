"""The way out of a bridge segment, when a jail asks for one (``nat=True``, ``allow=[...]``): the
kernel's own NAT and filter, written with the ``nft`` tool, and IPv4 forwarding where it is needed.

One nftables table per segment, ``inet pytest_jail_<N>``, rewritten in one transaction whenever a
jail with a way out joins or leaves it, deleted with the segment. In it, a jail's packets leave
the bridge only towards what it may reach (everything with ``nat=True``, else its ``allow`` list)
and are masqueraded there; anything else from the segment is refused, and nothing from outside
enters but replies.

Forwarding is switched on only on the devices that carry the traffic: the segment's bridge and
the host's device towards each destination (replies come in there). Switched on, an uplink would
forward whatever the LAN sends it to every other device of the host (a VPN, docker0): where we
switched it on, a guard table (``inet pytest_jail_uplink_<dev>``) drops every packet forwarded
from it but towards our bridges, so the host forwards from there exactly what it did before.
The device's old setting is kept in ``/run/pytest-jail/net/forwarding.<dev>:<index>``; every
process that needs it holds a shared lock on that file, and the last one to let go (or the next
start-up, after a crash) puts the old setting back, unless someone else changed forwarding
meanwhile (the device's value, or the host-wide one Docker sets): then theirs stays.

Not taken: a router network namespace between the bridges and the host. Replies coming in on
the uplink would still be forwarded by the host's own stack (the kernel checks forwarding on
the device a packet comes in on), so it would need the same switch and the same guard.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import shutil
import subprocess
import warnings
from collections.abc import Iterable
from collections.abc import Iterator

from .._errors import JailSetupError
from .._errors import JailUnavailableError
from .._errors import JailWarning

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
    """Delete a segment's table; a table that stays is said (never a silent leftover)."""
    nft = find_nft()
    if nft is not None:
        done = subprocess.run([nft, "delete", "table", "inet", table(index)], capture_output=True, text=True)
        if done.returncode != 0 and index in tables():
            warnings.warn(JailWarning(f"nft could not delete table inet {table(index)} ({done.stderr.strip()}); "
                                      f"remove it with: nft delete table inet {table(index)}"), stacklevel=2)


def tables() -> list[int]:
    """The segments that have a table now (a dead process's ones included)."""
    nft = find_nft()
    if nft is None:
        return []
    listed = subprocess.run([nft, "list", "tables"], capture_output=True, text=True).stdout.split()
    return [int(name[len("pytest_jail_"):]) for name in listed
            if name.startswith("pytest_jail_") and name[len("pytest_jail_"):].isdigit()]


def find_nft() -> str | None:
    return shutil.which("nft") or next((p for p in ("/usr/sbin/nft", "/sbin/nft") if os.path.exists(p)), None)


def _nft() -> str:
    nft = find_nft()
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
    """IPv4 forwarding on the host devices this process's jails need, given back when done.

    A device is known by its name and its index (``eth0:2``): a device removed and made again
    under the same name (a veth, a VPN's tun) is another one, whose setting is its own.
    """

    def __init__(self) -> None:
        self._held: dict[str, int] = {}  # device key -> descriptor of its locked state file

    def need(self, devices: Iterable[str], *, uplink: bool = True) -> None:
        """Forwarding on ``devices``; an ``uplink`` (a device of the host's, not our bridge) gets
        the guard where we switch it on."""
        for device in devices:
            key = _key(device)
            if key is None:
                raise JailSetupError("network", None, f"no forwarding setting for device {device}")
            if key not in self._held:
                self._held[key] = _hold(key, uplink)

    def close(self) -> None:
        for key, fd in self._held.items():
            _let_go(key, fd)
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


def _key(device: str) -> str | None:
    """``eth0:2``: the device's name and index (a name cannot hold a colon), or ``None``."""
    try:
        with open(f"/sys/class/net/{device}/ifindex") as f:
            return f"{device}:{int(f.read())}"
    except (OSError, ValueError):
        return None


def guard(key: str) -> str:
    """The guard table of an uplink whose forwarding we switched on: nothing is forwarded from it
    but to our bridges (where the segments' own tables let only replies through). ``key`` as
    :func:`guard_table` takes it."""
    key = _as_key(key)
    device = key.rpartition(":")[0]
    return (f"table inet {guard_table(key)} {{\n"
            "  chain forward {\n"
            "    type filter hook forward priority filter - 2; policy accept;\n"
            f'    iifname "{device}" oifname != "pjbr*" drop\n'
            "  }\n"
            "}\n")


def guard_table(key: str) -> str:
    """``pytest_jail_uplink_eth0_2`` for the device key ``eth0:2`` (or a name: its current key)."""
    key = _as_key(key)
    return "pytest_jail_uplink_" + "".join(c if c.isalnum() else "_" for c in key)


def _as_key(name_or_key: str) -> str:
    return name_or_key if ":" in name_or_key else (_key(name_or_key) or name_or_key)


def _hold(key: str, uplink: bool) -> int:
    device = key.rpartition(":")[0]
    with _deciding():
        fd = os.open(FORWARDING + key, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)  # held while this process needs it
        if not os.pread(fd, 16, 0):  # the first holder: note the old setting, switch it on
            old, host_wide = _read(device), _read("all")
            if old is None or host_wide is None or _key(device) != key:
                os.close(fd)
                raise JailSetupError("network", None, f"no forwarding setting for device {device}")
            guarded = uplink and old == "0"
            if guarded:
                try:
                    apply(guard(key))  # before forwarding is on: never a moment without it
                except BaseException:
                    os.close(fd)
                    raise
            os.pwrite(fd, f"{old} {host_wide} {'guarded' if guarded else 'bridge'}".encode(), 0)
            if old == "0":
                _write(device, "1")
        return fd


def _let_go(key: str, fd: int) -> None:
    with _deciding():
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # succeeds only for the last holder
        except BlockingIOError:
            pass
        else:
            _restore(key, fd)
        finally:
            os.close(fd)


def _restore(key: str, fd: int) -> None:
    """Put back what we changed, and only that: a device whose forwarding was off is switched off
    again if it is still the same device, still as we left it (on), and nobody changed the
    host-wide setting meanwhile."""
    device = key.rpartition(":")[0]
    old, host_wide, kind = (os.pread(fd, 64, 0).decode().split() + ["", "", ""])[:3]
    if old == "0" and _key(device) == key and _read(device) == "1" and _read("all") == host_wide:
        with contextlib.suppress(OSError):
            _write(device, "0")
    if kind == "guarded":
        nft = find_nft()
        if nft is not None:
            subprocess.run([nft, "delete", "table", "inet", guard_table(key)], capture_output=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(FORWARDING + key)


def clean_stale() -> None:
    """Settings whose holders all died: put them back; guard tables without a setting: remove."""
    directory = os.path.dirname(FORWARDING)
    if not os.path.isdir(directory):
        return
    with _deciding():
        keys = [name[len("forwarding."):] for name in os.listdir(directory)
                if name.startswith("forwarding.") and ":" in name]
        nft = find_nft()
        if nft is not None:
            held = {guard_table(key) for key in keys}
            listed = subprocess.run([nft, "list", "tables"], capture_output=True, text=True).stdout.split()
            for name in listed:
                if name.startswith("pytest_jail_uplink_") and name not in held:
                    subprocess.run([nft, "delete", "table", "inet", name], capture_output=True)
        for key in keys:
            try:
                fd = os.open(FORWARDING + key, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                _restore(key, fd)
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
