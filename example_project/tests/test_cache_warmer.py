"""The cache warmer is a daemon (``sleep 600`` here) that the app starts and never stops.

Without a jail every run leaves one more daemon on the machine, for ten minutes. In a jail the
daemon is re-parented to the jail's init, and when the test body ends every process of the jail
is killed: nothing outlives the test.
"""

import os
import time

import myapp


def cmdline(pid):
    with open(f"/proc/{pid}/cmdline") as f:
        return f.read().split("\0")[:-1]


def test_cache_warmer_runs_in_background(tmp_path):
    pid = myapp.start_cache_warmer(tmp_path / "warmer.pid")
    deadline = time.monotonic() + 5
    while cmdline(pid) != ["sleep", "600"] and time.monotonic() < deadline:
        time.sleep(0.01)  # the shell's child may not have exec'd sleep yet
    assert cmdline(pid) == ["sleep", "600"]
    os.kill(pid, 0)  # alive, and detached from us: its shell parent has exited
    with open(f"/proc/{pid}/stat") as f:
        parent = int(f.read().rsplit(")", 1)[1].split()[1])
    assert parent != os.getpid()
