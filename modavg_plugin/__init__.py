"""modavg_plugin: ship an *average* of the weights training visited.

An exponential moving average kept every batch and/or the weighted mean of the
best epoch checkpoints, for GluonTS's ``Trainer`` (MXNet), ``Module.fit`` and
plain Gluon loops, all driving one engine (:class:`AveragingRun`).
Importing the package registers the built-in moving averages and strategies;
the GluonTS callbacks (and GluonTS itself) are imported on first use of
``AveragingCallback`` and friends, so plain Gluon loops do not pay for GluonTS.
"""

import importlib
from typing import Any

from .averages import CumulativeMovingAverage, ExponentialMovingAverage, MovingAverage, PowerMovingAverage
from .batchnorm import update_bn
from .checkpoint_log import save_epoch_info
from .checks import CheckpointError
from .parameters import load_weights
from .posthoc import reconstruct_posthoc, save_posthoc
from .registry import ConfigurationError, Registrable
from .run import AveragingRun
from .snapshots import PostHocSnapshots
from .strategies import AveragingStrategy, GreedySoup, SelectNBestMean, SelectNBestSoftmax
from .triggers import AlphaSuffixTrigger, AveragingTrigger, NonMonotonicTrigger

__version__ = "0.1.0"

_GLUONTS_NAMES = {
    "AutoAveragingCallback",
    "AveragingCallback",
    "CheckpointAveragingCallback",
    "ExponentialAveragingCallback",
    "IterationAveragingCallback",
    "MovingAverageCallback",
}

__all__ = [
    "AlphaSuffixTrigger",
    "AutoAveragingCallback",
    "AveragingCallback",
    "AveragingRun",
    "AveragingStrategy",
    "AveragingTrigger",
    "CheckpointAveragingCallback",
    "CheckpointError",
    "ConfigurationError",
    "CumulativeMovingAverage",
    "ExponentialAveragingCallback",
    "ExponentialMovingAverage",
    "GreedySoup",
    "IterationAveragingCallback",
    "MovingAverage",
    "MovingAverageCallback",
    "NonMonotonicTrigger",
    "PostHocSnapshots",
    "PowerMovingAverage",
    "Registrable",
    "SelectNBestMean",
    "SelectNBestSoftmax",
    "load_weights",
    "reconstruct_posthoc",
    "save_epoch_info",
    "save_posthoc",
    "update_bn",
]


def __getattr__(name: str) -> Any:
    """Import the GluonTS callbacks on first access (PEP 562)."""
    if name in _GLUONTS_NAMES:
        return getattr(importlib.import_module(".callbacks", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | _GLUONTS_NAMES)
