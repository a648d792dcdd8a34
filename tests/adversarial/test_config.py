"""Bad configuration: limits are never dropped, and a bad value is one line."""

from __future__ import annotations

import pytest
from attack import needs_jail

pytestmark = needs_jail


def test_stacked_markers_keep_the_outer_limit(jailed_pytester: pytest.Pytester) -> None:
    """A class's jail(memory="64M") and a method's jail(hostname=...): both hold (before: the
    method's marker replaced the class's, and 200 MB were allocated in a test that passed)."""
    from pytest_jail._cgroups.manager import Unavailable
    from pytest_jail._cgroups.manager import manager

    try:
        manager()
    except Unavailable as exc:
        pytest.skip(f"no cgroups for jails here: {exc.reason}")
    jailed_pytester.makepyfile(
        """
        import socket, pytest

        pytestmark = pytest.mark.jail(timeout=30)

        @pytest.mark.jail(memory="64M")
        class TestLimited:
            @pytest.mark.jail(hostname="inner")
            def test_hog(self):
                assert socket.gethostname() == "inner"
                hog = bytearray(200 << 20)
                hog[::4096] = b"x" * len(hog[::4096])
        """
    )
    result = jailed_pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["jail: killed by the OOM killer (memory limit 64M*"])


@pytest.mark.parametrize("memory", ["1k", "10", "1.5"])
def test_a_tiny_memory_limit_is_one_line(jailed_pytester: pytest.Pytester, memory: str) -> None:
    """memory="1k" failed with "the helper ended before asking for its id map"."""
    jailed_pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.jail(memory={memory!r})
        def test_tiny():
            pass
        """
    )
    result = jailed_pytester.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*JailConfigError: jail marker on *: memory={memory!r} is not valid; allowed: a "
                                 "size of at least 4M*"])
