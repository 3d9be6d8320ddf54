"""Errors raised by tasks, as ``future.result()`` re-raises them (API.md §1).

The original exception type comes back, as ``ProcessPoolExecutor`` raises it: the remote
traceback is its ``__cause__`` (text, which survives code that drops ``__traceback__``, as
joblib does, and frames as ``__cause__.stack``), printed once above the caller's frames, and a
note names the worker. An exception that cannot be rebuilt on the master arrives as
``RemoteException``; a falsey exception still raises. Arguments, results and exceptions that
cannot cross the wire (each failing its task alone) are the table of
tests/faults/test_serialization.py (faults S1-S13); what a script's user sees printed is
tests/integration/test_tracebacks.py.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from tests.executor.helpers import Boom, raise_boom, square

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


class FalseyError(Exception):
    def __bool__(self):
        return False


class EmptyError(Exception):
    def __len__(self):
        return 0


def raise_falsey():
    raise FalseyError("falsey")


def raise_empty():
    raise EmptyError("empty")


def divide_in_helper(x):
    return _inner_divide(x)


def _inner_divide(x):
    return x / 0


def _raised(future: cf.Future) -> BaseException:
    with pytest.raises(BaseException) as info:
        future.result(timeout=10)
    return info.value


def test_the_original_exception_type_is_raised(executor):
    exc = _raised(executor.submit(raise_boom, "it broke"))
    assert type(exc) is Boom
    assert exc.args == ("it broke",)
    assert executor.submit(square, 3).result(timeout=10) == 9


def test_remote_frames_are_the_cause_and_only_there(executor):
    exc = _raised(executor.submit(divide_in_helper, 1))
    assert type(exc) is ZeroDivisionError
    remote = [frame.name for frame in exc.__cause__.stack]
    assert remote == ["divide_in_helper", "_inner_divide"]  # distexec's own frames left out
    local = [frame.name for frame in traceback.extract_tb(exc.__traceback__)]
    assert local[0] == "_raised" and not set(remote) & set(local)


def test_remote_traceback_text_is_the_cause_and_survives_a_dropped_traceback(executor):
    exc = _raised(executor.submit(raise_boom, "with text"))
    exc.__traceback__ = None  # what joblib does before re-raising
    cause = str(exc.__cause__)
    assert "raise_boom" in cause
    assert "Boom: with text" in cause
    assert "Traceback (most recent call last)" in cause
    printed = "".join(traceback.format_exception(exc))
    assert "raise_boom" in printed and "with text" in printed


def test_a_note_names_the_worker(executor):
    future = executor.submit(raise_boom, "where")
    exc = _raised(future)
    notes = getattr(exc, "__notes__", [])
    assert any(f"worker {pid}" in note for note in notes for pid in executor.workers()), notes
    # raising it again does not add the note twice
    again = _raised(future)
    assert again is exc and len(getattr(again, "__notes__", [])) == len(notes)


@pytest.mark.parametrize("fn, kind", [(raise_falsey, FalseyError), (raise_empty, EmptyError)])
def test_a_falsey_exception_still_raises(executor, fn, kind):
    future = executor.submit(fn)
    with pytest.raises(kind):
        future.result(timeout=10)
    assert type(future.exception(timeout=10)) is kind
    done, not_done = cf.wait([future, executor.submit(square, 1)],
                             return_when=cf.FIRST_EXCEPTION, timeout=10)
    assert future in done


def test_map_raises_the_original_exception_at_its_item(executor):
    results = executor.map(lambda x: 1 / (x - 2), range(5))
    assert next(results) == -0.5
    assert next(results) == -1.0
    with pytest.raises(ZeroDivisionError) as info:
        next(results)
    assert [f.name for f in info.value.__cause__.stack] == ["<lambda>"]
    # 3.11-3.14 semantics: iteration ends after an item raised
    with pytest.raises(StopIteration):
        next(results)



UNPICKLABLE_RESULT_PROGRAM = """\
import sys
import threading
from concurrent.futures import ProcessPoolExecutor

import distexec


def make_lock():
    return threading.Lock()


if __name__ == "__main__":
    executor = (ProcessPoolExecutor if sys.argv[1] == "ProcessPoolExecutor"
                else distexec.DistributedExecutor)
    with executor(1) as ex:
        try:
            ex.submit(make_lock).result()
        except TypeError as exc:
            print("caught TypeError:", type(exc).__name__, exc)
        print("next task:", ex.submit(abs, -3).result())
"""


def test_an_unpicklable_result_is_caught_by_except_type_error_as_under_process_pool(tmp_path):
    """The same program under both: ``ProcessPoolExecutor`` raises pickle's TypeError;
    distexec's ``ResultPicklingError`` is one too (and names the result), and the worker goes
    on."""
    script = tmp_path / "program.py"
    script.write_text(UNPICKLABLE_RESULT_PROGRAM, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    printed = {}
    for backend in ("ProcessPoolExecutor", "DistributedExecutor"):
        done = subprocess.run([sys.executable, str(script), backend], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        printed[backend] = done.stdout.splitlines()
    assert printed["ProcessPoolExecutor"] == [
        "caught TypeError: TypeError cannot pickle '_thread.lock' object", "next task: 3"]
    caught, next_task = printed["DistributedExecutor"]
    assert caught.startswith("caught TypeError: ResultPicklingError the result of the call "
                             "(lock) could not be sent")
    assert caught.endswith("cannot pickle '_thread.lock' object")
    assert next_task == "next task: 3"


def test_an_executor_passed_to_its_own_task_fails_saying_so(executor):
    """``ProcessPoolExecutor`` fails with pickle's TypeError about a lock inside it; distexec's
    TypeError names the executor, and the executor goes on."""
    with pytest.raises(TypeError, match="^cannot pickle 'DistributedExecutor' object"):
        executor.submit(abs, executor).result(timeout=30)
    assert executor.submit(abs, -3).result(timeout=30) == 3
