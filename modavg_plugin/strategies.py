"""Checkpoint averaging strategies: which checkpoints, with which weights.

Same method names and meanings as GluonTS's ``AveragingStrategy``:
``apply(model_path)`` = read records, select, average, write. Unlike
GluonTS's, weights are computed stably (no NaN or inf for any finite
scores), non-finite scores are never selected, checkpoints are averaged one
at a time, and user errors are exceptions naming the culprit.

Metric values: any finite number (``int`` or ``float``, not ``bool``) is
ranked as it is, however large or small (a score of ``1e308`` is a legal,
very bad loss; with ``maximize=True`` it would rank first: the files are
trusted to mean what they say). NaN, infinities, integers too large for a
float, and values that are not numbers (strings, booleans, ``null``) are
never selected; :meth:`~modavg_plugin.AveragingStrategy.select_checkpoints` names such
records in one warning.

``"greedy"`` (:class:`GreedySoup`) also evaluates averages: it needs an
``evaluate`` callable, given by the caller (e.g. a validation loss), and
cannot be used where nothing can evaluate, such as ``modavg average``.
"""

import logging
import math
import numbers
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from .checks import CheckpointError, check_integer, list_some, shown_value
from .dtypes import is_floating
from .files import save_params
from .folders import read_checkpoint_records
from .params_files import load_params
from .registry import ConfigurationError, Registrable
from .weighted_sum import WeightedSum, all_finite, average_arrays, average_checkpoint_files, host_array

__all__ = [
    "AveragingStrategy",
    "Evaluation",
    "GreedySoup",
    "SelectNBestMean",
    "SelectNBestSoftmax",
    "softmax_weights",
]

logger = logging.getLogger(__name__)

AVERAGED_MODEL_NAME = "averaged_model-0000.params"

Evaluation = Callable[[Mapping[str, mx.nd.NDArray]], float]
"""``evaluate(arrays) -> score``: the score of weights given by name (e.g. a validation loss)."""


def softmax_weights(scores: Sequence[float], maximize: bool) -> np.ndarray:
    """``exp(v_i) / sum_j exp(v_j)`` with ``v = score`` (maximize) or ``-score``.

    The largest ``v`` is subtracted first, so any finite scores give finite
    weights summing to 1 (GluonTS's formula gives NaN from scores ~710 up).
    A difference that overflows (scores 1e308 apart) is ``-inf``: weight 0.
    """
    values = np.asarray(scores, dtype=np.float64) * (1.0 if maximize else -1.0)
    with np.errstate(over="ignore"):
        exponentials = np.exp(values - values.max())
    return exponentials / exponentials.sum()


class AveragingStrategy(Registrable):
    """Selects the ``num_models`` best checkpoints by ``metric`` and averages them.

    Parameters
    ----------
    num_models
        How many checkpoints to average, an integer >= 1 (fewer when fewer
        have a finite ``metric``).
    metric
        The epoch-info key to rank by, a non-empty string: ``"score"`` (the
        callbacks' validation loss, else training loss; ``ModuleAveraging``'s
        first evaluation metric) or, with ``ModuleAveraging``, a metric's name.
    maximize
        ``True`` ranks high values first (accuracy), ``False`` low ones (losses).
    """

    default_implementation = "mean"
    needs_evaluation = False
    """Whether :meth:`select_checkpoints` evaluates candidate averages (then it needs ``evaluate``)."""

    def __init__(self, num_models: int = 5, metric: str = "score", maximize: bool = False) -> None:
        self.num_models = check_integer("num_models", num_models, 1)
        if not isinstance(metric, str) or not metric:
            raise ConfigurationError(f"metric must be a non-empty string (an epoch-info key), got {metric!r}")
        self.metric = metric
        self.maximize = bool(maximize)

    def __getnewargs_ex__(self) -> Tuple[Tuple[()], Dict[str, Any]]:
        """Constructor arguments, so GluonTS's serde (and pickle) can rebuild it."""
        return (), {"num_models": self.num_models, "metric": self.metric, "maximize": self.maximize}

    def __repr__(self) -> str:
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.__getnewargs_ex__()[1].items())
        return f"{type(self).__name__}({arguments})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.__getnewargs_ex__() == other.__getnewargs_ex__()  # type: ignore

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.__getnewargs_ex__()[1].items()))))

    def apply(self, model_path: str, *, allow_outside_folder: bool = False, run: Optional[str] = None) -> str:
        """Average the folder's selected checkpoints; return the path of the file written.

        The result is ``{model_path}/averaged_model-0000.params``. Unusable
        epoch-info files and parameter files are skipped with a warning (see
        :func:`~modavg_plugin.folders.read_checkpoint_records` and
        :func:`~modavg_plugin.weighted_sum.average_checkpoint_files`); it is a
        :class:`CheckpointError` when nothing usable is left.

        Parameters
        ----------
        model_path
            The checkpoint folder.
        allow_outside_folder
            Accept epoch info whose ``params_path`` lies outside the folder
            (refused by default).
        run
            The run whose checkpoints to average (its ``run_id``), when the
            folder holds several runs' (refused without it).
        """
        records = self.get_checkpoint_information(model_path, allow_outside_folder=allow_outside_folder, run=run)
        paths, weights = self.select_checkpoints(records)
        averaged_path = os.path.join(model_path, AVERAGED_MODEL_NAME)
        save_params(averaged_path, self.average(paths, weights))
        return averaged_path

    @staticmethod
    def get_checkpoint_information(
        model_path: str, allow_outside_folder: bool = False, run: Optional[str] = None
    ) -> List[Dict[str, Any]]:
        """The usable epoch-info records (``params_path``, ``epoch_no``, metrics) in ``model_path``.

        See :func:`~modavg_plugin.folders.read_checkpoint_records`.
        """
        return read_checkpoint_records(model_path, allow_outside_folder=allow_outside_folder, run=run)

    def select_checkpoints(
        self, checkpoints: Sequence[Mapping[str, Any]], evaluate: Optional[Evaluation] = None
    ) -> Tuple[List[str], List[float]]:
        """The best ``num_models`` checkpoints, best first, and their weights (finite, >= 0, summing to 1).

        Checkpoints whose metric is missing, not a number, NaN or infinite
        are never selected; they are named, with the reason, in one warning.
        ``evaluate(arrays) -> score`` is used only by strategies that
        :attr:`needs_evaluation` (``"greedy"``).
        """
        ranked = self.candidate_checkpoints(checkpoints)
        scores = [float(record[self.metric]) for record in ranked]
        weights = self.checkpoint_weights(scores)
        return [str(record["params_path"]) for record in ranked], [float(weight) for weight in weights]

    def candidate_checkpoints(self, checkpoints: Sequence[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
        """The best ``num_models`` checkpoints by the metric, best first; the unrankable ones named in one warning."""
        excluded = self.excluded_checkpoints(checkpoints)
        ranked = self.rank_checkpoints(checkpoints)[: self.num_models]
        if excluded:
            logger.warning(
                "not selecting %d of %d checkpoints: %s", len(excluded), len(checkpoints), _list_reasons(excluded)
            )
        return ranked

    def rank_checkpoints(self, checkpoints: Sequence[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
        """Checkpoints with a finite metric, best first (ties: earlier epoch first, then the given order).

        Raises
        ------
        CheckpointError
            No checkpoints, or none with a finite metric: the message says
            why, naming the records.
        """
        if len(checkpoints) == 0:
            raise CheckpointError("no checkpoints to select from")
        usable = [record for record in checkpoints if self.exclusion_reason(record) is None]
        if not usable:
            raise CheckpointError(self._nothing_usable_message(checkpoints))
        sign = -1.0 if self.maximize else 1.0
        return sorted(usable, key=lambda record: (sign * float(record[self.metric]), _epoch_key(record)))

    def exclusion_reason(self, record: Mapping[str, Any]) -> Optional[str]:
        """Why ``record`` cannot be ranked by the metric, or ``None`` when it can."""
        if self.metric not in record:
            return f"no {self.metric!r}"
        value = record[self.metric]
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            return f"{self.metric!r} is {shown_value(value)}, not a number"
        if not _is_finite(value):
            return f"{self.metric!r} is {shown_value(value)}, not finite"
        return None

    def excluded_checkpoints(self, checkpoints: Sequence[Mapping[str, Any]]) -> List[Tuple[str, str]]:
        """``(source, reason)`` of every checkpoint :meth:`~modavg_plugin.AveragingStrategy.rank_checkpoints` leaves out."""
        reasons = [(_source(record), self.exclusion_reason(record)) for record in checkpoints]
        return [(source, reason) for source, reason in reasons if reason is not None]

    def _nothing_usable_message(self, checkpoints: Sequence[Mapping[str, Any]]) -> str:
        excluded = self.excluded_checkpoints(checkpoints)
        if all(reason == f"no {self.metric!r}" for _, reason in excluded):
            return f"metric {self.metric!r} is missing from the epoch info of {_list_sources(excluded)}"
        return f"no checkpoint has a finite {self.metric!r}: {_list_reasons(excluded)}"

    def checkpoint_weights(self, scores: Sequence[float]) -> np.ndarray:
        """Weights for the selected checkpoints' scores, best first (sum 1)."""
        raise NotImplementedError

    def average(self, param_paths: Sequence[str], weights: Sequence[float]) -> Dict[str, mx.nd.NDArray]:
        """Weighted mean of ``.params`` files, one in memory at a time."""
        return average_checkpoint_files(param_paths, weights)

    @staticmethod
    def average_arrays(arrays: Sequence[mx.nd.NDArray], weights: Sequence[float]) -> mx.nd.NDArray:
        """Element-wise weighted mean of same-shape arrays."""
        return average_arrays(arrays, weights)


def _is_finite(value: numbers.Real) -> bool:
    """``math.isfinite``, with integers too large for a float counted as infinite."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _epoch_key(record: Mapping[str, Any]) -> int:
    """The epoch number for breaking ties: 0 when missing or not an integer (as ``record.get("epoch_no", 0)``)."""
    epoch_no = record.get("epoch_no")
    if isinstance(epoch_no, numbers.Integral) and not isinstance(epoch_no, (bool, np.bool_)):
        return int(epoch_no)
    return 0


def _source(record: Mapping[str, Any]) -> str:
    return str(record.get("info_path", record.get("params_path", "a checkpoint record")))


def _list_sources(excluded: Sequence[Tuple[str, str]]) -> str:
    return list_some([source for source, _ in excluded], ", ", " ")


def _list_reasons(excluded: Sequence[Tuple[str, str]]) -> str:
    return list_some([f"{source}: {reason}" for source, reason in excluded], "; ", "; ")


@AveragingStrategy.register("mean")
class SelectNBestMean(AveragingStrategy):
    """The ``num_models`` best checkpoints, equally weighted: ``w_i = 1/N``.

    The default, and the one to start with: the weights do not depend on the
    metric's values, so nothing needs tuning but ``num_models``.
    """

    def checkpoint_weights(self, scores: Sequence[float]) -> np.ndarray:
        return np.full(len(scores), 1.0 / len(scores))


@AveragingStrategy.register("softmax")
class SelectNBestSoftmax(AveragingStrategy):
    """The ``num_models`` best checkpoints, weighted by a softmax of their scores.

    ``w_i = exp(-v_i) / sum_j exp(-v_j)`` (``exp(v_i)`` when maximising),
    computed stably. Use it when the selected scores differ by about 1 or
    more and better checkpoints should count more: the weighting depends on
    the metric's scale (losses 1 and 3 get weights 0.88 and 0.12; 0.010 and
    0.012 are weighted almost equally, as by ``"mean"``).
    """

    def checkpoint_weights(self, scores: Sequence[float]) -> np.ndarray:
        return softmax_weights(scores, self.maximize)


GREEDY_NEEDS_EVALUATION = (
    'the "greedy" strategy needs an evaluation: pass evaluate=callable(arrays) -> score; '
    '`modavg average` and training without validation data cannot evaluate: use "mean" there'
)


@AveragingStrategy.register("greedy")
class GreedySoup(AveragingStrategy):
    """Greedy model soup, when averages can be evaluated: a checkpoint joins only if the mean scores better with it.

    Use it when the averaged weights can be evaluated (held-out validation
    data) and some checkpoints could spoil a plain mean, e.g. ones from
    different basins or from before the loss settled: the candidates, the
    ``num_models`` best by ``metric``, are tried best first, and each joins
    only if the equal-weight mean of the soup with it scores strictly better
    under the evaluation. Without one it cannot select, so not in
    ``modavg average`` nor in training without validation data: use
    ``"mean"`` there.

    Recipe 1 of Wortsman et al., "Model soups: averaging weights of multiple
    fine-tuned models improves accuracy without increasing inference time",
    ICML 2022 (https://arxiv.org/abs/2203.05482). The soup starts as the best
    candidate, scored by the evaluation as well, so that every comparison
    uses the same evaluation. A NaN or infinite evaluation is no improvement
    (and worse than any finite one); a candidate file that cannot be read or
    holds NaN or infinite values is skipped with a warning. The result is the
    soup's checkpoints with equal weights. Memory: about four model sizes
    (the soup's running sum in float32 or wider, the sum with the candidate,
    the candidate, and the mean being evaluated), whatever ``num_models``.

    Parameters
    ----------
    num_models
        How many candidates to try, an integer >= 1: the best by ``metric``
        (fewer when fewer have a finite ``metric``). The soup keeps between
        1 and ``num_models`` of them.
    maximize
        ``True``: high values are better, both for ``metric`` (the order the
        candidates are tried in) and for the evaluation's scores (accuracy);
        ``False``: low ones (losses).
    evaluate
        ``evaluate(arrays) -> score``, the score of the weights given as
        name -> CPU ``mx.nd.NDArray`` with the checkpoint files' names and
        dtypes, e.g. the validation loss of a network holding them; used
        when :meth:`select_checkpoints` is given none (the adapters give
        their validation data's). Not part of the configuration: serde,
        pickles and copies leave it out.

    Attributes
    ----------
    trials
        The candidates of the last :meth:`select_checkpoints`, in the order
        tried, as dicts: ``path``; ``epoch_no`` (from the record, if any);
        ``score``, the evaluation of the soup's mean with the candidate (the
        first candidate alone), ``None`` for a file skipped unread; and
        ``kept``. A report only: :meth:`~modavg_plugin.AveragingStrategy.average` does not read it.
    """

    needs_evaluation = True

    def __init__(
        self, num_models: int = 5, metric: str = "score", maximize: bool = False, evaluate: Optional[Evaluation] = None
    ) -> None:
        super().__init__(num_models, metric, maximize)
        self.evaluate = _checked_evaluation(evaluate)
        self.trials: List[Dict[str, Any]] = []

    def __getstate__(self) -> Dict[str, Any]:
        """The configuration only: no ``evaluate`` (it may not pickle) and no ``trials``."""
        return {**self.__dict__, "evaluate": None, "trials": []}

    def select_checkpoints(
        self, checkpoints: Sequence[Mapping[str, Any]], evaluate: Optional[Evaluation] = None
    ) -> Tuple[List[str], List[float]]:
        """The soup's checkpoints, best candidate first, with equal weights; :attr:`trials` says why.

        ``evaluate`` scores candidate means (``None``: the one given at
        construction). Every call evaluates afresh; one INFO line is logged
        per candidate.

        Raises
        ------
        ConfigurationError
            No evaluation, one that is not callable, or one returning
            something other than a number.
        CheckpointError
            No candidates (see :meth:`~modavg_plugin.AveragingStrategy.rank_checkpoints`), none readable with
            finite values, or candidates whose parameter names or shapes
            differ (naming the parameter and the files).
        """
        evaluate = _checked_evaluation(evaluate if evaluate is not None else self.evaluate)
        if evaluate is None:
            raise ConfigurationError(GREEDY_NEEDS_EVALUATION)
        self.trials = []
        records = self.candidate_checkpoints(checkpoints)
        soup: Optional[WeightedSum] = None
        kept: List[str] = []
        soup_score = math.nan
        for record in records:
            path = str(record["params_path"])
            trial = {"path": path, "epoch_no": record.get("epoch_no"), "score": None, "kept": False}
            self.trials.append(trial)
            arrays = _read_candidate(path)
            if arrays is None:
                continue
            candidate = soup.copy() if soup is not None else WeightedSum()
            candidate.add(arrays, 1.0, path)
            del arrays
            trial["score"] = _score(evaluate, candidate.mean())
            trial["kept"] = soup is None or self._improves(trial["score"], soup_score)
            self._log_trial(path, trial["score"], trial["kept"], len(kept) + 1, soup_score)
            if trial["kept"]:
                soup, soup_score = candidate, trial["score"]
                kept.append(path)
        if not kept:
            shown = list_some([str(record["params_path"]) for record in records], ", ", " ")
            raise CheckpointError(f"no usable checkpoint among the {len(records)} candidates: {shown}")
        return kept, [1.0 / len(kept)] * len(kept)

    def _improves(self, score: float, current: float) -> bool:
        """Whether ``score`` is strictly better than ``current``; non-finite scores are worse than any finite one."""
        if not math.isfinite(score):
            return False
        if not math.isfinite(current):
            return True
        return score > current if self.maximize else score < current

    @staticmethod
    def _log_trial(path: str, score: float, kept: bool, count: int, current: float) -> None:
        if count == 1:
            logger.info("greedy soup: %s starts the soup, scoring %.6g", path, score)
        elif kept:
            message = "greedy soup: kept %s: the mean of %d checkpoints scores %.6g, better than %.6g"
            logger.info(message, path, count, score, current)
        else:
            message = "greedy soup: rejected %s: the mean of %d checkpoints would score %.6g, not better than %.6g"
            logger.info(message, path, count, score, current)


def _read_candidate(path: str) -> Optional[Dict[str, mx.nd.NDArray]]:
    """The arrays of ``path``; ``None``, with a warning, when it is unreadable or holds NaN or infinite values."""
    try:
        arrays = load_params(path)
    except CheckpointError as error:
        logger.warning("skipping %s", error)
        return None
    if not all(all_finite(host_array(array)) for array in arrays.values() if is_floating(array.dtype)):
        logger.warning("skipping checkpoint file %s: it holds NaN or infinite values", path)
        return None
    return arrays


def _checked_evaluation(evaluate: Any) -> Any:
    """``evaluate``, unless it is neither ``None`` nor callable (:class:`ConfigurationError`)."""
    if evaluate is not None and not callable(evaluate):
        raise ConfigurationError(f"evaluate must be a callable(arrays) -> score, got {shown_value(evaluate)}")
    return evaluate


def _score(evaluate: Evaluation, arrays: Mapping[str, mx.nd.NDArray]) -> float:
    """``evaluate(arrays)`` as a float (a one-element NDArray accepted); :class:`ConfigurationError` if not a number."""
    value = evaluate(arrays)
    if isinstance(value, mx.nd.NDArray) and value.size == 1:
        value = value.asscalar()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ConfigurationError(f"evaluate must return a number (the score of the arrays), got {shown_value(value)}")
    try:
        return float(value)
    except OverflowError:  # an integer too large for a float: not finite, as inf
        return math.inf
