"""The interrupt grace setting and the clock arithmetic of the escalation watch.

No processes: ``distexec.cluster.interrupts`` decides from the grace and from a worker's
answer (its clock and its calls' start times) whether a call outlived an interrupt. The
escalation itself is tested with real workers in ``tests/faults/test_control.py`` (C2).
"""

from __future__ import annotations

import math

import pytest

from distexec.cluster.interrupts import DEFAULT_GRACE, GRACE_ENV, _on_our_clock, interrupt_grace


def test_the_grace_defaults_to_ten_seconds(monkeypatch):
    monkeypatch.delenv(GRACE_ENV, raising=False)
    assert interrupt_grace() == DEFAULT_GRACE == 10.0


@pytest.mark.parametrize(("text", "grace"), [("2.5", 2.5), ("0", 0.0), ("inf", math.inf),
                                             (" 7 ", 7.0), ("", DEFAULT_GRACE)])
def test_the_environment_sets_the_grace(monkeypatch, text, grace):
    monkeypatch.setenv(GRACE_ENV, text)
    assert interrupt_grace() == grace


def test_an_explicit_grace_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv(GRACE_ENV, "30")
    assert interrupt_grace(1) == 1.0


@pytest.mark.parametrize("text", ["soon", "-1", "nan"])
def test_a_bad_grace_in_the_environment_names_the_variable(monkeypatch, text):
    monkeypatch.setenv(GRACE_ENV, text)
    with pytest.raises(ValueError, match=GRACE_ENV):
        interrupt_grace()


def test_a_worker_on_this_host_shares_our_clock():
    # its "now" (100.5) lies within our exchange (100.0 .. 101.0): its times are ours
    assert _on_our_clock(100.5, [99.9, 100.2], 100.0, 101.0) == [99.9, 100.2]


def test_a_worker_on_another_host_is_shifted_to_the_middle_of_the_exchange():
    # its clock reads 5000.0 in the middle of our exchange (100.0 .. 101.0): shift by -4899.5
    assert _on_our_clock(5000.0, [4990.0, 4999.9], 100.0, 101.0) == pytest.approx(
        [90.5, 100.4])
