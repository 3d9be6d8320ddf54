"""Globals of the user's script on the workers: defined when missing, sent again only when the
master rebinds them, and never overwriting what a worker bound itself (Julia's rule for the
globals of ``Main``).

The functions under test must live in a script's ``__main__`` (that is what is shipped by
value), so each scenario is a script run in a fresh interpreter, which prints one JSON line.
The executor scenarios run the same code under ``ProcessPoolExecutor`` in the same script,
and the answers must agree. The module scenarios use functions of an importable module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import distexec
from tests.integration import globals_module as mod

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]


def run_script(tmp_path: Path, body: str) -> dict:
    """Run ``body`` as a script (its own ``__main__``); the JSON object it printed last."""
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(body), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=100, cwd=tmp_path, env=env)
    assert done.returncode == 0, f"the script failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_an_initializer_global_is_each_workers_own_as_with_process_pool(tmp_path):
    out = run_script(tmp_path, """
        import json, os
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        import distexec

        _model = None

        def load():
            global _model
            _model = {"pid": os.getpid()}

        def predict(x):
            return _model["pid"], x * 2

        def run(executor):
            with executor:
                results = list(executor.map(predict, range(12)))
            # every task saw the model its own worker loaded, none the master's None
            return all(pid != os.getpid() for pid, _ in results), [y for _, y in results]

        if __name__ == "__main__":
            peer = run(ProcessPoolExecutor(2, mp.get_context("forkserver"), initializer=load))
            ours = run(distexec.DistributedExecutor(2, initializer=load))
            print(json.dumps({"peer": peer, "ours": ours, "master_model": _model}))
    """)
    assert out["ours"] == out["peer"] == [True, [x * 2 for x in range(12)]]
    assert out["master_model"] is None


def test_everywhere_globals_are_each_workers_own_for_shipped_functions(tmp_path):
    out = run_script(tmp_path, """
        import json
        import distexec

        def shard_sum():
            return sum(SHARD)

        if __name__ == "__main__":
            pids = distexec.addprocs(2)
            distexec.everywhere("import distexec; SHARD = [distexec.myid()] * 3")
            first = {p: distexec.remotecall_fetch(shard_sum, p) for p in pids}
            SHARD = [100]   # the master binds its own name anew: the workers keep theirs
            again = {p: distexec.remotecall_fetch(shard_sum, p) for p in pids}
            print(json.dumps({"pids": pids, "first": first, "again": again,
                              "master": shard_sum()}))
    """)
    expected = {str(p): 3 * p for p in out["pids"]}
    assert out["first"] == out["again"] == expected
    assert out["master"] == 100


def test_a_workers_cache_in_a_global_lasts_between_tasks_and_calls(tmp_path):
    out = run_script(tmp_path, """
        import json, os
        import distexec

        _cache = {}

        def cached(x):
            hit = x in _cache
            _cache[x] = True
            return os.getpid(), hit

        if __name__ == "__main__":
            with distexec.DistributedExecutor(1) as ex:
                tasks = [ex.submit(cached, 7).result()[1] for _ in range(3)]
                pid = ex.workers()[0]
                calls = [distexec.remotecall_fetch(cached, pid, 8)[1] for _ in range(3)]
            print(json.dumps({"tasks": tasks, "calls": calls, "master_cache": _cache}))
    """)
    assert out["tasks"] == [False, True, True]
    assert out["calls"] == [False, True, True]  # a call carries _cache, the worker keeps its own
    assert out["master_cache"] == {}


def test_a_large_global_goes_to_each_worker_once_and_again_when_rebound(tmp_path):
    out = run_script(tmp_path, """
        import json
        import distexec

        class Counted:
            pickled = 0
            def __init__(self, size):
                self.data = bytes(size)
            def __reduce__(self):
                Counted.pickled += 1
                return (Counted, (len(self.data),))

        BIG = Counted(10)

        def size(i):
            return len(BIG.data)

        if __name__ == "__main__":
            with distexec.DistributedExecutor(2) as ex:
                before = list(ex.map(size, range(20)))
                sent_once = Counted.pickled
                BIG = Counted(20)
                after = list(ex.map(size, range(20)))
                sent_again = Counted.pickled - sent_once
            print(json.dumps({"before": before, "after": after, "sent_once": sent_once,
                              "sent_again": sent_again}))
    """)
    assert out["before"] == [10] * 20
    assert out["after"] == [20] * 20
    assert out["sent_once"] <= 2  # at most once per worker (a worker may have got no task)
    assert out["sent_again"] <= 2


def test_a_name_the_master_rebinds_replaces_the_workers_copy_it_sent(tmp_path):
    out = run_script(tmp_path, """
        import json
        import distexec

        LIMIT = 1

        def limit():
            return LIMIT

        if __name__ == "__main__":
            (pid,) = distexec.addprocs(1)
            seen = [distexec.remotecall_fetch(limit, pid)]
            with distexec.DistributedExecutor(pool=distexec.WorkerPool([pid])) as ex:
                seen.append(ex.submit(limit).result())
                LIMIT = 2
                seen.append(ex.submit(limit).result())
                seen.append(distexec.remotecall_fetch(limit, pid))
            print(json.dumps({"seen": seen}))
    """)
    assert out["seen"] == [1, 1, 2, 2]


def test_a_name_a_task_binds_with_global_is_never_overwritten(tmp_path):
    out = run_script(tmp_path, """
        import json
        import distexec

        COUNT = 0

        def bump():
            global COUNT
            COUNT += 1
            return COUNT

        if __name__ == "__main__":
            with distexec.DistributedExecutor(1) as ex:
                by_tasks = [ex.submit(bump).result() for _ in range(3)]
                COUNT = 100   # the master's new value does not reset the worker's own count
                by_tasks.append(ex.submit(bump).result())
            print(json.dumps({"by_tasks": by_tasks, "master": COUNT}))
    """)
    assert out["by_tasks"] == [1, 2, 3, 4]
    assert out["master"] == 100


def test_a_worker_starts_with_an_empty_main_module(add_workers):
    (pid,) = add_workers(1)
    names = distexec.remotecall_fetch(_main_names, pid)
    assert not [n for n in names if not n.startswith("__")]


def _main_names() -> list[str]:
    return list(sys.modules["__main__"].__dict__)


# --------------------------------------------------------------------------------------------
# functions of an importable module: their module's globals, on each worker
# --------------------------------------------------------------------------------------------
def test_module_globals_set_by_an_initializer_stay_each_workers_own():
    with distexec.DistributedExecutor(2, initializer=mod.load) as ex:
        results = list(ex.map(mod.predict_slowly, range(12)))
        workers = {distexec.remotecall_fetch(os.getpid, p) for p in ex.workers()}
    assert {pid for pid, _ in results} == workers and len(workers) == 2
    assert [y for _, y in results] == [x * 2 for x in range(12)]
    assert mod._model is None


def test_a_module_cache_lasts_between_tasks():
    with distexec.DistributedExecutor(1) as ex:
        assert [ex.submit(mod.cached, 5).result() for _ in range(3)] == [False, True, True]
