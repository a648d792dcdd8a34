"""lo up in a fresh network namespace: one ioctl vs pyroute2 (import once, then per call)."""
import ctypes, os, statistics, sys, time
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
def in_fresh_netns(fn, n=200):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        times = []
        for _ in range(n):
            assert libc.unshare(CLONE_NEWNET) == 0
            t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
        os.write(w, repr(statistics.median(times) * 1000).encode()); os._exit(0)
    os.close(w); out = os.read(r, 100); os.waitpid(pid, 0); return float(out)
from pytest_jail._linux.syscalls import Syscalls
sc = Syscalls()
print("ioctl SIOCSIFFLAGS: %.3f ms" % in_fresh_netns(lambda: sc.link_up("lo")))
t = time.perf_counter(); import pyroute2; from pyroute2 import IPRoute; print("import pyroute2: %.0f ms" % ((time.perf_counter() - t) * 1000))
def pr():
    with IPRoute() as ip:
        ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")
print("pyroute2 IPRoute link set up: %.3f ms" % in_fresh_netns(pr, 50))
