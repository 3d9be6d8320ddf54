"""The machine's own limits: what any executor on this host could at best reach.

* loopback TCP ping-pong of 8 bytes between two Python processes (TCP_NODELAY), sequential,
  and the same through a Unix socket pair (what links the master to its local workers);
* raw TCP transfer of 64 MiB to another Python process and back (``sendall`` from the
  array's memory, ``recv_into`` preallocated memory); MB/s = 2 × 64 MiB / round trip;
* memcpy bandwidth: ``numpy.copyto`` of 64 MiB.

The peer is a fresh ``python -m benchmarks.limits PORT MODE SIZE`` process (PORT: the
inherited socket's fd for a Unix socket pair).
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import time

MiB = 1 << 20


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("peer closed")
        got += n


def _serve(port: int, mode: str, size: int) -> None:
    """The peer: echo ``size``-byte messages until the connection closes."""
    if mode == "pingpong-unix":
        sock = socket.socket(fileno=port)
    else:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(size)
    view = memoryview(buf)
    try:
        while True:
            _recv_exact(sock, view)
            sock.sendall(view)
    except (EOFError, ConnectionError):
        pass


class _Peer:
    def __init__(self, mode: str, size: int):
        if mode == "pingpong-unix":
            self.sock, theirs = socket.socketpair()
            with theirs:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.limits", str(theirs.fileno()), mode,
                     str(size)], pass_fds=(theirs.fileno(),))
            return
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.limits", str(port),
                                         mode, str(size)])
        listener.settimeout(30)
        self.sock, _ = listener.accept()
        listener.close()
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.close()
        self.process.wait(10)


def pingpong(cfg):
    from .cases import percentile
    metrics, info = {}, {}
    for mode, name in (("pingpong", "pingpong"), ("pingpong-unix", "pingpong_unix")):
        samples = _pingpong(cfg, mode)
        metrics[f"{name}_us"] = statistics.median(samples) * 1e6
        metrics[f"{name}_p99_us"] = percentile(samples, 0.99) * 1e6
        info[f"{name}_calls"] = len(samples)
    return metrics, info


def _pingpong(cfg, mode: str) -> list[float]:
    from .cases import timed_calls
    peer = _Peer(mode, 8)
    msg, buf = b"12345678", bytearray(8)
    view = memoryview(buf)
    sock = peer.sock

    def call():
        sock.sendall(msg)
        _recv_exact(sock, view)

    try:
        return timed_calls(call, cfg.budget / 2, n_max=5000 if cfg.quick else 20000, warmup=200)
    finally:
        peer.close()


def tcp_transfer(cfg):
    import numpy as np
    size = 64 * MiB
    array = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    back = np.empty_like(array)
    peer = _Peer("bulk", size)
    sock = peer.sock
    try:
        rounds = []
        for i in range(4 if cfg.quick else 8):
            t0 = time.perf_counter()
            sock.sendall(memoryview(array))  # the peer reads while we send: no deadlock
            _recv_exact(sock, memoryview(back))
            if i:  # the first round is the warm-up
                rounds.append(time.perf_counter() - t0)
        assert back[-1] == array[-1]
    finally:
        peer.close()
    rtt = statistics.median(rounds)
    return {"tcp_MBps": 2 * size / rtt / 1e6}, {"rounds": len(rounds), "rtt_s": round(rtt, 4)}


def memcpy(cfg):
    import numpy as np
    src = np.random.default_rng(0).random(64 * MiB // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    rounds = []
    for _ in range(10 if cfg.quick else 30):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        rounds.append(time.perf_counter() - t0)
    return {"memcpy_MBps": src.nbytes / statistics.median(rounds) / 1e6}, {"rounds": len(rounds)}


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
