"""The ``distexec`` command line: ``distexec worker`` (and, later, ``distexec run``).

Owns argument parsing for the console script and ``python -m distexec``. May import anything.
"""

from __future__ import annotations

import argparse
import sys

from .cluster.worker import start_worker


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distexec", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser(
        "worker", help="start a worker: reads the cookie from stdin, prints its address, serves")
    worker.add_argument("--bind-to", metavar="ADDR[:PORT|:[HINT]]", default=None,
                        help="interface (and port, or port hint) to listen on; default 127.0.0.1")
    worker.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    worker.add_argument("--die-with-stdin", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "worker":
        start_worker(bind_to=args.bind_to, parent_pid=args.parent_pid,
                     die_with_stdin=args.die_with_stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
