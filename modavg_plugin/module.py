"""Averaging for MXNet's symbolic ``Module.fit``, through its callback arguments.

``Module.fit`` runs, per epoch: the batches (``batch_end_callback`` after
each update), a sync of the parameters across devices, ``epoch_end_callback``,
then ``score(eval_data)`` which ends with ``eval_end_callback``. The adapter
updates the moving average after each batch, swaps the averages in at the
epoch end so that ``score`` evaluates them, and at the evaluation end saves
the epoch's averaged checkpoint (with the validation metrics) and swaps the
raw weights back. Without ``eval_data`` it saves at the epoch end and swaps
nothing.

``Module`` has no public access to its device arrays: ``get_params()``
copies every parameter to the CPU (averaging over devices) on each call. The
adapter reads the arrays the module updates in place, those of its executor
group (``module._exec_group``); :func:`module_arrays` is the one place the
plugin reaches into a host's private state.
"""

import logging
import math
import os
import tempfile
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import mxnet as mx

from .averages import MovingAverage
from .checkpoint_log import CheckpointLog
from .checkpoints import TEMPORARY_PREFIX, arrays_named, read_state_file, save_state_file, write_atomically
from .parameters import DeviceArrays, NamedParameters
from .registry import ConfigurationError
from .posthoc import (
    POSTHOC_STATE_PREFIX,
    PostHocSnapshots,
    check_no_earlier_snapshots,
    posthoc_options,
    posthoc_state,
    posthoc_state_parts,
)
from .strategies import AveragingStrategy, Evaluation
from .triggers import trigger_from_config

__all__ = ["ModuleAveraging", "broadcast_from_rank_zero", "module_arrays"]

logger = logging.getLogger("gluonts.modavg_plugin.module")

ARG_PREFIX = "arg:"
AUX_PREFIX = "aux:"
AUX_STATES = ("average", "copy")
RECORDED_SCORE = "score"
HIGHER_IS_BETTER = ("accuracy", "top_k_accuracy", "f1", "mcc", "pearsonr", "pcc")
Config = Union[None, str, Mapping[str, Any]]


def module_arrays(module: mx.mod.Module, include_aux: bool = True) -> NamedParameters:
    """``("arg:NAME", arrays)`` per parameter and ``("aux:NAME", arrays)`` per auxiliary state.

    Each entry follows the executor group's device copies (first device
    first), the arrays ``Module.fit`` updates in place.
    """
    if not (module.binded and module.params_initialized):
        raise ValueError("the module must be bound and its parameters initialised (Module.fit does both)")
    group = getattr(module, "_exec_group", None)
    if group is None or not hasattr(group, "param_arrays"):
        raise TypeError(f"{type(module).__name__} has no executor group: ModuleAveraging supports mx.mod.Module")

    def copies(kind: str, index: int) -> Callable[[], List[mx.nd.NDArray]]:
        return lambda: getattr(module._exec_group, kind)[index]

    pairs = [(ARG_PREFIX + name, DeviceArrays(copies("param_arrays", index))) for index, name in enumerate(group.param_names)]
    if include_aux:
        pairs += [
            (AUX_PREFIX + name, DeviceArrays(copies("aux_arrays", index), grad_req="null"))
            for index, name in enumerate(group.aux_names)
        ]
    return pairs


class ModuleAveraging:
    """Plugs weight averaging into ``Module.fit`` through its three callback arguments.

    Use it with MXNet's symbolic ``Module`` API (Gluon code uses a
    :class:`MovingAverage` directly, GluonTS's ``Trainer`` the callbacks).
    Each epoch's averaged weights are saved as a normal Module checkpoint
    (``{prefix}-symbol.json``, ``{prefix}-NNNN.params`` with ``arg:``/``aux:``
    names, NNNN = epochs done, as ``mx.callback.do_checkpoint`` numbers them)
    plus ``{prefix}-NNNN-epoch-info.json`` holding ``epoch_no``, every
    evaluation metric by name and ``score`` (the first metric): validation
    metrics with ``eval_data``, training metrics without. At the end
    (:meth:`finish`), the module holds ``avg_strategy``'s average of the kept
    checkpoints, else the moving average.

    Parameters
    ----------
    module
        The ``mx.mod.Module`` to train (``Module.fit`` binds and initialises it).
    average
        A :class:`MovingAverage` config: a name, or a dict such as
        ``{"type": "exponential", "decay": 0.999}``; ``None``: none (then
        ``avg_strategy`` is required and averages the raw checkpoints). The
        shadows start after the first update (``Module.fit`` has no earlier hook).
    avg_strategy
        An :class:`AveragingStrategy` or its config, whose average of the kept
        checkpoints the module ends with; its ``metric`` is ``"score"`` (the
        first evaluation metric) or an evaluation metric's name; ``None``: end
        with the moving average.
    checkpoint_prefix
        Where the checkpoints go, a folder and a file stem such as
        ``"out/model"`` (the folder is kept); ``None``: a temporary folder,
        removed by :meth:`finish`.
    aux_states
        ``"average"``: average the auxiliary states (BatchNorm running
        statistics) like the weights, from the first device; ``"copy"``: keep
        the running statistics (``Module.fit`` averages them over the devices).
    rank
        This worker's rank in a distributed job, an integer >= 0; ``None``:
        from the module's kvstore (0 unless ``dist_*``). Only rank 0 writes
        checkpoints; :meth:`finish` gives every worker rank 0's final weights.
    trigger
        An :class:`~modavg_plugin.triggers.AveragingTrigger` config that starts
        the moving average at an epoch's end (``{"type": "nta", "n": 5}``,
        ``{"type": "alpha_suffix"}``), fed ``score``; ``None``: the average's
        own ``start_step``. Needs ``num_epoch`` in :meth:`fit`.
    posthoc
        Keep post-hoc EMA snapshots in ``{checkpoint folder}/posthoc``:
        ``{"sigma_rels": [0.05, 0.10], "every_epochs": 1}`` (the defaults),
        for ``modavg posthoc``. Needs ``checkpoint_prefix``.
    resume
        ``True``: :meth:`fit` continues from the state an earlier, stopped run
        saved next to ``checkpoint_prefix`` after its last complete epoch
        (one file, ``{prefix}-averaging-state.params``: raw weights,
        optimiser state, averages, update count, kept checkpoints),
        with ``begin_epoch`` set for ``Module.fit``; start afresh when there
        is none. Needs ``checkpoint_prefix``. Not in distributed jobs: a
        ``dist_*`` kvstore keeps the optimiser state on its servers, and no
        state is saved there.
    """

    def __init__(
        self,
        module: mx.mod.Module,
        average: Config = "exponential",
        avg_strategy: Union[None, AveragingStrategy, Mapping[str, Any], str] = None,
        checkpoint_prefix: Optional[str] = None,
        aux_states: str = "average",
        rank: Optional[int] = None,
        resume: bool = False,
        trigger: Optional[Mapping[str, Any]] = None,
        posthoc: Optional[Mapping[str, Any]] = None,
    ) -> None:
        if resume and checkpoint_prefix is None:
            raise ConfigurationError("resume=True needs checkpoint_prefix: where the earlier run saved its state")
        if aux_states not in AUX_STATES:
            raise ConfigurationError(f"aux_states must be one of {list(AUX_STATES)}, got {aux_states!r}")
        if avg_strategy is not None and not isinstance(avg_strategy, AveragingStrategy):
            avg_strategy = AveragingStrategy.from_config(avg_strategy)
        if average is None and avg_strategy is None:
            raise ConfigurationError("give a moving average, an avg_strategy, or both")
        self.module = module
        self.average_config = average
        self.avg_strategy = avg_strategy
        self.aux_states = aux_states
        self.rank = rank
        self._folder, self._stem = _split_prefix(checkpoint_prefix)
        self._checkpoints = CheckpointLog(avg_strategy, self._folder)
        self.moving_average: Optional[MovingAverage] = None
        self.num_updates = 0
        self._with_validation: Optional[bool] = None
        self._raw_arrays: Dict[str, mx.nd.NDArray] = {}
        self._training_metric: Optional[mx.metric.EvalMetric] = None
        self.resume = resume
        self._resumed_state: Optional[Dict[str, Any]] = None
        self.trigger = trigger
        average_options = dict(average) if isinstance(average, Mapping) else {}
        self._trigger = trigger_from_config(trigger, average_options)
        if trigger is not None and average is None:
            raise ConfigurationError("a trigger starts a moving average: give average too")
        self._posthoc_options = posthoc_options(posthoc, self._folder if checkpoint_prefix is not None else None)
        self.posthoc_snapshots: Optional[PostHocSnapshots] = None
        self._num_epoch: Optional[int] = None
        self._eval_data: Optional[mx.io.DataIter] = None
        self._validation_metric: Any = None

    # Wiring -------------------------------------------------------------------

    def callbacks(self) -> Dict[str, Callable[..., None]]:
        """``batch_end_callback``, ``epoch_end_callback`` and ``eval_end_callback`` for ``Module.fit``.

        Put them last in each list. Call :meth:`finish` after ``fit``.
        """
        return {
            "batch_end_callback": self.on_batch_end,
            "epoch_end_callback": self.on_epoch_end,
            "eval_end_callback": self.on_eval_end,
        }

    def fit(self, train_data: mx.io.DataIter, eval_data: Optional[mx.io.DataIter] = None, **fit_arguments: Any) -> None:
        """``module.fit`` with the averaging callbacks after the caller's, then :meth:`finish`.

        Ctrl-C (``KeyboardInterrupt``) is a deliberate stop: :meth:`finish`
        runs, so the module holds the average of what was done, then the
        interrupt goes on. Any other exception calls :meth:`abandon`: the
        module keeps (or gets back) its raw weights, the saved checkpoints
        stay, and the exception goes on.
        """
        for argument, callback in self.callbacks().items():
            fit_arguments[argument] = _as_list(fit_arguments.get(argument)) + [callback]
        self._with_validation = eval_data is not None
        self._eval_data = eval_data
        self._validation_metric = fit_arguments.get("validation_metric") or fit_arguments.get("eval_metric", "acc")
        self._num_epoch = fit_arguments.get("num_epoch")
        if self._trigger is not None and self._num_epoch is None:
            raise ConfigurationError("a trigger needs fit(..., num_epoch=N): its rules count in epochs")
        resuming = self.resume and os.path.isfile(self._state_path())
        if self._posthoc_options is not None and not resuming:
            check_no_earlier_snapshots(self._posthoc_options["folder"])
        if resuming:
            fit_arguments["begin_epoch"] = self._load_state(train_data, fit_arguments)
        try:
            with warnings.catch_warnings():
                if resuming:  # Module.fit's own init_params finds the resumed weights: expected, not news
                    warnings.filterwarnings("ignore", message="Parameters already initialized", category=UserWarning)
                self.module.fit(train_data, eval_data=eval_data, **fit_arguments)
        except KeyboardInterrupt:
            self.finish()
            raise
        except BaseException:
            self.abandon()
            raise
        self.finish()

    # Callbacks ----------------------------------------------------------------

    def on_batch_end(self, params: mx.model.BatchEndParam) -> None:
        """One update happened: move the average (starting it after the first)."""
        if self._with_validation is None and params.locals is not None:
            self._with_validation = params.locals.get("eval_data") is not None
        self._training_metric = params.eval_metric
        if self.average_config is None:
            return
        self.num_updates += 1
        if self.moving_average is None:
            self._start_averaging()
        self.moving_average.apply(num_updates=self.num_updates)  # the first: the shadows stay these weights
        if self.posthoc_snapshots is not None:
            self.posthoc_snapshots.apply()

    def _start_averaging(self) -> None:
        parameters = module_arrays(self.module, include_aux=self.aux_states == "average")
        config = {"type": self.average_config} if isinstance(self.average_config, str) else dict(self.average_config)
        if self._trigger is not None:
            config["start_step"] = None  # the trigger starts it
        self.moving_average = MovingAverage.from_config(config, parameters=parameters)
        if self._posthoc_options is not None:
            self.posthoc_snapshots = PostHocSnapshots(parameters, self._posthoc_options["folder"], self._posthoc_options["sigma_rels"])
        if self._resumed_state is not None:
            self.moving_average.load_state_dict(self._resumed_state)
            if self.posthoc_snapshots is not None and "posthoc" in self._resumed_state:
                self.posthoc_snapshots.load_state_dict(self._resumed_state["posthoc"])
            if self._trigger is not None:
                self._trigger.load_state_dict(self._resumed_state.get("trigger", {}))
            self._resumed_state = None

    def on_epoch_end(self, epoch: int, symbol: mx.sym.Symbol, arg_params: Mapping, aux_params: Mapping) -> None:
        """Swap the averages in for ``score``; without validation, save the epoch now."""
        self._raw_arrays = checkpoint_names(arg_params, aux_params)
        if self._with_validation:
            if self.moving_average is not None:
                self.moving_average.assign_average_value()
        else:
            self._save(epoch, self._training_metric)

    def on_eval_end(self, params: mx.model.BatchEndParam) -> None:
        """Save the epoch with its validation metrics; back to the raw weights."""
        try:
            self._save(params.epoch, params.eval_metric)
        finally:
            if self.moving_average is not None:
                self.moving_average.restore()

    # Checkpoints and the end ------------------------------------------------

    def _save(self, epoch: int, metric: Optional[mx.metric.EvalMetric]) -> None:
        metrics = _metric_values(metric)
        self._check_strategy_metric(metrics)
        self._consult_trigger(int(epoch) + 1, metrics)
        self._checkpoints.writer = self._rank() == 0
        if not self._checkpoints.writer:
            return
        folder = self._checkpoints.open()
        if not self._checkpoints.records:
            symbol_path = os.path.join(folder, f"{self._stem}-symbol.json")
            write_atomically(symbol_path, self.module.symbol.save)
        epoch_no = int(epoch) + 1
        path = self._checkpoints.save(f"{self._stem}-{epoch_no:04d}", epoch_no, metrics, self._epoch_arrays())
        logger.info("epoch %d: saved %s (%s)", epoch_no, path, _describe(metrics))
        if self._folder is not None and self._distributed_kvstore() is None:
            self._save_state(epochs_done=epoch_no)  # a dist kvstore keeps the optimiser state on its servers
        if self._posthoc_options is not None and epoch_no % self._posthoc_options["every_epochs"] == 0:
            self._save_posthoc_snapshots()

    def _consult_trigger(self, epochs_done: int, metrics: Mapping[str, float]) -> None:
        """Start the moving average when the trigger says so (fed ``score``)."""
        if self._trigger is None or self.moving_average is None:
            return
        if self._trigger.start_if_due(self.moving_average, epochs_done, metrics.get(RECORDED_SCORE, math.nan), int(self._num_epoch)):
            logger.info("epoch %d: the trigger starts the moving average after update %d", epochs_done, self.num_updates)

    def _save_posthoc_snapshots(self) -> None:
        if self.posthoc_snapshots is not None and self._rank() == 0:
            self.posthoc_snapshots.save_new()

    # Resuming -----------------------------------------------------------------

    def _state_path(self) -> str:
        return os.path.join(str(self._folder), f"{self._stem}-averaging-state.params")

    def _save_state(self, epochs_done: int) -> None:
        """What :meth:`fit` with ``resume`` needs, next to the checkpoints (atomically; a failure is logged)."""
        state = {"format": 1, "epochs_done": epochs_done, "num_updates": self.num_updates, "records": self._checkpoints.state()}
        arrays = {f"raw:{name}": value for name, value in self._raw_arrays.items()}
        if self.moving_average is not None:
            state.update(self.moving_average.counters())
            arrays.update({f"average:{name}": value for name, value in self.moving_average.shadows.items()})
        if self._trigger is not None:
            state["trigger"] = self._trigger.state_dict()
        if self.posthoc_snapshots is not None:
            state["posthoc"], posthoc_arrays = posthoc_state_parts(self.posthoc_snapshots)
            arrays.update({POSTHOC_STATE_PREFIX + name: value for name, value in posthoc_arrays.items()})
        optimizer = getattr(self.module, "_optimizer", None)  # no public accessor
        if optimizer is not None:
            state["optimizer_update_counts"] = _update_counts(optimizer)
        try:
            save_state_file(self._state_path(), state, arrays, blobs={"optimizer": self._optimizer_states()})
        except OSError as error:
            logger.warning("could not save the averaging state next to %s (%s); a resume would start earlier", self._stem, error)

    def _optimizer_states(self) -> bytes:
        """``Module.save_optimizer_states``, which writes only to a file, as bytes."""
        handle, path = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, dir=self._folder)
        os.close(handle)
        try:
            self.module.save_optimizer_states(path)
            with open(path, "rb") as file:
                return file.read()
        finally:
            os.remove(path)

    def _load_optimizer_states(self, data: bytes) -> None:
        handle, path = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, dir=self._folder)
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            self.module.load_optimizer_states(path)
        finally:
            os.remove(path)

    def _load_state(self, train_data: mx.io.DataIter, fit_arguments: Mapping[str, Any]) -> int:
        """Bind and initialise the module from the saved state, as ``Module.fit`` would; the epoch to begin with."""
        state, arrays, blobs = read_state_file(self._state_path())
        self.module.bind(data_shapes=train_data.provide_data, label_shapes=train_data.provide_label, for_training=True)
        self.module.init_params(
            arg_params=arrays_named(arrays, f"raw:{ARG_PREFIX}"),
            aux_params=arrays_named(arrays, f"raw:{AUX_PREFIX}"),
            force_init=True,
        )
        self.module.init_optimizer(
            kvstore=fit_arguments.get("kvstore", "local"),
            optimizer=fit_arguments.get("optimizer", "sgd"),
            optimizer_params=fit_arguments.get("optimizer_params", (("learning_rate", 0.01),)),
        )
        self._load_optimizer_states(blobs["optimizer"])
        if "optimizer_update_counts" in state:
            _restore_update_counts(self.module._optimizer, state["optimizer_update_counts"])
        self._checkpoints.restore(state["records"])
        self.num_updates = int(state["num_updates"])
        if "num_applied" in state:
            self._resumed_state = {**state, "shadows": arrays_named(arrays, "average:")}
            if "posthoc" in state:
                self._resumed_state["posthoc"] = posthoc_state(state["posthoc"], arrays_named(arrays, POSTHOC_STATE_PREFIX))
        logger.info("resuming after epoch %d from %s", state["epochs_done"], self._state_path())
        return int(state["epochs_done"])

    def _epoch_arrays(self) -> Dict[str, mx.nd.NDArray]:
        arrays = dict(self._raw_arrays)
        if self.moving_average is not None:
            arrays.update(self.moving_average.shadows)
        return arrays

    def _check_strategy_metric(self, metrics: Mapping[str, float]) -> None:
        if self.avg_strategy is None or self._checkpoints.records:
            return
        name = self.avg_strategy.metric
        if name not in metrics:
            raise ConfigurationError(
                f"avg_strategy.metric is {name!r}, but the evaluation records only {sorted(metrics)}"
            )
        measured = next(iter(metrics)) if name == RECORDED_SCORE else name
        if measured.startswith(HIGHER_IS_BETTER) and not self.avg_strategy.maximize:
            logger.warning(
                "avg_strategy ranks %r (= %s) lowest first; %s is better when higher: pass maximize=True",
                name, measured, measured,
            )  # fmt: skip

    def finish(self) -> None:
        """Leave the final weights in the module: the strategy's average, else the moving average.

        In a distributed job every worker then receives rank 0's final weights.
        """
        try:
            self._assign_final_weights()
            kvstore = self._distributed_kvstore()
            if kvstore is not None:
                final = checkpoint_names(*self.module.get_params())
                self._set_module_arrays(broadcast_from_rank_zero(kvstore, final))
        finally:
            self._checkpoints.close()

    def abandon(self) -> None:
        """After a failure: the raw weights back in the module (if the averages were in).

        Checkpoints under a given ``checkpoint_prefix`` stay; a temporary folder is removed.
        """
        try:
            if self.moving_average is not None and self.moving_average.is_assigned:
                self.moving_average.restore()
            kept = f"; its checkpoints stay in {self._folder}" if self._folder and self._checkpoints.records else ""
            logger.warning("training failed: the module keeps its raw weights%s", kept)
        finally:
            self._checkpoints.close()

    def _assign_final_weights(self) -> None:
        if self.moving_average is not None:
            self.moving_average.restore()
        self._save_posthoc_snapshots()
        if self.avg_strategy is not None and self._checkpoints.records:
            fallback = "the moving average" if self.moving_average is not None else "its last raw weights"
            if self._checkpoints.assign_average(self._set_module_arrays, fallback, self._evaluation):
                return
        if self.moving_average is not None:
            self._set_module_arrays(self.moving_average.shadows)
            logger.info("the module holds the moving average after %d updates", self.num_updates)

    def _evaluation(self) -> Optional[Evaluation]:
        """``Module.score`` on ``eval_data`` of candidate weights (the module's weights put back after each); ``None`` without ``eval_data``."""
        if self._eval_data is None:
            return None
        kept = {name: value.copy() for name, value in checkpoint_names(*self.module.get_params()).items()}
        metric_name = self.avg_strategy.metric

        def evaluate(arrays: Mapping[str, mx.nd.NDArray]) -> float:
            self._set_module_arrays(arrays)
            try:
                values = _metric_values(self._scored(self._eval_data))
            finally:
                self._set_module_arrays(kept)
            return values.get(metric_name, math.nan)

        return evaluate

    def _scored(self, data: mx.io.DataIter) -> mx.metric.EvalMetric:
        metric = self._validation_metric
        metric = metric if isinstance(metric, mx.metric.EvalMetric) else mx.metric.create(metric)
        self.module.score(data, metric, reset=True)
        return metric

    def _distributed_kvstore(self) -> Optional[mx.kvstore.KVStore]:
        kvstore = getattr(self.module, "_kvstore", None)  # set by Module.init_optimizer; no public accessor
        return kvstore if kvstore is not None and "dist" in kvstore.type else None

    def _rank(self) -> int:
        if self.rank is None:
            kvstore = self._distributed_kvstore()
            self.rank = kvstore.rank if kvstore is not None else 0
        return self.rank

    def _set_module_arrays(self, arrays: Mapping[str, mx.nd.NDArray]) -> None:
        """Write ``arg:``/``aux:`` arrays into the module (all devices), checking every name and shape first."""
        arg_params, aux_params = self.module.get_params()
        new_arg = _replaced(arg_params, arrays, ARG_PREFIX)
        new_aux = _replaced(aux_params, arrays, AUX_PREFIX)
        unknown = sorted(set(arrays) - set(checkpoint_names(arg_params, aux_params)))
        if unknown:
            raise KeyError(f"the averaged weights have {unknown[0]!r}, which the module does not have")
        self.module.set_params(new_arg, new_aux)


def checkpoint_names(arg_params: Mapping[str, mx.nd.NDArray], aux_params: Mapping[str, mx.nd.NDArray]) -> Dict:
    """One mapping with Module checkpoint names: ``arg:NAME`` and ``aux:NAME``."""
    named = {ARG_PREFIX + name: value for name, value in arg_params.items()}
    named.update({AUX_PREFIX + name: value for name, value in aux_params.items()})
    return named


def broadcast_from_rank_zero(kvstore: mx.kvstore.KVStore, arrays: Mapping[str, mx.nd.NDArray]) -> Dict[str, mx.nd.NDArray]:
    """Rank 0's ``arrays`` on every worker (a collective: every worker calls it with the same names).

    Uses ``KVStore.broadcast`` (init from rank 0, then pull) under keys of
    their own, ``modavg-final:NAME``: string keys, like ``Module``'s.
    """
    names = sorted(arrays)
    received = {name: arrays[name].copy() for name in names}
    keys = [f"modavg-final:{name}" for name in names]
    kvstore.broadcast(keys, [arrays[name] for name in names], out=[received[name] for name in names])
    mx.nd.waitall()
    return received


def _split_prefix(checkpoint_prefix: Optional[str]) -> Tuple[Optional[str], str]:
    if checkpoint_prefix is None:
        return None, "model"
    folder, stem = os.path.split(os.path.abspath(checkpoint_prefix))
    if not stem:
        raise ConfigurationError(f"checkpoint_prefix {checkpoint_prefix!r} names a folder; add a file stem like 'model'")
    return folder, stem


def _replaced(current: Mapping[str, mx.nd.NDArray], arrays: Mapping[str, mx.nd.NDArray], prefix: str) -> Dict:
    """``current`` with the values ``arrays`` has for it (names prefixed), shapes checked."""
    replaced = {}
    for name, value in current.items():
        new = arrays.get(prefix + name, value)
        if tuple(new.shape) != tuple(value.shape):
            raise ValueError(f"{prefix}{name} has shape {tuple(new.shape)}, the module expects {tuple(value.shape)}")
        replaced[name] = new
    return replaced


def _metric_values(metric: Optional[mx.metric.EvalMetric]) -> Dict[str, float]:
    """``score`` (the first metric) and every metric by name."""
    if metric is None:
        return {}
    values = {str(name): float(value) for name, value in metric.get_name_value()}
    return {**values, RECORDED_SCORE: next(iter(values.values()))} if values else {}


def _describe(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {value:.6g}" for name, value in metrics.items())


def _as_list(callbacks: Any) -> List[Callable]:
    if callbacks is None:
        return []
    return list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]


def _update_counts(optimizer: mx.optimizer.Optimizer) -> Dict[str, Any]:
    """The optimiser's step counters, which ``Module.save_optimizer_states`` leaves out.

    Adam's bias correction and learning-rate schedules read them: without
    them a resumed Adam run restarts its bias correction and drifts away.
    """
    counts = {
        str(device): {str(index): int(count) for index, count in by_index.items()}
        for device, by_index in optimizer._all_index_update_counts.items()
    }
    return {"num_update": int(optimizer.num_update), "index_update_counts": counts}


def _restore_update_counts(optimizer: mx.optimizer.Optimizer, saved: Mapping[str, Any]) -> None:
    optimizer.num_update = int(saved["num_update"])
    optimizer._all_index_update_counts = {
        int(device): {int(index): int(count) for index, count in by_index.items()}
        for device, by_index in saved["index_update_counts"].items()
    }
    optimizer._index_update_count = optimizer._all_index_update_counts.setdefault(0, {})
