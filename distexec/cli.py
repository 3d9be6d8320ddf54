"""The ``distexec`` command line: ``distexec worker`` and ``distexec run``.

Owns argument parsing for the console script and ``python -m distexec``, and running a user
script on a ready cluster. May import anything.

    distexec run -p 4 script.py a b       like ``julia -p 4 script.jl a b``
    distexec run --machine-file hosts script.py
    distexec run --slurm --ntasks=8 --partition=short script.py
"""

from __future__ import annotations

import argparse
import os
import runpy
import shlex
import sys

from .cluster.thread_limits import apply_host_share
from .cluster.worker import start_worker
from .progress import PROGRESS_ENV
from .progress import bar as progress_bar

_SRUN_SHORT = {"-n": "ntasks", "-N": "nodes", "-p": "partition", "-t": "time",
               "-c": "cpus_per_task", "-A": "account", "-q": "qos", "-J": "job_name"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distexec", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser(
        "worker", help="start a worker: reads the cookie from stdin, prints its address, serves")
    worker.add_argument("--bind-to", metavar="ADDR[:PORT|:[HINT]]", default=None,
                        help="interface (and port, or port hint) to listen on; default 127.0.0.1")
    worker.add_argument("--tls", action="store_true",
                        help="use TLS: read the certificate line (Security.stdin_line()) from "
                             "stdin after the cookie line")
    worker.add_argument("--separate-stderr", action="store_true",
                        help="leave stderr apart from stdout (for a launcher that relays both); "
                             "by default stderr joins stdout")
    worker.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    worker.add_argument("--die-with-stdin", action="store_true", help=argparse.SUPPRESS)
    worker.add_argument("--master-fd", type=int, default=None, help=argparse.SUPPRESS)
    run = commands.add_parser(
        "run", help="start workers, run a script as __main__ with the cluster ready, shut down")
    where = run.add_mutually_exclusive_group()
    where.add_argument("-p", "--procs", type=int, metavar="N", help="N local workers")
    where.add_argument("--machine-file", metavar="FILE",
                       help="SSH workers, one line per host: [count*][user@]host[:port] [bind[:port]]")
    where.add_argument("--slurm", action="store_true",
                       help="workers through srun; srun options follow, long ones as "
                            "--key=value, e.g. --slurm --ntasks=4 -p debug script.py")
    run.add_argument("--progress", action="store_true",
                     help="progress bars (tqdm, if installed): one while the workers start, and "
                          "one for every pmap and executor map of the script that does not "
                          "pass progress= itself (sets DISTEXEC_PROGRESS=1)")
    run.add_argument("script", help="the Python script to run")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, srun_tokens = _take_srun_options(argv)
    args = _parser().parse_args(argv)
    if args.command == "run":
        args.slurm = srun_tokens if args.slurm else None
    if args.command == "worker":
        apply_host_share()  # before any user code can load a numeric library
        start_worker(bind_to=args.bind_to, parent_pid=args.parent_pid,
                     die_with_stdin=args.die_with_stdin, tls_from_stdin=args.tls,
                     master_fd=args.master_fd, stderr_to_stdout=not args.separate_stderr)
        return 0
    return run_script(args)


def _take_srun_options(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """Cut ``--slurm`` and the srun options after it out of ``run``'s arguments.

    argparse cannot tell srun's options from the script, so they are taken here: every
    token starting with ``-`` (and the value after a short option such as ``-n 4``) up to
    the script's path.
    """
    start = _option_before_script(argv, "--slurm")
    if start is None:
        return argv, None
    if argv[start].startswith("--slurm="):  # --slurm="--ntasks=2 --partition=x"
        return argv[:start] + ["--slurm"] + argv[start + 1:], shlex.split(argv[start][8:])
    tokens, i = [], start + 1
    while i < len(argv) and argv[i].startswith("-"):
        tokens.append(argv[i])
        if argv[i] in _SRUN_SHORT and i + 1 < len(argv):
            tokens.append(argv[i + 1])
            i += 1
        i += 1
    return argv[:start] + ["--slurm"] + argv[i:], tokens


def _option_before_script(argv: list[str], option: str) -> int | None:
    """Index of ``option`` among ``run``'s own options (not the script's arguments)."""
    if not argv or argv[0] != "run":
        return None
    i = 1
    while i < len(argv):
        if argv[i] == option or argv[i].startswith(option + "="):
            return i
        if argv[i] in ("-p", "--procs", "--machine-file"):
            i += 2
        elif argv[i].startswith("-"):
            i += 1
        else:
            return None  # the script: what follows belongs to it
    return None


def run_script(args) -> int:
    """Add the workers, run the script as ``__main__``, remove them; the script's exit status."""
    from . import api
    from .errors import DistexecError
    target = _cluster_target(args)
    if target is not None:
        try:
            _add_workers(api, target, args.progress or None)
        except DistexecError as exc:  # a launch failure is the user's to read, not a traceback
            print(f"distexec run: could not start the workers: {exc}", file=sys.stderr)
            return 1
    if args.progress:
        os.environ[PROGRESS_ENV] = "1"  # for the script's maps; set after the launch, so the
        # workers (which inherit the environment) do not draw bars of their own
    sys.argv = [args.script, *args.args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
    try:
        runpy.run_path(args.script, run_name="__main__")
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    finally:
        workers = [p for p in api.procs() if p != 1]
        if workers:
            api.rmprocs(workers, waitfor=30)
    return status


def _add_workers(api, target, progress: bool | None) -> None:
    """``addprocs(target)``, with a bar counting the workers as they join when asked."""
    bar = progress_bar(progress, total=target if isinstance(target, int) else None,
                       desc="starting workers", unit="worker")
    if bar is None:
        api.addprocs(target)
        return
    key = api.add_worker_started_callback(lambda pid: bar.update(1))
    try:
        api.addprocs(target)
    finally:
        api.remove_worker_started_callback(key)
        bar.close()


def _cluster_target(args):
    if args.procs is not None:
        if args.procs < 1:
            raise SystemExit("distexec run: -p needs a positive number of workers")
        return args.procs
    if args.machine_file is not None:
        from .cluster.ssh import SSHManager
        return SSHManager(read_machine_file(args.machine_file))
    if args.slurm is not None:
        from .cluster.slurm import SlurmManager
        return SlurmManager(**srun_options(" ".join(shlex.quote(t) for t in args.slurm)))
    return None


def read_machine_file(path: str) -> list[str | tuple[str, int | str]]:
    """Julia's machine file: ``[count*][user@]host[:port] [bind_addr[:port]]`` per line."""
    machines: list[str | tuple[str, int | str]] = []
    with open(path) as lines:
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            count, star, spec = line.partition("*")
            if not star:
                machines.append(line)
            elif count.strip() == "auto":
                machines.append((spec.strip(), "auto"))
            else:
                machines.append((spec.strip(), int(count)))
    return machines


def srun_options(text: str) -> dict:
    """``"--ntasks=4 -p debug --exclusive"`` -> ``{"ntasks": "4", "partition": "debug", ...}``."""
    options: dict = {}
    tokens = shlex.split(text)
    while tokens:
        token = tokens.pop(0)
        value: str | bool
        if token.startswith("--"):
            key, eq, value = token[2:].partition("=")
            if not eq:
                value = tokens.pop(0) if tokens and not tokens[0].startswith("-") else True
        elif token in _SRUN_SHORT and tokens:
            key, value = _SRUN_SHORT[token], tokens.pop(0)
        else:
            raise SystemExit(f"distexec run: unsupported srun option {token!r} "
                             "(use the --long=value form)")
        options[key.replace("-", "_")] = value
    if "ntasks" in options:
        options["ntasks"] = int(options["ntasks"])
    return options


if __name__ == "__main__":
    sys.exit(main())
