"""``pytest-jail doctor`` against what jails actually do: each restriction is made real (a system
call filter on the process, a namespace limit of zero, a user without delegated cgroups) and the
doctor's verdict is compared with a real jail's outcome under it."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import refuse_calls

from pytest_jail import Jail
from pytest_jail import JailSpec
from pytest_jail import JailUnavailableError

# No needs_jail gate: on a kernel where jails cannot run (5.10 in the kernel matrix), the point
# is that the doctor says so, and that jails fail with the cause.

#: Runs the doctor, then a jail of each kind, in one process; prints both.
PROBE = textwrap.dedent("""
    import sys
    from pytest_jail._doctor import examine, render
    from pytest_jail import Jail, JailSpec, JailError
    report, status = render(examine(rootfs=True, limits=True))
    print(report)
    print("STATUS", status)
    kinds = (("host view", JailSpec()), ("limits", JailSpec(memory=64 << 20)), ("rootfs", JailSpec(rootfs="busybox")))
    for name, spec in kinds:
        try:
            Jail(spec).run(["true"], check=True)
            print("JAIL", name, "ok")
        except JailError as exc:
            print("JAIL", name, "fails:", exc)
""")


def _doctor(prefix: list[str] | None = None, setup: str = "", cwd: str | None = None) -> tuple[dict[str, str], dict[str, str], str]:
    """The doctor's line per capability and each jail's outcome, from a fresh process."""
    argv = [*(prefix or []), sys.executable, "-c", setup + PROBE]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd)
    out = done.stdout + (f"\nstderr:\n{done.stderr}" if done.stderr.strip() else "")
    lines = {line[4:].split(":", 1)[0]: line[:3].strip() for line in out.splitlines() if line[:3].strip() in
             ("ok", "NO", "--")}
    jails = {line.split(" ", 1)[1].rsplit(" ", 1)[0] if line.endswith(" ok") else line.split(" fails:")[0][5:]:
             "ok" if line.endswith(" ok") else "fails" for line in out.splitlines() if line.startswith("JAIL ")}
    return lines, jails, out


def test_the_doctor_agrees_with_jails_on_this_kernel() -> None:
    """Each verdict is what a jail of that kind does here (on every kernel of the matrix: an old
    one says no, with the version that says yes, and its jails fail)."""
    lines, jails, out = _doctor()
    host_view = all(lines.get(name, "ok") == "ok" for name in ("user namespaces", "session keyring", "fresh /proc and /sys",
                                                                "read-only host view"))
    assert host_view == (jails["host view"] == "ok"), out
    if host_view:
        assert (lines["limits"] == "ok") == (jails["limits"] == "ok"), out
        if lines["rootfs builders"] == "ok":
            assert (lines["rootfs jails"] == "ok") == (jails["rootfs"] == "ok"), out
    # --rootfs --limits asked: any "no" among them is exit status 1
    asked_ok = host_view and lines["limits"] == "ok" and lines["rootfs jails"] == "ok"
    assert ("STATUS 0" in out) == asked_ok, out


def test_a_system_call_filter_is_named_with_the_container_flags() -> None:
    """As under Docker's default profile: unshare and mount refused by a seccomp filter on the
    process itself. The doctor says so with the flags that lift it; a jail fails with them too."""
    setup = textwrap.dedent("""
        import ctypes
        from pytest_jail._linux import seccomp
        from pytest_jail._linux.syscalls import Syscalls
        ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS, as a container runtime sets it
        Syscalls().install_filter(seccomp.program(seccomp.Policy(), notify=False), listener=False)
    """)
    lines, jails, out = _doctor(setup=setup)
    assert lines["user namespaces"] == "NO" and jails["host view"] == "fails", out
    assert "a system call filter on this process refuses them" in out, out
    assert "--security-opt seccomp=unconfined" in out and "STATUS 1" in out, out


def test_a_namespace_limit_of_zero_is_named_with_its_sysctl() -> None:
    """user.max_user_namespaces = 0, made real in a user namespace of the test's own (the limit
    is per namespace): the doctor names the sysctl; a jail fails too."""
    prefix = ["unshare", "--user", "--map-root-user", "sh", "-c",
              'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"', "sh"]
    lines, jails, out = _doctor(prefix)
    assert lines["user namespaces"] == "NO" and jails["host view"] == "fails", out
    assert "user.max_user_namespaces = 0" in out and "sysctl -w user.max_user_namespaces=" in out, out


USERNS_CLONE = "/proc/sys/kernel/unprivileged_userns_clone"


@pytest.mark.skipif(not os.path.exists(USERNS_CLONE),
                    reason="kernel.unprivileged_userns_clone is Debian's and Ubuntu's own patch; this kernel has "
                           "none (the kernel matrix's Debian guests have it)")
@pytest.mark.skipif(os.geteuid() != 0, reason="switching kernel.unprivileged_userns_clone off needs root")
def test_debians_switch_for_unprivileged_namespaces_is_named_with_its_sysctl() -> None:
    """kernel.unprivileged_userns_clone = 0, made real (it is global: set for the few seconds
    of one probe, then restored; root's jails, all the suite's others, are not concerned): the
    doctor of an unprivileged user names the sysctl; that user's jail fails too."""
    drop = ["env", "HOME=/", sys.executable, "-c",
            "import os, sys; os.setgroups([]); os.setgid(65534); os.setuid(65534); os.execv(sys.argv[1], sys.argv[1:])"]
    trial = subprocess.run([*drop, sys.executable, "-c", "import pytest_jail"], capture_output=True, text=True, cwd="/")
    if trial.returncode:
        pytest.skip(f"uid 65534 cannot run {sys.executable} with pytest_jail: {trial.stderr.strip().splitlines()[-1:]}")
    with open(USERNS_CLONE) as f:
        before = f.read().strip()
    try:
        with open(USERNS_CLONE, "w") as f:
            f.write("0")
    except OSError as exc:
        pytest.skip(f"cannot set kernel.unprivileged_userns_clone here: {exc}")
    try:
        lines, jails, out = _doctor(drop, cwd="/")
    finally:
        with open(USERNS_CLONE, "w") as f:
            f.write(before)
    assert lines["user namespaces"] == "NO" and jails["host view"] == "fails", out
    assert "kernel.unprivileged_userns_clone = 0" in out and "sysctl -w kernel.unprivileged_userns_clone=1" in out, out
    failure = next(line for line in out.splitlines() if line.startswith("JAIL host view"))
    assert "sysctl -w kernel.unprivileged_userns_clone=1" in failure, failure  # the jail names it too
    assert "STATUS 1" in out, out


def test_a_filter_that_refuses_keyctl_is_named_with_the_container_flags() -> None:
    """Docker's default profile refuses keyctl even where it allows namespaces (--cap-add SYS_ADMIN):
    a filter that refuses only keyctl, made real on the process."""
    setup = refuse_calls({"keyctl": errno.EPERM})
    lines, jails, out = _doctor(setup=setup)
    assert lines["session keyring"] == "NO" and jails["host view"] == "fails", out
    assert "refuses keyctl" in out and out.count("--security-opt seccomp=unconfined") >= 2 and "STATUS 1" in out, out


def test_a_masked_proc_is_named_with_the_container_flag() -> None:
    """As in a container: a file of /proc covered by a mount (Docker covers /proc/keys, kcore...,
    made real here in a user and mount namespace of the test's own). The kernel then refuses a
    fresh /proc in a user namespace: the doctor says so with the flag; a jail fails with it."""
    cover = 'for f in /proc/keys /proc/timer_list /proc/kcore; do [ -e $f ] && mount --bind /dev/null $f && break; done'
    prefix = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", cover + ' && exec "$@"', "sh"]
    lines, jails, out = _doctor(prefix)
    assert lines["fresh /proc and /sys"] == "NO" and jails["host view"] == "fails", out
    assert out.count("--security-opt systempaths=unconfined") >= 2 and "STATUS 1" in out, out


def test_what_the_doctor_says_of_limits_is_what_a_limited_jail_does() -> None:
    """Whoever runs it (root here, or the unprivileged user without delegated cgroups in the
    rootless run): "limits: ok" exactly when a jail with a memory limit runs, in this very
    process (a subprocess of pytest in a delegated group is not alone there: it gets a no)."""
    from pytest_jail._doctor import examine
    from pytest_jail._doctor import render

    out = render(examine(limits=True))[0]
    lines = {line[4:].split(":", 1)[0]: line[:3].strip() for line in out.splitlines() if line[:2] in ("ok", "NO")}
    try:
        Jail(JailSpec(memory=64 << 20)).run(["true"], check=True)
        worked = True
    except JailUnavailableError as exc:
        worked = False
        if lines["read-only host view"] != "ok":  # no jail at all on this kernel, limits or not
            assert "Linux 5.12" in str(exc), exc
            return
    assert (lines["limits"] == "ok") == worked, out


@pytest.mark.parametrize("flag", ["--rootfs", "--limits", "--bridge"])
def test_the_exit_status_follows_what_is_asked(flag: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pytest_jail.cli", "doctor", flag], capture_output=True, text=True)
    name = {"--rootfs": "rootfs jails", "--limits": "limits", "--bridge": "bridges"}[flag]
    said = {line[4:].split(":", 1)[0]: line[:2] for line in done.stdout.splitlines() if line[:2] in ("ok", "NO")}
    needed = [name, "user namespaces", "read-only host view"]  # what is asked, and a jail at all
    assert done.returncode == (1 if any(said.get(n, "NO") == "NO" for n in needed) else 0), done.stdout
