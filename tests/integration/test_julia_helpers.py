"""The Julia-style helpers: ``spawnat``/``spawn``/``fetchfrom``/``fetchany``, ``with sync():``,
``everywhere``, ``clear``, ``remote``, the pool forms of the call API, integer-like targets,
``remotecall_eval`` with repeated pids, and the public names of API.md §2
(spec/distributednext.md §4.5–4.9, §8).

Real workers on loopback. The tests that need a cluster without workers come first and remove
any they find (``no_workers``); the rest share the module's two ``shared_workers`` (a test
that needs a third worker adds it with ``add_workers``, which removes it after). Work that must
not finish yet waits on a *gate*, a master-owned RemoteChannel the test feeds; what remote code
did is logged into a master-owned unbounded RemoteChannel.
"""

from __future__ import annotations

import inspect
import itertools
import numbers
import os
import sys
from collections import Counter

import cloudpickle
import pytest

import distexec
from distexec import (
    CachingPool,
    CompositeException,
    RemoteChannel,
    RemoteException,
    WorkerPool,
    clear,
    default_worker_pool,
    distributed_for,
    everywhere,
    fetchany,
    fetchfrom,
    remote,
    remotecall_eval,
    set_default_worker_pool,
    spawn,
    spawnat,
    sync,
)
from tests.helpers import PickleCounter, drain, in_thread, new_log, pickles, wait_until

pytestmark = pytest.mark.timeout(60)

# Functions defined here travel by value, so workers never import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

DEADLINE = 10.0  # seconds for something that must happen
_names = itertools.count()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
@pytest.fixture
def name():
    """A fresh global name; removed from the master's ``__main__`` after the test."""
    fresh = f"helpers_{os.getpid()}_{next(_names)}"
    yield fresh
    sys.modules["__main__"].__dict__.pop(fresh, None)


@pytest.fixture
def restore_default_pool():
    """Put the master's default pool back after a test that replaces it."""
    saved = default_worker_pool()
    yield
    set_default_worker_pool(saved)


def master_global(name: str, default=NameError):
    """The value of global ``name`` in the master's ``__main__`` (``default`` if undefined)."""
    return sys.modules["__main__"].__dict__.get(name, default)


def global_on(pid: int, name: str):
    """The value of global ``name`` in ``__main__`` on ``pid``; the class NameError if undefined."""
    def read(n):
        return sys.modules["__main__"].__dict__.get(n, NameError)
    return distexec.remotecall_fetch(read, pid, name)


def set_main_global(name, value, *, tag=None):
    """Runs on each process: define ``name`` in ``__main__`` with where it ran."""
    sys.modules["__main__"].__dict__[name] = (value, tag, distexec.myid())


# --------------------------------------------------------------------------------------------
# without workers (first: these remove workers)
# --------------------------------------------------------------------------------------------
def test_without_workers_spawn_and_fetchany_run_on_the_master(no_workers):
    assert fetchany(distexec.myid) == 1
    assert spawn(distexec.myid).fetch() == 1
    future = spawnat("any", lambda x, *, y: (x + y, distexec.myid()), 1, y=2)
    assert future.where == 1
    assert future.fetch() == (3, 1)
    assert fetchfrom(1, distexec.myid) == 1


def test_without_workers_everywhere_and_clear_act_on_the_master(no_workers, name):
    assert everywhere(f"{name} = 'here'") is None
    assert master_global(name) == "here"
    clear(name)  # default procs: workers(), which is [1] without workers
    assert master_global(name) is None


# --------------------------------------------------------------------------------------------
# spawnat, spawn, fetchfrom, fetchany
# --------------------------------------------------------------------------------------------
def test_spawnat_returns_a_future_computed_on_that_pid(shared_workers):
    for pid in shared_workers:
        future = spawnat(pid, lambda x, *, y: (x * y, distexec.myid()), 6, y=7)
        assert isinstance(future, distexec.Future)
        assert future.where == pid
        assert future.fetch() == (42, pid)


def test_spawnat_the_master_runs_locally(shared_workers):
    future = spawnat(1, distexec.myid)
    assert future.where == 1 and future.fetch() == 1


def test_fetchfrom_returns_the_value_computed_there(shared_workers):
    a, b = shared_workers
    assert fetchfrom(b, lambda x, *, y: (x - y, distexec.myid()), 10, y=3) == (7, b)
    with pytest.raises(RemoteException) as info:
        fetchfrom(a, lambda: 1 / 0)
    assert info.value.pid == a and isinstance(info.value.captured.ex, ZeroDivisionError)


def test_keyword_arguments_named_like_the_parameters_reach_the_function(shared_workers):
    a = shared_workers[0]
    echo = lambda **kw: kw  # noqa: E731
    kwargs = {"p": 1, "fn": 2, "procs": 3, "target": 4}
    assert spawnat(a, echo, **kwargs).fetch() == kwargs
    assert spawn(echo, **kwargs).fetch() == kwargs
    assert fetchfrom(a, echo, **kwargs) == kwargs
    assert fetchany(echo, **kwargs) == kwargs


def test_fetchany_hits_every_worker_once_in_nworkers_calls(shared_workers):
    n = distexec.nworkers()
    assert sorted(fetchany(distexec.myid) for _ in range(n)) == distexec.workers()
    assert sorted(fetchany(distexec.myid) for _ in range(n)) == distexec.workers()


@pytest.mark.parametrize("spawner", [spawn, lambda fn: spawnat("any", fn)],
                         ids=["spawn", "spawnat-any"])
def test_spawn_is_round_robin_over_the_workers(shared_workers, spawner):
    n = distexec.nworkers()
    placed = [spawner(distexec.myid) for _ in range(3 * n)]
    pids = [f.fetch() for f in placed]
    assert [f.where for f in placed] == pids
    for start in range(0, 3 * n, n):  # every window of n consecutive calls: each worker once
        assert sorted(pids[start:start + n]) == distexec.workers()


def test_round_robin_includes_a_worker_added_later(shared_workers, add_workers):
    (c,) = add_workers(1)
    n = distexec.nworkers()
    assert n == 3
    assert sorted(fetchany(distexec.myid) for _ in range(n)) == sorted([*shared_workers, c])


@pytest.mark.parametrize("p", ["ANY", "all", "", "2"])
def test_spawnat_with_another_string_is_a_value_error(shared_workers, p):
    with pytest.raises(ValueError, match="any"):
        spawnat(p, distexec.myid)


# --------------------------------------------------------------------------------------------
# with sync()
# --------------------------------------------------------------------------------------------
def test_sync_waits_for_spawnat_spawn_and_distributed_for_without_fetching(shared_workers):
    a, b = shared_workers
    gate, log = RemoteChannel(), new_log()

    def gated(tag):
        gate.take()
        log.put(tag)
        return tag

    with sync() as pending:
        started = [spawnat(a, gated, "a"), spawnat(b, gated, "b"), spawn(gated, "any"),
                   spawnat("any", gated, "any2")]
        loop = distributed_for(lambda x: gated(x), range(3))
        assert pending == [*started, loop]
        assert not any(f.done() for f in [*started, loop])
        for _ in range(len(started) + 3):
            gate.put("go")  # the work can only finish after this
    assert all(f.done() for f in started)  # done, though nobody fetched them
    assert loop.done()
    assert Counter(drain(log)) == Counter(["a", "b", "any", "any2", 0, 1, 2])
    assert [f.fetch() for f in started] == ["a", "b", "any", "any2"]


def test_sync_collects_every_failure(shared_workers):
    a, b = shared_workers
    with pytest.raises(CompositeException) as info:
        with sync():
            ok = spawnat(a, lambda: "fine")
            spawnat(a, lambda: 1 / 0)
            spawnat(b, lambda: {}["missing"])
            spawnat(1, lambda: int("x"))
            loop = distributed_for(lambda x: 1 / (x - 1), range(4))
    failures = info.value.exceptions
    assert all(isinstance(f, RemoteException) for f in failures)  # the loop's too: not nested
    assert Counter(type(f.captured.ex) for f in failures) == Counter(
        [ZeroDivisionError, KeyError, ValueError, ZeroDivisionError])
    assert {(f.pid, type(f.captured.ex)) for f in failures[:3]} == {
        (a, ZeroDivisionError), (b, KeyError), (1, ValueError)}  # the spawns, in their order
    assert ok.done() and ok.fetch() == "fine"
    assert loop.done()


def test_sync_with_nothing_spawned_returns_at_once(shared_workers):
    with sync() as pending:
        assert distexec.remotecall_fetch(distexec.myid, shared_workers[0]) == shared_workers[0]
    assert pending == []  # plain calls are not collected


def test_nested_sync_blocks_wait_for_their_own(shared_workers):
    a, b = shared_workers
    outer_gate, inner_gate = RemoteChannel(), RemoteChannel()
    with sync() as outer:
        slow = spawnat(a, lambda g: g.take(), outer_gate)
        with sync() as inner:
            quick = spawnat(b, lambda g: g.take(), inner_gate)
            inner_gate.put("go")
        assert inner == [quick] and quick.done()
        assert not slow.done()  # the inner block did not wait for the outer block's work
        after = spawn(lambda: "after")
        outer_gate.put("go")
    assert outer == [slow, after]
    assert slow.done() and after.done()
    assert (slow.fetch(), quick.fetch(), after.fetch()) == ("go", "go", "after")


def test_a_failing_inner_sync_leaves_the_outer_block_running(shared_workers):
    a, b = shared_workers
    gate = RemoteChannel()
    with sync() as outer:
        slow = spawnat(a, lambda g: g.take(), gate)
        with pytest.raises(CompositeException) as info:
            with sync():
                spawnat(b, lambda: 1 / 0)
        (failure,) = info.value.exceptions
        assert failure.pid == b
        gate.put("go")
    assert outer == [slow] and slow.done()


def test_sync_collects_only_in_its_own_thread(shared_workers):
    gate = RemoteChannel()
    with sync() as pending:
        elsewhere = in_thread(spawnat, shared_workers[0], lambda g: g.take(), gate)
        other = elsewhere.result(DEADLINE)
    assert pending == []
    assert not other.done()
    gate.put("go")
    assert other.fetch(timeout=DEADLINE) == "go"


# --------------------------------------------------------------------------------------------
# everywhere
# --------------------------------------------------------------------------------------------
def test_everywhere_code_defines_a_global_on_every_process_master_included(shared_workers, name):
    assert everywhere(f"import distexec\n{name} = ('defined', distexec.myid())") is None
    assert master_global(name) == ("defined", 1)
    for pid in shared_workers:
        assert global_on(pid, name) == ("defined", pid)


def test_everywhere_calls_a_callable_with_arguments(shared_workers, name):
    assert everywhere(set_main_global, name, [1, 2], tag="t") is None
    assert master_global(name) == ([1, 2], "t", 1)
    for pid in shared_workers:
        assert global_on(pid, name) == ([1, 2], "t", pid)


def test_everywhere_passes_arguments_only_to_a_callable(shared_workers, name):
    with pytest.raises(TypeError):
        everywhere(f"{name} = 1", 2)
    assert master_global(name) is NameError


def test_everywhere_with_a_list_of_procs_runs_only_there(shared_workers, name):
    a, b = shared_workers
    everywhere(f"{name} = 'only here'", procs=[a])
    assert global_on(a, name) == "only here"
    assert global_on(b, name) is NameError
    assert master_global(name) is NameError


def test_everywhere_with_one_pid_returns_the_value(shared_workers):
    a, b = shared_workers
    assert everywhere("6 * 7", procs=a) == 42
    assert everywhere(distexec.myid, procs=b) == b
    assert everywhere(lambda x, *, y: (x, y, distexec.myid()), 1, y=2, procs=a) == (1, 2, a)
    assert everywhere(distexec.myid, procs=1) == 1
    with pytest.raises(RemoteException) as info:
        everywhere("1 / 0", procs=b)
    assert info.value.pid == b


def test_everywhere_collects_one_failure_per_failing_process(shared_workers, name):
    a, b = shared_workers
    code = (f"import distexec\n{name} = 'ran'\n"
            f"if distexec.myid() != {a}: raise KeyError(distexec.myid())")
    with pytest.raises(CompositeException) as info:
        everywhere(code)
    failures = info.value.exceptions
    assert len(failures) == 2
    assert all(isinstance(f, RemoteException) for f in failures)
    assert sorted((f.pid, f.captured.ex.args) for f in failures) == [(1, (1,)), (b, (b,))]
    # the failing processes ran the code too
    assert master_global(name) == "ran"
    assert [global_on(p, name) for p in shared_workers] == ["ran", "ran"]


def test_everywhere_import_statements(shared_workers, name):
    everywhere(f"import colorsys as {name}")
    assert master_global(name).__name__ == "colorsys"
    for pid in shared_workers:
        assert distexec.remotecall_eval(f"{name}.__name__", pid) == "colorsys"
    everywhere(f"from json import dumps as {name}")
    for pid in shared_workers:
        assert distexec.remotecall_eval(f"{name}([1])", pid) == "[1]"


def test_everywhere_in_another_module(shared_workers, name):
    module = f"distexec_test_ns_{name}"
    try:
        everywhere(f"{name} = __name__", module=module)
        assert sys.modules[module].__dict__[name] == module
        for pid in shared_workers:
            assert distexec.remotecall_eval(name, pid, module=module) == module
            assert global_on(pid, name) is NameError  # not in __main__
        assert master_global(name) is NameError
    finally:
        sys.modules.pop(module, None)


def test_processes_added_later_do_not_get_the_definitions(shared_workers, add_workers, name):
    everywhere(f"{name} = 'early'")
    (late,) = add_workers(1)
    assert global_on(late, name) is NameError
    assert [global_on(p, name) for p in shared_workers] == ["early", "early"]


# --------------------------------------------------------------------------------------------
# clear
# --------------------------------------------------------------------------------------------
def test_clear_sets_the_global_to_none_only_where_defined(shared_workers, name):
    a, b = shared_workers
    distexec.remotecall_eval(f"{name} = 'set'", a)
    sys.modules["__main__"].__dict__[name] = "master's"
    assert clear(name) is None  # default procs: the workers
    assert global_on(a, name) is None
    assert global_on(b, name) is NameError  # not created where it was not defined
    assert master_global(name) == "master's"


def test_clear_a_list_of_names_on_a_list_of_procs(shared_workers, name):
    a, b = shared_workers
    other = name + "_other"
    try:
        everywhere(f"{name} = 1\n{other} = 2")
        clear([name, other], [1, b])
        assert (master_global(name), master_global(other)) == (None, None)
        assert (global_on(b, name), global_on(b, other)) == (None, None)
        assert (global_on(a, name), global_on(a, other)) == (1, 2)
    finally:
        sys.modules["__main__"].__dict__.pop(other, None)


def test_clear_on_one_pid(shared_workers, name):
    a, b = shared_workers
    everywhere(f"{name} = 'kept'")
    clear(name, b)
    assert global_on(b, name) is None
    assert global_on(a, name) == "kept"
    assert master_global(name) == "kept"


def test_clear_in_another_module(shared_workers, name):
    a = shared_workers[0]
    module = f"distexec_test_ns_{name}"
    try:
        everywhere(f"{name} = 1", procs=[a])
        everywhere(f"{name} = 2", procs=[a], module=module)
        clear(name, a, module=module)
        assert distexec.remotecall_eval(name, a, module=module) is None
        assert global_on(a, name) == 1  # __main__'s was left alone
    finally:
        sys.modules.pop(module, None)


def test_clear_collects_failures_and_still_clears_the_others(shared_workers, name):
    a = shared_workers[0]
    everywhere(f"{name} = 1", procs=[a])
    missing = max(distexec.procs()) + 1000
    with pytest.raises(CompositeException) as info:
        clear(name, [missing, a])
    (failure,) = info.value.exceptions
    assert f"no process with id {missing}" in str(failure)
    assert global_on(a, name) is None


def test_clear_a_caching_pool_makes_it_ship_functions_again(shared_workers):
    a = shared_workers[0]
    pool = CachingPool([a])
    counter = PickleCounter()

    def work(x):
        assert counter is not None
        return x + 1, distexec.myid()

    call = remote(work, pool)
    pickles.clear()
    assert [call(1), call(2)] == [(2, a), (3, a)]
    assert len(pickles) == 1  # shipped once
    assert clear(pool) is pool
    assert call(3) == (4, a)
    assert len(pickles) == 2  # shipped again after clear


# --------------------------------------------------------------------------------------------
# remote and the pool forms of the calls
# --------------------------------------------------------------------------------------------
def test_remote_uses_the_default_pool_of_each_call(shared_workers, restore_default_pool):
    a, b = shared_workers
    where = remote(lambda x: (x, distexec.myid()))
    set_default_worker_pool(WorkerPool([a]))
    assert where(1) == (1, a)
    set_default_worker_pool(WorkerPool([b]))
    assert where(2) == (2, b)


def test_remote_with_a_pool(shared_workers):
    a, b = shared_workers
    assert remote(lambda *, k: (k, distexec.myid()), WorkerPool([b]))(k="v") == ("v", b)
    assert remote(distexec.myid, CachingPool([a]))() == a
    with pytest.raises(RemoteException) as info:
        remote(lambda: 1 / 0, WorkerPool([a]))()
    assert info.value.pid == a


def test_remotecall_fetch_and_wait_through_a_pool(shared_workers):
    a, b = shared_workers
    pool = WorkerPool([b])
    assert distexec.remotecall_fetch(lambda x: (x, distexec.myid()), pool, 5) == (5, b)
    assert pool.isready()
    future = distexec.remotecall_wait(distexec.myid, pool)
    assert future.where == b and future.fetch() == b
    assert pool.isready()


def test_remotecall_through_a_pool_keeps_the_worker_until_the_future_completes(shared_workers):
    a = shared_workers[0]
    pool = WorkerPool([a])
    gate = RemoteChannel()
    future = distexec.remotecall(lambda g: (g.take(), distexec.myid()), pool, gate)
    assert future.where == a
    assert not pool.isready()
    gate.put("go")
    wait_until(pool.isready, DEADLINE, message="the worker to go back to the pool")
    assert future.fetch() == ("go", a)


def test_remote_do_through_a_pool(shared_workers):
    b = shared_workers[1]
    pool, done = WorkerPool([b]), RemoteChannel()
    assert distexec.remote_do(lambda d: d.put(distexec.myid()), pool, done) is None
    assert done.take() == b


# --------------------------------------------------------------------------------------------
# integer-like targets
# --------------------------------------------------------------------------------------------
class Pid:
    """An integer-like worker id that is not an int (registered as a ``numbers.Integral``)."""

    def __init__(self, value: int):
        self.value = value

    def __int__(self) -> int:
        return self.value

    __index__ = __int__

    def __eq__(self, other):
        return isinstance(other, int) and other == self.value

    __hash__ = object.__hash__


numbers.Integral.register(Pid)


def _numpy_int64(value):
    numpy = pytest.importorskip("numpy", reason="numpy is not installed")
    return numpy.int64(value)


@pytest.fixture(params=["numbers.Integral", "numpy.int64"])
def as_pid(request):
    """A function making an integer-like, non-int worker id."""
    return Pid if request.param == "numbers.Integral" else _numpy_int64


def test_an_integer_like_target_is_accepted(shared_workers, as_pid, name):
    a, b = shared_workers
    target = as_pid(b)
    assert not isinstance(target, int)
    assert distexec.remotecall_fetch(distexec.myid, target) == b
    assert distexec.remotecall(distexec.myid, target).fetch() == b
    assert distexec.remotecall_wait(distexec.myid, target).fetch() == b
    assert spawnat(target, distexec.myid).fetch() == b
    assert fetchfrom(target, distexec.myid) == b
    assert remotecall_eval("__import__('distexec').myid()", target) == b
    assert everywhere(distexec.myid, procs=target) == b
    everywhere(f"{name} = 1", procs=[as_pid(a), target])
    clear(name, target)
    assert (global_on(a, name), global_on(b, name)) == (1, None)
    clear(name, [as_pid(a)])
    assert global_on(a, name) is None


# --------------------------------------------------------------------------------------------
# remotecall_eval with a pid listed twice
# --------------------------------------------------------------------------------------------
def test_remotecall_eval_evaluates_once_per_listed_pid(shared_workers):
    a, b = shared_workers
    log = new_log()
    assert remotecall_eval(lambda: log.put(distexec.myid()), [a, a, 1, b, 1, a]) is None
    assert Counter(drain(log)) == Counter({a: 3, 1: 2, b: 1})


def test_everywhere_with_a_pid_listed_twice_runs_twice(shared_workers, name):
    a = shared_workers[0]
    everywhere(f"{name} = []", procs=[a])
    everywhere(f"{name}.append(1)", procs=[a, a])
    assert global_on(a, name) == [1, 1]


# --------------------------------------------------------------------------------------------
# the public names of API.md §2
# --------------------------------------------------------------------------------------------
API_NAMES = [
    "addprocs", "rmprocs", "procs", "other_procs", "workers", "other_workers", "nprocs",
    "nworkers", "myid", "interrupt", "getstatus", "setstatus", "cluster_cookie",
    "remotecall", "remotecall_wait", "remotecall_fetch", "remote_do", "remotecall_eval",
    "remote", "spawnat", "spawn", "fetchfrom", "fetchany", "everywhere", "distributed_for",
    "sync", "pmap", "ExponentialBackOff", "Future", "RemoteChannel", "Channel",
    "fetch", "put", "take", "isready", "wait", "close", "remoteref_id", "channel_from_id",
    "RRID", "worker_id_from_socket", "AbstractWorkerPool", "WorkerPool", "CachingPool",
    "default_worker_pool", "set_default_worker_pool", "clear",
    *(f"{verb}_worker_{kind}_callback" for verb in ("add", "remove")
      for kind in ("starting", "started", "exiting", "exited")),
    "DistexecError", "RemoteException", "CapturedException", "ProcessExitedException",
    "CompositeException", "LaunchWorkerError", "AuthenticationError", "ProtocolError",
    "ChannelClosedError",
]


@pytest.mark.parametrize("public", API_NAMES)
def test_api_name_is_public(public):
    assert public in distexec.__all__
    assert callable(getattr(distexec, public))


@pytest.mark.parametrize("method", ["push", "put", "take", "__len__", "isready", "wait",
                                    "workers", "nworkers"])
def test_pool_operations_exist(method):
    for kind in (distexec.AbstractWorkerPool, WorkerPool, CachingPool):
        assert callable(getattr(kind, method))
    assert callable(CachingPool.clear)


def test_composite_exception_is_an_exception_group():
    if sys.version_info < (3, 11):
        from exceptiongroup import ExceptionGroup
    else:
        from builtins import ExceptionGroup
    assert issubclass(distexec.CompositeException, ExceptionGroup)


@pytest.mark.parametrize("fn, params", [
    ("remotecall", "fn target / *args **kwargs"),
    ("remotecall_fetch", "fn target / *args **kwargs"),
    ("remotecall_wait", "fn target / *args **kwargs"),
    ("remote_do", "fn target / *args **kwargs"),
    ("remotecall_eval", "code procs * module"),
    ("remote", "fn pool"),
    ("spawnat", "p fn / *args **kwargs"),
    ("spawn", "fn / *args **kwargs"),
    ("fetchfrom", "p fn / *args **kwargs"),
    ("fetchany", "fn / *args **kwargs"),
    ("everywhere", "code_or_fn / *args procs module **kwargs"),
    ("distributed_for", "body iterable reducer"),
    ("clear", "names_or_pool procs * module"),
    ("pmap", "fn *iterables pool distributed batch_size on_error retry_delays retry_check "
             "progress"),
    ("rmprocs", "*pids waitfor"),
    ("interrupt", "*pids grace"),
    ("getstatus", "pid"),
    ("setstatus", "x pid"),
    ("cluster_cookie", "cookie"),
])
def test_api_signature(fn, params):
    """The parameter names and kinds of API.md §2; keyword-only additions are listed here:
    ``rmprocs`` adds ``callback_timeout`` (filtered below), ``interrupt`` adds ``grace``."""
    described = _signature_tokens(getattr(distexec, fn))
    assert [t for t in described if t != "callback_timeout"] == params.split()


def _signature_tokens(fn) -> list[str]:
    """``def f(a, /, b, *c, d, **e)`` -> ``["a", "/", "b", "*c", "d", "**e"]`` (a bare ``*``
    marks keyword-only parameters that follow no ``*args``)."""
    kinds = inspect.Parameter
    tokens, previous = [], None
    for param in inspect.signature(fn).parameters.values():
        if previous is kinds.POSITIONAL_ONLY and param.kind is not kinds.POSITIONAL_ONLY:
            tokens.append("/")
        if param.kind is kinds.KEYWORD_ONLY and previous not in (kinds.KEYWORD_ONLY,
                                                                 kinds.VAR_POSITIONAL):
            tokens.append("*")
        prefix = {kinds.VAR_POSITIONAL: "*", kinds.VAR_KEYWORD: "**"}.get(param.kind, "")
        tokens.append(prefix + param.name)
        previous = param.kind
    if previous is kinds.POSITIONAL_ONLY:
        tokens.append("/")
    return tokens
