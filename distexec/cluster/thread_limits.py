"""Thread limits for a worker's numeric libraries (BLAS, OpenMP, numexpr, numba).

Owns the rule that keeps the workers of one host from oversubscribing its cores, joblib's
(``MAX_NUM_THREADS_VARS`` of its process backends): every worker may use
``max(1, cores // workers on the host)`` threads, through the variables below, which the
libraries read once, when they load. Imports nothing from distexec.

- A variable already set is never changed: the master's environment (local and Slurm
  workers inherit it), ``env=`` of ``addprocs``, the host's login environment (SSH). When
  ``OMP_NUM_THREADS`` is set, the unset others take its value: OpenBLAS and MKL read their
  own variable before it, so a computed value there would override the user's.
- ``enable_threaded_blas=True`` sets nothing.
- A worker that starts workers of its own (an executor inside a task) shares its own limit
  among them: the values distexec set for it are not the user's (``LIMITED_ENV`` names them).
- "Cores" are those this process may run on: its CPU affinity and the cgroup CPU quota of a
  container, as loky's ``cpu_count`` counts them.

Who counts the workers on a host: local workers, the master (all its local workers after the
launch); SSH workers, the worker itself at start (the host's cores are known only there), told
the host's count in ``HOST_WORKERS_ENV``; Slurm workers, Slurm (the CPUs of one task).
"""

from __future__ import annotations

import math
import os
from collections.abc import MutableMapping

THREAD_LIMIT_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                     "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",
                     "NUMBA_NUM_THREADS")
"""The variables limited: joblib's list (OpenMP, OpenBLAS, MKL, BLIS, Apple Accelerate,
numexpr, numba)."""

HOST_WORKERS_ENV = "DISTEXEC_HOST_WORKERS"
"""Tells a starting worker how many workers share its host (an int, or ``auto``: one per
CPU); the worker removes it and limits the variables still unset (``apply_host_share``)."""


LIMITED_ENV = "DISTEXEC_THREADS_LIMITED"
"""The variables distexec set in a worker's environment, space-separated: not the user's,
so the workers that worker starts get their share of its limit instead of inheriting it."""


def usable_cpu_count() -> int:
    """CPUs this process may use: the least of the CPU count, the affinity and the cgroup
    quota (rounded up), at least 1."""
    count = os.cpu_count() or 1
    try:
        count = min(count, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform (macOS)
        pass
    quota = _cgroup_cpu_quota()
    return max(1, min(count, quota) if quota is not None else count)


def _cgroup_cpu_quota() -> int | None:
    """CPUs a cgroup's CPU bandwidth limit allows (v2 ``cpu.max``, v1 ``cfs_quota``); None
    without a limit."""
    for path, period_path in (("/sys/fs/cgroup/cpu.max", None),
                              ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us",
                               "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            with open(path) as f:
                fields = f.read().split()
            if period_path is not None:
                with open(period_path) as f:
                    fields += f.read().split()
            quota, period = int(fields[0]), int(fields[1])  # "max 100000": ValueError
        except (OSError, ValueError, IndexError):
            continue
        if quota > 0 and period > 0:
            return math.ceil(quota / period)
    return None


def cpu_share(workers: int) -> int:
    """Threads per worker when ``workers`` workers share this host: ``cores // workers``,
    at least 1; in a worker whose limit distexec set, that limit stands for the cores."""
    cores = usable_cpu_count()
    names = os.environ.get(LIMITED_ENV, "").split()
    own = os.environ.get(names[0], "") if names else ""
    if own.isdigit() and int(own) > 0:
        cores = min(cores, int(own))
    return max(1, cores // max(1, workers))


def forget_own_limits(env: MutableMapping[str, str]) -> None:
    """Remove from ``env`` (a copy of a worker's environment) the variables distexec set for
    that worker, keeping those the user set."""
    for name in env.pop(LIMITED_ENV, "").split():
        env.pop(name, None)


def limit_threads(env: MutableMapping[str, str], limit: int) -> None:
    """Set every variable of ``THREAD_LIMIT_VARS`` that ``env`` lacks: to ``limit``, or to
    ``OMP_NUM_THREADS`` when ``env`` sets that to a number; ``LIMITED_ENV`` names them."""
    omp = env.get("OMP_NUM_THREADS", "").strip()
    value = omp if omp.isdigit() and int(omp) > 0 else str(limit)
    unset = [name for name in THREAD_LIMIT_VARS if name not in env]
    for name in unset:
        env[name] = value
    if unset:
        env[LIMITED_ENV] = " ".join(unset)


def apply_host_share(env: MutableMapping[str, str] | None = None) -> None:
    """Worker side: take ``HOST_WORKERS_ENV`` out of ``env`` (``os.environ``) and, when it
    was there, limit the variables still unset to this host's share of its cores.

    Runs first thing in ``distexec worker``, before anything can load a numeric library.
    """
    env = os.environ if env is None else env
    value = env.pop(HOST_WORKERS_ENV, None)
    if value is None:
        return
    try:
        workers = (os.cpu_count() or 1) if value == "auto" else int(value)
    except ValueError:  # not from distexec: keep the conservative limit
        workers = usable_cpu_count()
    limit_threads(env, cpu_share(workers))
