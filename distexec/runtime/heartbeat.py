"""Heartbeats: noticing a peer that is silent although its connection looks open.

Owns the periodic PING to every linked peer and the verdict on peers that stopped talking.
Imports ``distexec.protocol`` and the sibling runtime modules.

    heartbeat thread, every interval ──► PING to each linked peer
                   at each wake-up  └──► a peer heard nothing from for ``timeout`` seconds:
                                         close its connection (its callers get
                                         ProcessExitedException); hooks run (the master
                                         SIGKILLs a local worker so it cannot come back)

TCP alone does not notice a stopped process (SIGSTOP: its kernel still acknowledges), a host
that vanished from the network, or a peer stuck halfway through a frame. Any bytes received
count as life, so a long transfer is never mistaken for silence. A worker whose user code
holds the GIL for longer than the timeout cannot answer and is treated as lost: the default
timeout (60 s, ``DISTEXEC_HEARTBEAT_TIMEOUT``) is far above any normal pause.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from ..protocol.frames import Kind
from .context import WorkerState

log = logging.getLogger("distexec")

# A peer declared lost has been silent for ``timeout``; pinging six times in that span is
# margin enough, and an idle cluster wakes each worker once per interval for it.
DEFAULT_INTERVAL = 10.0
DEFAULT_TIMEOUT = 60.0


def settings() -> tuple[float, float]:
    """(interval, timeout) in seconds, from the environment (workers inherit it)."""
    timeout = float(os.environ.get("DISTEXEC_HEARTBEAT_TIMEOUT", DEFAULT_TIMEOUT))
    interval = float(os.environ.get("DISTEXEC_HEARTBEAT_INTERVAL",
                                    min(DEFAULT_INTERVAL, timeout / 4)))
    return interval, timeout


class Heartbeat:
    """One thread per process: pings peers and declares the silent ones lost."""

    def __init__(self, ctx):
        self._ctx = ctx
        self._stop = threading.Event()
        self._wake = threading.Event()  # stop, or a new peer: read the settings again
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.on_silent: list = []  # callables(record): what else to do with a silent peer

    def ensure_started(self) -> None:
        """Called as each peer joins: starts the thread, or has it read its settings again
        (set before ``addprocs``, they apply from then on, without waiting out the interval)."""
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="distexec-heartbeat")
                self._thread.start()
            else:
                self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _loop(self) -> None:
        """Ping every ``interval``; between pings, wake only when a peer could reach the
        timeout (so one is declared lost on time, however long the interval)."""
        interval, timeout = settings()
        last_ping = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            wake_at = now + interval
            try:
                linked = self._linked()
                for record, conn in linked:
                    silent_for = now - conn.last_received
                    if silent_for > timeout:
                        self._declare_lost(record, conn, silent_for)
                if now - last_ping >= interval:
                    last_ping = now
                    self._ping(linked)
                wake_at = min([last_ping + interval]
                              + [conn.last_received + timeout for _, conn in linked
                                 if not conn.closed])
            except Exception:  # heartbeats must go on for the other peers
                log.exception("error in the heartbeat thread")
            self._wake.wait(max(0.0, wake_at - time.monotonic()) + 0.001)
            self._wake.clear()
            interval, timeout = settings()  # read each time: a test or user may change them

    def _linked(self) -> list:
        """(record, connection) of each peer to ping and watch."""
        with self._ctx.lock:
            # Only joined peers: a worker still being set up must see JOIN before anything else.
            return [(r, r.conn) for r in self._ctx.peers.values()
                    if r.conn is not None and not r.conn.closed
                    and r.state in (WorkerState.CONNECTED, WorkerState.TERMINATING)]

    @staticmethod
    def _ping(linked: list) -> None:
        for _, conn in linked:
            if conn.closed:  # declared lost just now
                continue
            try:
                conn.send(Kind.PING)
            except Exception:  # the reader thread reports the broken link
                pass

    def _declare_lost(self, record, conn, silent_for: float) -> None:
        log.warning("no message from process %d for %.1f s (heartbeat timeout); "
                    "treating it as lost", record.pid, silent_for)
        record.lost_reason = (f"no message for {silent_for:.1f} s (heartbeat timeout "
                              "DISTEXEC_HEARTBEAT_TIMEOUT; stopped, hung or unreachable)")
        for hook in list(self.on_silent):
            try:
                hook(record)
            except Exception:
                log.exception("error while giving up on process %d", record.pid)
        conn.close()
