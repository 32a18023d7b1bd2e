"""When to start averaging, decided at each epoch's end: GluonTS's NTA and alpha-suffix rules.

A trigger sees one number per finished epoch (the validation loss, or the
training loss without validation data) and says when the moving average
should start (:meth:`~modavg_plugin.MovingAverage.start_now`). Before that, the shadows
follow the weights. The rules are those of GluonTS's
``gluonts.mx.trainer.model_iteration_averaging`` (``NTA``, ``Alpha_Suffix``),
with the same defaults, as registered names usable from the callback and
the Module adapter with any moving average (typically ``"cumulative"``).
"""

import math
from typing import Any, Dict, List, Mapping, Optional

from .checks import check_integer, check_number
from .registry import ConfigurationError, Registrable

__all__ = ["AlphaSuffixTrigger", "AveragingTrigger", "NonMonotonicTrigger", "trigger_from_config"]


class AveragingTrigger(Registrable):
    """Decides, epoch by epoch, when averaging starts."""

    default_implementation = "nta"

    def should_start(self, epochs_done: int, metric: float, max_epochs: int) -> bool:
        """Whether averaging starts now, after ``epochs_done`` of ``max_epochs`` epochs with this epoch's ``metric``."""
        raise NotImplementedError

    def start_if_due(self, average: Any, epochs_done: int, metric: float, max_epochs: int) -> bool:
        """Start ``average`` (a :class:`MovingAverage` waiting with ``start_step=None``) when :meth:`should_start` says so.

        Returns whether it started it now; an average already started is left
        alone and the rule is not consulted (nor its memory extended).
        """
        if average.start_step is not None or not self.should_start(epochs_done, metric, max_epochs):
            return False
        average.start_now()
        return True

    def state_dict(self) -> Dict[str, Any]:
        """What a resumed run needs (JSON-ready)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back :meth:`state_dict`."""


@AveragingTrigger.register("alpha_suffix")
class AlphaSuffixTrigger(AveragingTrigger):
    """Average the last ``alpha`` fraction of the epochs (Rakhlin et al., 2012; GluonTS's ``Alpha_Suffix``).

    Use it for a fixed suffix of training without a validation signal:
    averaging starts once ``epochs_done >= max_epochs * (1 - alpha)``.

    Parameters
    ----------
    alpha
        The fraction of the epochs to average, in [0, 1] (0.75: the last three quarters).
    """

    def __init__(self, alpha: float = 0.75) -> None:
        self.alpha = check_number("alpha", alpha, 0.0, 1.0)

    def should_start(self, epochs_done: int, metric: float, max_epochs: int) -> bool:
        return epochs_done >= max_epochs * (1.0 - self.alpha)


@AveragingTrigger.register("nta")
class NonMonotonicTrigger(AveragingTrigger):
    """Non-monotonically triggered averaging (Merity et al., 2018; GluonTS's ``NTA``).

    Use it to start averaging once the validation loss stops improving:
    averaging starts when this epoch's metric is worse than the best of the
    epochs before the last ``n`` (or, with ``last_n_trigger``, than the best
    of the last ``n``), and at the latest after ``1 - fallback_alpha`` of the
    epochs. Non-finite metrics are not recorded and never trigger.

    Parameters
    ----------
    n
        The non-monotone interval, an integer >= 1 (to start at a fixed
        epoch instead, use ``"alpha_suffix"``).
    maximize
        ``True`` when higher metrics are better.
    last_n_trigger
        Compare with the best of the last ``n`` epochs instead of those before them.
    fallback_alpha
        In [0, 1]: start anyway once ``epochs_done >= max_epochs * (1 - fallback_alpha)``.
    """

    def __init__(
        self, n: int = 5, maximize: bool = False, last_n_trigger: bool = False, fallback_alpha: float = 0.05
    ) -> None:
        self.n = check_integer("n", n, 1)
        self.maximize = bool(maximize)
        self.last_n_trigger = bool(last_n_trigger)
        self.fallback_alpha = check_number("fallback_alpha", fallback_alpha, 0.0, 1.0)
        self.metrics: List[float] = []

    def should_start(self, epochs_done: int, metric: float, max_epochs: int) -> bool:
        if epochs_done >= max_epochs * (1.0 - self.fallback_alpha):
            return True
        if not math.isfinite(metric):
            return False
        earlier = self.metrics[-self.n :] if self.last_n_trigger else self.metrics[: -self.n]
        needed = self.n if self.last_n_trigger else self.n + 1
        worse = len(self.metrics) >= needed and (metric < max(earlier) if self.maximize else metric > min(earlier))
        self.metrics.append(float(metric))
        return worse

    def state_dict(self) -> Dict[str, Any]:
        return {"metrics": list(self.metrics)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.metrics = [float(value) for value in state.get("metrics", [])]


def trigger_from_config(trigger: Optional[Mapping[str, Any]], average: Mapping[str, Any]) -> Optional[AveragingTrigger]:
    """A fresh trigger from its config (``None``: none); refused next to an average's own ``start_step``."""
    if trigger is None:
        return None
    if average.get("start_step") not in (None, 0):
        raise ConfigurationError("give the average a start_step or a trigger, not both")
    return AveragingTrigger.from_config(dict(trigger))
