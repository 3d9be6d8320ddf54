"""Thread limits of numeric libraries on real local workers (joblib's rule).

Each worker's ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``, ... is
this host's cores divided by the master's local workers, at least 1; a value the user set
(the master's environment, ``env=``) wins; ``enable_threaded_blas=True`` sets nothing. The
expected values are computed from this machine's CPUs, never written down.
"""

from __future__ import annotations

import os

import pytest

import distexec as d
from distexec.cluster.thread_limits import HOST_WORKERS_ENV, LIMITED_ENV, THREAD_LIMIT_VARS

pytestmark = pytest.mark.timeout(60)


def cores() -> int:
    """This process's CPUs (its affinity), the way a user would count them."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def share(workers: int) -> str:
    return str(max(1, cores() // workers))


def limits() -> dict:
    """Run on a worker: its thread-limit variables (None when unset)."""
    return {name: os.environ.get(name) for name in (*THREAD_LIMIT_VARS, HOST_WORKERS_ENV)}


def expected(value: str | None, **overrides) -> dict:
    return {**dict.fromkeys(THREAD_LIMIT_VARS, value), HOST_WORKERS_ENV: None, **overrides}


@pytest.fixture(autouse=True)
def unset_limits(monkeypatch, no_workers):
    """No thread limit in the master's environment, and no other workers on this host."""
    for name in (*THREAD_LIMIT_VARS, HOST_WORKERS_ENV, LIMITED_ENV):
        monkeypatch.delenv(name, raising=False)


def test_one_worker_may_use_every_core(add_workers):
    (pid,) = add_workers(1)
    assert d.remotecall_fetch(limits, pid) == expected(share(1))


def test_workers_launched_together_share_the_cores(add_workers):
    pids = add_workers(3)
    assert [d.remotecall_fetch(limits, p) for p in pids] == [expected(share(3))] * 3


def test_a_later_launch_counts_the_workers_already_here(add_workers):
    (first,) = add_workers(1)
    (second,) = add_workers(1)
    assert d.remotecall_fetch(limits, first) == expected(share(1))   # set when it started
    assert d.remotecall_fetch(limits, second) == expected(share(2))
    d.rmprocs([first, second], waitfor=20)
    (third,) = add_workers(1)  # the removed ones no longer count
    assert d.remotecall_fetch(limits, third) == expected(share(1))


def test_omp_num_threads_of_the_master_wins_and_fills_the_others(add_workers, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("MKL_NUM_THREADS", "5")
    (pid,) = add_workers(1)
    assert d.remotecall_fetch(limits, pid) == expected("3", MKL_NUM_THREADS="5")


def test_env_wins(add_workers):
    (pid,) = add_workers(1, env={"OMP_NUM_THREADS": "3"})
    assert d.remotecall_fetch(limits, pid) == expected("3")
    (pid,) = add_workers(1, env={"OPENBLAS_NUM_THREADS": "4"})
    assert d.remotecall_fetch(limits, pid) == expected(share(2), OPENBLAS_NUM_THREADS="4")


def test_enable_threaded_blas_sets_nothing(add_workers):
    (pid,) = add_workers(1, enable_threaded_blas=True)
    assert d.remotecall_fetch(limits, pid) == expected(None)


def test_told_its_hosts_count_a_worker_limits_itself(add_workers):
    """The worker side of SSH launches (the host's cores are known only there), run here."""
    (pid,) = add_workers(1, enable_threaded_blas=True, env={HOST_WORKERS_ENV: "2",
                                                             "NUMBA_NUM_THREADS": "7"})
    assert d.remotecall_fetch(limits, pid) == expected(share(2), NUMBA_NUM_THREADS="7")


def test_executor_and_pool_workers_share_the_cores():
    with d.DistributedExecutor(2) as ex:
        assert list(ex.map(lambda _: limits(), range(2))) == [expected(share(2))] * 2
    with d.Pool(2) as pool:
        assert pool.apply(limits) == expected(share(2))


def effective_blas_threads() -> list[int]:
    """Run on a worker: what the BLAS libraries numpy loaded will use (threadpoolctl)."""
    import numpy  # noqa: F401  (loads its BLAS)
    import threadpoolctl
    return [info["num_threads"] for info in threadpoolctl.threadpool_info()
            if info["user_api"] == "blas"]


def test_numpys_blas_uses_the_limit(add_workers):
    pytest.importorskip("numpy", reason="numpy is not installed")
    pytest.importorskip("threadpoolctl", reason="threadpoolctl is not installed")
    (pid,) = add_workers(1)
    found = d.remotecall_fetch(effective_blas_threads, pid)
    assert found and set(found) == {int(share(1))}, found
    (other,) = add_workers(1)
    found = d.remotecall_fetch(effective_blas_threads, other)
    assert found and set(found) == {int(share(2))}, found
