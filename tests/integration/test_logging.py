"""What the ``distexec`` logger says: a line per worker start, stop, death and pmap retry.

docs/logging.md lists these lines; a user turns them on with the standard ``logging`` module.
"""

from __future__ import annotations

import logging
import os

import pytest

import distexec
from tests.helpers import kill_worker, os_pid, wait_until

pytestmark = pytest.mark.timeout(60)


def _records(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "distexec" and r.levelno == level]


def _logged(caplog, level: int, message: str, what: str) -> None:
    wait_until(lambda: message in _records(caplog, level), 10,
               message=f"{what}: {message!r} at {logging.getLevelName(level)}; got "
                       f"{[(r.levelname, r.getMessage()) for r in caplog.records]}")


def test_a_worker_start_stop_and_death_each_log_one_line(add_workers, caplog):
    caplog.set_level(logging.INFO, logger="distexec")
    kept, killed = add_workers(2)
    for pid in (kept, killed):
        started = f"Worker {pid} started: os pid {os_pid(pid)} on 127.0.0.1, via LocalManager()"
        assert _records(caplog, logging.INFO).count(started) == 1

    kill_worker(killed)
    # A SIGKILL alone says nothing of memory (rmprocs, interrupt and users send it too)
    _logged(caplog, logging.WARNING, f"Worker {killed} has exited (killed by SIGKILL(-9)).",
            "the death")

    distexec.rmprocs(kept, waitfor=20)
    _logged(caplog, logging.INFO, f"Worker {kept} stopped (exit code 0)", "the removal")
    assert not any(f"Worker {kept} has exited" in m for m in _records(caplog, logging.WARNING))


def _flaky(marker_dir: str, x: int) -> int:
    """Fails the first time it sees 3 (on any worker: the marker is a file), then succeeds."""
    marker = os.path.join(marker_dir, f"seen-{x}")
    if x == 3 and not os.path.exists(marker):
        open(marker, "w").close()
        raise ValueError(f"flaky {x}")
    return x * 10


@pytest.mark.parametrize(("batch_size", "expected"), [
    (1, "Retrying (3,) in 0.01 s (retry 1) after ValueError: flaky 3"),
    (2, "Retrying 1 failed element(s) of pmap's batches one by one; first error: "
        "ValueError: flaky 3"),
])
def test_a_pmap_retry_logs_a_warning(shared_workers, caplog, tmp_path, batch_size, expected):
    caplog.set_level(logging.WARNING, logger="distexec")
    results = distexec.pmap(lambda x: _flaky(str(tmp_path), x), range(5), batch_size=batch_size,
                            retry_delays=[0.01])
    assert results == [0, 10, 20, 30, 40]
    assert _records(caplog, logging.WARNING) == [expected]
