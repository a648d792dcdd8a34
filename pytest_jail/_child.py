"""What runs after ``fork()``: the helper, the jail's init (pid 1), a command (pid 2), and the
way a test body enters a prepared jail.

Kept minimal on purpose: every object it needs was prepared by the parent in :class:`Launch`
(the mount plan included), it talks to the parent only through the wire, and the helper, init
and the process that enters a jail never return into the caller's stack: each ends in
``os._exit``. Only a test body does, inside the jail, to run the rest of pytest's call phase.
"""

from __future__ import annotations

import errno
import gc
import os
import select
import signal
import socket
import stat
import sys
from collections.abc import Iterator
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field
from posix import _exit  # the real one: coverage's patch=_exit would save from our children
from typing import Any
from typing import NoReturn

from . import _wire
from ._linux import blackhole
from ._linux import syscalls as sc
from ._linux.mounts import Executor
from ._linux.mounts import Op

NAMESPACES = (
    sc.CLONE_NEWUSER  # created first when combined, so it owns all the others (user_namespaces(7))
    | sc.CLONE_NEWNS
    | sc.CLONE_NEWPID
    | sc.CLONE_NEWUTS
    | sc.CLONE_NEWIPC
    | sc.CLONE_NEWCGROUP
)

#: What the jail's root may still do, all of it inside its own user namespace: the default set
#: of Docker and Podman (so ``sshd``, ``su`` and ``chown`` work as on a small Linux), CAP_SETFCAP
#: included, which a uid-0 process needs to create a user namespace that maps uid 0 (Linux 5.12),
#: so a jail can nest a jail. CAP_SYS_ADMIN is not there: nothing can be mounted, unmounted or
#: remounted, so what hides the host stays. Nor CAP_DAC_READ_SEARCH (open_by_handle_at).
PAYLOAD_CAPABILITIES = (
    sc.CAP_CHOWN, sc.CAP_DAC_OVERRIDE, sc.CAP_FOWNER, sc.CAP_FSETID, sc.CAP_KILL, sc.CAP_SETGID, sc.CAP_SETUID,
    sc.CAP_SETPCAP, sc.CAP_NET_BIND_SERVICE, sc.CAP_NET_RAW, sc.CAP_SYS_CHROOT, sc.CAP_MKNOD, sc.CAP_AUDIT_WRITE,
    sc.CAP_SETFCAP,
)


@dataclass
class Launch:
    """Everything the child side needs, prepared by the parent before ``fork()``."""

    plan: Sequence[Op]
    hostname: str
    share_net: bool
    wait_net: bool  # a bridge: the parent plugs the jail in; wait for it before the payload starts
    record: bool  # route what leaves for the outside to a recorder (blackhole.py)
    root_map: bool  # the parent writes a uid/gid range map (pytest runs as real root)
    cwd: str
    status_w: int
    control_r: int
    stdin: int | None = None  # None: /dev/null
    stdout: int | None = None  # None: inherit (the body's captured stdout)
    stderr: int | None = None
    argv: Sequence[str] | None = None  # a command to exec, or None: a test body enters later
    env: dict[str, str] | None = None
    sources: dict[str, int] = field(default_factory=dict)  # exposure source -> O_PATH fd
    tree: int | None = None  # root mode: the rootfs, id-mapped to the jail's ids by the parent
    mapped: tuple[str, ...] = ()  # root mode: exposures the parent id-maps, in the order it sends them
    trees: dict[str, int] = field(default_factory=dict)  # ...and their detached trees, received
    tun: int | None = None  # the recorder's device, in init
    parent_fds: tuple[int, ...] = ()  # the parent's ends of our pipes: closed at once
    cgroup_procs: list[str] = field(default_factory=list)  # join these before unshare
    parent_pid: int = 0
    syscalls: sc.Syscalls = field(default_factory=sc.Syscalls)


class _StepFailed(Exception):
    pass


@contextmanager
def _step(launch: Launch, name: str) -> Iterator[None]:
    """Run one setup step; on failure send exactly one error message and stop."""
    try:
        yield
    except OSError as exc:
        _send(launch, "error", step=name, errno=exc.errno, detail=exc.strerror or str(exc), path=exc.filename)
        raise _StepFailed from None


def _send(launch: Launch, kind: str, **fields: Any) -> None:
    """Tell the parent something; if it is gone, there is nobody to tell (never raise here)."""
    try:
        _wire.send(launch.status_w, kind, **fields)
    except OSError:
        pass


def helper_main(launch: Launch) -> NoReturn:
    """The first child: enters the namespaces, gets its id map, forks the jail's init."""
    code = 1
    try:
        gc.disable()  # the helpers live for milliseconds; a collection would only copy pages
        _close(*launch.parent_fds)  # else a held write end of stdin would keep `cat` waiting
        _die_with_parent(launch, launch.parent_pid)
        flags = NAMESPACES | (0 if launch.share_net else sc.CLONE_NEWNET)
        uid, gid = os.geteuid(), os.getegid()  # after unshare they read as the overflow id
        with _step(launch, "join cgroup"):
            # Before unshare, so the new cgroup namespace is rooted at the jail's own group, and
            # before any fork, so every process of the jail is born in it.
            for procs in launch.cgroup_procs:
                _write(procs, b"0")
            _write("/proc/self/oom_score_adj", b"1000")  # a jail is the first OOM victim, never pytest
        with _step(launch, "unshare"):
            launch.syscalls.unshare(flags)
        with _step(launch, "open bind sources"):
            # Still the host's root (fsuid 0) but already in the new mount namespace: open what
            # the jail will bind before we become an unprivileged uid that cannot reach it.
            for source in launch.sources:
                launch.sources[source] = os.open(source, os.O_PATH | os.O_CLOEXEC)
        with _step(launch, "user namespace id map"):
            if launch.root_map:
                _send(launch, "map", pid=os.getpid())
                # "m", then "r" if a tree of the rootfs comes, then "1" or "0" for each mapped
                # exposure (whether its tree comes), the trees in that order.
                with socket.socket(fileno=os.dup(launch.control_r)) as control:
                    data, fds, _, _ = socket.recv_fds(control, 2 + len(launch.mapped), 1 + len(launch.mapped))
                if data[:1] != b"m":
                    _exit(1)
                if data[1:2] == b"r":
                    launch.tree, fds = fds[0], fds[1:]
                sent = [path for path, flag in zip(launch.mapped, data[2:].decode(), strict=True) if flag == "1"]
                launch.trees = dict(zip(sent, fds, strict=True))
                os.setresgid(0, 0, 0)
                os.setgroups([])
                os.setresuid(0, 0, 0)
                # Changing ids made us non-dumpable, which hands /proc/self to the host's root and
                # would stop a jail nested in this one from writing its id map (prctl(2)).
                launch.syscalls.prctl(sc.PR_SET_DUMPABLE, 1)
                # ...and cleared our parent-death signal (prctl(2)): set it again.
                _die_with_parent(launch, launch.parent_pid)
            else:
                _write_own_map(uid, gid)
        # init cannot see us through getppid() (we are outside its pid namespace): it watches
        # this pidfd instead to notice a helper that died before its PR_SET_PDEATHSIG was set.
        helper = os.pidfd_open(os.getpid())
        with _step(launch, "fork init"):
            pid = os.fork()
        if pid == 0:
            init_main(launch, helper)
        os.close(helper)
        _send(launch, "init", pid=pid)  # the parent kills the jail through init
        _close(launch.status_w, launch.stdin, launch.stdout, launch.stderr)
        os.waitpid(pid, 0)
        code = 0
    except _StepFailed:
        pass
    except BaseException:  # pragma: no cover - a bug; say so rather than hang the parent
        _send(launch, "error", step="helper", errno=None, detail=repr(sys.exc_info()[1]), path=None)
    finally:
        _exit(code)  # never return into the caller's stack


def init_main(launch: Launch, helper: int) -> NoReturn:
    """pid 1 of the jail: build the filesystem, start the command (or wait for a test body to
    enter), reap, report what was blocked and the command's status."""
    code = 1
    try:
        launch.syscalls.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if select.select([helper], [], [], 0)[0]:  # the helper died before the prctl: follow it
            _exit(1)
        os.close(helper)
        if launch.record:
            try:  # before the mounts: /dev/net/tun is the host's (a nested jail has none: no record)
                launch.tun = launch.syscalls.open_tun(blackhole.DEVICE, blackhole.ADDRESS)
            except OSError:
                launch.tun = None
        with _step(launch, "mount"):
            ex = Executor(launch.syscalls, launch.sources, launch.tree, launch.trees)
            for op in launch.plan:
                try:
                    getattr(ex, op[0])(*op[1:])
                except OSError as exc:
                    detail = f"{exc.strerror} during {_describe(op)}"
                    raise OSError(exc.errno, detail, exc.filename) from None
            _close(launch.tree, *launch.trees.values())
        with _step(launch, "hostname"):
            launch.syscalls.sethostname(launch.hostname)
        if not launch.share_net:
            with _step(launch, "loopback up"):
                launch.syscalls.link_up("lo")
        if launch.wait_net and os.read(launch.control_r, 1) != b"n":
            _exit(1)  # the parent is gone, or could not set the network up
        recorder = blackhole.Recorder()
        if launch.argv is None:
            # A test body enters this jail later, from a fork of the caller (enter_body); init
            # keeps the jail, reaps what is left to it and answers the recorder until told to end.
            with _step(launch, "drop capabilities"):
                launch.syscalls.drop_capabilities()
            _send(launch, "ready")
            _serve(launch.control_r, launch.tun, recorder)
        else:
            pid = _spawn_command(launch)
            _close(launch.stdin, launch.stdout, launch.stderr)
            status = _reap_until(pid, launch.tun, recorder)
        if launch.tun is not None:
            _send(launch, "blocked", attempts=recorder.attempts, dropped=recorder.dropped)
        if launch.argv is not None:
            _send(launch, "exit", status=status)
        code = 0  # leaving kills every process still in the jail: the pid namespace dies with init
    except _StepFailed:
        pass
    except BaseException:  # pragma: no cover
        _send(launch, "error", step="init", errno=None, detail=repr(sys.exc_info()[1]), path=None)
    finally:
        _exit(code)


def _reap_until(pid: int, tun: int | None = None, recorder: blackhole.Recorder | None = None) -> int:
    """Reap every process of the jail until ``pid`` ends; meanwhile answer what reaches the
    recorder's device. Returns ``pid``'s wait status."""
    if tun is None:
        while True:
            try:
                reaped, status = os.waitpid(-1, 0)
            except ChildProcessError:  # pragma: no cover
                return 0
            if reaped == pid:
                return status
    assert recorder is not None
    payload = os.pidfd_open(pid)
    try:
        while True:
            ready = select.select([tun, payload], [], [], 1.0)[0]  # 1 s: orphans are reaped too
            if tun in ready:
                _answer(tun, recorder)
            while True:
                try:
                    reaped, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:  # pragma: no cover
                    return 0
                if reaped == 0:
                    break
                if reaped == pid:
                    _answer(tun, recorder)  # what it sent last
                    return status
    finally:
        os.close(payload)


def _serve(control: int, tun: int | None, recorder: blackhole.Recorder) -> None:
    """Keep a jail for its test body: reap orphans and answer the recorder until the caller
    writes "e" (the body is over) or goes away."""
    poller = select.poll()
    poller.register(control, select.POLLIN)
    if tun is not None:
        poller.register(tun, select.POLLIN)
    while True:
        for fd, _ in poller.poll(1000):  # 1 s: orphans are reaped too
            if fd == tun:
                _answer(fd, recorder)
            elif os.read(control, 1) in (b"e", b""):
                if tun is not None:
                    _answer(tun, recorder)  # what it sent last
                return
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass


def _answer(tun: int, recorder: blackhole.Recorder) -> None:
    for _ in range(256):  # a burst at a time; the loop comes back
        try:
            packet = os.read(tun, 65535)
        except OSError:  # EAGAIN: read all there was
            return
        answer = recorder.handle(packet)
        if answer is not None:
            try:
                os.write(tun, answer)
            except OSError:
                pass


# Python ignores SIGPIPE and may ignore others; a command starts with every signal at its default
# (as subprocess's restore_signals does) and none blocked.
_DEFAULT_SIGNALS = tuple(
    s for s in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM,
                signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)
)


def _spawn_command(launch: Launch) -> int:
    """Start the command as pid 2 with posix_spawn (a vfork: no copy of this process's memory).

    What the command must start with is set up here in init, and inherited: the working
    directory, no-new-privileges; stdio, a new session and default signals come from spawn's own
    attributes. Every other descriptor is close-on-exec or closed by a file action.
    """
    assert launch.argv is not None
    with _step(launch, "cwd"):
        os.chdir(launch.cwd)
    launch.syscalls.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
    with _step(launch, "drop capabilities"):
        # In every mode: the jail's root must not be able to unmount or remount what hides the
        # host (capabilities(7): with an empty bounding set, exec gives even uid 0 nothing).
        launch.syscalls.drop_capabilities(keep=PAYLOAD_CAPABILITIES)
    with _step(launch, "stdio"):
        stdin = launch.stdin if launch.stdin is not None else os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    actions: list[tuple[int, ...]] = [(os.POSIX_SPAWN_DUP2, stdin, 0)]
    if launch.stdout is not None:
        actions.append((os.POSIX_SPAWN_DUP2, launch.stdout, 1))
    if launch.stderr is not None:
        actions.append((os.POSIX_SPAWN_DUP2, launch.stderr, 2))
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in (launch.stdin, launch.stdout, launch.stderr, stdin) and _inheritable(fd):
            actions.append((os.POSIX_SPAWN_CLOSE, fd))
    env = os.environ if launch.env is None else launch.env
    with _step(launch, "exec"):
        try:
            return os.posix_spawnp(
                launch.argv[0], list(launch.argv), env, file_actions=actions, setsid=True,
                setsigdef=_DEFAULT_SIGNALS, setsigmask=(),
            )
        except OSError as exc:
            raise _cannot_run(launch.argv[0], exc, env.get("PATH", os.defpath)) from None


def _cannot_run(program: str, exc: OSError, path: str) -> OSError:
    """Why ``program`` did not start, in words: a name found nowhere on PATH is "not found" even
    where a directory of PATH was closed to the jail (execvp then says EACCES)."""
    if "/" not in program and exc.errno in (errno.ENOENT, errno.EACCES):
        places = [d or "." for d in path.split(":")]
        if not any(os.path.exists(os.path.join(d, program)) for d in places):
            hint = ""
            if program.split() != [program]:
                hint = f"; argv is a list of words, as with shell=False: {program.split()!r}"
            return OSError(errno.ENOENT, f"cannot run {program!r}: no such program on PATH ({path}){hint}")
    return OSError(exc.errno, f"cannot run {program!r}: {exc.strerror}", exc.filename)


def _inheritable(fd: int) -> bool:
    try:
        return os.get_inheritable(fd)
    except OSError:
        return False


@dataclass
class Entry:
    """What a fork of the caller needs to enter a prepared jail and become its test body."""

    init: int  # a pidfd of the jail's init: its namespaces are the jail's
    flags: int  # the namespaces to join
    root_map: bool
    cwd: str
    env: dict[str, str] | None
    cgroup_procs: list[str]  # join these first: the body is born in the jail's cgroup
    channel: int  # the body's end of the wire to the caller
    crash: int  # where a dying body's last words go (faulthandler, an uncaught traceback)
    close: tuple[int, ...]  # the caller's descriptors that are none of the body's business
    syscalls: sc.Syscalls


def enter_body(entry: Entry) -> None:
    """In a fork of the caller: join the jail's cgroup and namespaces, fork the body.

    Returns in the body only, as pid 2 of the jail, ready to run the rest of the caller's stack;
    this process (outside the jail's pid namespace, invisible from inside) reaps the body, says
    how it ended and exits. ``setns`` into a pid namespace moves only the children (setns(2)).
    """
    try:
        gc.disable()
        _close(*entry.close)
        for procs in entry.cgroup_procs:  # before the cgroup namespace hides the way there
            _write(procs, b"0")
        entry.syscalls.setns(entry.init, entry.flags)  # one call, user namespace first (setns(2))
        os.close(entry.init)
        pid = os.fork()
    except OSError as exc:
        _tell(entry.channel, "error", step="enter", errno=exc.errno, detail=exc.strerror or str(exc), path=None)
        _exit(1)
    if pid:
        code = 1
        try:
            _close(entry.crash)
            _, status = os.waitpid(pid, 0)
            _tell(entry.channel, "exit", status=status)
            code = 0
        finally:
            _exit(code)
    try:
        if entry.root_map:  # the jail's root, an unprivileged host uid, as the jail's init is
            os.setresgid(0, 0, 0)
            os.setgroups([])
            os.setresuid(0, 0, 0)
            entry.syscalls.prctl(sc.PR_SET_DUMPABLE, 1)  # a nested jail writes its id map (prctl(2))
        os.setsid()
        _seal_descriptors(keep=(entry.channel, entry.crash))
        os.chdir(entry.cwd)
        entry.syscalls.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
        entry.syscalls.drop_capabilities(keep=PAYLOAD_CAPABILITIES)
    except OSError as exc:
        _tell(entry.channel, "error", step="enter", errno=exc.errno, detail=exc.strerror or str(exc), path=exc.filename)
        _exit(127)
    gc.enable()
    if entry.env is not None:
        os.environ.clear()
        os.environ.update(entry.env)


def _tell(fd: int, kind: str, **fields: Any) -> None:
    try:
        _wire.send(fd, kind, **fields)
    except OSError:
        pass


def _die_with_parent(launch: Launch, parent: int) -> None:
    # PR_SET_PDEATHSIG follows the parent *thread*; our parents are single-threaded, and the
    # getppid() check closes the race with a parent that died before the prctl (prctl(2)).
    launch.syscalls.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        _exit(1)


def _write_own_map(uid: int, gid: int) -> None:
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def _seal_descriptors(keep: tuple[int, ...]) -> None:
    """Keep a test body's descriptors from leaking.

    The body is a fork of pytest: the descriptors that fixture values hold must keep working, so
    they stay open but become close-on-exec (nothing the body runs inherits them); directory
    descriptors are closed, since ``openat(dirfd, "..")`` would walk out of the jail's root.
    """
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep or fd < 3:
            continue
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                os.close(fd)
            else:
                os.set_inheritable(fd, False)
        except OSError:
            pass


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _close(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None and fd > 2:
            try:
                os.close(fd)
            except OSError:
                pass


def _describe(op: Op) -> str:
    verb, *args = op
    shown = [a for a in args if isinstance(a, str)]
    return f"{verb} {' '.join(shown)}".strip()
