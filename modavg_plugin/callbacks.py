"""GluonTS ``Trainer`` callbacks that average weights: a translation of the trainer's hooks to an :class:`~modavg_plugin.AveragingRun`.

``AveragingCallback`` subclasses GluonTS's ``ModelAveraging`` on purpose:
``Trainer(add_default_callbacks=True)`` (the default) appends its own
``ModelAveraging(SelectNBestMean(num_models=1))`` unless a ``ModelAveraging``
is already in the list, and that one would reload the best *raw* epoch over
our result at the end of training. Every hook is our own; nothing of
``ModelAveraging``'s behaviour is inherited. The registered subclasses only
give GluonTS's serde their ``@validated`` signatures.

Hooks take ``**kwargs``: GluonTS has renamed hook arguments between versions.
"""

import logging
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import mxnet as mx
from gluonts.core.component import validated
from gluonts.mx.trainer.model_averaging import AveragingStrategy as GluonTSStrategy
from gluonts.mx.trainer.model_averaging import ModelAveraging
from gluonts.mx.trainer.model_iteration_averaging import NTA, Alpha_Suffix, IterationAveragingStrategy

from .averages import MovingAverage, check_exponential_arguments
from .batchnorm import update_bn
from .gluon import AveragedValidation, TrainingInputs, element_losses, network_parameters
from .parameters import write_into_parameters
from .registry import ConfigurationError, Registrable
from .run import AveragingRun
from .run_views import RunViews
from .strategies import AveragingStrategy

__all__ = [
    "AutoAveragingCallback",
    "AveragingCallback",
    "CheckpointAveragingCallback",
    "ExponentialAveragingCallback",
    "IterationAveragingCallback",
    "MovingAverageCallback",
]

logger = logging.getLogger(__name__)

Strategy = Optional[Union[AveragingStrategy, GluonTSStrategy]]
"""Ours, or GluonTS's own ``SelectNBestMean`` / ``SelectNBestSoftmax`` (with their settings)."""


class AveragingCallback(RunViews, Registrable, ModelAveraging):
    """Base of the averaging callbacks: the GluonTS trainer's hooks, translated to an :class:`~modavg_plugin.AveragingRun`.

    Each epoch's weights (the averages, or the raw weights without a moving
    average) are saved with an epoch-info record (``params_path``,
    ``epoch_no``, ``score``: the validation loss when validation data is
    given, else the training loss); at the end the network holds the final
    average, or the strategy's average of the kept checkpoints. One ``INFO``
    line per epoch on the ``modavg_plugin.run`` logger says what was
    measured; :attr:`~modavg_plugin.run_views.RunViews.history` keeps the same numbers per epoch (``epoch_no``,
    ``training_loss``, and with validation data ``validation_loss``, of the
    weights validation ran with, and ``raw_validation_loss``).
    """

    default_implementation = "exponential"

    def __init__(
        self,
        average: Optional[Dict[str, Any]],
        avg_strategy: Strategy = None,
        checkpoint_dir: Optional[str] = None,
        resume: bool = False,
        shadow_context: Optional[str] = None,
        compare_raw: bool = False,
        trigger: Optional[Dict[str, Any]] = None,
        posthoc: Optional[Dict[str, Any]] = None,
        update_bn: Optional[int] = None,
    ) -> None:
        self._run_options = dict(
            average=average, avg_strategy=avg_strategy, checkpoint_dir=checkpoint_dir, resume=resume,
            trigger=trigger, posthoc=posthoc, shadow_context=shadow_context, metric_names=(), update_bn=update_bn,
        )  # fmt: skip
        self.run = AveragingRun(**self._run_options)  # checks the configuration now, not at the first epoch
        self.avg_strategy = self.run.strategy
        self.checkpoint_dir = checkpoint_dir
        self.resume = resume
        self._validation = AveragedValidation(
            lambda: self.run.swap_average(),
            lambda: self.run.swap_raw(),
            measure_raw=compare_raw and average is not None,
            keep_inputs=self.run.auto is not None
            or (self.run.strategy is not None and self.run.strategy.needs_evaluation),
        )
        self._training_inputs = TrainingInputs(self.run.update_bn or 0)  # the last batches, for update_bn
        self._notes: Dict[str, float] = {}
        self._max_epochs = 0
        self._network: Optional[weakref.ref] = None

    # Hooks ------------------------------------------------------------------

    def on_train_start(self, max_epochs: int = 0, **kwargs: Any) -> None:
        """Start a run afresh: forget the checkpoints, history and averages of an earlier one."""
        self.run.checkpoints.close()
        self.run = AveragingRun(**self._run_options)
        self._max_epochs = int(max_epochs)
        self._notes = {}

    def on_network_initializing_end(self, training_network: mx.gluon.HybridBlock, **kwargs: Any) -> None:
        """Track the network's parameters (all of ``collect_params()``); with ``resume``, continue the saved run."""
        self._network = weakref.ref(training_network)  # a strong one would keep it, and the temporary folder, alive
        self.run.checkpoints.remove_temporary_folder_with(
            training_network
        )  # GluonTS calls no hook when training raises
        parameters = network_parameters(training_network)
        resumed = self.run.resume()
        if resumed is not None:
            write_into_parameters(resumed.raw, parameters, f"the saved state in {self.checkpoint_dir}")
        self.run.start(parameters, epochs_ahead=self._max_epochs)

    def on_train_epoch_start(self, training_network: mx.gluon.HybridBlock, **kwargs: Any) -> None:
        """Train from the raw weights; before the first step, re-read them.

        Re-reading catches callbacks listed after this one that change the
        initial weights in ``on_network_initializing_end`` (e.g. ``WarmStart``).
        """
        self.run.swap_raw()
        if self.run.num_updates == 0:
            self.run.start(network_parameters(training_network), epochs_ahead=self._max_epochs)
        if self.run.update_bn is not None:
            self._training_inputs.attach(training_network)

    def on_train_batch_end(self, training_network: mx.gluon.HybridBlock, **kwargs: Any) -> bool:
        """One optimiser step happened (GluonTS skips this hook for NaN-loss batches)."""
        self.run.step()
        return True

    def on_train_epoch_end(self, epoch_no: int, epoch_loss: float, **kwargs: Any) -> bool:
        """Note the training loss for this epoch's :attr:`~modavg_plugin.run_views.RunViews.history` entry."""
        self._training_inputs.detach()
        self._notes = {"training_loss": float(epoch_loss)}
        return True

    def on_validation_epoch_start(self, training_network: mx.gluon.HybridBlock, **kwargs: Any) -> None:
        """Validate the averages, swapped in for each forward pass (see :class:`~modavg_plugin.gluon.AveragedValidation`)."""
        self.run.swap_raw()
        self._validation.attach(training_network)

    def on_validation_epoch_end(self, epoch_no: int, epoch_loss: float, **kwargs: Any) -> bool:
        """Note the validation loss (and, with ``compare_raw``, the raw weights')."""
        self._validation.detach()
        self._notes["validation_loss"] = float(epoch_loss)
        if self._validation.measure_raw:
            self._notes["raw_validation_loss"] = self._validation.raw_loss
        return True

    def on_epoch_end(self, epoch_no: int, epoch_loss: float, **kwargs: Any) -> bool:
        """Save this epoch (``epoch_loss``, the validation loss when there is one, is its score)."""
        self.run.end_epoch(score=float(epoch_loss), notes=self._notes)
        self._notes = {}
        return True

    def on_train_end(self, training_network: Optional[mx.gluon.HybridBlock] = None, **kwargs: Any) -> None:
        """Leave the final weights in the network and remove temporary files."""
        self._validation.detach()
        self._training_inputs.detach()
        network = self._network() if self._network is not None else None
        batches, measure = list(self._validation.inputs), None
        if batches and network is not None:
            measure: Optional[Callable[[], Any]] = lambda: element_losses(network, batches)
        training = list(self._training_inputs.inputs)
        refresh = None if network is None else (lambda count: update_bn(network, training[-count:]))
        self.run.finish(measure=measure, refresh_batchnorm=refresh)


@AveragingCallback.register("checkpoints")
class CheckpointAveragingCallback(AveragingCallback):
    """No EMA: raw weights saved per epoch, the best ones averaged at the end.

    A drop-in for GluonTS's ``ModelAveraging(avg_strategy)`` (GluonTS's own
    strategy objects are accepted as they are) that keeps only the
    checkpoints the strategy can use and averages them one at a time; use it
    when a per-step EMA is not wanted.

    Parameters
    ----------
    avg_strategy
        An :class:`~modavg_plugin.AveragingStrategy` (in a config, a name or
        a dict) with ``metric="score"``, or GluonTS's ``SelectNBestMean`` /
        ``SelectNBestSoftmax`` with their settings, choosing the checkpoints
        averaged at the end; ``None``: ``SelectNBestMean(num_models=5)`` (``"mean"``).
    checkpoint_dir
        Folder for the per-epoch checkpoints, kept after training; ``None``:
        a temporary folder, removed at the end of training (also when
        training raises, once the training network is released).
    resume
        ``True``: continue from the state an earlier, stopped run saved in
        ``checkpoint_dir`` (raw weights, kept checkpoints, history).
    update_bn
        Recompute the BatchNorm running statistics of the final weights from
        the last this many training batches (PyTorch's ``update_bn``; see
        :func:`~modavg_plugin.batchnorm.update_bn`), an integer >= 1; ``None``:
        keep the averaged ones.
    """

    @validated()
    def __init__(
        self,
        avg_strategy: Strategy = None,
        checkpoint_dir: Optional[str] = None,
        resume: bool = False,
        update_bn: Optional[int] = None,
    ) -> None:
        strategy = avg_strategy or AveragingStrategy.from_config()
        super().__init__(None, strategy, checkpoint_dir, resume, update_bn=update_bn)


@AveragingCallback.register("moving_average")
class MovingAverageCallback(AveragingCallback):
    """Any registered moving average of the weights, updated after every optimiser step.

    Use it for the averages without a callback of their own, e.g.
    ``{"type": "moving_average", "average": {"type": "cumulative"}}`` for an
    equal-weight (SWA / Polyak) average of every step. After the k-th step it
    calls ``apply(num_updates=k)``; validation runs with the averages swapped
    in, one forward pass at a time; each epoch's average is saved. At the end
    the network holds the final average, or with ``avg_strategy`` the
    strategy's average of the saved per-epoch averages. With validation data
    and ``compare_raw``, each epoch's log line and :attr:`~modavg_plugin.run_views.RunViews.history` entry
    (``raw_validation_loss``) also give the raw weights' validation loss.

    Parameters
    ----------
    average
        A :class:`~modavg_plugin.MovingAverage` config without ``parameters``
        and ``shadow_context``: a dict such as ``{"type": "cumulative",
        "eta": 0}``; ``None``: ``{"type": "exponential"}``.
    avg_strategy
        An :class:`~modavg_plugin.AveragingStrategy` (in a config, a name or
        a dict) with ``metric="score"``, or GluonTS's ``SelectNBestMean`` /
        ``SelectNBestSoftmax``: end with its average of the best per-epoch
        averages; ``None``: end with the final average.
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
    resume
        ``True``: continue from the state an earlier, stopped run saved in
        ``checkpoint_dir`` after its last complete epoch: raw weights,
        averages, update count (so the warm-up goes on), kept checkpoints and
        history. Give the resumed ``Trainer`` the epochs still to run.
    trigger
        An :class:`~modavg_plugin.triggers.AveragingTrigger` config that starts
        the average at an epoch's end, e.g. ``{"type": "nta", "n": 5}`` or
        ``{"type": "alpha_suffix", "alpha": 0.25}`` (GluonTS's rules, fed the
        validation loss, else the training loss); until then the average
        follows the weights. ``None``: the average's own ``start_step``.
    posthoc
        Keep post-hoc EMA snapshots (Karras et al., 2024) in
        ``{checkpoint_dir}/posthoc``: ``{"sigma_rels": [0.05, 0.10],
        "every_epochs": 1}`` (these are the defaults of the keys) tracks one
        power-function EMA per ``sigma_rel`` and saves both every
        ``every_epochs`` epochs and at the end; ``modavg posthoc`` then
        builds the EMA of any length from them. Needs ``checkpoint_dir``.
    update_bn
        Recompute the BatchNorm running statistics of the final weights from
        the last this many training batches (PyTorch's ``update_bn``), an
        integer >= 1; ``None``: keep the averaged ones.
    """

    @validated()
    def __init__(
        self,
        average: Optional[Dict[str, Any]] = None,
        avg_strategy: Strategy = None,
        checkpoint_dir: Optional[str] = None,
        shadow_context: Optional[str] = None,
        compare_raw: bool = True,
        resume: bool = False,
        trigger: Optional[Dict[str, Any]] = None,
        posthoc: Optional[Dict[str, Any]] = None,
        update_bn: Optional[int] = None,
    ) -> None:
        self.average = {"type": MovingAverage.default_implementation, **(average or {})}
        self.shadow_context, self.compare_raw, self.trigger, self.posthoc = (
            shadow_context,
            compare_raw,
            trigger,
            posthoc,
        )
        super().__init__(
            self.average, avg_strategy, checkpoint_dir, resume, shadow_context=shadow_context,
            compare_raw=compare_raw, trigger=trigger, posthoc=posthoc, update_bn=update_bn,
        )  # fmt: skip


@AveragingCallback.register("exponential")
class ExponentialAveragingCallback(MovingAverageCallback):
    """EMA of the weights, updated after every optimiser step.

    The default callback: use it when the last iterate is noisy. A
    ``"moving_average"`` callback with an ``"exponential"`` average, with the
    EMA's arguments at the top level: after the k-th step the decay is
    ``min(decay, (numerator + k) / (denominator + k))``. The other arguments
    are those of :class:`MovingAverageCallback`; for a trigger, post-hoc
    snapshots or the options every moving average takes (``start_step``,
    ``include``, ``warmup``...), use ``"moving_average"`` with
    ``average={"type": "exponential", ...}``.

    Parameters
    ----------
    decay, numerator, denominator
        As in :class:`~modavg_plugin.ExponentialMovingAverage`.
    """

    @validated()
    def __init__(
        self,
        decay: float = 0.9999,
        numerator: float = 1.0,
        denominator: float = 10.0,
        avg_strategy: Strategy = None,
        checkpoint_dir: Optional[str] = None,
        shadow_context: Optional[str] = None,
        compare_raw: bool = True,
        resume: bool = False,
        update_bn: Optional[int] = None,
    ) -> None:
        check_exponential_arguments(decay, numerator, denominator)
        average = {"type": "exponential", "decay": decay, "numerator": numerator, "denominator": denominator}
        super().__init__(
            average, avg_strategy, checkpoint_dir, shadow_context, compare_raw, resume, update_bn=update_bn
        )
        self.decay, self.numerator, self.denominator = decay, numerator, denominator


@AveragingCallback.register("iteration_averaging")
class IterationAveragingCallback(MovingAverageCallback):
    """GluonTS's ``ModelIterationAveraging``, one line to change: ``avg_strategy=NTA(...)`` or ``Alpha_Suffix(...)``.

    Use it to replace ``ModelIterationAveraging(avg_strategy=NTA(epochs=E,
    n=5))`` by ``IterationAveragingCallback(avg_strategy=NTA(epochs=E, n=5))``
    (or the same with ``Alpha_Suffix``): a ``"moving_average"`` callback with
    a ``"cumulative"`` average of the strategy's ``eta``, started by the
    matching trigger (``"nta"`` with ``n``, ``maximize``, ``last_n_trigger``
    and ``fallback_alpha``; ``"alpha_suffix"`` with ``alpha``). Differences:
    the rules count the trainer's epochs (GluonTS's ``epochs`` argument is
    not needed; a warning says when it differs); averaging starts with the
    step after the epoch that triggers it, where GluonTS also averages that
    epoch's last weights and then counts each epoch's last weights twice.

    Parameters
    ----------
    avg_strategy
        GluonTS's ``NTA`` or ``Alpha_Suffix`` object; ``None``: give ``trigger``.
    trigger
        Instead of ``avg_strategy``: an :class:`~modavg_plugin.AveragingTrigger`
        config such as ``{"type": "nta", "n": 5}``.
    eta
        The averaging's polynomial decay (GluonTS's ``eta``), a finite number
        >= 0; ``None``: the strategy's, else 0 (an equal-weight mean).
    """

    @validated()
    def __init__(
        self,
        avg_strategy: Optional[IterationAveragingStrategy] = None,
        trigger: Optional[Dict[str, Any]] = None,
        eta: Optional[float] = None,
        checkpoint_dir: Optional[str] = None,
        compare_raw: bool = True,
        resume: bool = False,
        update_bn: Optional[int] = None,
    ) -> None:
        trigger, strategy_eta, self._strategy_epochs = iteration_averaging_rule(avg_strategy, trigger)
        eta = strategy_eta if eta is None else eta
        super().__init__(
            {"type": "cumulative", "eta": eta}, None, checkpoint_dir, None, compare_raw, resume, trigger,
            update_bn=update_bn,
        )  # fmt: skip

    def on_train_start(self, max_epochs: int = 0, **kwargs: Any) -> None:
        if self._strategy_epochs is not None and self._strategy_epochs != int(max_epochs):
            logger.warning(
                "avg_strategy was built for epochs=%d, the trainer runs %d: the rule counts the trainer's epochs",
                self._strategy_epochs, int(max_epochs),
            )  # fmt: skip
        super().on_train_start(max_epochs, **kwargs)


def iteration_averaging_rule(
    avg_strategy: Optional[IterationAveragingStrategy], trigger: Optional[Dict[str, Any]]
) -> Tuple[Dict[str, Any], float, Optional[int]]:
    """GluonTS's ``NTA`` / ``Alpha_Suffix`` as our trigger config, its ``eta``, and the ``epochs`` it was built for."""
    if (avg_strategy is None) == (trigger is None):
        raise ConfigurationError("give avg_strategy (GluonTS's NTA or Alpha_Suffix) or a trigger config, not both")
    if avg_strategy is None:
        return dict(trigger), 0.0, None
    arguments = dict(avg_strategy.__init_args__)  # GluonTS's @validated keeps the constructor's arguments
    if isinstance(avg_strategy, NTA):
        keys = ("n", "maximize", "last_n_trigger", "fallback_alpha")
        rule = {"type": "nta", **{key: arguments[key] for key in keys}}
    elif isinstance(avg_strategy, Alpha_Suffix):
        rule = {"type": "alpha_suffix", "alpha": arguments["alpha"]}
    else:
        raise ConfigurationError(
            f"avg_strategy must be GluonTS's NTA or Alpha_Suffix, got {type(avg_strategy).__name__}"
        )
    return rule, float(arguments.get("eta", 0.0)), int(arguments["epochs"])


@AveragingCallback.register("auto")
class AutoAveragingCallback(AveragingCallback):
    """No averaging length to choose: the one validation prefers is picked after training.

    Use it when you do not know which averaging suits the run (most of the
    time): ``{"type": "auto"}`` and nothing else. During training it keeps
    power-function EMAs of the ``tracked`` widths (saved every epoch) and
    validates the ``validated`` one; at the end it evaluates on the last
    validation epoch's batches the raw last iterate, the EMAs of the
    ``widths`` rebuilt from the snapshots, and the mean of the
    ``best_epochs`` best per-epoch EMAs, and ships the best, or a simpler one
    within one standard error of it (see :mod:`modavg_plugin.auto`). One log
    line per candidate; :attr:`~modavg_plugin.run_views.RunViews.choice` holds the same. Without validation data
    it ships the validated EMA and says so.

    Parameters
    ----------
    widths
        The EMA widths tried (``sigma_rel``, each in [1e-6, 0.2887));
        ``None``: 0.01 to 0.25.
    tracked
        The widths kept during training to rebuild them from; ``None``:
        0.02, 0.08 and 0.2.
    validated
        The width validated every epoch (and of the per-epoch checkpoints).
    best_epochs
        How many per-epoch checkpoints the last candidate averages, an integer >= 1.
    checkpoint_dir
        Folder for the snapshots and checkpoints, kept after training;
        ``None``: a temporary folder, removed at the end of training.
    compare_raw
        As in :class:`MovingAverageCallback`.
    resume
        As in :class:`MovingAverageCallback` (the snapshots go on).
    update_bn
        As in :class:`MovingAverageCallback`.
    """

    @validated()
    def __init__(
        self,
        widths: Optional[List[float]] = None,
        tracked: Optional[List[float]] = None,
        validated: float = 0.08,
        best_epochs: int = 5,
        checkpoint_dir: Optional[str] = None,
        compare_raw: bool = True,
        resume: bool = False,
        update_bn: Optional[int] = None,
    ) -> None:
        average: Dict[str, Any] = {"type": "auto", "validated": validated, "best_epochs": best_epochs}
        average.update({key: value for key, value in (("widths", widths), ("tracked", tracked)) if value is not None})
        super().__init__(average, None, checkpoint_dir, resume, compare_raw=compare_raw, update_bn=update_bn)
