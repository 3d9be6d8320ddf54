"""``Executor.map`` on top of ``submit``: ordered results, chunks, a deadline, bounded lookahead.

Owns how a map becomes submits and how their results come back in input order: chunks of
``chunksize`` items travel as one task (a plain list when there is one iterable, so the
worker calls ``fn(x)`` without 1-tuples), ``buffersize`` keeps at most that many tasks
outstanding (one more is submitted per result taken, so endless iterables work), ``timeout``
counts from the call, and an abandoned or failed map cancels what it had queued. Imports
``distexec.progress``; the executor is passed in (anything with ``submit``).

    map(fn, xs) ──► submit per task (all now, or buffersize ahead) ──► results in order
                      └─ chunks: _process_items / _process_chunk run on the worker
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import itertools
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .progress import bar as progress_bar


def results(executor: Any, fn: Callable, iterables: tuple[Iterable[Any], ...], *,
            deadline: float | None, chunksize: int, buffersize: int | None,
            progress: bool | None) -> Iterator:
    """The iterator ``Executor.map`` returns (arguments already checked by the executor)."""
    if chunksize == 1:
        out = _map_results(executor, fn, zip(*iterables, strict=False), deadline, buffersize)
    elif len(iterables) == 1:  # chunks of plain items: fn(x), no 1-tuples to build or ship
        chunks = _batched(iterables[0], chunksize)
        out = _chain(_map_results(executor, functools.partial(_process_items, fn), chunks,
                                  deadline, buffersize, splat=False))
    else:
        chunks = _batched(zip(*iterables, strict=False), chunksize)
        out = _chain(_map_results(executor, functools.partial(_process_chunk, fn), chunks,
                                  deadline, buffersize, splat=False))
    return _with_progress(out, progress, iterables)


def _map_results(executor, fn, args_iter, deadline, buffersize, *, splat: bool = True):
    """Submit (eagerly, or ``buffersize`` ahead) and return a generator of results in order."""
    def submit(target, args):
        return target.submit(fn, *args) if splat else target.submit(fn, args)

    futures: deque = deque()
    # A DistributedExecutor queues the inputs before it sends them, so they go in batches.
    queueing = getattr(executor, "_queueing", contextlib.nullcontext)
    try:
        with queueing():
            for args in itertools.islice(args_iter, buffersize) if buffersize else args_iter:
                futures.append(submit(executor, args))
    except BaseException:  # a bad input, a refused submit, or Ctrl-C: run none of the map
        for future in futures:
            future.cancel()
        raise
    # Only a weak reference: a pending lazy map must not keep the executor alive.
    executor_ref = weakref.ref(executor)
    return _yield_results(futures, args_iter if buffersize else None, submit, executor_ref,
                          deadline)


def _yield_results(futures: deque, more, submit, executor_ref, deadline):
    try:
        while futures:
            target = executor_ref() if more is not None else None
            if target is not None:
                args = next(more, _END)
                if args is not _END:
                    futures.append(submit(target, args))
            del target
            timeout = None if deadline is None else deadline - time.monotonic()
            yield _result_or_cancel(futures.popleft(), timeout)  # keep no reference to it
    finally:
        for future in futures:
            future.cancel()


_END = object()


def _result_or_cancel(future: cf.Future, timeout: float | None):
    try:
        try:
            return future.result(timeout)
        finally:
            future.cancel()
    finally:
        del future  # break the cycle through the future's exception


def _process_chunk(fn, chunk):
    return [fn(*args) for args in chunk]


def _process_items(fn, items):
    return list(map(fn, items))


def _batched(iterable, size: int):
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _chain(chunk_results):
    for chunk in chunk_results:
        yield from chunk


def _with_progress(results: Iterator, progress: bool | None, iterables) -> Iterator:
    bar = progress_bar(progress, iterables=iterables, desc="map")
    if bar is None:
        return results
    return _counted(results, bar)


def _counted(results: Iterator, bar) -> Iterator:
    try:
        for result in results:
            bar.update(1)
            yield result
    finally:
        bar.close()
        close = getattr(results, "close", None)
        if close is not None:
            close()  # an abandoned map cancels what it had queued, as without a bar
