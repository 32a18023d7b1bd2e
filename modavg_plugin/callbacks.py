"""GluonTS ``Trainer`` callbacks that average weights.

``AveragingCallback`` subclasses GluonTS's ``ModelAveraging`` on purpose:
``Trainer(add_default_callbacks=True)`` (the default) appends its own
``ModelAveraging(SelectNBestMean(num_models=1))`` unless a ``ModelAveraging``
is already in the list, and that one would reload the best *raw* epoch over
our result at the end of training. Every hook is our own; nothing of
``ModelAveraging``'s behaviour is inherited.

Hooks take ``**kwargs``: GluonTS has renamed hook arguments between versions.
"""

import logging
from typing import Any, Mapping, Optional

import mxnet as mx
from gluonts.core.component import validated
from gluonts.mx.trainer.model_averaging import ModelAveraging

from .averages import ExponentialMovingAverage, check_exponential_arguments
from .checkpoint_log import CheckpointLog
from .parameters import NamedParameters, as_context, device_copies, named_parameters, write_into_parameters
from .registry import ConfigurationError, Registrable
from .strategies import AveragingStrategy

__all__ = ["AveragingCallback", "CheckpointAveragingCallback", "ExponentialAveragingCallback"]

logger = logging.getLogger("gluonts.modavg_plugin.callbacks")

RECORDED_METRIC = "score"


class AveragingCallback(Registrable, ModelAveraging):
    """Base of the averaging callbacks: per-epoch checkpoints and the final assignment.

    Each epoch, :meth:`epoch_weights` is saved with an epoch-info record
    (``params_path``, ``epoch_no``, ``score``: the validation loss when
    validation data is given, else the training loss). Files that
    ``avg_strategy`` can no longer select are deleted as training goes. At the
    end, the network holds :meth:`final_weights` or, with ``avg_strategy``,
    the strategy's weighted average of the kept checkpoints.

    Parameters
    ----------
    avg_strategy
        Which checkpoints to average at the end, and with which weights.
    checkpoint_dir
        Folder for the per-epoch checkpoints; ``None`` uses a temporary folder
        removed at the end of training. A given folder is kept.
    """

    default_implementation = "exponential"

    def __init__(self, avg_strategy: Optional[AveragingStrategy] = None, checkpoint_dir: Optional[str] = None) -> None:
        if avg_strategy is not None and avg_strategy.metric != RECORDED_METRIC:
            raise ConfigurationError(
                f"avg_strategy.metric is {avg_strategy.metric!r}, but the callback records only {RECORDED_METRIC!r}"
            )
        self.avg_strategy = avg_strategy
        self.checkpoint_dir = checkpoint_dir
        self._parameters: NamedParameters = []
        self._checkpoints = CheckpointLog(avg_strategy, checkpoint_dir)

    # Hooks ------------------------------------------------------------------

    def on_train_start(self, max_epochs: int = 0, **kwargs: Any) -> None:
        """Start a run: forget the checkpoints of any earlier run."""
        self._checkpoints.close()

    def on_network_initializing_end(self, training_network: mx.gluon.HybridBlock, **kwargs: Any) -> None:
        """Track the network's parameters (all of ``collect_params()``)."""
        self._parameters = named_parameters(training_network.collect_params().items())

    def on_epoch_end(self, epoch_no: int, epoch_loss: float, **kwargs: Any) -> bool:
        """Save this epoch's weights and record; prune what cannot be selected."""
        epoch_no, score = int(epoch_no), float(epoch_loss)
        self._checkpoints.save(f"epoch-{epoch_no:04d}", epoch_no, {RECORDED_METRIC: score}, self.epoch_weights())
        logger.info("epoch %d: saved averaged weights, %s %.6g", epoch_no, RECORDED_METRIC, score)
        return True

    def on_train_end(self, training_network: Optional[mx.gluon.HybridBlock] = None, **kwargs: Any) -> None:
        """Leave the averaged weights in the network and remove temporary files."""
        try:
            self.finish_training()
        finally:
            self._checkpoints.close()

    # What subclasses decide -------------------------------------------------

    def epoch_weights(self) -> Mapping[str, mx.nd.NDArray]:
        """The weights to save as this epoch's checkpoint."""
        raise NotImplementedError

    def finish_training(self) -> None:
        """Put the final weights into the network (called by :meth:`on_train_end`)."""
        raise NotImplementedError

    def assign_checkpoint_average(self, fallback: str) -> bool:
        """Write the strategy's average of the kept checkpoints into the network.

        Returns ``False``, with the reason logged, when that fails; the
        network then keeps ``fallback`` (it is not touched).
        """

        def write(averaged: Mapping[str, mx.nd.NDArray]) -> None:
            write_into_parameters(averaged, self._parameters, "the averaged checkpoints")

        return self._checkpoints.assign_average(write, fallback)


@AveragingCallback.register("checkpoints")
class CheckpointAveragingCallback(AveragingCallback):
    """No EMA: raw weights saved per epoch, the best ones averaged at the end.

    A drop-in for GluonTS's ``ModelAveraging(avg_strategy)`` that keeps only
    the checkpoints the strategy can use and averages them one at a time.

    Parameters
    ----------
    avg_strategy
        Defaults to ``SelectNBestMean(num_models=5)``.
    checkpoint_dir
        Folder for the checkpoints; ``None``: a temporary one.
    """

    @validated()
    def __init__(self, avg_strategy: Optional[AveragingStrategy] = None, checkpoint_dir: Optional[str] = None) -> None:
        super().__init__(avg_strategy or AveragingStrategy.from_config(), checkpoint_dir)

    def epoch_weights(self) -> Mapping[str, mx.nd.NDArray]:
        return {name: device_copies(name, parameter)[0] for name, parameter in self._parameters}

    def finish_training(self) -> None:
        if self._checkpoints.records:
            self.assign_checkpoint_average(fallback="its last raw weights")


@AveragingCallback.register("exponential")
class ExponentialAveragingCallback(AveragingCallback):
    """EMA of the weights, updated after every optimiser step.

    After the k-th step it calls ``apply(num_updates=k)`` (warm-up
    ``min(decay, (numerator + k) / (denominator + k))``); validation runs
    with the averages swapped in; each epoch's average is saved. At the end
    the network holds the final EMA, or with ``avg_strategy`` the strategy's
    average of the saved per-epoch EMAs.

    Parameters
    ----------
    decay, numerator, denominator
        As in :class:`~modavg_plugin.ExponentialMovingAverage`.
    avg_strategy
        Optional: average the best per-epoch EMAs at the end.
    checkpoint_dir
        Folder for the checkpoints; ``None``: a temporary one.
    shadow_context
        Where the shadows live, as text (``"cpu"``, ``"gpu(1)"``); ``None``:
        the context the network trains on.
    """

    @validated()
    def __init__(
        self,
        decay: float = 0.9999,
        numerator: float = 1.0,
        denominator: float = 10.0,
        avg_strategy: Optional[AveragingStrategy] = None,
        checkpoint_dir: Optional[str] = None,
        shadow_context: Optional[str] = None,
    ) -> None:
        check_exponential_arguments(decay, numerator, denominator)
        as_context(shadow_context)  # refuse a bad value now, not at the first epoch
        super().__init__(avg_strategy, checkpoint_dir)
        self.decay = decay
        self.numerator = numerator
        self.denominator = denominator
        self.shadow_context = shadow_context
        self.moving_average: Optional[ExponentialMovingAverage] = None
        self.num_updates = 0

    def on_train_start(self, max_epochs: int = 0, **kwargs: Any) -> None:
        super().on_train_start(max_epochs, **kwargs)
        self.moving_average = None
        self.num_updates = 0

    def on_network_initializing_end(self, training_network: mx.gluon.HybridBlock, **kwargs: Any) -> None:
        """Shadows start from the freshly initialised weights."""
        super().on_network_initializing_end(training_network, **kwargs)
        self._start_moving_average()

    def _start_moving_average(self) -> None:
        self.moving_average = ExponentialMovingAverage(
            self._parameters,
            decay=self.decay,
            numerator=self.numerator,
            denominator=self.denominator,
            shadow_context=self.shadow_context,
        )

    def on_train_epoch_start(self, training_network: mx.gluon.HybridBlock, **kwargs: Any) -> None:
        """Train from the raw weights; before the first step, re-read them.

        Re-reading catches callbacks listed after this one that change the
        initial weights in ``on_network_initializing_end`` (e.g. ``WarmStart``).
        """
        self.moving_average.restore()
        if self.num_updates == 0:
            self._start_moving_average()

    def on_train_batch_end(self, training_network: mx.gluon.HybridBlock, **kwargs: Any) -> bool:
        """One optimiser step happened (GluonTS skips this hook for NaN-loss batches)."""
        self.num_updates += 1
        self.moving_average.apply(num_updates=self.num_updates)
        return True

    def on_validation_epoch_start(self, training_network: mx.gluon.HybridBlock, **kwargs: Any) -> None:
        """Validate the averaged weights."""
        self.moving_average.assign_average_value()

    def on_validation_epoch_end(self, **kwargs: Any) -> bool:
        """Back to the raw weights for training."""
        self.moving_average.restore()
        return True

    def on_epoch_end(self, epoch_no: int, epoch_loss: float, **kwargs: Any) -> bool:
        self.moving_average.restore()
        return super().on_epoch_end(epoch_no, epoch_loss, **kwargs)

    def epoch_weights(self) -> Mapping[str, mx.nd.NDArray]:
        return self.moving_average.shadows

    def finish_training(self) -> None:
        if self.moving_average is None:
            return
        self.moving_average.restore()
        if self.avg_strategy is not None and self._checkpoints.records:
            if self.assign_checkpoint_average(fallback="the final moving average"):
                return
        self.moving_average.keep_average_value()
        logger.info("the network holds the moving average after %d updates", self.num_updates)
