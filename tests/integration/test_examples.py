"""Every example in examples/ runs to completion, as the docs and README promise."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RUN_WITH = {"hello_cluster.py": ["-m", "distexec", "run", "-p", "2"]}


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_runs(example):
    command = [sys.executable, *RUN_WITH.get(example, []), str(EXAMPLES / example)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=110,
                          cwd=EXAMPLES.parent)
    assert done.returncode == 0, f"{example} failed:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.strip(), f"{example} printed nothing"
    if example == "pi_montecarlo.py":  # both estimates (remote calls, then pmap) are sane
        estimates = [float(x) for x in re.findall(r"pi ~= ([0-9.]+)", done.stdout)]
        assert len(estimates) == 2 and all(abs(e - math.pi) < 0.05 for e in estimates), \
            done.stdout
