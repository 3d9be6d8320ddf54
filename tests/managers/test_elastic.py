"""ElasticManager: workers that join a running master (``distexec worker --join``).

Every worker here is a real ``python -m distexec worker --join`` process; the namespace-host
test runs them in the network namespaces dxh1/dxh2 that .ci/setup-sshd.sh builds, joining
over their veth links.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import distexec
from distexec.cluster import elastic
from distexec.protocol import handshake
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(90)

JOIN = [sys.executable, "-m", "distexec", "worker", "--join"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
class Joiners:
    """Starts joining workers and makes sure none outlives the test."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.procs: list[subprocess.Popen] = []
        self.managers: list[distexec.ElasticManager] = []

    def manager(self, **kwargs) -> distexec.ElasticManager:
        kwargs.setdefault("port", 0)
        em = distexec.ElasticManager(**kwargs)
        self.managers.append(em)
        return em

    def start(self, target: str | distexec.ElasticManager, *args: str, stdin: bytes | None = None,
              netns: str | None = None) -> subprocess.Popen:
        """A worker joining ``target`` (a manager, or HOST:PORT); ``stdin`` defaults to the
        cluster's cookie line. Its stderr goes to a file: ``self.stderr(proc)``."""
        where = target if isinstance(target, str) else f"127.0.0.1:{target.port}"
        cmd = [*JOIN, where, *args]
        if netns is not None:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        if stdin is None:
            stdin = distexec.cluster_cookie().encode() + b"\n"
        err = open(self.tmp / f"worker-{len(self.procs)}.err", "wb")
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=err, cwd=os.getcwd())
        err.close()
        proc.err_path = err.name
        proc.stdin.write(stdin)
        proc.stdin.close()
        self.procs.append(proc)
        return proc

    @staticmethod
    def stderr(proc) -> str:
        with open(proc.err_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def close(self) -> None:
        for em in self.managers:
            em.close()
        left = [p for p in distexec.procs() if p != 1]
        if left:
            distexec.rmprocs(left, waitfor=30)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                pytest.fail(f"joined worker {proc.pid} outlived the test (now killed)")


@pytest.fixture
def joiners(tmp_path, empty_cluster):
    j = Joiners(tmp_path)
    yield j
    j.close()


class LogWatch(logging.Handler):
    """Collects the records of the ``distexec`` loggers; ``wait_for(text)`` waits for one."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self.arrived = threading.Condition()

    def emit(self, record):
        with self.arrived:
            self.messages.append(f"{record.levelname} {record.getMessage()}")
            self.arrived.notify_all()

    def wait_for(self, text: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while True:
                found = [m for m in self.messages if text in m]
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                assert left > 0, f"no log record with {text!r} in {self.messages}"
                self.arrived.wait(left)


@pytest.fixture
def logs():
    watch = LogWatch()
    logger = logging.getLogger("distexec")
    old = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(watch)
    yield watch
    logger.removeHandler(watch)
    logger.setLevel(old)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_status(proc, timeout: float = 60.0) -> tuple[int, float]:
    """The worker's exit status and how long after its start it came."""
    start = time.monotonic()
    code = proc.wait(timeout)
    return code, time.monotonic() - start


def worker_pid_of(pid: int) -> int:
    return distexec.remotecall_fetch(os.getpid, pid)


# --------------------------------------------------------------------------------------------
# joining
# --------------------------------------------------------------------------------------------
def test_a_worker_joins_with_the_cookie_on_stdin(joiners):
    started: list[int] = []
    key = distexec.add_worker_started_callback(started.append)
    try:
        em = joiners.manager()
        assert em.join_command() == f"distexec worker --join 127.0.0.1:{em.port}"
        assert em.join_command("10.0.0.5") == f"distexec worker --join 10.0.0.5:{em.port}"
        proc = joiners.start(em)
        [pid] = em.wait_for_workers(1, timeout=60)
    finally:
        distexec.remove_worker_started_callback(key)
    assert pid >= 2 and started == [pid]
    assert distexec.workers() == [pid]
    assert distexec.default_worker_pool().workers() == [pid]
    assert worker_pid_of(pid) == proc.pid
    assert distexec.remotecall_fetch(distexec.myid, pid) == pid


def test_a_worker_joins_with_an_owner_only_cookie_file(joiners, tmp_path):
    em = joiners.manager()
    path = tmp_path / "cookie"
    path.write_text(distexec.cluster_cookie() + "\n")
    path.chmod(0o600)
    proc = joiners.start(em, "--cookie-file", str(path), stdin=b"")
    [pid] = em.wait_for_workers(1, timeout=60)
    assert worker_pid_of(pid) == proc.pid


def test_a_cookie_file_others_can_read_is_refused(joiners, tmp_path, logs):
    em = joiners.manager()
    path = tmp_path / "cookie"
    path.write_text(distexec.cluster_cookie() + "\n")
    path.chmod(0o644)
    proc = joiners.start(em, "--cookie-file", str(path), stdin=b"")
    code, _ = exit_status(proc)
    assert code == elastic.EXIT_BAD_COOKIE
    assert "readable by others" in joiners.stderr(proc)
    assert "chmod 600" in joiners.stderr(proc)
    assert em.workers() == [] and distexec.workers() == [1]
    assert not any("ElasticManager refused" in m for m in logs.messages)  # it never connected


def test_a_wrong_cookie_is_refused_at_once_and_logged(joiners, logs):
    em = joiners.manager()
    proc = joiners.start(em, "--join-timeout", "60", stdin=b"w" * 64 + b"\n")
    code, _ = exit_status(proc, timeout=45)  # at once: long before --join-timeout
    assert code == elastic.EXIT_REFUSED
    err = joiners.stderr(proc)
    assert "refused this worker" in err and "wrong cluster cookie" in err
    assert "retrying" not in err
    assert "ElasticManager refused a worker joining from 127.0.0.1" in logs.wait_for(
        "ElasticManager refused")
    assert em.workers() == [] and distexec.workers() == [1]


@pytest.mark.parametrize("value", ["soon", "0", "-3", "nan"])
def test_a_bad_handshake_timeout_is_refused_by_the_master_as_by_its_workers(
        joiners, monkeypatch, value):
    """The join port reads ``DISTEXEC_HANDSHAKE_TIMEOUT`` as a worker does: a value that is
    not a positive number of seconds is an error naming it, not a silent 10 s."""
    monkeypatch.setenv("DISTEXEC_HANDSHAKE_TIMEOUT", value)
    with pytest.raises(ValueError, match="DISTEXEC_HANDSHAKE_TIMEOUT must be a positive"):
        joiners.manager()
    monkeypatch.setenv("DISTEXEC_HANDSHAKE_TIMEOUT", "2.5")
    assert joiners.manager()._listener._handshake_timeout == 2.5


class _Evidence:
    """Unpickling this creates a file: proof that someone unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_refused_join_has_nothing_unpickled(joiners, logs, tmp_path):
    """A stranger that fails the challenge and sends a pickle right behind its reply: the
    master answers with a refusal, hangs up, logs it, and never unpickles the bytes."""
    em = joiners.manager()
    evidence = tmp_path / "unpickled"
    with socket.create_connection(("127.0.0.1", em.port), timeout=10) as sock:
        hello = b""
        while len(hello) < handshake.HELLO_SIZE:
            hello += sock.recv(handshake.HELLO_SIZE - len(hello))
        client = handshake.ClientHandshake(b"not-the-cluster-cookie")
        reply = client.receive_hello(hello)
        sock.sendall(reply + pickle.dumps(_Evidence(str(evidence))) * 10)
        verdict = b""
        try:
            while chunk := sock.recv(4096):  # until the master hangs up
                verdict += chunk
        except ConnectionResetError:  # it closed with our pickles unread: a reset
            pass
    # the refusal, when it arrived before the reset
    assert verdict[:1] in (b"", bytes([handshake.Status.BAD_CREDENTIALS]))
    logs.wait_for("ElasticManager refused a worker joining from 127.0.0.1")
    assert not evidence.exists()
    assert em.workers() == []


@pytest.fixture
def plaintext_afterwards():
    """A master that required encryption keeps requiring it: later tests start plaintext."""
    yield
    from distexec.runtime.context import default_context
    default_context().security = None


def test_a_plaintext_join_to_a_tls_master_is_refused(plaintext_afterwards, joiners, logs,
                                                     tmp_path):
    pytest.importorskip("cryptography", reason="Security.temporary() needs cryptography")
    security = distexec.Security.temporary(require_encryption=True)
    em = joiners.manager(security=security)
    assert em.join_command().endswith("--tls")
    proc = joiners.start(em)
    code, _ = exit_status(proc, timeout=45)
    assert code == elastic.EXIT_REFUSED
    assert "requires TLS" in joiners.stderr(proc)
    assert "TLS handshake failed" in logs.wait_for("ElasticManager refused")
    assert em.workers() == []
    # with --tls and the TLS line after the cookie (on stdin, or in the cookie file) they join
    secret = distexec.cluster_cookie().encode() + b"\n" + security.stdin_line()
    on_stdin = joiners.start(em, "--tls", stdin=secret)
    path = tmp_path / "join-secret"
    path.write_bytes(secret)
    path.chmod(0o400)
    from_file = joiners.start(em, "--tls", "--cookie-file", str(path), stdin=b"")
    pids = em.wait_for_workers(2, timeout=60)
    assert sorted(map(worker_pid_of, pids)) == sorted([on_stdin.pid, from_file.pid])
    assert distexec.remotecall_fetch(_peer_address_and_hop, pids[1], pids[0])[1] == pids[0]


def test_an_absent_master_is_retried_then_the_worker_exits(joiners):
    port = free_port()
    start = time.monotonic()
    proc = joiners.start(f"127.0.0.1:{port}", "--join-timeout", "3")
    code = proc.wait(60)
    assert code == elastic.EXIT_UNREACHABLE
    assert time.monotonic() - start >= 3
    err = joiners.stderr(proc)
    assert "retrying" in err and "within 3 seconds" in err
    attempts = int(err.split(" attempts")[0].rsplit("(", 1)[1])
    assert 3 <= attempts <= 20  # backoff: more than one try, far fewer than a busy loop


def test_a_worker_started_before_its_master_joins_when_it_listens(joiners):
    port = free_port()
    proc = joiners.start(f"127.0.0.1:{port}", "--join-timeout", "60")
    wait_until(lambda: "cannot reach the master" in joiners.stderr(proc), 30,
               message="the worker's first failed attempt")
    em = joiners.manager(port=port)
    [pid] = em.wait_for_workers(1, timeout=60)
    assert worker_pid_of(pid) == proc.pid


def test_the_cli_keeps_join_options_together(tmp_path):
    done = subprocess.run([sys.executable, "-m", "distexec", "worker", "--cookie-file",
                           str(tmp_path / "c")], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "go with --join" in done.stderr
    done = subprocess.run([*JOIN, "nohostport"], capture_output=True, text=True, timeout=30,
                          input="x" * 32 + "\n")
    assert done.returncode == 2 and "HOST:PORT" in done.stderr


# --------------------------------------------------------------------------------------------
# joining and leaving while work runs
# --------------------------------------------------------------------------------------------
def _square_when_open(x, progress, gate):
    """Reports ``x``; from the 8th item on, waits for the gate to open first."""
    distexec.put(progress, x)
    if x >= 8:
        distexec.wait(gate)
    return x * x, distexec.myid()


@contextlib.contextmanager
def _pmap_held_at_its_gate(n: int, retry_delays: list[float]):
    """A ``pmap`` of ``_square_when_open`` over ``range(n)`` on the default pool (which
    newcomers join; pmap's own default is the workers of its start), held at the gate once
    the cluster is inside it while the block runs. Yields the list that gets its result."""
    progress = distexec.RemoteChannel(lambda: distexec.Channel(100))
    gate = distexec.RemoteChannel(lambda: distexec.Channel(1))
    outcome: list = []
    runner = threading.Thread(target=lambda: outcome.append(distexec.pmap(
        lambda x: _square_when_open(x, progress, gate), range(n),
        pool=distexec.default_worker_pool(), retry_delays=retry_delays)))
    runner.start()
    try:
        seen = set()
        while not any(x >= 8 for x in seen):  # the cluster is inside the pmap, at the gate
            seen.add(distexec.take(progress))
        yield outcome
    finally:
        if not gate.isready():
            distexec.put(gate, True)
        runner.join(60)
    assert not runner.is_alive()

def test_workers_join_and_leave_during_a_pmap_whose_result_is_exact(joiners):
    em = joiners.manager()
    first = [joiners.start(em) for _ in range(2)]
    old = em.wait_for_workers(2, timeout=60)
    with _pmap_held_at_its_gate(40, [0.1] * 5) as outcome:
        by_os = {worker_pid_of(p): p for p in old}
        leaving = by_os[first[0].pid]
        first[0].send_signal(signal.SIGTERM)
        wait_until(lambda: leaving not in distexec.workers(), 30, message="the SIGTERM'd worker")
        joiners.start(em)
        new = [p for p in em.wait_for_workers(2, timeout=60) if p not in old]
        assert len(new) == 1
    [results] = outcome
    assert [value for value, _ in results] == [x * x for x in range(40)]
    assert new[0] in {pid for _, pid in results}  # the newcomer took part
    assert leaving not in {pid for x, (_, pid) in enumerate(results) if x >= 8}


def _whoami_slowly(x):
    import time as t
    t.sleep(0.05)  # simulated work, so tasks are still queued when the newcomer joins
    return distexec.myid()


def test_executors_and_pools_on_the_default_pool_use_workers_as_they_join(joiners):
    em = joiners.manager()
    joiners.start(em)
    [first] = em.wait_for_workers(1, timeout=60)
    pool = distexec.default_worker_pool()
    with distexec.DistributedExecutor(pool=pool) as ex, distexec.Pool(pool=pool) as mp:
        futures = [ex.submit(_whoami_slowly, i) for i in range(100)]
        async_result = mp.map_async(_whoami_slowly, range(100), chunksize=1)
        joiners.start(em)
        [second] = [p for p in em.wait_for_workers(2, timeout=60) if p != first]
        ran = {f.result(timeout=60) for f in futures}
        ran_pool = set(async_result.get(timeout=60))
    assert second in ran and second in ran_pool


def test_a_worker_that_leaves_fails_only_its_own_calls(joiners):
    exited: list[int] = []
    key = distexec.add_worker_exited_callback(lambda pid, state: exited.append(pid))
    try:
        em = joiners.manager()
        procs = [joiners.start(em) for _ in range(2)]
        pids = em.wait_for_workers(2, timeout=60)
        by_os = {worker_pid_of(p): p for p in pids}
        victim = by_os[procs[0].pid]
        other = by_os[procs[1].pid]
        blocked = distexec.remotecall(time.sleep, victim, 60)
        fine = distexec.remotecall(lambda: 42, other)
        procs[0].send_signal(signal.SIGTERM)
        with pytest.raises(distexec.ProcessExitedException):
            blocked.fetch()
        assert fine.fetch() == 42
        wait_until(lambda: victim in exited, 30, message="the exited callback")
        assert distexec.workers() == [other] and em.workers() == [other]
        assert distexec.remotecall_fetch(lambda: 7, other) == 7
    finally:
        distexec.remove_worker_exited_callback(key)


@pytest.mark.timeout(240)
def test_32_workers_join_at_once(joiners):
    em = joiners.manager()
    procs = [joiners.start(em) for _ in range(32)]
    pids = em.wait_for_workers(32, timeout=200)
    assert len(pids) == 32 == len(set(pids)) and distexec.workers() == pids
    os_pids = distexec.pmap(lambda _: os.getpid(), range(32), pool=distexec.WorkerPool(pids),
                            batch_size=1)
    assert set(os_pids) <= {p.pid for p in procs}
    assert sorted(distexec.remotecall_fetch(os.getpid, p) for p in pids) == sorted(
        p.pid for p in procs)


# --------------------------------------------------------------------------------------------
# other hosts: network namespaces dxh1/dxh2 (.ci/setup-sshd.sh), joining over veth links
# --------------------------------------------------------------------------------------------
def _peer_address_and_hop(target):
    """On a worker: where it listens, and a call to worker ``target`` (worker to worker)."""
    from distexec.runtime.context import current_context
    return current_context().worker_address, distexec.remotecall_fetch(distexec.myid, target)


@pytest.mark.filterwarnings("ignore::distexec.SecurityWarning")
def test_workers_in_namespace_hosts_join_over_veth_links(joiners, ssh_namespaces):
    em = joiners.manager(address="0.0.0.0")
    assert em.join_command("10.213.1.1") == f"distexec worker --join 10.213.1.1:{em.port}"
    one = joiners.start(f"10.213.1.1:{em.port}", netns="dxh1")
    [a] = em.wait_for_workers(1, timeout=60)
    two = joiners.start(f"10.213.2.1:{em.port}", netns="dxh2")
    b = [p for p in em.wait_for_workers(2, timeout=60) if p != a][0]
    # the master sees them arrive from the namespace hosts' addresses
    from distexec.runtime.context import current_context
    assert current_context().record(a).config.host == "10.213.1.2"
    assert current_context().record(b).config.host == "10.213.2.2"
    # each listens on its own host's address and the other reaches it there (all_to_all)
    where_b, seen_a = distexec.remotecall_fetch(_peer_address_and_hop, b, a)
    assert where_b[0] == "10.213.2.2" and seen_a == a
    where_a, seen_b = distexec.remotecall_fetch(_peer_address_and_hop, a, b)
    assert where_a[0] == "10.213.1.2" and seen_b == b
    assert (worker_pid_of(a), worker_pid_of(b)) == (one.pid, two.pid)


@pytest.fixture
def cut_port(ssh_namespaces):
    """``cut_port(namespace, port)``: the namespace host's packets to and from ``port`` vanish
    (iptables DROP: nothing refused or reset, as when a node is gone). Only that port: other
    tests may be using the namespace hosts meanwhile. A detached shell removes the rules after
    60 s even if this process dies first."""
    import shutil
    if shutil.which("iptables") is None:
        pytest.skip("iptables is not installed; run .ci/setup-sshd.sh (as root)")
    deletes: list[str] = []
    healers: list[subprocess.Popen] = []

    def cut(namespace: str, port: int) -> None:
        rules = [["OUTPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP"],
                 ["INPUT", "-p", "tcp", "--sport", str(port), "-j", "DROP"]]
        delete = " ; ".join(f"ip netns exec {namespace} iptables -D {' '.join(r)}"
                            for r in rules)
        deletes.append(delete)
        healers.append(subprocess.Popen(
            ["sh", "-c", f"sleep 60; {delete}"], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        for rule in rules:
            subprocess.run(["ip", "netns", "exec", namespace, "iptables", "-A", *rule],
                           check=True, timeout=10)

    yield cut
    for delete in deletes:
        subprocess.run(["sh", "-c", delete], capture_output=True, timeout=10)
    for healer in healers:
        os.killpg(healer.pid, signal.SIGKILL)
        healer.wait()


@pytest.mark.filterwarnings("ignore::distexec.SecurityWarning")
def test_a_worker_whose_node_vanishes_fails_only_its_calls_and_pmap_finishes(
        joiners, cut_port, monkeypatch):
    monkeypatch.setenv("DISTEXEC_HEARTBEAT_TIMEOUT", "3")  # the master's, and the workers'
    em = joiners.manager(address="0.0.0.0")
    remote = joiners.start(f"10.213.1.1:{em.port}", netns="dxh1")
    [far] = em.wait_for_workers(1, timeout=60)
    joiners.start(em)
    [near] = [p for p in em.wait_for_workers(2, timeout=60) if p != far]
    with _pmap_held_at_its_gate(30, [0.5] * 10) as outcome:
        cut_port("dxh1", em.port)  # the far worker's node is gone, silently
        wait_until(lambda: far not in distexec.workers(), 30, message="the heartbeat verdict")
    [results] = outcome
    assert [value for value, _ in results] == [x * x for x in range(30)]
    assert em.workers() == [near]
    assert remote.wait(30) == 1  # it gave up on its master in turn (its own heartbeat)
