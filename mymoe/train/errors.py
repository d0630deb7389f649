"""The errors a run ends with as one line (the CLI prints the message, no traceback): each names the bad
input or the failed step and what to do. Anything else is a bug and keeps its traceback."""

from __future__ import annotations

from mymoe.checkpoint.storage import CheckpointError
from mymoe.config import ConfigError
from mymoe.parallel.collectives import CollectiveError


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite steps in a row, out_dir held by another job, ...)."""


ONE_LINE_ERRORS = (ConfigError, CheckpointError, CollectiveError, TrainingError)
