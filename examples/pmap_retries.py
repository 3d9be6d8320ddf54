"""pmap with retries, error handlers and batches, and a worker that dies mid-map.

Run it with ``python examples/pmap_retries.py``.
"""

import math
import os
import random
import signal
import threading
import time

import distexec as d
from distexec import ExponentialBackOff, pmap


def flaky_square(x: int, failures) -> int:
    """Fails about one time in five, as a call to a busy service might."""
    if random.random() < 0.2:
        failures.put(x)  # a RemoteChannel on the master: count the failed attempts there
        raise ConnectionError(f"transient failure on item {x}")
    return x * x


def slow_square(x: int) -> int:
    time.sleep(0.05)
    return x * x


def inverse(x: int) -> float:
    return 1 / x


def main() -> None:
    pids = d.addprocs(3)
    items = range(40)
    expected = [x * x for x in items]

    # 1. Transient errors: retry each failed element after growing delays (on any worker).
    failures = d.RemoteChannel(1, math.inf)
    delays = ExponentialBackOff(n=6, first_delay=0.01, max_delay=0.5)
    results = pmap(flaky_square, items, [failures] * len(items), retry_delays=delays,
                   retry_check=lambda state, exc: isinstance(exc, ConnectionError))
    print(f"1. retries: correct={results == expected}, failed attempts retried={len(failures)}")

    # 2. A worker dies in the middle of the map: its elements are retried on the others.
    victim = pids[-1]
    victim_os_pid = d.remotecall_fetch(os.getpid, victim)
    threading.Timer(0.3, os.kill, (victim_os_pid, signal.SIGKILL)).start()
    results = pmap(slow_square, items, retry_delays=[0.1] * 3)
    print(f"2. worker {victim} killed: correct={results == expected}, workers now {d.workers()}")

    # 3. No retries, an error handler instead: the failure becomes that element's result.
    print("3. on_error:", pmap(inverse, [1, 2, 0, 4], on_error=lambda exc: type(exc).__name__))

    # 4. Batches: 10 elements per call; a failed element is handed to on_error on the caller.
    results = pmap(inverse, range(-20, 20), batch_size=10, on_error=lambda exc: math.nan)
    print("4. batches:", sum(math.isnan(r) for r in results), "nan among", len(results))

    # 5. Without a handler the first error propagates, as a RemoteException.
    try:
        pmap(inverse, [1, 0, 2])
    except d.RemoteException as exc:
        print(f"5. raised on worker {exc.pid}: {exc.captured.ex!r}")

    d.rmprocs(d.workers())


if __name__ == "__main__":
    main()
