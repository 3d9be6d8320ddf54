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
from types import TracebackType
from typing import NoReturn

from .cluster.thread_limits import apply_host_share
from .cluster.worker import start_worker
from .progress import PROGRESS_ENV
from .progress import bar as progress_bar

_SRUN_SHORT = {"-n": "ntasks", "-N": "nodes", "-p": "partition", "-t": "time",
               "-c": "cpus_per_task", "-A": "account", "-q": "qos", "-J": "job_name"}


class _VersionAction(argparse.Action):
    """``--version``: the installed distribution's version (``distexec.__version__``), read
    without importing the package root, which the layers keep the CLI from, and only when
    asked: ``importlib.metadata`` would add 20 ms to every ``distexec worker`` start."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print distexec's version and exit", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version
        try:
            found = version("distexec")
        except PackageNotFoundError:  # run from a source tree that is not installed
            found = "unknown"
        print(f"distexec {found}")  # on stdout, as argparse's own version action prints
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distexec", description="Run a Python script on a cluster of workers (distexec "
                                     "run), or be one of the workers (distexec worker).")
    parser.add_argument("--version", action=_VersionAction)
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser(
        "worker", help="start a worker: reads the cookie from stdin, prints its address, serves",
        description="Start a worker. The first line of stdin must be the cluster cookie (as "
                    "the master writes it: 16 to 256 printable ASCII characters); the worker "
                    "then prints distexec_worker:PORT#ADDR and serves its master until the "
                    "master leaves.")
    worker.add_argument("--bind-to", metavar="ADDR[:PORT|:[HINT]]", default=None,
                        help="interface (and port, or port hint) to listen on; default 127.0.0.1")
    worker.add_argument("--tls", action="store_true",
                        help="use TLS: read the certificate line (Security.stdin_line()) from "
                             "stdin after the cookie line")
    worker.add_argument("--separate-stderr", action="store_true",
                        help="leave stderr apart from stdout (for a launcher that relays both); "
                             "by default stderr joins stdout")
    worker.add_argument("--join", metavar="HOST:PORT", default=None,
                        help="join the master's ElasticManager at HOST:PORT (the worker "
                             "connects; the cookie comes from stdin or --cookie-file)")
    worker.add_argument("--cookie-file", metavar="FILE", default=None,
                        help="with --join: read the cookie (and, with --tls, the TLS line after "
                             "it) from FILE, which only its owner may read, instead of stdin")
    worker.add_argument("--join-timeout", metavar="SECONDS", type=float, default=None,
                        help="with --join: keep trying to reach the master this long (with "
                             "backoff), then exit with status 69; default 60")
    worker.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    worker.add_argument("--die-with-stdin", action="store_true", help=argparse.SUPPRESS)
    worker.add_argument("--master-fd", type=int, default=None, help=argparse.SUPPRESS)
    worker.add_argument("--lane-fd", type=int, default=None, help=argparse.SUPPRESS)
    run = commands.add_parser(
        "run", help="start workers, run a script as __main__ with the cluster ready, shut down",
        description="Start the workers, run the script as __main__ with them ready (like "
                    "julia -p N script.jl), remove them; exit with the script's status.")
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
    script_args = run.add_argument("args", nargs=argparse.REMAINDER,
                                   help="arguments passed to the script")
    script_args.required = False  # argparse makes every REMAINDER positional required
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, srun_tokens = _take_srun_options(argv)
    args = _parser().parse_args(argv)
    if args.command == "run":
        args.slurm = srun_tokens if args.slurm else None
    if args.command == "worker" and (args.join or args.cookie_file or args.join_timeout):
        return _join(args)
    if args.command == "worker":
        apply_host_share()  # before any user code can load a numeric library
        start_worker(bind_to=args.bind_to, parent_pid=args.parent_pid,
                     die_with_stdin=args.die_with_stdin, tls_from_stdin=args.tls,
                     master_fd=args.master_fd, lane_fd=args.lane_fd,
                     stderr_to_stdout=not args.separate_stderr)
        return 0
    return run_script(args)


def _join(args) -> int:
    """``distexec worker --join HOST:PORT``: a worker that joins an ElasticManager."""
    from .cluster import elastic
    if not args.join:
        print("distexec worker: error: --cookie-file and --join-timeout go with --join",
              file=sys.stderr)
        return 2
    timeout = elastic.DEFAULT_JOIN_TIMEOUT if args.join_timeout is None else args.join_timeout
    if not timeout > 0:
        print("distexec worker: error: --join-timeout must be a positive number of seconds",
              file=sys.stderr)
        return 2
    apply_host_share()  # before any user code can load a numeric library
    elastic.join_cluster(args.join, cookie_file=args.cookie_file, tls=args.tls,
                         bind_to=args.bind_to, join_timeout=timeout)


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
    _check_script(args.script)  # before any worker starts: a typo must not cost a launch
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
        # An absolute path, as python gives its script: __file__ and tracebacks show it
        runpy.run_path(os.path.abspath(args.script), run_name="__main__")
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException as exc:  # Ctrl-C too: reported as python reports an uncaught one
        _report_uncaught(exc)
        status = EXIT_INTERRUPTED if isinstance(exc, KeyboardInterrupt) else 1
    finally:
        workers = [p for p in api.procs() if p != 1]
        if workers:
            api.rmprocs(workers, waitfor=30)
    return status


EXIT_INTERRUPTED = 130
"""``distexec run``'s status when the script stops on Ctrl-C: what a shell reports for python."""


def _usage_error(message: str) -> NoReturn:
    """Stop as argparse does on a bad argument: one line on stderr, exit status 2."""
    print(f"distexec run: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _check_script(path: str) -> None:
    """Refuse a script python could not run, with python's words for it."""
    if os.path.isdir(path):  # runpy runs a directory's __main__.py, as python does
        if not os.path.isfile(os.path.join(path, "__main__.py")):
            _usage_error(f"can't find '__main__' module in {path!r}")
        return
    try:
        open(path, "rb").close()
    except OSError as exc:
        _usage_error(f"can't open file {path!r}: [Errno {exc.errno}] {exc.strerror}")


def _report_uncaught(exc: BaseException) -> None:
    """Print ``exc`` as ``python script.py`` would: through ``sys.excepthook``, which the
    script may have replaced, and from the script's first frame on."""
    exc.__traceback__ = _script_frames(exc.__traceback__)  # the hook reads it from exc
    sys.excepthook(type(exc), exc, exc.__traceback__)


def _script_frames(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` without its leading frames of this module and ``runpy``, which ran the script.

    None when the script never ran (a ``SyntaxError``): python then shows no traceback either.
    """
    while tb is not None and tb.tb_frame.f_globals.get("__name__") in (__name__, "runpy"):
        tb = tb.tb_next
    return tb


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
            _usage_error("-p needs a positive number of workers")
        return args.procs
    if args.machine_file is not None:
        from .cluster.ssh import SSHManager
        return SSHManager(_machines_of(args.machine_file))
    if args.slurm is not None:
        from .cluster.slurm import SlurmManager
        try:
            options = srun_options(" ".join(shlex.quote(t) for t in args.slurm))
        except ValueError as exc:
            _usage_error(str(exc))
        return SlurmManager(**options)
    return None


def _machines_of(path: str) -> list[str | tuple[str, int | str]]:
    """The machine file's hosts, or a usage error saying why there are none."""
    try:
        machines = read_machine_file(path)
    except OSError as exc:
        _usage_error(f"can't open machine file {path!r}: [Errno {exc.errno}] {exc.strerror}")
    except ValueError as exc:  # a malformed line, or a file that is not text
        _usage_error(f"machine file {path!r}: {exc}")
    if not machines:
        _usage_error(f"machine file {path!r} names no host")
    return machines


def read_machine_file(path: str) -> list[str | tuple[str, int | str]]:
    """Julia's machine file: ``[count*][user@]host[:port] [bind_addr[:port]]`` per line.

    Raises:
        OSError: the file cannot be read.
        ValueError: a malformed line (the message gives its number), or text that is not UTF-8.
    """
    machines: list[str | tuple[str, int | str]] = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if line:
                try:
                    machines.append(_machine_of_line(line))
                except ValueError as exc:
                    raise ValueError(f"line {number}: {exc}") from None
    return machines


def _machine_of_line(line: str) -> str | tuple[str, int | str]:
    """One machine-file line as ``SSHManager`` takes it, checked here so that a mistake
    is reported with its line number rather than when the workers start."""
    from .cluster.ssh_commands import split_machine
    count, star, spec = line.partition("*")
    spec = spec.strip() if star else line
    split_machine(spec)  # ValueError: a malformed host or bind address
    if not star:
        return spec
    count = count.strip()
    if count == "auto":
        return spec, "auto"
    if not count.isdecimal() or int(count) < 1:
        raise ValueError(f"the count before '*' must be a positive number or 'auto', "
                         f"not {count!r}")
    return spec, int(count)


def srun_options(text: str) -> dict:
    """``"--ntasks=4 -p debug --exclusive"`` -> ``{"ntasks": "4", "partition": "debug", ...}``.

    Raises:
        ValueError: an option this cannot read, or a ``--ntasks`` that is not a number.
    """
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
            raise ValueError(f"unsupported srun option {token!r} (use the --long=value form)")
        options[key.replace("-", "_")] = value
    if "ntasks" in options:
        ntasks = options["ntasks"]
        if not (isinstance(ntasks, str) and ntasks.isdecimal() and int(ntasks) > 0):
            raise ValueError(f"--ntasks needs a positive number, not {ntasks!r}")
        options["ntasks"] = int(ntasks)
    return options


if __name__ == "__main__":
    sys.exit(main())
