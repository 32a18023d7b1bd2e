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
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import mxnet as mx
from gluonts.core.component import validated
from gluonts.mx.trainer.model_averaging import ModelAveraging

from .averages import MovingAverage, check_exponential_arguments
from .checkpoint_log import CheckpointLog
from .checkpoints import arrays_named, read_state_file, save_state_file
from .parameters import NamedParameters, as_context, device_copies, named_parameters, write_into_parameters
from .registry import ConfigurationError, Registrable, constructor_parameters
from .posthoc import (
    POSTHOC_STATE_PREFIX,
    PostHocSnapshots,
    check_no_earlier_snapshots,
    posthoc_options,
    posthoc_state,
    posthoc_state_parts,
)
from .strategies import AveragingStrategy, Evaluation, needs_evaluation
from .triggers import trigger_from_config

__all__ = ["AveragingCallback", "CheckpointAveragingCallback", "ExponentialAveragingCallback", "MovingAverageCallback"]

logger = logging.getLogger("gluonts.modavg_plugin.callbacks")

RECORDED_METRIC = "score"
STATE_NAME = "averaging-state.params"
"""The file ``{checkpoint_dir}/averaging-state.params``: what a resumed run continues from."""


class AveragedValidation:
    """Validation forward passes with the averages swapped in, one pass at a time.

    While attached to a network, each forward pass of it (the trainer's
    validation batches) runs with the averages swapped in by
    ``swap_average``, and ``swap_raw`` puts the raw weights back right after
    the pass, also when it raises (the hook then detaches itself). Between
    batches, and whatever happens, the network holds its raw weights. With
    ``measure_raw``, a second pass on the same inputs measures the raw
    weights' loss, summarised as GluonTS's trainer does: the first output
    (or the only one), averaged over all its elements; batches whose
    averaged loss is not finite are skipped, as the trainer skips them.

    Parameters
    ----------
    swap_average, swap_raw
        Put the averages in the network, and the raw weights back.
    measure_raw
        Also measure the raw weights' loss (one more forward pass a batch).
    keep_inputs
        Keep the inputs of the passes since :meth:`attach` in :attr:`inputs`
        (references to the batches, no copies), for evaluating other weights
        on the same validation data later.
    """

    def __init__(
        self, swap_average: Callable[[], None], swap_raw: Callable[[], None], measure_raw: bool, keep_inputs: bool = False
    ) -> None:
        self._swap_average = swap_average
        self._swap_raw = swap_raw
        self.measure_raw = measure_raw
        self.keep_inputs = keep_inputs
        self.inputs: List[Tuple[Any, ...]] = []
        self._network: Optional[mx.gluon.Block] = None
        self._total = 0.0
        self._count = 0

    def attach(self, network: mx.gluon.Block) -> None:
        """Start on ``network`` (forgetting any earlier measurement)."""
        self.detach()
        self._total, self._count, self.inputs = 0.0, 0, []
        original_forward = network.forward

        def averaged_forward(*inputs: Any) -> Any:
            return self._averaged_pass(original_forward, inputs)

        network.forward = averaged_forward  # Block.__call__ calls self.forward: this instance attribute first
        self._network = network

    def detach(self) -> None:
        """Stop: the network's own ``forward`` again; the raw loss so far stays readable."""
        if self._network is not None and "forward" in vars(self._network):
            del self._network.forward
        self._network = None

    @property
    def raw_loss(self) -> float:
        """Mean raw loss per element over the measured batches (NaN before any)."""
        return self._total / self._count if self._count else math.nan

    def _averaged_pass(self, forward: Callable[..., Any], inputs: Sequence[Any]) -> Any:
        if self.keep_inputs:
            self.inputs.append(tuple(inputs))
        with mx.autograd.pause():  # validation runs inside autograd.record(): no swapping there
            self._swap_average()
        try:
            output = forward(*inputs)
        except BaseException:
            self.detach()
            raise
        finally:
            with mx.autograd.pause():
                self._swap_raw()
        if self.measure_raw and math.isfinite(float(_loss_of(output).sum().asscalar())):
            with mx.autograd.pause():
                raw_loss = _loss_of(forward(*inputs))
            self._total += float(raw_loss.sum().asscalar())
            self._count += raw_loss.size
        return output


def _loss_of(output: Any) -> mx.nd.NDArray:
    """The loss among a network's outputs: the first of several, as GluonTS takes it."""
    return output[0] if isinstance(output, (list, tuple)) else output


def mean_loss(network: mx.gluon.Block, batches: Sequence[Sequence[Any]]) -> float:
    """The network's mean loss per element over ``batches``, as GluonTS's trainer sums validation.

    Predict mode, no gradient; batches whose loss is not finite are skipped
    (as the trainer skips them); NaN when none is left.
    """
    total, count = 0.0, 0
    with mx.autograd.pause(train_mode=False):
        for inputs in batches:
            loss = _loss_of(network(*inputs))
            batch_total = float(loss.sum().asscalar())
            if math.isfinite(batch_total):
                total, count = total + batch_total, count + loss.size
    return total / count if count else math.nan


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
        removed at the end of training. A given folder is kept, and holds the
        callback's state after every epoch (see ``resume``).
    resume
        ``True``: continue from the state saved in ``checkpoint_dir`` by an
        earlier run that stopped (the raw weights, the averages, the update
        count, the kept checkpoints and the history); start afresh when there
        is none. Needs ``checkpoint_dir``.
    """

    default_implementation = "exponential"

    def __init__(
        self, avg_strategy: Optional[AveragingStrategy] = None, checkpoint_dir: Optional[str] = None, resume: bool = False
    ) -> None:
        if avg_strategy is not None and avg_strategy.metric != RECORDED_METRIC:
            raise ConfigurationError(
                f"avg_strategy.metric is {avg_strategy.metric!r}, but the callback records only {RECORDED_METRIC!r}"
            )
        if resume and checkpoint_dir is None:
            raise ConfigurationError("resume=True needs checkpoint_dir: the folder the earlier run saved its state in")
        self.avg_strategy = avg_strategy
        self.checkpoint_dir = checkpoint_dir
        self.resume = resume
        self._parameters: NamedParameters = []
        self._network: Optional[mx.gluon.Block] = None
        self._validation = AveragedValidation(
            self.swap_average, self.swap_raw, measure_raw=False, keep_inputs=needs_evaluation(avg_strategy)
        )
        self._checkpoints = CheckpointLog(avg_strategy, checkpoint_dir)
        self.history: List[Dict[str, float]] = []
        self.epochs_before = 0

    # Hooks ------------------------------------------------------------------

    def on_train_start(self, max_epochs: int = 0, **kwargs: Any) -> None:
        """Start a run: forget the checkpoints and history of any earlier run."""
        self._checkpoints.close()
        self.history = []
        self.epochs_before = 0

    def on_network_initializing_end(self, training_network: mx.gluon.HybridBlock, **kwargs: Any) -> None:
        """Track the network's parameters (all of ``collect_params()``), start averaging; with ``resume``, load the state."""
        self._network = training_network
        self._parameters = network_parameters(training_network)
        self.start_averaging()
        if self.resume and os.path.isfile(self._state_path()):
            self.load_state()

    def on_train_epoch_end(self, epoch_no: int, epoch_loss: float, **kwargs: Any) -> bool:
        """Record the training loss in this epoch's :attr:`history` entry."""
        self.history_entry(epoch_no)["training_loss"] = float(epoch_loss)
        return True

    def on_validation_epoch_start(self, training_network: mx.gluon.HybridBlock, **kwargs: Any) -> None:
        """Validate with :meth:`swap_average`'s weights, one forward pass at a time (see :class:`AveragedValidation`)."""
        self._validation.attach(training_network)

    def on_validation_epoch_end(self, epoch_no: int, epoch_loss: float, **kwargs: Any) -> bool:
        """Record the validation loss in this epoch's :attr:`history` entry."""
        self._validation.detach()
        self.history_entry(epoch_no)["validation_loss"] = float(epoch_loss)
        return True

    def swap_average(self) -> None:
        """Subclasses: put the weights to validate into the network (base: the raw weights stay)."""

    def swap_raw(self) -> None:
        """Subclasses: put the raw weights back after :meth:`swap_average`."""

    def on_epoch_end(self, epoch_no: int, epoch_loss: float, **kwargs: Any) -> bool:
        """Save this epoch's weights and record; prune what cannot be selected; save the state; log the epoch."""
        entry = self.history_entry(epoch_no)  # numbered on from a resumed run's epochs
        number, score = entry["epoch_no"], float(epoch_loss)
        self._checkpoints.save(f"epoch-{number:04d}", number, {RECORDED_METRIC: score}, self.epoch_weights())
        if self.checkpoint_dir is not None:
            self.save_state(epochs_done=number + 1)
        logger.info("epoch %d: %s", number, self.describe_epoch(entry))
        return True

    # Resuming ---------------------------------------------------------------

    def _state_path(self) -> str:
        return os.path.join(str(self.checkpoint_dir), STATE_NAME)

    def save_state(self, epochs_done: int) -> None:
        """Write what a resumed run needs into ``checkpoint_dir`` (atomically; a failure is logged)."""
        state = {"format": 1, "epochs_done": epochs_done, "history": self.history, "records": self._checkpoints.state()}
        state.update(self.state_counters())
        arrays = {f"raw:{name}": value for name, value in self.raw_weights().items()}
        arrays.update({f"average:{name}": value for name, value in self.state_arrays().items()})
        try:
            save_state_file(self._state_path(), state, arrays, blobs={})
        except OSError as error:
            logger.warning("could not save the callback's state in %s (%s); a resume would start earlier", self.checkpoint_dir, error)

    def load_state(self) -> None:
        """Continue from :meth:`save_state`'s files: raw weights into the network, averages, counters, records."""
        state, arrays, _ = read_state_file(self._state_path())
        write_into_parameters(arrays_named(arrays, "raw:"), self._parameters, f"the saved state in {self.checkpoint_dir}")
        self.load_state_arrays(arrays_named(arrays, "average:"), state)
        self._checkpoints.restore(state["records"])
        self.history = [dict(entry) for entry in state["history"]]
        self.epochs_before = int(state["epochs_done"])
        logger.info("resumed after epoch %d from %s", self.epochs_before - 1, self.checkpoint_dir)

    def raw_weights(self) -> Dict[str, mx.nd.NDArray]:
        """The network's current weights by (network-relative) name: the first device copies, not copies."""
        return {name: device_copies(name, parameter)[0] for name, parameter in self._parameters}

    def start_averaging(self) -> None:
        """Subclasses: start from the network's weights (called once its parameters are known)."""

    def state_counters(self) -> Dict[str, Any]:
        """Subclasses: their counters, as JSON-ready values."""
        return {}

    def state_arrays(self) -> Mapping[str, mx.nd.NDArray]:
        """Subclasses: their arrays (e.g. the averages) by parameter name."""
        return {}

    def load_state_arrays(self, arrays: Mapping[str, mx.nd.NDArray], state: Mapping[str, Any]) -> None:
        """Subclasses: take back :meth:`state_arrays` and :meth:`state_counters`."""

    def on_train_end(self, training_network: Optional[mx.gluon.HybridBlock] = None, **kwargs: Any) -> None:
        """Leave the averaged weights in the network and remove temporary files."""
        try:
            self.finish_training()
        finally:
            self._checkpoints.close()

    # What subclasses decide -------------------------------------------------

    def history_entry(self, epoch_no: int) -> Dict[str, float]:
        """The :attr:`history` entry of this run's ``epoch_no`` (counted on after a resume), started if new."""
        epoch_no = self.epochs_before + int(epoch_no)
        if not self.history or self.history[-1]["epoch_no"] != epoch_no:
            self.history.append({"epoch_no": epoch_no})
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

        return self._checkpoints.assign_average(write, fallback, self.validation_evaluation)

    def validation_evaluation(self) -> Optional[Evaluation]:
        """The evaluation a strategy such as ``"greedy"`` borrows: the loss on the last validation epoch's batches.

        ``None`` without validation data: nothing to evaluate on.
        """
        batches = list(self._validation.inputs)
        if not batches:
            return None
        kept = {name: device_copies(name, parameter)[0].copy() for name, parameter in self._parameters}

        def evaluate(arrays: Mapping[str, mx.nd.NDArray]) -> float:
            write_into_parameters(arrays, self._parameters, "a candidate average")
            try:
                return mean_loss(self._network, batches)
            finally:
                write_into_parameters(kept, self._parameters, "the weights before the evaluation")

        return evaluate


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
    resume
        ``True``: continue from the state an earlier, stopped run saved in
        ``checkpoint_dir`` (raw weights, kept checkpoints, history).
    """

    @validated()
    def __init__(
        self, avg_strategy: Optional[AveragingStrategy] = None, checkpoint_dir: Optional[str] = None, resume: bool = False
    ) -> None:
        super().__init__(avg_strategy or AveragingStrategy.from_config(), checkpoint_dir, resume)

    def epoch_weights(self) -> Mapping[str, mx.nd.NDArray]:
        return self.raw_weights()

    def finish_training(self) -> None:
        if self._checkpoints.records:
            self.assign_checkpoint_average(fallback="its last raw weights")


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
    and ``compare_raw``, each epoch's log line and :attr:`history` entry
    (``raw_validation_loss``) also give the raw weights' validation loss.

    Parameters
    ----------
    average
        A :class:`~modavg_plugin.MovingAverage` config without ``parameters``
        and ``shadow_context``: a dict such as ``{"type": "cumulative",
        "eta": 0}``; ``None``: ``{"type": "exponential"}``.
    avg_strategy
        An :class:`~modavg_plugin.AveragingStrategy` (in a config, a name or
        a dict) with ``metric="score"``: end with its average of the best
        per-epoch averages; ``None``: end with the final average.
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
    """

    @validated()
    def __init__(
        self,
        average: Optional[Dict[str, Any]] = None,
        avg_strategy: Optional[AveragingStrategy] = None,
        checkpoint_dir: Optional[str] = None,
        shadow_context: Optional[str] = None,
        compare_raw: bool = True,
        resume: bool = False,
        trigger: Optional[Dict[str, Any]] = None,
        posthoc: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.average = {"type": MovingAverage.default_implementation, **(average or {})}
        check_average_config(self.average)
        as_context(shadow_context)  # refuse a bad value now, not at the first epoch
        super().__init__(avg_strategy, checkpoint_dir, resume)
        self.shadow_context = shadow_context
        self.compare_raw = compare_raw
        self.trigger = trigger
        self.posthoc = posthoc
        self._trigger = trigger_from_config(trigger, self.average)
        self._posthoc_options = posthoc_options(posthoc, checkpoint_dir)
        self.moving_average: Optional[MovingAverage] = None
        self.posthoc_snapshots: Optional[PostHocSnapshots] = None
        self.num_updates = 0
        self.max_epochs = 0
        self._validation.measure_raw = compare_raw

    def on_train_start(self, max_epochs: int = 0, **kwargs: Any) -> None:
        super().on_train_start(max_epochs, **kwargs)
        self.moving_average = None
        self.posthoc_snapshots = None
        self.num_updates = 0
        self.max_epochs = int(max_epochs)
        self._trigger = trigger_from_config(self.trigger, self.average)

    def state_counters(self) -> Dict[str, Any]:
        counters = {"num_updates": self.num_updates, **self.moving_average.counters()}
        if self._trigger is not None:
            counters["trigger"] = self._trigger.state_dict()
        if self.posthoc_snapshots is not None:
            counters["posthoc"] = posthoc_state_parts(self.posthoc_snapshots)[0]
        return counters

    def state_arrays(self) -> Mapping[str, mx.nd.NDArray]:
        arrays = dict(self.moving_average.shadows)
        if self.posthoc_snapshots is not None:
            arrays.update({POSTHOC_STATE_PREFIX + name: value for name, value in posthoc_state_parts(self.posthoc_snapshots)[1].items()})
        return arrays

    def load_state_arrays(self, arrays: Mapping[str, mx.nd.NDArray], state: Mapping[str, Any]) -> None:
        averages = {name: value for name, value in arrays.items() if not name.startswith(POSTHOC_STATE_PREFIX)}
        self.moving_average.load_state_dict({**state, "shadows": averages})
        self.num_updates = int(state["num_updates"])
        if self._trigger is not None:
            self._trigger.load_state_dict(state.get("trigger", {}))
        if self.posthoc_snapshots is not None and "posthoc" in state:
            self.posthoc_snapshots.load_state_dict(posthoc_state(state["posthoc"], arrays_named(arrays, POSTHOC_STATE_PREFIX)))

    def start_averaging(self) -> None:
        """Shadows start from the freshly initialised weights (a resume then loads the saved averages)."""
        config = {**self.average, "shadow_context": self.shadow_context}
        if self._trigger is not None:
            config["start_step"] = None  # the trigger starts it
        self.moving_average = MovingAverage.from_config(config, parameters=self._parameters)
        if self._posthoc_options is not None:
            if not (self.resume and os.path.isfile(self._state_path())):
                check_no_earlier_snapshots(self._posthoc_options["folder"])
            self.posthoc_snapshots = PostHocSnapshots(
                self._parameters, self._posthoc_options["folder"], self._posthoc_options["sigma_rels"], self.shadow_context
            )

    def on_train_epoch_start(self, training_network: mx.gluon.HybridBlock, **kwargs: Any) -> None:
        """Train from the raw weights; before the first step, re-read them.

        Re-reading catches callbacks listed after this one that change the
        initial weights in ``on_network_initializing_end`` (e.g. ``WarmStart``).
        """
        self.moving_average.restore()
        if self.num_updates == 0:
            self.start_averaging()

    def on_train_batch_end(self, training_network: mx.gluon.HybridBlock, **kwargs: Any) -> bool:
        """One optimiser step happened (GluonTS skips this hook for NaN-loss batches)."""
        self.num_updates += 1
        self.moving_average.apply(num_updates=self.num_updates)
        if self.posthoc_snapshots is not None:
            self.posthoc_snapshots.apply()
        return True

    def on_validation_epoch_start(self, training_network: mx.gluon.HybridBlock, **kwargs: Any) -> None:
        """Validate the averaged weights, swapped in for each forward pass (and, with ``compare_raw``, the raw ones)."""
        self.moving_average.restore()
        super().on_validation_epoch_start(training_network, **kwargs)

    def swap_average(self) -> None:
        self.moving_average.assign_average_value()

    def swap_raw(self) -> None:
        self.moving_average.restore()

    def on_validation_epoch_end(self, epoch_no: int, epoch_loss: float, **kwargs: Any) -> bool:
        """Record both validation losses."""
        super().on_validation_epoch_end(epoch_no, epoch_loss, **kwargs)
        if self.compare_raw:
            self.history_entry(epoch_no)["raw_validation_loss"] = self._validation.raw_loss
        return True

    def on_epoch_end(self, epoch_no: int, epoch_loss: float, **kwargs: Any) -> bool:
        """As the base; before, a trigger may start the average; after, post-hoc snapshots may be saved."""
        self.moving_average.restore()
        epochs_done = self.history_entry(epoch_no)["epoch_no"] + 1
        max_epochs = self.epochs_before + self.max_epochs
        if self._trigger is not None and self._trigger.start_if_due(self.moving_average, epochs_done, float(epoch_loss), max_epochs):
            logger.info("epoch %d: the %s trigger starts the average after update %d", epochs_done - 1, self.trigger.get("type", "nta"), self.num_updates)
        keep_going = super().on_epoch_end(epoch_no, epoch_loss, **kwargs)
        if self.posthoc_snapshots is not None and epochs_done % self._posthoc_options["every_epochs"] == 0:
            self.posthoc_snapshots.save_new()
        return keep_going

    def describe_epoch(self, entry: Mapping[str, float]) -> str:
        if "raw_validation_loss" not in entry:
            return f"moving average after {self.num_updates} updates; " + super().describe_epoch(entry)
        averaged, raw = entry["validation_loss"], entry["raw_validation_loss"]
        change = f" ({(averaged - raw) / abs(raw):+.1%})" if raw else ""
        return f"validation loss {averaged:.6g} with the moving average, {raw:.6g} with the raw weights{change}"

    def epoch_weights(self) -> Mapping[str, mx.nd.NDArray]:
        """The averages, and the raw values of parameters left out of them (``include``, ``exclude``, ``non_trainable``)."""
        shadows = self.moving_average.shadows
        return shadows if len(shadows) == len(self._parameters) else {**self.raw_weights(), **shadows}

    def finish_training(self) -> None:
        self._validation.detach()
        if self.moving_average is None:
            return
        if self.posthoc_snapshots is not None:
            self.posthoc_snapshots.save_new()
        self.moving_average.restore()
        if self.avg_strategy is not None and self._checkpoints.records:
            if self.assign_checkpoint_average(fallback="the final moving average"):
                return
        self.moving_average.keep_average_value()
        logger.info("the network holds the moving average after %d updates", self.num_updates)


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
        avg_strategy: Optional[AveragingStrategy] = None,
        checkpoint_dir: Optional[str] = None,
        shadow_context: Optional[str] = None,
        compare_raw: bool = True,
        resume: bool = False,
    ) -> None:
        check_exponential_arguments(decay, numerator, denominator)
        average = {"type": "exponential", "decay": decay, "numerator": numerator, "denominator": denominator}
        super().__init__(average, avg_strategy, checkpoint_dir, shadow_context, compare_raw, resume)
        self.decay = decay
        self.numerator = numerator
        self.denominator = denominator


def check_average_config(config: Mapping[str, Any]) -> None:
    """Refuse an unknown average name or argument now, not at the first epoch (``ConfigurationError``)."""
    implementation = MovingAverage.by_name(str(config["type"]))
    accepted = set(constructor_parameters(implementation)) - {"parameters", "shadow_context"}
    unknown = sorted(set(config) - accepted - {"type"})
    if unknown:
        raise ConfigurationError(
            f"average: unknown key {unknown[0]!r} for {config['type']!r}; accepted: {sorted(accepted)}"
        )


def network_parameters(network: mx.gluon.Block) -> NamedParameters:
    """All of ``network.collect_params()``, named without the network's own prefix.

    Gluon numbers block prefixes per process (``...network0_``,
    ``...network1_``), so full names differ between two runs in one process;
    names relative to the network do not, and a resumed run's checkpoints
    match the earlier run's.
    """
    prefix = network.prefix
    return named_parameters(
        (name[len(prefix):] if prefix and name.startswith(prefix) else name, parameter)
        for name, parameter in network.collect_params().items()
    )
