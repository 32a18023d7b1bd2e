"""Moving averages of Gluon parameters: update maths, shadows, swap and state.

The decay schedule is a small pure function (:func:`exponential_decay`); the
in-place update kernels live in :mod:`modavg_plugin.update_kernels`;
:class:`MovingAverage` is the stateful object that owns one *shadow* per
parameter and swaps it in and out of the network.

Shadows live on the context of the parameter's first device copy (the GPU
when training runs there), or on ``shadow_context`` when one is given (e.g.
``mx.cpu()`` to save GPU memory, at the cost of a copy per update), one flat
buffer per context and dtype, and are
float32 for float16 parameters (float64 stays float64). Integer parameters
are copied, not averaged.
"""

import contextlib
import logging
import math
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union

import mxnet as mx
import numpy as np

from .checks import check_choice, check_integer, check_number
from .dtypes import averaging_dtype
from .parameters import (
    NamedParameters,
    ParameterLike,
    as_context,
    check_compatible,
    device_copies,
    first_copies,
    is_trainable,
    named_parameters,
    select_by_name,
    write_array,
    write_into_parameters,
)
from .registry import ConfigurationError, Registrable
from .update_kernels import UpdateGroup, group_key, update_group_for

__all__ = [
    "CumulativeMovingAverage",
    "ExponentialMovingAverage",
    "MovingAverage",
    "PowerMovingAverage",
    "check_exponential_arguments",
    "cumulative_decay",
    "exponential_decay",
    "power_decay",
    "power_warmup_decay",
    "sigma_rel_to_gamma",
]

NON_TRAINABLE_CHOICES = ("average", "copy", "exclude")
WARMUP_CHOICES = ("ratio", "power", "none")

logger = logging.getLogger(__name__)


def exponential_decay(
    decay: float, num_updates: Optional[int] = None, numerator: float = 1.0, denominator: float = 10.0
) -> float:
    """The decay of one EMA step: ``decay``, warmed up when ``num_updates`` is given.

    With ``num_updates = n`` it is ``min(decay, (numerator + n) / (denominator + n))``
    (TensorFlow / AllenNLP semantics), so early steps follow the weights closely.
    """
    if num_updates is None:
        return decay
    check_integer("num_updates", num_updates, 0, ValueError)
    return min(decay, (numerator + num_updates) / (denominator + num_updates))


def power_warmup_decay(decay: float, num_updates: int, gamma: float = 1.0, power: float = 0.75) -> float:
    """timm's warm-up: ``min(decay, 1 - (1 + num_updates / gamma) ** -power)``.

    With ``gamma = 1``, ``power = 3/4`` the decay reaches 0.999 after about
    10,000 updates and 0.9999 after about 215,000; ``power = 2/3`` is slower
    (0.999 after about 31,600 updates), for runs of a million steps or more.
    """
    check_integer("num_updates", num_updates, 0, ValueError)
    return min(decay, 1.0 - (1.0 + num_updates / gamma) ** -power)


def cumulative_decay(eta: float, count: int) -> float:
    """The decay of the ``count``-th step of a cumulative average: ``1 - (eta + 1) / (eta + count)``.

    ``count = 1`` gives 0 (the first step copies the weights); with
    ``eta = 0`` the shadow after ``count`` steps is the arithmetic mean of the
    ``count`` values seen; ``eta > 0`` weights later values more (GluonTS's
    polynomial-decay averaging).
    """
    _check_count(count)
    return 1.0 - (eta + 1.0) / (eta + count)


MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)
"""The relative width of the power-function profile as ``gamma`` tends to 0 (an equal-weight mean)."""
MIN_SIGMA_REL = 1e-6
"""The narrowest profile worth averaging (its ``gamma`` is about a million): narrower ones average nothing."""


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent ``gamma`` whose power-function EMA has relative standard deviation ``sigma_rel``.

    Karras et al. (2024), eq. 3: ``sigma_rel**2 = (gamma + 1) / ((gamma + 2)**2 (gamma + 3))``, i.e. the
    largest real root of ``gamma**3 + 7 gamma**2 + (16 - t) gamma + (12 - t)`` with ``t = sigma_rel**-2``.
    """
    sigma_rel = check_number("sigma_rel", sigma_rel, MIN_SIGMA_REL, MAX_SIGMA_REL, open_high=True)
    t = sigma_rel**-2
    return float(max(root.real for root in np.roots([1.0, 7.0, 16.0 - t, 12.0 - t]) if abs(root.imag) < 1e-9))


def power_decay(gamma: float, count: int) -> float:
    """The decay of the ``count``-th step of a power-function EMA: ``(1 - 1 / count) ** (gamma + 1)``.

    After ``t`` steps the value of step ``k`` has weight
    ``(k**(gamma + 1) - (k - 1)**(gamma + 1)) / t**(gamma + 1)``, roughly proportional to ``k**gamma``.
    """
    _check_count(count)
    return (1.0 - 1.0 / count) ** (gamma + 1.0)


def _check_count(count: int) -> None:
    check_integer("count", count, 1, ValueError)


def check_exponential_arguments(decay: float, numerator: float, denominator: float) -> None:
    """Refuse, naming the argument and its range, values the EMA cannot use."""
    check_number("decay", decay, 0.0, 1.0)
    check_number("numerator", numerator, 0.0)
    check_number("denominator", denominator, 0.0, open_low=True)


class MovingAverage(Registrable):
    """Base of the moving averages: which parameters, when to update, shadows, swap in/out, state.

    Every moving average takes these options (in a config dict too, next to
    its own arguments). :meth:`apply` is called once per training step; it
    counts the steps (or takes ``num_updates`` from the caller), and the
    subclass decides only the decay of each averaged step
    (:meth:`step_decay`).

    Parameters
    ----------
    parameters
        The ``(name, mx.gluon.Parameter)`` pairs to average, e.g.
        ``net.collect_params().items()``, every one initialised; not part of a
        config dict: ``from_config(config, parameters=...)``.
    shadow_context
        Where the shadows live: an ``mx.Context`` or text such as ``"cpu"``,
        ``"cpu(0)"``, ``"gpu(1)"``; ``None``: each parameter's first device copy.
    start_step
        Averaging starts after this many steps, an integer >= 0 (before, the
        shadows follow the weights, so swapping them in changes nothing);
        ``None``: not until :meth:`start_now` is called (what a trigger such
        as ``"nta"`` or ``"alpha_suffix"`` does).
    update_every
        Average every this many steps, an integer >= 1 (counted from
        ``start_step``); the steps between are skipped, which makes the
        update cost that much smaller (the average then spans
        ``update_every`` times more steps for the same decay).
    non_trainable
        What to do with parameters the optimiser does not update
        (``grad_req="null"``: BatchNorm running statistics, a Module's
        auxiliary states): ``"average"`` them like the weights, ``"copy"`` their
        current value at each update (the averaged network then uses the
        latest statistics), or ``"exclude"`` them (they keep whatever the
        network holds).
    include
        Shell-style name patterns (``"*weight"``, ``"dense0_*"``): average
        only the parameters matching one; ``None``: all.
    exclude
        Name patterns of parameters not to average (they keep their raw
        values); a pattern that matches nothing is an error.
    """

    default_implementation = "exponential"

    def __init__(
        self,
        parameters: Iterable[Tuple[str, ParameterLike]],
        *,
        shadow_context: Union[None, str, mx.Context] = None,
        start_step: Optional[int] = 0,
        update_every: int = 1,
        non_trainable: str = "average",
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
    ) -> None:
        check_schedule_arguments(start_step, update_every, non_trainable)
        self.shadow_context = as_context(shadow_context)
        self.start_step = start_step
        self.update_every = int(update_every)
        self.non_trainable = non_trainable
        self.include = _patterns("include", include)
        self.exclude = _patterns("exclude", exclude)
        given = named_parameters(parameters)
        if not given:
            raise ConfigurationError(
                "parameters is empty: nothing to average; give the (name, Parameter) pairs of an initialised "
                "network, e.g. net.collect_params().items()"
            )
        selected = select_by_name(given, self.include, self.exclude)
        if non_trainable == "exclude":
            selected = [(name, parameter) for name, parameter in selected if is_trainable(parameter)]
            if not selected:
                raise ConfigurationError(
                    "non_trainable='exclude' leaves no parameter to average: every one has grad_req='null'"
                )
        self._parameters: NamedParameters = selected
        followed = (
            [] if non_trainable != "copy" else [name for name, parameter in selected if not is_trainable(parameter)]
        )
        self._groups, self._group_follows = self._new_update_groups(set(followed))
        by_name = dict(self._parameters)
        self._group_parameters = [[by_name[name] for name in group.names] for group in self._groups]
        self._shadows: Dict[str, mx.nd.NDArray] = {
            name: group.shadows[name] for group in self._groups for name in group.names
        }
        self._backups: Dict[str, List[mx.nd.NDArray]] = {}
        self._assigned = False
        #: How many steps were averaged so far (steps before ``start_step`` or skipped by ``update_every`` are not).
        self.num_applied = 0
        self.num_steps = 0

    def _new_update_groups(self, followed: Set[str]) -> Tuple[List[UpdateGroup], List[bool]]:
        """Shadows grouped by context, dtype and whether they follow the weights, each group in one flat buffer."""
        members: Dict[Tuple[Any, ...], List[Tuple[str, mx.nd.NDArray]]] = {}
        for name, parameter in self._parameters:
            first = device_copies(name, parameter)[0]
            if self.shadow_context is not None and first.context != self.shadow_context:
                first = first.as_in_context(self.shadow_context)
            key = group_key(first, averaging_dtype(first.dtype)) + (name in followed,)
            members.setdefault(key, []).append((name, first))
        groups = [
            update_group_for(
                [name for name, _ in pairs], [first for _, first in pairs], averaging_dtype(pairs[0][1].dtype)
            )
            for pairs in members.values()
        ]
        return groups, [key[-1] for key in members]

    # Updating -----------------------------------------------------------------

    def apply(self, num_updates: Optional[int] = None) -> None:
        """One training step: update the shadows from the parameters' current values, if this step is averaged.

        Parameters
        ----------
        num_updates
            The number of optimiser steps so far (an integer >= 0); ``None``:
            this object counts the calls. ``start_step`` and ``update_every``
            count in these steps, and the exponential average's warm-up
            needs them.
        """
        if num_updates is not None:
            check_integer("num_updates", num_updates, 0, ValueError)
        self.num_steps = self.num_steps + 1 if num_updates is None else int(num_updates)
        if self.start_step is None or self.num_steps <= self.start_step:
            self._update_shadows(0.0)  # not started: the shadows follow the weights
            return
        steps_since_start = self.num_steps - self.start_step
        if steps_since_start % self.update_every:
            return
        self._update_shadows(self.step_decay(steps_since_start if num_updates is not None else None))
        self.num_applied += 1

    def step_decay(self, steps_since_start: Optional[int]) -> float:
        """The decay of the next averaged step (:attr:`num_applied` of them were before it).

        ``steps_since_start`` is the caller's step count minus ``start_step``,
        or ``None`` when the caller gives no ``num_updates``.
        """
        raise NotImplementedError

    def start_now(self) -> None:
        """Start averaging after the current step (a trigger fired); no-op once started."""
        if self.start_step is None or self.start_step > self.num_steps:
            self.start_step = self.num_steps

    @property
    def started(self) -> bool:
        """Whether any step was averaged yet (before that, the shadows are the latest weights)."""
        return self.num_applied > 0

    def _update_shadows(self, decay: float) -> None:
        """``shadow = decay * shadow + (1 - decay) * param`` for every shadow (fast paths); followed ones copy."""
        for group, parameters, follows in zip(self._groups, self._group_parameters, self._group_follows):
            group.update(first_copies(parameters), 0.0 if follows else decay)

    @property
    def parameters(self) -> NamedParameters:
        """The ``(name, Parameter)`` pairs this average tracks (after ``include``, ``exclude``, ``non_trainable``)."""
        return list(self._parameters)

    @property
    def shadows(self) -> Mapping[str, mx.nd.NDArray]:
        """The current averages by parameter name (read them, do not write)."""
        return dict(self._shadows)

    @property
    def is_assigned(self) -> bool:
        """Whether the network currently holds the averages."""
        return self._assigned

    # Swapping -----------------------------------------------------------------

    def assign_average_value(self) -> None:
        """Put the averages into every device copy, keeping the raw values.

        A second call before :meth:`restore` changes nothing: the raw values
        kept by the first call stay.
        """
        if self._assigned:
            logger.debug("averages already assigned; keeping the raw values saved first")
            return
        for name, parameter in self._parameters:
            copies = device_copies(name, parameter)
            backups = self._backups.get(name)
            if backups is None:
                self._backups[name] = [copy.copy() for copy in copies]
            else:
                for copy, backup in zip(copies, backups):
                    write_array(copy, backup)
        write_into_parameters(self._shadows, self._parameters, "the moving average")
        self._assigned = True

    def restore(self) -> None:
        """Put the raw values back after :meth:`assign_average_value` (no-op otherwise)."""
        if not self._assigned:
            return
        for name, parameter in self._parameters:
            for copy, backup in zip(device_copies(name, parameter), self._backups[name]):
                write_array(backup, copy)
        self._assigned = False

    def keep_average_value(self) -> None:
        """Leave the averages in the network for good (e.g. at the end of training)."""
        self.assign_average_value()
        self._assigned = False

    @contextlib.contextmanager
    def average_parameters(self) -> Iterator[None]:
        """Context manager: averages in on entry, raw values back on exit (also on error)."""
        was_assigned = self._assigned
        self.assign_average_value()
        try:
            yield
        finally:
            if not was_assigned:
                self.restore()

    # State --------------------------------------------------------------------

    def counters(self) -> Dict[str, Any]:
        """The counters a resumed run needs, as JSON-ready values."""
        return {"num_applied": self.num_applied, "num_steps": self.num_steps, "start_step": self.start_step}

    def state_dict(self) -> Dict[str, Any]:
        """Plain data to resume from: shadows as NumPy arrays and the counters."""
        return {
            "type": type(self).__name__,
            **self.counters(),
            "shadows": {name: shadow.asnumpy() for name, shadow in self._shadows.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` into the parameters this object tracks.

        Shadows are copied into the existing arrays: the object keeps
        following the live parameters, never copies of them. ``num_steps``
        and ``start_step`` are optional (states saved before they existed).
        Everything is checked (:meth:`check_state_dict`) before anything changes.
        """
        values = self.check_state_dict(state)
        for name, shadow in self._shadows.items():
            values[name].copyto(shadow)
        self.num_applied = int(state["num_applied"])
        self.num_steps = int(state.get("num_steps", self.num_applied))
        self.start_step = state.get("start_step", self.start_step)

    def check_state_dict(self, state: Mapping[str, Any]) -> Dict[str, mx.nd.NDArray]:
        """The state's shadows as arrays, once every key, count, name and shape is checked; changes nothing.

        Raises
        ------
        KeyError
            A key or a shadow is missing, or a shadow is for an untracked parameter.
        ValueError
            A counter is not an integer >= 0, or a shadow's shape differs.
        """
        missing = {"num_applied", "shadows"} - set(state)
        if missing:
            raise KeyError(f"moving-average state has no {sorted(missing)[0]!r}")
        for key in ("num_applied", "num_steps"):
            if key in state:
                check_integer(f"moving-average state {key!r}", state[key], 0, ValueError)
        if state.get("start_step") is not None:
            check_integer("moving-average state 'start_step'", state["start_step"], 0, ValueError)
        shadows = state["shadows"]
        if not isinstance(shadows, Mapping):
            raise ValueError("moving-average state: 'shadows' is not a mapping of name to array")
        unknown = sorted(set(shadows) - set(self._shadows))
        if unknown:
            raise KeyError(f"moving-average state has shadow {unknown[0]!r} for a parameter that is not tracked")
        values = {name: mx.nd.array(np.asarray(_as_numpy(value))) for name, value in shadows.items()}
        check_compatible(values, list(self._shadows.items()), "moving-average state")
        return values


def check_schedule_arguments(start_step: Optional[int], update_every: int, non_trainable: str) -> None:
    """Refuse, naming the option and its range, the shared options' bad values."""
    if start_step is not None:
        check_integer("start_step", start_step, 0)
    check_integer("update_every", update_every, 1)
    check_choice("non_trainable", non_trainable, NON_TRAINABLE_CHOICES)


def _patterns(option: str, patterns: Union[None, str, Sequence[str]]) -> Optional[List[str]]:
    """Name patterns as a list (one string is one pattern); ``None`` stays ``None``."""
    if patterns is None:
        return None
    patterns = [patterns] if isinstance(patterns, str) else patterns
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(pattern, str) and pattern for pattern in patterns):
        raise ConfigurationError(f"{option} must be a list of name patterns such as ['*weight'], got {patterns!r}")
    return list(patterns)


def _as_numpy(value: Any) -> np.ndarray:
    return value.asnumpy() if isinstance(value, mx.nd.NDArray) else np.asarray(value)


@MovingAverage.register("exponential")
class ExponentialMovingAverage(MovingAverage):
    """Exponential moving average: ``shadow = d * shadow + (1 - d) * param``.

    Use it to evaluate and ship a smoothed version of the weights when the
    last iterate is noisy (constant or slowly decaying learning rate, small
    batches). It keeps one copy of the weights (float32 for float16 ones),
    updated by each ``apply`` call; ``decay`` sets how many recent updates
    the average spans.

    Parameters
    ----------
    decay
        The decay ``d``, in [0, 1]: the average spans roughly the last
        ``1 / (1 - decay)`` updates (0.9999: 10,000); 0 keeps the latest weights.
    numerator
        Warm-up numerator, a finite number >= 0: with ``warmup="ratio"``, after
        ``n`` averaged steps ``d = min(decay, (numerator + n) / (denominator + n))``.
    denominator
        Warm-up denominator, a finite number > 0; the defaults start at
        ``d = 0.18`` and reach 0.999 after about 9,000 updates.
    warmup
        How the decay grows to ``decay`` (when ``apply`` is given
        ``num_updates``): ``"ratio"`` (TensorFlow's and AllenNLP's, above),
        ``"power"`` (timm's ``1 - (1 + n / warmup_gamma) ** -warmup_power``),
        or ``"none"`` (``decay`` from the first step).
    warmup_gamma
        timm's ``gamma``, a finite number > 0 (``warmup="power"``).
    warmup_power
        timm's ``power``, a finite number > 0 (``warmup="power"``): 3/4
        reaches 0.999 after about 10,000 steps, 2/3 after about 31,600.
    **options
        The options every moving average takes (``shadow_context``,
        ``start_step``, ``update_every``, ``non_trainable``, ``include``,
        ``exclude``): see :class:`MovingAverage`.

    Examples
    --------
    >>> ema = ExponentialMovingAverage(net.collect_params().items(), decay=0.999)  # doctest: +SKIP
    >>> trainer.step(batch_size); ema.apply(num_updates=step)                     # doctest: +SKIP
    >>> with ema.average_parameters():                                            # doctest: +SKIP
    ...     evaluate(net)
    """

    def __init__(
        self,
        parameters: Iterable[Tuple[str, ParameterLike]],
        decay: float = 0.9999,
        numerator: float = 1.0,
        denominator: float = 10.0,
        warmup: str = "ratio",
        warmup_gamma: float = 1.0,
        warmup_power: float = 0.75,
        **options: Any,
    ) -> None:
        check_exponential_arguments(decay, numerator, denominator)
        check_choice("warmup", warmup, WARMUP_CHOICES)
        check_number("warmup_gamma", warmup_gamma, 0.0, open_low=True)
        check_number("warmup_power", warmup_power, 0.0, open_low=True)
        super().__init__(parameters, **options)
        self.decay = float(decay)
        self.numerator = float(numerator)
        self.denominator = float(denominator)
        self.warmup = warmup
        self.warmup_gamma = float(warmup_gamma)
        self.warmup_power = float(warmup_power)

    def step_decay(self, steps_since_start: Optional[int]) -> float:
        """``decay``, warmed up as ``warmup`` says over the averaged steps (this one included).

        The warm-up counts averaged steps, not optimiser steps: with
        ``update_every=2`` the 4th averaged step uses ``n = 4``. No warm-up
        when the caller gives no ``num_updates`` (``steps_since_start`` is ``None``).
        """
        if steps_since_start is None or self.warmup == "none":
            return self.decay
        averaged = self.num_applied + 1
        if self.warmup == "power":
            return power_warmup_decay(self.decay, averaged, self.warmup_gamma, self.warmup_power)
        return exponential_decay(self.decay, averaged, self.numerator, self.denominator)


@MovingAverage.register("cumulative")
class CumulativeMovingAverage(MovingAverage):
    """Equal-weight running mean of the weights (SWA, Polyak averaging), or polynomial-decay weights.

    Use it to average a fixed stretch of training (e.g. the last epochs at a
    constant or cyclic learning rate, as SWA does, with ``start_step`` or a
    trigger) rather than a window that slides: every averaged step counts
    equally (``eta = 0``), however long the run. The first averaged step
    copies the weights (those at construction are not counted, as in
    PyTorch's ``AveragedModel`` and GluonTS's iteration averaging); the n-th
    moves each shadow by ``(eta + 1) / (eta + n)`` of its distance to the
    weights.

    Parameters
    ----------
    eta
        Polynomial decay, a finite number >= 0: 0 gives the arithmetic mean;
        larger values weight later updates more (GluonTS's ``eta``).
    **options
        The options every moving average takes: see :class:`MovingAverage`.
    """

    def __init__(self, parameters: Iterable[Tuple[str, ParameterLike]], eta: float = 0.0, **options: Any) -> None:
        check_number("eta", eta, 0.0)
        super().__init__(parameters, **options)
        self.eta = float(eta)

    def step_decay(self, steps_since_start: Optional[int]) -> float:
        """``1 - (eta + 1) / (eta + n)`` for the n-th averaged step (the optimiser's step count plays no part)."""
        return cumulative_decay(self.eta, self.num_applied + 1)


@MovingAverage.register("power")
class PowerMovingAverage(MovingAverage):
    """Power-function EMA (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models", 2024).

    Use it when the right averaging length should not depend on how long
    training runs: the profile scales with the run, weighting step ``k`` of
    ``t`` roughly as ``k**gamma``, so it always covers the same fraction of
    training (``sigma_rel``: the profile's standard deviation relative to
    ``t``). The first averaged step copies the weights; the n-th uses the
    decay ``(1 - 1/n) ** (gamma + 1)``.

    Parameters
    ----------
    gamma
        The exponent, a finite number > 0; give ``gamma`` or ``sigma_rel``.
    sigma_rel
        The relative width instead, in (0, 0.2887): 0.05 averages about the
        last tenth of training, larger values longer; used when ``gamma`` is
        ``None``.
    **options
        The options every moving average takes: see :class:`MovingAverage`.
    """

    def __init__(
        self,
        parameters: Iterable[Tuple[str, ParameterLike]],
        gamma: Optional[float] = None,
        sigma_rel: Optional[float] = 0.05,
        **options: Any,
    ) -> None:
        if gamma is None:
            if sigma_rel is None:
                raise ConfigurationError("give gamma or sigma_rel")
            gamma = sigma_rel_to_gamma(sigma_rel)
        check_number("gamma", gamma, 0.0, open_low=True)
        super().__init__(parameters, **options)
        self.gamma = float(gamma)

    def step_decay(self, steps_since_start: Optional[int]) -> float:
        """``(1 - 1/n) ** (gamma + 1)`` for the n-th averaged step."""
        return power_decay(self.gamma, self.num_applied + 1)
