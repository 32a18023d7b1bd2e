"""Post-hoc EMA: the exact profiles, the least-squares coefficients, a reconstruction checked against
a float64 reference and a directly tracked average, hostile snapshot folders, state and the command.

The trajectory of the reconstruction tests is a random walk with drift known in float64; the
reference values are float64 sums over it, independent of the files and of the library's sums.
"""

import json
import logging
import os
import pathlib
from typing import Dict, List, Sequence, Tuple

import mxnet as mx
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from modavg_plugin.averages import PowerMovingAverage, sigma_rel_to_gamma
from modavg_plugin.checks import CheckpointError
from modavg_plugin.cli import main
from modavg_plugin.posthoc import (
    PostHocSnapshots,
    plan_posthoc,
    posthoc_coefficients,
    power_profile,
    read_posthoc_snapshots,
    reconstruct_posthoc,
    save_posthoc,
)
from modavg_plugin.registry import ConfigurationError

NUM_STEPS = 2000
SAVE_EVERY = 50
SIZE = 50
TARGET_SIGMA_REL = 0.08
FLOAT32_EPSILON = float(np.finfo(np.float32).eps)
STEPS = np.arange(1, NUM_STEPS + 1)
POSTHOC_LOGGER = "modavg_plugin.folders"


def naive_profile(gamma: float, step: int, positions: np.ndarray) -> np.ndarray:
    """``(k**(g+1) - (k-1)**(g+1)) / t**(g+1)`` for ``k <= t``, 0 after: the formula as written, in float64."""
    k = positions.astype(np.float64)
    weights = (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / float(step) ** (gamma + 1)
    return np.where(k <= step, weights, 0.0)


def new_parameter(name: str = "theta", size: int = SIZE) -> mx.gluon.Parameter:
    parameter = mx.gluon.Parameter(name, shape=(size,), dtype="float32")
    parameter.initialize(ctx=mx.cpu())
    return parameter


def trajectory(seed: int = 0) -> np.ndarray:
    """Row ``k - 1``: the weights after step ``k`` -- a random walk plus drift, as float32 values held in float64."""
    rng = np.random.default_rng(seed)
    start = rng.normal(size=SIZE)
    walk = np.cumsum(rng.normal(scale=0.1, size=(NUM_STEPS, SIZE)), axis=0)
    return (start + walk + 0.005 * STEPS[:, None]).astype(np.float32).astype(np.float64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Tuple[str, np.ndarray, PowerMovingAverage]:
    """2000 steps of snapshots (sigma_rel 0.05 and 0.10, saved every 50) next to a directly tracked 0.08 average."""
    folder = str(tmp_path_factory.mktemp("run") / "posthoc")
    theta = trajectory()
    parameter = new_parameter()
    snapshots = PostHocSnapshots([("theta", parameter)], folder, sigma_rels=(0.05, 0.10))
    direct = PowerMovingAverage([("theta", parameter)], sigma_rel=TARGET_SIGMA_REL)
    for step in STEPS:
        parameter.set_data(mx.nd.array(theta[step - 1], dtype=np.float32))
        snapshots.apply()
        direct.apply()
        if step % SAVE_EVERY == 0:
            snapshots.save()
    return folder, theta, direct


def combined_profile(plan) -> np.ndarray:
    """``sum_i x_i w_i(k)`` over ``k = 1..plan.step``, in float64, from the naive formula."""
    positions = np.arange(1, plan.step + 1)
    return sum(
        coefficient * naive_profile(record["gamma"], record["step"], positions)
        for coefficient, record in zip(plan.coefficients, plan.snapshots)
    )


# The profiles ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.5, sigma_rel_to_gamma(0.10), sigma_rel_to_gamma(0.05)])
@pytest.mark.parametrize("step", [1, 2, 7, 40])
def test_profile_matches_the_naive_formula_and_sums_to_one(gamma, step):
    positions = np.arange(1, step + 6)
    profile = power_profile(gamma, step, positions)
    assert_allclose(profile, naive_profile(gamma, step, positions), rtol=1e-12, atol=1e-300)
    assert profile[step:].tolist() == [0.0] * 5
    assert profile[:step].sum() == pytest.approx(1.0, abs=1e-13)


def test_profile_of_a_long_run_sums_to_one_where_the_naive_formula_cancels():
    positions = np.arange(1, 10**6 + 1)
    profile = power_profile(sigma_rel_to_gamma(0.05), 10**6, positions)
    assert profile.sum() == pytest.approx(1.0, abs=1e-10)
    assert np.all(np.diff(profile) > 0)  # weights grow with k (gamma > 0)


def test_profile_is_what_a_power_moving_average_gives_one_hot_steps():
    """Step ``k`` alone set to 1 (the others 0): after ``t`` applies the average holds ``w_t(k)``."""
    parameter = new_parameter(size=7)
    average = PowerMovingAverage([("theta", parameter)], gamma=3.0)
    for step in range(1, 8):
        parameter.set_data(mx.nd.array(np.eye(7)[step - 1]))
        average.apply()
    assert_allclose(average.shadows["theta"].asnumpy(), naive_profile(3.0, 7, np.arange(1, 8)), rtol=1e-5, atol=1e-7)


# The coefficients -----------------------------------------------------------------------------


def every_snapshot(last_step: int = NUM_STEPS) -> List[Tuple[float, int]]:
    return [
        (sigma_rel_to_gamma(sigma_rel), step)
        for step in range(SAVE_EVERY, last_step + 1, SAVE_EVERY)
        for sigma_rel in (0.05, 0.10)
    ]


@pytest.mark.parametrize("last_step, target_index", [(300, 11), (2000, 78), (1500, 59)])
def test_coefficients_of_a_tracked_average_are_one_hot(last_step, target_index):
    snapshots = every_snapshot(last_step)
    gamma, step = snapshots[target_index]
    coefficients, residual = posthoc_coefficients(snapshots, gamma, step)
    expected = np.zeros(len(coefficients))
    expected[target_index] = 1.0
    assert_allclose(coefficients, expected, atol=1e-9)
    assert residual < 1e-10


def test_coefficients_do_not_depend_on_the_chunk_size():
    snapshots = every_snapshot()
    gamma = sigma_rel_to_gamma(TARGET_SIGMA_REL)
    whole, whole_residual = posthoc_coefficients(snapshots, gamma, NUM_STEPS, chunk_steps=NUM_STEPS)
    chunked, chunked_residual = posthoc_coefficients(snapshots, gamma, NUM_STEPS, chunk_steps=7)
    assert_allclose(chunked, whole, rtol=0, atol=1e-10)
    assert chunked_residual == pytest.approx(whole_residual, rel=1e-9)


def test_residual_is_the_l1_norm_of_the_profile_difference():
    snapshots = every_snapshot(1000)
    gamma = sigma_rel_to_gamma(TARGET_SIGMA_REL)
    coefficients, residual = posthoc_coefficients(snapshots, gamma, 1000)
    positions = np.arange(1, 1001)
    combined = sum(x * naive_profile(g, t, positions) for x, (g, t) in zip(coefficients, snapshots))
    assert residual == pytest.approx(np.abs(combined - naive_profile(gamma, 1000, positions)).sum(), rel=1e-9)


@pytest.mark.parametrize(
    "snapshots, target_gamma, target_step, fragments",
    [
        ([], 5.0, 10, ["snapshots is empty"]),
        ([(5.0, 20)], 5.0, 10, ["snapshot 0", "step 20", "after target_step 10"]),
        ([(5.0, 5), (0.0, 5)], 5.0, 10, ["gamma of snapshot 1", "> 0", "0.0"]),
        ([(5.0, 0)], 5.0, 10, ["step of snapshot 0", ">= 1"]),
        ([(5.0, 2.5)], 5.0, 10, ["step of snapshot 0", "integer", "2.5"]),
        ([(5.0, 5)], float("nan"), 10, ["target_gamma", "> 0", "nan"]),
        ([(5.0, 5)], 5.0, True, ["target_step", ">= 1", "True"]),
    ],
)
def test_coefficients_refuse_bad_input_naming_it(snapshots, target_gamma, target_step, fragments):
    with pytest.raises(ValueError) as error:
        posthoc_coefficients(snapshots, target_gamma, target_step)
    for fragment in fragments:
        assert fragment in str(error.value)


# Reconstruction of a realistic trajectory -----------------------------------------------------


def test_reconstruction_is_the_combined_profile_applied_to_the_trajectory(trained):
    """(a) The result equals ``sum_k (sum_i x_i w_i(k)) theta_k`` computed in float64 from the trajectory.

    Tolerance: each snapshot is a float32 EMA; its rounding errors, about ``eps32 * max|theta|`` per
    update and damped by the later decays, add up to a few ``eps32 * max|theta|`` (about 4 measured
    for the directly tracked average); the combination multiplies them by ``sum_i |x_i|`` (1.42 here)
    and adds its own float32 rounding. 16 of them is a safe bound (measured: 8.7e-6, about 3.4).
    """
    folder, theta, _ = trained
    arrays, plan = reconstruct_posthoc(folder, sigma_rel=TARGET_SIGMA_REL)
    expected = combined_profile(plan) @ theta
    absolute_sum = float(np.abs(plan.coefficients).sum())
    tolerance = 16 * FLOAT32_EPSILON * absolute_sum * np.abs(theta).max()
    assert_allclose(arrays["theta"].asnumpy(), expected, rtol=0, atol=tolerance)
    assert arrays["theta"].dtype == np.float32


def test_reconstruction_is_the_plain_signed_sum_of_the_snapshot_files(trained):
    """``sum_i x_i snapshot_i`` from the saved float32 files in float64, not divided by ``sum_i x_i``."""
    folder, _, _ = trained
    arrays, plan = reconstruct_posthoc(folder, sigma_rel=TARGET_SIGMA_REL)
    files = [mx.nd.load(path)["theta"].asnumpy().astype(np.float64) for path in plan.paths]
    expected = sum(coefficient * values for coefficient, values in zip(plan.coefficients, files))
    assert sum(plan.coefficients) != 1.0  # so a division would show
    tolerance = 4 * FLOAT32_EPSILON * sum(abs(x) * np.abs(values).max() for x, values in zip(plan.coefficients, files))
    assert_allclose(arrays["theta"].asnumpy(), expected, rtol=0, atol=tolerance)


def test_reconstruction_is_within_the_residual_bound_of_the_directly_tracked_average(trained):
    """(b) ``|reconstruction - direct| <= residual * max_k |theta_k|`` element by element, plus float32 slack.

    Both are ``sum_k p(k) theta_k`` for profiles ``p`` whose difference has L1 norm ``residual``, so
    their difference is at most ``residual * max_k |theta_k|``; the slack covers the float32 rounding
    of both (as in the test above). Measured: residual 4.66e-4 (bound 0.0101), largest deviation 7.4e-5.
    """
    folder, theta, direct = trained
    arrays, plan = reconstruct_posthoc(folder, sigma_rel=TARGET_SIGMA_REL)
    assert plan.residual < 1e-3
    assert len(plan.snapshots) == 2 * NUM_STEPS // SAVE_EVERY and plan.step == NUM_STEPS
    largest = np.abs(theta).max()
    slack = 16 * FLOAT32_EPSILON * (float(np.abs(plan.coefficients).sum()) + 1.0) * largest
    deviation = np.abs(arrays["theta"].asnumpy().astype(np.float64) - direct.shadows["theta"].asnumpy())
    assert np.all(deviation <= plan.residual * largest + slack)


def test_gamma_gives_the_same_reconstruction_as_its_sigma_rel(trained):
    folder, _, _ = trained
    by_sigma_rel, _ = reconstruct_posthoc(folder, sigma_rel=TARGET_SIGMA_REL)
    by_gamma, plan = reconstruct_posthoc(folder, gamma=sigma_rel_to_gamma(TARGET_SIGMA_REL))
    assert_array_equal(by_gamma["theta"].asnumpy(), by_sigma_rel["theta"].asnumpy())
    assert plan.sigma_rel == pytest.approx(TARGET_SIGMA_REL, rel=1e-9)


def test_a_tracked_average_at_an_earlier_step_is_its_own_snapshot(trained):
    folder, _, _ = trained
    arrays, plan = reconstruct_posthoc(folder, sigma_rel=0.10, step=1000)
    assert len(plan.snapshots) == 2 * 1000 // SAVE_EVERY
    assert max(record["step"] for record in plan.snapshots) == 1000
    saved = mx.nd.load(os.path.join(folder, "posthoc-00001000-1.params"))["theta"].asnumpy()
    assert_allclose(arrays["theta"].asnumpy(), saved, rtol=1e-6, atol=1e-6)


def test_progress_is_called_once_per_snapshot(trained):
    folder, _, _ = trained
    seen: List[str] = []
    _, plan = reconstruct_posthoc(folder, sigma_rel=TARGET_SIGMA_REL, progress=seen.append)
    assert sorted(seen) == sorted(plan.paths)


@pytest.mark.parametrize(
    "options, fragments",
    [
        ({}, ["exactly one of sigma_rel", "gamma", "neither"]),
        ({"sigma_rel": 0.08, "gamma": 9.0}, ["exactly one of sigma_rel", "both"]),
        ({"sigma_rel": 0.5}, ["sigma_rel", "(0, 0.2887)", "0.5"]),
        ({"gamma": -1.0}, ["gamma", "> 0", "-1.0"]),
        ({"sigma_rel": 0.08, "step": 10}, ["step", "[50, 2000]", "10"]),
        ({"sigma_rel": 0.08, "step": 2001}, ["step", "[50, 2000]", "2001"]),
        ({"sigma_rel": 0.08, "step": 100.0}, ["step", "[50, 2000]", "100.0"]),
    ],
)
def test_reconstruction_refuses_bad_options_naming_them(trained, options, fragments):
    folder, _, _ = trained
    with pytest.raises(ConfigurationError) as error:
        reconstruct_posthoc(folder, **options)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_save_posthoc_writes_the_reconstruction(trained, tmp_path):
    folder, _, _ = trained
    output = str(tmp_path / "ema.params")
    assert save_posthoc(folder, output, sigma_rel=TARGET_SIGMA_REL) == output
    arrays, _ = reconstruct_posthoc(folder, sigma_rel=TARGET_SIGMA_REL)
    assert_array_equal(mx.nd.load(output)["theta"].asnumpy(), arrays["theta"].asnumpy())
    assert [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")] == []


def test_save_posthoc_refuses_to_overwrite_a_snapshot(trained):
    folder, _, _ = trained
    snapshot = os.path.join(folder, "posthoc-00002000-0.params")
    with pytest.raises(CheckpointError, match="one of the snapshots"):
        save_posthoc(folder, snapshot, sigma_rel=TARGET_SIGMA_REL)


# Saving during training -----------------------------------------------------------------------


def small_run(
    folder: pathlib.Path, steps: Sequence[int] = (1, 2, 3, 4), save_at: Sequence[int] = (2, 4)
) -> PostHocSnapshots:
    parameter = new_parameter(size=3)
    snapshots = PostHocSnapshots([("theta", parameter)], str(folder), sigma_rels=(0.05, 0.10))
    for step in steps:
        parameter.set_data(mx.nd.array([step, -step, 2.0 * step]))
        snapshots.apply()
        if step in save_at:
            snapshots.save()
    return snapshots


def test_save_writes_each_average_and_its_record(tmp_path):
    folder = tmp_path / "new" / "posthoc"  # created on the first save
    snapshots = small_run(folder, save_at=())
    paths = snapshots.save()
    assert paths == [str(folder / "posthoc-00000004-0.params"), str(folder / "posthoc-00000004-1.params")]
    for index, (path, sigma_rel) in enumerate(zip(paths, (0.05, 0.10))):
        gamma = sigma_rel_to_gamma(sigma_rel)
        expected = naive_profile(gamma, 4, np.arange(1, 5)) @ np.array([[1, -1, 2], [2, -2, 4], [3, -3, 6], [4, -4, 8]])
        assert_allclose(mx.nd.load(path)["theta"].asnumpy(), expected, rtol=1e-6)
        with open(folder / f"posthoc-00000004-{index}-posthoc-info.json") as file:
            record = json.load(file)
        assert record == {"params_path": os.path.basename(path), "step": 4, "gamma": gamma, "sigma_rel": sigma_rel}
    assert snapshots.num_steps == 4


def test_save_before_the_first_apply_is_refused(tmp_path):
    snapshots = PostHocSnapshots([("theta", new_parameter(size=3))], str(tmp_path))
    with pytest.raises(ValueError, match="apply"):
        snapshots.save()
    assert os.listdir(tmp_path) == []


def test_save_into_a_folder_that_cannot_be_made_raises_os_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    snapshots = small_run(blocker / "posthoc", save_at=())
    with pytest.raises(OSError):
        snapshots.save()


@pytest.mark.parametrize(
    "sigma_rels, fragments",
    [
        ((), ["at least one", "(0, 0.2887)"]),
        ((0.05, 0.3), ["sigma_rels[1]", "[1e-06, 0.2887)", "0.3"]),
        ((0.0,), ["sigma_rels[0]", "[1e-06, 0.2887)"]),
        ((True,), ["sigma_rels[0]", "True (bool)"]),
        (("0.05",), ["sigma_rels[0]", "'0.05' (str)"]),
        ((0.05, 0.10, 0.05), ["distinct", "0.05", "positions 0 and 2"]),
        (0.05, ["sequence of numbers", "0.05 (float)"]),
        ("0.05", ["sequence of numbers", "'0.05' (str)"]),
    ],
)
def test_bad_sigma_rels_are_refused_naming_the_value_and_the_range(tmp_path, sigma_rels, fragments):
    with pytest.raises(ConfigurationError) as error:
        PostHocSnapshots([("theta", new_parameter(size=3))], str(tmp_path), sigma_rels=sigma_rels)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_state_dict_round_trip_continues_as_if_uninterrupted(tmp_path):
    values = np.random.default_rng(1).normal(size=(9, 3))
    uninterrupted_parameter, resumed_parameter = new_parameter(size=3), new_parameter(size=3)
    uninterrupted = PostHocSnapshots([("theta", uninterrupted_parameter)], str(tmp_path / "a"))
    for row in values[:5]:
        uninterrupted_parameter.set_data(mx.nd.array(row))
        uninterrupted.apply()
    state = uninterrupted.state_dict()
    state["averages"] = {str(index): average for index, average in state["averages"].items()}  # as after JSON
    resumed = PostHocSnapshots([("theta", resumed_parameter)], str(tmp_path / "b"))
    resumed.load_state_dict(state)
    assert resumed.num_steps == 5
    for row in values[5:]:
        for parameter, snapshots in ((uninterrupted_parameter, uninterrupted), (resumed_parameter, resumed)):
            parameter.set_data(mx.nd.array(row))
            snapshots.apply()
    assert resumed.num_steps == uninterrupted.num_steps == 9
    for expected, actual in zip(uninterrupted.averages, resumed.averages):
        assert_array_equal(actual.shadows["theta"].asnumpy(), expected.shadows["theta"].asnumpy())


def test_state_of_other_sigma_rels_or_missing_averages_is_refused(tmp_path):
    source = small_run(tmp_path / "a")
    other = PostHocSnapshots([("theta", new_parameter(size=3))], str(tmp_path / "b"), sigma_rels=(0.05, 0.12))
    with pytest.raises(ValueError, match=r"sigma_rels \[0.05, 0.1\].*\[0.05, 0.12\]"):
        other.load_state_dict(source.state_dict())
    state = source.state_dict()
    del state["averages"][1]
    target = PostHocSnapshots([("theta", new_parameter(size=3))], str(tmp_path / "c"))
    with pytest.raises(KeyError, match="no average 1"):
        target.load_state_dict(state)
    assert target.num_steps == 0  # nothing loaded


# Hostile folders ------------------------------------------------------------------------------


def write_record(folder: pathlib.Path, name: str, record) -> None:
    text = record if isinstance(record, str) else json.dumps(record)
    (folder / f"{name}-posthoc-info.json").write_text(text)


def test_unusable_records_are_skipped_with_one_warning_naming_each(tmp_path, caplog):
    folder = tmp_path / "posthoc"
    small_run(folder)
    outside = tmp_path / "outside.params"
    mx.nd.save(str(outside), {"theta": mx.nd.zeros(3)})
    good = {"params_path": "posthoc-00000002-0.params", "gamma": 5.0}
    write_record(folder, "broken", "{not json")
    write_record(folder, "list", "[1, 2]")
    write_record(folder, "step-zero", {**good, "step": 0})
    write_record(folder, "step-text", {**good, "step": "3"})
    write_record(folder, "gamma-negative", {**good, "step": 3, "gamma": -1.0})
    write_record(folder, "gamma-nan", '{"params_path": "posthoc-00000002-0.params", "step": 3, "gamma": NaN}')
    write_record(folder, "missing", {"params_path": "gone.params", "step": 3, "gamma": 5.0})
    write_record(folder, "outside", {"params_path": "../outside.params", "step": 3, "gamma": 5.0})
    write_record(folder, "no-path", {"step": 3, "gamma": 5.0})
    write_record(folder, "same-file", {**good, "step": 2})
    (folder / ".tmp-abc-posthoc-00000006-0-posthoc-info.json").write_text("{half")
    with caplog.at_level(logging.WARNING):
        records = read_posthoc_snapshots(str(folder))
    assert [(record["step"], os.path.basename(record["params_path"])) for record in records] == [
        (2, "posthoc-00000002-1.params"),
        (2, "posthoc-00000002-0.params"),
        (4, "posthoc-00000004-1.params"),
        (4, "posthoc-00000004-0.params"),
    ]  # by step, then gamma (0.10 has the smaller gamma)
    assert all(os.path.isabs(record["params_path"]) for record in records)
    warnings = [record.getMessage() for record in caplog.records if record.name == POSTHOC_LOGGER]
    warnings = [warning for warning in warnings if not warning.startswith("ignoring 1 temporary file")]
    assert len(warnings) == 1
    for fragment in [
        "skipping 10 of the post-hoc records",
        "broken-posthoc-info.json: not JSON",
        "list-posthoc-info.json: not a JSON object",
        "step-zero-posthoc-info.json: 'step' must be an integer >= 1, got 0 (int)",
        "step-text-posthoc-info.json: 'step' must be an integer >= 1, got '3' (str)",
        "gamma-negative-posthoc-info.json: 'gamma' must be a finite number > 0, got -1.0",
        "gamma-nan-posthoc-info.json: 'gamma' must be a finite number > 0, got nan",
        "missing-posthoc-info.json: checkpoint file",
        "gone.params does not exist",
        "outside-posthoc-info.json: 'params_path' '../outside.params'",
        "outside the folder",
        "no-path-posthoc-info.json: 'params_path' must be a non-empty file name, got nothing",
        "names the same parameter file as posthoc-00000002-0-posthoc-info.json",
    ]:
        assert fragment in warnings[0]
    assert ".tmp-" not in warnings[0]  # leftovers: the checkpoints logger's own warning


def test_a_folder_with_nothing_usable_is_one_error_listing_the_files_and_reasons(tmp_path):
    write_record(tmp_path, "broken", "{not json")
    write_record(tmp_path, "missing", {"params_path": "gone.params", "step": 3, "gamma": 5.0})
    with pytest.raises(CheckpointError) as error:
        read_posthoc_snapshots(str(tmp_path))
    message = str(error.value)
    assert f"no usable post-hoc snapshot in folder {tmp_path}" in message
    assert "broken-posthoc-info.json: not JSON" in message and "gone.params does not exist" in message


def test_missing_or_empty_folders_are_errors_naming_them(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_posthoc_snapshots(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match=r"no post-hoc snapshots \(\*-posthoc-info.json\)"):
        read_posthoc_snapshots(str(tmp_path))


def test_a_snapshot_with_nan_values_is_named(tmp_path):
    folder = tmp_path / "posthoc"
    small_run(folder)
    mx.nd.save(str(folder / "posthoc-00000004-0.params"), {"theta": mx.nd.array([1.0, np.nan, 0.0])})
    with pytest.raises(CheckpointError, match=r"not finite: NaN or infinite values in .*posthoc-00000004-0.params"):
        reconstruct_posthoc(str(folder), sigma_rel=0.07)


def test_snapshots_with_different_parameters_are_an_error_naming_the_key(tmp_path):
    folder = tmp_path / "posthoc"
    small_run(folder)
    mx.nd.save(str(folder / "posthoc-00000002-0.params"), {"other": mx.nd.zeros(3)})
    with pytest.raises(CheckpointError, match="'other'|'theta'"):
        reconstruct_posthoc(str(folder), sigma_rel=0.07)


# The command ----------------------------------------------------------------------------------


def run(capsys, argv: Sequence[str]) -> Tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_command_writes_what_the_api_reconstructs(trained, tmp_path, capsys):
    folder, _, _ = trained
    output = str(tmp_path / "ema.params")
    assert run(capsys, ["posthoc", folder, "--sigma-rel", "0.08", "-o", output]) == (0, f"{output}\n", "")
    arrays, _ = reconstruct_posthoc(folder, sigma_rel=TARGET_SIGMA_REL)
    loaded: Dict[str, mx.nd.NDArray] = mx.nd.load(output)
    assert sorted(loaded) == ["theta"]
    assert_array_equal(loaded["theta"].asnumpy(), arrays["theta"].asnumpy())


def test_command_dry_run_lists_snapshots_coefficients_and_residual_and_writes_nothing(trained, tmp_path, capsys):
    folder, _, _ = trained
    output = str(tmp_path / "ema.params")
    code, out, err = run(capsys, ["posthoc", folder, "--gamma", "9.5", "--step", "1000", "-o", output, "--dry-run"])
    assert (code, err) == (0, "")
    assert not os.path.exists(output)
    plan = plan_posthoc(folder, gamma=9.5, step=1000)
    lines = out.splitlines()
    assert output in lines[0] and "step 1000" in lines[0] and "40 snapshots" in lines[0]
    for path, coefficient in zip(plan.paths, plan.coefficients):
        assert any(path in line and f"{coefficient:.6g}" in line for line in lines)
    assert f"residual {plan.residual:.3g}" in out


@pytest.mark.parametrize(
    "options, code, fragments",
    [
        (["--sigma-rel", "0.08", "--gamma", "9"], 2, ["--gamma", "not allowed with", "--sigma-rel"]),
        ([], 2, ["one of the arguments --sigma-rel --gamma is required"]),
        (["--sigma-rel", "0.5"], 2, ["--sigma-rel", "(0, 0.2887)", "0.5"]),
        (["--gamma", "inf"], 2, ["--gamma", "> 0", "inf"]),
        (["--sigma-rel", "0.08", "--step", "0"], 2, ["--step", ">= 1"]),
        (["--sigma-rel", "0.08", "--step", "10"], 1, ["step must be an integer in [50, 2000]", "10"]),
    ],
)
def test_command_errors(trained, tmp_path, capsys, options, code, fragments):
    folder, _, _ = trained
    exit_code, out, err = run(capsys, ["posthoc", folder, *options, "-o", str(tmp_path / "ema.params")])
    assert (exit_code, out) == (code, "")
    assert err.startswith("modavg: error: ") and err.count("\n") == 1
    for fragment in fragments:
        assert fragment in err


def test_command_missing_folder_and_output(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    code, _, err = run(capsys, ["posthoc", missing, "--sigma-rel", "0.08", "-o", str(tmp_path / "ema.params")])
    assert code == 1 and err == f"modavg: error: checkpoint folder {missing} does not exist\n"
    code, _, err = run(capsys, ["posthoc", missing, "--sigma-rel", "0.08"])
    assert code == 2 and "-o/--output" in err
