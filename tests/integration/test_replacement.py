"""Replacing a worker: ``launched_by`` finds who launched it, ``replacement`` launches one like it.

An executor that restores its capacity after a worker died or was retired asks
``membership.launched_by(ctx, pid)`` for that worker's manager and WorkerConfig, then
``membership.addprocs(ctx, manager.replacement(config), params)``. Here with local workers;
SSH and Slurm replacements are in ``tests/managers``.
"""

from __future__ import annotations

import os

import pytest

import distexec as d
from distexec import ClusterManager, LocalManager, WorkerConfig
from distexec.cluster import membership
from distexec.runtime.context import current_context
from tests.helpers import kill_and_wait

pytestmark = pytest.mark.timeout(60)


class _NoReplacement(ClusterManager):
    def launch(self, params, launched, launch_ntfy):
        pass

    def manage(self, pid, config, op):
        pass


class _Labelled(LocalManager):
    """A subclass with its own setting: its replacement must be one of its own kind."""

    def __init__(self, n, label):
        super().__init__(n)
        self.label = label


def test_launched_by_finds_the_manager_and_config_of_a_live_worker(empty_cluster):
    manager = LocalManager(2)
    pids = d.addprocs(manager)
    try:
        for pid in pids:
            found = membership.launched_by(current_context(), pid)
            assert found is not None
            found_manager, config = found
            assert found_manager is manager
            assert isinstance(config, WorkerConfig)
            assert config.os_pid == d.remotecall_fetch(os.getpid, pid)
    finally:
        d.rmprocs(pids, waitfor=20)


def test_launched_by_still_answers_for_a_killed_worker(add_workers):
    pid = add_workers(1)[0]
    config = current_context().record(pid).config
    kill_and_wait(pid)
    found = membership.launched_by(current_context(), pid)
    assert found is not None
    manager, dead_config = found
    assert isinstance(manager, LocalManager)
    assert dead_config is config and dead_config.process.poll() is not None


def test_launched_by_is_none_for_the_master_and_unknown_pids(add_workers):
    add_workers(1)
    ctx = current_context()
    assert membership.launched_by(ctx, 1) is None
    assert membership.launched_by(ctx, 10_000) is None


def test_a_local_replacement_launches_exactly_one_worker_that_answers(empty_cluster):
    ctx = current_context()
    pids = d.addprocs(2)
    try:
        kill_and_wait(pids[1])
        manager, config = membership.launched_by(ctx, pids[1])
        replacement = manager.replacement(config)
        assert isinstance(replacement, LocalManager) and replacement is not manager
        new = membership.addprocs(ctx, replacement, {})
        assert len(new) == 1 and new[0] > pids[1]
        assert d.workers() == [pids[0], new[0]]
        assert d.remotecall_fetch(d.myid, new[0]) == new[0]
        assert d.remotecall_fetch(os.getpid, new[0]) == ctx.record(new[0]).config.process.pid
        assert membership.launched_by(ctx, new[0])[0] is replacement
    finally:
        d.rmprocs(d.workers(), waitfor=20)


def test_a_local_replacement_keeps_restrict_and_the_managers_class():
    config = WorkerConfig()
    open_one = LocalManager(4, restrict=False).replacement(config)
    assert (type(open_one), open_one.n, open_one.restrict) == (LocalManager, 1, False)
    labelled = _Labelled(3, "gpu").replacement(config)
    assert (type(labelled), labelled.n, labelled.label) == (_Labelled, 1, "gpu")


def test_a_manager_without_replacement_returns_none():
    assert _NoReplacement().replacement(WorkerConfig()) is None
