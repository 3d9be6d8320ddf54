"""The executors under test, each behind the same small interface.

``open_backend(name)`` constructs one (two workers, unless told otherwise) and returns a ``Backend`` with
``submit(fn, *args)`` (a ``concurrent.futures.Future``), ``map(fn, items, chunksize)``
(an iterator of results, in order) and ``close()``. Each is imported only when used, so a
missing peer fails its own runs only.
"""

from __future__ import annotations

import itertools
import logging

NWORKERS = 2

#: Every backend the suite knows, in table order; "machine" is the pseudo-backend of limits.
BACKENDS = ("distexec", "pp-fork", "pp-forkserver", "loky", "dask")
LABELS = {
    "distexec": "distexec",
    "pp-fork": "ProcessPool (fork)",
    "pp-forkserver": "ProcessPool (forkserver)",
    "loky": "loky",
    "dask": "dask.distributed",
    "machine": "machine limit",
}


class Backend:
    name = "?"
    #: Whether the backend can pickle a lambda (ProcessPoolExecutor's pickle cannot).
    ships_lambdas = True

    def __init__(self, executor):
        self.executor = executor

    def submit(self, fn, *args):
        return self.executor.submit(fn, *args)

    def map(self, fn, items, chunksize: int):
        return self.executor.map(fn, items, chunksize=chunksize)

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    def versions(self) -> dict:
        return {}


class DistexecBackend(Backend):
    name = "distexec"

    @classmethod
    def open(cls, n: int = NWORKERS):
        import distexec
        return cls(distexec.DistributedExecutor(n))

    def workers(self) -> list[int]:
        return self.executor.workers()

    def versions(self) -> dict:
        import distexec
        return {"distexec": distexec.__version__, "distexec_path": distexec.__file__}


class ProcessPoolBackend(Backend):
    ships_lambdas = False

    def __init__(self, executor, method):
        super().__init__(executor)
        self.name = f"pp-{method}"

    @classmethod
    def open(cls, method: str, n: int = NWORKERS):
        import concurrent.futures as cf
        import multiprocessing
        return cls(cf.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context(method)),
                   method)


class LokyBackend(Backend):
    name = "loky"

    @classmethod
    def open(cls, n: int = NWORKERS):
        import loky
        return cls(loky.get_reusable_executor(max_workers=n))

    def versions(self) -> dict:
        import loky
        return {"loky": loky.__version__}


class DaskBackend(Backend):
    """dask.distributed: LocalCluster of worker processes, one thread each.

    ``submit`` goes through ``client.get_executor(pure=False)`` (with the default pure=True
    identical calls would share one key and run once). ``map`` ignores chunksize in dask's
    executor, so chunks go as one ``client.map`` task per list of items, as a dask user
    batches by hand.
    """
    name = "dask"

    def __init__(self, cluster, client):
        super().__init__(client.get_executor(pure=False))
        self.cluster, self.client = cluster, client

    @classmethod
    def open(cls, n: int = NWORKERS):
        from dask.distributed import Client, LocalCluster
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
        return cls(cluster, Client(cluster))

    def map(self, fn, items, chunksize: int):
        from . import tasks
        if chunksize == 1:
            return iter(self.client.gather(self.client.map(fn, list(items), pure=False)))
        if fn is not tasks.inc:
            raise NotImplementedError("the dask backend batches only tasks.inc")
        iterator = iter(items)
        chunks = list(iter(lambda: list(itertools.islice(iterator, chunksize)), []))
        futures = self.client.map(tasks.inc_chunk, chunks, pure=False)
        return itertools.chain.from_iterable(self.client.gather(futures))

    def close(self) -> None:
        self.client.close()
        self.cluster.close()

    def versions(self) -> dict:
        import dask
        import distributed
        return {"dask": dask.__version__, "distributed": distributed.__version__}


def open_backend(name: str, n: int = NWORKERS) -> Backend:
    """Backend ``name`` with ``n`` workers."""
    if name == "distexec":
        return DistexecBackend.open(n)
    if name in ("pp-fork", "pp-forkserver"):
        return ProcessPoolBackend.open(name[3:], n)
    if name == "loky":
        return LokyBackend.open(n)
    if name == "dask":
        return DaskBackend.open(n)
    raise ValueError(f"unknown backend {name!r}")
