"""Which way an executor's tasks travel to a worker: its task lane or its connection.

Owns the choice, per message, between a local worker's task lane (``transport.lane``: read by
the worker's main thread between tasks, so a task that travels while another runs wakes
nobody) and its connection (every other worker, and tasks too large for the lane). Imports
``distexec.runtime`` and ``distexec.protocol``.

A worker runs the executor's tasks in the order they were sent (a task leaves out the
``__main__`` globals an earlier one took there). The lane and the connection do not keep
order between them, so one executor never has messages on both at once to one worker: a
message that cannot take the lane while lane messages are out waits here until they are
back, then takes the connection, and the lane is used again once the connection's are back.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from .protocol.frames import Flag, Kind, RRID


class InOrderRoutes:
    """One executor's in-order messages, per worker: sent by the lane, the connection, or
    held until the lane is clear. The waiter of each message says which (``via_lane``) when
    it reports the message done."""

    def __init__(self, ctx) -> None:
        self._ctx = ctx
        self._lock = threading.Lock()
        self._by_lane: dict[int, int] = {}   # pid -> messages out by the lane
        self._by_conn: dict[int, int] = {}   # pid -> messages out by the connection
        self._held: dict[int, deque] = {}    # pid -> (rrid, waiter, payload, buffers) to send

    def lane_of(self, pid: int) -> Any:
        record = self._ctx.peers.get(pid)
        conn = record.conn if record is not None else None
        return conn.task_lane if conn is not None else None

    def send(self, pid: int, rrid: RRID, waiter, payload: bytes, buffers) -> None:
        """Send one message to ``pid`` (or hold it); raises as ``ClusterContext.send`` does
        when it could not go, and then nothing of it stays here."""
        lane = None if buffers else self.lane_of(pid)
        with self._lock:
            if (lane is not None and not self._by_conn.get(pid) and not self._held.get(pid)
                    and self._offer(lane, pid, rrid, waiter, payload)):
                return
            if self._by_lane.get(pid):  # the connection would overtake them: wait
                self._held.setdefault(pid, deque()).append((rrid, waiter, payload, buffers))
                return
            self._by_conn[pid] = self._by_conn.get(pid, 0) + 1
        self._send_by_connection(pid, rrid, waiter, payload, buffers)

    def send_untracked(self, pid: int, rrid: RRID, payload: bytes, buffers) -> None:
        """Send a message nobody reports done (the executor's probe): the way tasks go, by
        the lane if it takes it, else the connection; raises as ``ClusterContext.send``."""
        lane = None if buffers else self.lane_of(pid)
        if lane is None or not lane.offer(Kind.CALL_FETCH, payload, flags=Flag.IN_ORDER,
                                          notify=rrid):
            self._ctx.send(pid, Kind.CALL_FETCH, payload=payload, buffers=buffers, notify=rrid,
                           flags=Flag.IN_ORDER)

    def _offer(self, lane, pid: int, rrid: RRID, waiter, payload: bytes) -> bool:
        """With the lock held: send by the lane if it takes the message (True). Everything is
        in place before the send: the reply may be back (and the message done) at once.

        A registered waiter belongs to whoever takes it back from the context: if the
        worker's loss took it meanwhile (``ClusterContext.peer_lost``), the loss fails it as a
        message sent by the lane, so this counts as sent: sending it another way would run
        a task whose future has failed already.
        """
        waiter.via_lane = True
        self._by_lane[pid] = self._by_lane.get(pid, 0) + 1
        sent = registered = False
        try:
            self._ctx.add_waiter(rrid, waiter)  # (raises if the worker is gone)
            registered = True
            sent = lane.offer(Kind.CALL_FETCH, payload, flags=Flag.IN_ORDER, notify=rrid)
        finally:
            if not sent and registered and self._ctx.pop_waiter(rrid) is None:
                sent = True  # taken by the worker's loss, which fails it
            if not sent:
                self._by_lane[pid] -= 1
                waiter.via_lane = None
        return sent

    def _send_by_connection(self, pid: int, rrid: RRID, waiter, payload, buffers) -> None:
        """Send by the connection; raises as ``ClusterContext.send`` does when the message
        did not go and is still the caller's (see ``_offer`` for a waiter the worker's loss
        took meanwhile: then this returns, and the loss fails it)."""
        waiter.via_lane = False
        registered = False
        try:
            self._ctx.add_waiter(rrid, waiter)
            registered = True
            self._ctx.send(pid, Kind.CALL_FETCH, payload=payload, buffers=buffers, notify=rrid,
                           flags=Flag.IN_ORDER)
        except BaseException:
            if registered and self._ctx.pop_waiter(rrid) is None:
                return  # taken by the worker's loss, which fails it (and counts it done)
            waiter.via_lane = None  # it never went: nothing to report done
            with self._lock:
                if self._by_conn.get(pid, 0) > 0:
                    self._by_conn[pid] -= 1
            raise

    def done(self, pid: int, via_lane: bool | None) -> None:
        """A message's results are all back (or it failed); the held ones may go now.
        ``via_lane`` None: a message that never went."""
        if via_lane is None:
            return
        with self._lock:
            counts = self._by_lane if via_lane else self._by_conn
            if counts.get(pid, 0) > 0:
                counts[pid] -= 1
            held = self._held.get(pid)
            # A worker that is gone keeps them: ``lost`` hands them back (never sent, they
            # go to another worker), where sending them now would fail them with its death.
            if not held or self._by_lane.get(pid) or pid in self._ctx.deleted:
                return
            release = list(held)
            held.clear()
            self._by_conn[pid] = self._by_conn.get(pid, 0) + len(release)
        for rrid, waiter, payload, buffers in release:
            try:
                self._send_by_connection(pid, rrid, waiter, payload, buffers)
            except Exception as exc:  # the worker is gone: its messages fail as it did
                waiter.fail(exc)

    def lost(self, pid: int) -> list:
        """Forget ``pid``; returns the waiters of the messages still held (never sent)."""
        with self._lock:
            self._by_lane.pop(pid, None)
            self._by_conn.pop(pid, None)
            return [waiter for _, waiter, _, _ in self._held.pop(pid, ())]
