"""joblib on distexec workers, used the way joblib's users use it.

``with joblib.parallel_config(backend="distexec", n_jobs=2): Parallel()(...)`` with real local
workers: results, lambdas and closures, errors (type, message, remote traceback),
``return_as="generator"`` (which keeps a bounded number of results ahead of a slow consumer),
abort on error, nested ``Parallel`` inside a task, the ways the backend finds workers (its own,
kept from call to call like loky's; the cluster's; a given executor or pool), and
scikit-learn's ``GridSearchCV(n_jobs=2)``. The registration itself (``import distexec`` alone,
joblib imported before or after it) and the exit of the backend's workers with the interpreter
are checked in fresh interpreters.

The functions the tasks call are module-level, so workers import this module by reference
(they share the master's ``sys.path``), as they would a user's module.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
import weakref
from pathlib import Path

import psutil
import pytest

import distexec
from distexec import DistributedExecutor, ProcessExitedException

# The leak checks of tests/ (no worker process, no non-daemon thread left after a test).
from tests.conftest import no_leaked_processes, no_leaked_threads  # noqa: F401
from tests.helpers import wait_until

joblib = pytest.importorskip("joblib", reason="joblib is not installed (the `test` extra has it)")
from joblib import Parallel, delayed, parallel_config  # noqa: E402

from distexec.integrations.joblib_backend import (  # noqa: E402
    WINDOW_PER_WORKER,
    DistexecBackend,
    shutdown_workers,
)

pytestmark = pytest.mark.timeout(120)

BLOCK_SECONDS = 60.0
"""How long a blocking task would run if nothing interrupted it: far beyond the deadlines."""


class Boom(Exception):
    """A user exception type the workers import from this module."""


def square(x):
    return x * x


def fail_on(x, bad):
    if x == bad:
        raise Boom(f"bad item {x}")
    return x


def worker_os_pid(_=None):
    return os.getpid()


def slow_square(x, seconds):
    time.sleep(seconds)  # the workload: finishing out of order
    return x * x


def touch_and_square(directory, x):
    Path(directory, str(x)).touch()
    time.sleep(0.01)  # the workload: 1000 of them take seconds, far longer than the test
    return x * x


def touch_then_block(directory, name):
    """Record that the task started, then run (interruptibly) for BLOCK_SECONDS."""
    Path(directory, str(name)).touch()
    deadline = time.monotonic() + BLOCK_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.02)  # the workload: short steps, so an interrupt lands between them
    return name


def fail_or_block(directory, i):
    if i == 0:
        raise Boom("first task fails")
    return touch_then_block(directory, i)


def nested_sum(n):
    """A task that runs its own Parallel: on a worker it must run on threads, not wait."""
    return sum(Parallel(n_jobs=2)(delayed(square)(j) for j in range(n)))


def nested_explicit(n):
    """Asks for the distexec backend again from inside a worker: falls back to threads."""
    with parallel_config(backend="distexec", n_jobs=2):
        return sum(Parallel()(delayed(square)(j) for j in range(n)))


def exit_worker(x):
    if x == 3:
        os._exit(7)
    return x


class Payload:
    """A task's result whose copies in the master are counted in ``MATERIALIZED``."""

    def __init__(self, i):
        self.i = i

    def __reduce__(self):
        return _materialize, (self.i,)


MATERIALIZED: set[int] = set()
"""The master's live Payload results (rebuilt there on arrival, dropped when freed)."""


def _materialize(i):
    payload = Payload(i)
    MATERIALIZED.add(i)
    weakref.finalize(payload, MATERIALIZED.discard, i)
    return payload


def make_payload(i):
    return Payload(i)


def _cluster_workers():
    return [p for p in distexec.procs() if p != 1]


@pytest.fixture(autouse=True)
def no_cluster_workers(no_leaked_processes, no_leaked_threads):  # noqa: F811
    """Each test starts with a master alone; the backend's workers, kept for later calls,
    are let go after it (before the leak checks, which the arguments make run last)."""
    assert _cluster_workers() == [], "workers left over by another test"
    yield
    shutdown_workers()
    assert _cluster_workers() == [], "the backend left workers behind"


# -- results -----------------------------------------------------------------------------------
def test_parallel_config_matches_sequential():
    with parallel_config(backend="distexec", n_jobs=2):
        out = Parallel()(delayed(square)(i) for i in range(100))
    assert out == [square(i) for i in range(100)]


def test_tasks_run_on_the_workers_not_here():
    with parallel_config(backend="distexec", n_jobs=2):
        pids = set(Parallel(batch_size=1)(delayed(worker_os_pid)(i) for i in range(20)))
    assert os.getpid() not in pids
    assert 1 <= len(pids) <= 2


def test_lambdas_and_closures():
    offset = 10
    scale = {"k": 3}

    def local(x):
        return x * scale["k"]

    with parallel_config(backend="distexec", n_jobs=2):
        added = Parallel()(delayed(lambda x: x + offset)(i) for i in range(20))
        scaled = Parallel()(delayed(local)(i) for i in range(20))
    assert added == [i + 10 for i in range(20)]
    assert scaled == [i * 3 for i in range(20)]


def test_backend_name_and_instance_forms():
    out = Parallel(backend="distexec", n_jobs=2)(delayed(square)(i) for i in range(10))
    assert out == [i * i for i in range(10)]
    with parallel_config(backend=DistexecBackend(), n_jobs=2):
        assert Parallel()(delayed(square)(i) for i in range(10)) == out


def test_n_jobs_1_runs_here_without_workers():
    with parallel_config(backend="distexec", n_jobs=1):
        assert set(Parallel()(delayed(worker_os_pid)(i) for i in range(3))) == {os.getpid()}


# -- errors ------------------------------------------------------------------------------------
def test_exception_keeps_type_message_and_remote_traceback():
    with parallel_config(backend="distexec", n_jobs=2):
        with pytest.raises(Boom, match="bad item 7") as info:
            Parallel()(delayed(fail_on)(i, 7) for i in range(30))
    remote = str(info.value.__cause__)
    assert "fail_on" in remote and "Boom: bad item 7" in remote


def test_builtin_exception_type():
    with parallel_config(backend="distexec", n_jobs=2):
        with pytest.raises(ZeroDivisionError):
            Parallel()(delayed(lambda x: 1 / (x - 5))(i) for i in range(10))


def test_worker_death_is_reported():
    with parallel_config(backend="distexec", n_jobs=2):
        with pytest.raises(ProcessExitedException):
            Parallel(batch_size=1)(delayed(exit_worker)(i) for i in range(8))


def test_abort_on_error_cancels_queued_and_interrupts_running(tmp_path):
    """Task 0 fails at once; the others would run BLOCK_SECONDS each.

    All 100 are handed to the backend up front (``pre_dispatch="all"``): the abort must
    cancel the queued ones (few ever start) and interrupt the running ones (the call returns
    long before BLOCK_SECONDS), and the workers must then take the next call.
    """
    start = time.monotonic()
    with parallel_config(backend="distexec", n_jobs=2):
        with pytest.raises(Boom, match="first task fails"):
            Parallel(batch_size=1, pre_dispatch="all")(
                delayed(fail_or_block)(str(tmp_path), i) for i in range(100))
    elapsed = time.monotonic() - start
    started = list(tmp_path.iterdir())
    assert len(started) <= 8, f"{len(started)} of 99 tasks started"
    assert elapsed < BLOCK_SECONDS / 2, f"abort took {elapsed:.1f} s"
    with parallel_config(backend="distexec", n_jobs=2):
        assert Parallel()(delayed(square)(i) for i in range(10)) == [i * i for i in range(10)]


def test_managed_parallel_stays_usable_after_an_abort(tmp_path):
    with Parallel(backend="distexec", n_jobs=2, batch_size=1) as parallel:
        with pytest.raises(Boom):
            parallel(delayed(fail_or_block)(str(tmp_path), i) for i in range(20))
        assert parallel(delayed(square)(i) for i in range(10)) == [i * i for i in range(10)]


# -- return_as ---------------------------------------------------------------------------------
def test_return_as_generator_yields_in_order():
    with parallel_config(backend="distexec", n_jobs=2):
        gen = Parallel(return_as="generator", batch_size=1)(
            delayed(slow_square)(i, 0.05 * (i % 4 == 0)) for i in range(40))
        assert inspect.isgenerator(gen)
        assert list(gen) == [i * i for i in range(40)]


def test_return_as_generator_unordered_yields_everything():
    with parallel_config(backend="distexec", n_jobs=2):
        gen = Parallel(return_as="generator_unordered")(delayed(square)(i) for i in range(40))
        assert sorted(gen) == [i * i for i in range(40)]


def test_generator_closed_early_stops_the_call(tmp_path):
    with parallel_config(backend="distexec", n_jobs=2):
        gen = Parallel(return_as="generator", batch_size=1)(
            delayed(touch_and_square)(str(tmp_path), i) for i in range(1000))
        assert [next(gen) for _ in range(3)] == [0, 1, 4]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # joblib's note that it cancelled tasks, if any
            gen.close()
        # The call is over: the next one runs at once (nothing of the first left queued).
        assert Parallel()(delayed(square)(i) for i in range(4)) == [0, 1, 4, 9]
    assert len(list(tmp_path.iterdir())) < 100


@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
def test_generator_keeps_a_bounded_number_of_results_ahead(return_as):
    """A consumer slower than the workers: the results waiting in the master stay few.

    Without a bound, joblib dispatches a new batch at each completion, so all 40 results
    would be in the master after the first few items.
    """
    n_tasks, n_jobs = 40, 2
    bound = WINDOW_PER_WORKER * n_jobs + 1  # the window, and the batch the consumer holds
    peak = 0
    with parallel_config(backend="distexec", n_jobs=n_jobs):
        gen = Parallel(return_as=return_as, batch_size=1)(
            delayed(make_payload)(i) for i in range(n_tasks))
        seen = []
        for item in gen:
            peak = max(peak, len(MATERIALIZED))
            seen.append(item.i)
            del item
            time.sleep(0.03)  # the workload: a consumer slower than the workers
    assert sorted(seen) == list(range(n_tasks))
    assert return_as != "generator" or seen == list(range(n_tasks))
    assert peak <= bound, f"{peak} results held in the master at once (bound {bound})"
    wait_until(lambda: not MATERIALIZED, message="the consumed results to be freed")


# -- nesting -----------------------------------------------------------------------------------
def test_nested_parallel_inside_a_task_completes():
    with parallel_config(backend="distexec", n_jobs=2):
        out = Parallel()(delayed(nested_sum)(n) for n in range(8))
    assert out == [sum(j * j for j in range(n)) for n in range(8)]


def test_nested_explicit_distexec_backend_falls_back_to_threads():
    with parallel_config(backend="distexec", n_jobs=2):
        out = Parallel()(delayed(nested_explicit)(n) for n in range(6))
    assert out == [sum(j * j for j in range(n)) for n in range(6)]


def test_nested_backend_is_threads_then_sequential():
    level1, _ = DistexecBackend(nesting_level=0).get_nested_backend()
    level2, _ = DistexecBackend(nesting_level=1).get_nested_backend()
    assert type(level1).__name__ == "ThreadingBackend"
    assert type(level2).__name__ == "SequentialBackend"


# -- where the workers come from ---------------------------------------------------------------
def test_n_jobs_mapping_without_workers():
    backend = DistexecBackend()
    assert backend.effective_n_jobs(-1) == joblib.cpu_count()
    assert backend.effective_n_jobs(3) == 3
    assert backend.effective_n_jobs(None) == joblib.cpu_count()
    with pytest.raises(ValueError):
        backend.effective_n_jobs(0)


def test_given_executor_is_used_and_left_running():
    with DistributedExecutor(2) as ex:
        worker_pids = {ex.submit(worker_os_pid).result() for _ in range(4)}
        backend = DistexecBackend(executor=ex)
        assert backend.effective_n_jobs(-1) == 2
        assert backend.effective_n_jobs(5) == 2
        assert backend.effective_n_jobs(1) == 1
        with parallel_config(backend="distexec", executor=ex, n_jobs=-1):
            pids = set(Parallel(batch_size=1)(delayed(worker_os_pid)(i) for i in range(10)))
            assert Parallel()(delayed(square)(i) for i in range(10)) == [i * i for i in range(10)]
        assert pids <= worker_pids | _os_pids(ex.workers())
        assert ex.submit(square, 4).result() == 16  # still running


def test_uses_the_clusters_workers_and_leaves_them():
    pids = distexec.addprocs(2)
    try:
        os_pids = _os_pids(pids)
        with parallel_config(backend="distexec", n_jobs=-1):
            used = set(Parallel(batch_size=1)(delayed(worker_os_pid)(i) for i in range(10)))
        assert used <= os_pids
        assert _cluster_workers() == pids
    finally:
        distexec.rmprocs(pids, waitfor=20)


def test_managed_parallel_reuses_its_workers_across_calls():
    with Parallel(backend="distexec", n_jobs=2) as parallel:
        assert parallel(delayed(square)(i) for i in range(10)) == [i * i for i in range(10)]
        workers = _cluster_workers()
        assert parallel(delayed(square)(i) for i in range(10)) == [i * i for i in range(10)]
        assert len(workers) == 2 and _cluster_workers() == workers  # the same two, kept
    assert _cluster_workers() == workers  # and kept for the next call


def test_given_pool_is_used_and_left_running():
    pids = distexec.addprocs(3)
    try:
        with parallel_config(backend="distexec", pool=distexec.WorkerPool(pids[:2]), n_jobs=-1):
            used = set(Parallel(batch_size=1)(delayed(worker_os_pid)(i) for i in range(10)))
        assert used and used <= _os_pids(pids[:2])
        assert _cluster_workers() == pids
    finally:
        distexec.rmprocs(pids, waitfor=20)


# -- the backend's own workers, kept from call to call -------------------------------------------
def _call_pids(n_jobs=2, n_tasks=20):
    with parallel_config(backend="distexec", n_jobs=n_jobs):
        return set(Parallel(batch_size=1)(delayed(worker_os_pid)(i) for i in range(n_tasks)))


def test_consecutive_calls_run_on_the_same_workers():
    first = _call_pids()
    workers = _cluster_workers()
    second = _call_pids()
    assert len(workers) == 2 and _cluster_workers() == workers
    assert first | second <= _os_pids(workers)
    assert os.getpid() not in first | second


def test_worker_state_persists_between_calls():
    """As under loky: a module a task imported is still imported in the next call."""
    _call_pids()
    workers = _cluster_workers()
    for pid in workers:
        distexec.remotecall_fetch(exec, pid, "import colorsys")
    with parallel_config(backend="distexec", n_jobs=2):
        seen = Parallel(batch_size=1)(
            delayed(lambda _: "colorsys" in sys.modules)(i) for i in range(8))
    assert all(seen)


def test_changed_n_jobs_gives_that_many_workers():
    _call_pids(n_jobs=2)
    assert len(_cluster_workers()) == 2
    used = _call_pids(n_jobs=3, n_tasks=30)
    workers = _cluster_workers()
    assert len(workers) == 3
    assert used <= _os_pids(workers)
    _call_pids(n_jobs=2)
    assert len(_cluster_workers()) == 2


def test_next_call_works_after_a_worker_is_killed():
    _call_pids()
    victim = _cluster_workers()[0]
    os_pid = distexec.remotecall_fetch(os.getpid, victim)
    psutil.Process(os_pid).kill()
    wait_until(lambda: victim not in distexec.procs(), message="the master to see the death")
    with parallel_config(backend="distexec", n_jobs=2):
        assert Parallel()(delayed(square)(i) for i in range(20)) == [i * i for i in range(20)]
    assert os_pid not in _call_pids()


def test_next_call_works_after_the_workers_are_removed():
    """Workers removed on purpose are not replaced: the next call starts new ones."""
    _call_pids()
    old = _cluster_workers()
    distexec.rmprocs(old, waitfor=20)
    used = _call_pids()
    new = _cluster_workers()
    assert len(new) == 2 and not set(new) & set(old)
    assert used <= _os_pids(new)


def test_workers_exit_after_idle_worker_timeout():
    with parallel_config(backend="distexec", n_jobs=2, idle_worker_timeout=0.5):
        assert Parallel()(delayed(square)(i) for i in range(4)) == [0, 1, 4, 9]
    assert len(_cluster_workers()) == 2
    wait_until(lambda: not _cluster_workers(), message="the idle workers to exit")
    assert _call_pids() and len(_cluster_workers()) == 2  # a later call starts new ones


def test_backend_workers_exit_with_the_interpreter():
    """No worker outlives the script, the exit does not hang, and nothing is printed, even
    with a generator left half consumed."""
    out = _run_fresh("""
        import json, os, time
        import distexec
        from joblib import Parallel, delayed

        def slow(i):
            time.sleep(0.05)  # the workload: still running when the script ends
            return i

        for _ in range(2):
            Parallel(n_jobs=2, backend="distexec")(delayed(abs)(-i) for i in range(8))
        left = Parallel(n_jobs=2, backend="distexec", return_as="generator", batch_size=1)(
            delayed(slow)(i) for i in range(1000))
        assert [next(left), next(left)] == [0, 1]
        workers = [p for p in distexec.procs() if p != 1]
        print(json.dumps([distexec.remotecall_fetch(os.getpid, p) for p in workers]))
    """, flags=("-W", "always"))
    os_pids = json.loads(out)
    assert len(os_pids) == 2
    wait_until(lambda: not any(_running(pid) for pid in os_pids),
               message="the script's workers to exit")


def _running(os_pid):
    try:
        return psutil.Process(os_pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_old_apply_async_entry_point():
    """joblib 1.4 calls ``apply_async``; it is the same as ``submit``."""
    with DistributedExecutor(2) as ex:
        backend = DistexecBackend(executor=ex)
        backend.configure(n_jobs=2)
        done = []
        try:
            future = backend.apply_async(lambda: [square(3)], callback=done.append)
            assert backend.retrieve_result_callback(future) == [9]
        finally:
            backend.terminate()  # runs the callbacks still queued, then stops
        assert done == [future]


def _os_pids(pids):
    return {distexec.remotecall_fetch(os.getpid, p) for p in pids}


# -- scikit-learn ------------------------------------------------------------------------------
def test_gridsearchcv_same_best_params_as_sequential():
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (the `test` extra has it)")
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    X, y = load_iris(return_X_y=True)
    grid = {"C": [0.1, 1, 10], "gamma": [0.01, 0.1, 1]}
    sequential = GridSearchCV(SVC(), grid, cv=3, n_jobs=1).fit(X, y)
    with parallel_config(backend="distexec", n_jobs=2):
        parallel = GridSearchCV(SVC(), grid, cv=3, n_jobs=2).fit(X, y)
    assert parallel.best_params_ == sequential.best_params_
    assert list(parallel.cv_results_["mean_test_score"]) == \
        list(sequential.cv_results_["mean_test_score"])


# -- registration ------------------------------------------------------------------------------
def _run_fresh(*parts: str, flags: tuple[str, ...] = ()) -> str:
    """Run the code ``parts`` in a new interpreter (which removes its own workers at exit);
    it must succeed and write nothing on stderr."""
    repo = Path(__file__).resolve().parent.parent
    code = "".join(textwrap.dedent(part) for part in parts)
    proc = subprocess.run([sys.executable, *flags, "-c", code], cwd=repo,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return proc.stdout


USE_BACKEND = """
    from joblib import Parallel, delayed, parallel_config
    with parallel_config(backend="distexec", n_jobs=2):
        print(Parallel()(delayed(abs)(-i) for i in range(5)))
"""


def test_import_distexec_registers_the_backend_lazily():
    out = _run_fresh("""
        import sys
        import distexec
        assert "joblib" not in sys.modules, "import distexec imported joblib"
        import joblib
    """, USE_BACKEND)
    assert out.strip() == "[0, 1, 2, 3, 4]"


def test_registration_when_joblib_was_imported_first():
    out = _run_fresh("""
        import joblib
        import distexec
    """, USE_BACKEND)
    assert out.strip() == "[0, 1, 2, 3, 4]"
