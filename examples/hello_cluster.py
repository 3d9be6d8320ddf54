"""A small distexec program that runs unchanged on local, SSH and Slurm workers.

``distexec run`` starts the cluster around it::

    distexec run -p 2 examples/hello_cluster.py
    distexec run --machine-file hosts examples/hello_cluster.py  # "[count*][user@]host" lines
    distexec run --slurm --ntasks=2 examples/hello_cluster.py

Every worker says where it runs (the address its ssh connection arrived on, when it has
one), each worker asks the next one for its id (worker-to-worker calls), and ``pmap`` sums
squares over all of them; the exit status says whether everything added up.
"""

import os
import sys

import distexec


def where():
    """(pid, the address this worker's ssh session arrived on, or "local")."""
    connection = os.environ.get("SSH_CONNECTION", "").split()
    return distexec.myid(), connection[2] if len(connection) > 2 else "local"


def ask(pid):
    """Run on a worker: fetch ``pid``'s id from it (a worker-to-worker call)."""
    return distexec.remotecall_fetch(distexec.myid, pid)


def main() -> int:
    workers = distexec.workers()
    for pid, address in sorted(distexec.remotecall_fetch(where, pid) for pid in workers):
        print(f"hello from worker {pid} at {address}")
    pairs = list(zip(workers, workers[1:] + workers[:1], strict=True))
    answers = [distexec.remotecall_fetch(ask, a, b) for a, b in pairs]
    print(f"worker-to-worker: {answers}")
    total = sum(distexec.pmap(lambda x: x * x, range(100)))
    print(f"{len(workers)} workers, sum of squares {total}")
    return 0 if total == 328350 and answers == [b for _, b in pairs] else 1


if __name__ == "__main__":
    sys.exit(main())
