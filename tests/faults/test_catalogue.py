"""Every row of the fault catalogue (tests/faults/catalogue.py) has at least one test.

The suite is collected in a subprocess, slow group included, so a row covered only by a slow
test or by a test under tests/managers still counts; a marker naming an id that is not in the
catalogue is a typo and fails too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.catalogue import ROW_IDS

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]


def _covered_rows() -> set[str]:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "", "-p",
         "tests.faults.rowplugin", "tests"],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in result.stdout.splitlines() if line.startswith("FAULT-ROWS:")]
    assert lines, f"collection failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return set(lines[-1].split()[1:])


def test_every_catalogue_row_has_a_test_and_every_marker_names_a_row():
    covered = _covered_rows()
    assert sorted(ROW_IDS - covered) == [], "rows without a test"
    assert sorted(covered - ROW_IDS) == [], "fault markers naming no catalogue row"
