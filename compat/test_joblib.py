"""joblib on distexec workers, used the way joblib's users use it.

``with joblib.parallel_config(backend="distexec", n_jobs=2): Parallel()(...)`` with real local
workers: results, lambdas and closures, errors (type, message, remote traceback),
``return_as="generator"``, abort on error, nested ``Parallel`` inside a task, the three ways the
backend finds workers (launches its own, uses the cluster's, uses a given executor), and
scikit-learn's ``GridSearchCV(n_jobs=2)``. The registration itself (``import distexec`` alone,
joblib imported before or after it) is checked in fresh interpreters.

The functions the tasks call are module-level, so workers import this module by reference
(they share the master's ``sys.path``), as they would a user's module.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

import distexec
from distexec import DistributedExecutor, ProcessExitedException

# The leak checks of tests/ (no worker process, no non-daemon thread left after a test).
from tests.conftest import no_leaked_processes, no_leaked_threads  # noqa: F401

joblib = pytest.importorskip("joblib", reason="joblib is not installed (the `test` extra has it)")
from joblib import Parallel, delayed, parallel_config  # noqa: E402

from distexec.integrations.joblib_backend import DistexecBackend  # noqa: E402

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


def _cluster_workers():
    return [p for p in distexec.procs() if p != 1]


@pytest.fixture(autouse=True)
def no_cluster_workers():
    """Each test starts with a master alone, so the backend launches (and removes) its own."""
    assert _cluster_workers() == [], "workers left over by another test"
    yield
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
    long before BLOCK_SECONDS), and the workers must then go away.
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
        assert _cluster_workers() == []  # the call is over: its workers are gone
    assert len(list(tmp_path.iterdir())) < 100


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
    assert _cluster_workers() == []


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
def _run_fresh(*parts: str) -> str:
    """Run the code ``parts`` in a new interpreter (which removes its own workers at exit)."""
    repo = Path(__file__).resolve().parent.parent
    code = "".join(textwrap.dedent(part) for part in parts)
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
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
