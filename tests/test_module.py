"""The Module.fit adapter: EMA from the executor's arrays, averaged evaluation, Module checkpoints."""

import json
import logging
import os

import mxnet as mx
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from modavg_plugin import ConfigurationError
from modavg_plugin.module import ModuleAveraging

from conftest import (
    MODULE_BATCH,
    MODULE_DECAY,
    MODULE_EPOCHS,
    data_iterator,
    executor_values,
    fit_arguments,
    new_module,
    seed_everything,
)

DECAY = MODULE_DECAY
EPOCHS = MODULE_EPOCHS


class ReferenceEma:
    """shadow_1 = p_1; shadow_k = d_k shadow_{k-1} + (1 - d_k) p_k, d_k = min(decay, (1 + k) / (10 + k))."""

    def __init__(self, module: mx.mod.Module) -> None:
        self.module = module
        self.steps = 0
        self.shadows: dict = {}

    def __call__(self, params) -> None:
        self.steps += 1
        values = executor_values(self.module)
        if self.steps == 1:
            self.shadows = {k: v.astype(np.float64) for k, v in values.items()}
            return
        decay = min(DECAY, (1 + self.steps) / (10 + self.steps))
        for name, value in values.items():
            self.shadows[name] = decay * self.shadows[name] + (1 - decay) * value


class RawWeights:
    """Records the raw arg_params Module.fit hands to epoch_end_callback."""

    def __init__(self) -> None:
        self.arg_params: dict = {}

    def __call__(self, epoch, symbol, arg_params, aux_params) -> None:
        self.arg_params = {name: value.asnumpy() for name, value in arg_params.items()}


def record_saved_checkpoints(averaging: ModuleAveraging) -> dict:
    """epoch_no -> (arrays as NumPy, metrics) of every checkpoint the adapter saves, filled as it saves."""
    saved = {}
    original_save = averaging.run.checkpoints.save

    def remember(file_stem, epoch_no, metrics, arrays):
        saved[epoch_no] = ({k: v.asnumpy() for k, v in arrays.items()}, dict(metrics))
        return original_save(file_stem, epoch_no, metrics, arrays)

    averaging.run.checkpoints.save = remember
    return saved


CONTEXTS = {"one device": ([mx.cpu(0)], "local"), "two devices": ([mx.cpu(0), mx.cpu(1)], "device")}


@pytest.mark.parametrize("setting", list(CONTEXTS))
def test_ema_follows_the_executor_arrays_and_training_is_unchanged(setting):
    contexts, kvstore = CONTEXTS[setting]
    seed_everything()
    plain, plain_raw = new_module(contexts), RawWeights()
    plain.fit(data_iterator(0), eval_data=data_iterator(1), epoch_end_callback=plain_raw, **fit_arguments(kvstore))

    seed_everything()
    module, raw = new_module(contexts), RawWeights()
    averaging = ModuleAveraging(module, {"type": "exponential", "decay": DECAY})
    reference = ReferenceEma(module)
    seen_in_evaluation = []
    callbacks = averaging.callbacks()
    module.fit(
        data_iterator(0),
        eval_data=data_iterator(1),
        batch_end_callback=[reference, callbacks["batch_end_callback"]],
        epoch_end_callback=[raw, callbacks["epoch_end_callback"]],
        eval_end_callback=callbacks["eval_end_callback"],
        eval_batch_end_callback=lambda params: seen_in_evaluation.append(
            {
                name: (executor_values(module)[name], averaging.moving_average.shadows[name].asnumpy())
                for name in ("arg:fc1_weight", "aux:bn1_moving_mean")
            }
        ),
        **fit_arguments(kvstore),
    )
    assert reference.steps == EPOCHS * 6
    shadows = averaging.moving_average.shadows
    assert sorted(shadows) == sorted(reference.shadows)
    for name, expected in reference.shadows.items():
        assert_allclose(shadows[name].asnumpy(), expected, rtol=1e-5, atol=1e-6, err_msg=name)
    # evaluation saw the averages on every batch...
    assert len(seen_in_evaluation) == EPOCHS * 6
    for snapshot in seen_in_evaluation:
        for name, (in_executor, shadow) in snapshot.items():
            assert_array_equal(in_executor, shadow, err_msg=name)
    # ...and training went on from the raw weights, bit for bit as without the adapter
    for name, value in plain_raw.arg_params.items():
        assert_array_equal(raw.arg_params[name], value, err_msg=name)
    assert not np.allclose(shadows["arg:fc1_weight"].asnumpy(), raw.arg_params["fc1_weight"])
    averaging.finish()
    arg_params, aux_params = module.get_params()
    assert_array_equal(arg_params["fc2_weight"].asnumpy(), shadows["arg:fc2_weight"].asnumpy())
    assert_array_equal(aux_params["bn1_moving_var"].asnumpy(), shadows["aux:bn1_moving_var"].asnumpy())
    for context_index in range(len(contexts)):  # every device holds the average
        device_weight = module._exec_group.param_arrays[0][context_index].asnumpy()
        assert_array_equal(device_weight, shadows["arg:fc1_weight"].asnumpy())


def test_checkpoints_are_module_checkpoints_and_the_end_is_the_strategy_average(tmp_path):
    seed_everything()
    module = new_module([mx.cpu()])
    prefix = str(tmp_path / "out" / "model")
    strategy = {"type": "mean", "num_models": 2, "metric": "accuracy", "maximize": True}
    averaging = ModuleAveraging(module, {"type": "exponential", "decay": DECAY}, strategy, checkpoint_prefix=prefix)
    saved = record_saved_checkpoints(averaging)
    averaging.fit(data_iterator(0), eval_data=data_iterator(1), **fit_arguments())

    assert sorted(saved) == [1, 2, 3]
    best = sorted(saved, key=lambda epoch: (-saved[epoch][1]["accuracy"], epoch))[:2]
    files = sorted(name for name in os.listdir(tmp_path / "out") if "averaging-state" not in name and name[0] != ".")
    expected_files = ["model-symbol.json"] + [
        f"model-{e:04d}{s}" for e in sorted(best) for s in (".params", "-epoch-info.json")
    ]
    assert files == sorted(expected_files)
    for epoch in best:
        info = json.loads((tmp_path / "out" / f"model-{epoch:04d}-epoch-info.json").read_text())
        assert info["params_path"] == f"model-{epoch:04d}.params" and info["epoch_no"] == epoch
        assert info["score"] == info["accuracy"] == saved[epoch][1]["accuracy"]
        loaded = mx.mod.Module.load(prefix, epoch)
        loaded.bind(
            data_shapes=[("data", (MODULE_BATCH, 5))],
            label_shapes=[("softmax_label", (MODULE_BATCH,))],
            for_training=False,
        )
        arg_params, aux_params = loaded.get_params()
        _, checkpoint_args, checkpoint_aux = mx.model.load_checkpoint(prefix, epoch)
        assert_array_equal(arg_params["fc1_weight"].asnumpy(), saved[epoch][0]["arg:fc1_weight"])
        assert_array_equal(checkpoint_aux["bn1_moving_mean"].asnumpy(), saved[epoch][0]["aux:bn1_moving_mean"])
        assert sorted(checkpoint_args) == sorted(arg_params)
    arg_params, aux_params = module.get_params()
    for name in ("arg:fc1_weight", "arg:fc2_bias", "aux:bn1_moving_var"):
        expected = np.mean([saved[epoch][0][name] for epoch in best], axis=0)
        kind, short = name.split(":")
        actual = (arg_params if kind == "arg" else aux_params)[short].asnumpy()
        assert_allclose(actual, expected, rtol=1e-6, atol=1e-7, err_msg=name)


def test_without_validation_epochs_are_saved_with_training_metrics_and_nothing_is_swapped(tmp_path):
    seed_everything()
    module = new_module([mx.cpu()])
    averaging = ModuleAveraging(module, checkpoint_prefix=str(tmp_path / "model"))
    raw = RawWeights()
    averaging.fit(data_iterator(0), epoch_end_callback=raw, **fit_arguments())
    info = json.loads((tmp_path / "model-0003-epoch-info.json").read_text())
    assert set(info) == {"params_path", "epoch_no", "accuracy", "score", "run_id"} and info["epoch_no"] == 3
    assert info["run_id"] == averaging.run.run_id
    files = sorted(name for name in os.listdir(tmp_path) if "averaging-state" not in name and name[0] != ".")
    assert files == ["model-0003-epoch-info.json", "model-0003.params", "model-symbol.json"]
    seed_everything()
    plain, plain_raw = new_module([mx.cpu()]), RawWeights()
    plain.fit(data_iterator(0), epoch_end_callback=plain_raw, **fit_arguments())
    for name, value in plain_raw.arg_params.items():
        assert_array_equal(raw.arg_params[name], value, err_msg=name)


def test_aux_states_copy_leaves_running_statistics_raw():
    seed_everything()
    module = new_module([mx.cpu()])
    averaging = ModuleAveraging(module, {"type": "exponential", "decay": DECAY}, aux_states="copy")
    averaging.fit(data_iterator(0), eval_data=data_iterator(1), **fit_arguments())
    assert not [name for name in averaging.moving_average.shadows if name.startswith("aux:")]
    arg_params, aux_params = module.get_params()
    assert_array_equal(arg_params["fc1_weight"].asnumpy(), averaging.moving_average.shadows["arg:fc1_weight"].asnumpy())
    running_mean = module._exec_group.aux_arrays[0][0].asnumpy()
    assert_array_equal(aux_params["bn1_moving_mean"].asnumpy(), running_mean)


def test_checkpoint_averaging_without_a_moving_average_saves_raw_weights(tmp_path):
    seed_everything()
    module = new_module([mx.cpu()])
    averaging = ModuleAveraging(module, None, {"type": "mean", "num_models": 3}, checkpoint_prefix=str(tmp_path / "m"))
    raw = RawWeights()
    averaging.fit(data_iterator(0), eval_data=data_iterator(1), epoch_end_callback=raw, **fit_arguments())
    assert averaging.moving_average is None
    last = mx.nd.load(str(tmp_path / "m-0003.params"))
    assert_array_equal(last["arg:fc2_weight"].asnumpy(), raw.arg_params["fc2_weight"])


def test_configuration_errors_name_the_culprit(caplog):
    module = new_module([mx.cpu()])
    with pytest.raises(ConfigurationError, match="aux_states must be one of"):
        ModuleAveraging(module, aux_states="mean")
    with pytest.raises(ConfigurationError, match="a moving average, an avg_strategy, or both"):
        ModuleAveraging(module, None)
    seed_everything()
    averaging = ModuleAveraging(module, avg_strategy={"type": "mean", "metric": "f1"})
    with pytest.raises(ConfigurationError, match=r"'f1', but the epochs record only \['accuracy', 'score'\]"):
        averaging.fit(data_iterator(0), eval_data=data_iterator(1), **fit_arguments())
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        seed_everything()
        ModuleAveraging(new_module([mx.cpu()]), avg_strategy="mean").fit(
            data_iterator(0), eval_data=data_iterator(1), **fit_arguments()
        )
    assert "pass maximize=True" in caplog.text


class FailDuringEvaluation:
    """An ``eval_batch_end_callback`` raising ``error`` on the second evaluation batch of ``epoch``."""

    def __init__(self, epoch: int, error: BaseException) -> None:
        self.epoch, self.error, self.batches = epoch, error, 0

    def __call__(self, params) -> None:
        if params.epoch == self.epoch:
            self.batches += 1
            if self.batches == 2:
                raise self.error


def fit_until_failure(tmp_path, error: BaseException):
    seed_everything()
    module, raw, reference = new_module([mx.cpu(0)]), RawWeights(), None
    averaging = ModuleAveraging(
        module, {"type": "exponential", "decay": DECAY}, checkpoint_prefix=str(tmp_path / "model")
    )
    reference = ReferenceEma(module)
    with pytest.raises(type(error)):
        averaging.fit(
            data_iterator(0),
            eval_data=data_iterator(1),
            batch_end_callback=reference,
            epoch_end_callback=raw,
            eval_batch_end_callback=FailDuringEvaluation(epoch=1, error=error),
            **fit_arguments(),
        )
    arg_params, _ = module.get_params()
    return averaging, raw, reference, {name: value.asnumpy() for name, value in arg_params.items()}


def test_an_exception_during_evaluation_leaves_the_raw_weights(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        averaging, raw, _, final = fit_until_failure(tmp_path, RuntimeError("evaluation data broke"))
    for name, value in raw.arg_params.items():  # the raw weights of epoch 1, which evaluation interrupted
        assert_array_equal(final[name], value, err_msg=name)
    assert not averaging.moving_average.is_assigned
    assert "training failed: the network keeps its raw weights" in caplog.text
    assert os.path.exists(tmp_path / "model-0001.params")  # the checkpoint of epoch 0 stays


def test_ctrl_c_during_evaluation_ends_with_the_averaged_weights(tmp_path):
    averaging, raw, reference, final = fit_until_failure(tmp_path, KeyboardInterrupt())
    for name, value in final.items():
        assert_allclose(value, reference.shadows[f"arg:{name}"], rtol=1e-5, atol=1e-6, err_msg=name)
    assert not np.allclose(final["fc1_weight"], raw.arg_params["fc1_weight"])
    assert mx.nd.load(str(tmp_path / "model-0001.params"))  # the checkpoint of epoch 0 is intact


@pytest.mark.parametrize("strategy", [None, {"type": "mean", "num_models": 2, "metric": "accuracy", "maximize": True}])
def test_stopping_after_epoch_two_and_resuming_ends_as_one_uninterrupted_fit(tmp_path, strategy):
    arguments = {**fit_arguments(), "num_epoch": 4}  # Adam: its step counters must be restored too

    def averaging_for(folder, resume=False):
        seed_everything()
        module = new_module([mx.cpu(0)])
        averaging = ModuleAveraging(
            module, {"type": "exponential", "decay": DECAY}, avg_strategy=strategy,
            checkpoint_prefix=str(folder / "model"), resume=resume,
        )  # fmt: skip
        return module, averaging

    module, averaging = averaging_for(tmp_path / "whole")
    averaging.fit(data_iterator(0), eval_data=data_iterator(1), **arguments)
    expected = {name: value.asnumpy() for name, value in module.get_params()[0].items()}

    module, averaging = averaging_for(tmp_path / "split")
    with pytest.raises(KeyboardInterrupt):
        averaging.fit(
            data_iterator(0),
            eval_data=data_iterator(1),
            eval_batch_end_callback=FailDuringEvaluation(epoch=2, error=KeyboardInterrupt()),
            **arguments,
        )
    module, averaging = averaging_for(tmp_path / "split", resume=True)  # a new process
    averaging.fit(data_iterator(0), eval_data=data_iterator(1), **arguments)
    for name, value in module.get_params()[0].items():
        assert_allclose(value.asnumpy(), expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert averaging.num_updates == 4 * 6
    whole = sorted(name for name in os.listdir(tmp_path / "whole"))
    assert sorted(os.listdir(tmp_path / "split")) == whole


def test_cumulative_average_under_module_fit_is_the_mean_of_every_update():
    seed_everything()
    module = new_module([mx.cpu(0)])
    averaging = ModuleAveraging(module, {"type": "cumulative"})
    after_each_update = []
    averaging.fit(
        data_iterator(0),
        eval_data=data_iterator(1),
        batch_end_callback=lambda params: after_each_update.append(executor_values(module)),
        **fit_arguments(),
    )
    assert len(after_each_update) == EPOCHS * 6
    arg_params, aux_params = module.get_params()
    for name, value in {
        **{f"arg:{n}": v for n, v in arg_params.items()},
        **{f"aux:{n}": v for n, v in aux_params.items()},
    }.items():
        expected = np.mean([values[name].astype(np.float64) for values in after_each_update], axis=0)
        assert_allclose(value.asnumpy(), expected, rtol=1e-5, atol=1e-6, err_msg=name)


# Options of issue 7 under Module.fit -----------------------------------------------------


def fit_recording(averaging: ModuleAveraging, module: mx.mod.Module, **overrides) -> list:
    """Fit with ``averaging``; the executor values after each update, recorded before the adapter's callback."""
    after_each_update = []
    arguments = {**fit_arguments(), **overrides}
    averaging.fit(
        data_iterator(0),
        eval_data=data_iterator(1),
        batch_end_callback=lambda params: after_each_update.append(executor_values(module)),
        **arguments,
    )
    return after_each_update


def module_values(module: mx.mod.Module) -> dict:
    arg_params, aux_params = module.get_params()
    return {
        **{f"arg:{n}": v.asnumpy() for n, v in arg_params.items()},
        **{f"aux:{n}": v.asnumpy() for n, v in aux_params.items()},
    }


def test_alpha_suffix_trigger_under_module_fit_averages_the_last_epochs():
    """alpha = 1/3 of 3 epochs: started at the end of epoch 2 (after update 12); updates 13-18 averaged."""
    seed_everything()
    module = new_module([mx.cpu(0)])
    averaging = ModuleAveraging(module, {"type": "cumulative"}, trigger={"type": "alpha_suffix", "alpha": 1 / 3})
    after_each_update = fit_recording(averaging, module)
    assert averaging.moving_average.start_step == 12
    for name, value in module_values(module).items():
        expected = np.mean([values[name].astype(np.float64) for values in after_each_update[12:]], axis=0)
        assert_allclose(value, expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_non_trainable_copy_under_module_fit_keeps_the_latest_running_statistics():
    seed_everything()
    module = new_module([mx.cpu(0)])
    averaging = ModuleAveraging(module, {"type": "cumulative", "non_trainable": "copy", "exclude": ["arg:fc2_*"]})
    after_each_update = fit_recording(averaging, module)
    final = module_values(module)
    for name, value in final.items():
        if name.startswith("aux:") or name.startswith("arg:fc2_"):
            expected = after_each_update[-1][name]
        else:
            expected = np.mean([values[name].astype(np.float64) for values in after_each_update], axis=0)
        assert_allclose(value, expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_greedy_soup_under_module_fit_scores_candidates_with_module_score(tmp_path):
    seed_everything()
    module = new_module([mx.cpu(0)])
    strategy = {"type": "greedy", "num_models": 3, "metric": "accuracy", "maximize": True}
    averaging = ModuleAveraging(module, None, strategy, checkpoint_prefix=str(tmp_path / "model"))
    saved = record_saved_checkpoints(averaging)
    averaging.fit(data_iterator(0), eval_data=data_iterator(1), **fit_arguments())
    trials = averaging.avg_strategy.trials
    epochs = [int(os.path.basename(trial["path"])[6:10]) for trial in trials]
    assert epochs == sorted(saved, key=lambda epoch: (-saved[epoch][1]["accuracy"], epoch))
    # the best epoch alone, scored again with Module.score on eval_data, has the accuracy fit measured
    assert trials[0]["score"] == pytest.approx(saved[epochs[0]][1]["accuracy"], abs=1e-9)
    kept = [epoch for epoch, trial in zip(epochs, trials) if trial["kept"]]
    for name, value in module_values(module).items():
        expected = np.mean([saved[epoch][0][name] for epoch in kept], axis=0)
        assert_allclose(value, expected, rtol=1e-6, atol=1e-7, err_msg=name)
    assert averaging.avg_strategy.evaluate is None


def test_posthoc_snapshots_under_module_fit_are_the_power_averages_of_the_updates(tmp_path):
    from modavg_plugin.posthoc import read_posthoc_snapshots

    seed_everything()
    module = new_module([mx.cpu(0)])
    averaging = ModuleAveraging(
        module,
        "exponential",
        checkpoint_prefix=str(tmp_path / "model"),
        posthoc={"sigma_rels": [0.1], "every_epochs": 2},
    )
    after_each_update = fit_recording(averaging, module)
    records = read_posthoc_snapshots(str(tmp_path / "posthoc"))
    assert sorted(record["step"] for record in records) == [12, 18]  # epoch 2, and the end of training
    gamma = records[0]["gamma"]
    for record in records:
        t = record["step"]
        weights = [(k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / t ** (gamma + 1) for k in range(1, t + 1)]
        saved = mx.nd.load(record["params_path"])
        for name in ("arg:fc1_weight", "aux:bn1_moving_mean"):
            expected = sum(w * values[name].astype(np.float64) for w, values in zip(weights, after_each_update))
            assert_allclose(saved[name].asnumpy(), expected, rtol=1e-4, atol=1e-5, err_msg=name)
