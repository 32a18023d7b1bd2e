"""Tiny real GluonTS training runs: what the network holds during validation and after training."""

import glob
import json
import logging
import os
from typing import List

import mxnet as mx
import numpy as np
import pytest
from gluonts.core import serde
from gluonts.mx import SimpleFeedForwardEstimator, Trainer
from gluonts.mx.trainer.callback import Callback
from numpy.testing import assert_allclose

from modavg_plugin import (
    AveragingCallback,
    CheckpointAveragingCallback,
    CheckpointError,
    ConfigurationError,
    ExponentialAveragingCallback,
    SelectNBestMean,
)

from conftest import (
    Probe,
    assert_weights_close,
    dataset,
    independent_ema,
    mean_of,
    read_weights,
    tiny_estimator,
    train,
)


def test_ema_is_validated_and_kept_at_the_end_despite_gluonts_default_callbacks():
    callback = ExponentialAveragingCallback(decay=0.9)
    probe = train(callback)
    steps_per_epoch = 3
    assert callback.num_updates == 4 * steps_per_epoch
    for epoch, validated in enumerate(probe.during_validation):
        assert_weights_close(validated, independent_ema(probe.raw_after_step, 0.9, (epoch + 1) * steps_per_epoch))
    # training continues from the raw weights, not from the averaged ones
    for epoch in range(1, 4):
        assert_weights_close(probe.raw_at_epoch_start[epoch], probe.raw_after_step[epoch * steps_per_epoch], 0, 0)
    final = independent_ema(probe.raw_after_step, 0.9, 12)
    assert_weights_close(read_weights(probe.network), final)
    assert not np.allclose(final[next(iter(final))], probe.raw_after_step[-1][next(iter(final))])


def test_ema_with_mean_strategy_averages_the_best_epoch_averages(tmp_path):
    callback = AveragingCallback.from_config(
        {"decay": 0.9, "avg_strategy": {"type": "mean", "num_models": 2}, "checkpoint_dir": str(tmp_path)}
    )
    probe = train(callback)
    best_two = np.argsort(probe.scores, kind="stable")[:2]
    expected = mean_of([probe.during_validation[epoch] for epoch in best_two])
    assert_weights_close(read_weights(probe.network), expected)
    assert sorted(glob.glob(str(tmp_path / "epoch-*.params"))) == sorted(
        str(tmp_path / f"epoch-{epoch:04d}.params") for epoch in best_two
    )
    assert len(glob.glob(str(tmp_path / "*-epoch-info.json"))) == 2


def test_without_a_strategy_only_the_latest_checkpoint_is_kept(tmp_path):
    callback = ExponentialAveragingCallback(decay=0.9, checkpoint_dir=str(tmp_path))
    probe = train(callback, epochs=3, batches=2)
    checkpoints = sorted(name for name in os.listdir(tmp_path) if not name.startswith(("averaging-state", ".")))
    assert checkpoints == ["epoch-0002-epoch-info.json", "epoch-0002.params"]
    assert os.path.isfile(tmp_path / ".epoch.lock")  # the run's lock, released: the next run may take it
    saved = mx.nd.load(str(tmp_path / "epoch-0002.params"))
    expected = independent_ema(probe.raw_after_step, 0.9, 6)
    # files name parameters relative to the network, without Gluon's per-process prefix
    assert_weights_close({probe.network.prefix + name: array.asnumpy() for name, array in saved.items()}, expected)


def test_files_stay_bounded_during_training(tmp_path):
    seen: List[int] = []

    class Counter(Callback):
        def on_epoch_end(self, **kwargs) -> bool:
            seen.append(len(glob.glob(str(tmp_path / "epoch-*.params"))))
            return True

    callback = ExponentialAveragingCallback(
        decay=0.9, avg_strategy=SelectNBestMean(num_models=2), checkpoint_dir=str(tmp_path)
    )
    train(callback, with_validation=False, epochs=5, batches=2, extra_callbacks=[Counter()])
    assert seen == [1, 2, 2, 2, 2]


def test_score_is_the_training_loss_without_validation(tmp_path):
    callback = ExponentialAveragingCallback(decay=0.9, checkpoint_dir=str(tmp_path))
    probe = train(callback, with_validation=False, epochs=2)
    assert probe.during_validation == []

    (info_path,) = glob.glob(str(tmp_path / "*-epoch-info.json"))
    info = json.loads(open(info_path).read())
    assert info["epoch_no"] == 1 and info["score"] == pytest.approx(probe.scores[-1])
    assert_weights_close(read_weights(probe.network), independent_ema(probe.raw_after_step, 0.9, 6))


def test_checkpoints_callback_averages_the_best_raw_epochs():
    callback = AveragingCallback.from_config({"type": "checkpoints", "avg_strategy": {"num_models": 2}})
    assert isinstance(callback, CheckpointAveragingCallback)
    probe = train(callback)
    best_two = np.argsort(probe.scores, kind="stable")[:2]
    expected = mean_of([probe.raw_at_epoch_end[epoch] for epoch in best_two])
    assert_weights_close(read_weights(probe.network), expected)
    # validation saw the raw weights: no EMA here
    assert_weights_close(probe.during_validation[0], probe.raw_after_step[3], 0, 0)


def test_failure_while_averaging_keeps_the_trained_weights_and_says_why(monkeypatch, caplog):
    def broken_average(self, paths, weights):
        raise OSError("disk on fire")

    monkeypatch.setattr(SelectNBestMean, "average", broken_average)
    callback = ExponentialAveragingCallback(decay=0.9, avg_strategy=SelectNBestMean(num_models=2))
    with caplog.at_level(logging.ERROR, logger="modavg_plugin"):
        probe = train(callback)
    assert_weights_close(read_weights(probe.network), independent_ema(probe.raw_after_step, 0.9, 12))
    assert any("disk on fire" in record.getMessage() for record in caplog.records)

    raw_callback = CheckpointAveragingCallback(avg_strategy=SelectNBestMean(num_models=2))
    probe = train(raw_callback)
    assert_weights_close(read_weights(probe.network), probe.raw_after_step[-1], 0, 0)


def test_estimator_serde_round_trip_keeps_the_callback():
    callback = AveragingCallback.from_config({"decay": 0.99, "avg_strategy": {"type": "softmax", "num_models": 3}})
    estimator = SimpleFeedForwardEstimator(prediction_length=4, trainer=Trainer(epochs=1, callbacks=[callback]))
    decoded = serde.load_json(serde.dump_json(estimator))
    (restored,) = [c for c in decoded.trainer.callbacks.callbacks if isinstance(c, ExponentialAveragingCallback)]
    assert restored.decay == 0.99
    assert restored.avg_strategy == callback.avg_strategy
    assert serde.dump_json(restored) == serde.dump_json(callback)


def test_hooks_accept_extra_keyword_arguments(tmp_path):
    net = mx.gluon.nn.Dense(2, in_units=3)
    net.initialize()
    callback = ExponentialAveragingCallback(decay=0.5, checkpoint_dir=str(tmp_path))
    callback.on_train_start(max_epochs=1, future_argument=1)
    callback.on_network_initializing_end(training_network=net, future_argument=1)
    callback.on_train_epoch_start(training_network=net, future_argument=1)
    assert callback.on_train_batch_end(training_network=net, future_argument=1)
    callback.on_validation_epoch_start(training_network=net, future_argument=1)
    assert callback.on_validation_epoch_end(epoch_no=0, epoch_loss=1.0, training_network=net, trainer=None, x=1)
    assert callback.on_epoch_end(
        epoch_no=0, epoch_loss=1.0, training_network=net, trainer=None, best_epoch_info={}, ctx=None
    )
    callback.on_train_end(training_network=net, temporary_file="renamed in some GluonTS versions", ctx=None)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"decay": 1.5}, r"decay must be a number in \[0, 1\]"),
        ({"decay": float("nan")}, r"decay must be a number in \[0, 1\]"),
        ({"avg_strategy": {"num_models": 0}}, "num_models must be an integer >= 1"),
        ({"avg_strategy": {"metric": "accuracy"}}, r"record only \['score'\]"),
        ({"decy": 0.9}, "unknown key 'decy'.*did you mean 'decay'"),
        ({"type": "exponentail"}, "did you mean 'exponential'"),
    ],
)
def test_bad_callback_configs_are_refused(config, message):
    with pytest.raises(ConfigurationError, match=message):
        AveragingCallback.from_config(config)


def test_registered_callbacks():
    assert AveragingCallback.list_available() == [
        "exponential",
        "checkpoints",
        "moving_average",
        "iteration_averaging",
        "auto",
    ]


def test_shadows_start_from_weights_set_by_a_later_callback_at_initialisation():
    """Like GluonTS's WarmStart listed after ours: the EMA must start from the weights it writes."""

    class ConstantStart(Callback):
        def on_network_initializing_end(self, training_network, **kwargs) -> None:
            for parameter in training_network.collect_params().values():
                parameter.data()[:] = 0.25

    callback = ExponentialAveragingCallback(decay=0.9)
    probe = train(callback, with_validation=False, epochs=1, batches=3, extra_callbacks=[ConstantStart()])
    assert all(np.all(value == 0.25) for value in probe.raw_after_step[0].values())
    assert_weights_close(read_weights(probe.network), independent_ema(probe.raw_after_step, 0.9, 3))


def test_raw_validation_loss_matches_a_run_that_validates_the_raw_weights(caplog):
    """Same seed, same raw trajectory: the checkpoints callback validates the raw weights directly."""
    with caplog.at_level(logging.INFO, logger="modavg_plugin"):
        averaged = ExponentialAveragingCallback(decay=0.9)
        train(averaged, hybridize=True)  # the swap must work on the cached graph too
    raw = CheckpointAveragingCallback()
    train(raw, hybridize=True)
    assert [entry["epoch_no"] for entry in averaged.history] == [0, 1, 2, 3]
    assert_allclose(
        [entry["raw_validation_loss"] for entry in averaged.history],
        [entry["validation_loss"] for entry in raw.history],
        rtol=1e-5,
    )
    assert_allclose(
        [entry["training_loss"] for entry in averaged.history],
        [entry["training_loss"] for entry in raw.history],
        rtol=1e-6,
    )
    assert all(entry["validation_loss"] != entry["raw_validation_loss"] for entry in averaged.history)
    lines = [record.getMessage() for record in caplog.records if "with the raw weights" in record.getMessage()]
    assert len(lines) == 4
    first = averaged.history[0]
    assert f"{first['validation_loss']:.6g} with the moving average, {first['raw_validation_loss']:.6g}" in lines[0]


@pytest.mark.parametrize("compare_raw, passes_per_batch", [(True, 2), (False, 1)])
def test_compare_raw_costs_one_extra_forward_pass_per_validation_batch(compare_raw, passes_per_batch):
    class CountValidationForwards(Callback):
        """Counts calls of a block inside the network (each forward pass calls it once) during validation."""

        def __init__(self) -> None:
            self.forwards, self.batches, self.validating = 0, 0, False

        def on_network_initializing_end(self, training_network, **kwargs) -> None:
            inner: List[mx.gluon.Block] = []
            training_network.apply(lambda block: inner.append(block) if block is not training_network else None)
            inner[0].register_forward_pre_hook(lambda *args: setattr(self, "forwards", self.forwards + self.validating))

        def on_validation_epoch_start(self, training_network, **kwargs) -> None:
            self.validating = True

        def on_validation_batch_end(self, training_network, **kwargs) -> bool:
            self.batches += 1
            return True

        def on_validation_epoch_end(self, **kwargs) -> bool:
            self.validating = False
            return True

    counter = CountValidationForwards()
    callback = ExponentialAveragingCallback(decay=0.9, compare_raw=compare_raw)
    train(callback, epochs=2, extra_callbacks=[counter])
    assert counter.batches > 0
    assert counter.forwards == passes_per_batch * counter.batches
    assert ("raw_validation_loss" in callback.history[0]) is compare_raw


class FailDuringValidation(Callback):
    """Raises ``error`` inside the network's forward pass on the first validation batch of ``epoch``."""

    def __init__(self, epoch: int, error: BaseException) -> None:
        self.epoch, self.error, self.validating_epoch = epoch, error, -1
        self.network: mx.gluon.Block = None

    def on_network_initializing_end(self, training_network, **kwargs) -> None:
        self.network = training_network
        inner: List[mx.gluon.Block] = []
        training_network.apply(lambda block: inner.append(block) if block is not training_network else None)
        inner[0].register_forward_pre_hook(self._maybe_fail)
        self.epochs_started = 0

    def on_validation_epoch_start(self, training_network, **kwargs) -> None:
        self.validating_epoch = self.epochs_started
        self.epochs_started += 1

    def on_validation_epoch_end(self, **kwargs) -> bool:
        self.validating_epoch = -1
        return True

    def _maybe_fail(self, block, inputs) -> None:
        if self.validating_epoch == self.epoch:
            raise self.error


def test_an_exception_inside_a_validation_pass_leaves_the_raw_weights():
    failing = FailDuringValidation(epoch=1, error=RuntimeError("broken validation batch"))
    callback = ExponentialAveragingCallback(decay=0.9)
    probes: List[Probe] = []

    class KeepProbe(Probe):
        def __init__(self) -> None:
            super().__init__()
            probes.append(self)

    with pytest.raises(RuntimeError, match="broken validation batch"):
        mx.random.seed(7)
        np.random.seed(7)
        probe = KeepProbe()
        estimator = tiny_estimator([callback, probe, failing], epochs=3, batches=3)
        estimator.train(dataset(), validation_data=dataset())
    (probe,) = probes
    assert_weights_close(read_weights(failing.network), probe.raw_after_step[-1], 0, 0)
    assert "forward" not in vars(failing.network)  # the network's own forward pass again


def test_ctrl_c_during_validation_ends_with_the_average_and_intact_checkpoints(tmp_path):
    interrupt = FailDuringValidation(epoch=2, error=KeyboardInterrupt())
    callback = ExponentialAveragingCallback(decay=0.9, checkpoint_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="KeyboardInterrupt"):  # GluonTS ends the loop and calls on_train_end
        probe = train(callback, epochs=4, batches=3, extra_callbacks=[interrupt])
    assert len(probe.raw_after_step) == 1 + 3 * 3  # three epochs trained, then Ctrl-C in the third validation
    assert_weights_close(read_weights(probe.network), independent_ema(probe.raw_after_step, 0.9, 9))
    saved = mx.nd.load(str(tmp_path / "epoch-0001.params"))  # the last complete epoch's checkpoint
    expected = independent_ema(probe.raw_after_step, 0.9, 6)
    assert_weights_close({probe.network.prefix + name: value.asnumpy() for name, value in saved.items()}, expected)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]


def test_cumulative_average_callback_ends_with_the_mean_of_every_step():
    callback = AveragingCallback.from_config({"type": "moving_average", "average": {"type": "cumulative"}})
    probe = train(callback, epochs=3, batches=3)
    steps = probe.raw_after_step[1:]  # the weights at initialisation are not counted
    assert len(steps) == 9
    assert_weights_close(read_weights(probe.network), mean_of(steps))
    # validation saw the running mean of the steps so far
    for epoch, validated in enumerate(probe.during_validation):
        assert_weights_close(validated, mean_of(steps[: 3 * (epoch + 1)]))


def test_moving_average_callback_round_trips_through_serde_and_refuses_bad_averages():
    callback = AveragingCallback.from_config({"type": "moving_average", "average": {"type": "cumulative", "eta": 1.5}})
    restored = serde.load_json(serde.dump_json(callback))
    assert restored.average == {"type": "cumulative", "eta": 1.5}
    with pytest.raises(ConfigurationError, match="unknown key 'decay' for 'cumulative'"):
        AveragingCallback.from_config({"type": "moving_average", "average": {"type": "cumulative", "decay": 0.9}})
    with pytest.raises(ConfigurationError, match="did you mean 'cumulative'"):
        AveragingCallback.from_config({"type": "moving_average", "average": {"type": "cumulativ"}})


def test_power_average_callback_ends_with_the_closed_form_profile():
    gamma = 2.0
    callback = AveragingCallback.from_config({"type": "moving_average", "average": {"type": "power", "gamma": gamma}})
    probe = train(callback, epochs=3, batches=3)
    steps = probe.raw_after_step[1:]
    t = len(steps)
    weights = [(k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / t ** (gamma + 1) for k in range(1, t + 1)]
    expected = {name: sum(w * step[name] for w, step in zip(weights, steps)) for name in steps[0]}
    assert_weights_close(read_weights(probe.network), expected)


# Options of issue 7: triggers, name filters, greedy soups ------------------------------


def test_alpha_suffix_trigger_starts_the_average_at_an_epoch_end():
    """alpha = 0.5 of 4 epochs: the trigger fires at the end of epoch 2 (after step 6); steps 7-12 are averaged."""
    callback = AveragingCallback.from_config(
        {"type": "moving_average", "average": {"type": "cumulative"}, "trigger": {"type": "alpha_suffix", "alpha": 0.5}}
    )
    probe = train(callback, with_validation=True)
    assert callback.moving_average.start_step == 6
    assert_weights_close(probe.during_validation[0], probe.raw_after_step[3])  # not started: the latest weights
    assert_weights_close(read_weights(probe.network), mean_of(probe.raw_after_step[7:13]))


def test_include_pattern_averages_the_weights_and_leaves_the_biases_raw(tmp_path):
    callback = AveragingCallback.from_config(
        {
            "type": "moving_average",
            "average": {"type": "cumulative", "include": ["*weight"]},
            "checkpoint_dir": str(tmp_path),
        }
    )
    probe = train(callback, with_validation=False, epochs=2)
    final, averaged, raw = read_weights(probe.network), mean_of(probe.raw_after_step[1:7]), probe.raw_after_step[6]
    for name in final:
        assert_allclose(
            final[name], (averaged if name.endswith("weight") else raw)[name], rtol=1e-5, atol=1e-6, err_msg=name
        )
    saved = mx.nd.load(str(tmp_path / "epoch-0001.params"))  # a complete checkpoint: raw biases included
    assert {probe.network.prefix + name for name in saved} == set(final)


def test_greedy_soup_evaluates_candidates_on_the_validation_data(tmp_path):
    from modavg_plugin import GreedySoup

    strategy = GreedySoup(num_models=4)
    callback = CheckpointAveragingCallback(avg_strategy=strategy, checkpoint_dir=str(tmp_path))
    probe = train(callback, epochs=4)
    assert strategy.evaluate is None  # the callback's evaluation was lent for the end of training only
    trials = strategy.trials
    epochs = [int(os.path.basename(trial["path"])[6:10]) for trial in trials]
    assert epochs == list(np.argsort(probe.scores, kind="stable"))
    # The best epoch alone, evaluated on the validation data, scores what the trainer's validation measured.
    assert trials[0]["score"] == pytest.approx(probe.scores[epochs[0]], rel=1e-5)
    kept = [epoch for epoch, trial in zip(epochs, trials) if trial["kept"]]
    assert_weights_close(read_weights(probe.network), mean_of([probe.raw_at_epoch_end[epoch] for epoch in kept]))


def test_greedy_soup_without_validation_data_keeps_the_best_checkpoint(caplog):
    from modavg_plugin import GreedySoup

    callback = CheckpointAveragingCallback(avg_strategy=GreedySoup(num_models=3))
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        probe = train(callback, with_validation=False, epochs=3)
    assert "needs validation data" in caplog.text
    best = int(np.argmin(probe.scores))
    assert_weights_close(read_weights(probe.network), probe.raw_at_epoch_end[best])


def test_modavg_posthoc_rebuilds_a_tracked_power_average_from_a_real_runs_snapshots(tmp_path):
    """A real run keeps snapshots of sigma_rel 0.05 and 0.10 each epoch and tracks 0.08 directly.

    The rebuilt 0.08 average is sum_i x_i snapshot_i = sum_k r_k theta_k with r = sum_i x_i w_i, the
    least-squares fit of the target profile w (exact discrete profiles), so it differs from the
    tracked one by sum_k (r_k - w_k) theta_k: at most residual_L1 * max_k |theta_k| element-wise
    (plus float32 rounding). Both the bound and the exact float64 value are checked.
    """
    from modavg_plugin.cli import main
    from modavg_plugin.posthoc import plan_posthoc, power_profile

    callback = AveragingCallback.from_config(
        {
            "type": "moving_average",
            "average": {"type": "power", "sigma_rel": 0.08},
            "checkpoint_dir": str(tmp_path),
            "posthoc": {"sigma_rels": [0.05, 0.10], "every_epochs": 1},
        }
    )
    probe = train(callback, with_validation=False, epochs=8, batches=10)
    output = tmp_path / "rebuilt.params"
    assert main(["posthoc", str(tmp_path / "posthoc"), "--sigma-rel", "0.08", "-o", str(output)]) == 0
    plan = plan_posthoc(str(tmp_path / "posthoc"), sigma_rel=0.08)
    assert plan.step == 80 and len(plan.snapshots) == 16
    rebuilt = {probe.network.prefix + name: value.asnumpy() for name, value in mx.nd.load(str(output)).items()}
    tracked = read_weights(probe.network)  # the network ends with the directly tracked 0.08 average
    steps = probe.raw_after_step[1:]
    profile = sum(
        x * power_profile(record["gamma"], record["step"], np.arange(1, 81))
        for x, record in zip(plan.coefficients, plan.snapshots)
    )
    assert plan.residual < 0.05
    for name in tracked:
        exact = sum(r * step[name] for r, step in zip(profile, steps))
        assert_allclose(rebuilt[name], exact, rtol=1e-4, atol=1e-5, err_msg=name)
        largest = max(np.abs(step[name]).max() for step in steps)
        assert np.abs(rebuilt[name] - tracked[name]).max() <= plan.residual * largest + 1e-5, name


def test_load_weights_puts_a_saved_checkpoint_into_the_trained_predictor(tmp_path):
    from modavg_plugin import load_weights

    mx.random.seed(7)
    np.random.seed(7)
    callback = ExponentialAveragingCallback(
        decay=0.9, avg_strategy=SelectNBestMean(num_models=2), checkpoint_dir=str(tmp_path)
    )
    estimator = SimpleFeedForwardEstimator(
        prediction_length=4, context_length=8, num_hidden_dimensions=[6], batch_size=8,
        trainer=Trainer(epochs=2, num_batches_per_epoch=2, callbacks=[callback]),
    )  # fmt: skip
    predictor = estimator.train(dataset())
    saved = mx.nd.load(str(tmp_path / "epoch-0000.params"))  # epoch 0's EMA; the predictor holds the mean of two
    name = next(iter(predictor.prediction_net.collect_params()))
    before = predictor.prediction_net.collect_params()[name].data().asnumpy()
    load_weights(predictor.prediction_net, str(tmp_path / "epoch-0000.params"))
    assert not np.allclose(predictor.prediction_net.collect_params()[name].data().asnumpy(), before)
    for name, parameter in predictor.prediction_net.collect_params().items():
        matches = [key for key in saved if name.endswith(key)]
        assert_allclose(
            parameter.data().asnumpy(), saved[max(matches, key=len)].asnumpy(), rtol=0, atol=0, err_msg=name
        )


def test_posthoc_snapshots_of_an_earlier_run_in_the_folder_are_refused(tmp_path):
    settings = {"type": "moving_average", "checkpoint_dir": str(tmp_path), "posthoc": {"every_epochs": 1}}
    train(AveragingCallback.from_config(settings), with_validation=False, epochs=1, batches=2)
    assert len(glob.glob(str(tmp_path / "posthoc" / "*.params"))) == 2
    with pytest.raises(CheckpointError, match=r"already holds files of an earlier run.*resume=True"):
        train(AveragingCallback.from_config(settings), with_validation=False, epochs=1, batches=2)
    for leftover in glob.glob(str(tmp_path / "epoch-*")) + [str(tmp_path / "averaging-state.params")]:
        os.remove(leftover)  # only the snapshots are left
    with pytest.raises(ConfigurationError, match=r"already holds snapshots of an earlier run.*resume=True"):
        train(AveragingCallback.from_config(settings), with_validation=False, epochs=1, batches=2)


class FailAtEpochEnd(Callback):
    """Listed after the averaging callback: raises at the end of epoch ``epoch`` (after a checkpoint is saved)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, epoch_no, **kwargs) -> bool:
        if epoch_no == self.epoch:
            raise RuntimeError("training broke")
        return True


def test_a_run_that_raises_leaves_no_temporary_checkpoint_folder():
    """GluonTS calls no hook when training raises: the folder goes with the training network."""
    import gc

    callback = ExponentialAveragingCallback(decay=0.9, avg_strategy=SelectNBestMean(num_models=2))
    with pytest.raises(RuntimeError, match="training broke") as failure:
        train(callback, extra_callbacks=[FailAtEpochEnd(epoch=1)])
    folder = callback.run.checkpoints.folder
    assert folder is not None and os.path.isdir(folder)  # while the traceback keeps the training network alive
    assert callback.run.checkpoints.records  # checkpoints were saved there before the failure
    del failure
    gc.collect()
    assert not os.path.exists(folder)
