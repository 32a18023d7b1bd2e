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
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

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


class RawValidationLoss:
    """The validation loss the raw weights would have had, measured alongside.

    While attached to a network, every forward pass of that network (the
    trainer's validation batches, run with the averages swapped in) is
    followed by a second pass on the same inputs with the raw weights, which
    ``swap_raw`` puts in and ``swap_average`` takes out again. The loss is
    summarised as GluonTS's trainer does: the first output (or the only
    one), averaged over all its elements; batches whose averaged loss is not
    finite are skipped, as the trainer skips them.

    Parameters
    ----------
    swap_raw, swap_average
        Put the raw weights in the network, and the averages back.
    """

    def __init__(self, swap_raw: Callable[[], None], swap_average: Callable[[], None]) -> None:
        self._swap_raw = swap_raw
        self._swap_average = swap_average
        self._hook: Optional[Any] = None
        self._inside_raw_pass = False
        self._total = 0.0
        self._count = 0

    def attach(self, network: mx.gluon.Block) -> None:
        """Start measuring (forgetting any earlier measurement) on ``network``."""
        self.detach()
        self._total, self._count = 0.0, 0
        self._hook = network.register_forward_hook(self._after_forward)

    def detach(self) -> None:
        """Stop measuring; the value so far stays readable."""
        if self._hook is not None:
            self._hook.detach()
            self._hook = None

    @property
    def value(self) -> float:
        """Mean loss per element over the measured batches (NaN before any)."""
        return self._total / self._count if self._count else math.nan

    def _after_forward(self, network: mx.gluon.Block, inputs: Sequence[Any], output: Any) -> None:
        if self._inside_raw_pass or not math.isfinite(float(_loss_of(output).sum().asscalar())):
            return
        self._inside_raw_pass = True
        # Validation runs inside autograd.record(); swapping weights there is refused.
        with mx.autograd.pause():
            self._swap_raw()
            try:
                raw_loss = _loss_of(network(*inputs))
                self._total += float(raw_loss.sum().asscalar())
                self._count += raw_loss.size
            finally:
                self._swap_average()
                self._inside_raw_pass = False


def _loss_of(output: Any) -> mx.nd.NDArray:
    """The loss among a network's outputs: the first of several, as GluonTS takes it."""
    return output[0] if isinstance(output, (list, tuple)) else output


class AveragingCallback(Registrable, ModelAveraging):
    """Base of the averaging callbacks: per-epoch checkpoints and the final assignment.

    Each epoch, :meth:`epoch_weights` is saved with an epoch-info record
    (``params_path``, ``epoch_no``, ``score``: the validation loss when
    validation data is given, else the training loss). Files that
    ``avg_strategy`` can no longer select are deleted as training goes. At the
    end, the network holds :meth:`final_weights` or, with ``avg_strategy``,
    the strategy's weighted average of the kept checkpoints.

    One ``INFO`` line per epoch on the ``gluonts.modavg_plugin.callbacks``
    logger says what was measured; :attr:`history` keeps the same numbers
    per epoch (``epoch_no``, ``training_loss``, and with validation data
    ``validation_loss``, of the weights validation ran with).

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
        self.history: List[Dict[str, float]] = []

    # Hooks ------------------------------------------------------------------

    def on_train_start(self, max_epochs: int = 0, **kwargs: Any) -> None:
        """Start a run: forget the checkpoints and history of any earlier run."""
        self._checkpoints.close()
        self.history = []

    def on_network_initializing_end(self, training_network: mx.gluon.HybridBlock, **kwargs: Any) -> None:
        """Track the network's parameters (all of ``collect_params()``)."""
        self._parameters = named_parameters(training_network.collect_params().items())

    def on_train_epoch_end(self, epoch_no: int, epoch_loss: float, **kwargs: Any) -> bool:
        """Record the training loss in this epoch's :attr:`history` entry."""
        self.history_entry(epoch_no)["training_loss"] = float(epoch_loss)
        return True

    def on_validation_epoch_end(self, epoch_no: int, epoch_loss: float, **kwargs: Any) -> bool:
        """Record the validation loss in this epoch's :attr:`history` entry."""
        self.history_entry(epoch_no)["validation_loss"] = float(epoch_loss)
        return True

    def on_epoch_end(self, epoch_no: int, epoch_loss: float, **kwargs: Any) -> bool:
        """Save this epoch's weights and record; prune what cannot be selected; log the epoch."""
        epoch_no, score = int(epoch_no), float(epoch_loss)
        self._checkpoints.save(f"epoch-{epoch_no:04d}", epoch_no, {RECORDED_METRIC: score}, self.epoch_weights())
        logger.info("epoch %d: %s", epoch_no, self.describe_epoch(self.history_entry(epoch_no)))
        return True

    def on_train_end(self, training_network: Optional[mx.gluon.HybridBlock] = None, **kwargs: Any) -> None:
        """Leave the averaged weights in the network and remove temporary files."""
        try:
            self.finish_training()
        finally:
            self._checkpoints.close()

    # What subclasses decide -------------------------------------------------

    def history_entry(self, epoch_no: int) -> Dict[str, float]:
        """The :attr:`history` entry of ``epoch_no``, started if it is new."""
        if not self.history or self.history[-1]["epoch_no"] != int(epoch_no):
            self.history.append({"epoch_no": int(epoch_no)})
        return self.history[-1]

    def describe_epoch(self, entry: Mapping[str, float]) -> str:
        """One log line's worth on an epoch's :attr:`history` entry."""
        losses = [f"{kind} loss {entry[f'{kind}_loss']:.6g}" for kind in ("training", "validation") if f"{kind}_loss" in entry]
        return ", ".join(losses + [f"{len(self._checkpoints.records)} checkpoint(s) kept"])

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
    the checkpoints the strategy can use and averages them one at a time;
    use it when a per-step EMA is not wanted.

    Parameters
    ----------
    avg_strategy
        An :class:`~modavg_plugin.AveragingStrategy` (in a config, a name or
        a dict) with ``metric="score"``, choosing the checkpoints averaged at
        the end; ``None``: ``SelectNBestMean(num_models=5)`` (``"mean"``).
    checkpoint_dir
        Folder for the per-epoch checkpoints, kept after training; ``None``:
        a temporary folder, removed at the end of training.
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

    The default callback: use it when the last iterate is noisy. After the
    k-th step it calls ``apply(num_updates=k)`` (warm-up
    ``min(decay, (numerator + k) / (denominator + k))``); validation runs
    with the averages swapped in; each epoch's average is saved. At the end
    the network holds the final EMA, or with ``avg_strategy`` the strategy's
    average of the saved per-epoch EMAs. With validation data and
    ``compare_raw``, each epoch's log line and :attr:`history` entry
    (``raw_validation_loss``) also give the raw weights' validation loss.

    Parameters
    ----------
    decay, numerator, denominator
        As in :class:`~modavg_plugin.ExponentialMovingAverage`.
    avg_strategy
        An :class:`~modavg_plugin.AveragingStrategy` (in a config, a name or
        a dict) with ``metric="score"``: end with its average of the best
        per-epoch EMAs; ``None``: end with the final EMA.
    checkpoint_dir
        Folder for the per-epoch checkpoints, kept after training; ``None``:
        a temporary folder, removed at the end of training.
    shadow_context
        Where the shadows live, as text: ``"cpu"``, ``"cpu(0)"``, ``"gpu(1)"``
        (``"cpu"`` frees GPU memory at the cost of a copy per step); ``None``:
        the context the network trains on.
    compare_raw
        ``True``: with validation data, also measure the raw weights'
        validation loss (a second forward pass per validation batch, so
        validation costs about twice as much; training is unaffected).
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
        compare_raw: bool = True,
    ) -> None:
        check_exponential_arguments(decay, numerator, denominator)
        as_context(shadow_context)  # refuse a bad value now, not at the first epoch
        super().__init__(avg_strategy, checkpoint_dir)
        self.decay = decay
        self.numerator = numerator
        self.denominator = denominator
        self.shadow_context = shadow_context
        self.compare_raw = compare_raw
        self.moving_average: Optional[ExponentialMovingAverage] = None
        self.num_updates = 0
        self._raw_validation_loss = RawValidationLoss(
            swap_raw=lambda: self.moving_average.restore(),
            swap_average=lambda: self.moving_average.assign_average_value(),
        )

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
        """Validate the averaged weights (and, with ``compare_raw``, the raw ones too)."""
        self.moving_average.assign_average_value()
        if self.compare_raw:
            self._raw_validation_loss.attach(training_network)

    def on_validation_epoch_end(self, epoch_no: int, epoch_loss: float, **kwargs: Any) -> bool:
        """Record both validation losses; back to the raw weights for training."""
        self._raw_validation_loss.detach()
        self.moving_average.restore()
        super().on_validation_epoch_end(epoch_no, epoch_loss, **kwargs)
        if self.compare_raw:
            self.history_entry(epoch_no)["raw_validation_loss"] = self._raw_validation_loss.value
        return True

    def on_epoch_end(self, epoch_no: int, epoch_loss: float, **kwargs: Any) -> bool:
        self.moving_average.restore()
        return super().on_epoch_end(epoch_no, epoch_loss, **kwargs)

    def describe_epoch(self, entry: Mapping[str, float]) -> str:
        if "raw_validation_loss" not in entry:
            return f"moving average after {self.num_updates} updates; " + super().describe_epoch(entry)
        averaged, raw = entry["validation_loss"], entry["raw_validation_loss"]
        change = f" ({(averaged - raw) / abs(raw):+.1%})" if raw else ""
        return f"validation loss {averaged:.6g} with the moving average, {raw:.6g} with the raw weights{change}"

    def epoch_weights(self) -> Mapping[str, mx.nd.NDArray]:
        return self.moving_average.shadows

    def finish_training(self) -> None:
        self._raw_validation_loss.detach()
        if self.moving_average is None:
            return
        self.moving_average.restore()
        if self.avg_strategy is not None and self._checkpoints.records:
            if self.assign_checkpoint_average(fallback="the final moving average"):
                return
        self.moving_average.keep_average_value()
        logger.info("the network holds the moving average after %d updates", self.num_updates)
