"""How many messages each of an executor's workers has in flight, and which has the fewest.

Owns the per-worker counts that a DistributedExecutor's pump reads for every task it sends.
Imports nothing of distexec.

The pump asks, per task, for the least loaded worker with a free slot and for the number of
messages in flight overall. Scanning every worker for that cost 90 µs of the master's CPU per
task at 128 workers (a ``min`` over all of them), so the workers sit in one queue per count,
and every operation here is O(1) in the number of workers, except ``track`` (called only when
the executor's workers change):

    levels[0]: workers with nothing in flight, the last to finish chosen first
    levels[1]: workers with one message in flight
    ...
    levels[limit - 1]; a worker with ``limit`` messages in flight is full: in no level

A worker moves to the back of its new level on each change. Among idle workers the one that
finished last goes first: it is the likeliest to be still awake (a worker polls a moment for
its next task before it sleeps) and in the CPU's caches, where taking turns would wake each
of 128 sleeping processes in turn for tiny tasks. Among busy workers, the one that has been
at its count longest goes first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class InFlight:
    """Messages in flight per worker (at most ``limit`` each), the least loaded, the total.

    Not thread-safe: the executor calls it with its lock held.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._count: dict[int, int] = {}
        # OrderedDict, not dict: taking the first key of a dict that keeps losing its first
        # keys walks over their empty slots, O(workers) again
        self._levels: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(limit)]
        self._tracked: set[int] = set()  # the workers that may be chosen
        self._tracked_list: list[int] | None = None
        self.total = 0

    def get(self, pid: int) -> int:
        return self._count.get(pid, 0)

    def track(self, pids: list[int]) -> None:
        """The workers that may be chosen are now ``pids``: O(len(pids)), and O(1) when
        ``pids`` is the very list of the last call (the executor's cached targets)."""
        if pids is self._tracked_list:
            return
        self._tracked_list = pids
        before, self._tracked = self._tracked, set(pids)
        for pid in before - self._tracked:
            self._unlevel(pid)
        for pid in pids:
            if pid not in before:
                self._level(pid)

    def add(self, pid: int, n: int = 1) -> int:
        """``n`` more messages went to ``pid``; returns how many it has in flight."""
        self._unlevel(pid)
        count = self._count[pid] = self._count.get(pid, 0) + n
        self.total += n
        self._level(pid)
        return count

    def done(self, pid: int) -> int:
        """One message of ``pid`` is back; returns how many it still has in flight."""
        count = self._count.get(pid)
        if not count:  # forgotten (lost) meanwhile, or nothing sent
            return 0
        self._unlevel(pid)
        count = self._count[pid] = count - 1
        self.total -= 1
        self._level(pid)
        return count

    def forget(self, pid: int) -> int | None:
        """``pid`` is gone: never choose it again; returns what it had in flight (None:
        nothing was ever sent to it)."""
        self._unlevel(pid)
        self._tracked.discard(pid)
        count = self._count.pop(pid, None)
        self.total -= count or 0
        return count

    def least_loaded(self, accept: Callable[[int], bool] | None = None) -> int | None:
        """The tracked worker with the fewest messages in flight, below ``limit``, among
        those ``accept`` takes (None: every worker; with ``accept`` the levels are walked
        until one is taken)."""
        for k, level in enumerate(self._levels):
            for pid in (reversed(level) if k == 0 else level):
                if accept is None or accept(pid):
                    return pid
        return None

    def _level(self, pid: int) -> None:
        count = self._count.get(pid, 0)
        if pid in self._tracked and count < self._limit:
            self._levels[count][pid] = None

    def _unlevel(self, pid: int) -> None:
        count = self._count.get(pid, 0)
        if count < self._limit:
            self._levels[count].pop(pid, None)
