"""distexec: Julia's distributed computing model (DistributedNext.jl) for Python.

A master process adds worker processes and calls functions on them by id; results stay where
they were computed until fetched; channels work from any process. See ``docs/`` and the
README. Julia-style functions live in :mod:`distexec.api` and are re-exported here.
"""

from .api import *  # noqa: F401,F403
from .api import __all__ as _api_all
from .cluster.elastic import ElasticManager
from .cluster.local import LocalManager
from .cluster.slurm import SlurmManager
from .cluster.ssh import SSHManager
from .cluster.manager import ClusterManager, WorkerConfig, default_addprocs_params
from .cluster.worker import init_worker, process_messages, start_worker
from .errors import (AllWorkersExited, AuthenticationError, BrokenDistributedExecutor, CapturedException, ChannelClosedError,
                     CompositeException, DistexecError, DistributedError, InvalidStateError,
                     LaunchWorkerError, MessageTooLarge, ProcessExitedException, ProtocolError,
                     RemoteDeserializationError, RemoteException, ResultPicklingError,
                     SecurityWarning,
                     WaitTimeout)
from .executor import BrokenExecutor, DistributedExecutor
from .mp_pool import Pool
from .pmap import BatchProcessingError, ExponentialBackOff, pmap, splitrange
from .pools import (AbstractWorkerPool, CachingPool, WorkerPool, default_worker_pool,
                    set_default_worker_pool)
from .protocol.frames import RRID
from .protocol.serialization import current_destination
from .runtime.channel import Channel
from .runtime.context import ClusterContext, WorkerState
from .runtime.owned import channel_from_id
from .runtime.refs import Future, RemoteChannel, remoteref_id
from .transport.tls import Security

__version__ = "0.1.0"

__all__ = [
    *_api_all,
    "DistributedExecutor", "BrokenExecutor", "Pool", "pmap", "ExponentialBackOff", "BatchProcessingError",
    "splitrange", "AbstractWorkerPool", "WorkerPool", "CachingPool", "default_worker_pool",
    "set_default_worker_pool",
    "LocalManager", "SSHManager", "SlurmManager", "ElasticManager", "ClusterManager", "WorkerConfig", "default_addprocs_params",
    "init_worker", "start_worker", "process_messages", "RRID", "current_destination", "Channel",
    "ClusterContext", "WorkerState", "Future", "RemoteChannel", "channel_from_id", "remoteref_id",
    "DistexecError", "DistributedError", "RemoteException", "CapturedException",
    "RemoteDeserializationError", "ProcessExitedException", "AllWorkersExited", "BrokenDistributedExecutor", "ResultPicklingError",
    "CompositeException",
    "LaunchWorkerError", "AuthenticationError", "ProtocolError", "MessageTooLarge",
    "ChannelClosedError", "InvalidStateError", "SecurityWarning", "WaitTimeout", "Security",
]

from .integrations import _joblib_hook

_joblib_hook.install()  # joblib's backend "distexec", registered whenever joblib is imported
