"""A two-stage pipeline over RemoteChannels: one producer, several consumers, the master.

Run it with ``python examples/channels_pipeline.py``.

    worker 2: produce ──► jobs (lives on worker 2) ──► workers 3, 4: consume ──► results (master)
"""

import time

import distexec as d
from distexec import Channel, RemoteChannel


def produce(jobs: RemoteChannel, n: int) -> int:
    for job in range(n):
        jobs.put(job)  # blocks while the 4-slot channel is full: back pressure
    jobs.close()      # consumers drain what is left, then their loops end
    return n


def consume(jobs: RemoteChannel, results: RemoteChannel) -> int:
    done = 0
    for job in jobs:  # take() until the channel is closed and empty
        time.sleep(0.01)
        results.put((job, job * job, d.myid()))
        done += 1
    return done


def main() -> None:
    producer, *consumers = d.addprocs(3)

    jobs = RemoteChannel(lambda: Channel(4), producer)  # built by the factory on worker 2
    results = RemoteChannel(1, 100)                     # on the master, 100 slots

    made = d.remotecall(produce, producer, jobs, 20)
    counts = [d.remotecall(consume, pid, jobs, results) for pid in consumers]

    squares = {}
    for _ in range(20):
        job, square, pid = results.take()
        squares[job] = square
    print("produced:", made.fetch())
    print("consumed per worker:", dict(zip(consumers, (c.fetch() for c in counts))))
    print("all squares correct:", squares == {j: j * j for j in range(20)})

    # An unbuffered channel (size 0): put returns only once somebody has taken the value.
    handoff = RemoteChannel(1, 0)
    taker = d.remotecall(lambda ch: (time.sleep(0.2), ch.take())[1], consumers[0], handoff)
    started = time.perf_counter()
    handoff.put("hello")  # waits until the taker, 0.2 s late, has taken it
    print(f"put returned after {time.perf_counter() - started:.1f} s; "
          f"the taker got {taker.fetch()!r}")

    d.rmprocs(d.workers())


if __name__ == "__main__":
    main()
