"""SSHManager against real OpenSSH servers (started by .ci/setup-sshd.sh).

One sshd listens on 127.0.0.1; two more run in network namespaces dxh1 (10.213.1.2) and dxh2
(10.213.2.2), "hosts" with their own addresses that reach each other through the root
namespace. The ``ssh_workers`` fixture (tests/managers/conftest.py) adds workers and checks
afterwards that no remote worker process outlived the test.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from concurrent.futures.process import BrokenProcessPool

import psutil
import pytest

import distexec as d
from distexec import LaunchWorkerError, ProcessExitedException, RemoteException
from distexec.cluster import membership
from distexec.cluster.ssh import SSHManager
from distexec.cluster.thread_limits import cpu_share
from distexec.runtime.context import current_context
from tests.docs_blocks import blocks_needing, problems, run_program
from tests.executor.helpers import mark_initialized, square
from tests.helpers import assert_terminate_stops_a_sleeping_task, wait_for_output, wait_until

pytestmark = pytest.mark.timeout(90)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HELLO = os.path.join(REPO, "examples", "hello_cluster.py")


def os_pid(pid: int) -> int:
    return current_context().record(pid).os_pid


def ssh_process(pid: int):
    return current_context().record(pid).config.process


def _where():
    connection = os.environ.get("SSH_CONNECTION", "").split()
    return os.getpid(), os.getppid(), connection[2] if len(connection) > 2 else None


def assert_thread_limit(pid: int, workers_on_host: int) -> None:
    """Worker ``pid`` limited its numeric libraries' threads to its share of its host's
    cores (counted there) and removed the count it was told."""
    share = d.remotecall_fetch(cpu_share, pid, workers_on_host)
    assert d.remotecall_fetch(os.getenv, pid, "OPENBLAS_NUM_THREADS") == str(share)
    assert d.remotecall_fetch(os.getenv, pid, "OMP_NUM_THREADS") == str(share)
    assert d.remotecall_fetch(os.getenv, pid, "DISTEXEC_HOST_WORKERS") is None


def _signal_then_sleep(channel, seconds):
    channel.put("running")
    time.sleep(seconds)
    return "slept"


# --------------------------------------------------------------------------------------------
# adding, using and removing workers
# --------------------------------------------------------------------------------------------
def test_count_two_and_a_plain_host_come_up_and_answer(ssh_workers, ssh_namespaces):
    local, host1 = f"root@{ssh_namespaces.local}", ssh_namespaces.hosts["dxh1"]
    pids = ssh_workers([(local, 2), host1])
    assert pids == sorted(pids) and len(pids) == 3
    assert d.workers() == pids
    assert d.procs() == [1, *pids]
    assert d.nworkers() == 3
    where = {p: d.remotecall_fetch(_where, p) for p in pids}
    assert sorted(address for _, _, address in where.values()) == \
        sorted(["127.0.0.1", "127.0.0.1", host1])
    assert {d.remotecall_fetch(d.myid, p) for p in pids} == set(pids)
    local_pids = [p for p in pids if where[p][2] == "127.0.0.1"]
    # count > 1: the first worker on the host started the second one there
    a, b = local_pids
    first, extra = (a, b) if where[b][1] == where[a][0] else (b, a)
    assert where[extra][1] == where[first][0], where
    assert d.remotecall_fetch(lambda x: x + 1, extra, 41) == 42
    # two workers on the host share its cores, the extra one too (it inherits the limit)
    for pid in local_pids:
        assert_thread_limit(pid, workers_on_host=2)


def _script_view():
    main = sys.modules["__main__"]
    return sys.argv, getattr(main, "__file__", None)


def test_an_ssh_worker_sees_the_masters_argv_and_script_path_where_it_exists(ssh_workers,
                                                                               ssh_namespaces):
    """Both hosts share this machine's files: the script's path exists there."""
    (pid,) = ssh_workers([ssh_namespaces.hosts["dxh1"]])
    argv, main_file = d.remotecall_fetch(_script_view, pid)
    assert argv == sys.argv
    assert main_file == os.path.abspath(sys.modules["__main__"].__file__)


def _print_both(text):
    print(f"{text} out", flush=True)
    print(f"{text} err", file=sys.stderr, flush=True)


def test_output_of_every_worker_on_a_host_keeps_its_stream_and_takes_the_prefix(
        ssh_workers, ssh_hosts, capfd):
    """The second worker on a host is started, and its output relayed, by the first."""
    pids = ssh_workers([(ssh_hosts.local, 2)], output_prefix="<{pid}> ")
    for pid in pids:
        d.remotecall_fetch(_print_both, pid, f"hi {pid}")
    out = wait_for_output(capfd, *(f"<{p}> hi {p} out\n" for p in pids), consume=False)
    err = wait_for_output(capfd, *(f"<{p}> hi {p} err\n" for p in pids), stream="err")
    assert " err" not in out and " out" not in err
    assert "From worker" not in out + err


def test_repeated_specs_merge_and_auto_starts_one_per_cpu(ssh_workers, ssh_hosts):
    manager = SSHManager([ssh_hosts.local, ssh_hosts.local])
    assert manager.machines == {ssh_hosts.local: 2}
    pids = ssh_workers([(ssh_hosts.local, "auto")])
    assert len(pids) == os.cpu_count()
    assert {d.remotecall_fetch(os.getpid, p) for p in pids} == {os_pid(p) for p in pids}


def test_env_and_dir_reach_the_remote_worker(ssh_workers, ssh_hosts, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTEXEC_TEST_FORWARDED", "yes")
    tricky = "it's \"quoted\" $HOME `x` ; done"
    (pid,) = ssh_workers([ssh_hosts.local], env={"DX_VALUE": tricky}, dir=str(tmp_path))
    assert d.remotecall_fetch(os.getcwd, pid) == str(tmp_path)
    assert d.remotecall_fetch(os.getenv, pid, "DX_VALUE") == tricky
    assert d.remotecall_fetch(os.getenv, pid, "DISTEXEC_TEST_FORWARDED") == "yes"
    assert_thread_limit(pid, workers_on_host=1)


def test_invalid_env_key_and_shell_are_refused_before_anything_starts(ssh_workers, ssh_hosts):
    with pytest.raises(ValueError, match="invalid env key"):
        ssh_workers([ssh_hosts.local], env={"BAD-KEY": "1"})
    with pytest.raises(ValueError, match="invalid shell"):
        ssh_workers([ssh_hosts.local], shell="fish")
    assert d.procs() == [1]


def _assert_not_in_cmdline_or_environ(secret: bytes, pids, *, processes: int) -> None:
    """``secret`` is in no command line or environment of the workers and their ssh clients."""
    found = [psutil.Process(os_pid(p)) for p in pids]
    found += [psutil.Process(ssh_process(p).pid) for p in pids if ssh_process(p)]
    assert len(found) == processes
    for process in found:
        for name in ("cmdline", "environ"):
            with open(f"/proc/{process.pid}/{name}", "rb") as f:
                assert secret not in f.read(), (process, name)


def test_the_cookie_is_not_in_any_command_line_or_environment(ssh_workers, ssh_hosts):
    pids = ssh_workers([(ssh_hosts.local, 2)])
    cookie = str(current_context().cookie).encode()
    _assert_not_in_cmdline_or_environ(cookie, pids, processes=3)  # two workers, one ssh


def test_rmprocs_ends_the_remote_workers_and_their_ssh(ssh_workers, ssh_hosts):
    pids = ssh_workers([(ssh_hosts.local, 2)])
    remote = [psutil.Process(os_pid(p)) for p in pids]
    ssh = [ssh_process(p) for p in pids if ssh_process(p) is not None]
    d.rmprocs(pids, waitfor=20)
    assert d.procs() == [1]
    gone, alive = psutil.wait_procs(remote, timeout=10)
    assert not alive
    for process in ssh:
        assert process.wait(timeout=10) == 0


def test_interrupt_reaches_a_busy_remote_worker(ssh_workers, ssh_hosts):
    (pid,) = ssh_workers([ssh_hosts.local])
    channel = d.RemoteChannel(1, 10)
    call = d.remotecall(_signal_then_sleep, pid, channel, 30)
    assert channel.take(timeout=10) == "running"
    start = time.monotonic()
    d.interrupt(pid)
    with pytest.raises(RemoteException) as info:
        call.fetch(timeout=10)
    assert isinstance(info.value.captured.ex, KeyboardInterrupt)
    assert time.monotonic() - start < 10
    assert d.remotecall_fetch(d.myid, pid) == pid


def test_a_refusing_host_fails_while_the_other_comes_up(ssh_workers, ssh_hosts):
    refused = "127.0.0.1:1"  # nothing listens on port 1: ssh fails at once
    start = time.monotonic()
    with pytest.raises(LaunchWorkerError, match="Unable to read host:port string"):
        ssh_workers([refused, ssh_hosts.local])
    assert time.monotonic() - start < 20
    (pid,) = d.workers()
    assert d.remotecall_fetch(d.myid, pid) == pid


def test_multiplex_is_refused_clearly(ssh_workers, ssh_hosts):
    with pytest.raises(NotImplementedError, match="multiplex"):
        ssh_workers([ssh_hosts.local], tunnel=True, multiplex=True)


def test_tunnel_reaches_the_worker_through_ssh(ssh_workers, ssh_namespaces):
    (pid,) = ssh_workers([ssh_namespaces.hosts["dxh1"]], tunnel=True)
    config = current_context().record(pid).config
    assert config.forward.startswith("127.0.0.1:")
    assert current_context().record(pid).conn.sock.getpeername()[0] == "127.0.0.1"
    assert d.remotecall_fetch(d.myid, pid) == pid


def test_an_executor_runs_on_ssh_workers_and_removes_them(ssh_hosts, empty_cluster):
    manager = SSHManager([(ssh_hosts.local, 2)])
    with d.DistributedExecutor(manager=manager, sshflags=ssh_hosts.sshflags) as executor:
        workers = executor.workers()
        assert len(workers) == 2
        assert list(executor.map(abs, range(-20, 0))) == list(range(20, 0, -1))
        remote = [psutil.Process(os_pid(p)) for p in workers]
    assert d.procs() == [1]
    gone, alive = psutil.wait_procs(remote, timeout=15)
    assert not alive


# --------------------------------------------------------------------------------------------
# replacing a worker (what an executor does when one of its workers dies or retires)
# --------------------------------------------------------------------------------------------
def _kill_myself() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_and_replace(ssh_workers, pid: int, **params) -> tuple[SSHManager, list[int]]:
    """SIGKILL worker ``pid`` from inside, then add its manager's replacement for it."""
    ctx = current_context()
    d.remote_do(_kill_myself, pid)
    wait_until(lambda: pid not in d.procs(), 15, message=f"worker {pid} to leave")
    manager, config = membership.launched_by(ctx, pid)
    replacement = manager.replacement(config)
    new = membership.addprocs(ctx, replacement, params)
    ssh_workers.seen.extend(os_pid(p) for p in new)  # the fixture checks they exit too
    return replacement, new


@pytest.mark.filterwarnings("ignore::distexec.SecurityWarning")  # plaintext to dxh1, dxh2
def test_a_replacement_lands_on_the_same_host(ssh_workers, ssh_namespaces):
    host1, host2 = ssh_namespaces.hosts["dxh1"], ssh_namespaces.hosts["dxh2"]
    pids = ssh_workers([host1, host2])
    (victim,) = [p for p in pids if d.remotecall_fetch(_where, p)[2] == host1]
    replacement, new = _kill_and_replace(ssh_workers, victim, sshflags=ssh_namespaces.sshflags)
    assert replacement.machines == {host1: 1}
    assert len(new) == 1 and d.workers() == sorted([*(set(pids) - {victim}), *new])
    assert d.remotecall_fetch(_where, new[0])[2] == host1
    assert d.remotecall_fetch(d.myid, new[0]) == new[0]


def test_a_replacement_keeps_the_machine_spec_with_its_bind_port_as_a_hint(ssh_workers,
                                                                          ssh_hosts):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    machine = f"root@{ssh_hosts.local}"
    pids = ssh_workers([(f"{machine} 127.0.0.1:{port}", 2)])
    ports = {p: current_context().record(p).connect_at[1] for p in pids}
    (first,) = [p for p in pids if ports[p] == port]
    (extra,) = [p for p in pids if p != first]
    first_config = current_context().record(first).config
    # the first worker still holds the port: the extra one's replacement must scan past it
    replacement, new = _kill_and_replace(ssh_workers, extra, sshflags=ssh_hosts.sshflags)
    hinted = {f"{machine} 127.0.0.1:[{port}]": 1}
    assert replacement.machines == hinted
    manager = membership.launched_by(current_context(), first)[0]
    assert manager.replacement(first_config).machines == hinted
    (pid,) = new
    assert current_context().record(pid).connect_at[0] == "127.0.0.1"
    assert current_context().record(pid).connect_at[1] != port
    assert d.remotecall_fetch(_where, pid)[2] == "127.0.0.1"
    assert d.remotecall_fetch(d.myid, pid) == pid


# --------------------------------------------------------------------------------------------
# DistributedExecutor and Pool on SSH workers: ProcessPoolExecutor's model, replacements
# --------------------------------------------------------------------------------------------
def _probe(seconds=0.0):
    """An executor task: (OS pid, the address ssh reached, on the main thread?, what the
    initializer left there: ``(tag, OS pid)`` or None)."""
    import threading

    from tests.executor.helpers import initialized_in

    pid_here, mark = initialized_in(seconds)
    return pid_here, _where()[2], threading.current_thread() is threading.main_thread(), mark


def _report_then_sleep(channel, seconds):
    """An executor task that says where it runs (``_probe()``), then sleeps."""
    channel.put(_probe())
    time.sleep(seconds)
    return "slept"


def _probe_until_seen(executor, os_pids, timeout: float = 30) -> dict[int, tuple]:
    """Run rounds of ``_probe`` tasks until each of ``os_pids`` ran one; {OS pid: the rest}."""
    seen: dict[int, tuple] = {}

    def one_round():
        for pid_here, *rest in executor.map(_probe, [0.01] * 4, timeout=timeout):
            seen[pid_here] = tuple(rest)
        return set(os_pids) <= set(seen)

    wait_until(one_round, timeout, interval=0, message=f"tasks on worker processes {os_pids}")
    return seen


def _plain_ssh_problem(host: str) -> str | None:
    """Why ``ssh host`` without the test servers' sshflags fails, or None when it works.

    ``distexec.Pool`` (like ``distexec run``) passes no addprocs parameters, so its SSH
    workers rely on ~/.ssh/config, where .ci/setup-sshd.sh declares the namespace hosts.
    """
    plain = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", host, "true"],
                           capture_output=True, text=True, timeout=15)
    if plain.returncode == 0:
        return None
    return (f"plain `ssh {host}` fails ({plain.stderr.strip()}): ~/.ssh/config lacks the "
            "block .ci/setup-sshd.sh writes")


@pytest.mark.filterwarnings("ignore::distexec.SecurityWarning")  # plaintext to dxh1, dxh2
def test_an_executor_initializes_ssh_workers_and_replaces_a_killed_one_on_its_host(
        ssh_workers, ssh_namespaces):
    host1, host2 = ssh_namespaces.hosts["dxh1"], ssh_namespaces.hosts["dxh2"]
    with d.DistributedExecutor(manager=SSHManager([host1, host2]), initializer=mark_initialized,
                               initargs=("ssh",), sshflags=ssh_namespaces.sshflags) as executor:
        first = executor.workers()
        assert len(first) == 2
        by_os_pid = {os_pid(p): p for p in first}
        ssh_workers.seen.extend(by_os_pid)  # the fixture checks that they exit
        seen = _probe_until_seen(executor, by_os_pid)
        assert {address for address, _, _ in seen.values()} == {host1, host2}
        for remote, (_address, on_main, mark) in seen.items():
            assert on_main and mark == ("ssh", remote)  # the task ran where the initializer did

        started = d.RemoteChannel(1, 10)
        running = executor.submit(_report_then_sleep, started, 60)
        victim_os_pid, victim_host, on_main, _mark = started.take(timeout=15)
        assert on_main
        victim = by_os_pid[victim_os_pid]
        d.remote_do(_kill_myself, victim)
        with pytest.raises(ProcessExitedException) as info:
            running.result(timeout=20)
        assert isinstance(info.value, BrokenProcessPool)
        assert info.value.worker_id == victim

        (replacement,) = wait_until(lambda: [p for p in executor.workers() if p not in first],
                                    30, message=f"a replacement of worker {victim}")
        replacement_os_pid = os_pid(replacement)
        ssh_workers.seen.append(replacement_os_pid)
        assert sorted(executor.workers()) == sorted([*(set(first) - {victim}), replacement])
        assert current_context().record(replacement).connect_at[0] == victim_host
        seen = _probe_until_seen(executor, [replacement_os_pid])
        assert seen[replacement_os_pid] == (victim_host, True, ("ssh", replacement_os_pid))
    assert d.procs() == [1]


@pytest.mark.filterwarnings("ignore::distexec.SecurityWarning")  # plaintext to dxh1
def test_max_tasks_per_child_recycles_ssh_workers_on_the_same_host(ssh_workers, ssh_namespaces):
    host1 = ssh_namespaces.hosts["dxh1"]
    with d.DistributedExecutor(manager=SSHManager([host1]), max_tasks_per_child=2,
                               initializer=mark_initialized, initargs=("recycled",),
                               sshflags=ssh_namespaces.sshflags) as executor:
        try:
            outcomes = list(executor.map(_probe, [0.0] * 6, timeout=60))
        finally:
            ssh_workers.seen.extend(os_pid(p) for p in executor.workers())
        ssh_workers.seen.extend(remote for remote, *_ in outcomes)
    assert d.procs() == [1]
    ran = collections.Counter(remote for remote, *_ in outcomes)
    assert sorted(ran.values()) == [2, 2, 2], ran  # three processes, two tasks each
    for remote, address, on_main, mark in outcomes:
        assert address == host1 and on_main
        assert mark == ("recycled", remote)  # each replacement ran the initializer first


@pytest.mark.filterwarnings("ignore::distexec.SecurityWarning")  # plaintext to dxh1, dxh2
def test_a_pool_on_ssh_workers_maps_calls_back_and_terminates_a_sleeping_task(
        ssh_workers, ssh_namespaces):
    host1, host2 = ssh_namespaces.hosts["dxh1"], ssh_namespaces.hosts["dxh2"]
    problem = _plain_ssh_problem(host1)
    if problem is not None:
        pytest.skip(problem)
    pool = d.Pool(initializer=mark_initialized, initargs=("pool",),
                  manager=SSHManager([host1, host2]))
    try:
        ssh_workers.seen.extend(os_pid(p) for p in d.workers())
        assert len(d.workers()) == 2
        assert pool.map(square, range(20)) == [x * x for x in range(20)]
        called: list = []
        applied = pool.apply_async(_probe, (0.0,), callback=called.append)
        remote, address, on_main, mark = applied.get(timeout=20)
        assert called == [(remote, address, on_main, mark)]
        assert address in (host1, host2) and on_main and mark == ("pool", remote)
        assert list(pool.imap(square, range(10))) == [x * x for x in range(10)]

        assert_terminate_stops_a_sleeping_task(pool, _report_then_sleep)
    finally:
        pool.terminate()
        pool.join()
    assert d.procs() == [1]


# --------------------------------------------------------------------------------------------
# several hosts
# --------------------------------------------------------------------------------------------
@pytest.mark.fault("L1")
def test_an_unreachable_host_fails_within_the_connect_timeout(ssh_workers, ssh_namespaces):
    host2 = ssh_namespaces.hosts["dxh2"]
    connect_timeout = 2
    sshflags = [*ssh_namespaces.sshflags, "-o", f"ConnectTimeout={connect_timeout}"]
    with _link_cut("dxh2"):
        start = time.monotonic()
        with pytest.raises(LaunchWorkerError, match="Unable to read host:port string"):
            ssh_workers([host2], sshflags=sshflags)
        assert time.monotonic() - start < connect_timeout + 2  # spec L1
        # with a reachable host in the same call (whose own launch time is not L1's budget):
        with pytest.raises(LaunchWorkerError, match="Unable to read host:port string"):
            ssh_workers([host2, ssh_namespaces.local], sshflags=sshflags)
    (pid,) = d.workers()
    assert current_context().record(pid).connect_at[0] == "127.0.0.1"


def test_workers_on_two_hosts_call_each_other(ssh_workers, ssh_namespaces):
    host1, host2 = ssh_namespaces.hosts["dxh1"], ssh_namespaces.hosts["dxh2"]
    a, b = ssh_workers([host1, host2])
    addresses = {current_context().record(p).connect_at[0] for p in (a, b)}
    assert addresses == {host1, host2}
    # lazy all_to_all: the first call between them opens their link, in either direction
    assert d.remotecall_fetch(lambda p: d.remotecall_fetch(_where, p)[2], a, b) == \
        d.remotecall_fetch(lambda: _where()[2], b)
    assert d.remotecall_fetch(lambda p: d.remotecall_fetch(d.myid, p), b, a) == a


def _link_types() -> dict[int, str]:
    """Runs on a worker: the type of the channel under each of its links."""
    ctx = current_context()
    with ctx.lock:
        return {p: type(r.conn.sock).__name__ for p, r in ctx.peers.items() if r.conn}


def test_tls_workers_on_two_hosts_get_the_key_on_stdin_only(ssh_workers, ssh_namespaces):
    host1, host2 = ssh_namespaces.hosts["dxh1"], ssh_namespaces.hosts["dxh2"]
    security = d.Security.temporary()
    with warnings.catch_warnings():
        warnings.simplefilter("error", d.SecurityWarning)  # beyond loopback, but encrypted
        pids = ssh_workers([(host1, 2), host2], security=security)
    (other,) = [p for p in pids if d.remotecall_fetch(lambda: _where()[2], p) == host2]
    for p in pids:  # links across hosts, also from the worker that the first one started
        if p != other:
            assert d.remotecall_fetch(lambda q: d.remotecall_fetch(d.myid, q), p, other) == other
    assert {type(current_context().record(p).conn.sock).__name__ for p in pids} == {"TLSChannel"}
    assert set(d.remotecall_fetch(_link_types, max(pids)).values()) == {"TLSChannel"}
    key_line = security._key.splitlines()[1].encode()
    _assert_not_in_cmdline_or_environ(key_line, pids, processes=5)  # three workers, two ssh


@pytest.mark.fault("N14")
@pytest.mark.parametrize(("params", "warns"), [
    ({}, True), ({"tunnel": True}, False), ({"security": "temporary"}, False),
], ids=["plaintext-warns", "tunnel", "tls"])
def test_a_worker_on_another_host_warns_unless_encrypted(ssh_workers, ssh_namespaces,
                                                          params, warns):
    if params.get("security") == "temporary":
        params = {"security": d.Security.temporary()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (pid,) = ssh_workers([ssh_namespaces.hosts["dxh1"]], **params)
    messages = [str(w.message) for w in caught if issubclass(w.category, d.SecurityWarning)]
    expected = [f"workers [{pid}] listen on {ssh_namespaces.hosts['dxh1']}, beyond loopback"]
    assert [m.split(", without")[0] for m in messages] == (expected if warns else [])


def test_a_cut_link_fails_calls_in_bounded_time(ssh_workers, ssh_namespaces):
    host2 = ssh_namespaces.hosts["dxh2"]
    keepalive = ["-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=2"]
    (pid,) = ssh_workers([host2], sshflags=[*ssh_namespaces.sshflags, *keepalive])
    remote = os_pid(pid)
    channel = d.RemoteChannel(1, 10)
    call = d.remotecall(_signal_then_sleep, pid, channel, 60)
    assert channel.take(timeout=10) == "running"
    with _link_cut("dxh2"):
        start = time.monotonic()
        with pytest.raises(ProcessExitedException):
            call.fetch(timeout=20)
        # ssh notices after 2 unanswered keepalives 1 s apart (2-3 s), plus LOST_GRACE (2 s)
        assert time.monotonic() - start < 10
        wait_until(lambda: pid not in d.procs(), 10, message=f"worker {pid} removed")
    # the far side's sshd ends the session (ClientAlive*), so the worker's stdin closes
    wait_until(lambda: not psutil.pid_exists(remote) or
               psutil.Process(remote).status() == psutil.STATUS_ZOMBIE, 20,
               message="the cut-off worker to exit")


HEARTBEAT_TIMEOUT = 2.0
"""``T_hb`` of the partition test: the master and the remote worker both use it."""


@pytest.mark.fault("W12")
def test_a_partition_is_caught_by_heartbeats_on_both_sides(ssh_workers, ssh_namespaces,
                                                            monkeypatch):
    # Set before the worker starts: SSH workers get the master's DISTEXEC_* variables. ssh's
    # own keepalive (15 s by default) is slower, so the heartbeats are what is tested here.
    monkeypatch.setenv("DISTEXEC_HEARTBEAT_TIMEOUT", str(HEARTBEAT_TIMEOUT))
    monkeypatch.setenv("DISTEXEC_HEARTBEAT_INTERVAL", "0.25")
    (pid,) = ssh_workers([ssh_namespaces.hosts["dxh2"]])
    remote = os_pid(pid)
    channel = d.RemoteChannel(1, 10)
    call = d.remotecall(_signal_then_sleep, pid, channel, 60)
    assert channel.take(timeout=10) == "running"
    budget = HEARTBEAT_TIMEOUT + 1  # spec W12: T_hb + 1 s, on each side

    with _partitioned("dxh2"):
        start = time.monotonic()
        with pytest.raises(ProcessExitedException) as info:
            call.fetch(timeout=20)
        assert time.monotonic() - start < budget
        assert info.value.worker_id == pid
        assert "heartbeat" in str(info.value)
        assert pid not in d.workers()
        # The worker, cut off too, gives up on its master after its own heartbeat timeout.
        wait_until(lambda: not psutil.pid_exists(remote) or
                   psutil.Process(remote).status() == psutil.STATUS_ZOMBIE,
                   budget - (time.monotonic() - start), message="the cut-off worker to exit")


@contextlib.contextmanager
def _partitioned(namespace: str, heal_after: int = 40):
    """Drop every packet into and out of the namespace host (iptables), loopback aside.

    Nothing is refused or reset: packets vanish, as in a real partition. A detached shell
    removes the rules after ``heal_after`` s even if this process dies first (see
    :func:`_link_cut`).
    """
    if shutil.which("iptables") is None:
        pytest.skip("iptables is not installed; run .ci/setup-sshd.sh (as root)")
    rules = [["INPUT", "!", "-i", "lo", "-j", "DROP"], ["OUTPUT", "!", "-o", "lo", "-j", "DROP"]]
    delete = " ; ".join(f"ip netns exec {namespace} iptables -D {' '.join(rule)}"
                        for rule in rules)
    healer = subprocess.Popen(["sh", "-c", f"sleep {heal_after}; {delete}"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for rule in rules:
            subprocess.run(["ip", "netns", "exec", namespace, "iptables", "-A", *rule],
                           check=True, timeout=10)
        yield
    finally:
        subprocess.run(["sh", "-c", delete], capture_output=True, timeout=10)
        os.killpg(healer.pid, signal.SIGKILL)
        healer.wait()


@contextlib.contextmanager
def _link_cut(namespace: str, heal_after: int = 40):
    """Take the namespace's end of its veth down: its packets vanish without an error.

    A detached shell heals the link after ``heal_after`` s even if this process dies first
    (pytest-timeout ends it without running ``finally``), so one failure cannot cut the host
    off for the tests that follow.
    """
    device, gateway = f"dxv{namespace[-1]}p", f"10.213.{namespace[-1]}.1"
    heal = (f"ip netns exec {namespace} ip link set dev {device} up && "
            f"ip netns exec {namespace} ip route replace default via {gateway}")
    healer = subprocess.Popen(["sh", "-c", f"sleep {heal_after}; {heal}"],
                              stdin=subprocess.DEVNULL, start_new_session=True)
    subprocess.run(["ip", "netns", "exec", namespace, "ip", "link", "set", "dev", device, "down"],
                   check=True, timeout=10)
    try:
        yield
    finally:
        subprocess.run(["sh", "-c", heal], check=True, timeout=10)
        os.killpg(healer.pid, signal.SIGKILL)
        healer.wait()


# --------------------------------------------------------------------------------------------
# the master dies; a script runs unchanged on SSH workers
# --------------------------------------------------------------------------------------------
MASTER = textwrap.dedent("""
    import sys, time, distexec
    from distexec.cluster.ssh import SSHManager
    from distexec.runtime.context import current_context
    pids = distexec.addprocs(SSHManager([(sys.argv[1], 2)]), sshflags=sys.argv[2:])
    ctx = current_context()
    print(" ".join(str(ctx.record(p).os_pid) for p in pids), flush=True)
    time.sleep(120)
""")


def test_the_remote_command_survives_a_real_posix_shell(tmp_path):
    from distexec.cluster.ssh import remote_command

    probe = [sys.executable, "-c", "import json, os, sys; "
             "print(json.dumps([os.getcwd(), sys.argv[1:], os.environ['X']]))"]
    where = tmp_path / "a dir's \"name\""
    where.mkdir()
    tricky = "it's \"q\" $HOME `echo no` ; exit 3 \\ *"
    params = {**SSHManager(["h"]).default_addprocs_params(), "exename": probe,
              "dir": str(where), "env": {"X": tricky}}
    # what the remote login shell runs; sshd sets SSH_CONNECTION (here an IPv6 server address)
    done = subprocess.run(["sh", "-c", remote_command(params, None)], capture_output=True,
                          text=True, timeout=20,
                          env={**os.environ, "SSH_CONNECTION": "fd00::1 5555 fd00::2 22"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [
        str(where), ["-m", "distexec", "worker", "--die-with-stdin", "--separate-stderr",
                     "--bind-to", "[fd00::2]"],
        tricky]


@pytest.mark.fault("M3")
def test_remote_workers_exit_when_the_master_is_killed(ssh_hosts):
    master = subprocess.Popen([sys.executable, "-c", MASTER, ssh_hosts.local, *ssh_hosts.sshflags],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = master.stdout.readline()
        workers = [psutil.Process(int(p)) for p in line.split()]
        assert len(workers) == 2, line
        ssh = psutil.Process(master.pid).children()
    finally:
        master.kill()
        master.wait()
        master.stdout.close()
    start = time.monotonic()
    gone, alive = psutil.wait_procs(workers + ssh, timeout=10)
    assert not alive, alive
    assert time.monotonic() - start < 10


def test_the_hello_script_runs_on_workers_in_two_namespaces(ssh_namespaces, tmp_path):
    machine_file = tmp_path / "hosts"
    host1, host2 = ssh_namespaces.hosts["dxh1"], ssh_namespaces.hosts["dxh2"]
    machine_file.write_text(f"# two namespace hosts\n2*{host1}\n{host2}\n")
    # `distexec run` passes no ssh flags: the hosts' keys come from ~/.ssh/config, where
    # .ci/setup-sshd.sh declares them
    plain = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", host1, "true"],
                           capture_output=True, text=True, timeout=15)
    if plain.returncode != 0:
        pytest.skip(f"plain `ssh {host1}` fails ({plain.stderr.strip()}): ~/.ssh/config lacks "
                    "the block .ci/setup-sshd.sh writes")
    done = subprocess.run([sys.executable, "-m", "distexec", "run", "--machine-file",
                           str(machine_file), HELLO], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"at {host1}" in done.stdout and f"at {host2}" in done.stdout
    assert "3 workers, sum of squares 328350" in done.stdout


# --------------------------------------------------------------------------------------------
# the docs' blocks marked <!-- needs: ssh --> (tests/integration/test_docs_snippets.py says how)
# --------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore::distexec.SecurityWarning")
@pytest.mark.parametrize("block", blocks_needing("ssh"), ids=str)
def test_a_docs_block_that_needs_ssh_runs_and_prints_what_the_page_shows(block, ssh_namespaces):
    outcome = run_program([block], timeout=100)
    found = problems([block], outcome)
    assert not found, "\n\n".join(found)
