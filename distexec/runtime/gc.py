"""Distributed reference counting: the owner frees a value once no process holds it.

Owns the client sets of owned values and the queue of add/remove-client notices to other
owners. Imports ``distexec.protocol`` and the sibling runtime modules.

    holder drops a ref ──► weakref finalizer ──► GcQueue.enqueue (never blocks, no I/O)
                                                     └─ GC thread ──► one GC frame per owner
    holder forwards a ref to p ──► add_client(owner, rrid, p) sent *now*, before the ref
    owner's reader thread ──► apply_gc_frame (inline, in arrival order) ──► clientsets

GC frames are handled inline by the owner's reader thread, so notices from one holder apply
in the order it sent them; an add for a forwarded reference therefore always lands before
the forwarder's own release. Julia: ``add_client``/``del_client`` with batched ``remote_do``.
"""

from __future__ import annotations

import struct
import threading
from collections import defaultdict, deque

from ..protocol.frames import RRID, Kind

_ENTRY = struct.Struct("<Bqqq")   # op, rrid.whence, rrid.id, client pid
ADD, DEL = 1, 2


def encode(entries) -> bytes:
    return b"".join(_ENTRY.pack(op, rrid[0], rrid[1], pid) for op, rrid, pid in entries)


def decode(payload) -> list[tuple[int, RRID, int]]:
    if len(payload) % _ENTRY.size:
        raise ValueError("malformed GC frame")
    return [(op, RRID(w, i), pid) for op, w, i, pid in _ENTRY.iter_unpack(payload)]


def add_client(ctx, rrid: RRID, pid: int) -> None:
    """Owner side: ``pid`` now holds ``rrid`` (creates the entry if needed)."""
    from .owned import lookup_existing_or_placeholder
    with ctx.refs_lock:
        rv = lookup_existing_or_placeholder(ctx, rrid)
        rv.clientset.add(pid)


def del_client(ctx, rrid: RRID, pid: int) -> None:
    """Owner side: ``pid`` no longer holds ``rrid``; free the value when nobody does."""
    with ctx.refs_lock:
        rv = ctx.refs.get(rrid)
        if rv is None:
            return
        rv.clientset.discard(pid)
        if not rv.clientset:
            del ctx.refs[rrid]


def apply_entries(ctx, entries) -> None:
    for op, rrid, pid in entries:
        (add_client if op == ADD else del_client)(ctx, rrid, pid)


class GcQueue:
    """Queued client notices, flushed to each owner by one background thread."""

    def __init__(self, ctx):
        self._ctx = ctx
        self._pending: deque = deque()   # (owner, op, rrid, pid); deque appends are atomic
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stopped = False

    def enqueue(self, owner: int, op: int, rrid: RRID, pid: int) -> None:
        """Safe from finalizers: no locks held for long, no I/O."""
        self._pending.append((owner, op, rrid, pid))
        self._wake.set()
        if self._thread is None and not self._stopped:
            self._start()

    def send_now(self, owner: int, op: int, rrid: RRID, pid: int) -> None:
        """Apply or send one notice immediately (used when forwarding a reference)."""
        ctx = self._ctx
        if owner == ctx.myid:
            apply_entries(ctx, [(op, rrid, pid)])
            return
        ctx.send(owner, Kind.GC, payload=encode([(op, rrid, pid)]))

    def flush_soon(self, owner: int) -> None:
        if self._pending:
            self._wake.set()

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="distexec-gc", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        from .context import use_context
        use_context(self._ctx)
        while not self._stopped:
            self._wake.wait()
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        by_owner = defaultdict(list)
        while self._pending:
            owner, op, rrid, pid = self._pending.popleft()
            by_owner[owner].append((op, rrid, pid))
        for owner, entries in by_owner.items():
            self._deliver(owner, entries)

    def _deliver(self, owner: int, entries) -> None:
        ctx = self._ctx
        if owner == ctx.myid:
            apply_entries(ctx, entries)
            return
        try:
            ctx.connection_for(owner).send(Kind.GC, encode(entries))
        except Exception:  # owner gone: its values went with it, nothing left to free
            pass

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
