"""Where a jail's traffic to the outside goes instead: a TUN device that records it and refuses it.

A jail with ``net="none"`` (and one on an isolated segment) has no way out; without a route a
connect fails in the kernel and nobody learns what the test tried to reach. So the jail's init
gives it a TUN device, ``blocked0``, as its route to everything outside, reads what arrives there,
notes where it was going (``tcp 93.184.216.34:443``, ``udp 10.0.0.9:5000``, ``dns example.com``)
and answers each packet with an ICMP "network unreachable": the sender fails at once, exactly as
without a route (``ENETUNREACH``), whatever it is written in (Python, C, Go). Nothing is sent
anywhere: the device has no other end. IPv4 only; IPv6 attempts fail without a route, unrecorded.
"""

from __future__ import annotations

import socket
import struct

DEVICE = "blocked0"
ADDRESS = "198.19.255.254"  # the device's own address (a jail's source address for the outside)
NAMESERVER = "198.19.255.253"  # what a jail's resolv.conf names: its queries arrive here
RESOLV_CONF = f"# pytest-jail: name lookups leave no jail; they are recorded and refused\nnameserver {NAMESERVER}\n"
LIMIT = 100  # distinct attempts kept per jail


def describe(packet: bytes) -> str | None:
    """What an outgoing IPv4 packet tried to reach, as the report says it; ``None`` for packets that
    are no new attempt (a TCP segment without SYN, a fragment, not IPv4)."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    header = (packet[0] & 0x0F) * 4
    proto = packet[9]
    destination = socket.inet_ntoa(packet[16:20])
    fragment = struct.unpack_from("!H", packet, 6)[0] & 0x1FFF
    if fragment:
        return None
    payload = packet[header:]
    if proto == socket.IPPROTO_TCP and len(payload) >= 14:
        port, flags = struct.unpack_from("!H", payload, 2)[0], payload[13]
        return f"tcp {destination}:{port}" if flags & 0x02 and not flags & 0x10 else None  # SYN, not ACK
    if proto == socket.IPPROTO_UDP and len(payload) >= 8:
        port = struct.unpack_from("!H", payload, 2)[0]
        if port == 53:
            name = _dns_question(payload[8:])
            if name is not None:
                return f"dns {name}"
        return f"udp {destination}:{port}"
    if proto == socket.IPPROTO_ICMP:
        return f"icmp {destination}"
    return f"ip proto {proto} {destination}"


def _dns_question(message: bytes) -> str | None:
    """The name in a DNS query's first question (RFC 1035 4.1)."""
    if len(message) < 12 or struct.unpack_from("!H", message, 4)[0] < 1:
        return None
    labels: list[str] = []
    at = 12
    while at < len(message):
        length = message[at]
        if length == 0:
            return ".".join(labels) or "."
        if length & 0xC0 or at + 1 + length > len(message):
            return None
        labels.append(message[at + 1: at + 1 + length].decode("ascii", "replace"))
        at += 1 + length
    return None


def unreachable(packet: bytes) -> bytes | None:
    """The ICMP "network unreachable" answer to an IPv4 packet (RFC 792), or ``None`` for an ICMP
    error itself (never answer an error with an error, RFC 1122 3.2.2)."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    header = (packet[0] & 0x0F) * 4
    if packet[9] == socket.IPPROTO_ICMP and len(packet) > header and packet[header] not in (0, 8, 13, 15, 17):
        return None
    quoted = packet[: header + 8]
    icmp = bytearray(struct.pack("!BBHI", 3, 0, 0, 0) + quoted)  # type 3 code 0: net unreachable
    struct.pack_into("!H", icmp, 2, _checksum(bytes(icmp)))
    # From the destination itself, as if it answered: a source that is the jail's own address
    # would be dropped as a martian, and the default route makes this one pass rp_filter.
    ip = bytearray(struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, socket.IPPROTO_ICMP, 0, packet[16:20], packet[12:16],
    ))
    struct.pack_into("!H", ip, 10, _checksum(bytes(ip)))
    return bytes(ip + icmp)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class Recorder:
    """The distinct attempts of one jail, in order, at most :data:`LIMIT`."""

    def __init__(self) -> None:
        self.attempts: list[str] = []
        self.dropped = 0

    def handle(self, packet: bytes) -> bytes | None:
        """Note what ``packet`` tried to reach; return the answer to send back into the jail."""
        attempt = describe(packet)
        if attempt is not None and attempt not in self.attempts:
            if len(self.attempts) < LIMIT:
                self.attempts.append(attempt)
            else:
                self.dropped += 1
        return unreachable(packet)
