"""Where the GluonTS callbacks and ModuleAveraging once drifted apart, both now behave the same.

Each test runs the same setting through both adapters: the callback driven
by GluonTS's hooks by hand (a Dense network and a deterministic stand-in
for the optimiser), the Module adapter through a real ``Module.fit``.
"""

import logging
import os
import re
from typing import List, Sequence

import mxnet as mx
import numpy as np
import pytest

from modavg_plugin import AveragingCallback, ConfigurationError
from modavg_plugin.module import ModuleAveraging

from conftest import data_iterator, fit_arguments, new_module, seed_everything

STEPS_PER_EPOCH = 3
TWO_DEVICES = [mx.cpu(0), mx.cpu(1)]


def drive_callback(callback: AveragingCallback, epochs: int, scores: Sequence[float]) -> mx.gluon.Block:
    """GluonTS's hook sequence for ``epochs`` epochs (no validation data), the raw weights set by hand each step."""
    net = mx.gluon.nn.Dense(3, in_units=4)
    net.initialize(mx.init.Uniform(1.0), ctx=TWO_DEVICES)
    callback.on_train_start(max_epochs=epochs)
    callback.on_network_initializing_end(training_network=net)
    step = 0
    for epoch in range(epochs):
        callback.on_train_epoch_start(training_network=net)
        for _ in range(STEPS_PER_EPOCH):
            step += 1
            for index, parameter in enumerate(net.collect_params().values()):
                values = np.sin(0.7 * step + index + np.arange(parameter.data().size)).reshape(parameter.shape)
                for copy in parameter.list_data():
                    copy[:] = values
            callback.on_train_batch_end(training_network=net)
        callback.on_train_epoch_end(epoch_no=epoch, epoch_loss=scores[epoch], training_network=net)
        callback.on_epoch_end(epoch_no=epoch, epoch_loss=scores[epoch], training_network=net)
    return net


def fit_module(averaging: ModuleAveraging, epochs: int = 3, eval_metric: str = "acc") -> None:
    seed_everything()
    arguments = {**fit_arguments("device"), "num_epoch": epochs, "eval_metric": eval_metric}
    averaging.fit(data_iterator(0), eval_data=data_iterator(1), **arguments)


def messages(caplog: pytest.LogCaptureFixture, level: int) -> List[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == level]


# shadow_context: a top-level option of both, refused inside `average`, used by the post-hoc EMAs too ---------


def test_both_refuse_shadow_context_inside_the_average_with_the_same_message():
    average = {"type": "exponential", "shadow_context": "cpu(1)"}
    with pytest.raises(ConfigurationError) as from_callback:
        AveragingCallback.from_config({"type": "moving_average", "average": average})
    with pytest.raises(ConfigurationError) as from_module:
        ModuleAveraging(new_module([mx.cpu()]), average)
    assert str(from_callback.value) == str(from_module.value)
    assert "'shadow_context' is not part of an average's config (give it next to average)" in str(from_module.value)


def test_both_keep_the_averages_and_the_posthoc_averages_on_shadow_context(tmp_path):
    callback = AveragingCallback.from_config(
        {"type": "moving_average", "shadow_context": "cpu(1)", "checkpoint_dir": str(tmp_path / "callback")}
        | {"posthoc": {"sigma_rels": [0.05]}}
    )
    drive_callback(callback, epochs=2, scores=[2.0, 1.0])
    averaging = ModuleAveraging(
        new_module(TWO_DEVICES),
        "exponential",
        checkpoint_prefix=str(tmp_path / "module" / "model"),
        posthoc={"sigma_rels": [0.05]},
        shadow_context="cpu(1)",
    )
    fit_module(averaging, epochs=2)
    for adapter in (callback, averaging):
        averages = [adapter.run.moving_average, *adapter.run.posthoc_snapshots.averages]
        contexts = {shadow.context for average in averages for shadow in average.shadows.values()}
        assert contexts == {mx.cpu(1)}  # the parameters' first copies live on cpu(0)


# the strategy's metric: checked the same way, with the same direction warning --------------------------


def test_both_refuse_a_strategy_ranking_a_metric_they_do_not_record():
    with pytest.raises(
        ConfigurationError, match=r"avg_strategy.metric is 'f1', but the epochs record only \['score'\]"
    ):
        AveragingCallback.from_config({"type": "checkpoints", "avg_strategy": {"metric": "f1"}})
    averaging = ModuleAveraging(new_module([mx.cpu()]), avg_strategy={"type": "mean", "metric": "f1"})
    with pytest.raises(
        ConfigurationError, match=r"avg_strategy.metric is 'f1', but the epochs record only \['accuracy', 'score'\]"
    ):
        fit_module(averaging)


def test_both_warn_when_a_loss_is_ranked_highest_first(caplog):
    strategy = {"type": "mean", "num_models": 2, "maximize": True}
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        AveragingCallback.from_config({"type": "checkpoints", "avg_strategy": strategy})
        fit_module(ModuleAveraging(new_module([mx.cpu()]), avg_strategy=strategy), eval_metric="ce")
    warnings = messages(caplog, logging.WARNING)
    assert warnings == [
        "avg_strategy ranks 'score' (= loss) highest first; loss is better when lower: drop maximize=True",
        "avg_strategy ranks 'score' (= cross-entropy) highest first; cross-entropy is better when lower: "
        "drop maximize=True",
    ]


# triggers: the same log line, numbered the same way (epochs done) -------------------------------------------


TRIGGER_LINE = re.compile(r"^the alpha_suffix trigger starts the average after epoch (\d+) \(update (\d+)\)$")


def test_both_log_the_trigger_after_the_same_epoch_in_the_same_words(caplog):
    trigger = {"type": "alpha_suffix", "alpha": 0.5}  # 4 epochs: averaging starts once 2 are done
    with caplog.at_level(logging.INFO, logger="modavg_plugin.run"):
        callback = AveragingCallback.from_config({"type": "moving_average", "trigger": trigger})
        drive_callback(callback, epochs=4, scores=[4.0, 3.0, 2.0, 1.0])
        fit_module(ModuleAveraging(new_module([mx.cpu()]), "exponential", trigger=trigger), epochs=4)
    lines = [TRIGGER_LINE.match(message) for message in messages(caplog, logging.INFO)]
    fired = [(int(match.group(1)), int(match.group(2))) for match in lines if match]
    batches = len(list(data_iterator(0)))
    assert fired == [(2, 2 * STEPS_PER_EPOCH), (2, 2 * batches)]


# "checkpoints only": one meaning, average=None, in both --------------------------------------------------------


def test_checkpoints_only_is_no_moving_average_and_raw_checkpoints_in_both(tmp_path):
    strategy = {"type": "mean", "num_models": 1}
    callback = AveragingCallback.from_config(
        {"type": "checkpoints", "avg_strategy": strategy, "checkpoint_dir": str(tmp_path / "callback")}
    )
    net = drive_callback(callback, epochs=2, scores=[2.0, 1.0])
    raw_after_training = {name: p.data().asnumpy() for name, p in net.collect_params().items()}
    callback.on_train_end(training_network=net)
    averaging = ModuleAveraging(new_module([mx.cpu()]), None, avg_strategy=strategy)
    fit_module(averaging, epochs=2)
    for adapter in (callback, averaging):
        assert adapter.run.average_config is None and adapter.run.moving_average is None
    # the best epoch (the last, score 1.0) is the raw weights after training, which the network keeps
    for name, parameter in net.collect_params().items():
        np.testing.assert_array_equal(parameter.data().asnumpy(), raw_after_training[name])
    assert os.listdir(tmp_path / "callback")  # the given folder is kept
