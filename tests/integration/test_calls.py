"""Remote calls between real processes: the four call forms, local calls, nesting, load, eval,
out-of-band values, and which worker a link leads to (``worker_id_from_socket``).

The functions that run remotely are defined at module level; the workers import this module
by name (they share the master's ``sys.path`` and working directory).
"""

from __future__ import annotations

import itertools
import os
import socket
import threading

import pytest

import distexec
from distexec.errors import CompositeException, DistributedError, RemoteException
from distexec.protocol import serialization
from distexec.runtime.context import current_context, default_context
from tests.helpers import ZeroCopyBytes, wait_for_output, wait_until

pytestmark = pytest.mark.timeout(60)

DEADLINE = 20.0
_names = itertools.count()


def unique(prefix: str) -> str:
    """A global name no other test (or earlier run in this worker) used."""
    return f"{prefix}_{os.getpid()}_{next(_names)}"


def describe(a, b=None, *args, fn=None, target=None, self=None, **rest):
    """Echo every argument, with where it ran."""
    return {"a": a, "b": b, "args": args, "fn": fn, "target": target, "self": self,
            "rest": rest, "pid": distexec.myid()}


def put_described(chan, *args, **kwargs):
    chan.put(describe(*args, **kwargs))


def identity(x):
    return x


def divide(a, b):
    return a / b


def raise_value_error(message):
    raise ValueError(message)


# --------------------------------------------------------------------------------------------
# The four call forms
# --------------------------------------------------------------------------------------------
EXPECTED = {"a": 1, "b": "two", "args": (3,), "fn": "f", "target": "t", "self": "s",
            "rest": {"other": [4]}}
ARGS = (1, "two", 3)
KWARGS = {"fn": "f", "target": "t", "self": "s", "other": [4]}


def test_remotecall_fetch_passes_positional_and_keyword_arguments(shared_workers):
    for pid in shared_workers:
        assert distexec.remotecall_fetch(describe, pid, *ARGS, **KWARGS) == {**EXPECTED, "pid": pid}


def test_remotecall_returns_a_future_with_the_value(shared_workers):
    pid = shared_workers[0]
    future = distexec.remotecall(describe, pid, *ARGS, **KWARGS)
    assert isinstance(future, distexec.Future)
    assert future.where == pid and future.whence == 1
    assert future.fetch(timeout=DEADLINE) == {**EXPECTED, "pid": pid}
    assert future.done()


def test_remotecall_wait_returns_a_finished_future(shared_workers):
    pid = shared_workers[1]
    future = distexec.remotecall_wait(describe, pid, *ARGS, **KWARGS)
    assert isinstance(future, distexec.Future)
    assert future.where == pid
    assert future.done()  # it has run: concurrent.futures sees a finished future
    assert future.isready()
    assert future.fetch(timeout=DEADLINE) == {**EXPECTED, "pid": pid}


def test_remote_do_passes_positional_and_keyword_arguments(shared_workers):
    pid = shared_workers[0]
    chan = distexec.RemoteChannel(size=1)
    assert distexec.remote_do(put_described, pid, chan, *ARGS, **KWARGS) is None
    assert chan.take(timeout=DEADLINE) == {**EXPECTED, "pid": pid}


def test_keyword_arguments_named_like_the_api_parameters_reach_the_function(shared_workers):
    pid = shared_workers[0]
    only = {"fn": 1, "target": 2, "self": 3}
    expected = {"a": 0, "b": None, "args": (), "rest": {}, "pid": pid, **only}
    assert distexec.remotecall_fetch(describe, pid, 0, **only) == expected
    assert distexec.remotecall(describe, pid, 0, **only).fetch(timeout=DEADLINE) == expected
    assert distexec.remotecall_wait(describe, pid, 0, **only).fetch(timeout=DEADLINE) == expected


# --------------------------------------------------------------------------------------------
# Calls to this process run here, on the very same objects
# --------------------------------------------------------------------------------------------
def test_local_calls_see_the_same_objects(shared_workers):
    me = distexec.myid()
    assert me == 1
    unpicklable = threading.Lock()  # would fail if anything were pickled
    assert distexec.remotecall_fetch(identity, me, unpicklable) is unpicklable
    assert distexec.remotecall(identity, me, unpicklable).fetch(timeout=DEADLINE) is unpicklable
    assert distexec.remotecall_wait(identity, me, unpicklable).fetch(timeout=DEADLINE) is unpicklable
    assert distexec.remotecall_fetch(lambda *, fn: fn, me, fn=unpicklable) is unpicklable


def test_local_calls_mutate_the_callers_objects(shared_workers):
    shared: list = []
    distexec.remotecall_fetch(shared.append, 1, "fetch")
    distexec.remotecall_wait(shared.append, 1, "wait")
    distexec.remotecall(shared.append, 1, "call").wait(timeout=DEADLINE)
    distexec.remote_do(shared.append, 1, "do")
    wait_until(lambda: len(shared) == 4, DEADLINE, message="the local remote_do to run")
    assert sorted(shared) == ["call", "do", "fetch", "wait"]


def test_local_call_errors_are_remote_exceptions_from_pid_1(shared_workers):
    with pytest.raises(RemoteException) as info:
        distexec.remotecall_fetch(divide, 1, 1, 0)
    assert info.value.pid == 1
    assert isinstance(info.value.captured.ex, ZeroDivisionError)
    assert "divide" in info.value.captured.traceback_text

    future = distexec.remotecall(divide, 1, 1, 0)
    with pytest.raises(RemoteException) as info:
        future.fetch(timeout=DEADLINE)
    assert info.value.pid == 1 and isinstance(info.value.captured.ex, ZeroDivisionError)

    with pytest.raises(RemoteException) as info:
        distexec.remotecall_wait(divide, 1, 1, 0)
    assert info.value.pid == 1 and isinstance(info.value.captured.ex, ZeroDivisionError)


# --------------------------------------------------------------------------------------------
# Bad targets
# --------------------------------------------------------------------------------------------
CALL_FORMS = [distexec.remotecall, distexec.remotecall_fetch, distexec.remotecall_wait,
              distexec.remote_do]


@pytest.mark.parametrize("call", CALL_FORMS, ids=lambda f: f.__name__)
def test_unknown_pid_on_the_master_is_an_error(shared_workers, call):
    missing = max(distexec.procs()) + 1000
    with pytest.raises(DistributedError, match=f"^no process with id {missing} exists$"):
        call(identity, missing, 1)


@pytest.mark.parametrize("call", CALL_FORMS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("target", ["2", 2.0, None, True, [2]], ids=repr)
def test_non_integer_target_is_a_type_error(shared_workers, call, target):
    with pytest.raises(TypeError):
        call(identity, target, 1)


# --------------------------------------------------------------------------------------------
# Nested calls and chains never deadlock
# --------------------------------------------------------------------------------------------
def trail_back_and_forth(worker: int, depth: int) -> list[int]:
    """On ``worker``: call the master, which calls ``worker`` again, ``depth`` times."""
    here = distexec.myid()
    if depth == 0:
        return [here]
    other = 1 if here == worker else worker
    return [here] + distexec.remotecall_fetch(trail_back_and_forth, other, worker, depth - 1)


def test_nested_calls_master_worker_master_worker(shared_workers):
    pid = shared_workers[0]
    assert distexec.remotecall_fetch(trail_back_and_forth, pid, pid, 3) == [pid, 1, pid, 1]


def test_nested_calls_through_futures(shared_workers):
    pid = shared_workers[1]

    def outer():
        inner = distexec.remotecall(trail_back_and_forth, 1, pid, 2)
        return distexec.fetch(inner)

    assert distexec.remotecall(outer, pid).fetch(timeout=DEADLINE) == [1, pid, 1]


def chain(pids: list[int]) -> list[int]:
    """Call along ``pids`` one hop at a time; return the pids that ran, in order."""
    here = distexec.myid()
    if not pids:
        return [here]
    return [here] + distexec.remotecall_fetch(chain, pids[0], pids[1:])


def test_chain_across_three_processes(shared_workers):
    a, b = shared_workers
    assert distexec.remotecall_fetch(chain, a, [b, 1, a, b]) == [a, b, 1, a, b]


def test_many_concurrent_calls_from_many_threads(shared_workers):
    threads, calls_per_thread = 8, 20
    barrier = threading.Barrier(threads)
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait(DEADLINE)
            pid = shared_workers[index % 2]
            out = []
            for k in range(calls_per_thread):
                out.append(distexec.remotecall_fetch(describe, pid, index, k))
            results[index] = out
        except BaseException as exc:  # reported below
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(DEADLINE * 2)
    assert not errors
    assert sorted(results) == list(range(threads))
    for index, out in results.items():
        assert [(r["a"], r["b"], r["pid"]) for r in out] == [
            (index, k, shared_workers[index % 2]) for k in range(calls_per_thread)]


def test_concurrent_calls_run_concurrently_on_one_worker(shared_workers):
    # Every call runs on its own thread: 20 calls that each wait for all the others finish.
    pid = shared_workers[0]
    n = 20
    gate = distexec.RemoteChannel(size=n)
    futures = [distexec.remotecall(wait_for_all, pid, gate, n) for _ in range(n)]
    assert sorted(f.fetch(timeout=DEADLINE) for f in futures) == [n] * n


def wait_for_all(gate, n: int) -> int:
    """Announce ourselves in ``gate`` and return once ``n`` callers have (on the owner)."""
    gate.put(1)
    wait_until(lambda: len(gate) == n, DEADLINE, message=f"{n} concurrent calls")
    return len(gate)


# --------------------------------------------------------------------------------------------
# remote_do errors
# --------------------------------------------------------------------------------------------
def fail_loudly(token: str):
    raise RuntimeError(f"remote_do failed with {token}")


def test_remote_do_error_is_printed_on_the_worker_and_the_worker_keeps_serving(
        shared_workers, capfd):
    pid = shared_workers[1]
    token = unique("token")
    distexec.remote_do(fail_loudly, pid, token)
    output = wait_for_output(capfd, f"RuntimeError: remote_do failed with {token}",
                             timeout=DEADLINE, message="the remote_do error to be relayed",
                             stream="err")
    lines = output.splitlines()
    relayed = [line for line in lines if token in line]
    assert relayed and all(line.lstrip().startswith(f"From worker {pid}:") for line in relayed)
    assert any("fail_loudly" in line for line in lines)  # the remote traceback came along
    assert distexec.remotecall_fetch(distexec.myid, pid) == pid


# --------------------------------------------------------------------------------------------
# remotecall_eval
# --------------------------------------------------------------------------------------------
def test_remotecall_eval_expression_returns_its_value(shared_workers):
    pid = shared_workers[0]
    assert distexec.remotecall_eval("6 * 7", pid) == 42
    assert distexec.remotecall_eval("__import__('distexec').myid()", pid) == pid


def test_remotecall_eval_statement_defines_a_global_on_that_worker(shared_workers):
    a, b = shared_workers
    name = unique("defined")
    assert distexec.remotecall_eval(f"{name} = [1, 2, 3]\n{name}.append(4)", a) is None
    assert distexec.remotecall_eval(name, a) == [1, 2, 3, 4]
    with pytest.raises(RemoteException) as info:
        distexec.remotecall_eval(name, b)  # defined on one worker only
    assert isinstance(info.value.captured.ex, NameError)
    assert info.value.pid == b


def test_remotecall_eval_callable(shared_workers):
    pid = shared_workers[1]
    assert distexec.remotecall_eval(lambda: ("called", distexec.myid()), pid) == ("called", pid)


def test_remotecall_eval_error_with_one_pid_is_a_remote_exception(shared_workers):
    pid = shared_workers[0]
    with pytest.raises(RemoteException) as info:
        distexec.remotecall_eval("1 / 0", pid)
    assert info.value.pid == pid
    assert isinstance(info.value.captured.ex, ZeroDivisionError)


def test_remotecall_eval_on_several_pids_collects_failures(shared_workers):
    a, b = shared_workers
    name = unique("evaluated")
    code = (f"import distexec\n{name} = distexec.myid()\n"
            f"if distexec.myid() == {b}: raise KeyError('only on {b}')")
    with pytest.raises(CompositeException) as info:
        distexec.remotecall_eval(code, [a, b])
    failures = info.value.exceptions
    assert len(failures) == 1
    assert isinstance(failures[0], RemoteException) and failures[0].pid == b
    assert isinstance(failures[0].captured.ex, KeyError)
    # Every pid ran the code, the failing one included.
    assert distexec.remotecall_eval(name, a) == a
    assert distexec.remotecall_eval(name, b) == b


def test_remotecall_eval_on_several_pids_returns_none(shared_workers):
    name = unique("everywhere")
    assert distexec.remotecall_eval(f"{name} = 5", shared_workers) is None
    assert [distexec.remotecall_eval(name, p) for p in shared_workers] == [5, 5]


# --------------------------------------------------------------------------------------------
# Large values travel out of band
# --------------------------------------------------------------------------------------------
def checksum_and_flip(data):
    """Return ``data`` with its first byte inverted, plus facts about what arrived."""
    view = memoryview(data)
    data[0] ^= 0xFF
    return data, type(data).__name__, view.nbytes


@pytest.fixture
def wire_spy(monkeypatch):
    """Records the out-of-band buffer sizes of what the master sends and receives."""
    sent: list[list[int]] = []
    received: list[list[int]] = []
    real_dumps, real_loads = serialization.dumps, serialization.loads

    def dumps(obj, destination):
        payload, buffers = real_dumps(obj, destination)
        sent.append([memoryview(b).nbytes for b in buffers])
        return payload, buffers

    def loads(payload, buffers=()):
        received.append([memoryview(b).nbytes for b in buffers])
        return real_loads(payload, buffers)

    monkeypatch.setattr(serialization, "dumps", dumps)
    monkeypatch.setattr(serialization, "loads", loads)
    return sent, received


def test_64_mib_bytearray_round_trips_out_of_band(shared_workers, wire_spy):
    sent, received = wire_spy
    size = 64 * 1024 * 1024
    data = bytearray(range(256)) * (size // 256)
    data[12345] = 7
    expected_back = bytearray(data)
    expected_back[0] ^= 0xFF
    back, type_name, nbytes = distexec.remotecall_fetch(checksum_and_flip, shared_workers[0], data)
    assert (type_name, nbytes) == ("bytearray", size)
    assert type(back) is bytearray and len(back) == size
    assert back == expected_back
    assert data[0] == 0  # the caller's copy is not touched by the remote mutation
    assert [size] in sent and [size] in received


def test_buffer_protocol_object_round_trips_out_of_band(shared_workers, wire_spy):
    sent, received = wire_spy
    size = 4 * 1024 * 1024 + 3
    data = ZeroCopyBytes(os.urandom(size))
    back, type_name, nbytes = distexec.remotecall_fetch(checksum_and_flip, shared_workers[1], data)
    assert (type_name, nbytes) == ("ZeroCopyBytes", size)
    assert type(back) is ZeroCopyBytes
    assert back[0] == data[0] ^ 0xFF and back[1:] == data[1:]
    assert [size] in sent and [size] in received


def test_large_value_through_a_future(shared_workers):
    pid = shared_workers[0]
    size = 8 * 1024 * 1024
    future = distexec.remotecall(bytearray, pid, b"\x11" * size)
    assert future.fetch(timeout=DEADLINE) == bytearray(b"\x11" * size)


# --------------------------------------------------------------------------------------------
# worker_id_from_socket
# --------------------------------------------------------------------------------------------
def master_link_ids() -> tuple[int, int]:
    """On a worker: ``worker_id_from_socket`` of its link to the master (Connection, socket)."""
    link = current_context().record(1).conn
    return distexec.worker_id_from_socket(link), distexec.worker_id_from_socket(link.sock)


def test_worker_id_from_socket_names_the_peer_of_a_link(shared_workers):
    for pid in shared_workers:
        link = default_context().record(pid).conn
        assert distexec.worker_id_from_socket(link) == pid
        assert distexec.worker_id_from_socket(link.sock) == pid
    with socket.socket() as unrelated:
        assert distexec.worker_id_from_socket(unrelated) == -1
    for pid in shared_workers:
        assert distexec.remotecall_fetch(master_link_ids, pid) == (1, 1)
