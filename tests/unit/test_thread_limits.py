"""Thread limits of numeric libraries, without processes: the rule and its two sides.

The master side (``limit_threads`` through ``worker_environment``) and the worker side
(``apply_host_share``, what an SSH worker runs at start) on plain dicts;
tests/integration/test_thread_limits.py checks what real workers end up with.
"""

from __future__ import annotations

import os

import pytest

from distexec.cluster import thread_limits
from distexec.cluster.local import worker_environment
from distexec.cluster.manager import default_addprocs_params
from distexec.cluster.thread_limits import (
    HOST_WORKERS_ENV,
    LIMITED_ENV,
    THREAD_LIMIT_VARS,
    apply_host_share,
    cpu_share,
    limit_threads,
    usable_cpu_count,
)

pytestmark = pytest.mark.timeout(10)


def affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def test_joblibs_variables_are_limited():
    assert set(THREAD_LIMIT_VARS) >= {"OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                      "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                                      "NUMEXPR_NUM_THREADS", "BLIS_NUM_THREADS"}


def test_usable_cpus_respect_the_affinity():
    assert 1 <= usable_cpu_count() <= affinity()


def test_the_share_is_cores_divided_by_workers_at_least_one(monkeypatch):
    monkeypatch.setattr(thread_limits, "usable_cpu_count", lambda: 8)
    assert [cpu_share(n) for n in (1, 2, 3, 4, 8, 9, 100)] == [8, 4, 2, 2, 1, 1, 1]
    assert cpu_share(0) == 8


def test_a_cgroup_quota_counts_like_in_loky(monkeypatch, tmp_path):
    cpu_max = tmp_path / "cpu.max"
    real_open = open

    def fake_open(path, *args, **kwargs):
        if path == "/sys/fs/cgroup/cpu.max":
            return real_open(cpu_max, *args, **kwargs)
        raise FileNotFoundError(path)

    monkeypatch.setattr(thread_limits, "open", fake_open, raising=False)
    cpu_max.write_text("150000 100000\n")
    assert thread_limits._cgroup_cpu_quota() == 2        # 1.5 CPUs, rounded up
    cpu_max.write_text("max 100000\n")
    assert thread_limits._cgroup_cpu_quota() is None
    assert usable_cpu_count() == min(os.cpu_count() or 1, affinity())


def limits(env: dict) -> dict:
    return {name: env.get(name) for name in THREAD_LIMIT_VARS}


def test_set_variables_are_kept_and_omp_num_threads_fills_the_rest():
    env = {"OPENBLAS_NUM_THREADS": "5"}
    limit_threads(env, 2)
    assert limits(env) == {**dict.fromkeys(THREAD_LIMIT_VARS, "2"), "OPENBLAS_NUM_THREADS": "5"}
    assert "OPENBLAS_NUM_THREADS" not in env[LIMITED_ENV].split()
    assert "OMP_NUM_THREADS" in env[LIMITED_ENV].split()
    env = {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "7"}
    limit_threads(env, 2)
    assert limits(env) == {**dict.fromkeys(THREAD_LIMIT_VARS, "3"), "MKL_NUM_THREADS": "7"}
    env = {"OMP_NUM_THREADS": "4,2"}  # nested OpenMP levels: not one number to copy
    limit_threads(env, 2)
    assert env["OMP_NUM_THREADS"] == "4,2" and env["MKL_NUM_THREADS"] == "2"
    env = dict.fromkeys(THREAD_LIMIT_VARS, "1")  # all set by the user: nothing is distexec's
    limit_threads(env, 2)
    assert LIMITED_ENV not in env


def test_worker_environment_master_env_then_env_then_the_limit(monkeypatch):
    for name in THREAD_LIMIT_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(LIMITED_ENV, raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "6")
    monkeypatch.setenv(HOST_WORKERS_ENV, "3")  # never passed on by the master
    params = default_addprocs_params()
    env = worker_environment({**params, "env": {"NUMEXPR_NUM_THREADS": "9"}}, 2)
    assert limits(env) == {**dict.fromkeys(THREAD_LIMIT_VARS, "2"), "MKL_NUM_THREADS": "6",
                           "NUMEXPR_NUM_THREADS": "9"}
    assert HOST_WORKERS_ENV not in env
    threaded = worker_environment({**params, "enable_threaded_blas": True}, 2)
    assert "OMP_NUM_THREADS" not in threaded and threaded["MKL_NUM_THREADS"] == "6"
    assert worker_environment(params)["OMP_NUM_THREADS"] == "1"  # the default: one thread


def test_the_worker_side_takes_its_hosts_count_out_and_limits_what_is_unset(monkeypatch):
    monkeypatch.setattr(thread_limits, "usable_cpu_count", lambda: 8)
    monkeypatch.delenv(LIMITED_ENV, raising=False)
    env = {HOST_WORKERS_ENV: "2", "OMP_NUM_THREADS": "1"}
    apply_host_share(env)
    assert limits(env) == dict.fromkeys(THREAD_LIMIT_VARS, "1")  # the login shell's OMP wins
    assert HOST_WORKERS_ENV not in env
    env = {HOST_WORKERS_ENV: "3"}
    apply_host_share(env)
    assert limits(env) == dict.fromkeys(THREAD_LIMIT_VARS, "2")
    env = {HOST_WORKERS_ENV: "auto"}  # one worker per CPU
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    apply_host_share(env)
    assert limits(env) == dict.fromkeys(THREAD_LIMIT_VARS, "1")
    env = {"PATH": "/bin"}  # not told (enable_threaded_blas, or not an SSH worker): nothing
    apply_host_share(env)
    assert env == {"PATH": "/bin"}


def test_a_workers_own_workers_share_its_limit_and_keep_what_the_user_set(monkeypatch):
    """In a worker (an executor inside a task): the limits distexec set for it are not the
    user's; its workers divide its own limit among them."""
    for name in THREAD_LIMIT_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(thread_limits, "usable_cpu_count", lambda: 8)
    worker = {"MKL_NUM_THREADS": "3"}  # the user's, set on the master
    limit_threads(worker, 4)           # what the master gave this worker: 8 cores, 2 workers
    for name, value in worker.items():
        monkeypatch.setenv(name, value)
    assert cpu_share(2) == 2 and cpu_share(8) == 1
    env = worker_environment(default_addprocs_params(), cpu_share(2))
    assert limits(env) == {**dict.fromkeys(THREAD_LIMIT_VARS, "2"), "MKL_NUM_THREADS": "3"}
    kept = worker_environment({**default_addprocs_params(), "enable_threaded_blas": True}, 2)
    assert limits(kept) == limits(worker)  # left alone
