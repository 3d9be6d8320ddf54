"""Adding and removing workers (master side), and what happens when a peer is lost.

Owns ``addprocs``/``rmprocs``/``interrupt``, the join of each new worker, multi-process mode
(cookie, exit hook), and the reaction to a closed connection on any process. Imports the
other cluster modules, ``distexec.runtime`` and below. Julia: ``addprocs``,
``create_worker``, ``rmprocs``, ``deregister_worker``.

    addprocs ──► starting callbacks ──► manager.launch (launcher thread) ──► WorkerConfigs
             ──► per config, a set-up thread: connect, JOIN, wait RESULT(cpus, os pid)
             ──► tell older workers about the new ones ──► started callbacks ──► new pids
    connection closed ──► master: record exit status, deregister, exited callbacks
                          worker: the master's link ──► exit; another worker's ──► deregister
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import logging
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref

from ..errors import AuthenticationError, CompositeException, DistributedError, ProtocolError
from ..protocol import secret as secret_mod
from ..protocol import serialization
from ..protocol.frames import Kind
from ..runtime import arguments, dispatch
from ..runtime.calls import ReplySlot, remotecall
from ..runtime.runner import in_thread
from ..runtime.context import (ClusterContext, WorkerRecord, WorkerState, DEAD_STATES,
                               use_context, using_context)
from ..transport import sockets
from ..transport.connection import Connection
from ..transport.lane import TaskLane
from ..transport.streams import as_transport, expire_after
from . import callbacks, console, interrupts, oom, peers, process_view
from . import security as security_mod
from .launch import LANE_KEY, worker_timeout
from .manager import ClusterManager, WorkerConfig, default_addprocs_params

log = logging.getLogger("distexec")

TOPOLOGIES = ("all_to_all", "master_worker", "custom")


# --------------------------------------------------------------------------------------------
# multi-process mode
# --------------------------------------------------------------------------------------------
def init_multi(ctx: ClusterContext) -> None:
    """First use of the cluster on the master: cookie, handlers, exit hook. Julia: ``init_multi``."""
    with ctx.lock:
        if ctx.multi or ctx.role != "master":
            return
        ctx.multi = True
        if ctx.cookie is None:
            ctx.cookie = secret_mod.generate()
        ctx.connector = peers.PeerConnector()
    install_handlers(ctx)
    ctx.heartbeat.on_silent.append(_kill_silent_local_worker)
    atexit.register(_shutdown_at_exit, weakref.ref(ctx))


def _kill_silent_local_worker(record: WorkerRecord) -> None:
    """A worker we declared lost must stay lost: a SIGCONT must not bring back a zombie."""
    process = getattr(record.config, "process", None)
    if isinstance(process, subprocess.Popen) and process.poll() is None:
        process.kill()


def install_handlers(ctx: ClusterContext) -> None:
    ctx.handlers[Kind.IDENTIFY] = peers.on_identify


def require_master(ctx: ClusterContext) -> None:
    if ctx.myid != 1:
        raise DistributedError("Only process 1 can add and remove workers")


def _shutdown_at_exit(ctx_ref) -> None:
    ctx = ctx_ref()
    if ctx is None or ctx.role != "master":
        return
    pids = [p for p in ctx.live_pids() if p != 1]
    if pids:
        try:
            rmprocs(ctx, pids, waitfor=5.0)
        except Exception:
            log.warning("Forcibly interrupting busy workers")
            for pid in pids:
                _force_kill(ctx, pid)
    ctx.close()


def _force_kill(ctx: ClusterContext, pid: int) -> None:
    record = ctx.record(pid) or ctx.deleted.get(pid)
    process = getattr(getattr(record, "config", None), "process", None)
    if process is not None and process.poll() is None:
        process.kill()


# --------------------------------------------------------------------------------------------
# addprocs
# --------------------------------------------------------------------------------------------
def addprocs(ctx: ClusterContext, manager, params: dict) -> list[int]:
    """Launch workers with ``manager`` and join them; returns the new pids, sorted."""
    init_multi(ctx)
    require_master(ctx)
    params = {**default_addprocs_params(manager), **params}
    params["output_prefix"] = console.resolve_prefix(params.get("output_prefix"))
    errors = callbacks.run_callbacks(ctx, "starting", [(manager, params)],
                                     warning_interval=params["callback_warning_interval"])
    if errors:
        raise errors[0][1]
    with ctx.worker_lock:
        _set_topology(ctx, params)
        params["security"] = security_mod.resolve(ctx, params.get("security"))
        new_pids, failures = _launch_and_join(ctx, manager, params)
        _announce_new_workers(ctx, new_pids)
    security_mod.warn_if_exposed(ctx, new_pids, params["security"])
    errors = callbacks.run_callbacks(ctx, "started", [(p,) for p in new_pids],
                                     warning_interval=params["callback_warning_interval"])
    failures.extend(error for _key, error in errors)
    if failures:
        raise failures[0] if len(failures) == 1 else CompositeException(failures)
    return sorted(new_pids)


def _set_topology(ctx: ClusterContext, params: dict) -> None:
    topology = str(params["topology"])
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {TOPOLOGIES}, got {topology!r}")
    has_workers = len(ctx.live_pids()) > 1
    if has_workers and topology != ctx.topology:
        raise DistributedError(f"Workers with Topology {ctx.topology} already exist. "
                               f"Requested Topology {topology} cannot be set.")
    lazy = bool(params["lazy"]) if topology == "all_to_all" else False
    if has_workers and ctx.lazy is not None and lazy != ctx.lazy:
        raise ValueError(f"Active workers with lazy={ctx.lazy}. Cannot set lazy={lazy}")
    ctx.topology, ctx.lazy = topology, lazy
    params["lazy"] = lazy


def _launch_and_join(ctx: ClusterContext, manager, params: dict):
    launched: list[WorkerConfig] = []
    notify = threading.Condition()
    launch_done = run_on_launcher(ctx, lambda: manager.launch(params, launched, notify))
    setups: list[cf.Future] = []
    while True:
        with notify:
            if not launched:
                if launch_done.done():
                    break
                notify.wait(0.1)
            configs, launched[:] = list(launched), []
        for config in configs:
            setups.append(_start_setup(ctx, manager, config, params))
    new_pids, failures = [], []
    for setup in setups:
        try:
            new_pids.append(setup.result())
        except BaseException as exc:
            failures.append(exc)
    launch_error = launch_done.exception()
    if launch_error is not None:
        failures.append(launch_error)
    return new_pids, failures


def _start_setup(ctx, manager, config, params) -> cf.Future:
    return in_thread(acting_for, ctx, create_worker, ctx, manager, config, params,
                     name="distexec-setup")


def acting_for(ctx: ClusterContext, fn, *args):
    """``fn(*args)`` with ``ctx`` current: managers find the cookie and the links of the
    cluster they work for through ``current_context()``, and a worker's private cluster
    (``runtime.context.private_master_context``) is not its process's default."""
    with using_context(ctx):
        return fn(*args)


def run_on_launcher(ctx: ClusterContext, fn) -> cf.Future:
    """Run ``fn`` on the context's long-lived launcher thread.

    Processes forked there keep ``PR_SET_PDEATHSIG`` meaningful: Linux delivers it when the
    forking *thread* exits, so the thread must live as long as the cluster.
    """
    with ctx.lock:
        jobs = ctx.launcher_jobs
        if jobs is None:
            jobs = ctx.launcher_jobs = queue.SimpleQueue()
            threading.Thread(target=_launcher_loop, args=(ctx, jobs), daemon=True,
                             name="distexec-launcher").start()
    future: cf.Future = cf.Future()
    jobs.put((fn, future))
    return future


def stop_launcher(ctx: ClusterContext) -> None:
    """End the launcher thread of a cluster whose workers are all gone (a private cluster's,
    at its executor's shutdown: Linux would SIGKILL any child it still had)."""
    with ctx.lock:
        jobs, ctx.launcher_jobs = ctx.launcher_jobs, None
    if jobs is not None:
        jobs.put(None)


def _launcher_loop(ctx: ClusterContext, jobs: queue.SimpleQueue) -> None:
    use_context(ctx)
    while True:
        job = jobs.get()
        if job is None:  # stop_launcher
            return
        fn, future = job
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)


def create_worker(ctx: ClusterContext, manager: ClusterManager, config: WorkerConfig,
                  params: dict) -> int:
    """Connect to one launched worker and make it join. Julia: ``create_worker``."""
    pid = ctx.next_pid()
    # Registered before connecting, as Julia does: a higher pid joining eagerly waits for it.
    record = WorkerRecord(pid, WorkerState.CREATED, config=config, manager=manager)
    ctx.register(record)
    try:
        reader, writer = manager.connect(pid, config)
        # A worker that joined on its own (ElasticManager) passed the challenge as it came
        transport = (reader if getattr(manager, "links_authenticated", False)
                     else _authenticated_link(ctx, reader, writer, config))
    except BaseException:
        _discard(ctx, manager, pid, config)
        raise
    record.connect_at = config.connect_at
    conn = Connection(transport, on_frame=lambda c, f: dispatch.on_frame(ctx, c, f),
                      on_close=lambda c, e: on_connection_closed(ctx, c, e), name=f"worker-{pid}")
    conn.peer_pid = pid
    record.conn = conn
    lane = (config.environ or {}).pop(LANE_KEY, None)
    if lane is not None:  # executor tasks go there (transport.lane); it ends with ``conn``
        conn.task_lane = TaskLane(lane)
    relay = (config.userdata or {}).get("relay") if isinstance(config.userdata, dict) else None
    if relay is not None:
        relay.pid, relay.prefix = pid, params.get("output_prefix", relay.prefix)
        conn.before_results = getattr(relay, "settle", None)
    conn.start()
    try:
        cpus, os_pid = _join(ctx, record, params)
    except BaseException:
        conn.close()
        _discard(ctx, manager, pid, config)
        raise
    config.os_pid = record.os_pid = os_pid
    record.cpu_threads = cpus
    config.environ = {**(config.environ or {}), "cpu_threads": cpus}
    if getattr(manager, "is_local", type(manager).__name__ == "LocalManager"):
        ctx.local_launched.add(pid)
    _count_oom_kills(record)
    ctx.set_state(record, WorkerState.CONNECTED)
    log.info("Worker %d started: os pid %s%s, via %r", pid, os_pid,
             f" on {config.host}" if config.host else "", manager)
    pool = ctx.default_pool
    if pool is not None:  # a WorkerPool may be filling itself concurrently: push only once
        getattr(pool, "push_if_new", pool.push)(pid)
    # count > 1 (SSHManager): this first worker starts the rest of its host's workers; they join
    # through the same launch. Julia: launch_n_additional_processes in create_worker.
    if config.count not in (None, 1):
        manager.start_additional_workers(ctx, pid, config)
    return pid


def _authenticated_link(ctx: ClusterContext, reader, writer, config: WorkerConfig):
    """Authenticate as the initiator over what ``manager.connect`` returned (TLS first when
    the cluster uses it)."""
    transport = as_transport(reader, writer)
    peer = (f"worker at {config.host}:{config.port}" if config.port is not None
            else f"worker via {transport!r}")
    # Streams cannot time out by themselves (a socket has its own timeouts): expire them.
    timer = expire_after(transport, worker_timeout()) if transport is not reader else None
    try:
        transport = _secure(ctx, transport, peer)
        assert ctx.cookie is not None  # addprocs started multi-process mode
        sockets.initiate_handshake(transport, ctx.cookie.key, worker_timeout(), peer)
    finally:
        if timer is not None:
            timer.cancel()
    return transport


def _secure(ctx: ClusterContext, transport, peer: str):
    """Run TLS over ``transport`` when the cluster's Security has certificates.

    A custom manager's pair of streams cannot carry TLS: allowed as plaintext unless the
    cluster requires encryption.
    """
    security = ctx.security
    if security is None or not security.tls:
        return transport
    if isinstance(transport, socket.socket):
        deadline = time.monotonic() + worker_timeout()
        return sockets.connect_tls(transport, security.client_context(), deadline, peer)
    if security.require_encryption:
        transport.close()
        raise AuthenticationError(f"{peer}: require_encryption=True, but the manager's "
                                  "connect() returned streams, which cannot carry TLS")
    return transport


def _join(ctx: ClusterContext, record: WorkerRecord, params: dict):
    peer_list = []
    if ctx.topology == "all_to_all":
        with ctx.lock:
            if not ctx.lazy:  # it connects to every lower pid now: they must have joined
                _wait_lower_joined(ctx, record.pid)
            peer_list = [(p, r.connect_at) for p, r in ctx.peers.items()
                         if 1 < p < record.pid and r.connect_at is not None
                         and r.state not in DEAD_STATES]
    elif ctx.topology == "custom":
        peer_list = _wait_custom_peers(ctx, record)
    record.userdata["knows"] = {p for p, _ in peer_list}
    slot, notify = ReplySlot(record.pid), ctx.next_rrid()
    ctx.add_waiter(notify, slot)
    payload, _ = serialization.dumps((record.pid, peer_list, ctx.topology, ctx.lazy,
                                      process_view.master_view()), record.pid)
    assert record.conn is not None  # create_worker linked it
    record.conn.send(Kind.JOIN, payload, notify=notify)
    threading.Thread(target=_manage_quietly, args=(record, "register"), daemon=True).start()
    timeout = worker_timeout()
    if not slot.arrived(timeout):
        ctx.pop_waiter(notify)
        raise DistributedError(f"worker {record.pid} did not connect within {timeout} seconds")
    return slot.wait()


def _wait_custom_peers(ctx: ClusterContext, record: WorkerRecord) -> list:
    """Custom topology: wait until the workers named in ``connect_idents`` have joined.

    Julia polls for them with the worker timeout; they must come from the same ``addprocs``.
    """
    wanted = set(getattr(record.config, "connect_idents", None) or ())
    timeout = worker_timeout()
    deadline = time.monotonic() + timeout
    with ctx.lock:
        while True:
            found = {r.config.ident: r for r in ctx.peers.values()
                     if r.pid != record.pid and r.config is not None
                     and getattr(r.config, "ident", None) in wanted}
            if len(found) == len(wanted) and all(
                    r.state == WorkerState.CONNECTED for r in found.values()):
                return [(r.pid, r.connect_at) for r in found.values()]
            left = deadline - time.monotonic()
            if left <= 0:
                raise DistributedError(f"peer workers did not connect within {timeout} seconds")
            ctx.changed.wait(left)


def _wait_lower_joined(ctx: ClusterContext, pid: int) -> None:
    """Wait (holding ``ctx.lock``) until no worker below ``pid`` is still being set up."""
    timeout = worker_timeout()
    deadline = time.monotonic() + timeout
    while any(1 < p < pid and r.state == WorkerState.CREATED for p, r in ctx.peers.items()):
        left = deadline - time.monotonic()
        if left <= 0:
            raise DistributedError(f"peer workers did not connect within {timeout} seconds")
        ctx.changed.wait(left)


def _manage_quietly(record: WorkerRecord, op: str) -> None:
    try:
        record.manager.manage(record.pid, record.config, op)
    except Exception:
        log.exception("error in %r.manage(%d, %s)", record.manager, record.pid, op)


def _discard(ctx: ClusterContext, manager, pid: int, config) -> None:
    with ctx.lock:
        record = ctx.peers.pop(pid, None)
        ctx.deleted[pid] = record or WorkerRecord(pid, WorkerState.EXTERMINATED)
        ctx.changed.notify_all()  # a higher pid may be waiting for this one to join
    try:
        manager.kill(pid, config)
    except Exception:
        log.exception("could not kill worker %d after a failed start", pid)


def launched_by(ctx: ClusterContext, pid: int) -> tuple[ClusterManager, WorkerConfig] | None:
    """``(manager, config)`` of worker ``pid``: its ClusterManager and the WorkerConfig its
    ``launch`` produced, for a live worker and for one that is gone (died, removed, or failed
    to join: the master keeps gone workers' records in ``ctx.deleted``). None on a worker, or
    when the master never launched ``pid`` (unknown, or process 1). Feed the pair to
    ``manager.replacement(config)`` to launch one worker like it.
    """
    with ctx.lock:
        record = ctx.peers.get(pid) or ctx.deleted.get(pid)
    if record is None or record.manager is None or record.config is None:
        return None
    return record.manager, record.config


def _announce_new_workers(ctx: ClusterContext, new_pids: list[int]) -> None:
    """Tell every worker about every worker (Julia: ``set_valid_processes``) and wait for it.

    Waiting means that when ``addprocs`` returns each worker's ``procs()`` agrees with the
    master's. Workers that already know everyone (from their JOIN) are left alone, so their
    main thread stays free for the user's first call, where ``interrupt`` reaches it even
    inside ``time.sleep``.
    """
    if not new_pids:
        return
    with ctx.lock:
        records = [r for r in ctx.peers.values()
                   if r.state == WorkerState.CONNECTED and r.connect_at is not None]
    everyone = [(r.pid, r.connect_at) for r in records]
    pids = {r.pid for r in records}
    unaware = [r for r in records if not pids - {r.pid} <= r.userdata.get("knows", set())]
    _call_everywhere(ctx, peers.learn_peers, [r.pid for r in unaware], (everyone,))
    for record in unaware:
        record.userdata["knows"] = pids


def _call_everywhere(ctx: ClusterContext, fn, pids, args: tuple) -> None:
    """Run ``fn(*args)`` on ``pids`` and wait (bounded) until each ran; errors are ignored.

    A worker that dies meanwhile fails its Future, so only a hung worker costs the timeout.
    """
    futures = []
    for pid in pids:
        try:
            futures.append(remotecall(ctx, fn, pid, args, {}, background=True))
        except Exception:  # a worker that just died is handled by its own close
            pass
    if futures:
        cf.wait(futures, timeout=worker_timeout())


# --------------------------------------------------------------------------------------------
# losing a connection
# --------------------------------------------------------------------------------------------
def on_connection_closed(ctx: ClusterContext, conn: Connection, error) -> None:
    pid = conn.peer_pid
    if pid is None:
        if error is not None:
            log.warning("Process(%d) - Unknown remote, closing connection: %r", ctx.myid, error)
        return
    record = ctx.record(pid)
    if record is None or record.conn is not conn:
        return
    if isinstance(error, ProtocolError) and record.lost_reason is None:
        # We hung up on it (a bad frame header): its exit that follows is our doing.
        record.lost_reason = f"it sent an invalid message ({error}); its connection was closed"
    _observe_exit(record)
    unexpected = record.state != WorkerState.TERMINATING
    if not ctx.peer_lost(record):
        return
    if ctx.role == "master":
        _after_worker_gone(ctx, record, unexpected)


def _count_oom_kills(record: WorkerRecord) -> None:
    """Read the OOM kills of a local worker's memory cgroup now, to compare at its death."""
    process = getattr(record.config, "process", None)
    if isinstance(process, subprocess.Popen):
        record.userdata["oom_kills"] = oom.OomKillCounter.of_process(process.pid)


def _observe_exit(record: WorkerRecord) -> None:
    """Fill in the exit status of a worker we launched ourselves (a short wait at most)."""
    process = getattr(record.config, "process", None)
    if not isinstance(process, subprocess.Popen):
        return
    try:
        code = process.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        return
    if code is None:  # unknown (a forked worker whose template died: cluster.template)
        return
    if code < 0:
        record.signal = -code
        if record.signal == signal.SIGKILL:
            record.oom_evidence = oom.oom_evidence(process.pid, record.userdata.get("oom_kills"))
    else:
        record.exitcode = code


def _after_worker_gone(ctx: ClusterContext, record: WorkerRecord, unexpected: bool) -> None:
    _log_exit(ctx, record, unexpected)
    if unexpected and not ctx.closed:
        try:
            print(f"Worker {record.pid} terminated.", file=sys.stderr, flush=True)
        except (OSError, ValueError):  # stderr closed or swapped: the cleanup must still run
            pass
    threading.Thread(target=_cleanup_worker, args=(ctx, record), daemon=True,
                     name=f"distexec-exited-{record.pid}").start()


def _log_exit(ctx: ClusterContext, record: WorkerRecord, unexpected: bool) -> None:
    """One line per worker that left: a WARNING for a death (how it died), INFO for a removal."""
    if unexpected and not ctx.closed:  # "Worker 3 has exited (terminated by SIGKILL(-9))."
        log.warning("%s", record.exited_exception())
    elif record.signal is not None:
        log.info("Worker %d stopped (signal %d)", record.pid, record.signal)
    elif record.exitcode is not None:
        log.info("Worker %d stopped (exit code %d)", record.pid, record.exitcode)
    else:
        log.info("Worker %d stopped", record.pid)


def _cleanup_worker(ctx: ClusterContext, record: WorkerRecord) -> None:
    if record.manager is not None:
        _manage_quietly(record, "deregister")
    # Also with eager links: a worker's own link to the dead one closes at its own pace, and
    # rmprocs promises that the other workers' views agree with the master's when it returns.
    _call_everywhere(ctx, peers.deregister_peer, [p for p in ctx.live_pids() if p != 1],
                     (record.pid,))
    _forgotten(record).set()
    callbacks.run_exited_callbacks(ctx, record)
    _release_process(record)
    if record.manager is not None:
        _manage_quietly(record, "finalize")  # Julia: when the worker's record is collected


def _release_process(record: WorkerRecord) -> None:
    process = getattr(record.config, "process", None)
    if isinstance(process, subprocess.Popen):
        if process.stdin is not None:
            try:
                process.stdin.close()
            except OSError:
                pass


# --------------------------------------------------------------------------------------------
# rmprocs and interrupt
# --------------------------------------------------------------------------------------------
def rmprocs(ctx: ClusterContext, pids, waitfor: float | None = None,
            callback_timeout: float = 10.0) -> cf.Future:
    """Remove workers; returns a finished handle, or a running one when ``waitfor == 0``."""
    require_master(ctx)
    pids = arguments.check_pid_args(pids, "rmprocs")
    for pid in pids:  # all checked before any is removed: a typo must not remove half
        arguments.check_exists(ctx, pid)
    if waitfor == 0:
        return in_thread(acting_for, ctx, _remove, ctx, pids, None, callback_timeout,
                         name="distexec-rmprocs")
    done: cf.Future = cf.Future()
    acting_for(ctx, _remove, ctx, pids, waitfor, callback_timeout)
    done.set_result(None)
    return done


def _remove(ctx: ClusterContext, pids: list[int], waitfor, callback_timeout) -> None:
    with ctx.worker_lock:
        targets, forgotten = [], []
        for pid in pids:
            if pid == 1:
                log.warning("rmprocs: process 1 not removed")
            elif ctx.record(pid) is not None:
                targets.append(pid)
        callbacks.run_callbacks(ctx, "exiting", [(p,) for p in targets], timeout=callback_timeout)
        for pid in targets:
            record = ctx.record(pid)
            if record is None:
                continue
            forgotten.append(_forgotten(record))
            ctx.set_state(record, WorkerState.TERMINATING)
            record.manager.kill(pid, record.config)
        deadline = None if waitfor is None else time.monotonic() + waitfor
        _wait_gone(ctx, targets, deadline, waitfor)
        for event in forgotten:  # the other workers' views agree with ours
            event.wait(None if deadline is None else max(deadline - time.monotonic(), 0))


def _forgotten(record: WorkerRecord) -> threading.Event:
    """Set once the other workers were told that ``record``'s worker is gone."""
    return record.userdata.setdefault("forgotten", threading.Event())


def _wait_gone(ctx: ClusterContext, pids: list[int], deadline, waitfor) -> None:
    with ctx.lock:
        while True:
            alive = [p for p in pids if p in ctx.peers]
            if not alive:
                return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise DistributedError(f"rmprocs: pids {alive} not terminated after "
                                       f"{waitfor} seconds.")
            ctx.changed.wait(left)


def interrupt(ctx: ClusterContext, pids, grace: float | None = None) -> None:
    """Interrupt the calls running on ``pids`` (all workers if empty). Julia: ``interrupt``.

    A worker still running one of those calls ``grace`` seconds later is terminated
    (``cluster.interrupts``); ``grace=None`` reads ``DISTEXEC_INTERRUPT_GRACE``.
    """
    if ctx.myid != 1:
        raise DistributedError("interrupt can only be called on process 1")
    grace = interrupts.interrupt_grace(grace)
    chosen = arguments.check_pid_args(pids, "interrupt")
    if chosen:
        records = [_interruptible(ctx, pid) for pid in chosen]
    else:  # every worker: one that left meanwhile has nothing left to interrupt
        records = [r for p in ctx.live_pids() if p != 1 and (r := ctx.record(p)) is not None]
    threads = [threading.Thread(target=_interrupt_one, args=(ctx, r, grace)) for r in records]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _interruptible(ctx: ClusterContext, pid: int) -> WorkerRecord:
    """The record of worker ``pid``; the errors a call to ``pid`` would raise otherwise."""
    if pid == ctx.myid:
        raise ValueError("interrupt: process 1 is the master; interrupt takes worker ids")
    record = ctx.record(pid)
    if record is not None:
        return record
    arguments.check_exists(ctx, pid)
    raise ctx.deleted[pid].exited_exception()  # records leave peers for deleted


def _interrupt_one(ctx: ClusterContext, record: WorkerRecord, grace: float) -> None:
    _manage_quietly(record, "interrupt")
    # Timed after delivery: a call that begins later was not interrupted and must not count.
    interrupts.watch(ctx, record, grace, time.monotonic())
