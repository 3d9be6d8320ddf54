"""DistributedExecutor.submit, as a ProcessPoolExecutor user sees it (API.md §1).

``submit(fn, /, *args, **kwargs)`` forwards every keyword (``fn=`` and ``self=`` included) and
returns a ``concurrent.futures.Future``; lambdas, closures and ``__main__`` functions run as
they are; ``result(timeout)`` times out without losing the value; a raising done-callback is
logged and ignored; ``_max_workers`` is a live int; the constructor validates ``max_workers``.
Replacing ``ProcessPoolExecutor(4)`` by ``DistributedExecutor(4)`` in a script gives the same
output.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import distexec
from distexec import DistributedExecutor
from tests.executor.helpers import capture, sleep_and_return, square
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------
def test_submit_returns_a_stdlib_future_with_the_result(executor):
    future = executor.submit(square, 7)
    assert isinstance(future, cf.Future)
    assert future.result(timeout=10) == 49
    assert future.done() and not future.cancelled()
    assert future.exception() is None


def test_positional_and_keyword_arguments_reach_the_function(executor):
    future = executor.submit(capture, 1, [2, 3], key="value", other=None)
    assert future.result(timeout=10) == ((1, [2, 3]), {"key": "value", "other": None})


def test_fn_and_self_keywords_are_forwarded_to_the_function(executor):
    # CPython's test_submit_keyword: fn is positional-only, so these are the user's kwargs.
    future = executor.submit(capture, 1, self=2, fn=3)
    assert future.result(timeout=10) == ((1,), {"self": 2, "fn": 3})


def test_submit_without_a_callable_raises_type_error(executor):
    with pytest.raises(TypeError):
        executor.submit()
    with pytest.raises(TypeError):
        executor.submit(fn=capture)
    assert executor.submit(square, 2).result(timeout=10) == 4  # still usable


def test_lambdas_closures_and_local_classes_run_on_the_workers(executor):
    offset = 10

    def shifted(x):
        return x + offset

    class Box:
        def __init__(self, value):
            self.value = value

    assert executor.submit(lambda x, y=2: x * y, 21).result(timeout=10) == 42
    assert list(executor.map(shifted, range(5))) == [10, 11, 12, 13, 14]
    box = executor.submit(lambda: Box(7)).result(timeout=10)
    assert box.value == 7
    assert executor.submit(lambda b: b.value + 1, Box(1)).result(timeout=10) == 2


# --------------------------------------------------------------------------------------------
# futures: timeout and callbacks
# --------------------------------------------------------------------------------------------
def test_result_timeout_raises_and_a_later_result_returns_the_value(executor):
    future = executor.submit(sleep_and_return, 1.0, "late")
    asked = time.monotonic()
    with pytest.raises(TimeoutError):
        future.result(timeout=0.1)
    assert time.monotonic() - asked < 0.9
    assert not future.done()
    assert future.result(timeout=10) == "late"


def test_a_raising_done_callback_is_logged_and_the_executor_keeps_working(executor, caplog):
    caplog.set_level(logging.ERROR, logger="concurrent.futures")
    called = threading.Event()

    def bad_callback(fut):
        called.set()
        raise RuntimeError("callback failed")

    future = executor.submit(square, 3)
    future.add_done_callback(bad_callback)
    assert future.result(timeout=10) == 9
    assert called.wait(10)
    record = wait_until(
        lambda: next((r for r in caplog.records if "exception calling callback" in r.getMessage()),
                     None), 10, message="the callback's error to be logged")
    assert record.name == "concurrent.futures"
    assert record.exc_info is not None and str(record.exc_info[1]) == "callback failed"
    assert [f.result(timeout=10) for f in [executor.submit(square, i) for i in range(5)]] == [
        0, 1, 4, 9, 16]


# --------------------------------------------------------------------------------------------
# max_workers
# --------------------------------------------------------------------------------------------
def test_max_workers_is_a_live_positive_int(executor):
    assert type(executor._max_workers) is int
    assert executor._max_workers == 2 == len(executor.workers())
    assert set(executor.workers()) <= set(distexec.workers())


@pytest.mark.parametrize("bad", [0, -1])
def test_max_workers_must_be_positive(bad):
    before = distexec.procs()
    with pytest.raises(ValueError, match="^max_workers must be greater than 0$"):
        DistributedExecutor(bad)
    with pytest.raises(ValueError, match="^max_workers must be greater than 0$"):
        DistributedExecutor(max_workers=bad)
    assert distexec.procs() == before  # nothing was launched


BAD_MAX_WORKERS_SCRIPT = textwrap.dedent("""
    import sys
    from concurrent.futures import ProcessPoolExecutor

    from distexec import DistributedExecutor

    if __name__ == "__main__":
        executor = ProcessPoolExecutor if sys.argv[1] == "ProcessPoolExecutor" else DistributedExecutor
        for bad in (2.0, "2", 0.5, -1.0, False, 0):
            try:
                executor(bad).shutdown()
            except Exception as exc:
                print(repr(bad), type(exc).__name__, exc)
            else:
                print(repr(bad), "accepted")
""")


def test_a_max_workers_that_is_no_positive_int_fails_as_in_process_pool(tmp_path):
    """The same script under both executors prints the same errors, type and text."""
    script = tmp_path / "bad_max_workers.py"
    script.write_text(BAD_MAX_WORKERS_SCRIPT)
    printed = {}
    for backend in ("ProcessPoolExecutor", "DistributedExecutor"):
        done = subprocess.run([sys.executable, str(script), backend], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        printed[backend] = done.stdout.splitlines()
    assert printed["DistributedExecutor"] == printed["ProcessPoolExecutor"]
    assert printed["DistributedExecutor"][0] == (
        "2.0 TypeError 'float' object cannot be interpreted as an integer")


def test_max_workers_true_is_one_worker_as_in_process_pool():
    with DistributedExecutor(True) as executor:
        assert executor._max_workers == 1
        assert executor.submit(square, 3).result(timeout=30) == 9


# --------------------------------------------------------------------------------------------
# a drop-in replacement: the same __main__ script with either executor
# --------------------------------------------------------------------------------------------
DROP_IN_SCRIPT = textwrap.dedent("""
    import concurrent.futures as cf
    import json
    import sys
    from concurrent.futures import ProcessPoolExecutor

    from distexec import DistributedExecutor

    def square(x):
        return x * x

    class Adder:
        def __init__(self, k):
            self.k = k

        def __call__(self, x):
            return x + self.k

    class Oops(Exception):
        pass

    def fail(x):
        raise Oops(f"bad {x}")

    def main(executor_cls):
        out = {}
        with executor_cls(4) as ex:
            out["submit"] = [f.result() for f in [ex.submit(square, i) for i in range(20)]]
            out["map"] = list(ex.map(pow, range(10), range(10)))
            out["chunks"] = list(ex.map(square, range(200), chunksize=16))
            out["callable"] = list(ex.map(Adder(5), range(5)))
            out["as_completed"] = sorted(
                f.result() for f in cf.as_completed(ex.submit(square, i) for i in range(8)))
            done, _ = cf.wait([ex.submit(square, i) for i in range(4)])
            out["wait"] = sorted(f.result() for f in done)
            try:
                ex.submit(fail, 3).result()
            except Oops as exc:
                out["error"] = [type(exc).__name__, str(exc)]
            out["max_workers"] = ex._max_workers
        return out

    if __name__ == "__main__":
        cls = {"ppe": ProcessPoolExecutor, "distexec": DistributedExecutor}[sys.argv[1]]
        print(json.dumps(main(cls)))
""")


def _run_drop_in(which: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", DROP_IN_SCRIPT, which], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_replacing_process_pool_executor_gives_the_same_results():
    expected = _run_drop_in("ppe")
    assert expected["error"] == ["Oops", "bad 3"] and expected["max_workers"] == 4
    assert _run_drop_in("distexec") == expected
