"""How functions travel: by reference (the answer remembered per function), or by value once.

Owns the caches that keep the sender and the receiver of a call from doing the same work for
every call of the same function, and the way an ``lru_cache`` of ``__main__`` travels. Imports
cloudpickle and the standard library only; ``serialization`` (the cluster pickler) uses it.

* **By reference.** cloudpickle's test of whether a function is importable by name costs a
  search of its module; the answer is kept per function (``by_reference``).
* **By value, once.** A function of ``__main__`` (a script's, a notebook's) cannot be named on
  a worker, so it travels by value: cloudpickle walks its code, closure, defaults and the
  globals it names, and the receiver builds a new function from that, for every call. That
  is 40-50 µs of a 130 µs round trip, and most of what a master does per submitted task. A
  function whose state can change only by rebinding it (its closure values, defaults and
  attributes are immutable: ``state_of``) is pickled once, *without* its globals, and every
  message carries those bytes; the receiver builds the function once per distinct bytes
  (``built_function``) and uses it again. The globals it names still travel with each
  message, as before (serialization's ``_MainGlobalValues``), so rebinding one is seen.

    sender:   fn ──state_of──► unchanged since pickled? ──► the same bytes (no walk)
                                └─ changed, or new ──► pickle fn alone again, keep the bytes
    receiver: built_function(bytes) ──► the function built from these bytes (on first sight),
              then its globals, unpickled as its state, defined in the receiver's __main__

Each message stays whole on its own: nothing depends on what a destination received before,
so a message that fails to unpickle fails alone, and any path (executor, ``remotecall``) may
use it. A function rebuilt on the receiver is the same object from one call to the next, as
a ``ProcessPoolExecutor`` worker's module-level function is: attributes a task sets on it stay.
"""

from __future__ import annotations

import functools
import operator
import pickle
import sys
import types
from typing import Any, Callable

import cloudpickle

_cloudpickle = getattr(cloudpickle, "cloudpickle", None)
# cloudpickle's own test of whether it writes a function as a reference (module + name);
# without it (another cloudpickle), every call takes cloudpickle's way.
_pickled_by_reference = getattr(_cloudpickle, "_should_pickle_by_reference", None)
#: the modules ``cloudpickle.register_pickle_by_value`` names (None: another cloudpickle)
_by_value_modules = getattr(_cloudpickle, "_PICKLE_BY_VALUE_MODULES", None)
#: the global names a code object reads (cloudpickle's, cached per code object)
code_globals: Callable[[types.CodeType], Any] | None = getattr(
    _cloudpickle, "_extract_code_globals", None)

_BY_REFERENCE_MAX = 1024
#: module-level function -> (its module, its name): where cloudpickle found it last time
_found_by_name: dict[types.FunctionType, tuple[types.ModuleType, str]] = {}


def by_reference(fn: types.FunctionType) -> bool:
    """cloudpickle's test of whether ``fn`` is pickled by reference, remembered per function.

    A function it accepted is looked up by its name again each time (it may have been
    rebound, or its module dropped), which is all that can change, unless a module is
    registered to be pickled by value: then cloudpickle decides every time.
    """
    seen = _found_by_name.get(fn)
    if (seen is not None and not _by_value_modules
            and sys.modules.get(fn.__module__) is seen[0] and vars(seen[0]).get(seen[1]) is fn):
        return True
    if _pickled_by_reference is None or not _pickled_by_reference(fn):
        return False
    name = fn.__qualname__
    module = sys.modules.get(fn.__module__)
    if "." not in name and module is not None:  # (a method is found in two steps: not kept)
        if len(_found_by_name) >= _BY_REFERENCE_MAX:
            _found_by_name.clear()
        _found_by_name[fn] = (module, name)
    return True


# -- by value, once ----------------------------------------------------------------------------

_IMMUTABLE = frozenset({type(None), bool, int, float, complex, str, bytes, range,
                        type(Ellipsis), type(NotImplemented)})
_STABLE_ITEMS_MAX = 64
_CACHE_MAX = 256
#: A function whose pickle is larger (a big constant in its closure, say) is not kept, on
#: either side: it would be sent whole anyway, and 256 of them could hold gigabytes.
_KEPT_BYTES_MAX = 64 * 1024


def _stable(value: Any, depth: int = 2) -> bool:
    """Whether ``value`` pickles the same for as long as it is the same object: immutable,
    or named by reference (a module, an importable function or class)."""
    tp = type(value)
    if tp in _IMMUTABLE or tp is types.ModuleType:
        return True
    if tp is tuple or tp is frozenset:
        return (depth > 0 and len(value) <= _STABLE_ITEMS_MAX
                and all(_stable(item, depth - 1) for item in value))
    if tp is types.FunctionType:
        return by_reference(value)
    if tp is types.BuiltinFunctionType:  # a module's (math.sqrt); a bound one carries its object
        return isinstance(value.__self__, types.ModuleType)
    if isinstance(value, type):
        return _pickled_by_reference is not None and _pickled_by_reference(value)
    return False


def state_of(fn: types.FunctionType, module_globals: tuple) -> tuple | None:
    """Everything of ``fn`` its pickle (globals left out) depends on, as objects compared by
    identity; None when an immutable object does not determine it (a list in its closure, a
    dict in its defaults, an empty cell): then it is pickled whole each time.

    ``module_globals``: the modules among the globals it names, which decide the submodules
    its pickle imports on arrival.
    """
    closure = fn.__closure__
    contents: tuple = ()
    if closure:
        try:
            contents = tuple(cell.cell_contents for cell in closure)
        except ValueError:  # a cell not filled yet
            return None
    defaults = fn.__defaults__
    kwdefaults = fn.__kwdefaults__
    attributes = fn.__dict__
    values = contents + (defaults or ())
    if kwdefaults:
        values += tuple(kwdefaults.values())
    if attributes:
        values += tuple(attributes.values())
    if not all(map(_stable, values)):
        return None
    kw = _flat(kwdefaults) if kwdefaults else ()
    attrs = _flat(attributes) if attributes else ()
    # (each part of variable length after its length: two different states never flatten alike)
    return (fn.__code__, defaults, fn.__name__, fn.__qualname__, fn.__module__, fn.__doc__,
            fn.__annotations__, len(contents), *contents, len(kw), *kw, len(attrs), *attrs,
            *module_globals)


def _flat(mapping: dict) -> tuple:
    return tuple(x for pair in mapping.items() for x in pair)


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


class _Pickled:
    """The sender's: each function of ``__main__`` pickled alone, with the state it had."""

    def __init__(self) -> None:
        self.by_function: dict[types.FunctionType, tuple[tuple, bytes]] = {}

    def bytes_of(self, fn: types.FunctionType, state: tuple,
                 pickle_alone: Callable[[types.FunctionType], bytes]) -> bytes:
        """``fn`` pickled alone (``pickle_alone``), again only if its state changed."""
        kept = self.by_function.get(fn)
        if kept is not None and _same(kept[0], state):
            return kept[1]
        pickled = pickle_alone(fn)
        if len(pickled) > _KEPT_BYTES_MAX:
            return pickled
        if len(self.by_function) >= _CACHE_MAX:
            self.by_function.clear()
        # (Keeping fn and its state alive keeps every id compared in _same from being reused.)
        self.by_function[fn] = (state, pickled)
        return pickled


pickled_functions = _Pickled()
_built: dict[bytes, types.FunctionType] = {}


def built_function(pickled: bytes) -> types.FunctionType:
    """The receiver's: the function these bytes make, built once."""
    if len(pickled) > _KEPT_BYTES_MAX:
        return pickle.loads(pickled)
    fn = _built.get(pickled)
    if fn is None:
        fn = pickle.loads(pickled)
        if len(_built) >= _CACHE_MAX:
            _built.clear()
        _built[pickled] = fn
    return fn


def globals_defined(fn: types.FunctionType, _defined: Any) -> None:
    """The state of a function from ``built_function``: the globals it names, which
    unpickling them has defined in this process's ``__main__``, where it reads them."""


# -- functools.lru_cache of __main__ ----------------------------------------------------------
#
# An lru_cache wrapper pickles by name, which a worker cannot resolve for one of the script.
# It travels as its parameters and its function instead, and each worker keeps one wrapper per
# name, so that what it cached stays from call to call, as in a ProcessPoolExecutor worker
# (where the script's module-level wrapper is the worker's own).

LRU_TYPE = type(functools.lru_cache(maxsize=None)(lambda: None))


class _LateTarget:
    """What a rebuilt wrapper calls: the function, set once unpickled (the function may name
    the wrapper itself, so the wrapper must exist first)."""

    __slots__ = ("fn",)

    def __init__(self) -> None:
        self.fn: Callable | None = None

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)  # type: ignore[misc]


def lru_cache_reduce(wrapper):
    """The cluster pickler's reduction of an ``lru_cache`` wrapper: by value for one of
    ``__main__`` or one made in a function, by name (pickle's own) otherwise."""
    fn = getattr(wrapper, "__wrapped__", None)
    named = (getattr(wrapper, "__module__", None) != "__main__"
             and "<locals>" not in getattr(wrapper, "__qualname__", "<locals>"))
    if named or not callable(fn):
        return wrapper.__reduce__()
    params = wrapper.cache_parameters()
    return (lru_cached, (wrapper.__qualname__, params["maxsize"], params["typed"]), fn,
            None, None, lru_cached_function)


_lru_wrappers: dict[str, Any] = {}


def lru_cached(qualname: str, maxsize: int | None, typed: bool):
    """The receiver's wrapper for ``qualname``: the one it has, or a new one."""
    kept = _lru_wrappers.get(qualname)
    if kept is not None and kept.cache_parameters() == {"maxsize": maxsize, "typed": typed}:
        return kept
    wrapper = functools.lru_cache(maxsize=maxsize, typed=typed)(_LateTarget())
    vars(wrapper)["_distexec_target"] = wrapper.__wrapped__
    if len(_lru_wrappers) >= _CACHE_MAX:
        _lru_wrappers.clear()
    _lru_wrappers[qualname] = wrapper
    return wrapper


def lru_cached_function(wrapper, fn: Callable) -> None:
    """The state of a wrapper from ``lru_cached``: its function (a new one empties its cache)."""
    target = vars(wrapper)["_distexec_target"]
    if target.fn is not fn:
        if target.fn is not None:
            wrapper.cache_clear()
        target.fn = fn
        functools.update_wrapper(wrapper, fn)
