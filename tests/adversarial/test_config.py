"""Bad configuration: limits are never dropped, and a bad value is one line."""

from __future__ import annotations

import os

import pytest
from attack import needs_jail
from attack import root_mode

from pytest_jail import JailConfigError
from pytest_jail import JailSpec
from pytest_jail import JailWarning

pytestmark = needs_jail


def test_stacked_markers_keep_the_outer_limit(jailed_pytester: pytest.Pytester) -> None:
    """A class's jail(memory="64M") and a method's jail(hostname=...): both hold (before: the
    method's marker replaced the class's, and 200 MB were allocated in a test that passed)."""
    from pytest_jail._cgroups.manager import Unavailable
    from pytest_jail._host import host

    try:
        host().cgroups()
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


@pytest.mark.parametrize(
    ("marker", "line"),
    [
        ("cap_add=['SYS_ADMIN']", "cap_add=['SYS_ADMIN'] is not valid; allowed: a list of names from NET_RAW, "),
        ("syscalls={'allow': ['no_such_call']}", "'no_such_call' is none"),
        ("syscalls='off'", "syscalls='off' is not valid; allowed: 'default', 'nested', 'unconfined', "),
    ],
    ids=["cap-sys-admin", "unknown-call", "unknown-policy"],
)
def test_privilege_cannot_be_asked_for_beyond_what_is_allowed(jailed_pytester: pytest.Pytester, marker: str,
                                                               line: str) -> None:
    """CAP_SYS_ADMIN (which would undo the mounts) cannot be given back; an unknown call name or
    filter policy is one line naming the marker, never a jail without a filter."""
    jailed_pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.jail({marker})
        def test_asks():
            pass
        """
    )
    result = jailed_pytester.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    errors = [ln for ln in result.stdout.lines if ln.startswith("pytest_jail.JailConfigError: jail marker on ")]
    assert len(errors) == 1 and "::test_asks: " in errors[0] and line in errors[0], result.stdout.str()


def test_a_rootfs_anyone_may_change_is_refused(tmp_path: os.PathLike[str]) -> None:
    """A rootfs whose /usr (or /, /bin, /lib, /etc...) every user may write: anyone on the host
    could choose what the jail runs, so it is refused in one line with the fix."""
    root = os.path.join(tmp_path, "rootfs")
    for name in ("usr", "bin", "etc"):
        os.makedirs(os.path.join(root, name))
    os.chmod(os.path.join(root, "usr"), 0o777)
    with pytest.raises(JailConfigError, match=r"/usr is writable by every user \(mode 0777\).*fix: chmod o-w"):
        JailSpec(rootfs=root)
    os.chmod(os.path.join(root, "usr"), 0o1777)  # sticky, as /tmp: others cannot replace what is there
    JailSpec(rootfs=root)


@root_mode
def test_a_rootfs_another_user_owns_is_warned_about(tmp_path: os.PathLike[str]) -> None:
    """A rootfs another (non-root) user owns: that user controls what root's jails run; one warning."""
    root = os.path.join(tmp_path, "theirs")
    os.makedirs(os.path.join(root, "usr"))
    os.chown(root, 4242, 4242)
    with pytest.warns(JailWarning, match=r"owned by uid 4242, neither you nor root"):
        JailSpec(rootfs=root)
