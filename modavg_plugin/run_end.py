"""The end of a training run: which weights the network keeps, and what happens after a failure.

:class:`RunEnd` is the part of :class:`~modavg_plugin.AveragingRun` that
runs once training stops: the strategy's average of the kept checkpoints,
the ``"auto"`` choice among candidates evaluated on validation data, the
moving average as the fallback when either fails (or the raw weights
without one), the BatchNorm refresh of ``update_bn``, and ``abandon`` after
an exception. It reads the run's state and writes through the run's own
``_write``; it holds no state of its own.
"""

import logging
import os
from typing import Any, Callable, Dict, List, Mapping, Optional

import mxnet as mx
import numpy as np

from .auto import AutoOptions, candidate_list, choose, evaluated_candidates
from .averages import MovingAverage
from .checkpoint_log import CheckpointLog
from .snapshots import PostHocSnapshots
from .strategies import AveragingStrategy, Evaluation

__all__ = ["RunEnd"]

logger = logging.getLogger(__name__)


class RunEnd:
    """The end of an :class:`~modavg_plugin.AveragingRun`: :meth:`finish`, :meth:`abandon`, :meth:`evaluation`."""

    # what the run provides (see AveragingRun)
    strategy: Optional[AveragingStrategy]
    checkpoints: CheckpointLog
    moving_average: Optional[MovingAverage]
    posthoc_snapshots: Optional[PostHocSnapshots]
    posthoc_options: Dict[str, Any]
    auto: Optional[AutoOptions]
    choice: List[Dict[str, Any]]
    update_bn: Optional[int]
    checkpoint_dir: Optional[str]
    writer: bool
    run_id: str
    num_updates: int
    _parameters: Any
    swap_raw: Callable[[], None]
    raw_weights: Callable[[], Dict[str, mx.nd.NDArray]]
    _write: Callable[[Mapping[str, mx.nd.NDArray]], None]

    def finish(
        self, measure: Optional[Callable[[], float]] = None, refresh_batchnorm: Optional[Callable[[int], int]] = None
    ) -> None:
        """Leave the final weights in the network: the strategy's average of the checkpoints, else the moving average.

        ``measure()`` gives the validation loss (or score) of the network's
        current weights; a strategy that evaluates candidates (``"greedy"``)
        uses it, and without it keeps the best-ranked checkpoint alone (a
        warning says so). If averaging the checkpoints fails, the error is
        logged and the network keeps the moving average (or its raw
        weights). With ``update_bn``, ``refresh_batchnorm(batches)`` then
        recomputes the BatchNorm statistics of the final weights (e.g.
        :func:`~modavg_plugin.batchnorm.update_bn`) and returns how many
        batches it used. A temporary checkpoint folder is removed.
        """
        try:
            if self._parameters is None:
                return  # never started: nothing was trained
            self.swap_raw()
            if self.posthoc_snapshots is not None and self.writer:
                self.posthoc_snapshots.save_new()
            if self.auto is not None:
                self._choose_automatically(measure)
            else:
                self._assign_final_weights(measure)
            if self.update_bn is not None:
                self._refresh_batchnorm(refresh_batchnorm)
        finally:
            self.checkpoints.close()

    def _assign_final_weights(self, measure: Optional[Callable[[], float]]) -> None:
        if self.strategy is not None and self.checkpoints.records:
            if self.moving_average is None:
                raw = {name: value.copy() for name, value in self.raw_weights().items()}
                if not self._assign_checkpoint_average("its last raw weights", measure):
                    self._write(raw)  # a write that failed part of the way through must not leave a mixture
                return
            if self._assign_checkpoint_average("the final moving average", measure):
                return
        if self.moving_average is not None:
            self._write(self.moving_average.shadows)
            logger.info("the network holds the moving average after %d updates", self.num_updates)

    def _choose_automatically(self, measure: Optional[Callable[[], Any]]) -> None:
        """``"auto"``: the candidates evaluated with ``measure``, the chosen one written (see :mod:`modavg_plugin.auto`)."""
        validated = f"the power EMA of sigma_rel {self.auto.validated:g} (the average validated every epoch)"
        if measure is None or not self.writer:
            if measure is None:
                logger.warning(
                    "auto: no validation data, so no candidate can be compared: the network holds %s, not the last "
                    "iterate, whose noise nothing measured; give validation data to let auto choose", validated,
                )  # fmt: skip
            self._write(self.moving_average.shadows)
            return
        try:
            raw = {name: value.copy() for name, value in self.raw_weights().items()}
            candidates = candidate_list(
                self.auto, raw, self.posthoc_options["folder"], self.run_id, self.checkpoints.records
            )
            evaluated_candidates(candidates, self.evaluation(measure))
            chosen = choose(candidates, self.auto.maximize)
            self._write(candidates[chosen].build())
        except Exception as error:  # broad on purpose: hours of training must not be lost here
            logger.error("auto: choosing failed (%s); the network holds %s", error, validated)
            self._write(self.moving_average.shadows)
            return
        self.choice = [candidate.report(index == chosen) for index, candidate in enumerate(candidates)]
        best = candidates[chosen]
        logger.info("auto: the network holds the %s (validation loss %.6g)", best.name, best.validation_loss)

    def _refresh_batchnorm(self, refresh_batchnorm: Optional[Callable[[int], int]]) -> None:
        if refresh_batchnorm is None:
            logger.warning("update_bn is set, but this host gave no training batches: the BatchNorm statistics stay")
            return
        used = refresh_batchnorm(int(self.update_bn))
        if used:
            logger.info("the BatchNorm running statistics are recomputed for the final weights from %d batches", used)
        else:
            logger.warning("update_bn: no training batch to recompute the BatchNorm statistics from; they stay")

    def abandon(self) -> None:
        """After a failure: the raw weights back in the network; kept checkpoints stay, a temporary folder goes."""
        try:
            self.swap_raw()
            kept = (
                f"; its checkpoints stay in {self.checkpoint_dir}"
                if self.checkpoint_dir and self.checkpoints.records
                else ""
            )
            logger.warning("training failed: the network keeps its raw weights%s", kept)
        finally:
            self.checkpoints.close()

    def evaluation(self, measure: Callable[[], float]) -> Evaluation:
        """``evaluate(arrays)``: the arrays into the network, ``measure()``, the network's weights back (also on error)."""
        kept = {name: value.copy() for name, value in self.raw_weights().items()}

        def evaluate(arrays: Mapping[str, mx.nd.NDArray]) -> float:
            self._write(arrays)
            try:
                return measure()
            finally:
                self._write(kept)

        return evaluate

    def _mean_evaluation(self, measure: Callable[[], Any]) -> Evaluation:
        """:meth:`evaluation` as one number: the mean of what ``measure`` gives (a mean, or per-element losses)."""
        evaluate = self.evaluation(measure)
        return lambda arrays: float(np.mean(evaluate(arrays)))

    def _assign_checkpoint_average(self, fallback: str, measure: Optional[Callable[[], float]]) -> bool:
        """Write the strategy's average of the kept checkpoints; ``False``, with the reason logged, on failure."""
        strategy, records = self.strategy, self.checkpoints.records
        evaluate = None
        if strategy.needs_evaluation and getattr(strategy, "evaluate", None) is None:
            evaluate = self._mean_evaluation(measure) if measure is not None else None
            if evaluate is None:
                logger.warning(
                    "avg_strategy %r needs validation data to evaluate candidates, and there is none: "
                    "keeping the best-ranked checkpoint alone", strategy,
                )  # fmt: skip
                evaluate = lambda arrays: 0.0
        try:
            paths, weights = strategy.select_checkpoints(records, evaluate=evaluate)
            self._write(strategy.average(paths, weights))
        except Exception as error:  # broad on purpose: hours of training must not be lost here
            logger.error("checkpoint averaging failed, the network keeps %s: %s", fallback, error)
            return False
        summary = ", ".join(f"{os.path.basename(path)}: {weight:.3f}" for path, weight in zip(paths, weights))
        logger.info("the network holds the average of %d checkpoints (%s)", len(paths), summary)
        return True
