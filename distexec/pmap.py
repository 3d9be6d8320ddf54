"""Parallel maps: ``pmap`` with batching, error handlers and retries; ``distributed_for``.

Owns how a map is split, sent through a pool, retried and put back in input order, and the
``@distributed`` loop. Imports ``distexec.pools``, ``distexec.runtime`` and below.
Julia: ``pmap``, ``retry``, ``ExponentialBackOff``, ``batchsplit``, ``@distributed``,
``splitrange``.

    pmap(fn, xs) ──► wrap fn: on_error (runs on the worker) ─► through the pool ─► retry
                 ──► nworkers(pool) feeder threads pull items, call, store by index
                     (the caller only waits: a Ctrl-C leaves at once, starting nothing more)
                 ──► results in input order (the first unhandled error stops the map)
    batch_size > 1 ──► consecutive items per call; failed items re-processed on the caller
"""

from __future__ import annotations

import functools
import itertools
import logging
import random
import reprlib
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

from .errors import CompositeException, ProcessExitedException, RemoteException
from .pools import AbstractWorkerPool, CachingPool, pool_remotecall_fetch
from .progress import bar as progress_bar
from .protocol.unpicklable import note_what_failed_to_pickle
from .runtime.arguments import check_callable
from .runtime.context import current_context
from .runtime.runner import in_thread

__all__ = ["pmap", "ExponentialBackOff", "BatchProcessingError", "splitrange", "batchsplit",
           "retry", "distributed_for"]

log = logging.getLogger("distexec")


class ExponentialBackOff:
    """``n`` delays growing by ``factor`` (± ``jitter``), capped at ``max_delay``.

    Julia: ``ExponentialBackOff``.
    """

    def __init__(self, n: int = 1, first_delay: float = 0.05, max_delay: float = 10.0,
                 factor: float = 5.0, jitter: float = 0.1) -> None:
        if n < 0 or first_delay < 0 or max_delay < 0 or factor <= 0 or jitter < 0:
            raise ValueError(
                "ExponentialBackOff needs n >= 0, delays >= 0, factor > 0, jitter >= 0")
        self.n, self.first_delay, self.max_delay = n, first_delay, max_delay
        self.factor, self.jitter = factor, jitter

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[float]:
        delay = self.first_delay
        for _ in range(self.n):
            yield min(delay, self.max_delay)
            delay *= self.factor * (1 + self.jitter * (2 * random.random() - 1))

    def __repr__(self) -> str:
        return (f"ExponentialBackOff(n={self.n}, first_delay={self.first_delay}, "
                f"max_delay={self.max_delay}, factor={self.factor}, jitter={self.jitter})")


class BatchProcessingError(Exception):
    """One element of a batch failed: ``data`` is its arguments, ``ex`` the error."""

    def __init__(self, data: Any, ex: BaseException) -> None:
        super().__init__(data, ex)
        self.data, self.ex = data, ex


def unwrap(exc: BaseException) -> BaseException:
    """One level of ``RemoteException`` off, as pmap's retry logic sees errors."""
    return exc.captured.ex if isinstance(exc, RemoteException) else exc


def retry(fn: Callable, delays: Iterable[float] = (), check: Callable | None = None) -> Callable:
    """``fn`` retried after each of ``delays`` while ``check(state, exc)`` allows. Julia: ``retry``.

    ``check`` returns a bool or ``(new_state, bool)``; after the delays run out, one last
    attempt is made whose error propagates.
    """
    return _retrying(fn, delays, check)


def _retrying(fn: Callable, delays: Iterable[float], check: Callable | None,
              stop: threading.Event | None = None) -> Callable:
    """``retry(fn, delays, check)``; once ``stop`` is set, the last error propagates at once."""
    def retrying(*args, **kwargs):
        state = None
        for attempt, delay in enumerate(delays, 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if check is not None:
                    verdict = check(state, exc)
                    if isinstance(verdict, tuple):
                        state, verdict = verdict
                    if not verdict:
                        raise
                log.warning("Retrying %s in %.3g s (retry %d) after %s: %s", reprlib.repr(args),
                            delay, attempt, type(exc).__name__, exc)
                if _stopped_during(delay, stop):
                    raise  # the map was abandoned (Ctrl-C, or another element failed)
        return fn(*args, **kwargs)
    return retrying


def _stopped_during(delay: float, stop: threading.Event | None) -> bool:
    if stop is None:
        time.sleep(delay)
        return False
    return stop.wait(delay)


def _with_on_error(fn: Callable, on_error: Callable) -> Callable:
    def guarded(*args):
        try:
            return fn(*args)
        except Exception as exc:
            return on_error(exc)
    return guarded


def pmap(fn: Callable, *iterables: Iterable[Any] | AbstractWorkerPool,
         pool: AbstractWorkerPool | None = None,
         distributed: bool = True, batch_size: int | str = 1, on_error: Callable | None = None,
         retry_delays: Iterable[float] = (), retry_check: Callable | None = None,
         progress: bool | None = None) -> list:
    """Map ``fn`` over ``iterables`` (zipped) on the pool's workers; results in input order.

    Julia: ``pmap``. ``on_error(exc)`` turns a failure into that element's result (on the
    worker, or on the caller for worker deaths and batch failures); ``retry_delays`` retries
    failed elements (with ``retry_check(state, exc)`` deciding), possibly on other workers.
    ``progress=True`` draws a tqdm bar when tqdm is installed; ``None`` (the default) follows
    ``DISTEXEC_PROGRESS`` (which ``distexec run --progress`` sets).
    """
    check_callable(fn, "pmap")
    if iterables and isinstance(iterables[0], AbstractWorkerPool):
        pool, iterables = iterables[0], iterables[1:]
    if not iterables:
        raise TypeError("pmap needs at least one iterable")
    # Only the first may be a pool (Julia's ``pmap(f, pool, c...)``): zip refuses any other.
    columns = cast("tuple[Iterable[Any], ...]", iterables)
    items: Iterable[tuple] = zip(*columns, strict=False)  # the shortest wins
    own_pool: CachingPool | None = None
    if pool is None:
        pool = own_pool = CachingPool(_workers())
    if not _has_other_workers(pool):
        distributed = False
    retry_delays = list(retry_delays)
    if not distributed:
        batch_size = 1
    if batch_size == "auto":
        items = list(items)
        batch_size = max(1, min(100, len(items) // (3 * max(1, pool.nworkers()))))
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
    bar = progress_bar(progress, iterables=iterables, desc="pmap")
    try:
        if batch_size == 1:
            return _map_each(fn, items, pool, distributed, on_error, retry_delays, retry_check, bar)
        return _map_batches(fn, items, pool, batch_size, on_error, retry_delays, retry_check, bar)
    except _FAILED_ELSEWHERE as exc:
        # What failed ran on a worker (its frames are in the exception) or the worker died:
        # the dozen frames of the machinery that carried the news here tell the user nothing.
        raise exc.with_traceback(None)  # noqa: B904 (its cause is kept)
    finally:
        if bar is not None:
            bar.close()
        if own_pool is not None:
            own_pool.clear()  # the workers drop the functions this map shipped


_FAILED_ELSEWHERE = (RemoteException, CompositeException, ProcessExitedException)


def _workers() -> list[int]:
    pids = [p for p in current_context().live_pids() if p != 1]
    return pids or [1]


def _has_other_workers(pool: AbstractWorkerPool) -> bool:
    members = pool.workers()
    me = current_context().myid
    return bool(members) and members != [me]


def _map_each(fn, items, pool, distributed, on_error, retry_delays, retry_check, bar, *,
              numbering: list[int] | None = None, tried: int = 0) -> list:
    """pmap one item per call. ``numbering``: the items' indices in the caller's input when
    these are some of them; ``tried``: attempts each item had already (reprocessed batches)."""
    call = fn if on_error is None else _with_on_error(fn, on_error)
    if distributed:
        call = _sent_through(pool, call, fn)
    stop = threading.Event()  # set when the map is abandoned: pending retries give up
    run: Callable[[int, tuple], Any] = lambda index, args: call(*args)  # noqa: E731
    if retry_delays or tried:
        run = _Attempts(retry_delays, retry_check, stop, numbering, tried).wrap(call)
    if distributed and on_error is not None:
        # outside the retries: a death is retried first, like any failure (Julia)
        run = _local_on_error_for_deaths(run, on_error)
    ntasks = pool.nworkers() if distributed else 1
    tick = None if bar is None else (lambda _item: bar.update(1))
    return _ordered_async_map(lambda item: run(*item), enumerate(items), ntasks, tick,
                              caller_feeds=not distributed, stop=stop)


def _sent_through(pool: AbstractWorkerPool, call: Callable, fn: Callable) -> Callable:
    """``call`` run on a worker of ``pool``; a pickling error names the argument at fault."""
    def remotely(*args):
        try:
            return pool_remotecall_fetch(call, pool, args, {})
        except Exception as exc:
            note_what_failed_to_pickle(exc, fn, args, {})
            raise
    return remotely


class _Attempts:
    """pmap's retries of one item after another, and the note on the error given up on:
    which item, how many attempts, on which workers (the retries' log lines scroll away)."""

    def __init__(self, delays: list[float], check: Callable | None, stop: threading.Event,
                 numbering: list[int] | None, tried: int) -> None:
        self.delays, self.check, self.stop = delays, check, stop
        self.numbering, self.tried = numbering, tried

    def wrap(self, call: Callable) -> Callable[[int, tuple], Any]:
        def run(index: int, args: tuple) -> Any:
            where: list[int | None] = [None] * self.tried  # the batch's worker is not known

            def attempt(*args):
                try:
                    return call(*args)
                except RemoteException as exc:  # retry_check and the caller see the original
                    where.append(exc.pid)
                    raise unwrap(exc) from None
                except Exception as exc:
                    where.append(_worker_of(exc))
                    raise
            try:
                return _retrying(attempt, self.delays, self.check, self.stop)(*args)
            except Exception as exc:
                number = index if self.numbering is None else self.numbering[index]
                _add_note(exc, _gave_up(number, args, where))
                raise
        return run


def _add_note(exc: BaseException, note: str) -> None:
    if sys.version_info >= (3, 11):
        exc.add_note(note)
    else:  # Python 3.10: the exceptiongroup backport displays __notes__
        exc.__notes__ = [*getattr(exc, "__notes__", ()), note]  # type: ignore[attr-defined]


def _worker_of(exc: BaseException) -> int | None:
    """The worker an attempt failed on, when its error says (a local map's never do)."""
    return exc.worker_id if isinstance(exc, ProcessExitedException) else None


def _gave_up(index: int, args: tuple, where: list[int | None]) -> str:
    """``pmap gave up on the item at index 4, arguments (4,), after 3 attempts, on workers
    2, 3``."""
    tries = len(where)
    text = (f"pmap gave up on the item at index {index}, arguments {reprlib.repr(args)}, "
            f"after {tries} attempt{'s' if tries != 1 else ''}")
    known = list(dict.fromkeys(w for w in where if w is not None))
    if known:
        text += f", on worker{'s' if len(known) > 1 else ''} {', '.join(map(str, known))}"
    return text


def _local_on_error_for_deaths(call: Callable, on_error: Callable) -> Callable:
    """A worker death never reaches the worker-side handler: give it to ``on_error`` here."""
    def guarded(*args):
        try:
            return call(*args)
        except ProcessExitedException as exc:
            return on_error(exc)
    return guarded


def _ordered_async_map(call: Callable, items: Iterable, ntasks: int,
                       tick: Callable | None = None, *, caller_feeds: bool = True,
                       stop: threading.Event | None = None) -> list:
    """Run ``call`` over ``items`` with ``ntasks`` threads; results in input order.

    The first error stops every thread from starting new items and is raised once the items
    already started have ended. ``tick(item)`` runs after each item (progress bars).
    ``caller_feeds``: the calling thread is one of the ``ntasks`` (local work, which a
    Ctrl-C then interrupts); otherwise it only waits, so a Ctrl-C (``KeyboardInterrupt``)
    lands in that wait, never inside a send, and leaves at once: no further item starts,
    and the items still running finish on their threads with their results discarded.
    ``stop`` is set as soon as the map is abandoned either way.
    """
    source = iter(enumerate(items))
    lock = threading.Lock()
    results: dict[int, Any] = {}
    failure: list[BaseException] = []
    stop = stop if stop is not None else threading.Event()

    def fail(exc: BaseException) -> None:
        failure.append(exc)  # list.append is atomic: safe from the caller's Ctrl-C handler too
        stop.set()

    def feed():
        while True:
            with lock:
                if failure:
                    return
                try:
                    index, item = next(source)
                except StopIteration:
                    return
                except BaseException as exc:  # the input iterator itself failed
                    fail(exc)
                    return
            try:
                value = call(item)
            except BaseException as exc:
                with lock:
                    fail(exc)
                return
            results[index] = value
            if tick is not None:
                tick(item)

    threads = [threading.Thread(target=feed, daemon=True, name="distexec-pmap")
               for _ in range(max(1, ntasks) - (1 if caller_feeds else 0))]
    try:
        for t in threads:
            t.start()
        if caller_feeds:
            feed()
        for t in threads:
            t.join()
    except BaseException as exc:  # Ctrl-C while the caller waits: abandon the map now
        fail(exc)
        raise
    if failure:
        raise failure[0]
    return [results[i] for i in range(len(results))]


# -- batches ---------------------------------------------------------------------------------
def _run_batch(fn: Callable, handle_errors: bool, batch: list) -> list:
    """On the worker: apply ``fn`` to each element; failures become BatchProcessingError."""
    out = []
    for args in batch:
        try:
            out.append(fn(*args))
        except Exception as exc:
            if not handle_errors:
                raise
            out.append(BatchProcessingError(args, exc))
    return out


def _map_batches(fn, items, pool, batch_size, on_error, retry_delays, retry_check, bar) -> list:
    handle_errors = on_error is not None or bool(retry_delays)
    batches = _chunks(items, batch_size)
    # one function object for every batch, so a CachingPool ships ``fn`` once per worker
    run_batch = functools.partial(_run_batch, fn, handle_errors)

    def run(batch):
        try:
            return pool_remotecall_fetch(run_batch, pool, (batch,), {})
        except Exception as exc:
            if not handle_errors:
                raise
            return [BatchProcessingError(args, exc) for args in batch]

    tick = None if bar is None else (lambda batch: bar.update(len(batch)))
    results = list(itertools.chain.from_iterable(
        _ordered_async_map(run, batches, pool.nworkers(), tick, caller_feeds=False)))
    failed = [i for i, r in enumerate(results) if isinstance(r, BatchProcessingError)]
    if failed:
        _reprocess(fn, results, failed, pool, on_error, retry_delays, retry_check)
    return results


def _reprocess(fn, results, failed, pool, on_error, retry_delays, retry_check) -> None:
    """Julia's batch error handling: retry the failed elements, else on_error, else raise."""
    errors = [results[i].ex for i in failed]
    # Julia calls retry_check(state, ex) with the delays' iterator state, which Python lacks.
    retry_all = bool(retry_delays) and (
        retry_check is None or all(_verdict(retry_check(None, unwrap(e))) for e in errors))
    if retry_all:
        failed_args = [results[i].data for i in failed]
        log.warning("Retrying %d failed element(s) of pmap's batches one by one; first error: "
                    "%s: %s", len(failed), type(errors[0]).__name__, errors[0])
        again = _map_each(fn, failed_args, pool, _has_other_workers(pool), on_error,
                          retry_delays[1:], retry_check, None, numbering=failed, tried=1)
    elif on_error is not None:
        again = [on_error(e) for e in errors]
    else:
        raise CompositeException(errors)
    for i, value in zip(failed, again, strict=True):
        results[i] = value


def _verdict(check_result) -> bool:
    """A retry_check result, ``(state, bool)`` or a bare bool (as ``retry`` accepts)."""
    return check_result[1] if isinstance(check_result, tuple) else check_result


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


# -- splitting -------------------------------------------------------------------------------
def splitrange(first: int, last: int, np: int) -> list[range]:
    """Split the inclusive range ``first..last`` into at most ``np`` contiguous chunks.

    Julia: ``splitrange``; e.g. ``splitrange(1, 11, 3)`` is
    ``[range(1, 5), range(5, 9), range(9, 12)]``.
    """
    if np < 1:
        raise ValueError("np must be >= 1")
    length = last - first + 1
    each, extras = divmod(length, np)
    nchunks = np if each > 0 else extras
    chunks, lo = [], first
    for i in range(nchunks):
        hi = lo + each + (1 if i < extras else 0)
        chunks.append(range(lo, hi))
        lo = hi
    return chunks


def batchsplit(items: Iterable, min_batch_count: int = 1, max_batch_size: int = 100) -> list[list]:
    """Partition ``items`` into batches. Julia: ``batchsplit``."""
    if min_batch_count < 1 or max_batch_size < 1:
        raise ValueError("min_batch_count and max_batch_size must be >= 1")
    items = list(items)
    batches = list(_chunks(items, max_batch_size))
    if len(batches) < min_batch_count:
        batches = list(_chunks(items, max(1, len(items) // min_batch_count)))
    return batches


# -- @distributed ----------------------------------------------------------------------------
def _run_chunk(body: Callable, seq, lo: int, hi: int, reducer: Callable | None):
    """On a worker: fold ``body`` over ``seq[lo:hi]`` with ``reducer`` (or just run it)."""
    if reducer is None:
        for i in range(lo, hi):
            body(seq[i])
        return None
    acc = body(seq[lo])
    for i in range(lo + 1, hi):
        acc = reducer(acc, body(seq[i]))
    return acc


def _part(seq, chunk: range) -> tuple:
    """What a worker needs for ``chunk``: its slice when ``seq`` slices, else all of ``seq``.

    Julia ships the whole collection to every worker; a slice is enough for sequences.
    """
    if isinstance(seq, (list, tuple, range, str, bytes)) or hasattr(seq, "__array__"):
        return seq[chunk.start:chunk.stop], 0, len(chunk)
    return seq, chunk.start, chunk.stop


def distributed_for(body: Callable, iterable: Iterable[Any],
                    reducer: Callable | None = None) -> Any:
    """Run ``body(x)`` for each ``x`` of ``iterable``, split in contiguous chunks over workers.

    With ``reducer``, blocks and returns ``reducer``-folded results in iteration order.
    Without, returns at once a handle (a ``concurrent.futures.Future``) that completes when
    every chunk ran; inside ``with sync():`` the block waits for it. Julia: ``@distributed``.
    """
    from .runtime import calls
    from .runtime import sync as sync_mod
    check_callable(body, "distributed_for")
    if reducer is not None:
        check_callable(reducer, "distributed_for's reducer")
    # Indexable and sized (a list, a range, a numpy array: not always a Sequence), or a copy.
    seq: Any = iterable if hasattr(iterable, "__getitem__") and hasattr(iterable, "__len__") \
        else list(iterable)
    ctx = current_context()
    pids = _workers()
    chunks = splitrange(0, len(seq) - 1, len(pids)) if len(seq) else []
    if reducer is not None:
        futures = [calls.remotecall(ctx, _run_chunk, pid, (body, *_part(seq, c), reducer), {})
                   for pid, c in zip(pids, chunks, strict=False)]  # chunks <= workers
        if not futures:
            raise ValueError("distributed_for with a reducer needs a non-empty iterable")
        return functools.reduce(reducer, (f.fetch() for f in futures))

    def run_all() -> None:
        sync_mod.wait_all([calls.remotecall(ctx, _run_chunk, pids[i % len(pids)],
                                            (body, *_part(seq, c), None), {})
                           for i, c in enumerate(chunks)])

    return sync_mod.register(in_thread(run_all, name="distexec-distributed-for"))
