"""The power-function profiles of post-hoc EMA snapshots, their sums over steps, and the least-squares fit.

After ``t`` applies, an average with exponent ``gamma`` gives the weights of
training step ``k`` the weight ``w_{t,gamma}(k) = (k**(gamma+1) - (k-1)**(gamma+1)) / t**(gamma+1)``
for ``k <= t`` and 0 after (:func:`power_profile`). :func:`posthoc_coefficients`
fits a combination of snapshot profiles to a target profile by least squares;
its sums over steps are exact where that is cheap and otherwise computed by
quadrature with a stated accuracy, so the cost does not grow with the run's
length. :func:`check_snapshot_limits` says which steps and exponents that holds for.
"""

import math
from typing import Any, Iterator, List, Sequence, Tuple, Type, Union

import numpy as np

from .averages import MIN_SIGMA_REL
from .checks import check_integer, check_number, shown_value

__all__ = [
    "MAX_GAMMA",
    "MAX_STEP",
    "MIN_SIGMA_REL",
    "POOR_RESIDUAL",
    "check_snapshot_limits",
    "posthoc_coefficients",
    "power_profile",
    "sigma_rel_of",
    "snapshot_error",
]

PROFILE_CHUNK_STEPS = 1 << 16  # steps per block of profiles: 40 snapshots x 65,536 steps is 21 MB of float64
POOR_RESIDUAL = 0.1  #: an error bound above this is logged as a warning
MAX_STEP = 10**15  #: longer than any run; below 2**52 every half step is exact in float64
MAX_GAMMA = 1e6  #: sigma_rel 1e-6: a profile a millionth of the run wide; narrower ones average nothing
SNAPSHOT_ERROR = 2.0**-19  # float32 error of a snapshot and the sum, per |x_i|, in max|theta| (measured <= 22 * 2**-24)
SNAPSHOT_ERROR_PER_STEP = 2.0**-31  # its growth with the step (float32 EMA rounding; measured about 2**-34)
EXACT_STEPS = 1 << 16  # steps below max(EXACT_STEPS, SMOOTH_SCALE * (gamma + 1)) are summed term by term
SMOOTH_SCALE = 1024  # there k / (gamma_i + gamma_j + 1) >= 512: Euler-Maclaurin's next term is below 2e-14
SHORT_STRETCH = 1 << 12  # stretches between snapshot steps shorter than this are summed term by term
EIGENVALUE_CUTOFFS = (1e-14, 1e-12, 1e-10, 1e-8, 1e-6)  # truncated fits tried besides plain least squares

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(16)  # integrates exp(s y) to 1e-15 for s * interval <= 20
_SPAN = 12.0  # at the top of a stretch: steepness * interval length, in log steps
_GRADING = 0.5  # further down: interval length / distance from the top, in log steps (steeper terms are < e**-24)
_LONGEST = 1.0  # and at most this (a ratio of e in steps)
_NEGLIGIBLE = 1e-20  # weights below _NEGLIGIBLE / last**2 are left out: relative error below 1e-19 on any sum


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
    check_number("gamma", gamma, 0.0, open_low=True, error=ValueError)
    check_integer("step", step, 1, ValueError)
    positions = np.asarray(positions, dtype=np.float64)
    if positions.size and positions.min() < 1:
        raise ValueError(f"positions must be integers >= 1, got {positions.min()!r}")
    profile = _profiles(np.array([float(gamma) + 1.0]), np.array([float(step)]), positions.reshape(-1))[0]
    return profile.reshape(positions.shape)


def _profiles(exponents: np.ndarray, steps: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The profiles of exponents ``gamma + 1`` after ``steps`` at integer ``positions``: one row each."""
    exponents = exponents[:, None]
    with np.errstate(divide="ignore"):
        log_previous_fraction = np.log1p(-1.0 / positions)[None, :]  # log((k-1)/k): -inf at k = 1
    increments = -np.expm1(exponents * log_previous_fraction)  # 1 - ((k-1)/k)**(gamma+1)
    fractions = positions[None, :] / steps[:, None]
    scales = np.power(np.minimum(fractions, 1.0), exponents)  # (k/t)**(gamma+1); clipped past t (masked below)
    return np.where(fractions <= 1.0, increments * scales, 0.0)


def _smooth_profiles(exponents: np.ndarray, steps: np.ndarray, top: float, offsets: np.ndarray):
    """The profiles and slopes ``d/dx`` at ``x = top - offsets``, not cut at ``t`` (``top - t`` is exact: a half step)."""
    exponents, x = exponents[:, None], top - offsets
    log_previous_fraction = np.log1p(-1.0 / x)[None, :]
    scales = np.exp(exponents * np.log1p(((top - steps)[:, None] - offsets[None, :]) / steps[:, None]))
    values = -np.expm1(exponents * log_previous_fraction) * scales
    slopes = -np.expm1((exponents - 1.0) * log_previous_fraction) * scales * exponents / x[None, :]
    return values, slopes


def check_snapshot_limits(
    step: Any, gamma: Any, error: Type[ValueError] = ValueError, names: Tuple[str, str] = ("step", "gamma")
) -> Tuple[int, float]:
    """``(step, gamma)`` as ``(int, float)``: ``error`` naming the field and the limit unless ``1 <= step <=``
    :data:`~modavg_plugin.profiles.MAX_STEP` and ``0 < gamma <=`` :data:`~modavg_plugin.profiles.MAX_GAMMA` (for readers of snapshot records too)."""
    step = check_integer(names[0], step, 1, error)
    gamma = check_number(names[1], gamma, 0.0, open_low=True, error=error)
    if step > MAX_STEP:
        raise error(f"{names[0]} must be at most 10**15 (longer than any run), got {shown_value(step)}")
    if gamma > MAX_GAMMA:
        raise error(f"{names[1]} must be at most {MAX_GAMMA:g} (sigma_rel about {MIN_SIGMA_REL:g}), got {gamma!r}")
    return step, gamma


def snapshot_error(step: Union[int, np.ndarray]) -> Union[float, np.ndarray]:
    """How far a float32 snapshot of ``step`` steps, summed in float32, may be from its exact value, in ``max|theta|``.

    ``SNAPSHOT_ERROR`` ``+ step *`` ``SNAPSHOT_ERROR_PER_STEP``: the float32 EMA accumulates rounding
    over training (measured on random walks with drift: 5 to 22 ``* 2**-24`` after 2,000 steps, 254 after
    200,000, 4,500 after 10**6 in a float32 emulation), and the sum rounds each ``x_i snapshot_i``. An
    estimate, not a guarantee: the worst case grows as ``3 * 2**-24 * step / (gamma + 2)``.
    """
    return SNAPSHOT_ERROR + SNAPSHOT_ERROR_PER_STEP * step


def posthoc_coefficients(
    snapshots: Sequence[Tuple[float, int]],
    target_gamma: float,
    target_step: int,
    chunk_steps: int = PROFILE_CHUNK_STEPS,
) -> Tuple[np.ndarray, float]:
    """The coefficients ``x`` with ``sum_i x_i w_i`` closest to the target profile, and the residual.

    ``x`` is the least-squares fit over ``k = 1..target_step`` or, when the
    profiles are nearly collinear (e.g. tracked widths 0.05 and 0.0500001),
    a fit on the eigen-directions of the unit-diagonal Gram matrix above a
    cut-off of ``EIGENVALUE_CUTOFFS``: of these, the one with the least
    ``residual + sum_i |x_i| snapshot_error(step_i)``.

    Sums over steps of the discrete profiles (:func:`power_profile`) are
    taken term by term (``chunk_steps`` at a time) where a profile is not
    smooth at the scale of a step (below ``max(2**16, 1024 (gamma + 1))``)
    and over stretches under 4,096 steps; a longer stretch ``a..b`` between
    snapshot steps as ``integral_{a-1/2}^{b+1/2} f - [f']/24`` (midpoint
    Euler-Maclaurin, next term below ``2e-14``) by Gauss-Legendre on graded
    intervals of ``log k``, the L1 residual cut where the combined profile
    changes sign (found by bisection). Against exact sums up to 10**7 steps:
    Gram entries within ``3e-14`` of ``sqrt(G_ii G_jj)``, residuals ``2e-14``
    relative (closed forms: ``3e-15`` up to 10**15 steps). Time: 0.05 to 0.3 s
    for 80 snapshots at any ``target_step``; memory: ``len(snapshots) *
    chunk_steps`` floats.

    Parameters
    ----------
    snapshots
        ``(gamma_i, step_i)`` of each saved average; every ``step_i`` at most
        ``target_step`` (a later snapshot holds weights of later steps:
        leave it out).
    target_gamma
        The exponent of the wanted average, a finite number in (0, 1e6].
    target_step
        The step of the wanted average, an integer in [1, 10**15].
    chunk_steps
        Steps per block summed term by term.

    Returns
    -------
    Tuple[np.ndarray, float]
        ``x`` (float64, one per snapshot, signed) and the L1 norm of the
        residual profile, ``sum_k |sum_i x_i w_i(k) - w_target(k)|``: the
        exact combination is within ``residual * max_k |theta_k|`` of the
        true target average, element by element.

    Raises
    ------
    ValueError
        ``snapshots`` is empty, holds a bad ``gamma`` or ``step`` (beyond
        :func:`check_snapshot_limits`, or after ``target_step``), or a target
        is out of range (naming it).
    """
    _, target_gamma = check_snapshot_limits(target_step, target_gamma, names=("target_step", "target_gamma"))
    check_integer("chunk_steps", chunk_steps, 1, ValueError)
    gammas, steps = _checked_snapshots(snapshots, target_step)
    exponents = np.append(gammas, target_gamma) + 1.0  # the target last
    steps = np.append(steps, float(target_step))
    layout = _layout(exponents, steps, target_step)
    sums = _normal_sums(exponents, steps, layout, chunk_steps)
    candidates = _candidate_fits(sums[:-1, :-1], sums[:-1, -1])
    residuals = _residuals(candidates, exponents, steps, layout, chunk_steps)
    best = int(np.argmin(residuals + np.abs(candidates) @ snapshot_error(steps[:-1])))
    return candidates[best], float(residuals[best])


def _checked_snapshots(snapshots: Sequence[Tuple[float, int]], target_step: int) -> Tuple[np.ndarray, np.ndarray]:
    """The snapshots' gammas and steps as float64 arrays, each checked; ``ValueError`` naming the first bad one."""
    pairs = list(snapshots)
    if not pairs:
        raise ValueError("snapshots is empty: nothing to combine")
    for index, (gamma, step) in enumerate(pairs):
        check_snapshot_limits(step, gamma, names=(f"the step of snapshot {index}", f"the gamma of snapshot {index}"))
        if step > target_step:
            raise ValueError(
                f"snapshot {index} is of step {step}, after target_step {target_step}: "
                "it holds weights of later steps; leave it out"
            )
    return np.array([float(gamma) for gamma, _ in pairs]), np.array([float(step) for _, step in pairs])


def _candidate_fits(gram: np.ndarray, products: np.ndarray) -> np.ndarray:
    """Plain least squares, then each distinct fit on the eigen-directions of the unit-diagonal Gram matrix above
    a cut-off of ``EIGENVALUE_CUTOFFS`` (smaller coefficients, a larger residual): one fit per row."""
    fits = [np.linalg.lstsq(gram, products, rcond=None)[0]]
    scale = np.sqrt(np.diag(gram))
    values, vectors = np.linalg.eigh(gram / np.outer(scale, scale))  # ascending
    projections = vectors.T @ (products / scale)
    tried = {0}
    for cutoff in EIGENVALUE_CUTOFFS:
        dropped = int(np.searchsorted(values, cutoff * values[-1], side="right"))
        if dropped not in tried and dropped < len(values):
            tried.add(dropped)
            fits.append(vectors[:, dropped:] @ (projections[dropped:] / values[dropped:]) / scale)
    return np.array(fits)


Layout = Tuple[List[Tuple[int, int]], List[Tuple[int, int]], np.ndarray]


def _layout(exponents: np.ndarray, steps: np.ndarray, last: int) -> Layout:
    """Ranges summed term by term (each profile's steps below ``max(EXACT_STEPS, SMOOTH_SCALE * a)``, stretches
    under :data:`SHORT_STRETCH`), stretches ``(low, high)`` between snapshot steps left to quadrature, and each
    profile's first step not negligible (``(k/t)**a >= _NEGLIGIBLE / last**2``; earlier ones are left out)."""
    log_negligible = math.log(_NEGLIGIBLE) - 2.0 * math.log(last)
    starts = np.array([max(1, int(t * math.exp(log_negligible / a)) - 1) for a, t in zip(exponents, steps)])
    ends = np.minimum(steps, np.maximum(EXACT_STEPS, SMOOTH_SCALE * exponents)).astype(np.int64)
    ranges = _merged([(int(low), int(high)) for low, high in zip(starts, ends) if low <= high])
    breaks = sorted({int(step) for step in steps.tolist()})
    stretches = []
    gaps = zip([int(starts.min()) - 1] + [end for _, end in ranges], [start for start, _ in ranges] + [last + 1])
    for low, high in ((end + 1, start - 1) for end, start in gaps):
        for cut in [step for step in breaks if low <= step < high] + [high]:
            if low <= cut:
                (stretches if cut - low + 1 >= SHORT_STRETCH else ranges).append((low, cut))
                low = cut + 1
    return _merged(ranges), stretches, starts


def _merged(ranges: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    merged: List[Tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def _blocks(layout: Layout, steps: np.ndarray, chunk_steps: int) -> Iterator[Tuple[np.ndarray, Any]]:
    """``(rows, positions)`` per block of steps summed term by term, ``(rows, (low, high))`` per stretch: the
    rows are the profiles neither ended nor negligible there."""
    ranges, stretches, starts = layout
    for low, high in ranges:
        for start in range(low, high + 1, chunk_steps):
            positions = np.arange(start, min(start + chunk_steps, high + 1), dtype=np.float64)
            rows = np.flatnonzero((steps >= start) & (starts <= positions[-1]))
            if rows.size:
                yield rows, positions
    for low, high in stretches:
        rows = np.flatnonzero((steps >= high) & (starts <= high))
        if rows.size:
            yield rows, (low, high)


def _normal_sums(exponents: np.ndarray, steps: np.ndarray, layout: Layout, chunk_steps: int) -> np.ndarray:
    """``sum_k w_i(k) w_j(k)`` over ``k = 1..last`` for every pair of rows (the snapshots, then the target)."""
    sums = np.zeros((len(exponents), len(exponents)))
    for rows, block in _blocks(layout, steps, chunk_steps):
        if isinstance(block, tuple):
            sums[np.ix_(rows, rows)] += _stretch_sums(exponents[rows], steps[rows], *block)
        else:
            profiles = _profiles(exponents[rows], steps[rows], block)
            sums[np.ix_(rows, rows)] += profiles @ profiles.T
    return sums


def _residuals(candidates: np.ndarray, exponents: np.ndarray, steps: np.ndarray, layout: Layout, chunk_steps: int):
    """``sum_k |sum_i x_i w_i(k) - w_target(k)|`` for each row ``x`` of ``candidates``."""
    combinations = np.hstack([candidates, -np.ones((len(candidates), 1))])
    totals = np.zeros(len(candidates))
    for rows, block in _blocks(layout, steps, chunk_steps):
        if isinstance(block, tuple):
            totals += [_stretch_l1(row, exponents[rows], steps[rows], *block) for row in combinations[:, rows]]
        else:
            totals += np.abs(combinations[:, rows] @ _profiles(exponents[rows], steps[rows], block)).sum(axis=1)
    return totals


def _quadrature(low: int, high: int, steepness: float, cuts: Sequence[float] = ()):
    """Gauss-Legendre nodes over ``x`` in ``[low - 1/2, high + 1/2]`` as offsets below ``high + 1/2``, their
    weights and the interval edges: intervals of ``d = log((high + 1/2) / x)`` of ``_SPAN / steepness`` at the
    top, growing as ``_GRADING * d`` up to ``_LONGEST``; also cut at the offsets ``cuts``."""
    top, length = high + 0.5, float(high - low + 1)
    depth, distances = -math.log1p(-length / top), [0.0]
    while distances[-1] < depth:
        distances.append(distances[-1] + min(_LONGEST, max(_SPAN / steepness, _GRADING * distances[-1])))
    edges = np.unique(np.concatenate([np.minimum(-top * np.expm1(-np.array(distances)), length), [length], cuts]))
    half, middle = np.diff(edges)[:, None] / 2.0, (edges[:-1] + edges[1:])[:, None] / 2.0
    return (middle + half * _NODES).ravel(), (half * _WEIGHTS).ravel(), edges


def _stretch_sums(exponents: np.ndarray, steps: np.ndarray, low: int, high: int) -> np.ndarray:
    """``sum_{k=low}^{high} w_i(k) w_j(k)``: the integral over ``[low - 1/2, high + 1/2]`` minus ``[f']/24``."""
    offsets, weights, _ = _quadrature(low, high, 2.0 * exponents.max())
    values, _ = _smooth_profiles(exponents, steps, high + 0.5, offsets)
    ends, slopes = _smooth_profiles(exponents, steps, high + 0.5, np.array([0.0, high - low + 1.0]))
    correction = np.outer(slopes[:, 0], ends[:, 0]) - np.outer(slopes[:, 1], ends[:, 1])
    return (values * weights) @ values.T - (correction + correction.T) / 24.0


def _stretch_l1(combination: np.ndarray, exponents: np.ndarray, steps: np.ndarray, low: int, high: int) -> float:
    """``sum_{k=low}^{high} |g(k)|``, ``g = sum_i c_i w_i``, cut between the steps where ``g`` changes sign (seen
    at the steps nearest the nodes, then found by bisection), each part summed as in :func:`_stretch_sums`."""
    top, steepness = high + 0.5, exponents.max()

    def positive(offsets: np.ndarray) -> np.ndarray:
        return combination @ _smooth_profiles(exponents, steps, top, offsets)[0] >= 0.0

    seen = np.unique(np.concatenate([np.floor(_quadrature(low, high, steepness)[0]), [0.0, high - low]]))
    signs = positive(seen + 0.5)  # step high - n is at offset n + 1/2
    changes = np.flatnonzero(signs[1:] != signs[:-1])
    before, after, sign = seen[changes], seen[changes + 1], signs[changes]
    while np.any(after - before > 1):
        middle = np.floor((before + after) / 2.0)
        same = positive(middle + 0.5) == sign
        before, after = np.where(same, middle, before), np.where(same, after, middle)
    offsets, weights, edges = _quadrature(low, high, steepness, after)  # cut half-way between the steps
    parts = np.concatenate([[0.0], after, [high - low + 1.0]])
    integrals = np.bincount(
        np.repeat(np.searchsorted(parts, edges[:-1], side="right") - 1, len(_NODES)),
        weights=combination @ _smooth_profiles(exponents, steps, top, offsets)[0] * weights,
        minlength=len(parts) - 1,
    )
    slopes = combination @ _smooth_profiles(exponents, steps, top, parts)[1]
    return float(np.abs(integrals - (slopes[:-1] - slopes[1:]) / 24.0).sum())


def sigma_rel_of(gamma: float) -> float:
    """The relative width of the power-function profile with exponent ``gamma`` (Karras et al., eq. 3)."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))
