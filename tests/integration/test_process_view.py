"""What task code sees of its process, beside a ``ProcessPoolExecutor`` child's view: the
script's ``sys.argv`` and ``__main__.__file__``, a ``multiprocessing`` name and identity
numbered from 1, the master's authkey (Manager proxies work as arguments), shared memory a
task attached to that outlives the worker, and a clear error for the objects of
``multiprocessing`` that only children can inherit.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import textwrap
from multiprocessing import shared_memory
from pathlib import Path

import psutil
import pytest

import distexec
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]


def test_tasks_see_the_scripts_argv_and_main_file_as_in_a_process_pool(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent("""
        import json, sys
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        import distexec

        def view(_):
            import __main__
            process = mp.current_process()
            return sys.argv, __main__.__file__, process.name, process._identity

        if __name__ == "__main__":
            with ProcessPoolExecutor(1, mp.get_context("forkserver")) as ex:
                peer = ex.submit(view, 0).result()
            with distexec.DistributedExecutor(2) as ex:
                ours = sorted(set(map(json.dumps, ex.map(view, range(8)))))
            print(json.dumps({"peer": peer, "ours": [json.loads(v) for v in ours]}))
    """), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script), "--flag", "value"], capture_output=True,
                          text=True, timeout=100, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    peer_argv, peer_file, peer_name, peer_identity = out["peer"]
    assert peer_argv == [str(script), "--flag", "value"]
    assert peer_identity == [1] and peer_name.endswith("-1")
    ours = out["ours"]
    assert [(argv, path) for argv, path, _, _ in ours] == [(peer_argv, peer_file)] * 2
    assert sorted((identity, name) for _, _, name, identity in ours) == [
        ([1], "DistexecProcess-1"), ([2], "DistexecProcess-2")]


def _put(queue, value) -> None:
    queue.put(value)


def _record(shared: dict, key: str) -> int:
    shared[key] = os.getpid()
    return len(shared)


def test_manager_proxies_work_as_task_arguments():
    with mp.Manager() as manager, distexec.DistributedExecutor(2) as ex:
        queue, shared = manager.Queue(), manager.dict()
        for future in [ex.submit(_put, queue, n) for n in range(4)]:
            future.result()
        assert sorted(queue.get(timeout=10) for _ in range(4)) == [0, 1, 2, 3]
        list(ex.map(_record, [shared] * 4, "abcd"))
        assert sorted(shared.keys()) == list("abcd")
        assert os.getpid() not in shared.values()


def _attach_and_write(name: str) -> None:
    block = shared_memory.SharedMemory(name=name)
    block.buf[0] = 42
    block.close()


@pytest.fixture(scope="module")
def resource_tracker():
    """This process's resource tracker, started before the tests' leak checks look: the
    master's first SharedMemory starts it, and it lives as long as the process."""
    from multiprocessing import resource_tracker as tracker
    tracker.ensure_running()


def test_shared_memory_a_task_attached_to_outlives_the_workers(resource_tracker):
    block = shared_memory.SharedMemory(create=True, size=16)
    try:
        with distexec.DistributedExecutor(1) as ex:
            ex.submit(_attach_and_write, block.name).result()
            worker = psutil.Process(ex.submit(os.getpid).result())
            processes = [worker, *worker.children(recursive=True)]  # its resource tracker
        # they are gone: a tracker that held the block would have unlinked it on its way out
        wait_until(lambda: not any(_running(p) for p in processes), 20,
                   message="the worker and its resource tracker to exit")
        again = shared_memory.SharedMemory(name=block.name)
        assert again.buf[0] == 42
        again.close()
    finally:
        block.close()
        block.unlink()


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.parametrize("make", [mp.Queue, mp.Lock, lambda: mp.Value("i", 0)],
                         ids=["Queue", "Lock", "Value"])
def test_inherited_only_multiprocessing_objects_fail_with_the_alternatives(make):
    obj = make()
    with distexec.DistributedExecutor(1) as ex:
        error = ex.submit(repr, obj).exception(timeout=30)
        assert isinstance(error, pickle.PicklingError)
        assert "through inheritance" in str(error)
        assert "multiprocessing.Manager()" in str(error) and "RemoteChannel" in str(error)
        assert ex.submit(abs, -3).result(timeout=30) == 3  # nothing else was lost
