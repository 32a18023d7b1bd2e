"""Averaging for MXNet's symbolic ``Module.fit``: its callback arguments, translated to an :class:`~modavg_plugin.AveragingRun`.

``Module.fit`` runs, per epoch: the batches (``batch_end_callback`` after
each update), a sync of the parameters across devices, ``epoch_end_callback``,
then ``score(eval_data)`` which ends with ``eval_end_callback``. The adapter
moves the averages after each batch, swaps them in at the epoch end so that
``score`` evaluates them, and at the evaluation end puts the raw weights back
and ends the epoch (checkpoint with the validation metrics, state). Without
``eval_data`` it ends the epoch at the epoch end and swaps nothing. What it
reads from and writes into the module is in :mod:`modavg_plugin.module_host`.
"""

import math
import os
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import mxnet as mx

from .checks import CheckpointError, check_choice, check_integer
from .files import write_atomically
from .module_host import (
    bind_from_arrays,
    broadcast_from_rank_zero,
    checkpoint_names,
    distributed_kvstore,
    load_optimizer_state,
    metric_values,
    module_arrays,
    optimizer_state,
    update_module_bn,
    write_module_arrays,
)
from .registry import ConfigurationError
from .run import AveragingRun
from .run_views import RunViews
from .strategies import AveragingStrategy

__all__ = ["ModuleAveraging", "broadcast_from_rank_zero", "module_arrays"]

AUX_STATES = ("average", "copy")
Config = Union[None, str, Mapping[str, Any]]


class ModuleAveraging(RunViews):
    """Plugs weight averaging into ``Module.fit`` through its three callback arguments.

    Use it with MXNet's symbolic ``Module`` API (Gluon code uses an
    :class:`~modavg_plugin.run.AveragingRun` or a :class:`~modavg_plugin.MovingAverage`
    directly, GluonTS's ``Trainer`` the callbacks). Each epoch's averaged
    weights are saved as a normal Module checkpoint (``{prefix}-symbol.json``,
    ``{prefix}-NNNN.params`` with ``arg:``/``aux:`` names, NNNN = epochs
    done, as ``mx.callback.do_checkpoint`` numbers them) plus
    ``{prefix}-NNNN-epoch-info.json`` holding ``epoch_no``, every evaluation
    metric by name and ``score`` (the first metric): validation metrics with
    ``eval_data``, training metrics without. At the end (:meth:`finish`), the
    module holds ``avg_strategy``'s average of the kept checkpoints, else the
    moving average.

    Parameters
    ----------
    module
        The ``mx.mod.Module`` to train (``Module.fit`` binds and initialises it).
    average
        A :class:`~modavg_plugin.MovingAverage` config: a name, or a dict such as
        ``{"type": "exponential", "decay": 0.999}``; ``None``: none (then
        ``avg_strategy`` is required and averages the raw checkpoints). The
        shadows start after the first update (``Module.fit`` has no earlier hook).
    avg_strategy
        An :class:`~modavg_plugin.AveragingStrategy` or its config, whose average of the kept
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
        the running statistics (``Module.fit`` averages them over the devices);
        the same as the average's ``non_trainable="exclude"``.
    rank
        This worker's rank in a distributed job, an integer >= 0; ``None``:
        from the module's kvstore (0 unless ``dist_*``). Only rank 0 writes
        checkpoints; :meth:`finish` gives every worker rank 0's final weights.
    resume
        ``True``: :meth:`fit` continues from the state an earlier, stopped run
        saved next to ``checkpoint_prefix`` after its last complete epoch
        (one file, ``{prefix}-averaging-state.params``: raw weights,
        optimiser state, averages, update count, kept checkpoints),
        with ``begin_epoch`` set for ``Module.fit``; start afresh when there
        is none. Needs ``checkpoint_prefix``. Not in distributed jobs: a
        ``dist_*`` kvstore keeps the optimiser state on its servers, and no
        state is saved there.
    trigger
        An :class:`~modavg_plugin.triggers.AveragingTrigger` config that starts
        the moving average at an epoch's end (``{"type": "nta", "n": 5}``,
        ``{"type": "alpha_suffix"}``), fed ``score``; ``None``: the average's
        own ``start_step``. Needs ``num_epoch`` in :meth:`fit`.
    posthoc
        Keep post-hoc EMA snapshots in ``{checkpoint folder}/posthoc``:
        ``{"sigma_rels": [0.05, 0.10], "every_epochs": 1}`` (the defaults),
        for ``modavg posthoc``. Needs ``checkpoint_prefix``.
    shadow_context
        Where the averages live (also the post-hoc ones), as text or an
        ``mx.Context``: ``"cpu"``, ``"gpu(1)"``; ``None``: the first device's.
    update_bn
        Recompute the BatchNorm running statistics of the final weights from
        the first this many batches of ``fit``'s training data (PyTorch's
        ``update_bn``), an integer >= 1; ``None``: keep the averaged ones.
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
        shadow_context: Union[None, str, mx.Context] = None,
        update_bn: Optional[int] = None,
    ) -> None:
        check_choice("aux_states", aux_states, AUX_STATES)
        self.rank = None if rank is None else check_integer("rank", rank, 0)
        folder, stem = _split_prefix(checkpoint_prefix)
        self.run = AveragingRun(
            _with_aux_states(average, aux_states), avg_strategy, folder, resume=resume, trigger=trigger,
            posthoc=posthoc, shadow_context=shadow_context, file_stem=stem, first_epoch_no=1,
            state_name=f"{stem}-averaging-state.params",
            update_bn=update_bn,
        )  # fmt: skip
        self.module = module
        self.avg_strategy = self.run.strategy
        self._stem = stem
        self._started = False
        self._with_validation: Optional[bool] = None
        self._training_metric: Optional[mx.metric.EvalMetric] = None
        self._eval_data: Optional[mx.io.DataIter] = None
        self._train_data: Optional[mx.io.DataIter] = None
        self._validation_metric: Any = None
        self._epochs_ahead: Optional[int] = None

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
        self._train_data = train_data
        self._validation_metric = fit_arguments.get("validation_metric") or fit_arguments.get("eval_metric", "acc")
        resumed = self.run.resume()
        if resumed is not None:
            try:
                bind_from_arrays(self.module, resumed.raw, train_data, fit_arguments)
                load_optimizer_state(self.module, resumed.extras, resumed.arrays, resumed.blobs)
            except CheckpointError as error:
                self.run.checkpoints.close()  # the folder's lock: nothing was trained
                raise CheckpointError(f"cannot resume from {self.run.state_path}: {error}") from None
            fit_arguments["begin_epoch"] = self.run.epochs_done
        num_epoch = fit_arguments.get("num_epoch")
        self._epochs_ahead = None if num_epoch is None else int(num_epoch) - int(fit_arguments.get("begin_epoch", 0))
        self.run.expect_epochs(self._epochs_ahead)
        try:
            with warnings.catch_warnings():
                if resumed is not None:  # Module.fit's own init_params finds the resumed weights: expected, not news
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
        """One update happened: move the average (tracking the module's arrays from the first one)."""
        if self._with_validation is None and params.locals is not None:
            self._with_validation = params.locals.get("eval_data") is not None
        self._training_metric = params.eval_metric
        self._start()
        self.run.step()

    def on_epoch_end(self, epoch: int, symbol: mx.sym.Symbol, arg_params: Mapping, aux_params: Mapping) -> None:
        """Swap the averages in for ``score``; without validation, end the epoch now."""
        self._start()
        if self._with_validation:
            self.run.swap_average()
        else:
            self._end_epoch(self._training_metric)

    def on_eval_end(self, params: mx.model.BatchEndParam) -> None:
        """Back to the raw weights, and end the epoch with its validation metrics."""
        self._end_epoch(params.eval_metric)

    def _start(self) -> None:
        if self._started:
            return
        kvstore = distributed_kvstore(self.module)
        self.run.writer = self._rank() == 0
        self.run.saves_state = kvstore is None  # a dist kvstore keeps the optimiser state on its servers
        self.run.start(module_arrays(self.module), write=self._write, epochs_ahead=self._epochs_ahead)
        self._started = True

    def _end_epoch(self, metric: Optional[mx.metric.EvalMetric]) -> None:
        metrics = metric_values(metric)
        if self.run.writer and not self.run.checkpoints.records:
            symbol_path = os.path.join(self.run.checkpoints.open(), f"{self._stem}-symbol.json")
            write_atomically(symbol_path, self.module.symbol.save)
        score, score_name = next(iter(metrics.values()), math.nan), next(iter(metrics), "score")
        self.run.end_epoch(
            score,
            metrics=metrics,
            state_extras=lambda: optimizer_state(self.module),
            score_name=score_name,
        )

    # The end ------------------------------------------------------------------

    def finish(self) -> None:
        """Leave the final weights in the module: the strategy's average, else the moving average.

        In a distributed job every worker then receives rank 0's final weights.
        """
        train_data = self._train_data
        refresh = None if train_data is None else (lambda count: update_module_bn(self.module, train_data, count))
        self.run.finish(measure=self._measure(), refresh_batchnorm=refresh)
        kvstore = distributed_kvstore(self.module)
        if kvstore is not None and self._started:
            final = checkpoint_names(*self.module.get_params())
            self._write(broadcast_from_rank_zero(kvstore, final))

    def abandon(self) -> None:
        """After a failure: the raw weights back in the module (if the averages were in); saved checkpoints stay."""
        self.run.abandon()

    def _measure(self) -> Optional[Callable[[], float]]:
        """``Module.score`` on ``eval_data`` with the fit's validation metric, as the strategy ranks it; ``None`` without ``eval_data``."""
        if self._eval_data is None or self.run.strategy is None:
            return None
        name = self.run.strategy.metric

        def measure() -> float:
            metric = self._validation_metric
            metric = metric if isinstance(metric, mx.metric.EvalMetric) else mx.metric.create(metric)
            self.module.score(self._eval_data, metric, reset=True)
            values = metric_values(metric)
            return next(iter(values.values()), math.nan) if name == "score" else values.get(name, math.nan)

        return measure

    def _rank(self) -> int:
        if self.rank is None:
            kvstore = distributed_kvstore(self.module)
            self.rank = kvstore.rank if kvstore is not None else 0
        return self.rank

    def _write(self, arrays: Mapping[str, mx.nd.NDArray]) -> None:
        write_module_arrays(self.module, arrays)


def _with_aux_states(average: Config, aux_states: str) -> Config:
    """``aux_states="copy"`` as the average's ``non_trainable="exclude"`` (refused next to a ``non_trainable`` of its own)."""
    if average is None or aux_states == "average":
        return average
    config = {"type": average} if isinstance(average, str) else dict(average)
    if "non_trainable" in config:
        raise ConfigurationError("give aux_states='copy' or the average's non_trainable, not both")
    return {**config, "non_trainable": "exclude"}


def _split_prefix(checkpoint_prefix: Optional[str]) -> Tuple[Optional[str], str]:
    if checkpoint_prefix is None:
        return None, "model"
    folder, stem = os.path.split(os.path.abspath(checkpoint_prefix))
    if not stem:
        raise ConfigurationError(
            f"checkpoint_prefix {checkpoint_prefix!r} names a folder; add a file stem like 'model'"
        )
    return folder, stem


def _as_list(callbacks: Any) -> List[Callable]:
    if callbacks is None:
        return []
    return list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
