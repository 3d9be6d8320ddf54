"""Unit tests of ``distexec.protocol.serialization`` and of references pickled outside it.

No processes, no sockets: ``dumps``/``loads`` are called directly, as the transport calls them.
"""

from __future__ import annotations

import pickle
import threading

import pytest

import distexec
from distexec.errors import DistributedError
from distexec.protocol import serialization
from distexec.protocol.serialization import OUT_OF_BAND_MIN, current_destination, dumps, loads
from tests.helpers import ZeroCopyBytes

pytestmark = pytest.mark.timeout(30)


class _SeesDestination:
    """Records ``current_destination()`` at the moment it is pickled."""

    seen: list = []

    def __reduce__(self):
        _SeesDestination.seen.append(current_destination())
        return (_SeesDestination, ())


class _FailsToPickle:
    def __reduce__(self):
        raise RuntimeError("refusing to be pickled")


# --------------------------------------------------------------------------------------------
# Out-of-band buffers
# --------------------------------------------------------------------------------------------
def test_buffer_at_the_threshold_goes_out_of_band():
    value = bytearray(b"\x01" * OUT_OF_BAND_MIN)
    payload, buffers = dumps(value, 2)
    assert [memoryview(b).nbytes for b in buffers] == [OUT_OF_BAND_MIN]
    assert len(payload) < 1024  # the data is not also copied into the pickle
    assert loads(payload, buffers) == value


def test_buffer_below_the_threshold_stays_in_band():
    value = bytearray(b"\x02" * (OUT_OF_BAND_MIN - 1))
    payload, buffers = dumps(value, 2)
    assert buffers == []
    assert len(payload) >= OUT_OF_BAND_MIN - 1
    assert loads(payload) == value


def test_only_the_large_buffers_of_a_message_go_out_of_band():
    small, large = ZeroCopyBytes(b"s" * 100), ZeroCopyBytes(b"L" * (3 * OUT_OF_BAND_MIN))
    payload, buffers = dumps((small, {"big": large}, "text"), 2)
    assert [memoryview(b).nbytes for b in buffers] == [3 * OUT_OF_BAND_MIN]
    # The sender's memory itself is referenced, not a copy of it.
    assert memoryview(buffers[0]).obj is large
    # The receiver gets the buffers as separate writable blocks (how the reader thread fills them).
    received = [bytearray(b) for b in buffers]
    small_back, mapping, text = loads(payload, received)
    assert type(small_back) is ZeroCopyBytes and small_back == small
    assert type(mapping["big"]) is ZeroCopyBytes and mapping["big"] == large
    assert text == "text"


def test_call_arguments_go_out_of_band_and_stay_shared():
    data = bytearray(b"\x03" * (2 * OUT_OF_BAND_MIN))
    small = bytearray(b"small")
    payload, buffers = dumps((len, (data, small), {"same": data, "n": 1}), 2)
    assert [memoryview(b).nbytes for b in buffers] == [2 * OUT_OF_BAND_MIN]  # sent once
    assert len(payload) < 1024
    fn, args, kwargs = loads(payload, [bytearray(b) for b in buffers])
    assert fn is len
    assert type(args[0]) is bytearray and args[0] == data
    assert args[1] == small
    assert kwargs["same"] is args[0]  # one object on the sender, one on the receiver
    assert kwargs["n"] == 1


def test_result_tuple_of_bytearrays_goes_out_of_band():
    first, second = bytearray(OUT_OF_BAND_MIN), bytearray(b"\x05" * OUT_OF_BAND_MIN)
    payload, buffers = dumps((first, second, "label"), 2)
    assert len(buffers) == 2
    assert loads(payload, [bytearray(b) for b in buffers]) == (first, second, "label")


def test_received_buffer_becomes_the_bytearray_without_a_copy():
    payload, buffers = dumps(bytearray(b"\x07" * OUT_OF_BAND_MIN), 2)
    received = bytearray(buffers[0])
    assert loads(payload, [received]) is received


def test_loads_without_the_buffers_fails():
    payload, buffers = dumps(bytearray(OUT_OF_BAND_MIN), 2)
    assert buffers
    with pytest.raises(pickle.UnpicklingError):
        loads(payload)


# --------------------------------------------------------------------------------------------
# The destination while pickling
# --------------------------------------------------------------------------------------------
def test_current_destination_is_set_only_during_dumps():
    _SeesDestination.seen.clear()
    assert current_destination() is None
    dumps([_SeesDestination()], 7)
    assert current_destination() is None
    dumps(_SeesDestination(), None)
    assert _SeesDestination.seen == [7, None]


def test_current_destination_is_restored_when_pickling_fails():
    with pytest.raises(RuntimeError, match="refusing to be pickled"):
        dumps([_FailsToPickle()], 4)
    assert current_destination() is None


def test_current_destination_is_per_thread():
    seen_elsewhere = []
    inside = threading.Event()
    release = threading.Event()

    class _Blocks:
        def __reduce__(self):
            inside.set()
            assert release.wait(10)
            return (int, ())

    thread = threading.Thread(target=dumps, args=(_Blocks(), 5), daemon=True)
    thread.start()
    assert inside.wait(10)
    seen_elsewhere.append(current_destination())
    release.set()
    thread.join(10)
    assert seen_elsewhere == [None]


def test_pickling_error_is_raised_from_dumps():
    with pytest.raises(TypeError, match="cannot pickle '_thread.lock'"):
        dumps({"lock": threading.Lock()}, 2)


def test_sys_exit_while_pickling_becomes_a_pickling_error():
    class _Exits:
        def __reduce__(self):
            raise SystemExit(4)

    with pytest.raises(pickle.PicklingError, match=r"pickling called sys.exit\(4\)") as info:
        dumps([_Exits()], 2)
    assert type(info.value.__cause__) is SystemExit


def test_lambdas_and_local_functions_pickle_by_value():
    def local(x, *, k):
        return x * k

    fn = loads(*dumps(local, 2))
    assert fn(3, k=4) == 12
    assert loads(*dumps(lambda: "lambda", 2))() == "lambda"


@pytest.mark.parametrize("call", [
    (pickle.dumps, (3, 5), {}),                  # a module's function, by name
    (divmod, (7, 2), {}),                        # a builtin of a module
    (pickle.loads, (b"N.",), {"encoding": "ASCII"}),
    (pickle.dumps, ("x" * 4096, None, True, 1.5, 2j), {}),
], ids=["function", "builtin", "kwargs", "every-plain-type"])
def test_a_plain_call_pickles_as_cloudpickle_pickles_it(call):
    import cloudpickle

    assert serialization.is_plain_call(call)
    payload, buffers = dumps(call, 2)
    assert payload == cloudpickle.dumps(call, protocol=5) and buffers == []
    fn, args, kwargs = loads(payload)
    assert fn is call[0] and (args, kwargs) == call[1:]


def _in_main_module():
    pass


_in_main_module.__module__ = "__main__"


@pytest.mark.parametrize("call", [
    (lambda: 1, (), {}),                         # no name to import it by
    (_in_main_module, (), {}),                   # __main__: shipped by value
    ("text".upper, (), {}),                      # a bound builtin method
    (pickle.dumps, ([1],), {}),                  # a list argument: cloudpickle's way
    (pickle.dumps, ("x" * 4097,), {}),           # a long string
    (pickle.dumps, (1,), {"protocol": [5]}),
    [pickle.dumps, (), {}],
    (pickle.dumps, tuple(range(17)), {}),
], ids=["lambda", "main", "bound-method", "list-arg", "long-str", "list-kwarg", "list",
        "many-args"])
def test_other_calls_take_cloudpickles_way(call):
    assert not serialization.is_plain_call(call)


def _module_with_a_function(name: str):
    """A fresh importable module ``name`` with ``double(x)``, as a user's module would be."""
    import sys
    import types

    module = types.ModuleType(name)
    exec("def double(x):\n    return 2 * x\n", vars(module))
    sys.modules[name] = module
    return module


def test_a_function_rebound_in_its_module_after_a_call_is_still_sent_as_itself():
    """The plain-call check is remembered per function; a later rebinding of the module's
    name must not make the old function travel as a reference to the new one."""
    import sys

    module = _module_with_a_function("distexec_test_rebound")
    try:
        old = module.double
        assert serialization.is_plain_call((old, (3,), {}))  # remembered as found by name
        module.double = lambda x: "the new one"
        assert not serialization.is_plain_call((old, (3,), {}))
        fn, args, _ = loads(dumps((old, (3,), {}), 2)[0])
        assert fn is not module.double and fn(*args) == 6
    finally:
        del sys.modules["distexec_test_rebound"]


def test_a_function_of_a_module_dropped_or_registered_by_value_goes_by_value():
    import sys

    import cloudpickle

    module = _module_with_a_function("distexec_test_by_value")
    fn = module.double
    try:
        assert serialization.is_plain_call((fn, (1,), {}))
        cloudpickle.register_pickle_by_value(module)
        try:
            assert not serialization.is_plain_call((fn, (1,), {}))
        finally:
            cloudpickle.unregister_pickle_by_value(module)
        assert serialization.is_plain_call((fn, (1,), {}))
    finally:
        del sys.modules["distexec_test_by_value"]
    assert not serialization.is_plain_call((fn, (1,), {}))  # no module to import it from
    assert loads(dumps((fn, (4,), {}), 2)[0])[0](4) == 8


# --------------------------------------------------------------------------------------------
# References pickled outside the cluster become inert null references
# --------------------------------------------------------------------------------------------
def test_future_pickled_with_plain_pickle_is_a_null_reference():
    fut = distexec.Future()
    fut.put(42)  # a cached value does not travel through plain pickle either
    copy = pickle.loads(pickle.dumps(fut))
    assert isinstance(copy, distexec.Future)
    assert copy.rrid == distexec.RRID(0, 0)
    assert copy != fut
    for operation in (copy.fetch, copy.wait, copy.isready, lambda: copy.put(1)):
        with pytest.raises(DistributedError, match="null reference: it was pickled outside the cluster"):
            operation()
    assert fut.fetch() == 42  # the original is untouched


def test_pending_future_pickled_with_plain_pickle_is_a_null_reference():
    fut = distexec.Future()
    copy = pickle.loads(pickle.dumps(fut))
    with pytest.raises(DistributedError, match="null reference"):
        copy.fetch(timeout=1)
    fut.put("later")
    assert fut.fetch() == "later"


def test_remote_channel_pickled_with_plain_pickle_is_a_null_reference():
    chan = distexec.RemoteChannel(size=3)
    chan.put("kept")
    copy = pickle.loads(pickle.dumps(chan))
    assert isinstance(copy, distexec.RemoteChannel)
    assert copy.rrid == distexec.RRID(0, 0)
    assert copy.size == 3
    for operation in (copy.fetch, copy.take, copy.isready, lambda: copy.put(1), copy.close):
        with pytest.raises(DistributedError, match="null reference: it was pickled outside the cluster"):
            operation()
    assert chan.take() == "kept"


def test_reference_unpickled_outside_the_transport_is_a_null_reference():
    # Pickled for a destination but unpickled with no receiving context (e.g. bytes stored
    # and loaded later): the reference cannot register with its owner, so it is inert.
    fut = distexec.Future()
    fut.put("value")
    copy = loads(*dumps(fut, 2))
    assert copy.rrid == distexec.RRID(0, 0)
    with pytest.raises(DistributedError, match="null reference"):
        copy.fetch()


def test_receiving_context_is_visible_while_loading_and_restored_after():
    marker = object()
    assert serialization.current_receiving() is None
    with serialization.receiving(marker, 3):
        assert serialization.current_receiving() == (marker, 3)
    assert serialization.current_receiving() is None


@pytest.fixture
def in_main():
    """``define(source)``: run ``source`` in ``__main__``, as a user's script defines its
    functions there; every name it bound is removed after the test."""
    import sys

    namespace = vars(sys.modules["__main__"])
    before = set(namespace)

    def define(source: str) -> dict:
        exec(source, namespace)
        return namespace

    yield define
    for name in set(namespace) - before:
        del namespace[name]


def test_a_function_of_main_is_built_once_where_it_arrives(in_main):
    main = in_main("def scaled(x, factor=2):\n    return x * factor\n")
    first = loads(dumps((main["scaled"], (5,), {}), 2)[0])[0]
    again = loads(dumps((main["scaled"], (5,), {}), 2)[0])[0]
    assert first is again and first is not main["scaled"] and first(5) == 10


def test_a_function_of_main_whose_defaults_changed_is_built_again(in_main):
    main = in_main("def scaled(x, factor=2):\n    return x * factor\n")
    before = loads(dumps((main["scaled"], (5,), {}), 2)[0])[0]
    main["scaled"].__defaults__ = (3,)
    after = loads(dumps((main["scaled"], (5,), {}), 2)[0])[0]
    assert after is not before and (before(5), after(5)) == (10, 15)


def test_a_function_of_main_over_a_mutable_closure_carries_its_current_contents(in_main):
    main = in_main("def reader(items):\n    return lambda: list(items)\n")
    items = [1]
    read = main["reader"](items)
    before = loads(dumps((read, (), {}), 2)[0])[0]
    items.append(2)
    after = loads(dumps((read, (), {}), 2)[0])[0]
    assert (before(), after()) == ([1], [1, 2])


def test_a_recursive_function_of_main_travels(in_main):
    main = in_main("def fact(n):\n    return 1 if n < 2 else n * fact(n - 1)\n")
    payload, _ = dumps((main["fact"], (5,), {}), 2)
    fn, args, _ = loads(payload)
    assert fn(*args) == 120


def test_a_function_of_main_with_a_large_closure_is_not_kept(in_main):
    """Sent whole each time anyway; kept, 256 of them could hold gigabytes on both sides."""
    from distexec.protocol import functions

    main = in_main("def reader(blob):\n    return lambda: len(blob)\n")
    read = main["reader"](b"x" * (1 << 20))
    first = loads(dumps((read, (), {}), 2)[0])[0]
    again = loads(dumps((read, (), {}), 2)[0])[0]
    assert first() == again() == 1 << 20 and first is not again
    assert read not in functions.pickled_functions.by_function
