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
import time
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field
from posix import _exit  # the real one: coverage's patch=_exit would save from our children
from typing import Any
from typing import NoReturn

from . import _wire
from ._linux import blackhole
from ._linux import seccomp
from ._linux import syscalls as sc
from ._linux.mounts import Executor
from ._linux.mounts import Op
from ._linux.remount import make_writable

#: What ``ps`` in a jail shows for its pid 1.
INIT_NAME = b"jail-init"

NAMESPACES = (
    sc.CLONE_NEWUSER  # created first when combined, so it owns all the others (user_namespaces(7))
    | sc.CLONE_NEWNS
    | sc.CLONE_NEWPID
    | sc.CLONE_NEWUTS
    | sc.CLONE_NEWIPC
    | sc.CLONE_NEWCGROUP
)

#: What the jail's root (root mode) may still do, all of it inside its own user namespace: the
#: default set of Docker and Podman (so ``sshd``, ``su`` and ``chown`` work as on a small Linux)
#: without CAP_NET_RAW (raw and packet sockets: ``cap_add=["NET_RAW"]`` gives it back; ``ping``
#: works without it, through the ICMP sockets every group of the jail may open), and with
#: CAP_SETFCAP, which a uid-0 process needs to create a user namespace that maps uid 0 (Linux
#: 5.12), so a jail can nest a jail. CAP_SYS_ADMIN is not there: nothing can be mounted, unmounted
#: or remounted, so what hides the host stays. Nor CAP_DAC_READ_SEARCH (open_by_handle_at).
#: Rootless, the jail's code runs as the user, with no capability but those of ``cap_add``.
PAYLOAD_CAPABILITIES = (
    sc.CAP_CHOWN, sc.CAP_DAC_OVERRIDE, sc.CAP_FOWNER, sc.CAP_FSETID, sc.CAP_KILL, sc.CAP_SETGID, sc.CAP_SETUID,
    sc.CAP_SETPCAP, sc.CAP_NET_BIND_SERVICE, sc.CAP_SYS_CHROOT, sc.CAP_MKNOD, sc.CAP_AUDIT_WRITE, sc.CAP_SETFCAP,
)


def capabilities(added: Sequence[str], root_map: bool) -> tuple[int, ...]:
    """What the jail's code keeps: Docker's set less NET_RAW as the jail's root, nothing as a
    user (rootless), plus what ``cap_add`` names."""
    extra = tuple(getattr(sc, "CAP_" + name) for name in added)
    return (PAYLOAD_CAPABILITIES if root_map else ()) + extra


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
    cgroup_joins: list[str] = field(default_factory=list)  # join these before unshare
    parent_pid: int = 0
    lifeline: int | None = None  # a pidfd of the caller's process: the jail ends when it does
    filter: bytes | None = None  # the system call filter (seccomp.py); None: unconfined
    quiet_filter: bytes | None = None  # ...the same without a supervisor, for a jail in a jail
    listener: int | None = None  # ...where the calls it refuses arrive, in init
    refused: list[str] = field(default_factory=list)  # ...and their names, for the report
    capabilities: tuple[int, ...] = PAYLOAD_CAPABILITIES  # what the jail's code keeps
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
        # Only what the jail needs: a descriptor of pytest's (another thread's jail.run pipe, the
        # write end of this jail's stdin) held here would keep its reader waiting for our end.
        _close_all_but(launch.status_w, launch.control_r, launch.stdin, launch.stdout, launch.stderr)
        _default_signals()  # pytest's: with SIGCHLD ignored, waiting for init would fail; init inherits them
        # Not PR_SET_PDEATHSIG: it follows the *thread* that forked us, and a jail must outlive a
        # thread that started it (a jail.spawn from a thread pool); init watches this instead.
        launch.lifeline = os.pidfd_open(launch.parent_pid)
        if _readable(launch.lifeline):
            _exit(1)  # the caller is already gone
        flags = NAMESPACES | (0 if launch.share_net else sc.CLONE_NEWNET)
        uid, gid = os.geteuid(), os.getegid()  # after unshare they read as the overflow id
        with _step(launch, "join cgroup"):
            # Before unshare, so the new cgroup namespace is rooted at the jail's own group, and
            # before any fork, so every process of the jail is born in it.
            for procs in launch.cgroup_joins:
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
            else:
                write_own_map(uid, gid)
        if not launch.share_net:
            with _step(launch, "ping sockets"):
                try:
                    _open_ping_sockets()
                except OSError as exc:  # a jail in a jail: /proc/sys is read-only there, no ping sockets
                    if exc.errno not in (errno.EROFS, errno.EACCES):  # (EACCES: Linux 5.10 says so)
                        raise
        with _step(launch, "session keyring"):
            join_fresh_keyring(launch.syscalls)  # the keys of pytest's session stay out of reach
        # A test body enters the jail later through these: our own namespaces, and the pid
        # namespace of our children, which can be opened only once there is one. Opened through a
        # descriptor of /proc/self/ns taken now: init's pivot_root is about to move our root too
        # (we share its mount namespace), and from then on no path reaches /proc here.
        entries: list[int] = []
        ns_dir = None
        if launch.argv is None:
            ns_dir = os.open("/proc/self/ns", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            names = ("user", "mnt", "uts", "ipc", "cgroup") + (() if launch.share_net else ("net",))
            entries = [os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=ns_dir) for name in names]
        # init cannot see us through getppid() (we are outside its pid namespace): it watches
        # this pidfd instead to notice a helper that died before its PR_SET_PDEATHSIG was set.
        helper = os.pidfd_open(os.getpid())
        with _step(launch, "fork init"):
            pid = os.fork()
        if pid == 0:
            _close(ns_dir, *entries)
            init_main(launch, helper)
        os.close(helper)
        if ns_dir is not None:
            entries.insert(5, os.open("pid_for_children", os.O_RDONLY | os.O_CLOEXEC, dir_fd=ns_dir))
            os.close(ns_dir)
            with socket.socket(fileno=os.dup(launch.control_r)) as control:
                socket.send_fds(control, [b"e"], entries)
            _close(*entries)
        _send(launch, "init", pid=pid)  # the parent kills the jail through init
        _close(launch.status_w, launch.stdin, launch.stdout, launch.stderr)
        os.waitpid(pid, 0)
        code = 0
    except _StepFailed:
        pass
    except BaseException:  # pragma: no cover - a bug; say so rather than hang the parent
        _send(launch, "error", step="helper", errno=None, detail=_where(), path=None)
    finally:
        _exit(code)  # never return into the caller's stack


def init_main(launch: Launch, helper: int) -> NoReturn:
    """pid 1 of the jail: build the filesystem, start the command (or wait for a test body to
    enter), reap, report what was blocked and the command's status."""
    code = 1
    try:
        launch.syscalls.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if _readable(helper):  # the helper died before the prctl: follow it
            _exit(1)
        os.close(helper)
        with _step(launch, "rename init"):
            # /proc/1/cmdline is readable by anyone in the jail: pytest's command line must not be.
            launch.syscalls.set_command_line(INIT_NAME)
            launch.syscalls.wipe_environment_block()
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
        with _step(launch, "seal init"):
            # Nothing in the jail may read init, a fork of pytest: its memory, environment and
            # descriptors under /proc/1 become the host root's (prctl(2), proc(5)), and it keeps
            # only the descriptors it needs (the bind sources it opened on the host are gone).
            launch.syscalls.prctl(sc.PR_SET_DUMPABLE, 0)
            _close_all_but(launch.status_w, launch.control_r, launch.tun, launch.stdin, launch.stdout, launch.stderr,
                           launch.lifeline)
            launch.sources.clear()
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
            _watch(launch, recorder, None)
        else:
            pid = _spawn_command(launch)
            _close(launch.stdin, launch.stdout, launch.stderr)
            status = _watch(launch, recorder, pid)
            _end_the_rest()  # before the status: the caller returns on it, with nothing left running
        if launch.tun is not None:
            _send(launch, "blocked", attempts=recorder.attempts, dropped=recorder.dropped)
        if launch.listener is not None:
            _send(launch, "syscalls", calls=launch.refused)
        if launch.argv is not None:
            _send(launch, "exit", status=status)
        code = 0  # leaving kills every process still in the jail: the pid namespace dies with init
    except _StepFailed:
        pass
    except BaseException:  # pragma: no cover
        _send(launch, "error", step="init", errno=None, detail=_where(), path=None)
    finally:
        _exit(code)


def _watch(launch: Launch, recorder: blackhole.Recorder, payload: int | None) -> int | None:
    """init's loop: reap every process of the jail, answer what reaches the recorder, obey the
    caller, and leave with pytest (its process, not the thread that started the jail).

    With a command (``payload``, pid 2), until it ends: returns its wait status; "t" from the
    caller sends it SIGTERM (race-free: its pid is ours until we reap it). With a test body,
    until the caller writes "e" (the body is over): returns ``None``.
    """
    poller = select.poll()
    pidfd = os.pidfd_open(payload) if payload is not None else None
    for fd in (launch.control_r, launch.lifeline, launch.tun, pidfd, launch.listener):
        if fd is not None:
            poller.register(fd, select.POLLIN)
    try:
        while True:
            for fd, _ in poller.poll(1000):  # 1 s at most: orphans are reaped too
                if fd == launch.tun:
                    _answer(fd, recorder)
                elif fd == launch.listener:
                    refuse_one(launch.syscalls, fd, launch.refused)
                elif fd == launch.lifeline:
                    _exit(1)  # pytest is gone: so is the jail (the kernel kills the rest with us)
                elif fd == launch.control_r:
                    order = os.read(fd, 1)
                    if order == b"t" and payload is not None:
                        os.kill(payload, signal.SIGTERM)
                    elif order == b"e" and payload is None:
                        if launch.tun is not None:
                            _answer(launch.tun, recorder)  # what it sent last
                        return None
                    elif order == b"":
                        _exit(1)  # the caller let go of the jail
            while True:
                try:
                    reaped, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if reaped == 0:
                    break
                if reaped == payload:
                    if launch.tun is not None:
                        _answer(launch.tun, recorder)  # what it sent last
                    return status
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _end_the_rest(grace: float = 0.5) -> None:
    """SIGKILL every other process of the jail (what the command left: daemons) and reap them,
    for at most ``grace`` seconds (one in uninterruptible sleep is left to the kernel, which
    kills it when init exits)."""
    try:
        os.kill(-1, signal.SIGKILL)  # in a pid namespace: all its processes but init (kill(2))
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                time.sleep(0.001)
        except ChildProcessError:
            return


def refuse_one(syscalls: sc.Syscalls, listener: int, refused: list[str]) -> None:
    """Answer a call the filter handed over with its errno, and remember its name."""
    call = syscalls.next_refusal(listener)
    if call is None:
        return
    number, nr, args = call
    name, code = seccomp.verdict(nr, args)
    if name not in refused and len(refused) < 64:
        refused.append(name)
    syscalls.refuse(listener, number, code)


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
        launch.syscalls.drop_capabilities(keep=launch.capabilities, ambient=not launch.root_map)
    if launch.filter is not None:
        with _step(launch, "seccomp"):  # init too: it only reaps and answers from here on
            launch.listener = _install_filter(launch.syscalls, launch.filter, launch.quiet_filter)
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
            return os.posix_spawn(
                _program(launch.argv[0], env), list(launch.argv), env, file_actions=actions, setsid=True,
                setsigdef=_DEFAULT_SIGNALS, setsigmask=(),
            )
        except OSError as exc:
            raise _cannot_run(launch.argv[0], exc, env.get("PATH", os.defpath)) from None


def _program(name: str, env: Mapping[str, str]) -> str:
    """Where ``name`` is, along the PATH of the environment the command gets (as subprocess does
    with ``env=``; posix_spawnp would search init's own, which is wiped: the default path)."""
    if "/" in name:
        return name
    for directory in os.get_exec_path(env):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)


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

    namespaces: list[int]  # the jail's namespaces (the user namespace first), from its helper
    root_map: bool
    cwd: str
    env: dict[str, str] | None
    cgroup_joins: list[str]  # join these first: the body is born in the jail's cgroup
    channel: int  # the body's end of the wire to the caller
    crash: int  # where a dying body's last words go (faulthandler, an uncaught traceback)
    close: tuple[int, ...]  # the caller's descriptors that are none of the body's business
    syscalls: sc.Syscalls
    filter: bytes | None = None  # the system call filter; None: unconfined
    quiet_filter: bytes | None = None  # ...without a supervisor, for a jail in a jail
    capabilities: tuple[int, ...] = PAYLOAD_CAPABILITIES  # what the body keeps
    #: Directories under a read-only exposure that the body may write (its tmp_path): made
    #: writable on entry, so the jail can be built before they exist (a jail prepared ahead).
    writable: tuple[str, ...] = ()


def enter_body(entry: Entry) -> None:
    """In a fork of the caller: join the jail's cgroup and namespaces, fork the body.

    Returns in the body only, as pid 2 of the jail, ready to run the rest of the caller's stack;
    this process (outside the jail's pid namespace, invisible from inside) reaps the body, says
    how it ended and exits. ``setns`` into a pid namespace moves only the children (setns(2)).
    """
    try:
        gc.disable()
        _close(*entry.close)
        for procs in entry.cgroup_joins:  # before the cgroup namespace hides the way there
            _write(procs, b"0")
        for fd in entry.namespaces:  # the user namespace first: it owns the others (setns(2))
            entry.syscalls.setns(fd, 0)
        _close(*entry.namespaces)
        for path in entry.writable:  # seen through the jail's own read-only mount of its parent
            if not entry.syscalls.has("mount_setattr"):  # before Linux 5.12
                make_writable(entry.syscalls, path)
                continue
            tree = entry.syscalls.clone_tree(path)
            try:
                entry.syscalls.make_tree_writable(tree)
                entry.syscalls.attach_tree(tree, path)
            finally:
                os.close(tree)
        join_fresh_keyring(entry.syscalls)  # before the filter, which refuses keyctl
        listener = None
        if entry.filter is not None:  # on this process: the body is born under it
            entry.syscalls.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
            listener = _install_filter(entry.syscalls, entry.filter, entry.quiet_filter)
        # A caller that ignores SIGCHLD would have the body reaped for us, its status lost (wait(2)):
        # wait for it with the default, and give the body the caller's disposition back.
        disposition = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        pid = os.fork()
    except OSError as exc:
        _tell(entry.channel, "error", step="enter", errno=exc.errno, detail=exc.strerror or str(exc), path=None)
        _exit(1)
    if pid:
        _reap_body(entry, pid, listener)
    try:
        signal.signal(signal.SIGCHLD, disposition)
        _close(listener)  # the body must never answer its own refused calls (it could let them through)
        if entry.root_map:  # the jail's root, an unprivileged host uid, as the jail's init is
            os.setresgid(0, 0, 0)
            os.setgroups([])
            os.setresuid(0, 0, 0)
            entry.syscalls.prctl(sc.PR_SET_DUMPABLE, 1)  # a nested jail writes its id map (prctl(2))
        os.setsid()
        _seal_descriptors(keep=(entry.channel, entry.crash))
        os.chdir(entry.cwd)
        entry.syscalls.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
        entry.syscalls.drop_capabilities(keep=entry.capabilities, ambient=not entry.root_map)
    except OSError as exc:
        _tell(entry.channel, "error", step="enter", errno=exc.errno, detail=exc.strerror or str(exc), path=exc.filename)
        _exit(127)
    gc.enable()
    if entry.env is not None:
        os.environ.clear()
        os.environ.update(entry.env)
        # /proc/self/environ shows the block the process started with (pytest's), whatever
        # os.environ holds: with env= the body shows only what it was given.
        entry.syscalls.wipe_environment_block()


def _reap_body(entry: Entry, pid: int, listener: int | None) -> NoReturn:
    """The process that entered: answer what the filter refuses the body, reap it, say how it
    ended and what was refused."""
    code = 1
    refused: list[str] = []
    try:
        _close(entry.crash)
        body = os.pidfd_open(pid)
        poller = select.poll()  # (never select(): it fails on a descriptor numbered 1024 or more)
        for fd in (body, listener):
            if fd is not None:
                poller.register(fd, select.POLLIN)
        ended = False
        while not ended:
            for fd, _ in poller.poll():
                if fd == listener:
                    refuse_one(entry.syscalls, fd, refused)
                elif fd == body:
                    ended = True
        _, status = os.waitpid(pid, 0)
        if listener is not None:
            _tell(entry.channel, "syscalls", calls=refused)
        _tell(entry.channel, "exit", status=status)
        code = 0
    finally:
        _exit(code)


def _install_filter(syscalls: sc.Syscalls, program: bytes, quiet: bytes | None) -> int | None:
    """The filter, with a supervisor to name what it refuses; where a filter above already has
    one (a jail in a jail: the outer jail names them), ``quiet``, which refuses them at once."""
    try:
        return syscalls.install_filter(program)
    except OSError as exc:
        if exc.errno != errno.EBUSY or quiet is None:
            raise
        return syscalls.install_filter(quiet, listener=False)


def _where() -> str:
    """The exception being handled and the line of ours that raised it: a bug's report."""
    exc = sys.exc_info()[1]
    tb = exc.__traceback__ if exc is not None else None
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    line = f" at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}" if tb is not None else ""
    return f"{exc!r}{line}"


def _readable(fd: int, timeout: float = 0) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _tell(fd: int, kind: str, **fields: Any) -> None:
    try:
        _wire.send(fd, kind, **fields)
    except OSError:
        pass


def _open_ping_sockets() -> None:
    """Let every group of the jail open ICMP sockets in its network namespace (``ping`` without
    CAP_NET_RAW, as Docker does). Written through the host's /proc while it is still in view:
    /proc/sys/net is the namespace of whoever opens it. The range must be gids of our map."""
    with open("/proc/self/gid_map") as f:
        first, _, count = (int(n) for n in f.readline().split())
    _write("/proc/sys/net/ipv4/ping_group_range", f"{first} {first + count - 1}".encode())


def write_own_map(uid: int, gid: int) -> None:
    """In a user namespace just made: map our own uid and gid to themselves (no setgroups)."""
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


def _default_signals() -> None:
    """init is a fork of pytest, with its signal handlers (SIGINT is KeyboardInterrupt) and
    dispositions (a pytest that ignores SIGCHLD would have init's children reaped for it): back to
    the defaults, none blocked. For pid 1 of a pid namespace a signal left at its default from
    inside is not delivered at all (pid_namespaces(7)): `kill -INT 1` in a jail does nothing."""
    for number in signal.valid_signals():
        if number in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            if signal.getsignal(number) is not signal.SIG_DFL:
                signal.signal(number, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def join_fresh_keyring(syscalls: sc.Syscalls) -> None:
    """A new, empty session keyring: the keys of pytest's session stay out of a jail's reach."""
    try:
        syscalls.join_session_keyring()
    except OSError as exc:
        if exc.errno != errno.ENOSYS:  # a kernel without keys has none to leave behind
            raise


def _close_all_but(*keep: int | None) -> None:
    """Close every descriptor but ``keep`` (close_range(2) between them)."""
    kept = sorted({fd for fd in keep if fd is not None and fd >= 0} | {0, 1, 2})
    for low, high in zip(kept, [*kept[1:], 1 << 20], strict=True):
        if high > low + 1:
            os.closerange(low + 1, high)


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
