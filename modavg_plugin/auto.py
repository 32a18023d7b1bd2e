"""Choosing the averaging after training, on validation data: the ``"auto"`` mode.

During training an ``"auto"`` run keeps what post-hoc reconstruction needs
(power-function EMAs of a few ``tracked`` widths, saved every epoch) and
validates one of them (``validated``) every epoch, keeping its best per-epoch
checkpoints. At the end it evaluates, one at a time (one model size in memory
besides the network), the candidates:

* the raw last iterate;
* the power EMA of each width in ``widths``, rebuilt from the snapshots
  (:mod:`modavg_plugin.posthoc`), when its error bound is at most
  ``MAX_ERROR_BOUND`` (a poorer one is not the average it is named after);
* the mean of the ``best_epochs`` per-epoch checkpoints with the best
  validation loss.

It ships the best one, unless a simpler one is within one standard error of
it: the "one-standard-error rule" (Breiman et al. 1984; Hastie, Tibshirani
and Friedman, *The Elements of Statistical Learning*, sec. 7.10), which
prefers the simpler of models whose difference the validation data cannot
resolve. The standard error is that of the paired per-element differences
of the validation losses (the same validation elements under both sets of
weights); when the host measures only a mean (``Module.score``), near-ties
are differences below ``SCALAR_TIE`` relatively. Simpler means: the raw
weights, then a single EMA (narrower first: closer to the raw weights), then
the mean of several checkpoints.
"""

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import mxnet as mx
import numpy as np

from .averages import MAX_SIGMA_REL, MIN_SIGMA_REL
from .checks import check_integer, check_number, shown_value
from .posthoc import combine_snapshots, plan_posthoc
from .registry import ConfigurationError
from .strategies import AveragingStrategy

__all__ = ["AUTO_DEFAULTS", "AutoOptions", "Candidate", "auto_options", "choose", "evaluated_candidates"]

logger = logging.getLogger(__name__)

AUTO_DEFAULTS: Mapping[str, Any] = {
    "widths": [0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.18, 0.25],
    "tracked": [0.02, 0.08, 0.2],
    "validated": 0.08,
    "best_epochs": 5,
    "maximize": False,
}
"""``widths``: the EMAs tried (sigma_rel, from the last 2% of training to nearly all of it); ``tracked``: the
widths kept during training to rebuild them from (every width of the grid rebuilds within an error bound of
0.02 from 40 saves); ``validated``: the width validated every epoch (and ``best_epochs`` of its per-epoch
checkpoints averaged); ``maximize``: higher validation scores are better (an accuracy)."""
MAX_ERROR_BOUND = 0.1
SCALAR_TIE = 1e-3
Arrays = Dict[str, mx.nd.NDArray]
Loss = Union[float, np.ndarray]


@dataclass(frozen=True)
class AutoOptions:
    """The ``"auto"`` mode's settings, checked."""

    widths: List[float]
    tracked: List[float]  #: the widths kept during training to rebuild the others from
    validated: float  #: the width validated every epoch
    best_epochs: int
    maximize: bool

    def average_config(self) -> Dict[str, Any]:
        """The moving average validated every epoch: the power EMA of width :attr:`validated`."""
        return {"type": "power", "sigma_rel": self.validated}

    def posthoc_config(self) -> Dict[str, Any]:
        """The snapshots kept: the :attr:`tracked` widths, every epoch."""
        return {"sigma_rels": list(self.tracked), "every_epochs": 1}

    def strategy(self) -> AveragingStrategy:
        """The per-epoch checkpoints kept, and averaged as the last candidate."""
        return AveragingStrategy.from_config(
            {"type": "mean", "num_models": self.best_epochs, "maximize": self.maximize}
        )


def auto_options(config: Mapping[str, Any]) -> AutoOptions:
    """``{"type": "auto", ...}`` checked, with the defaults of :data:`AUTO_DEFAULTS`; :class:`~modavg_plugin.ConfigurationError` naming a bad key."""
    unknown = sorted(set(config) - set(AUTO_DEFAULTS) - {"type"})
    if unknown:
        raise ConfigurationError(f"auto: unknown key {unknown[0]!r}; accepted: {sorted(AUTO_DEFAULTS)}")
    settings = {**AUTO_DEFAULTS, **{key: value for key, value in config.items() if key != "type"}}
    widths = [
        _width(f"auto widths[{index}]", value) for index, value in enumerate(_listed("widths", settings["widths"]))
    ]
    tracked = [
        _width(f"auto tracked[{index}]", value) for index, value in enumerate(_listed("tracked", settings["tracked"]))
    ]
    validated = _width("auto validated", settings["validated"])
    if not isinstance(settings["maximize"], bool):
        raise ConfigurationError(f"auto maximize must be True or False, got {shown_value(settings['maximize'])}")
    best_epochs = check_integer("auto best_epochs", settings["best_epochs"], 1)
    return AutoOptions(sorted(set(widths)), sorted(set(tracked)), validated, best_epochs, settings["maximize"])


def _listed(name: str, value: Any) -> List[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ConfigurationError(
            f"auto {name} must be a non-empty list of widths (sigma_rel), got {shown_value(value)}"
        )
    return list(value)


def _width(name: str, value: Any) -> float:
    return check_number(name, value, MIN_SIGMA_REL, MAX_SIGMA_REL, open_high=True)


@dataclass
class Candidate:
    """One set of weights the ``"auto"`` mode may ship, and how it did on validation."""

    name: str
    build: Callable[[], Arrays] = field(repr=False)
    sigma_rel: Optional[float] = None
    error_bound: Optional[float] = None
    validation_loss: float = math.nan
    losses: Optional[np.ndarray] = field(default=None, repr=False)

    def report(self, chosen: bool) -> Dict[str, Any]:
        """Plain data for a log, a notebook or a plot."""
        return {
            "name": self.name,
            "sigma_rel": self.sigma_rel,
            "error_bound": self.error_bound,
            "validation_loss": self.validation_loss,
            "chosen": chosen,
        }


def candidate_list(
    options: AutoOptions,
    raw: Arrays,
    posthoc_folder: Optional[str],
    run_id: Optional[str],
    records: Sequence[Mapping[str, Any]],
) -> List[Candidate]:
    """The candidates in order of simplicity, each built only when asked (one model size at a time)."""
    candidates = [Candidate("last iterate", lambda: raw)]
    for width in options.widths if posthoc_folder is not None else []:
        try:
            plan = plan_posthoc(posthoc_folder, sigma_rel=width, run=run_id, report=False)
        except (ValueError, OSError) as error:  # no snapshot yet, an unreadable folder...
            logger.warning("auto: no power EMA of sigma_rel %g (%s)", width, error)
            continue
        if plan.error_bound > MAX_ERROR_BOUND:
            logger.info(
                "auto: not trying sigma_rel %g: rebuilt within %.3g only (above %g)",
                width,
                plan.error_bound,
                MAX_ERROR_BOUND,
            )
            continue
        candidates.append(
            Candidate(
                f"power EMA sigma_rel {width:g}", lambda plan=plan: combine_snapshots(plan), width, plan.error_bound
            )
        )
    if records:
        strategy = options.strategy()
        paths, weights = strategy.select_checkpoints(records)
        name = f"mean of the {len(paths)} best epochs' EMAs (sigma_rel {options.validated:g})"
        candidates.append(Candidate(name, lambda: strategy.average(paths, weights)))
    return candidates


def evaluated_candidates(candidates: List[Candidate], evaluate: Callable[[Arrays], Loss]) -> List[Candidate]:
    """Each candidate's validation loss (one INFO line each), built and evaluated one at a time."""
    for candidate in candidates:
        loss = evaluate(candidate.build())
        values = np.asarray(loss, dtype=np.float64).reshape(-1)
        candidate.losses = values if values.size > 1 else None
        candidate.validation_loss = float(values.mean()) if values.size else math.nan
        bound = f" (rebuilt within {candidate.error_bound:.3g})" if candidate.error_bound is not None else ""
        logger.info("auto: %s: validation loss %.6g%s", candidate.name, candidate.validation_loss, bound)
    return candidates


def choose(candidates: Sequence[Candidate], maximize: bool = False) -> int:
    """The index of the candidate to ship: the simplest within one standard error of the best (see the module docstring)."""
    sign = -1.0 if maximize else 1.0
    usable = [index for index, candidate in enumerate(candidates) if math.isfinite(candidate.validation_loss)]
    if not usable:
        return 0
    best = min(usable, key=lambda index: sign * candidates[index].validation_loss)
    for index in usable:  # simplest first
        if sign * (candidates[index].validation_loss - candidates[best].validation_loss) <= _margin(
            candidates[index], candidates[best]
        ):
            return index
    return best


def _margin(candidate: Candidate, best: Candidate) -> float:
    """One standard error of the paired per-element differences, or a relative tie for scalar measures."""
    if candidate.losses is not None and best.losses is not None and candidate.losses.size == best.losses.size:
        differences = candidate.losses - best.losses
        differences = differences[np.isfinite(differences)]
        if differences.size > 1:
            return float(np.std(differences, ddof=1) / math.sqrt(differences.size))
    return SCALAR_TIE * abs(best.validation_loss)
