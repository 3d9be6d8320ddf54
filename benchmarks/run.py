"""Run distexec's benchmark suite beside its peers; print a table of medians.

    python benchmarks/run.py                  # every case, every backend, 3 repetitions
    python benchmarks/run.py --quick          # smaller sizes, 1 repetition (~2 minutes)
    python benchmarks/run.py --cases latency,submit --backends distexec,pp-fork --json out.json
    python benchmarks/run.py --cases scale --workers 8,32,128   # many workers on few cores
    python benchmarks/run.py --cases pingpong,latency,remotecall --awake  # CPUs that never sleep

Each (case, backend) runs in a fresh ``python -m benchmarks.child`` process, so no state
leaks between backends; the order of the backends rotates between repetitions. Installs
nothing: the peers come from the ``bench`` extra (``pip install -e '.[bench]'``); a backend
that cannot be imported shows as an error in its cells. Benchmarks are not tests: nothing
here fails on timing. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.backends import BACKENDS, LABELS  # noqa: E402
from benchmarks.cases import CASE_METRICS, CASES, METRICS, PER_WORKER_COUNT  # noqa: E402
from benchmarks.child import MARKER  # noqa: E402
from benchmarks.scale import QUICK_WORKER_COUNTS, WORKER_COUNTS, scale_table  # noqa: E402

COLUMNS = (*BACKENDS, "machine")

#: table rows whose last column shows the machine's matching limit
LIMIT_FOR = {"latency_us": "pingpong_us", "latency_p99_us": "pingpong_p99_us",
             "latency_script_us": "pingpong_us", "latency_script_p99_us": "pingpong_p99_us",
             "remotecall_fetch_us": "pingpong_us", "remotecall_fetch_p99_us": "pingpong_p99_us",
             "bandwidth_MBps": "tcp_MBps"}

ROW_LABELS = {
    "startup_s": "startup: construct → first result",
    "latency_us": "latency: submit(noop).result(), median",
    "latency_p99_us": "latency, p99",
    "latency_master_cpu_us": "latency: master CPU per call",
    "latency_worker_cpu_us": "latency: worker CPU per call",
    "submit_per_s": "throughput: submits then results",
    "submit_master_cpu_us": "throughput: master CPU per task",
    "submit_worker_cpu_us": "throughput: worker CPU per task",
    "latency_script_us": "latency, a noop defined in the script (__main__), median",
    "latency_script_p99_us": "latency, the script's noop, p99",
    "latency_script_master_cpu_us": "latency, the script's noop: master CPU per call",
    "latency_script_worker_cpu_us": "latency, the script's noop: worker CPU per call",
    "submit_script_per_s": "throughput, the script's noop: submits then results",
    "submit_script_master_cpu_us": "throughput, the script's noop: master CPU per task",
    "submit_script_worker_cpu_us": "throughput, the script's noop: worker CPU per task",
    "map1_per_s": "map, chunksize 1",
    "map100_per_s": "map, chunksize 100",
    "map1000_per_s": "map, chunksize 1000",
    "bandwidth_MBps": "64 MiB array there and back",
    "bandwidth_socket_MBps": "64 MiB there and back, DISTEXEC_SHM=0 (socket)",
    "sleep_efficiency": "sleep efficiency: 200 × 10 ms, ideal/measured",
    "cpu_efficiency": "CPU efficiency: 200 × 10 ms CPU, ideal/measured",
    "cpu_master_cpu_us": "CPU efficiency: master CPU per task",
    "cpu_worker_cpu_us": "CPU efficiency: worker CPU per task beyond its 10 ms",
    "closure_s": "closure: lambda capturing 10 MiB, 100 calls",
    "closure_cached_pmap_s": "closure via CachingPool: pmap, 100 items",
    "closure_cached_fetch_s": "closure via CachingPool: 100 × remotecall_fetch",
    "remotecall_fetch_us": "remotecall_fetch(noop, 2), median",
    "remotecall_fetch_p99_us": "remotecall_fetch, p99",
    "pingpong_us": "loopback TCP ping-pong, 8 bytes, median",
    "pingpong_p99_us": "loopback TCP ping-pong, p99",
    "pingpong_unix_us": "Unix-socket ping-pong (master ↔ local worker link), median",
    "pingpong_unix_p99_us": "Unix-socket ping-pong, p99",
    "tcp_MBps": "raw TCP, 64 MiB there and back",
    "memcpy_MBps": "memcpy (numpy copy of 64 MiB)",
    "joblib_call_ms": "joblib per call: Parallel(n_jobs=2), 8 tiny tasks",
    "sklearn_cv_ms": "sklearn cross_val_score(n_jobs=2), iris, 5 folds",
}


# -- running ---------------------------------------------------------------------------------
def cpu_busy(interval: float = 0.3) -> float:
    """Fraction of the machine's CPU time spent busy over ``interval`` (other processes)."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except OSError:
        return float("nan")
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet(threshold: float, patience: float) -> float:
    """Wait (at most ``patience`` s) until other processes use less than ``threshold``."""
    deadline = time.monotonic() + patience
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy(1.0)
    return busy


def run_one(case: str, backend: str, quick: bool, timeout: float,
            workers: int | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "benchmarks.child", case, backend, *(["--quick"] if quick else []),
           *(["--workers", str(workers)] if workers else [])]
    t0 = time.perf_counter()
    # its own process group: a run that times out is killed with every worker it started
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": timeout}
    finally:
        if proc.poll() is None:  # Ctrl-C
            os.killpg(proc.pid, signal.SIGKILL)
    wall = time.perf_counter() - t0
    for line in reversed(out.splitlines()):
        if line.startswith(MARKER):
            return {**json.loads(line[len(MARKER):]), "wall_s": round(wall, 2)}
    tail = (err.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail}", "wall_s": round(wall, 2)}


def plan(cases, backends, workers=()):
    """(case, its backends, worker count or None), in order: a scale case once per count."""
    return [(c, [b for b in CASES[c][1] if b in backends or b == "machine"], n)
            for c in cases for n in (workers if c in PER_WORKER_COUNT else (None,))]


class KeptAwake:
    """One busy process per CPU at SCHED_IDLE, the lowest priority there is: it runs only
    when nothing else wants the CPU, so the CPUs never enter their idle state.

    A thread woken on an idle CPU waits for that CPU to leave its idle state, which on a
    virtual machine is a trip through the hypervisor: this machine's ping-pong takes several
    times longer idle than busy. ``--awake`` shows how the latency cases fare where wake-ups
    are quick (a busy host, bare metal with ``idle=poll``), beside the same cases without it.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._procs: list[subprocess.Popen] = []

    def __enter__(self):
        if self.enabled:
            spin = ("import os; os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
                    "while True: pass")
            self._procs = [subprocess.Popen([sys.executable, "-c", spin])
                           for _ in range(os.cpu_count() or 1)]
        return self

    def __exit__(self, *exc):
        for proc in self._procs:
            proc.kill()
            proc.wait()
        self._procs = []


def run_all(args) -> list[dict]:
    runs = []
    for rep in range(args.reps):
        for case, case_backends, n in plan(args.cases, args.backends, args.workers):
            if n is not None and rep > 0 and not args.cases_named:
                continue  # the scale case is long: once per full run, unless asked for by name
            k = rep % max(1, len(case_backends))
            label = case if n is None else f"{case}@{n}"  # a scale case's runs: "scale@32"
            for backend in case_backends[k:] + case_backends[:k]:  # rotate: alternate the order
                busy = (wait_quiet(args.quiet, args.patience) if args.quiet < 1 else cpu_busy(0.1))
                with KeptAwake(args.awake):
                    result = run_one(case, backend, args.quick, args.timeout, n)
                if n is not None:  # one row per worker count: "start_s@32"
                    result["metrics"] = {f"{m}@{n}": v for m, v in result.get("metrics", {}).items()}
                result.update(case=label, backend=backend, rep=rep, busy_before=round(busy, 2))
                runs.append(result)
                shown = result.get("error") or result.get("info", {}).get("skipped") or "  ".join(
                    f"{k}={v:.4g}" for k, v in result["metrics"].items())
                print(f"[{rep + 1}/{args.reps}] {label:<14} {backend:<14} {shown}  "
                      f"({result['wall_s']} s, cpu busy before {busy:.0%})",
                      file=sys.stderr, flush=True)
    return runs


# -- reporting -------------------------------------------------------------------------------
def medians(runs: list[dict]) -> dict:
    """(metric, backend) -> median over repetitions."""
    values: dict = {}
    for run in runs:
        for metric, value in run.get("metrics", {}).items():
            values.setdefault((metric, run["backend"]), []).append(value)
    return {key: statistics.median(v) for key, v in values.items()}


def errors(runs: list[dict]) -> dict:
    return {(r["case"], r["backend"]): r["error"] for r in runs if "error" in r}


def skipped(runs: list[dict]) -> dict:
    """(case, backend) -> why the case measured nothing (a missing optional package)."""
    return {(r["case"], r["backend"]): r["info"]["skipped"] for r in runs
            if "skipped" in r.get("info", {})}


def fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "–"
    _unit, _higher, scale, form = METRICS[metric]
    return form.format(value * scale)


def table(med: dict, errs: dict, runs: list[dict]) -> str:
    metric_case = {m: c for c, ms in CASE_METRICS.items() for m in ms}
    ran = {(r["case"], r["backend"]) for r in runs if r["case"] in CASES}
    rows = [m for m in METRICS if any(metric_case[m] == c for c, _b in ran)]
    cols = [c for c in COLUMNS if any(b == c for _c, b in ran)]
    head = ["case", "unit", *(LABELS[c] for c in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in rows:
        unit, higher, _scale, _form = METRICS[m]
        cells = [ROW_LABELS.get(m, m), f"{unit} {'↑' if higher else '↓'}"]
        base = med.get((m, "distexec"))
        for c in cols:
            if c == "machine" and m in LIMIT_FOR:
                v = med.get((LIMIT_FOR[m], "machine"))
                cells.append(fmt(LIMIT_FOR[m], v) if v is not None else "")
                continue
            v = med.get((m, c))
            if v is None:
                err = errs.get((metric_case.get(m), c))
                cells.append("error" if err else "")
            elif c not in ("distexec", "machine") and base:
                cells.append(f"{fmt(m, v)} ({v / base:.2f}×)")
            else:
                cells.append(fmt(m, v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _best(med, metric_names, backends):
    vals = [(med[(m, b)], m, b) for m in metric_names for b in backends if (m, b) in med]
    return max(vals) if vals else None


def targets(med: dict) -> str:
    """Issue 6's targets, each met or not, with the gap."""
    g = med.get
    rows = []

    def add(case, target_text, value, target, higher, shown, note=""):
        if value is None or target is None:
            return  # not measured in this run
        met = value >= target if higher else value <= target
        gap = note if met else (f"needs {target / value:.2f}× more" if higher
                                else f"needs {value / target:.2f}× less")
        rows.append(f"| {case} | {target_text} | {shown} | {'met' if met else 'not met'} | {gap} |")

    pp = ("pp-fork", "pp-forkserver")
    lat, ping = g(("latency_us", "distexec")), g(("pingpong_us", "machine"))
    pp_lat = min((g(("latency_us", b)) for b in pp if g(("latency_us", b))), default=None)
    lat_target = min(t for t in (ping and 1.5 * ping, pp_lat and 0.5 * pp_lat) if t) \
        if (ping or pp_lat) else None
    add("latency", f"≤ 1.5 × ping-pong ({fmt('pingpong_us', ping)} µs) and ≤ 0.5 × best "
        f"ProcessPool ({fmt('latency_us', pp_lat)} µs): ≤ {fmt('latency_us', lat_target)} µs",
        lat, lat_target, False, f"{fmt('latency_us', lat)} µs")

    sub = g(("submit_per_s", "distexec"))
    pp_sub = max((g(("submit_per_s", b)) for b in pp if g(("submit_per_s", b))), default=None)
    add("submit throughput", f"≥ 2.5 × best ProcessPool ({fmt('submit_per_s', pp_sub)}k/s)",
        sub, pp_sub and 2.5 * pp_sub, True, f"{fmt('submit_per_s', sub)}k/s")

    maps = ("map1_per_s", "map100_per_s", "map1000_per_s")
    d_map, pp_map = _best(med, maps, ("distexec",)), _best(med, maps, pp)
    add("map, best chunksize",
        "≥ 1.3 × best ProcessPool" + (f" ({pp_map[0] / 1e6:.2f}M/s, {pp_map[1][3:-6]}, {pp_map[2]})"
                                      if pp_map else ""),
        d_map and d_map[0], pp_map and 1.3 * pp_map[0], True,
        f"{d_map[0] / 1e6:.2f}M/s ({d_map[1][3:-6]})" if d_map else "–")

    bw, tcp = g(("bandwidth_MBps", "distexec")), g(("tcp_MBps", "machine"))
    add("64 MiB there and back", f"≥ 0.7 × raw TCP ({fmt('tcp_MBps', tcp)} MB/s)",
        bw, tcp and 0.7 * tcp, True, f"{fmt('bandwidth_MBps', bw)} MB/s")

    sock, mem = g(("bandwidth_socket_MBps", "distexec")), g(("memcpy_MBps", "machine"))
    shm_target = max((t for t in (sock and 2 * sock, mem and 0.5 * mem) if t), default=None)
    add("64 MiB there and back, shared memory",
        f"≥ 2 × DISTEXEC_SHM=0 ({fmt('bandwidth_MBps', sock)} MB/s) and ≥ 0.5 × memcpy "
        f"({fmt('memcpy_MBps', mem)} MB/s)", bw, shm_target, True,
        f"{fmt('bandwidth_MBps', bw)} MB/s" + (f" ({bw / sock:.2f} × socket, "
                                                f"{bw / mem:.2f} × memcpy)"
                                                if bw and sock and mem else ""))

    st = g(("startup_s", "distexec"))
    add("startup", "≤ 0.10 s", st, 0.10, False, f"{fmt('startup_s', st)} s")

    sl, cpu = g(("sleep_efficiency", "distexec")), g(("cpu_efficiency", "distexec"))
    note = ""
    if sl is not None and sl > 1.0:  # more than one task at a time on a worker
        note = "above 1: a worker runs two of the tasks at once (threads)" + (
            f"; with CPU work instead: {fmt('cpu_efficiency', cpu)}" if cpu is not None else "")
    add("sleep efficiency", "≥ 0.97", sl, 0.97, True, fmt("sleep_efficiency", sl), note)

    cl = g(("closure_s", "distexec"))
    add("closure 10 MB × 100", "≤ ray (1.35 s in issue 6; ray is not measured here)",
        cl, 1.35, False, f"{fmt('closure_s', cl)} s")
    for m, how in (("closure_cached_pmap_s", "pmap"), ("closure_cached_fetch_s", "remotecall_fetch")):
        v = g((m, "distexec"))
        add(f"closure with CachingPool ({how})", "≤ 0.1 × ray: 0.135 s", v, 0.135, False,
            f"{fmt(m, v)} s")
    head = ["| target | distexec target | distexec | | gap |", "|---|---|---|---|---|"]
    return "\n".join(head + rows)


def joblib_targets(med: dict) -> str | None:
    """The joblib backend against loky's, same run: per call ≤ 2×, cross_val_score ≤ 1.3×."""
    rows = []
    for metric, case, limit in (("joblib_call_ms", "joblib per call", 2.0),
                                ("sklearn_cv_ms", "sklearn cross_val_score(n_jobs=2)", 1.3)):
        ours, loky = med.get((metric, "distexec")), med.get((metric, "loky"))
        if ours is None or loky is None:
            continue
        ratio = ours / loky
        met = ratio <= limit
        rows.append(f"| {case} | ≤ {limit:g} × loky ({fmt(metric, loky)} ms) | "
                    f"{fmt(metric, ours)} ms ({ratio:.2f} × loky) | "
                    f"{'met' if met else 'not met'} | "
                    f"{'' if met else f'needs {ratio / limit:.2f}× less'} |")
    if not rows:
        return None
    head = ["| target | distexec target | distexec | | gap |", "|---|---|---|---|---|"]
    return "\n".join(head + rows)


def machine() -> dict:
    from importlib import metadata
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    versions = {}
    for pkg in ("distexec", "cloudpickle", "numpy", "loky", "dask", "distributed"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "packages": versions, "commit": commit or None}


def compile_distexec() -> None:
    """Write distexec's bytecode, as ``pip install`` does for the peers: an editable install
    has none, and with ``PYTHONDONTWRITEBYTECODE`` set every worker would compile it again
    at start."""
    import compileall

    import distexec
    compileall.compile_dir(os.path.dirname(distexec.__file__), quiet=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 repetition")
    parser.add_argument("--reps", type=int, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--cases", help=f"comma-separated, of: {','.join(CASES)}")
    parser.add_argument("--backends", help=f"comma-separated, of: {','.join(BACKENDS)}")
    parser.add_argument("--json", metavar="FILE", help="write every raw result here")
    parser.add_argument("--load", metavar="FILE",
                        help="run nothing: print the tables of a file written by --json")
    parser.add_argument("--workers", metavar="N,N,...",
                        help="worker counts of the scale case (default "
                             f"{','.join(map(str, WORKER_COUNTS))}; "
                             f"{','.join(map(str, QUICK_WORKER_COUNTS))} with --quick)")
    parser.add_argument("--timeout", type=float, default=180.0, help="per run, seconds")
    parser.add_argument("--quiet", type=float, default=1.0, metavar="FRACTION",
                        help="before each run, wait until other processes keep the CPU busy "
                             "less than FRACTION (e.g. 0.1); default: do not wait")
    parser.add_argument("--patience", type=float, default=30.0,
                        help="longest wait for --quiet, seconds")
    parser.add_argument("--awake", action="store_true",
                        help="keep every CPU out of its idle state during each run (a busy "
                             "process per CPU at the lowest priority, SCHED_IDLE): latency "
                             "where waking a thread is quick")
    args = parser.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    args.cases_named = bool(args.cases)
    args.cases = args.cases.split(",") if args.cases else list(CASES)
    args.backends = args.backends.split(",") if args.backends else list(BACKENDS)
    args.workers = ([int(n) for n in args.workers.split(",")] if args.workers
                    else list(QUICK_WORKER_COUNTS if args.quick else WORKER_COUNTS))
    for c in args.cases:
        if c not in CASES:
            parser.error(f"unknown case {c!r}")
    for b in args.backends:
        if b not in BACKENDS:
            parser.error(f"unknown backend {b!r}")

    if args.load:
        with open(args.load) as f:
            saved = json.load(f)
        info, runs, elapsed = saved["machine"], saved["runs"], saved["elapsed_s"]
        args.quick, args.reps, args.json = saved["quick"], saved["reps"], None
        args.awake = saved.get("awake", False)
        args.backends = sorted({r["backend"] for r in runs})
        args.workers = saved.get("workers", args.workers)
    else:
        compile_distexec()
        info = machine()
        t0 = time.perf_counter()
        runs = run_all(args)
        elapsed = time.perf_counter() - t0
    med, errs = medians(runs), errors(runs)
    pk = info["packages"]
    print(f"\n{info['cpu']}, {info['cores']} cores; Python {info['python']}; "
          + ", ".join(f"{k} {v}" for k, v in pk.items() if v)
          + f"; commit {info['commit'] or 'unknown'}; {args.reps} repetitions"
          + (" (--quick)" if args.quick else "")
          + ("; CPUs kept awake (--awake)" if getattr(args, "awake", False) else "")
          + f", {elapsed:.0f} s\n")
    print("Medians; in parentheses each peer's value / distexec's (↑: higher is better, "
          "↓: lower is better).\n")
    if any(r["case"] in CASES for r in runs):
        print(table(med, errs, runs))
    scaled = scale_table(med, errs, [c for c in COLUMNS if c in args.backends], LABELS,
                         args.workers)
    if scaled is not None:
        print(f"\nMany workers on {info['cores']} cores (the scale case, benchmarks/scale.py; "
              "medians, each peer's value / distexec's):\n")
        print(scaled)
    if "distexec" in args.backends:
        issue6 = targets(med)
        if issue6.count("\n") > 1:  # a row beyond the header: some of its cases ran
            print("\nIssue 6's targets:\n")
            print(issue6)
        if (joblib_table := joblib_targets(med)) is not None:
            print("\nThe joblib backend's targets (against loky's, same run):\n")
            print(joblib_table)
    for (case, backend), err in sorted(errs.items()):
        print(f"\nerror: {case} on {backend}: {err}")
    for (case, backend), why in sorted(skipped(runs).items()):
        print(f"\nskipped: {case} on {backend}: {why}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "quick": args.quick, "reps": args.reps,
                       "awake": args.awake,
                       "workers": args.workers,
                       "elapsed_s": round(elapsed, 1), "runs": runs,
                       "medians": [{"metric": m, "backend": b, "value": v}
                                   for (m, b), v in sorted(med.items())]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
