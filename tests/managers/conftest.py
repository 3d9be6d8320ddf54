"""Fixtures for the cluster-manager tests: the real services they run against.

Each service has its own section below; a test that needs a service it cannot find is
skipped with the reason (``.ci/run`` starts every one of them, so CI never skips).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

# ============================================================================================
# Slurm (SlurmManager): a real slurmctld/slurmd, started by .ci/setup-slurm.sh
# ============================================================================================
SLURM_SETUP_HINT = "run .ci/setup-slurm.sh (as root) to install and start a single-node Slurm"


def one_line(text: str) -> str:
    """The first line of a tool's message that says something, for a skip reason: pytest
    prints the reason of every skipped test, and slurmctld's "DOWN" message comes with a
    banner of asterisks."""
    for line in text.splitlines():
        line = line.strip().strip("*").strip()
        if line:
            return line
    return "no message"


def _slurm_problem() -> str | None:
    """Why Slurm cannot be used here, or None when ``srun`` and a responsive cluster exist."""
    for tool in ("srun", "scontrol", "sinfo", "squeue", "scancel", "salloc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed; {SLURM_SETUP_HINT}"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
        nodes = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%t"],
                               capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"Slurm does not answer ({one_line(str(exc))}); {SLURM_SETUP_HINT}"
    if "UP" not in ping.stdout:
        return f"slurmctld is not responding ({one_line(ping.stdout + ping.stderr)}); " \
               f"{SLURM_SETUP_HINT}"
    states = nodes.stdout.split()
    if not any(state.rstrip("*~#") in ("idle", "mix", "alloc") for state in states):
        return f"no Slurm node is up (states: {states or 'none'}); {SLURM_SETUP_HINT}"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """Skip unless a Slurm cluster answers (session-wide: asked once)."""
    problem = _slurm_problem()
    if problem is not None:
        pytest.skip(problem)


@pytest.fixture
def slurm(slurm_cluster, monkeypatch, empty_cluster):
    """A test that uses Slurm from outside any allocation, with a master that has no workers.

    The SLURM_* variables of an allocation the test run itself may sit in (a developer running
    pytest under ``salloc``) are removed, so ``SlurmManager`` asks for a job of its own.
    """
    for name in list(os.environ):
        if name.startswith("SLURM_") and name != "SLURM_CONF":
            monkeypatch.delenv(name)



# ============================================================================================
# SSH (SSHManager): sshd on 127.0.0.1 and in network namespaces dxh1/dxh2, started by
# .ci/setup-sshd.sh. Remote workers are not children of the test process, so the fixtures
# below check themselves that none outlives its test.
# ============================================================================================
SSH_SETUP_HINT = "run .ci/setup-sshd.sh (as root) to start the test sshd servers"
SSHD_DIR = os.environ.get("DISTEXEC_SSHD_DIR", "/run/distexec-sshd")
SSH_NAMESPACES = ("dxh1", "dxh2")


class SSHHosts:
    """The test sshd servers: ``local`` ("127.0.0.1:PORT"), ``hosts`` {namespace: address}."""

    def __init__(self, directory: str):
        self.dir = directory
        self.sshflags = ["-F", os.path.join(directory, "ssh_config")]
        self.hosts: dict[str, str] = {}
        self.local = ""
        with open(os.path.join(directory, "hosts")) as lines:
            for line in lines:
                name, address, port = line.split()
                if name == "root":
                    self.local = f"{address}:{port}"
                else:
                    self.hosts[name] = address

    def answers(self, spec: str, timeout: float = 15) -> str | None:
        """None when ``ssh spec true`` works, else what went wrong."""
        from distexec.cluster.ssh import parse_machine

        host, port = parse_machine(spec)
        cmd = ["ssh", *self.sshflags, "-o", "ConnectTimeout=5"]
        cmd += (["-p", str(port)] if port else []) + [host, "true"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return one_line(str(exc))
        return None if done.returncode == 0 else one_line(done.stdout + done.stderr)


@pytest.fixture(scope="session")
def ssh_hosts() -> SSHHosts:
    """Skip unless the loopback sshd answers (asked once per session)."""
    if shutil.which("ssh") is None or not os.path.exists("/usr/sbin/sshd"):
        pytest.skip(f"OpenSSH is not installed; {SSH_SETUP_HINT}")
    if not os.path.exists(os.path.join(SSHD_DIR, "hosts")):
        pytest.skip(f"no test sshd configuration in {SSHD_DIR}; {SSH_SETUP_HINT}")
    hosts = SSHHosts(SSHD_DIR)
    problem = hosts.answers(hosts.local)
    if problem is not None:
        pytest.skip(f"sshd on {hosts.local} does not answer ({problem}); {SSH_SETUP_HINT}")
    return hosts


@pytest.fixture(scope="session")
def ssh_namespaces(ssh_hosts) -> SSHHosts:
    """Skip unless both namespace hosts answer over ssh."""
    for name in SSH_NAMESPACES:  # heal a link that a killed test run left cut
        n = name[-1]
        heal = (f"ip netns exec {name} ip link set dev dxv{n}p up && "
                f"ip netns exec {name} ip route replace default via 10.213.{n}.1")
        try:
            subprocess.run(["sh", "-c", heal], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass  # no namespaces here: the check below says so
    for name in SSH_NAMESPACES:
        address = ssh_hosts.hosts.get(name)
        problem = "not configured" if address is None else ssh_hosts.answers(address)
        if problem is not None:
            pytest.skip(f"namespace host {name} does not answer ({problem}); {SSH_SETUP_HINT}")
    return ssh_hosts


def _os_pid(pid: int) -> int | None:
    from distexec.runtime.context import current_context

    record = current_context().record(pid)
    return None if record is None else record.os_pid


def _running(os_pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(os_pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture
def ssh_workers(ssh_hosts, empty_cluster):
    """Factory: ``ssh_workers(machines, **params)`` adds SSH workers (sshflags of the test
    servers unless given); returns the new pids.

    After the test every worker is removed, and every remote worker process seen (the test's
    own ``seen`` list included) must be gone within 15 s; survivors are killed and reported.
    """
    import distexec
    from distexec.cluster.ssh import SSHManager

    seen: list[int] = []

    def add(machines, **params) -> list[int]:
        params.setdefault("sshflags", ssh_hosts.sshflags)
        try:
            return distexec.addprocs(SSHManager(machines), **params)
        finally:
            seen.extend(p for p in map(_os_pid, distexec.workers()) if p is not None)

    add.seen = seen
    yield add
    seen.extend(p for p in map(_os_pid, distexec.workers()) if p is not None)
    left = [p for p in distexec.procs() if p != 1]
    if left:
        distexec.rmprocs(left, waitfor=20)
    try:
        from tests.helpers import wait_until

        wait_until(lambda: not any(map(_running, seen)), 15,
                   message=f"remote workers {sorted(set(seen))} to exit")
    except AssertionError:
        survivors = [p for p in set(seen) if _running(p)]
        for os_pid in survivors:
            os.kill(os_pid, 9)
        pytest.fail(f"remote worker processes {survivors} outlived the test (now killed)",
                    pytrace=False)
