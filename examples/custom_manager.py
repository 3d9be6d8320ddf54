"""Two small ClusterManagers: one that launches workers, one that joins workers started by hand.

Run it with ``python examples/custom_manager.py``.
"""

import os
import signal
import subprocess
import sys
import threading

import distexec as d
from distexec import ClusterManager, WorkerConfig
from distexec.cluster.local import worker_environment


class SubprocessManager(ClusterManager):
    """Starts ``n`` workers with ``python -m distexec worker`` on this machine."""

    def __init__(self, n: int):
        self.n = n

    def launch(self, params: dict, launched: list, launch_ntfy: threading.Condition) -> None:
        for _ in range(self.n):
            process = subprocess.Popen(
                [params["exename"], "-m", "distexec", "worker"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                cwd=params["dir"], env=worker_environment(params),  # LocalManager's environment
                start_new_session=True)
            process.stdin.write(d.cluster_cookie().encode() + b"\n")  # the cookie, on stdin
            process.stdin.flush()
            # io: the default connect() reads "distexec_worker:PORT#ADDR" from it, then relays
            # the worker's output as "From worker N:"; process: the default kill() can kill a
            # worker that never joined.
            config = WorkerConfig(io=process.stdout, process=process)
            with launch_ntfy:
                launched.append(config)
                launch_ntfy.notify()

    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        print(f"  manage(pid={pid}, op={op!r})")
        if op == "interrupt":
            os.kill(config.process.pid, signal.SIGINT)
        elif op == "deregister":
            config.process.wait()  # reap the exited child


class AddressManager(ClusterManager):
    """Joins workers that are already running and listening at known addresses."""

    def __init__(self, addresses: list):
        self.addresses = addresses

    def launch(self, params, launched, launch_ntfy) -> None:
        for host, port in self.addresses:
            with launch_ntfy:
                launched.append(WorkerConfig(host=host, port=port))
                launch_ntfy.notify()

    def manage(self, pid, config, op) -> None:
        pass


def start_worker_by_hand() -> tuple:
    """What a user would do in a shell: ``distexec worker`` with the cookie on stdin."""
    process = subprocess.Popen([sys.executable, "-m", "distexec", "worker"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    process.stdin.write(d.cluster_cookie() + "\n")
    process.stdin.flush()
    line = process.stdout.readline().strip()  # distexec_worker:PORT#ADDR
    port, host = line.removeprefix("distexec_worker:").split("#")
    print(f"started a worker by hand: {line}")
    return process, (host, int(port))


def main() -> None:
    print("SubprocessManager:")
    pids = d.addprocs(SubprocessManager(2))
    print("  workers", pids, "answer", [d.remotecall_fetch(d.myid, p) for p in pids])
    d.remotecall_fetch(print, pids[0], "hello from the worker")  # relayed to our stdout
    d.rmprocs(pids)

    process, address = start_worker_by_hand()
    print("AddressManager:")
    [pid] = d.addprocs(AddressManager([address]))
    print(f"  worker {pid} runs as OS process {d.remotecall_fetch(os.getpid, pid)}"
          f" (started as {process.pid})")
    d.rmprocs(pid)  # the default kill() asks the worker to exit
    print("  exit status of the hand-started worker:", process.wait(timeout=10))


if __name__ == "__main__":
    main()
