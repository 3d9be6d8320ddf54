"""The fault catalogue of spec/faults.md section 2, as data.

Every row has an id (W1 ... M5), a short scenario and its budget. A test that checks a row says
so with ``@pytest.mark.fault("W1")`` (or ``pytest.param(..., marks=pytest.mark.fault("W1"))`` in
a table of cases); ``tests/faults/test_catalogue.py`` collects the whole suite and fails when a
row has no test. Rows marked ``slow`` in the suite (1 GiB payloads, the soak, sweeps) run in the
separate group ``python -m pytest -m slow`` that ``.ci/run`` also runs.

Budgets, in seconds, as the tests use them:
"""

from __future__ import annotations

from typing import NamedTuple

T_DET = 2.0
"""Worker death to its callers' exceptions."""
T_EXIT = 5.0
"""A worker asked to exit, escalation included."""
T_HS = 10.0
"""Pre-authentication handshake deadline (distexec.transport.sockets.DEFAULT_HANDSHAKE_TIMEOUT)."""


class Row(NamedTuple):
    id: str
    scenario: str
    budget: str


ROWS: tuple[Row, ...] = (
    Row('W1', 'kill -9 of a worker mid-task', 'T_det'),
    Row('W2', 'os._exit(0) inside the task (exit code 0)', 'T_det'),
    Row('W3', 'sys.exit(3) inside the task', '1 s'),
    Row('W4', 'segfault with ctypes.string_at(0)', 'T_det'),
    Row('W5', 'os.abort() (SIGABRT)', 'T_det'),
    Row('W6a', 'OOM inside Python: the task sets resource.setrlimit(RLIMIT_AS, …) and allocates', '5 s'),
    Row('W6b', 'OOM killer: simulate with SIGKILL from a memory watchdog, or a worker memory_limit', 'T_det'),
    Row('W7', 'crash in __del__ after the result was sent (CrashAtGCInWorker)', 'T_det'),
    Row('W8', 'worker killed while sending a 1 GiB result', 'T_det'),
    Row('W9', 'crash races: n ∈ {1, 2, 5, 13} workers each SIGKILL a peer', '10 s'),
    Row('W10', 'all workers killed while 1000 tasks are queued', 'T_det'),
    Row('W11', 'worker hung (SIGSTOP)', 'T_hb + 1 s'),
    Row('W12', 'partition with iptables DROP between master and an SSH-localhost worker in a netns', 'T_hb + 1 s'),
    Row('S1', 'unpicklable argument (threading.Lock(), an open socket)', 'immediate'),
    Row('S2', 'argument whose __reduce__ raises or calls sys.exit', 'immediate'),
    Row('S3', 'argument that fails to unpickle on the worker', '1 s'),
    Row('S4', 'argument that calls sys.exit or segfaults while unpickled on the worker', '1 s / T_det'),
    Row('S5', 'unpicklable result (returns a Lock)', '1 s'),
    Row('S6', 'result that segfaults or os._exits while pickled', 'T_det'),
    Row('S7', 'exception class that fails to unpickle on the master', '1 s'),
    Row('S8', 'exception with unpicklable attributes', '1 s'),
    Row('S9', 'huge result: 1 GiB bytes (and a 1 GiB numpy array if numpy is present)', 'CPython baseline [local] 13.0 s, 2.06 GB peak'),
    Row('S10', 'result larger than max_message_size (set low, e.g. 1 MiB)', '1 s'),
    Row('S11', 'deep recursion:', '2 s / T_det'),
    Row('S12', '100 submits with a pickling-failure argument, then 100 good ones', '10 s'),
    Row('S13', 'lambdas, closures, __main__-defined classes, nested and recursive functions', '—'),
    Row('C1', 'infinite loop and interrupt', '1 s'),
    Row('C2', 'infinite loop that ignores SIGINT', 'grace + T_det'),
    Row('C3', 'Ctrl-C in the master during pmap', '1 s'),
    Row('C4', 'shutdown(wait=True, cancel_futures=True) with 1000 queued tasks', 'longest running task + T_exit'),
    Row('C5', 'shutdown(wait=False), then a worker segfaults', '5 s'),
    Row('C6', 'rmprocs(pid) while tasks run on that pid', 'T_exit'),
    Row('C7', 'rmprocs on a worker that ignores exit (overrides the exit hook)', '3 × T_exit'),
    Row('C8', 'pmap retry on worker death', '10 s'),
    Row('C9', 'the same without retry', 'T_det'),
    Row('C10', 'chaos soak: Poisson kills', '90 s'),
    Row('C11', 'RemoteChannel.put! on a dead owner', 'T_det'),
    Row('C12', 'take! or fetch blocked on a RemoteChannel or Future whose owner dies', 'T_det'),
    Row('C13', 'Future.result(timeout=0.1) on a long task', '0.2 s'),
    Row('C14', 'a done-callback raises, or calls sys.exit', '—'),
    Row('C15', 'submit racing shutdown from 8 threads', '5 s'),
    Row('C16', 'many concurrent clients: 32 threads × 1000 mixed submit/map/remotecall_fetch, including wo', '60 s'),
    Row('C17', '100k queued tasks (no-op, tiny arguments)', '60 s'),
    Row('L1', 'SSH host unreachable', 'ConnectTimeout + 2 s'),
    Row('L2', 'worker never prints its address (the command just sleeps)', 'T_launch + 1 s'),
    Row('L3', 'worker prints 1001 junk lines', '2 s'),
    Row('L4', 'worker exits at once with status 1, or a bad exename', '2 s'),
    Row('L5', 'the master never connects to a started worker', 'T_launch + 1 s'),
    Row('L6', 'the master has the wrong cookie for a pre-started worker', '2 s'),
    Row('N1', 'wrong cookie (a client with a random key)', '1 s'),
    Row('N2', 'garbage bytes', '1 s'),
    Row('N3', 'port scan: 1000 × connect-then-close, plus nc -z', '5 s'),
    Row('N4', 'connection that sends a header and stalls', 'T_hs'),
    Row('N5', 'oversized length before authentication (2³¹−1, 2⁶³)', '0.1 s'),
    Row('N6', "replayed handshake (record a good client's bytes and replay them)", '1 s'),
    Row('N7', "reflection: feed the server's challenge back to it on a second connection", '1 s'),
    Row('N8', 'truncated handshake at every byte offset k = 0…len−1', 'sweep under 10 s'),
    Row('N9', 'the cookie never crosses the wire, and never appears in /proc/*/cmdline of any worker', '—'),
    Row('N10', 'duplicate worker id: an authenticated connection claims the id of a live worker', '1 s'),
    Row('N11', 'an authenticated peer sends half a frame and stalls, or sends a bad frame MAC', 'T_hb'),
    Row('N12', 'TLS required, but the client speaks plaintext; a TLS client whose certificate is not from ', '1 s'),
    Row('N13', 'protocol version mismatch', '1 s'),
    Row('N14', 'the default bind address is loopback', '—'),
    Row('M1', 'master SIGKILLed with 4 local workers busy in Python code', '≤ 5 s'),
    Row('M2', 'master SIGKILLed while a worker is stuck in C code holding the GIL', '≤ 5 s'),
    Row('M3', 'master SIGKILLed with 2 workers over SSH to localhost', '≤ 10 s'),
    Row('M4', 'master exits normally without calling shutdown()', '≤ 5 s'),
    Row('M5', 'master SIGSTOP for less than the heartbeat timeout, then SIGCONT', 'T_hb'),
)

ROW_IDS = frozenset(row.id for row in ROWS)
