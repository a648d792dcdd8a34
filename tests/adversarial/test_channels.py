"""The result channel and the outputs: nothing a jail sends can crash pytest or make it grow."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from attack import needs_jail

from pytest_jail import Jail

pytestmark = needs_jail


def test_command_output_is_capped() -> None:
    """``head -c 256M /dev/zero``: pytest keeps the first 16M (the default limit), counts the rest,
    warns, and does not grow by the whole of it (before: all 256 MiB, and pytest grew by 720 MiB)."""
    probe = (
        "import resource, warnings\n"
        "from pytest_jail import Jail\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    r = Jail().run(['head', '-c', str(256 << 20), '/dev/zero'])\n"
        "print(len(r.stdout), r.stdout_dropped, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
        "print(caught[0].message)\n"
        "r = Jail().run(['head', '-c', str(4 << 20), '/dev/zero'], output_limit='1M')\n"
        "print(len(r.stdout), r.stdout_dropped)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.splitlines()
    kept, dropped, peak_mib = map(int, out[0].split())
    assert (kept, dropped) == (16 << 20, 240 << 20)
    assert peak_mib < 200, peak_mib  # the 16M kept, decoded once: not the 256M sent
    assert "output beyond the limit of 16M per stream was dropped (stdout 251658240 bytes)" in out[1]
    assert out[2] == f"{1 << 20} {3 << 20}"


@pytest.mark.parametrize(
    "forgery",
    [
        "os.write(channel, (2**31).to_bytes(4, 'big'))",  # a frame header that announces 2 GiB
        "os.write(channel, (5).to_bytes(4, 'big') + b'hello')",  # not JSON
        "import json; m = json.dumps({'kind': 'outcome', 'data': 42}).encode(); "
        "os.write(channel, len(m).to_bytes(4, 'big') + m)",  # the wrong shape
        "import json; m = json.dumps({'kind': 'outcome', 'data': {'report': {'nodeid': 1}}}).encode(); "
        "os.write(channel, len(m).to_bytes(4, 'big') + m)",  # a report pytest cannot read
    ],
    ids=["2GiB-header", "not-json", "wrong-shape", "bad-report"],
)
def test_a_forged_result_fails_its_own_test(jailed_pytester: pytest.Pytester, forgery: str) -> None:
    """A body writes garbage on its channel to pytest (it holds it: it runs the test's code):
    its own test fails in one line, pytest neither crashes (before: INTERNALERROR) nor grows (before:
    293 MiB for a header announcing 2 GiB), and the next test runs."""
    jailed_pytester.makepyfile(
        f"""
        import os, resource, stat, pytest

        def channels():
            found = []
            for name in os.listdir("/proc/self/fd"):
                try:
                    if int(name) > 2 and stat.S_ISFIFO(os.fstat(int(name)).st_mode):
                        found.append(int(name))
                except OSError:  # the listing's own descriptor
                    pass
            return found

        @pytest.mark.jail
        def test_forge():
            for channel in channels():
                try:
                    {forgery}
                except OSError:
                    pass
            os._exit(0)

        def test_next():
            print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
        """
    )
    result = jailed_pytester.runpytest_subprocess("-s")
    result.assert_outcomes(failed=1, passed=1)
    assert "INTERNALERROR" not in result.stdout.str()
    result.stdout.fnmatch_lines(["*JailSetupError: jail setup failed at step 'wire': the test body *"])
    peak = int(next(line.split()[-1] for line in result.stdout.lines if "PEAK" in line))
    assert peak < 300, peak  # MiB: a jail cannot make pytest allocate what it announces


def test_ptys_are_capped_per_jail() -> None:
    """A jail that opens every pty it can gets 256 (devpts max=): the host's pool (4096) is left
    for the next jail (before: one jail took 3,071 and the next one's openpty() failed)."""
    greedy = ("import os\nfds = []\ntry:\n    while True:\n        fds.append(os.openpty())\nexcept OSError as e:\n"
              "    print(len(fds), e.errno)\n")
    result = Jail().run([sys.executable, "-c", greedy])
    assert result.stdout.split()[0] in ("255", "256"), result.stdout + result.stderr  # (ptmx itself may count)
    after = Jail().run([sys.executable, "-c", "import os; os.openpty(); print('ok')"])
    assert after.stdout == "ok\n"
    master, slave = os.openpty()  # and the host still has its own
    os.close(master)
    os.close(slave)
