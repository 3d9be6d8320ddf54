"""Functions defined in the script (``__main__``): what a task sees of them, call after call.

A worker cannot import the script's functions by name, so they travel by value. Each is
pickled once and built once on the worker while nothing about it changes (which is what
makes a script's function as quick to call as an importable one), and is pickled again when
the master changes it. The script runs under ``ProcessPoolExecutor`` and under distexec:
what both can do, they must do alike.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(90)

SCRIPT = textwrap.dedent("""
    import functools
    import multiprocessing
    import sys
    from concurrent.futures import ProcessPoolExecutor

    def counted():
        counted.calls = getattr(counted, "calls", 0) + 1
        return counted.calls

    def fib(n):
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    def scaled(x, factor=2):
        return x * factor

    OFFSET = 100

    def shifted(x):
        return x + OFFSET

    @functools.lru_cache(maxsize=None)
    def fib_cached(n):
        return n if n < 2 else fib_cached(n - 1) + fib_cached(n - 2)

    def cache_hits(n):
        fib_cached(n)
        return fib_cached.cache_info().hits

    def reader(items):
        def read():
            return list(items)
        return read

    if __name__ == "__main__":
        if sys.argv[1] == "ppe":
            ex = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver"))
        else:
            import distexec
            ex = distexec.DistributedExecutor(1)
        with ex:
            print("attribute kept", [ex.submit(counted).result() for _ in range(3)])
            print("recursive", ex.submit(fib, 15).result())
            print("lru_cache", ex.submit(fib_cached, 30).result(), list(ex.map(fib_cached, [5, 6])))
            print("lru_cache kept", [ex.submit(cache_hits, 10).result() for _ in range(3)])
            if sys.argv[1] == "distexec":  # by value: the next call sees what the master changed
                before = ex.submit(scaled, 5).result()
                scaled.__defaults__ = (3,)
                print("defaults", before, ex.submit(scaled, 5).result())
                before = ex.submit(shifted, 1).result()
                OFFSET = 200
                print("global", before, ex.submit(shifted, 1).result())
                def shifted(x):
                    return -x
                print("redefined", ex.submit(shifted, 1).result())
                items = [1]
                read = reader(items)
                before = ex.submit(read).result()
                items.append(2)
                print("closure", before, ex.submit(read).result())
""")


def _run(tmp_path, backend: str) -> list[str]:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), backend], capture_output=True,
                          text=True, timeout=80)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_a_scripts_functions_behave_as_under_processpoolexecutor(tmp_path):
    expected = ["attribute kept [1, 2, 3]", "recursive 610", "lru_cache 832040 [5, 8]",
                "lru_cache kept [31, 32, 33]"]
    assert _run(tmp_path, "ppe") == expected
    assert _run(tmp_path, "distexec")[:4] == expected


def test_what_the_master_changes_in_a_scripts_function_the_next_task_sees(tmp_path):
    assert _run(tmp_path, "distexec")[4:] == [
        "defaults 10 15", "global 101 201", "redefined -1", "closure [1] [1, 2]"]
