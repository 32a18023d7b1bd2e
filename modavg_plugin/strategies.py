"""Checkpoint averaging strategies: which checkpoints, with which weights.

Same method names and meanings as GluonTS's ``AveragingStrategy``:
``apply(model_path)`` = read records, select, average, write. Unlike
GluonTS's, weights are computed stably (no NaN or inf for any finite
scores), non-finite scores are never selected, checkpoints are averaged one
at a time, and user errors are exceptions naming the culprit.
"""

import math
import os
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import mxnet as mx
import numpy as np

from .checkpoints import (
    AVERAGED_MODEL_NAME,
    CheckpointError,
    average_arrays,
    average_checkpoint_files,
    read_checkpoint_records,
    save_params,
)
from .registry import ConfigurationError, Registrable

__all__ = ["AveragingStrategy", "SelectNBestMean", "SelectNBestSoftmax", "softmax_weights"]


def softmax_weights(scores: Sequence[float], maximize: bool) -> np.ndarray:
    """``exp(v_i) / sum_j exp(v_j)`` with ``v = score`` (maximize) or ``-score``.

    The largest ``v`` is subtracted first, so any finite scores give finite
    weights summing to 1 (GluonTS's formula gives NaN from scores ~710 up).
    """
    values = np.asarray(scores, dtype=np.float64) * (1.0 if maximize else -1.0)
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

    def __init__(self, num_models: int = 5, metric: str = "score", maximize: bool = False) -> None:
        if isinstance(num_models, bool) or not isinstance(num_models, (int, np.integer)) or num_models < 1:
            raise ConfigurationError(f"num_models must be an integer >= 1, got {num_models!r}")
        if not isinstance(metric, str) or not metric:
            raise ConfigurationError(f"metric must be a non-empty string (an epoch-info key), got {metric!r}")
        self.num_models = int(num_models)
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

    def apply(self, model_path: str) -> str:
        """Average the folder's selected checkpoints; return the path of the file written.

        The result is ``{model_path}/averaged_model-0000.params``.
        """
        paths, weights = self.select_checkpoints(self.get_checkpoint_information(model_path))
        averaged_path = os.path.join(model_path, AVERAGED_MODEL_NAME)
        save_params(averaged_path, self.average(paths, weights))
        return averaged_path

    @staticmethod
    def get_checkpoint_information(model_path: str) -> List[Dict[str, Any]]:
        """The epoch-info records (``params_path``, ``epoch_no``, metrics) in ``model_path``."""
        return read_checkpoint_records(model_path)

    def select_checkpoints(self, checkpoints: Sequence[Mapping[str, Any]]) -> Tuple[List[str], List[float]]:
        """The best ``num_models`` checkpoints, best first, and their weights.

        Checkpoints whose metric is NaN or infinite are never selected.
        """
        ranked = self.rank_checkpoints(checkpoints)[: self.num_models]
        scores = [float(record[self.metric]) for record in ranked]
        weights = self.checkpoint_weights(scores)
        return [str(record["params_path"]) for record in ranked], [float(weight) for weight in weights]

    def rank_checkpoints(self, checkpoints: Sequence[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
        """Usable checkpoints, best first (ties: earlier epoch first)."""
        if len(checkpoints) == 0:
            raise CheckpointError("no checkpoints to select from")
        for record in checkpoints:
            if self.metric not in record:
                source = record.get("info_path", record.get("params_path", "a checkpoint record"))
                raise CheckpointError(f"metric {self.metric!r} is missing from the epoch info of {source}")
        usable = [record for record in checkpoints if _is_finite_number(record[self.metric])]
        if not usable:
            raise CheckpointError(
                f"no checkpoint has a finite {self.metric!r} (all {len(checkpoints)} are NaN, infinite or not numbers)"
            )
        sign = -1.0 if self.maximize else 1.0
        return sorted(usable, key=lambda record: (sign * float(record[self.metric]), record.get("epoch_no", 0)))

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


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
