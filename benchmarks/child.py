"""One measurement in a fresh process:
``python -m benchmarks.child CASE BACKEND [--quick] [--workers N]``.

Prints one line ``BENCH-RESULT {json}`` on stdout: the case's metrics and info.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

MARKER = "BENCH-RESULT "


def preimport(backend: str) -> float:
    """Import what the backend needs (so startup measures the executor, not imports)."""
    t0 = time.perf_counter()
    if backend == "distexec":
        import distexec  # noqa: F401
    elif backend.startswith("pp-"):
        import concurrent.futures.process  # noqa: F401
        import multiprocessing.context  # noqa: F401
    elif backend == "loky":
        import loky  # noqa: F401
    elif backend == "dask":
        import dask.distributed  # noqa: F401
    return time.perf_counter() - t0


def script_noop():
    """A task defined in the script that runs, as most users' are (the ``*_script`` cases):
    ``python -m benchmarks.child`` makes this module ``__main__``."""
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("case")
    parser.add_argument("backend")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, help="the scale case's worker count")
    args = parser.parse_args(argv)

    from .cases import CASES, Config
    fn, _backends = CASES[args.case]
    if args.case != "startup":
        preimport(args.backend)
    cfg = Config(quick=args.quick, **({"workers": args.workers} if args.workers else {}))
    metrics, info = fn(args.backend, cfg)
    print(MARKER + json.dumps({"metrics": metrics, "info": info}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
