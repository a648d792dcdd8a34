"""The recorder of blocked attempts, as pure logic: what a packet tried to reach, and the ICMP
answer it gets (checked field by field and by checksum)."""

from __future__ import annotations

import socket
import struct

from pytest_jail._linux.blackhole import Recorder
from pytest_jail._linux.blackhole import _checksum
from pytest_jail._linux.blackhole import describe
from pytest_jail._linux.blackhole import unreachable


def _ip(proto: int, payload: bytes, src: str = "198.19.255.254", dst: str = "93.184.216.34", frag: int = 0) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, frag, 64, proto, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    return header + payload


def _tcp(port: int, flags: int) -> bytes:
    return struct.pack("!HHIIBBHHH", 40000, port, 1234, 0, 5 << 4, flags, 65535, 0, 0)


def _dns_query(name: str) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    message = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", 1, 1)
    return struct.pack("!HHHH", 5353, 53, 8 + len(message), 0) + message


def test_describe_names_new_attempts_only() -> None:
    """A SYN is an attempt; a segment of an established flow, a fragment or IPv6 is not."""
    assert describe(_ip(6, _tcp(443, 0x02))) == "tcp 93.184.216.34:443"
    assert describe(_ip(6, _tcp(443, 0x12))) is None  # SYN+ACK
    assert describe(_ip(6, _tcp(443, 0x10))) is None
    assert describe(_ip(6, _tcp(443, 0x02), frag=5)) is None
    assert describe(b"\x60" + bytes(39)) is None
    assert describe(_ip(17, _dns_query("example.com"))) == "dns example.com"
    assert describe(_ip(17, struct.pack("!HHHH", 1, 5000, 8, 0))) == "udp 93.184.216.34:5000"
    assert describe(_ip(1, bytes([8, 0, 0, 0, 0, 0, 0, 0]))) == "icmp 93.184.216.34"


def test_unreachable_answer_is_a_valid_icmp_error() -> None:
    """The answer comes from the destination, goes to the sender, quotes the header and 8 bytes,
    and both checksums verify; an ICMP error itself is never answered."""
    packet = _ip(6, _tcp(443, 0x02))
    answer = unreachable(packet)
    assert answer is not None
    assert _checksum(answer[:20]) == 0 and _checksum(answer[20:]) == 0
    assert answer[9] == socket.IPPROTO_ICMP
    assert socket.inet_ntoa(answer[12:16]) == "93.184.216.34" and socket.inet_ntoa(answer[16:20]) == "198.19.255.254"
    assert answer[20:22] == bytes([3, 0])  # destination unreachable, network
    assert answer[28:] == packet[:28]
    error = _ip(1, bytes([3, 1, 0, 0, 0, 0, 0, 0]))
    assert unreachable(error) is None


def test_recorder_keeps_distinct_attempts_in_order() -> None:
    """Retries of one attempt are one entry; order is kept."""
    recorder = Recorder()
    for port in (443, 80, 443):
        recorder.handle(_ip(6, _tcp(port, 0x02)))
    assert recorder.attempts == ["tcp 93.184.216.34:443", "tcp 93.184.216.34:80"]
