"""Unit tests of ``distexec.protocol.tracebacks``: a captured exception's traceback as data.

No processes: an exception is captured, pickled and unpickled here, and its text compared
with what Python itself prints. What a script's user sees across real processes is
tests/integration/test_tracebacks.py.
"""

from __future__ import annotations

import linecache
import pickle
import traceback

import pytest

from distexec.errors import CapturedException, RemoteException, RemoteTraceback
from distexec.protocol import serialization
from distexec.protocol.tracebacks import capture

pytestmark = pytest.mark.timeout(30)


def _parse(text):
    return int(text)


def _work(item):
    try:
        return _parse(item)
    except ValueError as exc:
        raise KeyError(item) from exc


def _caught(fn, *args) -> BaseException:
    with pytest.raises(BaseException) as info:
        fn(*args)
    return info.value


def _across(captured: CapturedException) -> CapturedException:
    return pickle.loads(pickle.dumps(captured))


def test_the_text_is_what_python_prints_chain_and_markers_included():
    exc = _caught(_work, "x")
    python = "".join(traceback.format_exception(exc))
    # pytest.raises and this test's own frame lead to _work: Python's text has them too
    assert capture(exc).traceback_text == python
    assert _across(capture(exc)).traceback_text == python


def test_the_frames_arrive_as_a_stack_and_the_exception_without_a_traceback():
    received = _across(capture(_caught(_work, "x")))
    assert [frame.name for frame in received.stack][-1] == "_work"
    assert received.stack[-1].line == "raise KeyError(item) from exc"
    assert type(received.ex) is KeyError and received.ex.__traceback__ is None


def test_the_receivers_source_lines_are_used_the_senders_when_it_has_none(tmp_path):
    path = str(tmp_path / "only_on_the_sender.py")
    source = "def fail(x):\n    return 1 / x\n"
    namespace: dict = {}
    exec(compile(source, path, "exec"), namespace)
    linecache.cache[path] = (len(source), None, source.splitlines(True), path)
    try:
        sent = pickle.dumps(capture(_caught(namespace["fail"], 0)))
    finally:
        del linecache.cache[path]  # the receiver has no such file
    text = pickle.loads(sent).traceback_text
    assert f'File "{path}", line 2, in fail\n    return 1 / x\n' in text
    # the receiver's own copy wins where it has one
    linecache.cache[path] = (0, None, ["def fail(x):\n", "    return 1 / x  # here\n"], path)
    try:
        assert "return 1 / x  # here" in pickle.loads(sent).traceback_text
    finally:
        del linecache.cache[path]


def test_a_remote_exception_prints_the_remote_frames_once():
    remote = pickle.loads(pickle.dumps(RemoteException(2, capture(_caught(_parse, "x")))))
    assert type(remote.__cause__) is RemoteTraceback
    assert str(remote) == "On worker 2: ValueError: invalid literal for int() with base 10: 'x'"
    printed = "".join(traceback.format_exception(remote))
    assert printed.count("in _parse") == 1 and printed.count("return int(text)") == 1


def test_code_shipped_by_value_keeps_its_file_name():
    def nested():  # not importable by name: cloudpickle sends its code
        return 1

    payload, buffers = serialization.dumps(nested, None)
    code = serialization.loads(payload, buffers).__code__
    assert code.co_filename == nested.__code__.co_filename == __file__
    assert code.co_firstlineno == nested.__code__.co_firstlineno


_WITH_TBLIB_PICKLING = """
import pickle, sys
import tblib.pickling_support
tblib.pickling_support.install()  # what dask.distributed does on import
from distexec.protocol.tracebacks import capture

def work():
    try:
        int("x")
    except ValueError as exc:
        raise KeyError("x") from exc

try:
    work()
except KeyError as exc:
    received = pickle.loads(pickle.dumps(capture(exc)))
print(received.ex.__traceback__ is None, received.ex.__cause__.__traceback__ is None,
      received.stack[-1].name)
"""


def test_an_exception_arrives_without_a_traceback_even_where_tblib_pickles_them():
    """Another library (dask.distributed) may make every exception pickle its traceback; the
    remote frames still come only as data, or raising the exception would splice them into
    the caller's traceback."""
    import subprocess
    import sys

    pytest.importorskip("tblib.pickling_support")
    done = subprocess.run([sys.executable, "-c", _WITH_TBLIB_PICKLING], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "work"]
