"""How failures of remote calls reach the caller, between real processes.

Each test checks what the caller observes (exception type, attributes, text) and, for the
failures that could break a connection, that the same worker serves the next call. The
serialization faults of spec/faults.md (S1-S13), through both the Julia-style layer and the
executor, are the tables of tests/faults/test_serialization.py; the tests here add the other
call forms (``remotecall``, ``remotecall_wait``, ``remote_do``, ``remotecall_eval``).
"""

from __future__ import annotations

import os
import sys
import threading
import traceback

import pytest

import distexec
from distexec.errors import (
    CapturedException,
    DistexecError,
    ProcessExitedException,
    RemoteDeserializationError,
    RemoteException,
    RemoteTraceback,
)

pytestmark = pytest.mark.timeout(60)

DEADLINE = 20.0


class CustomError(Exception):
    """An exception type both sides can import."""

    def __init__(self, message, code):
        super().__init__(message, code)
        self.code = code

    def __str__(self):
        return f"{self.args[0]} (code {self.code})"


def _refuse_to_unpickle():
    raise RuntimeError("this object refuses to be unpickled")


class FailsToUnpickle:
    """Pickles fine; rebuilding it raises (on whichever process unpickles it)."""

    def __reduce__(self):
        return (_refuse_to_unpickle, ())


class FailsToPickleHere:
    """Refuses to be pickled in the process that created it."""

    def __init__(self):
        self.origin = os.getpid()

    def __reduce__(self):
        if os.getpid() == self.origin:
            raise RuntimeError("refusing to be pickled here")
        return (FailsToPickleHere, ())


def raise_custom(message, code):
    raise CustomError(message, code)


def call_and_fail(pid, message):
    """On one worker: call ``raise_custom`` on ``pid`` (a second level of remote failure)."""
    return distexec.remotecall_fetch(raise_custom, pid, message, 3)


def return_a_lock():
    return threading.Lock()


def return_fails_to_unpickle():
    return FailsToUnpickle()


def set_global(name, value):
    globals()[name] = value


def get_global(name):
    return globals().get(name)


def exit_with(code):
    sys.exit(code)


def worker_facts():
    return distexec.myid(), os.getpid()


def ignore(*args):
    return "ran"


# --------------------------------------------------------------------------------------------
# What a RemoteException carries
# --------------------------------------------------------------------------------------------
def test_remote_exception_carries_the_original_exception(shared_workers):
    pid = shared_workers[0]
    with pytest.raises(RemoteException) as info:
        distexec.remotecall_fetch(raise_custom, pid, "it broke", 42)
    exc = info.value
    assert exc.pid == pid
    assert isinstance(exc.captured, CapturedException)
    assert type(exc.captured.ex) is CustomError
    assert exc.captured.ex.code == 42
    assert exc.ex is exc.captured.ex
    assert exc.captured.type_name == f"{CustomError.__module__}.CustomError"
    text = exc.captured.traceback_text
    assert "raise_custom" in text and "it broke (code 42)" in text
    assert type(exc.__cause__) is RemoteTraceback and text.rstrip() in exc.__cause__.tb
    assert str(exc) == f"On worker {pid}: {exc.captured.type_name}: it broke (code 42)"


def test_remote_frames_are_kept_as_frames_and_printed_once(shared_workers):
    pid = shared_workers[1]
    with pytest.raises(RemoteException) as info:
        distexec.remotecall_fetch(raise_custom, pid, "frames", 1)
    assert [frame.name for frame in info.value.captured.stack][-1] == "raise_custom"
    assert info.value.captured.stack[-1].line == "raise CustomError(message, code)"
    assert info.value.__cause__.stack is info.value.captured.stack
    # Standard printing of the caller's exception shows the remote frames through __cause__.
    printed = "".join(traceback.format_exception(info.value))
    assert printed.count("in raise_custom") == 1 and "frames (code 1)" in printed


def test_remote_exception_from_every_call_form(shared_workers):
    pid = shared_workers[0]
    future = distexec.remotecall(raise_custom, pid, "via future", 2)
    with pytest.raises(RemoteException) as info:
        future.fetch(timeout=DEADLINE)
    assert info.value.pid == pid and type(info.value.captured.ex) is CustomError
    assert isinstance(future.exception(timeout=DEADLINE), RemoteException)

    with pytest.raises(RemoteException) as info:
        distexec.remotecall_wait(raise_custom, pid, "via wait", 3)
    assert info.value.pid == pid and info.value.captured.ex.code == 3


def test_nested_failures_keep_both_levels(shared_workers):
    a, b = shared_workers
    with pytest.raises(RemoteException) as info:
        distexec.remotecall_fetch(call_and_fail, a, b, "deep failure")
    outer = info.value
    assert outer.pid == a
    inner = outer.captured.ex
    assert isinstance(inner, RemoteException)
    assert inner.pid == b
    assert type(inner.captured.ex) is CustomError
    assert "deep failure" in str(inner.captured.ex)
    assert "call_and_fail" in outer.captured.traceback_text
    assert "raise_custom" in inner.captured.traceback_text
    assert f"On worker {b}:" in str(outer)


@pytest.mark.fault("S7")
def test_exception_class_defined_only_on_the_worker(shared_workers):
    pid = shared_workers[0]
    module = f"distexec_test_only_on_worker_{os.getpid()}"
    distexec.remotecall_eval("class OnlyThere(Exception):\n    pass", pid, module=module)
    raising = "def fail():\n    raise OnlyThere('defined over there')"
    distexec.remotecall_eval(raising, pid, module=module)
    with pytest.raises(RemoteException) as info:
        distexec.remotecall_eval("fail()", pid, module=module)
    assert module not in sys.modules  # the class really does not exist here
    exc = info.value
    assert exc.pid == pid
    stand_in = exc.captured.ex
    assert isinstance(stand_in, RemoteDeserializationError)
    assert stand_in.type_name == f"{module}.OnlyThere"
    assert stand_in.message == "defined over there"
    assert "OnlyThere: defined over there" in stand_in.traceback_text
    assert "in fail" in stand_in.traceback_text
    assert f"{module}.OnlyThere" in str(stand_in) and "defined over there" in str(stand_in)
    assert exc.captured.type_name == f"{module}.OnlyThere"
    assert "defined over there" in str(exc)


# --------------------------------------------------------------------------------------------
# Pickling failures fail one call, never the connection
# --------------------------------------------------------------------------------------------
@pytest.mark.fault("S1", "S2")
@pytest.mark.parametrize("call", [distexec.remotecall, distexec.remotecall_fetch,
                                  distexec.remotecall_wait, distexec.remote_do],
                         ids=lambda f: f.__name__)
def test_unpicklable_argument_raises_in_the_caller_and_sends_nothing(shared_workers, call):
    pid = shared_workers[0]
    name = f"not_sent_{call.__name__}_{os.getpid()}"
    with pytest.raises(TypeError, match="cannot pickle"):
        call(set_global, pid, name, threading.Lock())
    with pytest.raises(RuntimeError, match="refusing to be pickled here"):
        call(set_global, pid, name, FailsToPickleHere())
    # The worker never saw the calls, and the connection is still in step.
    assert distexec.remotecall_fetch(get_global, pid, name) is None
    distexec.remotecall_fetch(set_global, pid, name, "sent")
    assert distexec.remotecall_fetch(get_global, pid, name) == "sent"


@pytest.mark.fault("S5")
def test_unpicklable_result_of_a_future_fails_its_fetch_only(shared_workers):
    pid = shared_workers[1]
    future = distexec.remotecall(return_a_lock, pid)
    with pytest.raises(RemoteException) as info:
        future.fetch(timeout=DEADLINE)
    assert "could not be sent" in str(info.value)
    assert distexec.remotecall(worker_facts, pid).fetch(timeout=DEADLINE)[0] == pid


@pytest.mark.fault("S3")
def test_argument_that_fails_to_unpickle_on_the_worker(shared_workers):
    pid = shared_workers[0]
    with pytest.raises(RemoteException) as info:
        distexec.remotecall_fetch(ignore, pid, FailsToUnpickle())
    assert info.value.pid == pid
    assert isinstance(info.value.captured.ex, RuntimeError)
    assert "refuses to be unpickled" in str(info.value)

    future = distexec.remotecall(ignore, pid, FailsToUnpickle())
    with pytest.raises(RemoteException, match="refuses to be unpickled"):
        future.fetch(timeout=DEADLINE)
    with pytest.raises(RemoteException, match="refuses to be unpickled"):
        distexec.remotecall_wait(ignore, pid, FailsToUnpickle())

    assert distexec.remotecall_fetch(ignore, pid, "fine") == "ran"


def test_result_that_fails_to_unpickle_on_the_caller(shared_workers):
    pid = shared_workers[1]
    with pytest.raises(RemoteException) as info:
        distexec.remotecall_fetch(return_fails_to_unpickle, pid)
    assert isinstance(info.value.captured.ex, RuntimeError)
    assert "refuses to be unpickled" in str(info.value)
    assert distexec.remotecall_fetch(ignore, pid) == "ran"


# --------------------------------------------------------------------------------------------
# Exceptions that would end a process end only the call
# --------------------------------------------------------------------------------------------
def test_system_exit_in_a_call_fails_the_call_and_the_worker_survives(shared_workers):
    pid = shared_workers[0]
    before = distexec.remotecall_fetch(worker_facts, pid)
    with pytest.raises(RemoteException) as info:
        distexec.remotecall_fetch(exit_with, pid, 3)
    assert info.value.pid == pid
    assert type(info.value.captured.ex) is SystemExit
    assert info.value.captured.ex.code == 3
    with pytest.raises(RemoteException) as info:
        distexec.remotecall(exit_with, pid, 4).fetch(timeout=DEADLINE)
    assert type(info.value.captured.ex) is SystemExit
    assert distexec.remotecall_fetch(worker_facts, pid) == before
    assert pid in distexec.workers()


def test_process_exited_exception_is_not_a_remote_exception():
    assert not issubclass(ProcessExitedException, RemoteException)
    assert issubclass(ProcessExitedException, DistexecError)
    assert issubclass(RemoteException, DistexecError)
