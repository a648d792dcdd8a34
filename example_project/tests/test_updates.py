"""At start-up the app phones home (myapp.check_for_updates) and must cope with being offline.

Without a jail this test would send packets off the machine, which this workplace forbids; so
the test refuses to run anywhere that has a route out (pytest.ini also makes pytest-jail
mandatory and jails every test). In a jail the only interfaces are lo and blocked0, pytest-jail's
recorder, which has no other end: the connect fails at once with ENETUNREACH, the test checks
the app reports "offline" quickly instead of hanging, and the jail records the attempt (run
with -rA to see "jail: network access blocked: tcp 203.0.113.1:80" in the report).
"""

import time

import pytest

import myapp


def routes_out():
    """The network devices that routes point at, apart from lo and a jail's recorder (none in a jail)."""
    devices = set()
    for table in ("/proc/net/route", "/proc/net/ipv6_route"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:  # IPv6 disabled
            continue
        if table.endswith("/route"):
            lines = lines[1:]  # the IPv4 table has a header
        devices.update(line.split()[0 if table.endswith("/route") else -1] for line in lines if line.strip())
    return devices - {"lo", "blocked0"}


def test_update_check_when_offline():
    if routes_out():
        pytest.fail(f"refusing to phone home: this machine has routes out via {sorted(routes_out())}; "
                    "this test only runs in a pytest-jail jail without network", pytrace=False)
    started = time.monotonic()
    status = myapp.check_for_updates(timeout=3.0)
    elapsed = time.monotonic() - started
    assert not status.online
    assert "Network is unreachable" in status.error
    assert elapsed < 1.0, f"the offline check took {elapsed:.1f}s: it should fail fast"
