"""Workers' output on the master's console: whole lines, labelled, stdout and stderr apart.

Owns turning each worker's stdout and stderr byte streams into lines written to the master's
``sys.stdout`` and ``sys.stderr``, and the one lock those writes share. Imports the standard
library only.

    worker stdout ──► StreamRelay ──► LineSplitter ──► console.line(sys.stdout, ...)
    worker stderr ──► StreamRelay ──► LineSplitter ──► console.line(sys.stderr, ...)
                                           └─► text after a "\\r" ──► console.progress(...)

A line goes out whole, in one write, so lines of two workers never mix. A worker's
unfinished line is held until its newline, except a line redrawn with ``\\r`` (a tqdm bar, a
percentage): that one is shown as it changes, and ended with a newline if another line must
be printed below it. On a terminal the master's own unfinished line (printed without a
newline, still in its buffer) is left alone: relayed lines are written to the file
descriptor, past Python's buffer, as a ProcessPoolExecutor child's would be.

Each line gets a prefix, Julia's ``"      From worker N:\\t"`` unless ``addprocs``'s
``output_prefix`` (or ``DISTEXEC_OUTPUT_PREFIX``) says otherwise; ``""`` turns it off.
"""

from __future__ import annotations

import codecs
import io
import os
import re
import select
import stat
import sys
import threading
from typing import Any, Callable

PREFIX_ENV = "DISTEXEC_OUTPUT_PREFIX"
DEFAULT_PREFIX = "      From worker {pid}:\t"
"""Julia's label; also how a worker relays the output of workers it started (SSH ``count``),
which the master then labels with the prefix in force."""

RELAYED_LINE = re.compile(r"^      From worker (\d+):\t(.*)$", re.S)
MAX_PENDING = 1 << 20
"""Characters of an unfinished line held back; past this it goes out as a line of its own."""


def resolve_prefix(value: str | None = None) -> str:
    """``value`` checked, else ``DISTEXEC_OUTPUT_PREFIX``, else Julia's prefix.

    A prefix is text in which ``{pid}`` stands for the worker's id; ``""`` means none.
    """
    source = "output_prefix"
    if value is None:
        value, source = os.environ.get(PREFIX_ENV, DEFAULT_PREFIX), PREFIX_ENV
    if not isinstance(value, str):
        raise TypeError(f"{source} must be a str (\"{{pid}}\" stands for the worker's id), "
                        f"got {type(value).__name__}")
    try:
        value.format(pid=2)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"{source} {value!r} is not a valid prefix: only {{pid}} may appear "
                         f"in braces (write {{{{ and }}}} for literal braces): {exc}") from None
    return value


def render(text: str) -> str:
    """What a terminal shows for ``text`` with carriage returns: each part overwrites the
    start of what came before it."""
    shown = ""
    for part in text.split("\r"):
        shown = part + shown[len(part):]
    return shown


class LineSplitter:
    """Cuts one stream's text into events: ``("line", text)`` for each finished line, and
    ``("progress", text)`` when its unfinished line was redrawn with ``\\r``."""

    def __init__(self) -> None:
        self._pending = ""
        self._shown: str | None = None

    def feed(self, text: str) -> list[tuple[str, str]]:
        events: list[tuple[str, str]] = []
        *lines, pending = (self._pending + text).split("\n")
        for line in lines:
            events.append(("line", render(line)))
            self._shown = None
        if len(pending) > MAX_PENDING:
            events.append(("line", render(pending)))
            pending, self._shown = "", None
        if "\r" in pending:
            head, _, tail = pending.rpartition("\r")
            pending = render(head) + "\r" + tail  # the same picture, without its history
            shown = render(pending)
            if shown != self._shown:
                events.append(("progress", shown))
                self._shown = shown
        self._pending = pending
        return events

    def close(self) -> list[tuple[str, str]]:
        """The stream ended: its unfinished line, if any, as a line."""
        pending, self._pending = self._pending, ""
        return [("line", render(pending))] if pending or self._shown is not None else []


class Console:
    """The master's stdout and stderr as workers' lines reach them (one per process).

    Per device, at most one redrawn line is live: the last one drawn, at the bottom. A
    finished line takes its row and the live line is drawn again below it, as ``tqdm.write``
    does; a stream's own finished line replaces its live line for good.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[object, tuple[object, str]] = {}  # device -> (stream key, shown text)

    def line(self, stream, key: object, prefix: str, text: str) -> None:
        """Write one finished line of the stream ``key``."""
        with self._lock:
            device, clear = _device(stream)
            live = self._live.get(device)
            if live is None:
                _write(stream, f"{prefix}{text}\n")
                return
            live_key, shown = live
            if live_key == key:
                del self._live[device]
                shown = ""
            _write(stream, f"\r{prefix}{text}{clear}\n{shown}")

    def progress(self, stream, key: object, prefix: str, text: str) -> None:
        """Show (or redraw) the unfinished line of the stream ``key``."""
        with self._lock:
            device, clear = _device(stream)
            start = "\r" if device in self._live else ""
            self._live[device] = (key, f"{prefix}{text}")
            _write(stream, f"{start}{prefix}{text}{clear}")


def _device(stream) -> tuple[object, str]:
    """Where ``stream`` writes (stdout and stderr on one terminal are one device), and how
    to clear the rest of a row there (on a terminal only)."""
    try:
        fd = stream.fileno()
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino), "\x1b[K" if os.isatty(fd) else ""
    except (AttributeError, ValueError, OSError):
        return id(stream), ""


def _write(stream, text: str) -> None:
    try:
        fd = stream.fileno()
        tty = os.isatty(fd)
    except (AttributeError, ValueError, OSError):
        tty = False
    try:
        if not tty:
            stream.write(text)
            stream.flush()
            return
        data = text.encode(getattr(stream, "encoding", None) or "utf-8", errors="replace")
        while data:  # past the master's own unfinished line, which waits in its buffer
            data = data[os.write(fd, data):]
    except (ValueError, OSError):  # our stdout is closed (interpreter exit): drop the line
        pass


console = Console()


class StreamRelay:
    """A thread reading one output stream of a worker until its end.

    ``on_line(text)`` sees each finished line first; it returns True to keep the line (the
    launcher reads the address line and startup chatter so). Every other line, and every
    redrawn unfinished line, goes to ``target()`` (``sys.stdout`` or ``sys.stderr``, looked
    up at each write), labelled for ``owner``: its ``prefix`` with its ``pid``.

    A pipe (a local worker's, or ssh's) is read without blocking, under a lock, so that
    ``settle`` can write out what is in it at any moment: the master calls it before it hands
    over a worker's result, and what a task printed before it returned is shown before the
    result, as a ``ProcessPoolExecutor`` child's output is.
    """

    def __init__(self, stream, target: Callable[[], object], owner,
                 on_line: Callable[[str], bool] = lambda text: False,
                 on_end: Callable[[], None] = lambda: None, name: str = "distexec-relay"):
        self.owner = owner
        self._target, self._on_line, self._on_end = target, on_line, on_end
        self._splitter = LineSplitter()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._lock = threading.Lock()  # held while bytes are read and written out
        # the pipe read, if it is one (None: a stream read as it comes, nothing to settle)
        self._stream, self.fd = _take_pipe(stream)
        self._ended = False
        if self.fd is not None:
            self._waiting, self._settling = select.poll(), select.poll()  # one per thread
            for poller in (self._waiting, self._settling):
                poller.register(self.fd, select.POLLIN)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the stream to end and its last line to go out."""
        self._thread.join(timeout)

    def busy(self) -> bool:
        """Whether the relay thread is writing out what it read."""
        return self._lock.locked()

    def settle(self) -> None:
        """Write out everything already in the pipe (nothing for other streams)."""
        if self.fd is None:
            return
        with self._lock:
            if not self._ended and self._settling.poll(0):
                self._drain()

    def _run(self) -> None:
        try:
            if self.fd is None:
                self._read_blocking()
            else:
                while not self._ended:
                    self._waiting.poll()  # data, or the writer's end closed
                    with self._lock:
                        if not self._ended:
                            self._drain()
        finally:
            with self._lock:
                self._ended = True
                try:
                    self._handle(self._splitter.feed(self._decoder.decode(b"", final=True))
                                 + self._splitter.close())
                finally:
                    self._close()
            self._on_end()

    def _drain(self) -> None:
        """With the lock held: read and write out what the pipe holds; note its end."""
        assert self.fd is not None
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except OSError:  # EIO and the like: the stream is over
                data = b""
            if not data:
                self._ended = True
                return
            self._handle(self._splitter.feed(self._decoder.decode(data)))

    def _read_blocking(self) -> None:
        """A stream that is not a pipe (a manager's own): read as it comes, no settling."""
        read = getattr(self._stream, "read1", self._stream.read)
        try:
            while True:
                data = read(65536)
                if not data:
                    return
                with self._lock:
                    self._handle(self._splitter.feed(self._decoder.decode(data)))
        except (ValueError, OSError):  # someone closed the stream under us: that is its end
            pass

    def _close(self) -> None:
        """The relay is the stream's only reader: it closes it."""
        try:
            if self.fd is not None:
                os.close(self.fd)
            else:
                self._stream.close()
        except (ValueError, OSError):
            pass

    def _handle(self, events: list[tuple[str, str]]) -> None:
        for kind, text in events:
            if kind == "line" and self._on_line(text):
                continue
            pid = self.owner.pid
            relayed = RELAYED_LINE.match(text)
            if relayed:  # a line another worker relayed for a worker it started (SSH count)
                pid, text = int(relayed.group(1)), relayed.group(2)
            prefix = label(self.owner.prefix, pid)
            if kind == "line":
                console.line(self._target(), self, prefix, text)
            else:
                console.progress(self._target(), self, prefix, text)


def _take_pipe(stream) -> tuple[Any, int | None]:
    """``(stream, None)``, or for a pipe ``(None, fd)``: a non-blocking duplicate of its file
    descriptor, the stream itself closed, so that whoever else closes the stream (a manager
    cleaning up) cannot pull the descriptor from under the relay."""
    try:
        fd = stream.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return stream, None
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return stream, None
    own = os.dup(fd)
    os.set_blocking(own, False)
    stream.close()
    return None, own


def label(prefix: str, pid: int | None) -> str:
    """``prefix`` for worker ``pid`` (not known yet between its address line and its join)."""
    return prefix.format(pid="?" if pid is None else pid)


def stdout() -> object:
    return sys.stdout


def stderr() -> object:
    return sys.stderr
