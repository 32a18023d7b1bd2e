"""Post-hoc EMA: any power-function EMA, rebuilt after training from a few saved ones.

Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion
Models" (2024), sec. 3. During training,
:class:`~modavg_plugin.snapshots.PostHocSnapshots` keeps a few power-function
EMAs and now and then saves each as a *snapshot*. After training,
:func:`reconstruct_posthoc` approximates the EMA of any other width
(``sigma_rel`` or ``gamma``) at any saved step by a linear combination of the
snapshots, so the averaging length can be chosen by validation instead of
before training.

The maths is discrete. After ``t`` applies, an average with exponent
``gamma`` gives the weights of training step ``k`` the weight
``w_{t,gamma}(k) = (k**(gamma+1) - (k-1)**(gamma+1)) / t**(gamma+1)`` for
``k <= t`` and 0 after (:func:`power_profile`), so snapshot ``i`` is
``sum_k w_i(k) theta_k`` and ``sum_i x_i snapshot_i = sum_k (sum_i x_i w_i(k)) theta_k``.
:func:`posthoc_coefficients` chooses ``x`` by least squares so that
``sum_i x_i w_i`` is close to the target profile, and reports the L1 norm
``r`` of the difference: the exact combination differs from the true target
EMA by at most ``r * max_k |theta_k|``, element by element. The snapshots
are float32 EMAs, each off by up to about :func:`snapshot_error` ``* max|theta|``;
the coefficients multiply that, so :attr:`PosthocPlan.error_bound` is
``r + sum_i |x_i| snapshot_error(t_i)``, and a warning is logged when it is
above :data:`~modavg_plugin.profiles.POOR_RESIDUAL`. The cost does not grow with the run's length
(see :func:`posthoc_coefficients`).
"""

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from .averages import MAX_SIGMA_REL, sigma_rel_to_gamma
from .checks import CheckpointError, check_number, list_some, shown_value
from .files import save_params
from .folders import POSTHOC_INFO_SUFFIX, read_posthoc_snapshots
from .params_files import ParamsFileReader
from .profiles import (
    MAX_GAMMA,
    MAX_STEP,
    MIN_SIGMA_REL,
    POOR_RESIDUAL,
    check_snapshot_limits,
    posthoc_coefficients,
    power_profile,
    sigma_rel_of,
    snapshot_error,
)
from .registry import ConfigurationError
from .snapshots import PostHocSnapshots
from .weighted_sum import WeightedSum, add_checkpoint_file, is_finite_file

__all__ = [
    "MAX_GAMMA",
    "MAX_STEP",
    "MIN_SIGMA_REL",
    "POSTHOC_INFO_SUFFIX",
    "PostHocSnapshots",
    "PosthocPlan",
    "check_output_path",
    "check_snapshot_limits",
    "combine_snapshots",
    "plan_posthoc",
    "posthoc_coefficients",
    "power_profile",
    "read_posthoc_snapshots",
    "reconstruct_posthoc",
    "save_posthoc",
    "snapshot_error",
]

logger = logging.getLogger(__name__)

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
        """The ``.params`` files combined, in the order of ``snapshots``."""
        return [record["params_path"] for record in self.snapshots]

    @property
    def rounding_bound(self) -> float:
        """``sum_i |x_i| snapshot_error(step_i)``: the snapshots' float32 error as the coefficients scale it."""
        return sum(abs(x) * snapshot_error(record["step"]) for x, record in zip(self.coefficients, self.snapshots))

    @property
    def error_bound(self) -> float:
        """``residual + rounding_bound``: the result is within ``error_bound * max_k |theta_k|`` of the exact EMA."""
        return self.residual + self.rounding_bound


def plan_posthoc(
    folder: str,
    *,
    sigma_rel: Optional[float] = None,
    gamma: Optional[float] = None,
    step: Optional[int] = None,
    run: Optional[str] = None,
    report: bool = True,
) -> PosthocPlan:
    """The coefficients rebuilding the target EMA from the usable snapshots in ``folder`` (values not read).

    A warning is logged when :attr:`PosthocPlan.error_bound` is above
    :data:`~modavg_plugin.profiles.POOR_RESIDUAL`.

    Parameters
    ----------
    folder
        A folder :class:`~modavg_plugin.PostHocSnapshots` saved into.
    sigma_rel
        The target's relative width, in (0, 0.2887); give it or ``gamma``.
    gamma
        The target's exponent, a finite number > 0.
    step
        The training step to rebuild the EMA at, between the first and the
        last snapshot's step (later steps are in no snapshot); default: the
        last. Every snapshot up to it is used; records beyond
        :data:`~modavg_plugin.profiles.MAX_STEP` or :data:`~modavg_plugin.profiles.MAX_GAMMA` are skipped with a warning.

    run
        The run whose snapshots to use (their ``run_id``), when the folder
        holds several runs' (refused without it).

    report
        Log the error bound (a warning above 0.1); ``False`` for callers that
        judge it themselves.

    Raises
    ------
    ConfigurationError
        Not exactly one of ``sigma_rel`` and ``gamma``, or a value out of range.
    CheckpointError
        ``folder`` holds no usable snapshot (see :func:`read_posthoc_snapshots`).
    """
    target_gamma = _target_gamma(sigma_rel, gamma)
    records = read_posthoc_snapshots(folder, run=run)
    target_step = _target_step(step, records, folder)
    used = tuple(record for record in records if record["step"] <= target_step)
    pairs = [(record["gamma"], record["step"]) for record in used]
    coefficients, residual = posthoc_coefficients(pairs, target_gamma, target_step)
    shown_sigma_rel = float(sigma_rel) if sigma_rel is not None else sigma_rel_of(target_gamma)
    plan = PosthocPlan(
        os.fspath(folder), target_gamma, shown_sigma_rel, target_step, used, tuple(coefficients.tolist()), residual
    )
    if report:
        _log_bound(plan)
    return plan


def _target_gamma(sigma_rel: Optional[float], gamma: Optional[float]) -> float:
    if (sigma_rel is None) == (gamma is None):
        given = "both" if sigma_rel is not None else "neither"
        raise ConfigurationError(
            f"give exactly one of sigma_rel (in (0, {MAX_SIGMA_REL:.4f})) and gamma (> 0), got {given}"
        )
    if gamma is not None:
        return check_snapshot_limits(1, gamma, ConfigurationError)[1]
    sigma_rel = check_number("sigma_rel", sigma_rel, 0.0, MAX_SIGMA_REL, open_low=True, open_high=True)
    if sigma_rel < MIN_SIGMA_REL:
        raise ConfigurationError(
            f"sigma_rel must be at least {MIN_SIGMA_REL:g} (gamma at most {MAX_GAMMA:g}), got {shown_value(sigma_rel)}"
        )
    return sigma_rel_to_gamma(sigma_rel)


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


def _log_bound(plan: PosthocPlan) -> None:
    message = (
        f"post-hoc EMA of sigma_rel {plan.sigma_rel:.4g} at step {plan.step}: error bound {plan.error_bound:.3g} "
        f"(residual {plan.residual:.3g}, float32 rounding {plan.rounding_bound:.3g}) from {len(plan.snapshots)} snapshots"
    )
    if plan.error_bound <= POOR_RESIDUAL:
        logger.info("%s", message)
        return
    hints = []
    if plan.residual > POOR_RESIDUAL:
        hints.append("the snapshots cannot express this profile well; track widths closer to it or save more often")
    if plan.residual <= POOR_RESIDUAL or plan.rounding_bound > plan.residual:
        largest = max(abs(x) for x in plan.coefficients)
        hints.append(f"coefficients up to {largest:.3g} or a long run multiply the float32 rounding of the snapshots")
    logger.warning("%s (above %g: %s)", message, POOR_RESIDUAL, "; ".join(hints))


def combine_snapshots(plan: PosthocPlan, progress: Optional[Callable[[str], None]] = None) -> Dict[str, mx.nd.NDArray]:
    """``sum_i x_i snapshot_i`` exactly (not divided by ``sum_i x_i``), streamed one file at a time.

    The sums are kept in float32 or wider (:class:`~modavg_plugin.weighted_sum.WeightedSum`), one model
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
    """:class:`~modavg_plugin.CheckpointError` unless ``output`` can be written: no folder, in an existing folder, no snapshot."""
    if not output.strip():
        raise CheckpointError("the output is an empty name; give a file name with -o OUT")
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
    run: Optional[str] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> Tuple[Dict[str, mx.nd.NDArray], PosthocPlan]:
    """The power-function EMA of ``sigma_rel`` (or ``gamma``) at ``step``, rebuilt from the snapshots in ``folder``.

    :func:`~modavg_plugin.posthoc.plan_posthoc` (its arguments and errors), then
    :func:`~modavg_plugin.posthoc.combine_snapshots`: the arrays are ``sum_i x_i snapshot_i`` with
    the signed coefficients, within ``plan.error_bound * max_k |theta_k|`` of
    the true EMA, element by element.

    Returns
    -------
    Tuple[Dict[str, mx.nd.NDArray], PosthocPlan]
        The arrays by (Gluon) name, on the CPU, and the plan (coefficients, residual).
    """
    plan = plan_posthoc(folder, sigma_rel=sigma_rel, gamma=gamma, step=step, run=run)
    return combine_snapshots(plan, progress), plan


def save_posthoc(
    folder: str,
    output: str,
    *,
    sigma_rel: Optional[float] = None,
    gamma: Optional[float] = None,
    step: Optional[int] = None,
    run: Optional[str] = None,
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
    plan = plan_posthoc(folder, sigma_rel=sigma_rel, gamma=gamma, step=step, run=run)
    check_output_path(output, plan)
    save_params(output, combine_snapshots(plan, progress))
    return output
