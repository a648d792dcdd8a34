"""Networks between jails: a host-side bridge per segment, a veth pair per jail, addresses.

All netlink work goes through pyroute2, here and nowhere else (a test checks it); it is imported
only when a jail asks for a bridge (the import costs 0.2 s). Root only: the host side of a
bridge lives in the host's network namespace.

Addresses come from 198.18.0.0/15, RFC 2544's benchmarking range, which real networks do not
route: 512 segments of a /24, gateway ``.1`` (the host side), jails ``.2``-``.254``. A segment is
leased machine-wide with a lock on ``/run/pytest-jail/net/<n>``, held for the owner's lifetime:
concurrent pytest sessions and xdist workers never share a subnet, and a lease whose lock is free
belongs to a dead process, whose bridge and veths the next start-up removes.

A jail on a segment gets its address and the route to its segment, and no default route: it can
reach the jails of its segment and the host side (the gateway), nothing else, and nothing it
sends can leave the machine (the bridge also never forwards: ``forwarding=0``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from .._errors import JailError
from .._errors import JailSetupError
from .._errors import JailUnavailableError
from .._errors import JailWarning
from . import firewall
from .firewall import Rule
from .syscalls import CLONE_NEWNET
from .syscalls import Syscalls

LEASES = "/run/pytest-jail/net"
SEGMENTS = 511  # the last /24, 198.19.255.0, holds the recorder's addresses (blackhole.py)


def prefix(index: int) -> str:
    """The first three octets of segment ``index``'s /24."""
    return f"198.{18 + index // 256}.{index % 256}"


def bridge_name(index: int) -> str:
    return f"pjbr{index}"


def veth_prefix(index: int) -> str:
    return f"pjv{index}x"


@dataclass
class Segment:
    """A leased /24 with its bridge, owned by this process."""

    name: str
    index: int
    lease: int  # the locked lease file's descriptor
    bridge: int = 0  # ifindex
    hosts: dict[int, str] = field(default_factory=dict)  # host octet -> hostname
    ways_out: dict[str, tuple[Rule, ...] | None] = field(default_factory=dict)  # jail ip -> allowed (None: all)

    @property
    def gateway(self) -> str:
        return f"{prefix(self.index)}.1"

    @property
    def hosts_file(self) -> str:
        return os.path.join(LEASES, f"{self.index}.hosts")


@dataclass
class Attachment:
    """One jail's place on a segment: its address, its veth's host end."""

    segment: Segment
    host: int
    way_out: tuple[Rule, ...] | None = None  # None: none; (): everything (nat=True); else these
    released: bool = False

    @property
    def ip(self) -> str:
        return f"{prefix(self.segment.index)}.{self.host}"

    @property
    def veth(self) -> str:
        return f"{veth_prefix(self.segment.index)}{self.host}"


class Networks:
    """This process's segments; thread-safe (``jail.spawn`` collects jails from threads)."""

    def __init__(self) -> None:
        self._segments: dict[str, Segment] = {}
        self._lock = threading.Lock()
        self._ipr: Any = None
        self._forwarding = firewall.Forwarding()
        self._with_tables: set[int] = set()

    def reserve(self, segment: str, hostname: str, way_out: tuple[Rule, ...] | None = None) -> Attachment:
        """An address on ``segment`` (made on first use), listed under ``hostname`` in its hosts file."""
        with self._lock:
            seg = self._segments.get(segment) or self._make(segment)
            free = [h for h in range(2, 255) if h not in seg.hosts]
            if not free:
                raise JailSetupError("network", errno.ENOSPC, f"segment {segment!r} has 253 jails already")
            seg.hosts[free[0]] = hostname
            self._write_hosts(seg)
            return Attachment(seg, free[0], way_out)

    def connect(self, attachment: Attachment, netns: str) -> None:
        """Plug the jail whose network namespace is ``netns`` into its segment, and configure it."""
        ipr = self._iproute()
        seg = attachment.segment
        with _step(f"veth {attachment.veth}"):
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                ipr.link("add", ifname=attachment.veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": fd})
                with _visiting(fd):
                    from pyroute2 import IPRoute

                    inside = IPRoute()
                    try:
                        _sysctl("ipv6/conf/eth0/disable_ipv6", "1")  # no router solicitations on the segment
                    except BaseException:
                        inside.close()
                        raise
            finally:
                os.close(fd)
            (veth,) = ipr.link_lookup(ifname=attachment.veth)
            ipr.link("set", index=veth, master=seg.bridge, state="up")
        with _step("eth0 in the jail"), contextlib.closing(inside):
            (eth0,) = inside.link_lookup(ifname="eth0")
            inside.addr("add", index=eth0, address=attachment.ip, prefixlen=24)
            inside.link("set", index=eth0, state="up")
            way_out = attachment.way_out
            if way_out == ():  # nat=True: everything through the host (the recorder's route goes)
                inside.route("replace", dst="0.0.0.0/0", gateway=seg.gateway, oif=eth0)
            for network, _ in way_out or ():
                inside.route("replace", dst=network, gateway=seg.gateway, oif=eth0)
        if way_out is not None:
            with self._lock, _step("nat"):
                seg.ways_out[attachment.ip] = None if way_out == () else way_out
                self._apply_rules(seg)  # before forwarding is on: never a moment without the filter
                self._forwarding.need([bridge_name(seg.index)], uplink=False)
                self._forwarding.need(self._uplinks(way_out))

    def release(self, attachment: Attachment) -> None:
        """The jail is gone: remove its veth (if the kernel has not) and free its address. Once."""
        with self._lock:
            if attachment.released:
                return
            attachment.released = True
            # A socket of its own: pyroute2 keeps one per thread, and jail.spawn's jails end on
            # their collector threads; a socket left on each would leak.
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                _delete_links(ipr, [attachment.veth])
            seg = attachment.segment
            if self._segments.get(seg.name) is seg and attachment.ip in seg.ways_out:
                del seg.ways_out[attachment.ip]
                try:
                    self._apply_rules(seg)
                except JailError as exc:
                    # Its way out stays in the table: never give its address to another jail.
                    seg.hosts[attachment.host] = ""
                    warnings.warn(JailWarning(
                        f"the way out of the jail at {attachment.ip} could not be removed ({exc}); that address "
                        f"is not given to another jail, and the rules go with the segment"), stacklevel=2)
                    return
            seg.hosts.pop(attachment.host, None)
            if self._segments.get(seg.name) is seg:
                self._write_hosts(seg)

    def close(self) -> None:
        """Remove every bridge of this process and give back its leases."""
        with self._lock:
            for seg in self._segments.values():
                if seg.index in self._with_tables:
                    firewall.delete(seg.index)
                _remove_segment(self._iproute(), seg.index)
                _close_quietly(seg.lease)
            self._segments.clear()
            self._with_tables.clear()
            self._forwarding.close()
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None

    # -- inside -------------------------------------------------------------------------------

    def _apply_rules(self, seg: Segment) -> None:
        index = seg.index
        firewall.apply(firewall.ruleset(index, bridge_name(index), f"{prefix(index)}.0/24", seg.ways_out))
        self._with_tables.add(index)

    def _uplinks(self, way_out: tuple[Rule, ...]) -> list[str]:
        """The host's devices towards what the jail may reach: replies come in there."""
        ipr = self._iproute()
        targets = [network.split("/")[0] for network, _ in way_out] or ["198.51.100.1"]  # any: the default
        oifs: set[int] = set()
        for target in targets:
            try:
                oifs |= {route.get_attr("RTA_OIF") for route in ipr.route("get", dst=target)}
            except Exception as exc:
                if way_out or getattr(exc, "code", None) != errno.ENETUNREACH:
                    raise
                # nat=True on a host without a default route: it reaches what the host's routes lead to
                oifs |= {route.get_attr("RTA_OIF") for route in ipr.get_routes(family=socket.AF_INET, table=254)}
        oifs.discard(None)  # (a route without a device: blackhole, multipath)
        names = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links(*oifs)} if oifs else set()
        return sorted(n for n in names if n != "lo" and not n.startswith("pjbr"))  # (never another segment)

    def _iproute(self) -> Any:
        if self._ipr is None:
            from pyroute2 import IPRoute

            self._ipr = IPRoute()
        return self._ipr

    def _make(self, name: str) -> Segment:
        index, lease = _lease()
        seg = Segment(name, index, lease)
        try:
            self._make_bridge(seg)
        except BaseException:
            _remove_segment(self._iproute(), index)
            _close_quietly(lease)
            raise
        self._segments[name] = seg
        return seg

    def _make_bridge(self, seg: Segment) -> None:
        index = seg.index
        ipr = self._iproute()
        with _step(f"bridge {bridge_name(index)}"):
            _remove_segment(ipr, index, lease_file=False)  # a dead owner's leftovers
            ipr.link("add", ifname=bridge_name(index), kind="bridge")
            (seg.bridge,) = ipr.link_lookup(ifname=bridge_name(index))
            _sysctl(f"ipv4/conf/{bridge_name(index)}/forwarding", "0")  # nothing is routed on
            _sysctl(f"ipv6/conf/{bridge_name(index)}/disable_ipv6", "1")
            ipr.addr("add", index=seg.bridge, address=seg.gateway, prefixlen=24)
            ipr.link("set", index=seg.bridge, state="up")

    def _write_hosts(self, seg: Segment) -> None:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", f"{seg.gateway}\tgateway"]
        lines += [f"{prefix(seg.index)}.{host}\t{name}" for host, name in sorted(seg.hosts.items()) if name]
        # In place, never replaced: each jail's /etc/hosts is a bind of this very inode.
        fd = os.open(seg.hosts_file, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            data = ("\n".join(lines) + "\n").encode()
            os.pwrite(fd, data, 0)  # then cut: a reader never sees an empty file
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)


def try_link(kind: str) -> int:
    """Make a link of ``kind`` ("bridge", "veth") in a network namespace of this process's own, as
    a bridged jail's network does (the kernel loads its driver on demand where it can): 0 or the
    errno. For a throwaway child (``pytest-jail doctor``): this process stays in that namespace."""
    try:
        from pyroute2 import IPRoute

        Syscalls().unshare(CLONE_NEWNET)
        with IPRoute() as ipr:
            peer = {"peer": {"ifname": "pjdoctor1"}} if kind == "veth" else {}
            ipr.link("add", ifname="pjdoctor0", kind=kind, **peer)
    except Exception as exc:  # pyroute2's NetlinkError carries the netlink errno as .code
        code = getattr(exc, "code", None) or getattr(exc, "errno", None)
        return code if isinstance(code, int) and 0 < code < 256 else errno.EIO
    return 0


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    try:
        yield
    except JailError:  # ours already say what and where (nft missing: the remedy too)
        raise
    except Exception as exc:  # pyroute2's NetlinkError is an OSError with the netlink errno
        code = getattr(exc, "code", None) or getattr(exc, "errno", None)
        detail = os.strerror(code) if isinstance(code, int) and code > 0 else str(exc)
        kind = what.split()[0]
        if code == errno.EOPNOTSUPP and kind in ("bridge", "veth"):  # (the kernel could not load the driver)
            raise JailUnavailableError(
                f"this kernel cannot make a {kind} ({what}: {detail}): its driver is neither built in nor loaded",
                f"load it as root on the host: modprobe {kind} (a container cannot load it itself)") from None
        raise JailSetupError("network", code if isinstance(code, int) else None, f"{what}: {detail}") from None


@contextlib.contextmanager
def _visiting(netns_fd: int) -> Iterator[None]:
    """Run the block in another network namespace: setns changes only the calling thread's, and
    a netlink socket (or a /proc/sys/net file) opened there stays there after the thread is back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        sys = Syscalls()
        sys.setns(netns_fd, CLONE_NEWNET)
        try:
            yield
        finally:
            sys.setns(own, CLONE_NEWNET)
    finally:
        os.close(own)


def _lease() -> tuple[int, int]:
    """A segment no live process holds: its index and the locked lease file."""
    os.makedirs(LEASES, mode=0o755, exist_ok=True)
    index = 0
    while index < SEGMENTS:
        path = os.path.join(LEASES, str(index))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            index += 1
            continue
        if os.fstat(fd).st_nlink == 0:  # a cleaner removed this stale lease while we opened it
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return index, fd
    raise JailSetupError("network", errno.ENOSPC, f"all {SEGMENTS} segments of 198.18.0.0/15 are in use ({LEASES})")


def _remove_segment(ipr: Any, index: int, *, lease_file: bool = True) -> None:
    names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    _delete_links(ipr, [n for n in names if n == bridge_name(index) or n.startswith(veth_prefix(index))])
    if lease_file:
        for path in (os.path.join(LEASES, str(index)), os.path.join(LEASES, f"{index}.hosts")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _delete_links(ipr: Any, names: list[str]) -> None:
    for name in names:
        for index in ipr.link_lookup(ifname=name):
            with contextlib.suppress(Exception):  # gone meanwhile: its namespace died
                ipr.link("del", index=index)


def clean_stale() -> None:
    """Remove the segments of dead processes: leases nobody holds, and links without a lease.

    A stale lease stays locked by us until its links, table and files are gone, so no process
    can take that segment while its remains are being removed.
    """
    try:
        entries = os.listdir(LEASES)
    except FileNotFoundError:
        entries = []
    live: set[int] = set()
    stale: dict[int, int] = {}  # index -> our descriptor, locked
    try:
        for entry in entries:
            if not entry.isdigit():
                continue
            try:
                fd = os.open(os.path.join(LEASES, entry), os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                live.add(int(entry))
                os.close(fd)
                continue
            # Free, and not just created by a process about to lock it: its owner is dead.
            if time.time() - os.fstat(fd).st_mtime > 2 and os.fstat(fd).st_nlink:
                stale[int(entry)] = fd
            else:
                live.add(int(entry))
                os.close(fd)
        firewall.clean_stale()
        for index in firewall.tables():
            if index not in live:
                _delete_unleased_table(index, stale)
        orphans = [n for n in _orphan_links(live | set(stale)) if not os.path.exists(os.path.join(LEASES, _index(n)))]
        if not stale and not orphans:
            return
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for index in stale:
                _remove_segment(ipr, index)  # unlinks the lease while we hold it
            _delete_links(ipr, orphans)
    finally:
        for fd in stale.values():
            os.close(fd)


def _delete_unleased_table(index: int, stale: dict[int, int]) -> None:
    """Delete a segment's table, once its lease shows nobody holds it: a session may have leased
    the segment after we listed the leases, and its table is then its own."""
    if index in stale:  # we hold that lease already
        firewall.delete(index)
        return
    path = os.path.join(LEASES, str(index))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # leased meanwhile: not ours to touch
        os.close(fd)
        return
    try:
        firewall.delete(index)
        os.unlink(path)  # under our lock: a process that opened it sees it unlinked and moves on
    finally:
        os.close(fd)


def _index(link: str) -> str:
    return link.removeprefix("pjbr").removeprefix("pjv").split("x")[0]


def _orphan_links(live: set[int]) -> list[str]:
    """Our links (by name) whose segment no live process leases."""
    try:
        names = os.listdir("/sys/class/net")
    except OSError:
        return []
    orphans = []
    for name in names:
        for head in ("pjbr", "pjv"):
            digits = name[len(head):].split("x")[0]
            if name.startswith(head) and digits.isdigit() and int(digits) not in live:
                orphans.append(name)
    return orphans


def _sysctl(name: str, value: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        with open(f"/proc/sys/net/{name}", "w") as f:
            f.write(value)


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
