"""A pytest plugin that prints which fault rows the collected tests cover.

Used by ``tests/faults/test_catalogue.py`` as ``pytest --collect-only -p tests.faults.rowplugin``:
after collection it prints one line ``FAULT-ROWS: W1 W2 ...`` with the ids of every
``@pytest.mark.fault(...)`` on a collected item (table entries included).
"""

from __future__ import annotations


def pytest_collection_finish(session) -> None:
    covered = set()
    for item in session.items:
        for mark in item.iter_markers("fault"):
            covered.update(mark.args)
    print("FAULT-ROWS:", " ".join(sorted(covered)))
