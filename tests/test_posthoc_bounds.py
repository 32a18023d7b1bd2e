"""Post-hoc coefficients at any run length: quadrature against term-by-term sums and closed forms, the
limits on records and targets, and the error bound that counts the snapshots' float32 rounding.

References are independent of the library's sums: term-by-term float64 sums of :func:`power_profile`
(the formula tested against the naive one in test_posthoc.py), and closed forms from the telescoping
partial sums ``sum_{k<=m} w_{t,gamma}(k) = (m/t)**(gamma+1)``.
"""

import logging
import math
import shutil
from typing import List, Sequence, Tuple

import mxnet as mx
import numpy as np
import pytest

from modavg_plugin import profiles as profile_sums
from modavg_plugin.averages import sigma_rel_to_gamma
from modavg_plugin.checks import CheckpointError
from modavg_plugin.posthoc import (
    MAX_GAMMA,
    MAX_STEP,
    POOR_RESIDUAL,
    PostHocSnapshots,
    check_snapshot_limits,
    plan_posthoc,
    posthoc_coefficients,
    power_profile,
    reconstruct_posthoc,
    snapshot_error,
)
from modavg_plugin.registry import ConfigurationError

POSTHOC_LOGGER = "modavg_plugin.posthoc"
RECORDS_LOGGER = "modavg_plugin.folders"  # the one record reader skips records beyond the limits
Snapshots = List[Tuple[float, int]]


def every_snapshot(last: int, widths: Sequence[float] = (0.05, 0.10), count: int = 40) -> Snapshots:
    """``count`` saves evenly spread over ``last`` steps, one snapshot per width each."""
    return [
        (sigma_rel_to_gamma(width), int(step))
        for step in np.linspace(last / count, last, count).astype(np.int64)
        for width in widths
    ]


def term_by_term(snapshots: Snapshots, target_gamma: float, last: int) -> Tuple[np.ndarray, np.ndarray]:
    """The profiles of the snapshots (rows) and of the target over ``k = 1..last``, from :func:`power_profile`."""
    positions = np.arange(1, last + 1)
    profiles = np.array([power_profile(gamma, step, positions) for gamma, step in snapshots])
    return profiles, power_profile(target_gamma, last, positions)


def layout_of(snapshots: Snapshots, target_gamma: float, last: int):
    exponents = np.array([gamma for gamma, _ in snapshots] + [target_gamma]) + 1.0
    steps = np.array([float(step) for _, step in snapshots] + [float(last)])
    return exponents, steps, profile_sums._layout(exponents, steps, last)


def residual_of(coefficients: Sequence[float], snapshots: Snapshots, target_gamma: float, last: int) -> float:
    """The library's L1 residual of given coefficients (the fitting step left out)."""
    exponents, steps, layout = layout_of(snapshots, target_gamma, last)
    return float(profile_sums._residuals(np.array([coefficients], dtype=float), exponents, steps, layout, 1 << 16)[0])


def cumulative(step: int, gamma: float, last: int) -> float:
    """``sum_{k<=step} w_{last,gamma}(k) = (step/last)**(gamma+1)``, precise when ``step`` is near ``last``."""
    return math.exp((gamma + 1.0) * math.log1p((step - last) / last))


# The sums against term-by-term sums -----------------------------------------------------------

MIXED = [(gamma, step) for step in (120_000, 190_000, 195_000, 260_000, 300_000) for gamma in (0.3, 7.0, 100.0)]


@pytest.mark.parametrize(
    "snapshots, target_gamma",
    [(every_snapshot(300_000, count=8), sigma_rel_to_gamma(0.08)), (MIXED, 60.0)],
    ids=["widths 0.05 and 0.10", "gammas 0.3, 7 and 100, two saves 5,000 steps apart"],
)
def test_sums_coefficients_and_residual_match_term_by_term_sums(snapshots, target_gamma):
    """300,000 steps: steps above 2**16 go to quadrature (asserted), and every number matches the exact sums.

    Measured: Gram and products within 1.1e-14 of ``sqrt(G_ii G_jj)``, residual 7e-16 relative, coefficients
    1e-14 of the largest. Tolerances: 1e-12 for the sums (leaving out the Euler-Maclaurin correction costs
    about 1e-8); the residual of the same coefficients 1e-10; coefficients 1e-9 of the largest (sums within
    1e-12 times the condition number 79 of the unit-diagonal Gram matrix; only in the first case: the second
    has condition number 1e6).
    """
    last = 300_000
    exponents, steps, layout = layout_of(snapshots, target_gamma, last)
    assert layout[1] and sum(high - low + 1 for low, high in layout[1]) > last // 2  # mostly quadrature
    profiles, target = term_by_term(snapshots, target_gamma, last)
    rows = np.vstack([profiles, target])
    exact = rows @ rows.T
    sums = profile_sums._normal_sums(exponents, steps, layout, 1 << 16)
    scale = np.sqrt(np.outer(np.diag(exact), np.diag(exact)))
    assert np.max(np.abs(sums - exact) / scale) < 1e-12

    coefficients, residual = posthoc_coefficients(snapshots, target_gamma, last)
    assert residual == pytest.approx(np.abs(coefficients @ profiles - target).sum(), rel=1e-10)
    if len(snapshots) == 16:
        reference = np.linalg.lstsq(exact[:-1, :-1], exact[:-1, -1], rcond=None)[0]
        assert np.max(np.abs(coefficients - reference)) < 1e-9 * np.max(np.abs(reference))


def test_small_runs_are_summed_term_by_term_only():
    """Up to 2**16 steps nothing goes to quadrature: the results are those of the exact sums (to rounding)."""
    snapshots = every_snapshot(60_000)
    _, _, (ranges, stretches, _) = layout_of(snapshots, 9.0, 60_000)
    assert (ranges, stretches) == ([(1, 60_000)], [])
    profiles, target = term_by_term(snapshots, 9.0, 60_000)
    coefficients, residual = posthoc_coefficients(snapshots, 9.0, 60_000)
    assert residual == pytest.approx(np.abs(coefficients @ profiles - target).sum(), rel=1e-12)


# Closed forms at any length -------------------------------------------------------------------


@pytest.mark.parametrize("last", [10**6, 10**9, 10**12, MAX_STEP])
@pytest.mark.parametrize("gamma, target_gamma", [(6.94, 16.97), (0.3, 400.0), (16.97, 1e4)])
def test_l1_distance_of_two_widths_is_twice_the_largest_gap_of_their_partial_sums(last, gamma, target_gamma):
    """Same step, two exponents: the profiles cross once, so ``sum_k |w_1 - w_2| = 2 max_m (F_1(m) - F_2(m))``
    with ``F(m) = (m/t)**(gamma+1)``, largest near ``m* = t (a_1/a_2)**(1/(a_2 - a_1))``. The sign change is
    found by bisection, each side summed by quadrature. Measured: 2.4e-15 relative at worst."""
    a_1, a_2 = gamma + 1.0, target_gamma + 1.0
    middle = int(last * (a_1 / a_2) ** (1.0 / (a_2 - a_1)))
    expected = 2.0 * max(
        cumulative(m, gamma, last) - cumulative(m, target_gamma, last) for m in range(middle - 2, middle + 3)
    )
    assert residual_of([1.0], [(gamma, last)], target_gamma, last) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("last", [10**6, 10**12, MAX_STEP])
@pytest.mark.parametrize("gamma, fraction", [(6.94, 1 / 3), (1e4, 0.9999)])
def test_l1_distance_of_two_steps_and_the_total_weight_are_exact(last, gamma, fraction):
    """Same exponent, steps ``s < t``: ``sum_k |w_s - w_t| = 2 (1 - (s/t)**(gamma+1))``; the target alone sums to 1."""
    earlier = int(last * fraction)
    expected = 2.0 * (1.0 - cumulative(earlier, gamma, last))
    assert residual_of([1.0], [(gamma, earlier)], gamma, last) == pytest.approx(expected, rel=1e-12)
    assert residual_of([0.0], [(gamma, earlier)], gamma, last) == pytest.approx(1.0, abs=1e-13)


def test_a_long_run_gives_the_residual_of_its_continuum_limit():
    """The same 80 snapshots, scaled from 10**9 to 10**12 steps: the discrete profiles are within 1e-9 of their
    continuum limit, so coefficients and residual agree (measured: 2e-14 relative)."""
    gamma = sigma_rel_to_gamma(0.08)
    short_coefficients, short_residual = posthoc_coefficients(every_snapshot(10**9), gamma, 10**9)
    coefficients, residual = posthoc_coefficients(every_snapshot(10**12), gamma, 10**12)
    assert residual == pytest.approx(short_residual, rel=1e-9)
    assert np.max(np.abs(coefficients - short_coefficients)) < 1e-7
    assert residual == pytest.approx(4.6693e-4, rel=1e-4)  # the 0.05/0.10 -> 0.08 fit of test_posthoc


# Limits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "snapshots, target_gamma, target_step, fragments",
    [
        ([(5.0, MAX_STEP + 1)], 5.0, MAX_STEP + 1, ["target_step", "at most 10**15", str(MAX_STEP + 1)]),
        ([(5.0, 10**16)], 5.0, MAX_STEP, ["the step of snapshot 0", "at most 10**15", "10000000000000000"]),
        ([(5.0, 5), (1e300, 5)], 5.0, 10, ["the gamma of snapshot 1", "at most 1e+06", "1e+300"]),
        ([(5.0, 5)], 2e6, 10, ["target_gamma", "at most 1e+06", "2000000.0"]),
        ([(5.0, 5)], 5.0, 10**400, ["target_step", "at most 10**15", "about 401 digits"]),
    ],
)
def test_coefficients_refuse_values_beyond_the_limits_naming_them(snapshots, target_gamma, target_step, fragments):
    with pytest.raises(ValueError) as error:
        posthoc_coefficients(snapshots, target_gamma, target_step)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_the_limits_themselves_are_accepted():
    coefficients, residual = posthoc_coefficients([(MAX_GAMMA, MAX_STEP), (1e-300, MAX_STEP)], MAX_GAMMA, MAX_STEP)
    assert coefficients.tolist() == pytest.approx([1.0, 0.0], abs=1e-12) and residual < 1e-12
    assert check_snapshot_limits(np.int64(MAX_STEP), MAX_GAMMA) == (MAX_STEP, MAX_GAMMA)
    with pytest.raises(CheckpointError, match=r"^'gamma' must be at most 1e\+06"):
        check_snapshot_limits(1, 2e6, CheckpointError, ("'step'", "'gamma'"))


def small_run(folder, widths=(0.05, 0.10), steps: int = 20, save_every: int = 10) -> None:
    parameter = mx.gluon.Parameter("theta", shape=(3,), dtype="float32")
    parameter.initialize(ctx=mx.cpu())
    snapshots = PostHocSnapshots([("theta", parameter)], str(folder), sigma_rels=widths)
    for step in range(1, steps + 1):
        parameter.set_data(mx.nd.array([step, -step, 0.5 * step]))
        snapshots.apply()
        if step % save_every == 0:
            snapshots.save()


def write_record(folder, name: str, step, gamma: float) -> None:
    shutil.copy(folder / "posthoc-00000020-0.params", folder / f"{name}.params")  # a file of its own
    record = f'{{"params_path": "{name}.params", "step": {step}, "gamma": {gamma}}}'
    (folder / f"{name}-posthoc-info.json").write_text(record)


@pytest.mark.parametrize(
    "options, fragments",
    [
        ({"gamma": 1e300}, ["gamma must be at most 1e+06", "1e+300"]),
        ({"sigma_rel": 1e-200}, ["sigma_rel must be at least 1e-06", "1e-200"]),  # was an OverflowError
        ({"sigma_rel": 9.9e-7}, ["sigma_rel must be at least 1e-06"]),
    ],
)
def test_plans_refuse_targets_beyond_the_limits(tmp_path, options, fragments):
    small_run(tmp_path)
    with pytest.raises(ConfigurationError) as error:
        plan_posthoc(str(tmp_path), **options)
    for fragment in fragments:
        assert fragment in str(error.value)
    assert plan_posthoc(str(tmp_path), sigma_rel=1e-6).gamma < MAX_GAMMA  # the limit itself is accepted


def test_records_beyond_the_limits_are_skipped_with_one_warning_naming_them(tmp_path, caplog):
    small_run(tmp_path)
    write_record(tmp_path, "far", 10**16, 5.0)
    write_record(tmp_path, "steep", 15, 1e300)
    with caplog.at_level(logging.WARNING, logger=RECORDS_LOGGER):
        plan = plan_posthoc(str(tmp_path), sigma_rel=0.08)
    assert plan.step == 20 and len(plan.snapshots) == 4
    warnings = [record.getMessage() for record in caplog.records if record.name == RECORDS_LOGGER]
    assert len(warnings) == 1
    for fragment in [
        "skipping 2 of the post-hoc records",
        "far-posthoc-info.json: 'step' must be at most 10**15",
        "steep-posthoc-info.json: 'gamma' must be at most 1e+06",
    ]:
        assert fragment in warnings[0]


def test_a_folder_with_only_records_beyond_the_limits_is_an_error(tmp_path):
    small_run(tmp_path)
    write_record(tmp_path, "far", 10**16, 5.0)
    for path in tmp_path.glob("posthoc-*-posthoc-info.json"):
        path.unlink()
    with pytest.raises(
        CheckpointError, match=r"no usable post-hoc snapshot .* all 1 post-hoc records were skipped \(far-"
    ):
        plan_posthoc(str(tmp_path), sigma_rel=0.08)


def test_a_record_of_step_10_12_is_planned_quickly_and_flagged(tmp_path, caplog):
    """The red-team record: one ``"step": 10**12`` beside a 20-step run. It was about 40 hours of sums; now
    milliseconds (measured: 2 ms for the plan). A float32 EMA of 10**12 steps has long stopped moving (its
    updates are far below float32 resolution): the error bound says so, and a warning names the rounding."""
    small_run(tmp_path)
    write_record(tmp_path, "far", 10**12, sigma_rel_to_gamma(0.05))
    with caplog.at_level(logging.WARNING, logger=POSTHOC_LOGGER):
        plan = plan_posthoc(str(tmp_path), sigma_rel=0.08)
    assert plan.step == 10**12 and len(plan.snapshots) == 5
    assert plan.error_bound > POOR_RESIDUAL and plan.rounding_bound > plan.residual
    warnings = [record.getMessage() for record in caplog.records if record.name == POSTHOC_LOGGER]
    assert len(warnings) == 1 and "float32 rounding" in warnings[0] and "long run" in warnings[0]


# The error bound with near-identical widths ---------------------------------------------------

STEPS, SAVE_EVERY, SIZE = 2000, 50, 50


@pytest.fixture(scope="module")
def near_identical(tmp_path_factory) -> Tuple[str, np.ndarray]:
    """2,000 steps of snapshots of widths 0.1 and 0.1000001 every 50; values about 30 (a random walk)."""
    folder = str(tmp_path_factory.mktemp("near") / "posthoc")
    rng = np.random.default_rng(0)
    walk = np.cumsum(rng.normal(scale=0.1, size=(STEPS, SIZE)), axis=0)
    theta = (30.0 + rng.normal(size=SIZE) + walk).astype(np.float32).astype(np.float64)
    parameter = mx.gluon.Parameter("theta", shape=(SIZE,), dtype="float32")
    parameter.initialize(ctx=mx.cpu())
    snapshots = PostHocSnapshots([("theta", parameter)], folder, sigma_rels=(0.1, 0.1000001))
    for step in range(1, STEPS + 1):
        parameter.set_data(mx.nd.array(theta[step - 1], dtype=np.float32))
        snapshots.apply()
        if step % SAVE_EVERY == 0:
            snapshots.save()
    return folder, theta


def test_error_bound_is_the_residual_plus_the_scaled_snapshot_error(near_identical):
    folder, _ = near_identical
    plan = plan_posthoc(folder, sigma_rel=0.15)
    rounding = sum(abs(x) * snapshot_error(record["step"]) for x, record in zip(plan.coefficients, plan.snapshots))
    assert plan.rounding_bound == pytest.approx(rounding, rel=1e-12)
    assert plan.error_bound == pytest.approx(plan.residual + rounding, rel=1e-12)
    assert snapshot_error(2000) == 2.0**-19 + 2000 * 2.0**-31


@pytest.mark.parametrize("sigma_rel", [0.10000005, 0.101, 0.15, 0.25])
def test_reconstruction_is_within_the_error_bound_where_the_residual_alone_is_not(near_identical, sigma_rel):
    """The rebuilt EMA against the exact float64 one: within ``error_bound * max|theta|`` every time. At
    0.10000005, half-way between the tracked widths, the residual is 3e-14, yet the float32 snapshots are
    off by about 12 * 2**-24 * max|theta| (measured 7.3e-7; bound 2.8e-6): the residual alone is missed."""
    folder, theta = near_identical
    arrays, plan = reconstruct_posthoc(folder, sigma_rel=sigma_rel)
    exact = power_profile(plan.gamma, STEPS, np.arange(1, STEPS + 1)) @ theta
    deviation = np.abs(arrays["theta"].asnumpy().astype(np.float64) - exact).max() / np.abs(theta).max()
    assert deviation <= plan.error_bound
    if sigma_rel == 0.10000005:
        assert plan.residual < 1e-9 < 1e-7 < deviation


def test_nearly_collinear_snapshots_get_moderate_coefficients_and_a_better_bound(near_identical):
    """Plain least squares over these 80 snapshots gives coefficients summing to 3.3e4 in absolute value for
    width 0.25 (largest 6,457; residual 0.076, error bound 0.14); the truncated fit: 0.98 (largest 0.12;
    residual 0.083, bound 0.083)."""
    folder, _ = near_identical
    plan = plan_posthoc(folder, sigma_rel=0.25)
    snapshots = [(record["gamma"], record["step"]) for record in plan.snapshots]
    profiles, target = term_by_term(snapshots, plan.gamma, STEPS)
    plain = np.linalg.lstsq(profiles @ profiles.T, profiles @ target, rcond=None)[0]
    steps = np.array([step for _, step in snapshots], dtype=float)
    plain_bound = np.abs(plain @ profiles - target).sum() + np.abs(plain) @ snapshot_error(steps)
    assert np.abs(plain).sum() > 1e4 and plain_bound > POOR_RESIDUAL
    assert np.abs(plan.coefficients).sum() < 2.0
    assert plan.error_bound < min(plain_bound, POOR_RESIDUAL)


def test_a_poor_bound_from_large_coefficients_is_warned_even_with_a_small_residual(near_identical, caplog, monkeypatch):
    """Without the truncated fits (plain least squares only) the coefficients are huge: the residual is below
    0.1 but the error bound is not, and the warning says why."""
    folder, _ = near_identical
    monkeypatch.setattr(profile_sums, "EIGENVALUE_CUTOFFS", ())
    with caplog.at_level(logging.INFO, logger=POSTHOC_LOGGER):
        plan = plan_posthoc(folder, sigma_rel=0.25)
    assert plan.residual < POOR_RESIDUAL < plan.error_bound
    warnings = [record for record in caplog.records if record.name == POSTHOC_LOGGER]
    assert [record.levelno for record in warnings] == [logging.WARNING]
    assert "coefficients up to" in warnings[0].getMessage() and "float32 rounding" in warnings[0].getMessage()
