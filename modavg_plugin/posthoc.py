"""Post-hoc EMA: any power-function EMA, rebuilt after training from a few saved ones.

Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion
Models" (2024), sec. 3. During training,
:class:`~modavg_plugin.snapshots.PostHocSnapshots` keeps a few power-function
EMAs and now and then saves each as a *snapshot*. After training,
:func:`reconstruct_posthoc` approximates the EMA of any other width
(``sigma_rel`` or ``gamma``) at any saved step by a linear combination of the
snapshots, so the averaging length can be chosen by validation instead of
before training.

The maths is exact and discrete. After ``t`` applies, an average with exponent
``gamma`` gives the weights of training step ``k`` the weight
``w_{t,gamma}(k) = (k**(gamma+1) - (k-1)**(gamma+1)) / t**(gamma+1)`` for
``k <= t`` and 0 after (:func:`power_profile`), so snapshot ``i`` is
``sum_k w_i(k) theta_k`` and ``sum_i x_i snapshot_i = sum_k (sum_i x_i w_i(k)) theta_k``.
:func:`posthoc_coefficients` chooses ``x`` by least squares so that
``sum_i x_i w_i`` is close to the target profile, and reports the L1 norm
``r`` of the difference: the reconstruction then differs from the true
target EMA by at most ``r * max_k |theta_k|``, element by element.
"""

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Type, Union

import mxnet as mx
import numpy as np

from .averages import MAX_SIGMA_REL, sigma_rel_to_gamma
from .checks import CheckpointError, check_integer, check_number, list_some, shown_value
from .files import save_params
from .folders import POSTHOC_INFO_SUFFIX, read_posthoc_snapshots
from .params_files import ParamsFileReader
from .registry import ConfigurationError
from .snapshots import PostHocSnapshots
from .weighted_sum import WeightedSum, add_checkpoint_file, is_finite_file

__all__ = [
    "POSTHOC_INFO_SUFFIX",
    "PostHocSnapshots",
    "PosthocPlan",
    "check_output_path",
    "combine_snapshots",
    "plan_posthoc",
    "posthoc_coefficients",
    "power_profile",
    "read_posthoc_snapshots",
    "reconstruct_posthoc",
    "save_posthoc",
]

logger = logging.getLogger(__name__)

PROFILE_CHUNK_STEPS = 1 << 16  # steps per block of profiles: 40 snapshots x 65,536 steps is 21 MB of float64
POOR_RESIDUAL = 0.1  # a residual above this is logged as a warning: the snapshots cannot express the target


# The maths ------------------------------------------------------------------------------------


def power_profile(gamma: float, step: int, positions: Union[Sequence[int], np.ndarray]) -> np.ndarray:
    """The weight a power-function EMA with exponent ``gamma`` gives each of ``positions`` after ``step`` applies.

    ``w(k) = (k**(gamma+1) - (k-1)**(gamma+1)) / step**(gamma+1)`` for
    ``1 <= k <= step`` and 0 for ``k > step``, in float64, computed as
    ``-expm1((gamma+1) log1p(-1/k)) * (k/step)**(gamma+1)`` (no cancellation,
    no overflow for large ``k``). Over ``k = 1..step`` the weights sum to 1.

    Parameters
    ----------
    gamma
        The exponent, a finite number > 0.
    step
        The number of applies, an integer >= 1.
    positions
        The 1-based training steps ``k`` (integers >= 1).
    """
    _check_positive("gamma", gamma, ValueError)
    _check_step("step", step)
    positions = np.asarray(positions, dtype=np.float64)
    if positions.size and positions.min() < 1:
        raise ValueError(f"positions must be integers >= 1, got {positions.min()!r}")
    profile = _profiles(np.array([float(gamma)]), np.array([float(step)]), positions.reshape(-1))[0]
    return profile.reshape(positions.shape)


def _profiles(gammas: np.ndarray, steps: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The profiles of averages ``(gammas[i], steps[i])`` at ``positions``: shape ``(len(gammas), len(positions))``."""
    exponents = (gammas + 1.0)[:, None]
    with np.errstate(divide="ignore"):
        log_previous_fraction = np.log1p(-1.0 / positions)[None, :]  # log((k-1)/k): -inf at k = 1
    increments = -np.expm1(exponents * log_previous_fraction)  # 1 - ((k-1)/k)**(gamma+1)
    fractions = positions[None, :] / steps[:, None]
    scales = np.power(np.minimum(fractions, 1.0), exponents)  # (k/t)**(gamma+1); clipped past t (masked below)
    return np.where(fractions <= 1.0, increments * scales, 0.0)


def _check_positive(name: str, value: Any, error: Type[ValueError]) -> float:
    return check_number(name, value, 0.0, open_low=True, error=error)


def _check_step(name: str, value: Any) -> int:
    return check_integer(name, value, 1, ValueError)


def posthoc_coefficients(
    snapshots: Sequence[Tuple[float, int]],
    target_gamma: float,
    target_step: int,
    chunk_steps: int = PROFILE_CHUNK_STEPS,
) -> Tuple[np.ndarray, float]:
    """The least-squares coefficients ``x`` with ``sum_i x_i w_i`` closest to the target profile, and the residual.

    Profiles are the exact discrete ones of :func:`power_profile` over
    ``k = 1..target_step``. The normal equations are accumulated
    ``chunk_steps`` steps at a time (memory: ``len(snapshots) * chunk_steps``
    floats, whatever the run's length) and solved with ``numpy.linalg.lstsq``.

    Parameters
    ----------
    snapshots
        ``(gamma_i, step_i)`` of each saved average; every ``step_i`` at most
        ``target_step`` (a later snapshot holds weights of later steps:
        leave it out).
    target_gamma
        The exponent of the wanted average, a finite number > 0.
    target_step
        The step of the wanted average, an integer >= 1.
    chunk_steps
        Steps per accumulated block.

    Returns
    -------
    Tuple[np.ndarray, float]
        ``x`` (float64, one per snapshot, signed) and the L1 norm of the
        residual profile, ``sum_k |sum_i x_i w_i(k) - w_target(k)|``: the
        reconstruction is within ``residual * max_k |theta_k|`` of the true
        target average, element by element.

    Raises
    ------
    ValueError
        ``snapshots`` is empty, holds a bad ``gamma`` or ``step`` or one
        after ``target_step``; or a target is out of range (naming it).
    """
    _check_positive("target_gamma", target_gamma, ValueError)
    _check_step("target_step", target_step)
    _check_step("chunk_steps", chunk_steps)
    gammas, steps = _checked_snapshots(snapshots, target_step)
    target = (np.array([float(target_gamma)]), np.array([float(target_step)]))
    gram = np.zeros((len(gammas), len(gammas)))
    products = np.zeros(len(gammas))
    for positions in _position_chunks(target_step, chunk_steps):
        profiles = _profiles(gammas, steps, positions)
        gram += profiles @ profiles.T
        products += profiles @ _profiles(*target, positions)[0]
    coefficients = np.linalg.lstsq(gram, products, rcond=None)[0]
    residual = sum(
        float(np.abs(coefficients @ _profiles(gammas, steps, positions) - _profiles(*target, positions)[0]).sum())
        for positions in _position_chunks(target_step, chunk_steps)
    )
    return coefficients, residual


def _checked_snapshots(snapshots: Sequence[Tuple[float, int]], target_step: int) -> Tuple[np.ndarray, np.ndarray]:
    """The snapshots' gammas and steps as float64 arrays, each checked; ``ValueError`` naming the first bad one."""
    pairs = list(snapshots)
    if not pairs:
        raise ValueError("snapshots is empty: nothing to combine")
    for index, (gamma, step) in enumerate(pairs):
        _check_positive(f"the gamma of snapshot {index}", gamma, ValueError)
        _check_step(f"the step of snapshot {index}", step)
        if step > target_step:
            raise ValueError(
                f"snapshot {index} is of step {step}, after target_step {target_step}: "
                "it holds weights of later steps; leave it out"
            )
    return np.array([float(gamma) for gamma, _ in pairs]), np.array([float(step) for _, step in pairs])


def _position_chunks(last: int, chunk_steps: int) -> Iterator[np.ndarray]:
    """The steps ``1..last`` as float64 arrays of at most ``chunk_steps`` values."""
    for start in range(1, last + 1, chunk_steps):
        yield np.arange(start, min(start + chunk_steps, last + 1), dtype=np.float64)


def _sigma_rel_of(gamma: float) -> float:
    """The relative width of the power-function profile with exponent ``gamma`` (Karras et al., eq. 3)."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


# Reconstruction -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PosthocPlan:
    """What a reconstruction combines: the target, the snapshots used and their signed coefficients."""

    folder: str
    gamma: float
    sigma_rel: float
    step: int
    snapshots: Tuple[Dict[str, Any], ...]  # records of read_posthoc_snapshots, by step then gamma
    coefficients: Tuple[float, ...]
    residual: float  # sum_k |combined profile(k) - target profile(k)|

    @property
    def paths(self) -> List[str]:
        """The ``.params`` files combined, in the order of :attr:`snapshots`."""
        return [record["params_path"] for record in self.snapshots]


def plan_posthoc(
    folder: str, *, sigma_rel: Optional[float] = None, gamma: Optional[float] = None, step: Optional[int] = None
) -> PosthocPlan:
    """The coefficients rebuilding the target EMA from the usable snapshots in ``folder`` (values not read).

    Parameters
    ----------
    folder
        A folder :class:`PostHocSnapshots` saved into.
    sigma_rel
        The target's relative width, in (0, 0.2887); give it or ``gamma``.
    gamma
        The target's exponent, a finite number > 0.
    step
        The training step to rebuild the EMA at, between the first and the
        last snapshot's step (later steps are in no snapshot); default: the
        last. Every snapshot up to it is used.

    Raises
    ------
    ConfigurationError
        Not exactly one of ``sigma_rel`` and ``gamma``, or a value out of range.
    CheckpointError
        ``folder`` holds no usable snapshot (see :func:`read_posthoc_snapshots`).
    """
    target_gamma = _target_gamma(sigma_rel, gamma)
    records = read_posthoc_snapshots(folder)
    target_step = _target_step(step, records, folder)
    used = tuple(record for record in records if record["step"] <= target_step)
    pairs = [(record["gamma"], record["step"]) for record in used]
    coefficients, residual = posthoc_coefficients(pairs, target_gamma, target_step)
    shown_sigma_rel = float(sigma_rel) if sigma_rel is not None else _sigma_rel_of(target_gamma)
    _log_residual(residual, shown_sigma_rel, target_step, len(used))
    return PosthocPlan(
        os.fspath(folder), target_gamma, shown_sigma_rel, target_step, used, tuple(coefficients.tolist()), residual
    )


def _target_gamma(sigma_rel: Optional[float], gamma: Optional[float]) -> float:
    if (sigma_rel is None) == (gamma is None):
        given = "both" if sigma_rel is not None else "neither"
        raise ConfigurationError(
            f"give exactly one of sigma_rel (in (0, {MAX_SIGMA_REL:.4f})) and gamma (> 0), got {given}"
        )
    if gamma is not None:
        _check_positive("gamma", gamma, ConfigurationError)
        return float(gamma)
    return sigma_rel_to_gamma(check_number("sigma_rel", sigma_rel, 0.0, MAX_SIGMA_REL, open_low=True, open_high=True))


def _target_step(step: Optional[int], records: Sequence[Mapping[str, Any]], folder: str) -> int:
    first, last = records[0]["step"], records[-1]["step"]
    if step is None:
        return last
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)) or not first <= step <= last:
        raise ConfigurationError(
            f"step must be an integer in [{first}, {last}] (the steps of the snapshots in {folder}), "
            f"got {shown_value(step)}"
        )
    return int(step)


def _log_residual(residual: float, sigma_rel: float, step: int, count: int) -> None:
    if residual > POOR_RESIDUAL:
        logger.warning(
            "post-hoc EMA of sigma_rel %.4g at step %d: residual %.3g from %d snapshots (above %g: the snapshots "
            "cannot express this profile well; track widths closer to it or save more often)",
            sigma_rel,
            step,
            residual,
            count,
            POOR_RESIDUAL,
        )
    else:
        message = "post-hoc EMA of sigma_rel %.4g at step %d: residual %.3g from %d snapshots"
        logger.info(message, sigma_rel, step, residual, count)


def combine_snapshots(plan: PosthocPlan, progress: Optional[Callable[[str], None]] = None) -> Dict[str, mx.nd.NDArray]:
    """``sum_i x_i snapshot_i`` exactly (not divided by ``sum_i x_i``), streamed one file at a time.

    The sums are kept in float32 or wider (:class:`WeightedSum`), one model
    size in memory whatever the number of snapshots; arrays come back in
    their saved dtype on the CPU. Integer arrays are copied from the latest
    snapshot. ``progress(path)`` is called after each file.

    Raises
    ------
    CheckpointError
        A snapshot cannot be read, its names or shapes differ from another's,
        or the result is not finite (naming the snapshots holding NaN or inf).
    """
    total = WeightedSum()
    reader = ParamsFileReader()
    latest_first = sorted(zip(plan.snapshots, plan.coefficients), key=lambda pair: pair[0]["step"], reverse=True)
    for record, coefficient in latest_first:
        add_checkpoint_file(total, reader, record["params_path"], coefficient)
        if progress is not None:
            progress(record["params_path"])
    if not total.all_finite():
        raise CheckpointError(_non_finite_message(plan.paths))
    # WeightedSum.average divides by the total weight unless it is 1; the coefficients of a least-squares fit
    # sum only to about 1 (the fit's error), and the bound on the result holds for the plain sum.
    total.total_weight = 1.0
    return total.average()


def _non_finite_message(paths: Sequence[str]) -> str:
    culprits = [path for path in paths if not is_finite_file(path)]
    shown = list_some(culprits, ", ", ", ") if culprits else "none alone (the sum overflowed)"
    return f"the post-hoc EMA is not finite: NaN or infinite values in {shown}"


def check_output_path(output: str, plan: PosthocPlan) -> None:
    """:class:`CheckpointError` unless ``output`` can be written: no folder, in an existing folder, no snapshot."""
    if os.path.isdir(output):
        raise CheckpointError(f"output {output} is a folder; give a file name such as posthoc-ema.params")
    if not os.path.isdir(os.path.dirname(os.path.abspath(output))):
        raise CheckpointError(f"the folder of output {output} does not exist")
    if os.path.realpath(output) in {os.path.realpath(path) for path in plan.paths}:
        raise CheckpointError(f"output {output} is one of the snapshots being combined; choose another name")


def reconstruct_posthoc(
    folder: str,
    *,
    sigma_rel: Optional[float] = None,
    gamma: Optional[float] = None,
    step: Optional[int] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> Tuple[Dict[str, mx.nd.NDArray], PosthocPlan]:
    """The power-function EMA of ``sigma_rel`` (or ``gamma``) at ``step``, rebuilt from the snapshots in ``folder``.

    :func:`plan_posthoc` (its arguments and errors), then
    :func:`combine_snapshots`: the arrays are ``sum_i x_i snapshot_i`` with
    the signed least-squares coefficients, within
    ``plan.residual * max_k |theta_k|`` of the true EMA, element by element.

    Returns
    -------
    Tuple[Dict[str, mx.nd.NDArray], PosthocPlan]
        The arrays by (Gluon) name, on the CPU, and the plan (coefficients, residual).
    """
    plan = plan_posthoc(folder, sigma_rel=sigma_rel, gamma=gamma, step=step)
    return combine_snapshots(plan, progress), plan


def save_posthoc(
    folder: str,
    output: str,
    *,
    sigma_rel: Optional[float] = None,
    gamma: Optional[float] = None,
    step: Optional[int] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> str:
    """:func:`reconstruct_posthoc`, written atomically to ``output`` (``.params``; load it with :func:`~modavg_plugin.load_weights`).

    Returns
    -------
    str
        ``output``.

    Raises
    ------
    CheckpointError
        Also when ``output`` is a folder, its folder does not exist, or it is one of the snapshots.
    """
    plan = plan_posthoc(folder, sigma_rel=sigma_rel, gamma=gamma, step=step)
    check_output_path(output, plan)
    save_params(output, combine_snapshots(plan, progress))
    return output
