"""Estimate pi on local workers: remote calls, Futures and a RemoteChannel, then pmap.

The first estimate sends each task with ``remotecall`` and hears about finished tasks through
a RemoteChannel; the second does the same work with one ``pmap`` call and a progress bar
(drawn when tqdm is installed).

Run it with ``python examples/pi_montecarlo.py [workers] [samples per task]``.
"""

import random
import sys
import time

import distexec as d


def count_inside(samples: int, seed: int) -> int:
    """Points of the unit square that fall inside the quarter circle."""
    rng = random.Random(seed)
    return sum(rng.random() ** 2 + rng.random() ** 2 <= 1.0 for _ in range(samples))


def report_progress(channel, samples: int, seed: int) -> int:
    inside = count_inside(samples, seed)
    channel.put((d.myid(), inside))  # the channel lives on the master; any worker can use it
    return inside


def main() -> None:
    nworkers = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    samples = int(sys.argv[2]) if len(sys.argv) > 2 else 200_000
    started = time.perf_counter()
    pids = d.addprocs(nworkers)
    print(f"started workers {pids} in {time.perf_counter() - started:.2f} s")

    progress = d.RemoteChannel(1, 100)
    tasks = 4 * nworkers
    futures = [d.remotecall(report_progress, pids[i % len(pids)], progress, samples, seed=i)
               for i in range(tasks)]
    for _ in range(tasks):
        pid, inside = progress.take()
        print(f"  worker {pid} finished a task: {inside}/{samples} inside")
    total = sum(f.fetch() for f in futures)  # each value stayed on its worker until now
    estimate = 4 * total / (tasks * samples)
    print(f"pi ~= {estimate:.5f} from {tasks * samples:,} samples "
          f"in {time.perf_counter() - started:.2f} s")

    started = time.perf_counter()
    counts = d.pmap(count_inside, [samples] * tasks, range(tasks, 2 * tasks), progress=True)
    estimate = 4 * sum(counts) / (tasks * samples)
    print(f"pi ~= {estimate:.5f} again with pmap in {time.perf_counter() - started:.2f} s")
    d.rmprocs(pids)


if __name__ == "__main__":
    main()
