"""dask with a DistributedExecutor as its scheduler, used the way dask's users use it.

dask accepts any ``concurrent.futures.Executor`` as ``scheduler=`` (``dask.compute``,
``.compute()``, ``dask.config.set``): it submits its task batches through ``submit`` and reads
``_max_workers``. No distexec code is involved beyond the executor itself. Checked here with
dask.array, dask.bag and dask.delayed workloads on real workers, errors included.
"""

from __future__ import annotations

import os

import pytest

import distexec
from distexec import DistributedExecutor

# The leak checks of tests/ (no worker process, no non-daemon thread left after a test).
from tests.conftest import no_leaked_processes, no_leaked_threads  # noqa: F401

dask = pytest.importorskip("dask", reason="dask is not installed (the `test` extra has it)")
np = pytest.importorskip("numpy", reason="numpy is not installed (the `test` extra has it)")
da = pytest.importorskip("dask.array", reason="dask[array] is not installed")
db = pytest.importorskip("dask.bag", reason="dask[bag] is not installed")

pytestmark = pytest.mark.timeout(120)


class Boom(Exception):
    """A user exception type the workers import from this module."""


def explode_on(x, bad):
    if x == bad:
        raise Boom(f"bad item {x}")
    return x


@pytest.fixture(scope="module")
def executor():
    """Two workers for the whole module, with dask imported on them; removed at its end.

    The import up front works around a distexec bug, not a dask one: a worker unpickles two
    incoming calls on two threads at once, and when one of them imports the package
    ``dask.bag`` while the other imports its submodule ``dask.bag.core`` (the two import each
    other), CPython's import machinery fails both with "cannot import name ... from partially
    initialized module" (about 1 run in 20 here). Calls must be unpickled one import at a time.
    """
    ex = DistributedExecutor(2)
    distexec.remotecall_eval("import dask.array, dask.bag", ex.workers())
    yield ex
    ex.shutdown(wait=True)


@pytest.fixture(scope="module")
def worker_os_pids(executor):
    return {distexec.remotecall_fetch(os.getpid, p) for p in executor.workers()}


# -- dask.array --------------------------------------------------------------------------------
def test_array_sum_and_mean_equal_numpy(executor):
    data = np.random.default_rng(0).random((1000, 1200))
    x = da.from_array(data, chunks=(250, 300))
    total, mean = dask.compute(x.sum(), x.mean(), scheduler=executor)
    assert total == pytest.approx(data.sum())
    assert mean == pytest.approx(data.mean())


def test_random_array_same_as_the_local_scheduler(executor):
    x = da.random.default_rng(42).random((2000, 2000), chunks=(500, 500))
    assert x.sum().compute(scheduler=executor) == pytest.approx(
        x.sum().compute(scheduler="sync"))
    col_means = x.mean(axis=0).compute(scheduler=executor)
    np.testing.assert_allclose(col_means, x.mean(axis=0).compute(scheduler="sync"))


def test_config_set_scheduler(executor):
    data = np.arange(10_000, dtype=float).reshape(100, 100)
    x = da.from_array(data, chunks=25)
    with dask.config.set(scheduler=executor):
        assert (x @ x.T).trace().compute() == pytest.approx(np.trace(data @ data.T))
        assert x.std().compute() == pytest.approx(data.std())


def test_array_error_keeps_its_type(executor):
    x = da.from_array(np.arange(10), chunks=2).map_blocks(_reject_four, dtype=int)
    with pytest.raises(Boom, match="bad item 4"):
        x.sum().compute(scheduler=executor)


def _reject_four(block):
    for v in block:
        explode_on(int(v), 4)
    return block


# -- dask.bag ----------------------------------------------------------------------------------
def test_bag_map_filter_fold(executor):
    bag = db.from_sequence(range(1000), npartitions=8)
    even_squares = bag.map(lambda v: v * v).filter(lambda v: v % 2 == 0)
    total = even_squares.fold(lambda acc, v: acc + v, initial=0).compute(scheduler=executor)
    assert total == sum(v * v for v in range(1000) if (v * v) % 2 == 0)
    assert even_squares.count().compute(scheduler=executor) == 500


def test_bag_with_closures_and_config(executor):
    offset = 7
    with dask.config.set(scheduler=executor):
        out = db.from_sequence(range(20), npartitions=4).map(lambda v: v + offset).compute()
    assert out == [v + 7 for v in range(20)]


def test_bag_tasks_run_on_the_workers(executor, worker_os_pids):
    pids = set(db.from_sequence(range(16), npartitions=8).map(lambda _: os.getpid())
               .compute(scheduler=executor))
    assert pids <= worker_os_pids
    assert os.getpid() not in pids


def test_bag_error_keeps_type_message_and_remote_traceback(executor):
    bag = db.from_sequence(range(40), npartitions=4).map(explode_on, 23)
    with pytest.raises(Boom, match="bad item 23") as info:
        bag.compute(scheduler=executor)
    assert "explode_on" in str(info.value.__cause__)


def test_builtin_error_type(executor):
    bag = db.from_sequence([1, 2, 0, 4], npartitions=2).map(lambda v: 10 // v)
    with pytest.raises(ZeroDivisionError):
        bag.compute(scheduler=executor)


# -- dask.delayed and the executor afterwards --------------------------------------------------
def test_delayed_graph(executor):
    inc = dask.delayed(lambda v: v + 1)
    add = dask.delayed(lambda a, b: a + b)
    parts = [inc(i) for i in range(10)]
    total = dask.delayed(sum)(parts)
    assert dask.compute(total, add(parts[0], parts[1]), scheduler=executor) == (55, 3)


def test_executor_still_usable_after_a_failed_compute(executor):
    with pytest.raises(Boom):
        db.from_sequence(range(4), npartitions=2).map(explode_on, 1).compute(scheduler=executor)
    assert executor.submit(pow, 2, 10).result() == 1024
    assert da.ones(10, chunks=5).sum().compute(scheduler=executor) == 10


def test_older_pool_route(executor):
    """``scheduler="threads", pool=executor``: dask's older way to pass an executor."""
    x = da.ones((100, 100), chunks=10)
    assert x.sum().compute(scheduler="threads", pool=executor) == 10_000
