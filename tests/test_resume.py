"""Stopping after epoch k and resuming gives the same final weights as one uninterrupted run."""

import errno
import gc
import logging
import os
from typing import Callable, Dict, List, Optional

import mxnet as mx
import numpy as np
import pytest
from gluonts.mx.trainer.callback import Callback
from numpy.testing import assert_allclose

from modavg_plugin import AveragingCallback, ConfigurationError, ExponentialAveragingCallback
from modavg_plugin.files import read_state_file
from modavg_plugin.run import STATE_NAME

from conftest import train


def read_weights(network: mx.gluon.Block) -> Dict[str, np.ndarray]:
    """The weights by name relative to the network (Gluon numbers prefixes per process: dense0_, dense1_)."""
    prefix = network.prefix
    return {
        name[len(prefix) :]: parameter.data().asnumpy().astype(np.float64)
        for name, parameter in network.collect_params().items()
    }


STEPS_PER_EPOCH = 3
SCORES = [5.0, 1.0, 4.0, 3.0, 2.0, 6.0]  # best two: epoch 1 (before the stop) and epoch 4 (after)


def network() -> mx.gluon.nn.Dense:
    net = mx.gluon.nn.Dense(3, in_units=4)
    net.initialize(mx.init.Uniform(5.0))
    return net


def raw_weights_at(step: int, net: mx.gluon.Block) -> None:
    """A deterministic stand-in for the optimiser: the raw weights after global step ``step``."""
    for index, parameter in enumerate(net.collect_params().values()):
        values = np.sin(0.7 * step + index + np.arange(parameter.data().size)).reshape(parameter.shape)
        parameter.set_data(mx.nd.array(values))


def run_epochs(callback: AveragingCallback, net: mx.gluon.Block, epochs: range, first_step: int) -> None:
    """Drive the hooks as GluonTS's Trainer does for ``epochs`` (run-local numbers from 0)."""
    step = first_step
    for local_epoch, epoch in enumerate(epochs):
        callback.on_train_epoch_start(training_network=net)
        for _ in range(STEPS_PER_EPOCH):
            step += 1
            raw_weights_at(step, net)
            callback.on_train_batch_end(training_network=net)
        callback.on_train_epoch_end(epoch_no=local_epoch, epoch_loss=10.0 + epoch, training_network=net)
        callback.on_epoch_end(epoch_no=local_epoch, epoch_loss=SCORES[epoch], training_network=net)


def config(folder: str, resume: bool = False) -> Dict:
    return {
        "type": "exponential",
        "decay": 0.8,
        "avg_strategy": {"type": "mean", "num_models": 2},
        "checkpoint_dir": folder,
        "resume": resume,
    }


def started(settings: Dict, epochs: int):
    """A callback built from ``settings`` and a network, through GluonTS's first two hooks."""
    callback = AveragingCallback.from_config(settings)
    net = network()
    callback.on_train_start(max_epochs=epochs)
    raw_weights_at(0, net)
    callback.on_network_initializing_end(training_network=net)
    return callback, net


def uninterrupted(folder: str) -> Dict[str, np.ndarray]:
    callback, net = started(config(folder), epochs=6)
    run_epochs(callback, net, range(6), first_step=0)
    callback.on_train_end(training_network=net)
    return read_weights(net)


@pytest.mark.parametrize("callback_type", ["exponential", "checkpoints"])
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, callback_type):
    def make(folder, resume=False):
        settings = config(str(folder), resume)
        if callback_type == "checkpoints":
            settings = {key: settings[key] for key in ("avg_strategy", "checkpoint_dir", "resume")} | {
                "type": "checkpoints"
            }
        return AveragingCallback.from_config(settings)

    expected_net = network()
    whole = make(tmp_path / "whole")
    whole.on_train_start(max_epochs=6)
    raw_weights_at(0, expected_net)
    whole.on_network_initializing_end(training_network=expected_net)
    run_epochs(whole, expected_net, range(6), first_step=0)
    whole.on_train_end(training_network=expected_net)

    first = make(tmp_path / "split")
    net = network()
    first.on_train_start(max_epochs=6)
    raw_weights_at(0, net)
    first.on_network_initializing_end(training_network=net)
    run_epochs(first, net, range(3), first_step=0)
    raw_after_stop = read_weights(net)
    del first, net  # killed: no on_train_end
    gc.collect()  # what dies with a killed process: here, the first run's lock on the folder

    resumed = make(tmp_path / "split", resume=True)
    fresh = network()  # a new process: freshly initialised weights
    resumed.on_train_start(max_epochs=3)
    resumed.on_network_initializing_end(training_network=fresh)
    for name, value in read_weights(fresh).items():
        assert_allclose(value, raw_after_stop[name], rtol=0, atol=0)  # training goes on from the saved raw weights
    run_epochs(resumed, fresh, range(3, 6), first_step=3 * STEPS_PER_EPOCH)
    resumed.on_train_end(training_network=fresh)

    for name, value in read_weights(fresh).items():
        assert_allclose(value, read_weights(expected_net)[name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert [entry["epoch_no"] for entry in resumed.history] == list(range(6))
    assert sorted(os.listdir(tmp_path / "split")) == sorted(os.listdir(tmp_path / "whole"))


def test_the_final_weights_are_the_mean_of_the_two_best_epochs_across_the_stop(tmp_path):
    """The expectation of the test above, computed independently: EMA by hand, best epochs 1 and 4."""
    net = network()
    raw_weights_at(0, net)
    average = read_weights(net)
    at_epoch_end = []
    for step in range(1, 6 * STEPS_PER_EPOCH + 1):
        raw_weights_at(step, net)
        decay = min(0.8, (1 + step) / (10 + step))
        average = {name: decay * average[name] + (1 - decay) * value for name, value in read_weights(net).items()}
        if step % STEPS_PER_EPOCH == 0:
            at_epoch_end.append(average)
    expected = {name: (at_epoch_end[1][name] + at_epoch_end[4][name]) / 2 for name in average}
    for name, value in uninterrupted(str(tmp_path)).items():
        assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6)


def test_resume_without_saved_state_starts_afresh_and_resume_needs_a_folder(tmp_path):
    callback = AveragingCallback.from_config(config(str(tmp_path / "empty"), resume=True))
    net = network()
    callback.on_train_start(max_epochs=1)
    before = read_weights(net)
    callback.on_network_initializing_end(training_network=net)
    assert callback.run.epochs_done == 0 and callback.num_updates == 0
    for name, value in read_weights(net).items():
        assert_allclose(value, before[name], rtol=0, atol=0)
    with pytest.raises(ConfigurationError, match="resume=True needs a checkpoint folder"):
        AveragingCallback.from_config({"resume": True})


def test_real_gluonts_runs_resume_the_average_and_the_epoch_count(tmp_path):
    """Two real runs of 2 epochs: the second continues the update count, epochs and files of the first."""
    first = ExponentialAveragingCallback(decay=0.9, checkpoint_dir=str(tmp_path), avg_strategy=None)
    train(first, epochs=2, batches=3)
    state, arrays, _ = read_state_file(str(tmp_path / STATE_NAME))
    assert state["epochs_done"] == 2 and state["num_updates"] == 6
    saved_raw = {name[len("raw:") :]: value.asnumpy() for name, value in arrays.items() if name.startswith("raw:")}

    class FirstWeights(Callback):
        def on_network_initializing_end(self, training_network, **kwargs) -> None:
            self.weights = read_weights(training_network)

    seen = FirstWeights()
    second = ExponentialAveragingCallback(decay=0.9, checkpoint_dir=str(tmp_path), resume=True)
    train(second, epochs=2, batches=3, extra_callbacks=[seen])
    for name, value in saved_raw.items():
        assert_allclose(seen.weights[name], value, rtol=0, atol=0)
    assert second.num_updates == 12
    assert [entry["epoch_no"] for entry in second.history] == [0, 1, 2, 3]
    assert sorted(name for name in os.listdir(tmp_path) if name.endswith(".params")) == [
        "averaging-state.params",
        "epoch-0003.params",
    ]


def run_with_failing_saves(
    monkeypatch, module, failure: Callable[[str], Optional[OSError]], folder: str, epochs: int
) -> None:
    """Drive ``epochs`` epochs while ``module.save_params`` raises ``failure(path)`` when that is not ``None``."""
    real_save = module.save_params

    def save_or_fail(path, arrays):
        error = failure(path)
        if error is not None:
            raise error
        real_save(path, arrays)

    monkeypatch.setattr(module, "save_params", save_or_fail)
    callback, net = started(config(folder), epochs=epochs)
    run_epochs(callback, net, range(epochs), first_step=0)


def test_a_full_disk_keeps_training_and_the_last_good_checkpoint(tmp_path, monkeypatch, caplog):
    import modavg_plugin.checkpoint_log as checkpoint_log

    def disk_full_in_epochs_2_and_3(path: str) -> Optional[OSError]:
        full = any(f"epoch-{epoch:04d}" in path for epoch in (2, 3))
        return OSError(errno.ENOSPC, "No space left on device", path) if full else None

    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        run_with_failing_saves(monkeypatch, checkpoint_log, disk_full_in_epochs_2_and_3, str(tmp_path), epochs=6)
    warnings = [record.getMessage() for record in caplog.records if "No space left" in record.getMessage()]
    assert len(warnings) == 2 and "epoch 2" in warnings[0] and "training goes on" in warnings[0]
    # epochs 2 and 3 were never saved; the two best of the others (1 and 4) are kept, nothing else
    kept = sorted(name for name in os.listdir(tmp_path) if name.startswith("epoch-"))
    assert kept == [
        "epoch-0001-epoch-info.json",
        "epoch-0001.params",
        "epoch-0004-epoch-info.json",
        "epoch-0004.params",
    ]
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]


def test_a_failed_state_save_leaves_the_previous_state_whole(tmp_path, monkeypatch, caplog):
    """The state is one file: a kill (here, a failing write) mid-save cannot pair one epoch's counters with another's arrays."""
    import modavg_plugin.files as files

    state_saves: List[str] = []

    def third_state_save_fails(path: str) -> Optional[OSError]:
        state_saves.extend([path] if STATE_NAME in path else [])
        return OSError(errno.EIO, "Input/output error", path) if STATE_NAME in path and len(state_saves) == 3 else None

    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        run_with_failing_saves(monkeypatch, files, third_state_save_fails, str(tmp_path), epochs=3)
    assert "could not save the averaging state" in caplog.text
    state, arrays, _ = read_state_file(str(tmp_path / STATE_NAME))
    assert state["epochs_done"] == 2 and state["num_updates"] == 2 * STEPS_PER_EPOCH
    expected = network()
    raw_weights_at(2 * STEPS_PER_EPOCH, expected)
    for name, value in read_weights(expected).items():
        assert_allclose(arrays[f"raw:{name}"].asnumpy(), value, rtol=0, atol=0)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]


def test_plain_loop_resumes_from_state_dict_exactly(tmp_path):
    """A Gluon loop with momentum SGD, saved after epoch 2 of 4 (weights, optimiser, EMA) and resumed anew."""
    from modavg_plugin import ExponentialMovingAverage

    features = np.random.RandomState(0).randn(64, 4).astype(np.float32)
    target = features @ np.array([[1.0], [-2.0], [0.5], [3.0]], dtype=np.float32)

    def new_training():
        mx.random.seed(1)
        net = mx.gluon.nn.Dense(1, in_units=4, prefix="model_")  # names stable across runs in one process
        net.initialize(mx.init.Xavier())
        trainer = mx.gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.05, "momentum": 0.9})
        return net, trainer, ExponentialMovingAverage(net.collect_params().items(), decay=0.9)

    def epoch(net, trainer, ema, number, step):
        order = np.random.RandomState(number).permutation(64)  # the data order depends on the epoch only
        for start in range(0, 64, 16):
            rows = order[start : start + 16]
            with mx.autograd.record():
                loss = ((net(mx.nd.array(features[rows])) - mx.nd.array(target[rows])) ** 2).mean()
            loss.backward()
            trainer.step(1)
            step += 1
            ema.apply(num_updates=step)
        return step

    net, trainer, ema = new_training()
    step = 0
    for number in range(4):
        step = epoch(net, trainer, ema, number, step)
    expected = {name: shadow.asnumpy() for name, shadow in ema.shadows.items()}

    net, trainer, ema = new_training()
    step = 0
    for number in range(2):
        step = epoch(net, trainer, ema, number, step)
    net.save_parameters(str(tmp_path / "net.params"))
    trainer.save_states(str(tmp_path / "trainer.states"))
    state = ema.state_dict()
    np.savez(tmp_path / "ema.npz", num_applied=state["num_applied"], step=step, **state["shadows"])

    net, trainer, ema = new_training()  # "a new process"
    net.load_parameters(str(tmp_path / "net.params"))
    trainer.load_states(str(tmp_path / "trainer.states"))
    saved = np.load(tmp_path / "ema.npz")
    names = [name for name in saved.files if name not in ("num_applied", "step")]
    ema.load_state_dict({"num_applied": int(saved["num_applied"]), "shadows": {name: saved[name] for name in names}})
    step = int(saved["step"])
    for number in range(2, 4):
        step = epoch(net, trainer, ema, number, step)
    for name, shadow in ema.shadows.items():
        assert_allclose(shadow.asnumpy(), expected[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_resumed_run_continues_the_trigger_and_the_posthoc_snapshots(tmp_path):
    """NTA with n = 1 on SCORES fires at the end of epoch 4 (3.0 > min(5.0, 1.0)), after the stop at 3:
    only a trigger that remembers the epochs before the stop starts there. Then steps 13-18 are averaged."""

    def make(folder, resume=False):
        return AveragingCallback.from_config(
            {
                "type": "moving_average",
                "average": {"type": "cumulative"},
                "trigger": {"type": "nta", "n": 1},
                "checkpoint_dir": str(folder),
                "posthoc": {"sigma_rels": [0.1], "every_epochs": 2},
                "resume": resume,
            }
        )

    def run(callback, net, epochs, first_step, max_epochs):
        callback.on_train_start(max_epochs=max_epochs)
        if first_step == 0:
            raw_weights_at(0, net)
        callback.on_network_initializing_end(training_network=net)
        run_epochs(callback, net, epochs, first_step=first_step)

    whole_net = network()
    whole = make(tmp_path / "whole")
    run(whole, whole_net, range(6), 0, 6)
    whole.on_train_end(training_network=whole_net)

    first, net = make(tmp_path / "split"), network()
    run(first, net, range(3), 0, 6)
    del first, net  # killed
    gc.collect()
    resumed, fresh = make(tmp_path / "split", resume=True), network()
    run(resumed, fresh, range(3, 6), 3 * STEPS_PER_EPOCH, 3)
    resumed.on_train_end(training_network=fresh)

    assert whole.moving_average.start_step == resumed.moving_average.start_step == 4 * STEPS_PER_EPOCH
    reference = network()
    at_step = []
    for step in range(13, 19):
        raw_weights_at(step, reference)
        at_step.append(read_weights(reference))
    for name, value in read_weights(fresh).items():
        assert_allclose(
            value, np.mean([weights[name] for weights in at_step], axis=0), rtol=1e-5, atol=1e-6, err_msg=name
        )
        assert_allclose(value, read_weights(whole_net)[name], rtol=1e-6, atol=1e-7, err_msg=name)
    snapshots = sorted(os.listdir(tmp_path / "whole" / "posthoc"))
    assert snapshots == sorted(os.listdir(tmp_path / "split" / "posthoc"))
    assert [name for name in snapshots if name.endswith(".params")] == [
        f"posthoc-{s:08d}-0.params" for s in (6, 12, 18)
    ]
    for name in snapshots:
        if name.endswith(".params"):
            whole_values = mx.nd.load(str(tmp_path / "whole" / "posthoc" / name))
            split_values = mx.nd.load(str(tmp_path / "split" / "posthoc" / name))
            for key, value in whole_values.items():
                assert_allclose(
                    split_values[key].asnumpy(), value.asnumpy(), rtol=1e-6, atol=1e-7, err_msg=f"{name} {key}"
                )
