"""modavg_plugin: ship an *average* of the weights training visited.

An exponential moving average kept every batch and/or the weighted mean of the
best epoch checkpoints, for GluonTS's ``Trainer`` (MXNet) and plain Gluon loops.
Importing the package registers the built-in names.
"""

from .averages import ExponentialMovingAverage, MovingAverage
from .callbacks import AveragingCallback, CheckpointAveragingCallback, ExponentialAveragingCallback
from .checkpoints import CheckpointError, save_epoch_info
from .registry import ConfigurationError, Registrable
from .strategies import AveragingStrategy, SelectNBestMean, SelectNBestSoftmax

__version__ = "0.1.0"

__all__ = [
    "AveragingCallback",
    "AveragingStrategy",
    "CheckpointAveragingCallback",
    "CheckpointError",
    "ConfigurationError",
    "ExponentialAveragingCallback",
    "ExponentialMovingAverage",
    "MovingAverage",
    "Registrable",
    "SelectNBestMean",
    "SelectNBestSoftmax",
    "save_epoch_info",
]
