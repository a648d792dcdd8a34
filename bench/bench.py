"""Benchmark pytest-jail: per-test overhead of ``--jail-all`` and latency of ``Jail().run``."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pytest-jail-bench"
PYTEST_ARGS = ["-p", "no:cacheprovider", "-q"]
BWRAP_ARGV = ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "true"]
COPY_IGNORE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".venv*", "bench")


@dataclass(frozen=True)
class Env:
    """A cached venv: its name and what pip installs into it (besides pytest-jail from the repo)."""

    name: str
    requirements: tuple[str, ...]

    @property
    def python(self) -> Path:
        return CACHE / self.name / "bin" / "python"


@dataclass(frozen=True)
class Variant:
    """One pytest invocation to time: which venv, which extra args, and its baselines."""

    name: str
    env: Env
    args: tuple[str, ...]
    baselines: tuple[str, ...] = ()


PYTEST8 = Env("pytest8", ("pytest==8.4.2", "pytest-forked", "pytest-xdist"))
PYTEST9 = Env("pytest9", ("pytest>=9,<10",))
VARIANTS = (
    Variant("plain", PYTEST8, ()),
    Variant("forked", PYTEST8, ("-p", "pytest_forked", "--forked"), ("plain",)),
    Variant("jail-all", PYTEST8, ("--jail-all",), ("plain", "forked")),
    Variant("4 forks", PYTEST8, ("-p", "bench_forks", "-p", "pytest_forked", "--forked"), ("plain", "forked")),
    Variant("plain -n 2", PYTEST8, ("-n", "2")),
    Variant("forked -n 2", PYTEST8, ("-n", "2", "-p", "pytest_forked", "--forked"), ("plain -n 2",)),
    Variant("jail-all -n 2", PYTEST8, ("-n", "2", "--jail-all"), ("plain -n 2", "forked -n 2")),
    Variant("4 forks -n 2", PYTEST8, ("-n", "2", "-p", "bench_forks", "-p", "pytest_forked", "--forked"),
            ("plain -n 2", "forked -n 2")),
    Variant("plain (pytest 9)", PYTEST9, ()),
    Variant("jail-all (pytest 9)", PYTEST9, ("--jail-all",), ("plain (pytest 9)",)),
)


# -- venvs ------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def source_hash() -> str:
    """A digest of the repo's package sources, so a cached venv is refreshed when they change."""
    digest = hashlib.sha256()
    for path in sorted([REPO / "pyproject.toml", *(REPO / "pytest_jail").rglob("*.py")]):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def pip(env: Env, *args: str) -> None:
    argv = [str(env.python), "-m", "pip", "--disable-pip-version-check", "-q", *args]
    proc = subprocess.run(argv, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench: `{' '.join(argv)}` failed:\n{proc.stdout}{proc.stderr}")


def ensure_env(env: Env) -> None:
    """Create (or refresh) the venv; pytest-jail is installed from a snapshot copy of the repo."""
    stamp_path = CACHE / env.name / "bench-stamp.json"
    stamp = {"requirements": list(env.requirements), "source": source_hash()}
    if env.python.exists() and stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        return
    if not env.python.exists():
        log(f"creating venv {CACHE / env.name}")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(CACHE / env.name)], check=True)
    log(f"installing {', '.join(env.requirements)} and pytest-jail ({REPO}) into {env.name}")
    with tempfile.TemporaryDirectory(prefix="pytest-jail-src-") as tmp:
        src = Path(tmp) / "src"
        # A copy, so that building never writes build/ or *.egg-info into the working tree.
        shutil.copytree(REPO, src, ignore=COPY_IGNORE)
        pip(env, "install", *env.requirements, str(src))
        pip(env, "install", "--force-reinstall", "--no-deps", str(src))
    stamp_path.write_text(json.dumps(stamp))


def versions(env: Env) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, platform\n"
        "names = ['pytest', 'pytest-forked', 'pytest-jail', 'pluggy']\n"
        "found = {}\n"
        "for n in names:\n"
        "    try: found[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "found['python'] = platform.python_version()\n"
        "print(json.dumps(found))\n"
    )
    proc = subprocess.run([str(env.python), "-c", code], capture_output=True, text=True, check=True)
    found: dict[str, str] = json.loads(proc.stdout)
    return found


# -- pytest overhead --------------------------------------------------------------------------------


#: The floor of a jailed test's design, without any jail work: pytest-forked's fork, in which the
#: test runs, and three more forks of pytest that end at once. A jailed test forks pytest's
#: interpreter four times: helper and init (the jail prepared ahead), the fork that enters, the body.
FORKS_PLUGIN = """\
import os

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item):
    for _ in range(3):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
"""


def write_tests(directory: Path, count: int) -> None:
    (directory / "pytest.ini").write_text("")
    (directory / "bench_forks.py").write_text(FORKS_PLUGIN)
    body = "".join(f"def test_{i}():\n    assert 1\n\n\n" for i in range(count))
    (directory / "test_generated.py").write_text(body)
    # In root mode the jail's root is an unprivileged host uid: it must be able to enter the rootdir.
    directory.chmod(0o755)


def pytest_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return env


def time_pytest(variant: Variant, directory: Path, count: int) -> float:
    """Wall time of one pytest run; exits loudly unless it reports exactly ``count passed``."""
    argv = [str(variant.env.python), "-m", "pytest", *PYTEST_ARGS, *variant.args]
    start = time.perf_counter()
    proc = subprocess.run(argv, check=False, cwd=directory, env=pytest_env(),
                          capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - start
    last = proc.stdout.strip().splitlines()[-1:] or [""]
    if proc.returncode != 0 or not re.fullmatch(rf"{count} passed in [\d.]+s(?: \([\d:]+\))?", last[0]):
        sys.exit(f"bench: {variant.name}: `{' '.join(argv)}` did not report '{count} passed' "
                 f"(exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return elapsed


def rotated(items: Sequence[Variant], by: int) -> list[Variant]:
    by %= len(items)
    return [*items[by:], *items[:by]]


def measure_pytest(count: int, rounds: int) -> dict[str, list[float]]:
    """Round-robin the variants (order rotated each round) after one warm-up round."""
    times: dict[str, list[float]] = {v.name: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="pytest-jail-bench-") as tmp:
        directory = Path(tmp)
        write_tests(directory, count)
        for round_ in range(rounds + 1):
            log(f"pytest round {round_}/{rounds}" + (" (warm-up)" if round_ == 0 else ""))
            for variant in rotated(VARIANTS, round_):
                elapsed = time_pytest(variant, directory, count)
                if round_ > 0:
                    times[variant.name].append(elapsed)
    return times


def overhead_ms(times: dict[str, list[float]], name: str, base: str, count: int) -> list[float]:
    """Per-test overhead of ``name`` over ``base`` in each round (pair-wise), in ms."""
    return [(t - b) / count * 1000 for t, b in zip(times[name], times[base], strict=True)]


# -- Jail().run latency -----------------------------------------------------------------------------


def latency_worker(iterations: int, warmup: int) -> None:
    """Run inside the venv: time each method alternately in-process and print JSON samples (s)."""
    from pytest_jail import Jail
    from pytest_jail import JailSpec

    def jail() -> int:
        return Jail().run(["true"]).returncode

    unconfined = Jail(JailSpec(syscalls="unconfined"))  # no seccomp filter: what the filter costs

    def jail_unconfined() -> int:
        return unconfined.run(["true"]).returncode

    limited = Jail(JailSpec(memory="256M", cpus=1, pids=64))

    def jail_limits() -> int:
        return limited.run(["true"]).returncode

    busybox = Jail(JailSpec(rootfs="busybox"))  # built (once) before timing, in the warm-up

    def jail_rootfs() -> int:
        return busybox.run(["true"]).returncode

    bridged = Jail(JailSpec(net="bridge"))  # root only: a veth pair on a host bridge per jail

    def jail_bridge() -> int:
        return bridged.run(["true"]).returncode

    def sub() -> int:
        return subprocess.run(["true"], check=False).returncode

    true = shutil.which("true") or "/bin/true"

    def forks() -> int:
        """A jail's process chain without any jail work, the floor of its design: this
        interpreter forked twice (helper, init), and ``true`` spawned from the second."""
        import gc

        gc.freeze()  # as the engine does around its forks
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                inner = os.fork()
                if inner == 0:
                    code = os.waitstatus_to_exitcode(os.waitpid(os.posix_spawn(true, ["true"], os.environ), 0)[1])
                else:
                    code = os.waitstatus_to_exitcode(os.waitpid(inner, 0)[1])
            finally:
                os._exit(code)
        gc.unfreeze()
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    def bwrap() -> int:
        return subprocess.run(BWRAP_ARGV, check=False, capture_output=True).returncode

    methods: dict[str, Callable[[], int]] = {
        "subprocess": sub, "jail": jail, "jail-unconfined": jail_unconfined, "jail-limits": jail_limits,
        "jail-rootfs": jail_rootfs, "forks": forks,
    }
    if shutil.which("bwrap"):
        methods["bwrap"] = bwrap
    samples: dict[str, list[float]] = {name: [] for name in methods}
    # A fresh random order each iteration (seeded: the same sequence each run): a fixed rotation
    # always puts the same method after the same one, and a method's kernel clean-up (a network
    # namespace's) would be paid by its neighbour.
    order = random.Random(1)
    names = list(methods)
    for i in range(warmup + iterations):
        order.shuffle(names)
        for name in names:
            start = time.perf_counter()
            code = methods[name]()
            elapsed = time.perf_counter() - start
            if code != 0:
                sys.exit(f"bench: latency {name} exited {code}")
            if i >= warmup:
                samples[name].append(elapsed)
    if os.geteuid() == 0:  # on its own: each bridged jail leaves the kernel a network to tear down
        samples["jail-bridge"] = []
        for i in range(warmup + iterations // 3):
            start = time.perf_counter()
            code = jail_bridge()
            elapsed = time.perf_counter() - start
            if code != 0:
                sys.exit(f"bench: latency jail-bridge exited {code}")
            if i >= warmup:
                samples["jail-bridge"].append(elapsed)
    cost: dict[str, list[float]] = {}
    for name, method in (("bwrap", bwrap), ("jail", jail), ("forks", forks)):
        if name in methods:
            cost[name] = resources_per_run(method, max(20, iterations // 3))
    print(json.dumps({"samples": samples, "cost": cost}))


def resources_per_run(method: Callable[[], int], runs: int) -> list[float]:
    """CPU milliseconds and page faults per run, of this process and every process it waited for
    (getrusage: a jail's helper, init and command; bwrap and its command), over ``runs`` runs."""
    import gc
    import resource

    def total() -> tuple[float, int]:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
        return cpu, own.ru_minflt + own.ru_majflt + children.ru_minflt + children.ru_majflt

    method()
    finish_teardowns()
    gc.collect()
    cpu0, faults0 = total()
    for _ in range(runs):
        method()
    finish_teardowns()  # a jail's last teardown steps run off the critical path: count them too
    cpu1, faults1 = total()
    return [(cpu1 - cpu0) * 1000 / runs, (faults1 - faults0) / runs]


def finish_teardowns() -> None:
    try:
        from pytest_jail._host import host
    except ImportError:  # (an older version of the engine)
        return
    host().teardowns.finish(wait=True)


def measure_latency(iterations: int, warmup: int) -> dict[str, list[float]]:
    log(f"latency: {iterations} iterations per method after {warmup} warm-up")
    argv = [str(PYTEST8.python), str(Path(__file__).resolve()), "--latency-worker", str(iterations),
            "--warmup", str(warmup)]
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        sys.exit(f"bench: latency worker failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    found = json.loads(proc.stdout)
    samples = {k: [s * 1000 for s in v] for k, v in found["samples"].items()}
    samples.update({f"cost:{k}": v for k, v in found["cost"].items()})
    return samples


# -- report -----------------------------------------------------------------------------------------


def spread(values: list[float]) -> tuple[float, float, float]:
    """Median, p10, p90."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return statistics.median(values), deciles[0], deciles[-1]


def fmt_overhead(values: list[float]) -> str:
    return f"{statistics.median(values):+.1f} ({min(values):+.1f} … {max(values):+.1f})"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bwrap_version() -> str:
    if not shutil.which("bwrap"):
        return "not installed"
    proc = subprocess.run(["bwrap", "--version"], check=False, capture_output=True, text=True)
    return proc.stdout.strip() or "unknown version"


def print_facts(v8: dict[str, str], v9: dict[str, str], count: int, rounds: int, iterations: int) -> None:
    print("## Machine")
    print()
    print(f"- kernel: {platform.release()} ({platform.machine()})")
    print(f"- CPUs: {os.cpu_count()} × {cpu_model()}")
    print(f"- python: {v8['python']} (venvs in {CACHE})")
    print(f"- venv {PYTEST8.name}: pytest {v8['pytest']}, pytest-forked {v8.get('pytest-forked', '-')}, "
          f"pytest-jail {v8['pytest-jail']}, pluggy {v8['pluggy']}")
    print(f"- venv {PYTEST9.name}: pytest {v9['pytest']}, pytest-jail {v9['pytest-jail']}, "
          f"pluggy {v9['pluggy']}")
    print(f"- bubblewrap: {bwrap_version()}")
    mode = "root mode: jail ids map to host ids 2147352576+" if os.geteuid() == 0 else "rootless mode"
    print(f"- euid: {os.geteuid()} ({mode})")
    print(f"- workload: {count} trivial tests, {rounds} rounds after 1 warm-up; "
          f"latency: {iterations} iterations per method")
    print()


def print_pytest_table(times: dict[str, list[float]], count: int, pytests: dict[str, str]) -> None:
    print(f"## pytest: per-test overhead ({count} tests, `pytest {' '.join(PYTEST_ARGS)}`)")
    print()
    print("| variant | extra args | pytest | wall, median (s) | vs plain (ms/test) | vs forked (ms/test) |")
    print("|---|---|---|---:|---:|---:|")
    for variant in VARIANTS:
        args = f"`{' '.join(variant.args)}`" if variant.args else "—"
        cells = [args, pytests[variant.env.name], f"{statistics.median(times[variant.name]):.2f}"]
        for kind in ("plain", "forked"):
            base = next((b for b in variant.baselines if b.split()[0] == kind), None)
            cells.append(fmt_overhead(overhead_ms(times, variant.name, base, count)) if base else "—")
        print(f"| {variant.name} | " + " | ".join(cells) + " |")
    print()
    print("Overhead cells: median over rounds of (T_variant − T_baseline)/N, same round; "
          "(min … max) over rounds.")
    print()
    for suffix in ("", " -n 2"):
        jailed, forked, plain, floor = (f"{name}{suffix}" for name in ("jail-all", "forked", "plain", "4 forks"))
        ours, theirs, forks = (statistics.median(overhead_ms(times, name, plain, count))
                               for name in (jailed, forked, floor))
        print(f"Per-test overhead of `{jailed}` / `{forked}`: {ours / theirs:.2f}x; of four bare forks of pytest "
              f"(`{floor}`, the floor of a jailed test's design) / `{forked}`: {forks / theirs:.2f}x (medians over "
              "rounds).")
    print()


def print_latency_table(samples: dict[str, list[float]]) -> None:
    labels = {
        "subprocess": '`subprocess.run(["true"])`',
        "bwrap": "`bwrap --unshare-all --ro-bind / / --proc /proc --dev /dev true`",
        "jail": '`Jail().run(["true"])`',
        "jail-unconfined": '`Jail(JailSpec(syscalls="unconfined")).run(["true"])` (no seccomp filter)',
        "jail-limits": '`Jail(JailSpec(memory="256M", cpus=1, pids=64)).run(["true"])`',
        "jail-rootfs": '`Jail(JailSpec(rootfs="busybox")).run(["true"])` (overlay layer)',
        "jail-bridge": '`Jail(JailSpec(net="bridge")).run(["true"])` (veth pair on a bridge)',
        "forks": "two forks of this interpreter, `true` spawned from the second (no jail work: the floor)",
    }
    print("## Latency of one command (in-process, time.perf_counter)")
    print()
    print("| method | median (ms) | p10–p90 (ms) | vs subprocess, median (ms) |")
    print("|---|---:|---:|---:|")
    base = samples["subprocess"]
    for name in ("subprocess", "bwrap", "jail", "jail-unconfined", "jail-limits", "jail-rootfs", "jail-bridge", "forks"):
        if name not in samples:
            continue
        median, p10, p90 = spread(samples[name])
        if len(samples[name]) == len(base):  # paired, same iteration
            shift = statistics.median(a - b for a, b in zip(samples[name], base, strict=True))
        else:  # measured in a loop of its own: medians
            shift = statistics.median(samples[name]) - statistics.median(base)
        delta = "—" if name == "subprocess" else f"{shift:+.2f}"
        print(f"| {labels[name]} | {median:.2f} | {p10:.2f}–{p90:.2f} | {delta} |")
    pairs = [a - b for a, b in zip(samples["jail"], samples["jail-unconfined"], strict=True)]
    print()
    print(f"The system call filter costs {statistics.median(pairs):+.2f} ms per jail (median of paired "
          "differences, default jail minus unconfined, same iteration).")
    if "bwrap" in samples:
        ratio = statistics.median(samples["jail"]) / statistics.median(samples["bwrap"])
        print()
        floor = statistics.median(samples["forks"]) / statistics.median(samples["bwrap"])
        print(f"`Jail().run([\"true\"])` takes {ratio:.2f}x bubblewrap's time; its process chain alone, without "
              f"any jail work (the floor of its design), {floor:.2f}x (medians, same run).")
    if "cost:jail" in samples and "cost:bwrap" in samples:
        (jail_cpu, jail_faults), (bwrap_cpu, bwrap_faults) = samples["cost:jail"], samples["cost:bwrap"]
        print()
        print("| per run (back to back) | CPU (ms) | page faults |")
        print("|---|---:|---:|")
        print(f"| bwrap | {bwrap_cpu:.2f} | {bwrap_faults:.0f} |")
        print(f"| `Jail().run([\"true\"])` | {jail_cpu:.2f} | {jail_faults:.0f} |")
        if "cost:forks" in samples:
            forks_cpu, forks_faults = samples["cost:forks"]
            print(f"| two forks of this interpreter (the floor) | {forks_cpu:.2f} | {forks_faults:.0f} |")
        print()
        print("CPU and faults of the whole process tree (getrusage of this process and of every process it "
              "waited for), per run.")
    if "bwrap" not in samples:
        print()
        print("bwrap row skipped: `bwrap` not found; install it with `apt-get install bubblewrap` "
              "(Debian/Ubuntu) or `dnf install bubblewrap` (Fedora).")
    print()


# -- a real project's suite ------------------------------------------------------------------------


def measure_suite(name: str, rounds: int) -> tuple[dict[str, list[float]], dict[str, str], int]:
    """A popular project's own suite (from its sdist, with its own configuration, as
    scripts/real-suites sets it up, in a venv of its own with pytest 8.4.2 and pytest-forked):
    wall time of plain, ``--forked`` and ``--jail-all`` runs, round-robin."""
    import importlib.machinery
    import importlib.util

    os.environ["PYTEST_JAIL_REAL"] = str(CACHE / "real")  # not the real-suites' pytest 9 venvs
    loader = importlib.machinery.SourceFileLoader("real_suites", str(REPO / "scripts" / "real-suites"))
    spec = importlib.util.spec_from_loader("real_suites", loader)
    assert spec is not None
    real = importlib.util.module_from_spec(spec)
    sys.modules["real_suites"] = real
    loader.exec_module(real)
    project = next((p for p in real.PROJECTS if p.name == name), None)
    if project is None:
        sys.exit(f"bench: --suite {name}: not one of {', '.join(p.name for p in real.PROJECTS)}")
    log(f"suite {name}: fetching and installing (pytest 8.4.2, pytest-forked)")
    source = real.fetch(project)
    venv = real.install(project, source, "pytest==8.4.2")
    subprocess.run([f"{venv}/bin/pip", "install", "-q", "--disable-pip-version-check", "pytest-forked"], check=True)
    # pytest-forked leaves its temporary output files open in pytest's process: under a suite's
    # filterwarnings = error (click's) every test would error on the ResourceWarning.
    forked = ("-p", "pytest_forked", "--forked", "-W", "ignore::pytest.PytestUnraisableExceptionWarning")
    variants = {"plain": (), "forked": forked, "jail-all": ("--jail-all",)}
    times: dict[str, list[float]] = {v: [] for v in variants}
    summaries: dict[str, str] = {}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    env["PATH"] = f"{venv}/bin:{env['PATH']}"
    for round_ in range(rounds):
        for variant in list(variants)[round_ % 3:] + list(variants)[:round_ % 3]:
            log(f"suite {name}: round {round_ + 1}/{rounds}, {variant}")
            argv = [f"{venv}/bin/python", "-m", "pytest", "-p", "no:cacheprovider", "-q", "-p", "no:randomly",
                    *project.args, *variants[variant]]
            start = time.perf_counter()
            done = subprocess.run(argv, cwd=source, env=env, capture_output=True, text=True)
            times[variant].append(time.perf_counter() - start)
            summaries[variant] = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    count = sum(int(w) for w, n in zip(summaries["plain"].split(), summaries["plain"].split()[1:], strict=False)
                if n.rstrip(",") in ("passed", "failed", "skipped", "xfailed") and w.isdigit())
    return times, summaries, count


def print_suite_table(name: str, times: dict[str, list[float]], summaries: dict[str, str], count: int) -> None:
    print(f"## A real suite: {name} ({count} tests, its own configuration, pytest 8.4.2)")
    print()
    print("| variant | wall, median (s) | vs plain (ms/test) | pytest's last line |")
    print("|---|---:|---:|---|")
    plain = statistics.median(times["plain"])
    for variant, runs in times.items():
        extra = "—" if variant == "plain" else f"+{(statistics.median(runs) - plain) / max(count, 1) * 1000:.1f}"
        print(f"| {variant} | {statistics.median(runs):.1f} | {extra} | {summaries[variant]} |")
    forked = statistics.median(times["forked"]) - plain
    jailed = statistics.median(times["jail-all"]) - plain
    print()
    print(f"Per-test overhead of `--jail-all` / `--forked` on this suite: {jailed / forked:.2f}x.")
    print()


# -- main -------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=None, help="timed pytest rounds (default 5, quick 2)")
    parser.add_argument("--tests", type=int, default=None, help="tests per run (default 200, quick 50)")
    parser.add_argument("--quick", action="store_true", help="fast smoke run: fewer tests and rounds")
    parser.add_argument("--suite", default=None,
                        help="also time a real project's suite (a name from scripts/real-suites, e.g. click) "
                        "plain, --forked and --jail-all; fetches its sdist from PyPI once")
    parser.add_argument("--latency-worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=20, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.tests = args.tests or (50 if args.quick else 200)
    args.iterations = 50 if args.quick else 300
    if args.rounds < 1 or args.tests < 1:
        parser.error("--rounds and --tests must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.latency_worker is not None:
        latency_worker(args.latency_worker, args.warmup)
        return
    started = time.perf_counter()
    CACHE.mkdir(parents=True, exist_ok=True)
    for env in (PYTEST8, PYTEST9):
        ensure_env(env)
    facts = (versions(PYTEST8), versions(PYTEST9))
    times = measure_pytest(args.tests, args.rounds)
    samples = measure_latency(args.iterations, 5 if args.quick else 20)
    print_facts(*facts, args.tests, args.rounds, args.iterations)
    pytests = {PYTEST8.name: facts[0]["pytest"], PYTEST9.name: facts[1]["pytest"]}
    print_pytest_table(times, args.tests, pytests)
    print_latency_table(samples)
    if args.suite:
        print_suite_table(args.suite, *measure_suite(args.suite, args.rounds))
    print(f"Total bench time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
