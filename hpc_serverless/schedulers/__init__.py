"""One module per scheduler, mostly data: state maps, argv builders, output parsers."""

from .common import JobState

__all__ = ["JobState"]
