"""The "auto" mode: train once, ship the averaging that validation prefers.

The engine runs on a synthetic trajectory whose every step is known, so the
test computes each candidate's validation loss itself (the exact power-EMA
profile applied to the trajectory) and knows which candidate must win.
"""

import gc
import logging
import math

import mxnet as mx
import numpy as np
import pytest
from numpy.testing import assert_allclose

from modavg_plugin import AveragingCallback, AveragingRun, ConfigurationError
from modavg_plugin.auto import AUTO_DEFAULTS, Candidate, choose
from modavg_plugin.averages import sigma_rel_to_gamma
from modavg_plugin.module import ModuleAveraging
from modavg_plugin.profiles import power_profile

from conftest import data_iterator, fit_arguments, new_module, seed_everything, train

SIZE = 64
EPOCHS, STEPS_PER_EPOCH = 20, 20
STEPS = EPOCHS * STEPS_PER_EPOCH
TARGET = np.zeros(SIZE)


def trajectory(noise: float, drift: float, seed: int = 0) -> np.ndarray:
    """Step k's weights: a drift that ends on the target (``drift * (1 - k/T)``), plus independent noise."""
    rng = np.random.RandomState(seed)
    k = np.arange(1, STEPS + 1)[:, None]
    return TARGET + drift * (1.0 - k / STEPS) + noise * rng.randn(STEPS, SIZE)


def run_auto(tmp_path, steps: np.ndarray, with_validation: bool = True, **auto):
    """The engine driven over ``steps``; validation loss: per element, the squared distance to the target."""
    parameter = mx.gluon.Parameter("w", shape=(SIZE,))
    parameter.initialize()
    parameter.set_data(mx.nd.array(steps[0]))
    run = AveragingRun({"type": "auto", **auto}, checkpoint_dir=str(tmp_path))
    run.start([("w", parameter)], epochs_ahead=EPOCHS)

    def losses() -> np.ndarray:
        return (parameter.data().asnumpy().astype(np.float64) - TARGET) ** 2

    for epoch in range(EPOCHS):
        for step in range(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH):
            parameter.set_data(mx.nd.array(steps[step]))
            run.step()
        with run.averaged():
            score = float(losses().mean())
        run.end_epoch(score=score)
    run.finish(measure=losses if with_validation else None)
    return run, parameter.data().asnumpy()


def exact_loss(steps: np.ndarray, sigma_rel: float) -> float:
    """The validation loss of the exact power EMA of ``sigma_rel`` after the last step (not rebuilt)."""
    weights = power_profile(sigma_rel_to_gamma(sigma_rel), STEPS, np.arange(1, STEPS + 1))
    return float(((weights @ steps - TARGET) ** 2).mean())


def chosen(run: AveragingRun) -> dict:
    (entry,) = [entry for entry in run.choice if entry["chosen"]]
    return entry


def test_the_width_with_the_lowest_loss_is_shipped_when_it_is_known(tmp_path):
    steps = trajectory(noise=1.0, drift=2.0)  # noise wants a long average, drift a short one: an optimum between
    expected = {width: exact_loss(steps, width) for width in AUTO_DEFAULTS["widths"]}
    best_width = min(expected, key=expected.get)
    assert best_width not in (min(expected), max(expected))  # a real optimum, inside the grid
    run, shipped = run_auto(tmp_path, steps)
    entry = chosen(run)
    assert entry["sigma_rel"] == best_width
    assert_allclose(entry["validation_loss"], expected[best_width], rtol=0.02)  # rebuilt within its error bound
    losses = {entry["sigma_rel"]: entry["validation_loss"] for entry in run.choice if entry["sigma_rel"]}
    for width, loss in losses.items():  # every rebuilt width scored as its exact EMA would
        assert_allclose(loss, expected[width], rtol=0.05, err_msg=str(width))
    assert_allclose(((shipped - TARGET) ** 2).mean(), entry["validation_loss"], rtol=1e-5)  # and it is shipped


def test_the_last_iterate_is_shipped_when_averaging_hurts(tmp_path):
    steps = trajectory(noise=0.0, drift=5.0)  # no noise: any average lags behind the drift
    run, shipped = run_auto(tmp_path, steps)
    assert chosen(run)["name"] == "last iterate"
    assert_allclose(shipped, steps[-1], rtol=1e-6, atol=1e-6)
    assert all(entry["validation_loss"] > 0.0 for entry in run.choice if not entry["chosen"])


def test_near_ties_go_to_the_simpler_candidate_by_one_standard_error():
    rng = np.random.RandomState(1)
    raw = rng.rand(400)
    slightly_better = raw - 0.001 + 0.05 * rng.randn(400)  # better on average, by far less than its noise
    candidates = [Candidate("last iterate", dict), Candidate("power EMA", dict, 0.05)]
    for candidate, losses in zip(candidates, (raw, slightly_better)):
        candidate.losses, candidate.validation_loss = losses, float(losses.mean())
    assert candidates[1].validation_loss < candidates[0].validation_loss
    assert choose(candidates) == 0
    candidates[1].losses = raw - 0.01  # better by far more than the noise of the difference
    candidates[1].validation_loss = float(candidates[1].losses.mean())
    assert choose(candidates) == 1


def test_without_validation_data_the_validated_ema_is_shipped_with_a_warning(tmp_path, caplog):
    steps = trajectory(noise=1.0, drift=3.0)
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        run, shipped = run_auto(tmp_path, steps, with_validation=False)
    assert "auto: no validation data, so no candidate can be compared" in caplog.text
    assert "the power EMA of sigma_rel 0.08" in caplog.text
    weights = power_profile(sigma_rel_to_gamma(0.08), STEPS, np.arange(1, STEPS + 1))
    assert_allclose(shipped, weights @ steps, rtol=1e-4, atol=1e-5)
    assert run.choice == []


def test_a_run_resumed_in_the_middle_keeps_its_snapshots_and_chooses_as_an_uninterrupted_one(tmp_path):
    steps = trajectory(noise=1.0, drift=3.0)
    whole, whole_shipped = run_auto(tmp_path / "whole", steps)

    parameter = mx.gluon.Parameter("w", shape=(SIZE,))
    parameter.initialize()
    parameter.set_data(mx.nd.array(steps[0]))
    first = AveragingRun("auto", checkpoint_dir=str(tmp_path / "split"))
    first.start([("w", parameter)], epochs_ahead=EPOCHS)
    for epoch in range(EPOCHS // 2):
        for step in range(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH):
            parameter.set_data(mx.nd.array(steps[step]))
            first.step()
        with first.averaged():
            score = float(((parameter.data().asnumpy() - TARGET) ** 2).mean())
        first.end_epoch(score=score)
    first = None
    gc.collect()  # killed: the files stay, the lock goes

    resumed = AveragingRun("auto", checkpoint_dir=str(tmp_path / "split"), resume=True)
    state = resumed.resume()
    parameter.set_data(state.raw["w"])
    resumed.start([("w", parameter)], epochs_ahead=EPOCHS - resumed.epochs_done)
    for epoch in range(resumed.epochs_done, EPOCHS):
        for step in range(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH):
            parameter.set_data(mx.nd.array(steps[step]))
            resumed.step()
        with resumed.averaged():
            score = float(((parameter.data().asnumpy() - TARGET) ** 2).mean())
        resumed.end_epoch(score=score)
    resumed.finish(measure=lambda: (parameter.data().asnumpy().astype(np.float64) - TARGET) ** 2)
    assert [entry["name"] for entry in resumed.choice] == [entry["name"] for entry in whole.choice]
    for mine, theirs in zip(resumed.choice, whole.choice):
        assert_allclose(mine["validation_loss"], theirs["validation_loss"], rtol=1e-5, err_msg=mine["name"])
    assert chosen(resumed)["name"] == chosen(whole)["name"]
    assert_allclose(parameter.data().asnumpy(), whole_shipped, rtol=1e-5, atol=1e-6)


def test_auto_is_a_callback_config_with_no_other_key_and_records_its_choice():
    callback = AveragingCallback.from_config({"type": "auto"})
    probe = train(callback, epochs=3, batches=3)
    names = [entry["name"] for entry in callback.choice]
    assert names[0] == "last iterate" and names[-1].startswith("mean of the 3 best epochs")
    assert sum(entry["chosen"] for entry in callback.choice) == 1
    losses = [entry["validation_loss"] for entry in callback.choice]
    assert all(math.isfinite(loss) for loss in losses)
    assert_allclose(losses[0], callback.history[-1]["raw_validation_loss"], rtol=1e-5)  # the trainer's own number
    assert probe.network is not None


def test_module_averaging_chooses_by_the_validation_metric():
    seed_everything()
    averaging = ModuleAveraging(new_module([mx.cpu()]), {"type": "auto", "maximize": True})
    averaging.fit(data_iterator(0), eval_data=data_iterator(1), **fit_arguments())
    assert sum(entry["chosen"] for entry in averaging.choice) == 1
    best = max(entry["validation_loss"] for entry in averaging.choice)  # an accuracy: higher is better
    assert next(entry for entry in averaging.choice if entry["chosen"])["validation_loss"] >= best - 1e-3 * best


@pytest.mark.parametrize(
    "config, message",
    [
        ({"type": "auto", "widths": []}, "auto widths must be a non-empty list"),
        ({"type": "auto", "tracked": [0.5]}, r"auto tracked\[0\] must be a number in \[1e-06, 0.2887\)"),
        ({"type": "auto", "best_epochs": 0}, "auto best_epochs must be an integer >= 1"),
        ({"type": "auto", "decay": 0.9}, "auto: unknown key 'decay'"),
    ],
)
def test_bad_auto_settings_name_the_culprit(config, message):
    with pytest.raises(ConfigurationError, match=message):
        AveragingRun(config)


def test_auto_chooses_by_itself():
    with pytest.raises(ConfigurationError, match="the 'auto' mode chooses by itself: give no avg_strategy"):
        AveragingRun("auto", avg_strategy="mean")
