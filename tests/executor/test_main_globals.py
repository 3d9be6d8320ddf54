"""Globals of ``__main__``: the initializer pattern of ProcessPoolExecutor code works unchanged.

Functions defined in the main script travel by value; their globals live in the worker's
``__main__`` namespace, so a global set by an initializer (or by ``everywhere``) is seen by the
tasks that follow, as with ProcessPoolExecutor and as in Julia's ``Main``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(60)

SCRIPT = textwrap.dedent("""
    import sys
    from concurrent.futures import ProcessPoolExecutor
    import distexec

    def init(value):
        global STATE
        STATE = value

    def read_state(_):
        return STATE

    if __name__ == "__main__":
        make = {"ppe": ProcessPoolExecutor, "distexec": distexec.DistributedExecutor}[sys.argv[1]]
        with make(2, initializer=init, initargs=("ready",)) as ex:
            print(sorted(set(ex.map(read_state, range(20)))))
        if sys.argv[1] == "distexec":
            distexec.addprocs(2)
            distexec.everywhere("DEFINED_EVERYWHERE = 7")
            print(distexec.remotecall_fetch(lambda: DEFINED_EVERYWHERE * 6, distexec.workers()[0]))
""")


@pytest.mark.parametrize("backend", ["ppe", "distexec"])
def test_a_global_set_by_the_initializer_is_seen_by_tasks(tmp_path, backend):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), backend], capture_output=True,
                          text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert lines[0] == "['ready']"
    if backend == "distexec":
        assert lines[1] == "42"
