"""Oversized messages (fault S10): refused before any byte is sent, failing only that call.

``DISTEXEC_MAX_MESSAGE_SIZE`` caps every message a process sends or accepts; workers inherit
the master's setting.
"""

from __future__ import annotations

import time

import pytest

import distexec
from distexec import MessageTooLarge, RemoteException

pytestmark = pytest.mark.timeout(60)

LIMIT = 1 << 20
BUDGET = 1.0
"""Seconds from the call to its MessageTooLarge error (spec S10)."""


@pytest.fixture
def small_messages(monkeypatch):
    monkeypatch.setenv("DISTEXEC_MAX_MESSAGE_SIZE", str(LIMIT))


@pytest.mark.fault("S10")
def test_an_oversized_argument_fails_in_the_caller_and_nothing_is_sent(small_messages,
                                                                       add_workers):
    (pid,) = add_workers(1)
    started = time.monotonic()
    with pytest.raises(MessageTooLarge, match="max_message_size=1048576"):
        distexec.remotecall_fetch(len, pid, bytes(2 * LIMIT))
    assert time.monotonic() - started < BUDGET
    assert distexec.remotecall_fetch(len, pid, bytes(LIMIT // 2)) == LIMIT // 2


@pytest.mark.fault("S10")
def test_an_oversized_result_fails_that_call_only(small_messages, add_workers):
    (pid,) = add_workers(1)
    started = time.monotonic()
    with pytest.raises(RemoteException, match="max_message_size") as info:
        distexec.remotecall_fetch(bytes, pid, 2 * LIMIT)
    assert time.monotonic() - started < BUDGET
    assert info.value.pid == pid
    # One error that says it all, without distexec's sending code as a cause and its frames
    assert ("ResultPicklingError: the result of the call (bytes) could not be sent: "
            "MessageTooLarge: message of ") in str(info.value)
    assert info.value.ex.__cause__ is None
    assert "File " not in info.value.captured.traceback_text
    assert distexec.remotecall_fetch(bytes, pid, 10) == bytes(10)
    assert pid in distexec.workers()
