"""What a ``CompositeException`` says: its first failure, where it happened, how many more.

The builtin ``ExceptionGroup`` says "multiple errors (3 sub-exceptions)", and a traceback
prints that line last, where users look. Built here from captured exceptions, no processes.
"""

from __future__ import annotations

import pickle

import pytest

from distexec.errors import (
    CapturedException,
    CompositeException,
    ProcessExitedException,
    RemoteDeserializationError,
    RemoteException,
)

pytestmark = pytest.mark.timeout(30)


def _remote(pid: int, ex: BaseException) -> RemoteException:
    return RemoteException(pid, CapturedException(ex, f"{type(ex).__name__}: {ex}"))


def test_one_failure_is_named_with_its_type_and_worker():
    group = CompositeException([_remote(2, NameError("name 'x' is not defined"))])
    assert str(group) == "NameError on worker 2: name 'x' is not defined"


def test_several_failures_name_the_first_and_count_the_others():
    group = CompositeException([_remote(3, ZeroDivisionError("division by zero")),
                                _remote(2, KeyError("k")), ProcessExitedException(4)])
    assert str(group) == "ZeroDivisionError on worker 3: division by zero (and 2 more errors)"
    assert str(CompositeException([_remote(3, ValueError("v")), _remote(2, ValueError("w"))])) \
        == "ValueError on worker 3: v (and 1 more error)"


def test_the_master_is_named_as_such():
    group = CompositeException([_remote(1, ValueError("bad"))])
    assert str(group) == "ValueError on the master (process 1): bad"


def test_a_local_failure_is_named_by_its_type():
    group = CompositeException([ProcessExitedException(5, exitcode=3)])
    assert str(group) == "ProcessExitedException: Worker 5 has exited (exit code 3)."


def test_a_failure_through_another_worker_names_where_it_happened_first():
    inner = _remote(3, ZeroDivisionError("division by zero"))
    group = CompositeException([_remote(2, inner)])
    assert str(group) == "ZeroDivisionError on worker 3: division by zero (through worker 2)"


def test_an_exception_that_could_not_be_rebuilt_keeps_its_type_name_and_message():
    stand_in = RemoteDeserializationError("mymodule.Gone", "it is gone", pid=2)
    captured = CapturedException(stand_in, "mymodule.Gone: it is gone", "mymodule.Gone")
    group = CompositeException([RemoteException(2, captured)])
    assert str(group) == "mymodule.Gone on worker 2: it is gone"


def test_a_message_of_its_own_comes_first_and_the_group_survives_pickling_and_split():
    group = CompositeException([_remote(2, ValueError("v")), _remote(3, KeyError("k"))],
                               "setting up")
    assert str(group) == "setting up: ValueError on worker 2: v (and 1 more error)"
    assert str(pickle.loads(pickle.dumps(group))) == str(group)
    keys, _rest = group.split(lambda e: isinstance(e, RemoteException) and e.pid == 3)
    assert str(keys) == "setting up: KeyError on worker 3: 'k'"
