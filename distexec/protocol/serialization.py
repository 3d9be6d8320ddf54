"""Turning Python objects into a payload plus out-of-band buffers, and back.

Owns the cluster serializer: cloudpickle with pickle protocol 5, large contiguous buffers
taken out of band (sent straight from their memory, received into preallocated memory), and
the two pieces of context that remote references need while (un)pickling:

* the *destination* pid while pickling (``current_destination()``), so a reference knows
  whom it is being sent to (Julia's cluster serializer knows its stream's peer);
* the *receiving* context while unpickling, so an arriving reference can de-duplicate
  against the references this process already holds.

It also owns how the globals of ``__main__`` travel with the functions shipped by value
(Julia's rule for the globals of ``Main``): they are defined in the receiver's ``__main__``,
never overwrite a name the receiver bound itself, and with ``dumps_tracked`` are sent to a
destination only when it has not had the sender's current value yet.

May import ``distexec.errors``, ``distexec.protocol.tracebacks`` and ``.functions`` only.
"""

from __future__ import annotations

import collections
import contextvars
import copy
import io
import pickle
import sys
import threading
import types
from typing import Any

import cloudpickle

from . import functions
from . import tracebacks  # noqa: F401  (registers the CapturedException reducer)

#: Buffers smaller than this stay inside the pickle: a separate buffer costs more than a copy.
OUT_OF_BAND_MIN = 64 * 1024
#: Containers near a message's root longer than this are not searched for large bytearrays.
_WALK_MAX_ITEMS = 64

_destination: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "distexec_destination", default=None)
_receiving: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "distexec_receiving", default=None)


def current_destination() -> int | None:
    """The pid a value is being pickled for, or None outside the cluster transport."""
    return _destination.get()


def current_receiving():
    """What ``receiving()`` was given: ``(context, source_pid)``, or None."""
    return _receiving.get()


class receiving:
    """``with receiving(context, source_pid):`` unpickle what ``source_pid`` sent to ``context``.

    A class rather than a ``contextlib`` generator: it wraps every message received.
    """

    __slots__ = ("value", "token")

    def __init__(self, context: Any, source_pid: int):
        self.value = (context, source_pid)

    def __enter__(self):
        self.token = _receiving.set(self.value)

    def __exit__(self, *exc):
        _receiving.reset(self.token)
        return False


class _OutOfBand:
    """Pickles a large ``bytearray`` as an out-of-band buffer.

    Pickle writes a bytearray in band (copied into the payload) and its C implementation never
    consults a reducer for one, so the bytearrays a message carries directly are wrapped in this
    before pickling. Objects whose own reducer hands out a ``PickleBuffer`` (NumPy arrays, ...)
    need no help.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytearray):
        self.data = data

    def __reduce_ex__(self, protocol):
        return _bytearray_from_buffer, (pickle.PickleBuffer(self.data),)


def _bytearray_from_buffer(buffer) -> bytearray:
    # The receiver reads each out-of-band buffer into a fresh bytearray: use it as is.
    return buffer if type(buffer) is bytearray else bytearray(buffer)


def _wrap_large(obj: Any, memo: dict, depth: int) -> Any:
    """``obj`` with the large bytearrays near its root wrapped in :class:`_OutOfBand`.

    Looks at the root, the items of a small root tuple and their small tuple/dict items (so a
    call's ``(fn, args, kwargs)`` and a result tuple are covered) and copies a container only
    when something in it changed. ``memo`` keeps shared objects shared; a bytearray that is also
    referenced deeper in the message is sent twice (once out of band, once in band).
    """
    tp = type(obj)
    if tp is bytearray:
        if len(obj) < OUT_OF_BAND_MIN:
            return obj
        if id(obj) not in memo:
            memo[id(obj)] = _OutOfBand(obj)
        return memo[id(obj)]
    walk = (tp is tuple and depth > 0) or (tp is dict and depth == 1)
    if not walk or not obj or len(obj) > _WALK_MAX_ITEMS:
        return obj  # a long container costs more to walk than its bytearrays would save
    if id(obj) in memo:
        return memo[id(obj)]
    items = obj.items() if tp is dict else enumerate(obj)
    changed = None
    for key, item in items:
        if type(item) in _WALKED:  # the hot path (a small call) skips most items here
            new = _wrap_large(item, memo, depth - 1)
            if new is not item:
                if changed is None:
                    changed = dict(obj) if tp is dict else list(obj)
                changed[key] = new
    if changed is None:
        return obj
    memo[id(obj)] = changed if tp is dict else tuple(changed)
    return memo[id(obj)]


_WALKED = frozenset({bytearray, tuple, dict})


class _MainGlobals(dict):
    """Stands for the sender's ``__main__`` namespace; unpickles as the receiver's.

    cloudpickle gives every function it ships by value a fresh globals dict, so a global one
    task assigns is gone for the next, and ``everywhere("x = 1")`` is invisible to shipped
    functions. Functions from ``__main__`` get the receiver's ``__main__`` namespace instead:
    the globals they reference are defined there (Julia ships globals of ``Main`` into the
    worker's ``Main``; see ``_MainGlobalValues`` for when), and state kept in module globals
    lasts between calls, as it does with ``ProcessPoolExecutor``'s workers.
    """

    def __reduce__(self):
        return (_receiver_main_globals, ())


def _receiver_main_globals() -> dict:
    main = sys.modules.get("__main__")
    return main.__dict__ if main is not None else {}


# -- the values of __main__'s globals ---------------------------------------------------------
#
# Sender: each global of __main__ that a shipped function names travels with a token, which
# changes when the name is bound to another object here (the object is kept, so that its id
# is never reused for another). Receiver: a name is defined from the value when it is missing,
# or still holds the value this sender sent before; a name the receiver bound itself (by
# everywhere, an initializer, a task's ``global`` statement, ``clear``) is left alone, and so
# is a value sent again under the same token (the sender's value did not change: what the
# receiver did to it in place stays). ``dumps_tracked`` leaves out the values a destination
# has had under their current token (``SentGlobals``): that needs the messages to be unpickled
# in the order they were sent, as the executor's tasks are.

_MISSING = object()  # a value left out: the destination has it
_OWN = object()  # the receiver bound the name itself


class _Tokens:
    """This process's tokens for the globals of its ``__main__`` it ships."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, tuple[Any, int]] = {}  # name -> (value, token)
        self._next = 0

    def token(self, name: str, value: Any) -> int:
        with self._lock:
            last = self._last.get(name)
            if last is not None and last[0] is value:
                return last[1]
            self._next += 1
            self._last[name] = (value, self._next)
            return self._next


_tokens = _Tokens()


class SentGlobals:
    """The tokens of the ``__main__`` globals one destination has had from this process.

    Kept by a sender whose messages to that destination are unpickled in the order they were
    sent (the executor's tasks); ``commit`` what ``dumps_tracked`` shipped once the message
    is on its way.
    """

    __slots__ = ("_tokens",)

    def __init__(self) -> None:
        self._tokens: dict[str, int] = {}

    def has(self, name: str, token: int) -> bool:
        return self._tokens.get(name) == token

    def commit(self, shipped: dict[str, int]) -> None:
        self._tokens.update(shipped)

    def copy(self) -> "SentGlobals":
        copied = SentGlobals()
        copied._tokens = dict(self._tokens)
        return copied


class _MainGlobalValues:
    """The ``__main__`` globals one shipped function names: ``(name, token, value)`` each,
    the value ``_MISSING`` where the destination has it already. Unpickled, it defines them
    in the receiver's ``__main__`` (``_define_main_globals``) and stands for no globals at
    all, so that cloudpickle's own update of the function's globals changes nothing."""

    __slots__ = ("entries",)

    def __init__(self, entries: list[tuple[str, int, Any]]):
        self.entries = entries

    def __reduce__(self):
        # The names first, the values as their state: when a value cannot be rebuilt on the
        # receiver, it knows which globals it did not get (see loads). A value left out is
        # only a flag beside its name.
        names = [(name, token, value is not _MISSING) for name, token, value in self.entries]
        values = [value for _, _, value in self.entries if value is not _MISSING]
        return (_Announced, (names,), values)


class _Announced(dict):
    """Unpickled ``_MainGlobalValues``: empty globals (cloudpickle updates a function's
    globals with them), made with the names, then given the values (``__setstate__``), which
    it defines in this process's ``__main__``."""

    __slots__ = ("names",)

    def __init__(self, names: list[tuple[str, int, bool]]):
        super().__init__()
        self.names = names
        announcing = getattr(_loading, "announced", None)
        if announcing is not None:  # (None: unpickled by someone else than loads)
            announcing.append(self)

    def __setstate__(self, values: list) -> None:
        _define_main_globals(self, values)


class _Defined:
    """What the receiver defined from each sender: (source pid, name) -> (token, value); and
    the globals whose value could not be rebuilt here: (source pid, name) -> (token, error)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_source: dict[tuple[Any, str], tuple[int, Any]] = {}
        self.lost: dict[tuple[Any, str], tuple[int, BaseException]] = {}


_defined = _Defined()
_loading = threading.local()  # .announced: of the message loads is unpickling on this thread


def _define_main_globals(announced: _Announced, values: list) -> None:
    receiving = _receiving.get()
    source = receiving[1] if receiving is not None else None
    namespace = _receiver_main_globals()
    given = iter(values)
    with _defined.lock:
        for name, token, carried in announced.names:
            value = next(given) if carried else _MISSING
            key = (source, name)
            last = _defined.by_source.get(key)
            if last is not None and last[0] == token:
                continue  # the sender's value has not changed since it was sent
            if value is _MISSING:  # it was sent, and could not be rebuilt here
                raise _lost_again(name, token, _defined.lost.get(key))
            _defined.lost.pop(key, None)
            current = namespace.get(name, _MISSING)
            if current is _MISSING or (last is not None and current is last[1]):
                namespace[name] = value
                _defined.by_source[key] = (token, value)
            else:
                _defined.by_source[key] = (token, _OWN)
    announced.names = []


def _lost_again(name: str, token: int, lost: tuple[int, BaseException] | None) -> BaseException:
    """The error of a call that names a global whose value could not be rebuilt here when it
    was sent (the sender does not send it again): that error once more."""
    if lost is not None and lost[0] == token:
        try:
            return copy.copy(lost[1])
        except Exception:  # (an exception that cannot be copied: its words)
            return pickle.UnpicklingError(f"{type(lost[1]).__name__}: {lost[1]}")
    return pickle.UnpicklingError(
        f"global {name!r} of __main__ was left out as sent before, and it was not")


def _remember_lost(announced: list[_Announced], error: BaseException) -> None:
    """A message failed to unpickle: the globals it was defining are lost, with ``error``."""
    receiving = _receiving.get()
    source = receiving[1] if receiving is not None else None
    try:
        kept = copy.copy(error)  # (not the one raised: its traceback holds the frames)
    except Exception:
        kept = pickle.UnpicklingError(f"{type(error).__name__}: {error}")
    with _defined.lock:
        for names in announced:
            for name, token, _carried in names.names:
                last = _defined.by_source.get((source, name))
                if last is None or last[0] != token:
                    _defined.lost[(source, name)] = (token, kept)


def _share_main_globals(pickler) -> None:
    main = sys.modules.get("__main__")
    if main is not None:
        # cloudpickle looks each function's globals up here before making a fresh dict.
        pickler.globals_ref[id(main.__dict__)] = _MainGlobals()


# -- the file name of code shipped by value ----------------------------------------------------
_cloudpickle_code_reduce = cloudpickle.Pickler.dispatch_table.get(types.CodeType)


def _code_keeping_its_file_name(code: types.CodeType):
    """cloudpickle's reduction of a function's code, with the code's real ``co_filename``.

    cloudpickle writes ``"<dynamic-code>"`` instead (for payloads that do not depend on where
    a function was defined), and a traceback through a function of the user's script then
    names no file and shows no source line.
    """
    make, args = _cloudpickle_code_reduce(code)
    return _code_with_file_name, (make, args, code.co_filename)


def _code_with_file_name(make, args: tuple, filename: str) -> types.CodeType:
    return make(*args).replace(co_filename=filename)


class _ClusterPickler(cloudpickle.Pickler):
    """cloudpickle, with the ``__main__`` globals of functions shipped by value sent as
    ``_MainGlobalValues``, and their code keeping its file name."""

    if _cloudpickle_code_reduce is not None:  # (another cloudpickle: its own way)
        dispatch_table = collections.ChainMap({types.CodeType: _code_keeping_its_file_name,
                                               functions.LRU_TYPE: functions.lru_cache_reduce},
                                              cloudpickle.Pickler.dispatch_table)

    sent: SentGlobals | None = None  # the destination's, for dumps_tracked
    shipped: dict[str, int] | None = None  # what this message carries, for SentGlobals.commit
    alone: object = None  # a function pickled on its own, its globals left out

    def _function_reduce(self, obj):
        # cloudpickle's, with its test of "importable by name" remembered per function
        if functions.by_reference(obj):
            return NotImplemented
        return self._dynamic_function_reduce(obj)

    def _dynamic_function_reduce(self, func):
        main = sys.modules.get("__main__")
        if main is None or func.__globals__ is not main.__dict__:
            return super()._dynamic_function_reduce(func)
        if func is self.alone:
            reduced = super()._dynamic_function_reduce(func)
            reduced[2][1]["__globals__"] = {}
            return reduced
        reused = _reused_function_reduce(func, main.__dict__, self.sent, self.shipped)
        if reused is not None:
            return reused
        reduced = super()._dynamic_function_reduce(func)
        slotstate = reduced[2][1]
        slotstate["__globals__"] = _main_global_values(slotstate["__globals__"], self.sent,
                                                       self.shipped)
        return reduced


def _main_global_values(named: dict, sent: SentGlobals | None,
                        shipped: dict[str, int] | None) -> _MainGlobalValues:
    """The ``__main__`` globals a function names, as a message carries them: left out where
    ``sent`` says the destination has them, and recorded in ``shipped`` where not."""
    entries = []
    for name, value in named.items():
        token = _tokens.token(name, value)
        if sent is not None and sent.has(name, token):
            value = _MISSING
        elif shipped is not None:
            shipped[name] = token
        entries.append((name, token, value))
    return _MainGlobalValues(entries)


def _reused_function_reduce(func: types.FunctionType, namespace: dict,
                            sent: SentGlobals | None, shipped: dict[str, int] | None):
    """The reduction of a function of ``__main__`` that the receiver builds once from its
    bytes (``functions.built_function``), the globals it names beside them; None when its
    state is not decided by immutable objects (``functions.state_of``)."""
    if functions.code_globals is None:  # (another cloudpickle)
        return None
    named = {k: namespace[k] for k in functions.code_globals(func.__code__) if k in namespace}
    modules = tuple(v for v in named.values() if type(v) is types.ModuleType)
    state = functions.state_of(func, modules)
    if state is None:
        return None
    pickled = functions.pickled_functions.bytes_of(func, state, _pickle_alone)
    if not named:
        return functions.built_function, (pickled,)
    # The globals are its state, unpickled once the function exists: one may be the function
    # itself (a recursive one), or another that names it.
    return (functions.built_function, (pickled,), _main_global_values(named, sent, shipped),
            None, None, functions.globals_defined)


def _pickle_alone(func: types.FunctionType) -> bytes:
    """A function of ``__main__`` pickled on its own, without its globals (see functions.py)."""
    pickler = _ReusedPickler()
    pickler.pickler.alone = func
    payload, _buffers = pickler.dumps(func)  # (no out-of-band buffers: its values are small)
    return payload


class _ReusedPickler:
    """A cloudpickle Pickler and its output buffer, kept for the next message on this thread.

    Building a Pickler costs more than pickling a small call; between messages the memo,
    the globals table and the buffer are cleared, so nothing of one message reaches the next.
    """

    def __init__(self) -> None:
        self.file = io.BytesIO()
        self.buffers: list[memoryview] = []  # the current message's out-of-band buffers
        self.pickler = _ClusterPickler(self.file, protocol=5,
                                       buffer_callback=self._keep_large_out_of_band)

    def _keep_large_out_of_band(self, buf: pickle.PickleBuffer) -> bool:
        view = buf.raw()
        if view.nbytes < OUT_OF_BAND_MIN:
            return True  # serialise in band
        self.buffers.append(view)
        return False

    def dumps(self, obj: Any, sent: SentGlobals | None = None,
              shipped: dict[str, int] | None = None) -> tuple[bytes, list[memoryview]]:
        pickler, file = self.pickler, self.file
        buffers: list[memoryview] = []
        self.buffers = buffers
        pickler.globals_ref = {}  # cloudpickle's per-message table of shipped globals dicts
        pickler.sent, pickler.shipped = sent, shipped
        _share_main_globals(pickler)
        try:
            pickler.dump(obj)
            return file.getvalue(), buffers
        finally:
            pickler.clear_memo()
            pickler.globals_ref = {}
            pickler.sent = pickler.shipped = None
            file.seek(0)
            file.truncate()
            self.buffers = []  # the caller owns the list it was given


_PLAIN = frozenset({type(None), bool, int, float, complex, str, bytes})
_SIZED = frozenset({str, bytes})
_PLAIN_MAX = 4096


def is_plain(obj: Any) -> bool:
    """A small immutable builtin value: it pickles the same with plain pickle as with
    cloudpickle, and its pickle never fails either way."""
    tp = type(obj)
    return tp in _PLAIN and (tp not in _SIZED or len(obj) <= _PLAIN_MAX)


_PLAIN_ARGS_MAX = 16


def is_plain_call(obj: Any) -> bool:
    """``(fn, args, kwargs)`` of a function importable by name and a few plain arguments: plain
    pickle writes exactly what cloudpickle would, several times sooner.

    The common executor task (``submit(module.fn, 3)``); pickling it is most of what the
    master does per task, and the master shares the CPUs with the workers.
    """
    return _named(_function_of_plain_call(obj))


def _named(fn: Any) -> bool:
    """A module's builtin (math.sqrt, not a bound method) or a function importable by name."""
    if type(fn) is types.BuiltinFunctionType:
        return isinstance(fn.__self__, types.ModuleType)
    return type(fn) is types.FunctionType and functions.by_reference(fn)


def _function_of_plain_call(obj: Any) -> Any:
    """The function of a ``(fn, args, kwargs)`` with a few plain arguments, else None."""
    if type(obj) is not tuple or len(obj) != 3:
        return None
    fn, args, kwargs = obj
    if (type(args) is not tuple or type(kwargs) is not dict
            or len(args) + len(kwargs) > _PLAIN_ARGS_MAX):
        return None
    if not all(map(is_plain, args)) or (kwargs and not all(map(is_plain, kwargs.values()))):
        return None
    return fn


class _Reduced:
    """An object that pickles as the reduction it holds."""

    __slots__ = ("reduction",)

    def __init__(self, reduction: tuple):
        self.reduction = reduction

    def __reduce__(self):
        return self.reduction


def _plain_pickle(obj: Any, sent: SentGlobals | None,
                  shipped: dict[str, int] | None) -> bytes | None:
    """``obj`` pickled by plain pickle where that writes what cloudpickle would, sooner (a
    plain value, a call with plain arguments of a function importable by name, or of a
    function of ``__main__`` built from its bytes whose globals are plain or sent); else None."""
    if is_plain(obj):
        return pickle.dumps(obj, protocol=5)
    fn = _function_of_plain_call(obj)
    main = sys.modules.get("__main__")
    if (type(fn) is not types.FunctionType or main is None
            or fn.__globals__ is not main.__dict__ or fn.__module__ != "__main__"):
        return pickle.dumps(obj, protocol=5) if _named(fn) else None
    # (cloudpickle never names a function of __main__: it travels by value)
    reduced = _reused_function_reduce(fn, main.__dict__, sent, shipped)
    if reduced is None or (len(reduced) > 2 and not all(
            value is _MISSING or is_plain(value) for _, _, value in reduced[2].entries)):
        return None
    return pickle.dumps((_Reduced(reduced), obj[1], obj[2]), protocol=5)


class _Picklers(threading.local):
    idle: _ReusedPickler | None = None


_picklers = _Picklers()


def dumps(obj: Any, destination: int | None) -> tuple[bytes, list[memoryview]]:
    """Pickle ``obj`` for process ``destination``; returns (payload, out-of-band buffers).

    Raises whatever pickling raises (a ``SystemExit`` from a ``__reduce__`` as
    ``pickle.PicklingError``); nothing has been sent at that point.
    """
    payload = _plain_pickle(obj, None, None)
    if payload is not None:
        return payload, []
    return _dumps(obj, destination, None, None)


def dumps_tracked(obj: Any, destination: int,
                  sent: SentGlobals) -> tuple[bytes, list[memoryview], dict[str, int]]:
    """Like ``dumps``, leaving out the ``__main__`` globals ``destination`` has had (``sent``).

    Also returns the tokens of the globals the payload carries: ``sent.commit`` them once it
    is sent. Only for messages the destination unpickles in the order they were sent.
    """
    shipped: dict[str, int] = {}
    payload = _plain_pickle(obj, sent, shipped)
    if payload is not None:
        return payload, [], shipped
    payload, buffers = _dumps(obj, destination, sent, shipped)
    return payload, buffers, shipped


#: multiprocessing's own words when one of its objects is pickled outside a child's start.
_INHERITED_ONLY = "should only be shared between processes through inheritance"


def _dumps(obj: Any, destination: int | None, sent: SentGlobals | None,
           shipped: dict[str, int] | None) -> tuple[bytes, list[memoryview]]:
    # Take this thread's pickler; a reducer that sends a message of its own meanwhile
    # (nested dumps) finds none idle and builds a fresh one.
    pickler, _picklers.idle = _picklers.idle or _ReusedPickler(), None
    token = _destination.set(destination)
    try:
        return pickler.dumps(_wrap_large(obj, {}, 2), sent, shipped)
    except SystemExit as exc:
        # A __reduce__ that calls sys.exit fails this one message: it must neither end
        # the master (an argument) nor escape a worker's reply, leaving its caller
        # waiting forever (a result). Callers handle pickling errors as Exceptions.
        raise pickle.PicklingError(f"pickling called sys.exit({exc.code!r})") from exc
    except RuntimeError as exc:
        if _INHERITED_ONLY not in str(exc):
            raise
        raise pickle.PicklingError(
            f"{exc}: multiprocessing's Queue, Lock, Value, Array and the other objects of its "
            "synchronization reach only child processes, by inheritance, and distexec's "
            "workers are not children of this process. Pass a multiprocessing.Manager() "
            "proxy instead (manager.Queue(), manager.Lock(), manager.dict()), or use a "
            "distexec.RemoteChannel") from exc
    finally:
        _destination.reset(token)
        _picklers.idle = pickler


#: Unpickling imports modules. Two calls unpickled at once on two threads can import a
#: package and one of its submodules that import each other; Python's per-module import locks
#: then report a deadlock and both calls fail with "partially initialized module". A process
#: unpickles one message at a time, as a ProcessPoolExecutor worker does.
_UNPICKLING = threading.RLock()


def loads(payload, buffers=()) -> Any:
    """Unpickle a payload with its out-of-band buffers (call inside ``receiving()``)."""
    with _UNPICKLING:
        outer = getattr(_loading, "announced", None)  # (a message inside a message: a batch)
        announced: list[_Announced] = []
        _loading.announced = announced
        try:
            return pickle.loads(payload, buffers=buffers)
        except BaseException as exc:
            _remember_lost(announced, exc)
            raise
        finally:
            _loading.announced = outer
