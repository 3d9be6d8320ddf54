"""What users see when they pass bad input: the error, and the words that say what was wrong.

Each API that takes worker ids refuses a string, a float or a bool (a string is iterable:
``rmprocs("3")`` once removed worker 3), and says the same thing about a pid that does not
exist. What a call runs must be callable, checked before anything is sent. An argument that
cannot be pickled is named (position or keyword, and type); a group of failures names the first
one. ``addprocs`` with a missing working directory names the directory.
"""

from __future__ import annotations

import threading

import pytest

import distexec
from distexec import (
    CachingPool,
    CompositeException,
    DistributedError,
    DistributedExecutor,
    Future,
    LaunchWorkerError,
    RemoteChannel,
    WorkerPool,
)

pytestmark = pytest.mark.timeout(60)


def identity(*args, **kwargs):
    return args, kwargs


def _notes(exc: BaseException) -> list[str]:
    return getattr(exc, "__notes__", [])


# --------------------------------------------------------------------------------------------
# worker ids
# --------------------------------------------------------------------------------------------
PID_TAKERS = {
    "rmprocs": lambda pid: distexec.rmprocs(pid),
    "interrupt": lambda pid: distexec.interrupt(pid),
    "WorkerPool": lambda pid: WorkerPool(pid),
    "CachingPool": lambda pid: CachingPool(pid),
    "WorkerPool.push": lambda pid: WorkerPool().push(pid),
    "everywhere": lambda pid: distexec.everywhere("1", procs=pid),
    "remotecall_eval": lambda pid: distexec.remotecall_eval("1", pid),
    "clear": lambda pid: distexec.clear("unused_name", pid),
    "procs": lambda pid: distexec.procs(pid),
    "getstatus": lambda pid: distexec.getstatus(pid),
    "RemoteChannel": lambda pid: RemoteChannel(pid),
    "Future": lambda pid: Future(pid),
    "remotecall": lambda pid: distexec.remotecall(identity, pid),
}


@pytest.mark.parametrize("bad", ["as str", "as float"])
@pytest.mark.parametrize("api", sorted(PID_TAKERS))
def test_a_pid_that_is_not_an_int_is_a_type_error_and_nothing_happens(shared_workers, api, bad):
    pid = shared_workers[0]
    value = str(pid) if bad == "as str" else float(pid)
    with pytest.raises(TypeError) as info:
        PID_TAKERS[api](value)
    assert type(value).__name__ in str(info.value), str(info.value)
    assert repr(value) in str(info.value) or api == "remotecall"
    assert distexec.workers() == shared_workers  # nothing was removed


def test_a_string_of_digits_is_not_read_as_a_list_of_pids(shared_workers):
    digits = "".join(map(str, shared_workers))  # "23": once WorkerPool([2, 3])
    with pytest.raises(TypeError, match=f"^WorkerPool takes an iterable of worker ids "
                                        f"\\(int\\), not str '{digits}'$"):
        WorkerPool(digits)
    with pytest.raises(TypeError, match=f"^rmprocs takes worker ids \\(int\\) or iterables "
                                        f"of them, not str '{shared_workers[1]}'$"):
        distexec.rmprocs(str(shared_workers[1]))
    with pytest.raises(TypeError, match="^rmprocs takes worker ids \\(int\\), not float"):
        distexec.rmprocs([float(shared_workers[1])])
    assert distexec.workers() == shared_workers


UNKNOWN_PID_USERS = {
    "remotecall": lambda pid: distexec.remotecall(identity, pid),
    "remotecall_fetch": lambda pid: distexec.remotecall_fetch(identity, pid),
    "interrupt": lambda pid: distexec.interrupt(pid),
    "rmprocs": lambda pid: distexec.rmprocs(pid),
    "WorkerPool": lambda pid: distexec.remotecall_fetch(identity, WorkerPool([pid])),
    "CachingPool": lambda pid: distexec.remotecall_fetch(identity, CachingPool([pid])),
}


@pytest.mark.parametrize("api", sorted(UNKNOWN_PID_USERS))
def test_an_unknown_pid_gives_the_same_error_everywhere(shared_workers, api):
    missing = max(distexec.procs()) + 1000
    with pytest.raises(DistributedError) as info:
        UNKNOWN_PID_USERS[api](missing)
    assert str(info.value) == f"no process with id {missing} exists"


# --------------------------------------------------------------------------------------------
# what a call runs
# --------------------------------------------------------------------------------------------
CALLERS = {
    "remotecall": lambda fn, pid: distexec.remotecall(fn, pid),
    "remotecall_fetch": lambda fn, pid: distexec.remotecall_fetch(fn, pid),
    "remotecall_wait": lambda fn, pid: distexec.remotecall_wait(fn, pid),
    "remote_do": lambda fn, pid: distexec.remote_do(fn, pid),
    "spawnat": lambda fn, pid: distexec.spawnat(pid, fn),
    "pmap": lambda fn, pid: distexec.pmap(fn, [1, 2]),
    "remote": lambda fn, pid: distexec.remote(fn),
    "distributed_for": lambda fn, pid: distexec.distributed_for(fn, range(3)),
    "submit": lambda fn, pid: _submit(fn, pid),
}


def _submit(fn, pid):
    with DistributedExecutor(pool=WorkerPool([pid])) as executor:
        return executor.submit(fn)


@pytest.mark.parametrize("api", sorted(CALLERS))
def test_a_function_that_is_not_callable_fails_in_the_caller(shared_workers, api):
    with pytest.raises(TypeError) as info:
        CALLERS[api](5, shared_workers[0])
    assert str(info.value) == f"{api} needs a callable as the function to run, not int 5"


def test_everywhere_runs_only_code_or_callables(shared_workers):
    with pytest.raises(TypeError, match="^everywhere runs source code \\(a str\\) or a "
                                        "callable, not int$"):
        distexec.everywhere(5)


# --------------------------------------------------------------------------------------------
# arguments that cannot be pickled
# --------------------------------------------------------------------------------------------
SENDERS = {
    "remotecall_fetch": lambda pid, *a, **k: distexec.remotecall_fetch(identity, pid, *a, **k),
    "remotecall": lambda pid, *a, **k: distexec.remotecall(identity, pid, *a, **k),
    "remotecall_wait": lambda pid, *a, **k: distexec.remotecall_wait(identity, pid, *a, **k),
    "remote_do": lambda pid, *a, **k: distexec.remote_do(identity, pid, *a, **k),
    "through a pool": lambda pid, *a, **k: distexec.remotecall_fetch(identity, WorkerPool([pid]),
                                                                     *a, **k),
    "submit": lambda pid, *a, **k: _submit_args(pid, *a, **k),
}


def _submit_args(pid, *args, **kwargs):
    with DistributedExecutor(pool=WorkerPool([pid])) as executor:
        return executor.submit(identity, *args, **kwargs).result(timeout=20)


@pytest.mark.parametrize("api", sorted(SENDERS))
def test_an_unpicklable_argument_is_named_by_position_and_type(shared_workers, api):
    with pytest.raises(TypeError, match="cannot pickle '_thread.lock' object") as info:
        SENDERS[api](shared_workers[0], "fine", threading.Lock())
    assert _notes(info.value) == [
        "distexec could not send this call: argument args[1] (a _thread.lock) cannot be "
        "pickled."]


@pytest.mark.parametrize("api", sorted(SENDERS))
def test_an_unpicklable_keyword_argument_is_named(shared_workers, api):
    with pytest.raises(TypeError) as info:
        SENDERS[api](shared_workers[0], 1, guard=threading.Lock())
    assert _notes(info.value) == [
        "distexec could not send this call: keyword argument 'guard' (a _thread.lock) cannot "
        "be pickled."]


def test_pmap_names_the_unpicklable_argument(shared_workers):
    with pytest.raises(TypeError) as info:
        distexec.pmap(identity, [1, 2], [threading.Lock(), threading.Lock()])
    assert "distexec could not send this call: argument args[1] (a _thread.lock) cannot be " \
           "pickled." in _notes(info.value)


def test_a_remote_reference_among_the_arguments_is_not_blamed(shared_workers):
    channel = RemoteChannel()
    with pytest.raises(TypeError) as info:
        distexec.remotecall_fetch(identity, shared_workers[0], channel, threading.Lock())
    assert _notes(info.value) == [
        "distexec could not send this call: argument args[1] (a _thread.lock) cannot be "
        "pickled."]


# --------------------------------------------------------------------------------------------
# groups of failures
# --------------------------------------------------------------------------------------------
def test_everywhere_names_the_first_failure_its_worker_and_the_others(shared_workers):
    with pytest.raises(CompositeException) as info:
        distexec.everywhere("undefined_name + 1", procs=shared_workers)
    first = shared_workers[0]
    assert str(info.value) == (f"NameError on worker {first}: name 'undefined_name' is not "
                               "defined (and 1 more error)")


def test_a_failure_on_the_master_is_named_so(shared_workers):
    with pytest.raises(CompositeException) as info:
        distexec.everywhere("undefined_name + 1")
    assert str(info.value) == ("NameError on the master (process 1): name 'undefined_name' "
                               f"is not defined (and {len(shared_workers)} more errors)")


def test_sync_around_a_failing_loop_raises_one_flat_group(shared_workers):
    def fail_on_two(x):
        if x == 2:
            raise ValueError(f"bad item {x}")

    with pytest.raises(CompositeException) as info:
        with distexec.sync():
            distexec.distributed_for(fail_on_two, range(4))
    (failure,) = info.value.exceptions
    assert not isinstance(failure, CompositeException)
    assert str(info.value) == f"ValueError on worker {failure.pid}: bad item 2"


# --------------------------------------------------------------------------------------------
# launching
# --------------------------------------------------------------------------------------------
def test_addprocs_with_a_missing_directory_names_the_directory(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    before = distexec.procs()
    with pytest.raises(LaunchWorkerError) as info:
        distexec.addprocs(2, dir=str(missing))
    assert str(info.value) == (f"Unable to start worker process: its working directory "
                               f"dir={str(missing)!r} does not exist or is not a directory")
    assert distexec.procs() == before
