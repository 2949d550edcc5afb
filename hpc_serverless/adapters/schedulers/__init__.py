"""One module per scheduler, mostly data: state maps, argv builders, output parsers."""

from hpc_serverless.adapters.schedulers.common import JobState

__all__ = ["JobState"]
