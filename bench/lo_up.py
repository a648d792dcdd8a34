"""Cost of bringing ``lo`` up in a fresh network namespace: one ioctl against pyroute2.

Run as root (or anyone allowed to unshare a network namespace): ``python3 bench/lo_up.py``.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import time
from collections.abc import Callable

from pytest_jail._linux.syscalls import CLONE_NEWNET
from pytest_jail._linux.syscalls import Syscalls

_libc = ctypes.CDLL(None, use_errno=True)


def in_fresh_netns(fn: Callable[[], None], n: int = 200) -> float:
    """Median milliseconds of ``fn`` run each time in a new network namespace (in a child)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        times = []
        for _ in range(n):
            assert _libc.unshare(CLONE_NEWNET) == 0, os.strerror(ctypes.get_errno())
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        os.write(w, repr(statistics.median(times) * 1000).encode())
        os._exit(0)
    os.close(w)
    out = os.read(r, 100)
    os.waitpid(pid, 0)
    return float(out)


def main() -> None:
    syscalls = Syscalls()
    print(f"ioctl SIOCSIFFLAGS: {in_fresh_netns(lambda: syscalls.link_up('lo')):.3f} ms")
    start = time.perf_counter()
    from pyroute2 import IPRoute

    print(f"import pyroute2: {(time.perf_counter() - start) * 1000:.0f} ms")

    def with_pyroute2() -> None:
        with IPRoute() as ip:
            ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")

    print(f"pyroute2 IPRoute link set up: {in_fresh_netns(with_pyroute2, 50):.3f} ms")


if __name__ == "__main__":
    main()
