"""distexec's benchmark suite: ``python benchmarks/run.py`` (see docs/performance.md).

Not a test suite: nothing here asserts on timing. Every measurement runs in a fresh
subprocess (``benchmarks.child``) so that no state leaks between backends.
"""
