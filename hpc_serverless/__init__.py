"""hpc_serverless: the Quantum Serverless programming model on Slurm and PBS clusters.

``put``/``get`` object references, ``@distribute_task`` remote functions, providers
switched with ``with serverless.context(name)``, and fire-and-forget ``Program``s.
Importing this package is light: qiskit, numpy, dask, paramiko and submitit are
imported only when a feature needs them.
"""

from __future__ import annotations

from typing import Any

from .api import QuantumServerless, distribute_task, get, put, wait
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import HPCServerlessError
from .programs import Job, Program, get_arguments, save_result
from .providers.local import LocalProvider
from .refs import ObjectRef, TaskRef
from .target import Target
from .version import __version__ as __version__

__all__ = [
    "HPCServerlessError",
    "Job",
    "LocalProvider",
    "ObjectRef",
    "PBSProvider",
    "Program",
    "QuantumServerless",
    "SlurmProvider",
    "Target",
    "TaskRef",
    "distribute_task",
    "get",
    "get_arguments",
    "load_checkpoint",
    "put",
    "save_checkpoint",
    "save_result",
    "wait",
]


def __getattr__(name: str) -> Any:
    # batch providers pull in more code (scheduler modules, submitit glue): load on use
    if name == "SlurmProvider":
        from .providers.slurm import SlurmProvider

        return SlurmProvider
    if name == "PBSProvider":
        from .providers.pbs import PBSProvider

        return PBSProvider
    raise AttributeError(f"module 'hpc_serverless' has no attribute {name!r}")
