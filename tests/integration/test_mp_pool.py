"""``distexec.Pool``, multiprocessing.Pool's interface on distexec workers, with real workers.

Grouped by behaviour: the calls and their results, chunks, ``AsyncResult``, callbacks,
timeouts, the life cycle (close, join, terminate, the context manager), the errors for bad
arguments (side by side with ``multiprocessing.Pool`` where that starts no process), and the
initializer. Most tests share one module-scoped pool; those that end a pool make their own.
Scripts that exit with a live pool run in a subprocess, as users run them.

A computation that must not finish yet waits on a *gate*, a master-owned RemoteChannel the
test feeds; a task that must have started reports on another channel. Nothing sleeps to wait.
"""

from __future__ import annotations

import concurrent.futures.process
import functools
import itertools
import multiprocessing
import multiprocessing.pool
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import cloudpickle
import pytest

import distexec
from distexec import BrokenDistributedExecutor, Pool, ProcessExitedException, WorkerPool
from tests.helpers import new_log, wait_gone, wait_until

pytestmark = pytest.mark.timeout(60)

# Functions defined here travel by value, so workers never import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 10.0


def sq(x):
    return x * x


def add(a, b):
    return a + b


def fail_on(bad, x):
    if x == bad:
        raise ValueError(f"bad {x}")
    return x


def wait_gate(gate, value):
    gate.take()
    return value


def first_waits(gate, value):
    if value == "first":
        gate.take()
    return value


def report_then_sleep(log, seconds):
    log.put(os.getpid())
    time.sleep(seconds)


def worker_id(_):
    return distexec.myid()


def take_from(gate):
    return gate.take()  # an AttributeError when it is no gate


def on_main_thread(_=None):
    return threading.current_thread() is threading.main_thread()


def raising_input(n, at):
    for i in range(n):
        if i == at:
            raise KeyError("input broke")
        yield i


@pytest.fixture(scope="module")
def pool():
    p = Pool(2)
    yield p
    p.terminate()
    p.join()


@pytest.fixture(scope="module")
def reference():
    """A multiprocessing.Pool to compare with (spawn: this process has threads). Module-scoped,
    so its processes and multiprocessing's resource tracker predate every test's leak check."""
    with multiprocessing.get_context("spawn").Pool(2) as p:
        yield p
    p.join()


def worker_os_pids(p: Pool) -> list[int]:
    return [distexec.remotecall_fetch(os.getpid, w) for w in p._executor.workers()]


# --------------------------------------------------------------------------------------------
# the calls
# --------------------------------------------------------------------------------------------
def test_apply_and_apply_async(pool):
    assert pool.apply(sq, (5,)) == 25
    assert pool.apply(sq, (), {"x": 3}) == 9
    assert pool.apply(divmod, [7, 2]) == (3, 1)
    assert pool.apply_async(add, (20, 22)).get(timeout=DEADLINE) == 42


def test_map_and_starmap_match_the_builtins(pool):
    xs = list(range(50))
    pairs = list(zip(range(30), range(30, 0, -1)))
    assert pool.map(sq, xs) == [x * x for x in xs]
    assert pool.map(sq, xs, chunksize=7) == [x * x for x in xs]
    assert pool.map(sq, (x for x in xs)) == [x * x for x in xs]  # an input without len()
    assert pool.map_async(sq, xs, 3).get(DEADLINE) == [x * x for x in xs]
    assert pool.starmap(add, pairs) == list(itertools.starmap(add, pairs))
    assert pool.starmap(add, pairs, chunksize=4) == list(itertools.starmap(add, pairs))
    assert pool.starmap_async(add, pairs).get(DEADLINE) == list(itertools.starmap(add, pairs))


@pytest.mark.parametrize("chunksize", [1, 3, 100])
def test_imap_in_order_and_imap_unordered(pool, chunksize):
    xs = range(40)
    assert list(pool.imap(sq, xs, chunksize)) == [x * x for x in xs]
    assert sorted(pool.imap_unordered(sq, xs, chunksize)) == [x * x for x in xs]


def test_empty_inputs(pool):
    assert pool.map(sq, []) == []
    assert pool.starmap(add, []) == []
    assert pool.map_async(sq, []).get(DEADLINE) == []
    assert list(pool.imap(sq, [])) == []
    assert list(pool.imap_unordered(sq, [], 5)) == []


def test_results_match_multiprocessing_side_by_side(pool, reference):
    """The same calls on a multiprocessing.Pool (builtins only: its children import by name)."""
    calls = [
        ("map", (abs, range(-9, 9))), ("map", (abs, range(-9, 9), 4)),
        ("starmap", (pow, [(2, 3), (3, 2), (5, 0)])), ("apply", (divmod, (17, 5))),
    ]
    for name, args in calls:
        assert getattr(pool, name)(*args) == getattr(reference, name)(*args)
    assert list(pool.imap(abs, range(-5, 5), 3)) == list(reference.imap(abs, range(-5, 5), 3))


def _drain(iterator) -> list:
    """Every item, and each exception raised where it came, until the iterator ends."""
    out = []
    while len(out) < 100:
        try:
            out.append(next(iterator))
        except StopIteration:
            return out
        except ValueError as exc:
            out.append(f"ValueError: {exc}")
    raise AssertionError(f"no end: {out}")


@pytest.mark.parametrize("chunksize", [1, 2, 3])
def test_imap_ends_after_a_failed_chunk_as_multiprocessing(pool, reference, chunksize):
    """With chunks, multiprocessing's imap is a generator over them: the first chunk that
    fails ends it (its other items are lost with it). Item by item, it goes on past errors."""
    inputs = ["1", "2", "x", "4", "5", "6", "y", "8", "9"]
    expected = _drain(reference.imap(int, inputs, chunksize))
    assert _drain(pool.imap(int, inputs, chunksize)) == expected
    if chunksize > 1:
        assert expected[-1].startswith("ValueError") and len(expected) < len(inputs)
        unordered = _drain(pool.imap_unordered(int, inputs, chunksize))
        assert unordered[-1].startswith("ValueError") and len(unordered) < len(inputs)


def test_tasks_run_on_the_workers_main_thread(pool):
    assert pool.apply(on_main_thread)
    assert all(pool.map(on_main_thread, range(20), chunksize=5))
    assert all(pool.imap(on_main_thread, range(6)))
    assert set(pool.map(worker_id, range(20), 1)) <= set(pool._executor.workers())


def test_lambdas_and_closures_work(pool):
    offset = 10
    assert pool.map(lambda x: x + offset, range(3)) == [10, 11, 12]


# --------------------------------------------------------------------------------------------
# chunks: multiprocessing's sizes, one executor task each
# --------------------------------------------------------------------------------------------
def _count_submits(p: Pool, monkeypatch) -> list:
    submitted: list = []
    real = p._executor.submit

    def counting(fn, /, *args, **kwargs):
        submitted.append(args)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(p._executor, "submit", counting)
    return submitted


@pytest.mark.parametrize("length", [1, 7, 8, 9, 100, 1001])
def test_map_default_chunksize_is_multiprocessings(pool, monkeypatch, length):
    submitted = _count_submits(pool, monkeypatch)
    assert pool.map(sq, range(length)) == [x * x for x in range(length)]
    chunksize, extra = divmod(length, 4 * 2)  # multiprocessing's rule, for two workers
    chunksize += bool(extra)
    assert len(submitted) == -(-length // chunksize)
    assert [len(chunk) for _, chunk in submitted[:-1]] == [chunksize] * (len(submitted) - 1)


def test_an_explicit_chunksize_is_one_task_per_chunk(pool, monkeypatch):
    submitted = _count_submits(pool, monkeypatch)
    pool.map(sq, range(10), chunksize=3)
    assert [chunk for _, chunk in submitted] == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9,)]
    submitted.clear()
    list(pool.imap(sq, range(10), chunksize=4))
    assert [chunk for _, chunk in submitted] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]
    submitted.clear()
    list(pool.imap(sq, range(3)))  # chunksize 1: the function itself, one item per task
    assert submitted == [(0,), (1,), (2,)]


# --------------------------------------------------------------------------------------------
# errors from the tasks and from the input
# --------------------------------------------------------------------------------------------
def test_a_task_error_keeps_its_type_and_the_remote_traceback(pool):
    with pytest.raises(ValueError, match="bad 3") as info:
        pool.apply(fail_on, (3, 3))
    assert type(info.value.__cause__) is multiprocessing.pool.RemoteTraceback
    assert "fail_on" in info.value.__cause__.tb
    with pytest.raises(ValueError, match="bad 7"):
        pool.map(functools.partial(fail_on, 7), [7] * 3 + list(range(3)), chunksize=2)
    with pytest.raises(ValueError, match="bad 2"):
        list(pool.imap(functools.partial(fail_on, 2), range(5)))


def test_map_waits_for_every_chunk_even_after_a_failure(pool):
    gate = new_log()
    result = pool.map_async(take_from, [gate, "not a gate"], chunksize=1)
    wait_until(lambda: result._left == 1, DEADLINE, message="the failing chunk to finish")
    assert not result.ready()  # multiprocessing's rule: ready once every chunk has finished
    gate.put(None)
    with pytest.raises(AttributeError):
        result.get(DEADLINE)


def test_an_input_that_raises(pool):
    with pytest.raises(KeyError):
        pool.map(sq, raising_input(10, 3))
    it = pool.imap(sq, raising_input(10, 3))
    assert [next(it) for _ in range(3)] == [0, 1, 4]
    with pytest.raises(KeyError):
        next(it)
    with pytest.raises(StopIteration):
        next(it)
    it = pool.imap(sq, raising_input(20, 7), 2)  # the chunk being made when it raised is lost
    assert [next(it) for _ in range(6)] == [x * x for x in range(6)]
    with pytest.raises(KeyError):
        next(it)


def test_a_result_that_cannot_be_pickled_is_a_maybe_encoding_error(pool):
    with pytest.raises(multiprocessing.pool.MaybeEncodingError) as info:
        pool.apply(threading.Lock)
    assert "lock" in str(info.value)
    assert pool.apply(sq, (4,)) == 16  # the worker is fine


def test_arguments_that_are_no_iterable_or_mapping_fail_as_in_multiprocessing(pool):
    """``apply(f, 3)``: the TypeError of ``f(*3)`` that a ``multiprocessing.Pool`` worker
    raises, naming ``f`` (not distexec's ``submit``), from ``get()``; the pool goes on."""
    name = re.escape(f"{sq.__module__}.sq()")
    with pytest.raises(TypeError, match=rf"^{name} argument after \* must be an iterable, "
                                        "not int$"):
        pool.apply(sq, 3)
    with pytest.raises(TypeError, match=rf"^{name} argument after \*\* must be a mapping, "
                                        "not int$"):
        pool.apply_async(sq, (3,), 5).get(timeout=10)
    with pytest.raises(TypeError, match=r"^abs\(\) argument after \* must be an iterable"):
        pool.apply(abs, 3)
    assert pool.apply(sq, [4]) == 16


def die(_=None):
    os._exit(3)


def test_a_worker_that_dies_fails_only_its_task():
    """multiprocessing would leave this result pending for ever; here it fails, and the pool
    goes on with a replacement worker."""
    with Pool(2) as p:
        lost = p.apply_async(die)
        with pytest.raises(ProcessExitedException) as info:
            lost.get(DEADLINE)
        assert isinstance(info.value, concurrent.futures.process.BrokenProcessPool)
        assert not lost.successful()
        assert p.map(sq, range(20), 1) == [x * x for x in range(20)]
        wait_until(lambda: len(p._executor.workers()) == 2, DEADLINE,
                   message="a replacement worker")
    p.join()


# --------------------------------------------------------------------------------------------
# AsyncResult
# --------------------------------------------------------------------------------------------
def test_async_result_before_and_after_it_is_ready(pool):
    gate = new_log()
    result = pool.apply_async(wait_gate, (gate, "value"))
    assert not result.ready()
    with pytest.raises(ValueError, match="not ready"):
        result.successful()
    assert result.wait(0.05) is None
    with pytest.raises(multiprocessing.TimeoutError):
        result.get(timeout=0.05)
    gate.put(None)
    assert result.get(DEADLINE) == "value"
    assert result.ready() and result.successful()
    failed = pool.apply_async(fail_on, (1, 1))
    failed.wait(DEADLINE)
    assert failed.ready() and not failed.successful()
    with pytest.raises(ValueError):
        failed.get()


def test_the_result_classes_are_generic_as_in_multiprocessing():
    assert distexec.mp_pool.AsyncResult[int] is not None
    assert distexec.mp_pool.AsyncResult is distexec.mp_pool.ApplyResult


def test_imap_next_with_a_timeout(pool):
    gate = new_log()
    it = pool.imap(functools.partial(first_waits, gate), ["first", "second"])
    with pytest.raises(multiprocessing.TimeoutError):
        it.next(timeout=0.05)  # "second" may be done: it comes after "first"
    gate.put(None)
    assert it.next(timeout=DEADLINE) == "first"
    assert next(it) == "second"
    with pytest.raises(StopIteration):
        it.next(timeout=DEADLINE)


# --------------------------------------------------------------------------------------------
# callbacks
# --------------------------------------------------------------------------------------------
def test_callbacks_run_one_at_a_time_on_one_thread(pool):
    state = {"count": 0, "running": 0, "overlap": False, "threads": set()}

    def callback(_value):
        state["running"] += 1
        state["overlap"] |= state["running"] > 1
        state["threads"].add(threading.get_ident())
        count = state["count"]
        time.sleep(0)  # invite another thread in, were there one
        state["count"] = count + 1
        state["running"] -= 1

    results = [pool.apply_async(sq, (i,), callback=callback) for i in range(300)]
    for result in results:
        result.wait(DEADLINE)
    assert state["count"] == 300
    assert not state["overlap"] and len(state["threads"]) == 1
    assert threading.get_ident() not in state["threads"]


def test_callback_and_error_callback_receive_the_outcome(pool):
    seen = []
    ok = pool.apply_async(sq, (6,), callback=seen.append, error_callback=seen.append)
    bad = pool.apply_async(fail_on, (1, 1), callback=seen.append, error_callback=seen.append)
    ok.wait(DEADLINE), bad.wait(DEADLINE)
    assert 36 in seen and any(isinstance(x, ValueError) for x in seen) and len(seen) == 2
    seen.clear()
    pool.map_async(int, ["1", "2"], callback=seen.append, error_callback=seen.append).wait()
    pool.map_async(int, ["x"], callback=seen.append, error_callback=seen.append).wait()
    pool.starmap_async(add, [(1, 2)], callback=seen.append).wait()
    pool.map_async(sq, [], callback=seen.append).wait(DEADLINE)
    assert seen[0] == [1, 2] and isinstance(seen[1], ValueError) and seen[2:] == [[3], []]


def test_a_result_is_ready_only_after_its_callback_ran(pool):
    seen = []
    holder = {}
    result = pool.apply_async(sq, (2,), callback=lambda v: seen.append(holder["r"].ready()))
    holder["r"] = result
    result.wait(DEADLINE)
    assert seen == [False] and result.ready()


def test_a_failing_callback_is_logged_and_the_pool_goes_on(pool, caplog):
    def bad_callback(_):
        raise RuntimeError("callback broke")

    result = pool.apply_async(sq, (3,), callback=bad_callback)
    assert result.get(DEADLINE) == 9
    assert "callback broke" in caplog.text
    assert pool.apply_async(sq, (4,), callback=lambda _: None).get(DEADLINE) == 16


# --------------------------------------------------------------------------------------------
# close, join, terminate, the context manager
# --------------------------------------------------------------------------------------------
def test_close_then_join_finishes_the_work_and_removes_the_workers():
    p = Pool(2)
    os_pids = worker_os_pids(p)
    seen = []
    results = [p.apply_async(sq, (i,), callback=seen.append) for i in range(20)]
    lazy = p.imap(sq, range(30), 4)
    p.close()
    with pytest.raises(ValueError, match="Pool not running"):
        p.apply(sq, (1,))
    with pytest.raises(ValueError, match="Pool not running"):
        p.imap(sq, [1])
    p.join()
    assert sorted(seen) == [i * i for i in range(20)]  # callbacks ran before join returned
    assert [r.get(0) for r in results] == [i * i for i in range(20)]
    assert list(lazy) == [i * i for i in range(30)]
    wait_gone(os_pids)
    assert not set(p._executor.workers()) & set(distexec.workers())


def test_join_requires_close_or_terminate_as_in_multiprocessing(reference):
    p = Pool(1)
    try:
        with pytest.raises(ValueError) as expected:
            reference.join()
        with pytest.raises(ValueError) as got:
            p.join()
        assert str(got.value) == str(expected.value) == "Pool is still running"
    finally:
        p.terminate()
        p.join()


def test_terminate_stops_a_running_task_quickly():
    p = Pool(2)
    log = new_log()
    running = p.apply_async(report_then_sleep, (log, 60))
    queued = p.map_async(time.sleep, [60] * 10, chunksize=1)
    os_pid = wait_until(lambda: log.isready() and log.take(), DEADLINE,
                        message="the task to start")
    started = time.monotonic()
    p.terminate()
    p.join()
    assert time.monotonic() - started < 5.0
    wait_gone([os_pid])
    for result in (running, queued):
        assert result.ready() and not result.successful()
        with pytest.raises(BrokenDistributedExecutor, match="terminated"):
            result.get(0)
    with pytest.raises(ValueError, match="Pool not running"):
        p.apply_async(sq, (1,))
    p.terminate()  # again: nothing happens


def test_imap_of_an_endless_input_until_terminate():
    p = Pool(1)
    it = p.imap(sq, itertools.count(), chunksize=5)  # returns at once, reads as it goes
    assert [next(it) for _ in range(12)] == [x * x for x in range(12)]
    assert p.apply(sq, (3,)) == 9  # other calls get through meanwhile
    p.terminate()
    p.join()
    with pytest.raises(BrokenDistributedExecutor):
        for _ in it:  # results already there come first, then the error
            pass


def test_the_context_manager_terminates_as_in_multiprocessing():
    with Pool(2) as p:
        os_pids = worker_os_pids(p)
        assert p.map(sq, range(4)) == [0, 1, 4, 9]
    wait_gone(os_pids)
    with pytest.raises(ValueError, match="Pool not running"):
        p.map(sq, [1])
    with pytest.raises(ValueError, match="Pool not running"):
        with p:
            pass
    p.join()


def test_a_pool_on_existing_workers_leaves_them_running(add_workers):
    pids = add_workers(2)
    with Pool(pool=WorkerPool(pids)) as p:
        assert set(p.map(worker_id, range(20), 1)) <= set(pids)
    p.join()
    assert set(pids) <= set(distexec.workers())


def test_a_pool_launched_through_a_manager():
    with Pool(manager=distexec.LocalManager(2)) as p:
        assert len(p._executor.workers()) == 2
        assert p.map(sq, range(6)) == [x * x for x in range(6)]
        os_pids = worker_os_pids(p)
    p.join()
    wait_gone(os_pids)


def test_an_unclosed_pool_that_is_dropped_warns_and_releases_its_workers():
    p = Pool(1)
    os_pids = worker_os_pids(p)
    with pytest.warns(ResourceWarning, match="unclosed running multiprocessing pool"):
        del p
        import gc
        gc.collect()
    wait_gone(os_pids)


def test_a_pool_cannot_be_pickled(pool):
    import pickle
    with pytest.raises(NotImplementedError):
        pickle.dumps(pool)


# --------------------------------------------------------------------------------------------
# bad arguments: multiprocessing's exceptions and messages
# --------------------------------------------------------------------------------------------
BAD_CONSTRUCTIONS = [
    ({"processes": 0}, ValueError), ({"processes": -1}, ValueError),
    ({"maxtasksperchild": 0}, ValueError), ({"maxtasksperchild": -1}, ValueError),
    ({"maxtasksperchild": 0.5}, ValueError), ({"maxtasksperchild": "12"}, ValueError),
    ({"initializer": 5}, TypeError),
]


@pytest.mark.parametrize(("kwargs", "error"), BAD_CONSTRUCTIONS, ids=str)
def test_bad_constructor_arguments_fail_as_in_multiprocessing(kwargs, error, reference):
    # multiprocessing checks these before it starts a worker (``reference``: its resource
    # tracker, which its queues may start, is already running)
    with pytest.raises(error) as expected:
        multiprocessing.Pool(**kwargs)
    with pytest.raises(error) as got:
        Pool(**kwargs)
    assert str(got.value) == str(expected.value)


def test_bad_chunksizes_fail_as_in_multiprocessing(pool, reference):
    for name in ("imap", "imap_unordered"):
        for chunksize in (0, -3):
            with pytest.raises(ValueError) as expected:
                getattr(reference, name)(abs, [1], chunksize)
            with pytest.raises(ValueError) as got:
                getattr(pool, name)(abs, [1], chunksize)
            assert str(got.value) == str(expected.value)
    # map treats chunksize <= 0 as "nothing to run", a multiprocessing quirk kept as is
    assert pool.map(abs, [1, 2], 0) == reference.map(abs, [1, 2], 0) == [None, None]


def test_unsupported_keyword_is_a_type_error():
    with pytest.raises(TypeError):
        Pool(1, mystery=True)


# --------------------------------------------------------------------------------------------
# the initializer and maxtasksperchild
# --------------------------------------------------------------------------------------------
INITIALIZER_SCRIPT = textwrap.dedent("""
    import os
    import sys

    def init(value):
        global STATE
        STATE = value

    def read_state(_):
        return STATE, os.getpid()

    if __name__ == "__main__":
        if sys.argv[1] == "distexec":
            from distexec import Pool
        else:
            from multiprocessing import Pool
        with Pool(2, initializer=init, initargs=("ready",), maxtasksperchild=3) as pool:
            seen = pool.map(read_state, range(24), chunksize=1)
        print(sorted({state for state, _ in seen}), len({pid for _, pid in seen}) > 2)
""")


@pytest.mark.parametrize("backend", ["multiprocessing", "distexec"])
def test_the_worker_global_initializer_pattern(tmp_path, backend):
    """An initializer sets a global of the script; every worker, replacements included, has it."""
    script = tmp_path / "job.py"
    script.write_text(INITIALIZER_SCRIPT)
    done = subprocess.run([sys.executable, str(script), backend], capture_output=True,
                          text=True, timeout=50, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "['ready'] True\n"


def test_maxtasksperchild_replaces_workers():
    with Pool(2, maxtasksperchild=2) as p:
        results = [p.apply_async(os.getpid) for _ in range(12)]
        pids = [r.get(DEADLINE) for r in results]
        assert len(set(pids)) >= 6  # at most two tasks each
        assert p.map(sq, range(10), 1) == [x * x for x in range(10)]
    p.join()


def test_a_failing_initializer_fails_the_tasks():
    def broken():
        raise RuntimeError("no")

    with Pool(1, initializer=broken) as p:
        with pytest.raises(BrokenDistributedExecutor):
            p.apply(sq, (1,))
    p.join()


EXIT_SCRIPT = textwrap.dedent("""
    from distexec import Pool

    class Holder:
        def __init__(self):
            self.pool = Pool(processes=1)

    problem = Holder()
    print(problem.pool.map(float, tuple(range(4))))
""")


def test_exiting_with_a_pool_never_closed(tmp_path):
    """CPython's test_worker_finalization_via_atexit_handler_of_multiprocessing, distexec's."""
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT], capture_output=True, text=True,
                          timeout=50, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[0.0, 1.0, 2.0, 3.0]\n"


TERMINATE_SCRIPT = textwrap.dedent("""
    import multiprocessing
    import sys
    import time

    import distexec

    if __name__ == "__main__":
        Pool = (multiprocessing.get_context("forkserver").Pool if sys.argv[1] == "multiprocessing"
                else distexec.Pool)
        with Pool(2) as pool:
            pending = pool.map_async(time.sleep, [30] * 4)
            pending.wait(0.5)  # the workers are busy: terminate stops them
        print("terminated", pending.ready())
""")


@pytest.mark.parametrize("kind", ["multiprocessing", "distexec"])
def test_terminating_busy_workers_prints_nothing(kind):
    """``Pool.terminate()`` (here by the ``with`` block) stops busy workers on purpose: no
    "Worker 2 has exited (terminated by SIGTERM(-15))." on stderr, as with multiprocessing."""
    done = subprocess.run([sys.executable, "-c", TERMINATE_SCRIPT, kind], capture_output=True,
                          text=True, timeout=50, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("terminated")
    assert done.stderr == ""




def _env_value(name):
    import os
    return os.environ.get(name)


def test_launch_keywords_reach_the_workers_and_unknown_ones_are_refused():
    with Pool(1, env={"DISTEXEC_POOL_TEST": "from-pool"}) as p:
        assert p.apply(_env_value, ("DISTEXEC_POOL_TEST",)) == "from-pool"
    with pytest.raises(TypeError, match="unexpected keyword argument 'procesess'"):
        Pool(procesess=2)
