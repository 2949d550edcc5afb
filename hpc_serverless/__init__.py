"""hpc_serverless: the Quantum Serverless programming model on Slurm and PBS clusters.

``put``/``get`` object references, ``@distribute_task`` remote functions, providers
switched with ``with serverless.context(name)``, and fire-and-forget ``Program``s.
Importing this package is light: qiskit, numpy, dask, paramiko and submitit are
imported only when a feature needs them.
"""

from __future__ import annotations

from typing import Any

from hpc_serverless import errors
from hpc_serverless.api import QuantumServerless, distribute_task, get, put, wait
from hpc_serverless.core.refs import ObjectRef, TaskRef
from hpc_serverless.core.target import Target
from hpc_serverless.errors import HPCServerlessError
from hpc_serverless.programs import Job, Program, get_arguments, save_result
from hpc_serverless.providers.local import LocalProvider
from hpc_serverless.runtime.checkpoint import load_checkpoint, save_checkpoint
from hpc_serverless.runtime.qpus import QPU, qpu, qpus
from hpc_serverless.version import __version__ as __version__

__all__ = [
    "HPCServerlessError",
    "Job",
    "LocalProvider",
    "ObjectRef",
    "PBSProvider",
    "Program",
    "QPU",
    "QuantumServerless",
    "SlurmProvider",
    "Target",
    "TaskRef",
    "distribute_task",
    "errors",
    "get",
    "get_arguments",
    "load_checkpoint",
    "put",
    "qpu",
    "qpus",
    "save_checkpoint",
    "save_result",
    "wait",
]


def __getattr__(name: str) -> Any:
    # batch providers pull in more code (scheduler modules, submitit glue): load on use
    if name == "SlurmProvider":
        from hpc_serverless.providers.slurm import SlurmProvider

        return SlurmProvider
    if name == "PBSProvider":
        from hpc_serverless.providers.pbs import PBSProvider

        return PBSProvider
    raise AttributeError(f"module 'hpc_serverless' has no attribute {name!r}")
