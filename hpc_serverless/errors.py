"""The exceptions a user can catch, at a stable public path: ``from hpc_serverless.errors
import TargetError``. They are defined in the core layer (core/errors.py), which every
other layer raises them from; this module only names them for users."""

from hpc_serverless.core.errors import (
    AgentError,
    AuthenticationError,
    ConfigError,
    CorruptObjectError,
    CorruptRecordError,
    DependencyError,
    EnvironmentBuildError,
    GetTimeoutError,
    HostKeyError,
    HPCServerlessError,
    JobFailedError,
    JobNotFoundError,
    ObjectNotFoundError,
    ProgramError,
    QPUError,
    RemoteTaskError,
    RemoteTraceback,
    ResourceError,
    SchedulerError,
    SerializationError,
    StoreError,
    TargetError,
    TaskCancelledError,
    TaskError,
    TaskTimeoutError,
    TransportError,
    UnknownProviderError,
    UnsafeStoreError,
    WorkerDiedError,
)

__all__ = [
    "AgentError", "AuthenticationError", "ConfigError", "CorruptObjectError", "CorruptRecordError", "DependencyError",
    "EnvironmentBuildError", "GetTimeoutError", "HPCServerlessError", "HostKeyError", "JobFailedError", "JobNotFoundError",
    "ObjectNotFoundError", "ProgramError", "QPUError", "RemoteTaskError", "RemoteTraceback", "ResourceError",
    "SchedulerError", "SerializationError", "StoreError", "TargetError", "TaskCancelledError",
    "TaskError", "TaskTimeoutError", "TransportError", "UnknownProviderError", "UnsafeStoreError",
    "WorkerDiedError",
]
