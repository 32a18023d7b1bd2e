"""Moving over from GluonTS, AllenNLP or PyTorch is one line: their objects and names are accepted as they are."""

import mxnet as mx
import numpy as np
import pytest
from gluonts.core import serde
from gluonts.mx.trainer.model_averaging import SelectNBestMean as GluonTSMean
from gluonts.mx.trainer.model_averaging import SelectNBestSoftmax as GluonTSSoftmax
from gluonts.mx.trainer.model_iteration_averaging import NTA, Alpha_Suffix

from modavg_plugin import (
    AveragingCallback,
    CheckpointAveragingCallback,
    ConfigurationError,
    ExponentialAveragingCallback,
    IterationAveragingCallback,
    MovingAverage,
    SelectNBestMean,
    SelectNBestSoftmax,
)

from conftest import assert_weights_close, mean_of, read_weights, train

# GluonTS: ModelAveraging(avg_strategy=SelectNBestMean(num_models=3)) -> CheckpointAveragingCallback(avg_strategy=...)


@pytest.mark.parametrize(
    "theirs, ours",
    [
        (GluonTSMean(num_models=2), SelectNBestMean(num_models=2)),
        (GluonTSSoftmax(num_models=3), SelectNBestSoftmax(num_models=3)),
    ],
    ids=["mean", "softmax"],
)
def test_gluonts_strategy_objects_are_taken_with_their_settings(theirs, ours):
    their_callback = CheckpointAveragingCallback(avg_strategy=theirs)
    assert their_callback.run.strategy == ours
    theirs_ended = list(read_weights(train(their_callback, epochs=3).network).values())
    ours_ended = list(read_weights(train(CheckpointAveragingCallback(avg_strategy=ours), epochs=3).network).values())
    for their_values, our_values in zip(theirs_ended, ours_ended):  # the same run, the same average
        np.testing.assert_array_equal(their_values, our_values)


def test_the_exponential_callback_takes_a_gluonts_strategy_and_round_trips_through_serde():
    callback = ExponentialAveragingCallback(decay=0.9, avg_strategy=GluonTSMean(num_models=2))
    assert callback.run.strategy == SelectNBestMean(num_models=2)
    restored = serde.decode(serde.encode(callback))
    assert isinstance(restored.avg_strategy, SelectNBestMean) and restored.run.strategy.num_models == 2


# GluonTS: ModelIterationAveraging(avg_strategy=NTA(...)) -> IterationAveragingCallback(avg_strategy=NTA(...))


def test_nta_and_alpha_suffix_objects_become_a_cumulative_average_and_its_trigger():
    nta = IterationAveragingCallback(avg_strategy=NTA(epochs=4, n=2, maximize=True, last_n_trigger=True, eta=0.5))
    assert nta.run.average_config == {"type": "cumulative", "eta": 0.5}
    assert (nta.run.trigger.n, nta.run.trigger.maximize, nta.run.trigger.last_n_trigger) == (2, True, True)
    suffix = AveragingCallback.from_config(
        {"type": "iteration_averaging", "avg_strategy": Alpha_Suffix(epochs=4, alpha=0.5)}
    )
    assert suffix.run.trigger.alpha == 0.5 and suffix.run.average_config == {"type": "cumulative", "eta": 0.0}
    with pytest.raises(ConfigurationError, match="give avg_strategy .* or a trigger config, not both"):
        IterationAveragingCallback()


def test_alpha_suffix_averages_every_step_after_the_first_half_of_the_epochs():
    """Alpha_Suffix(alpha=0.5) over 4 epochs of 3 steps: the equal-weight mean of steps 7 to 12 (GluonTS would also
    average the weights after step 6, and count each epoch's last weights twice)."""
    callback = IterationAveragingCallback(avg_strategy=Alpha_Suffix(epochs=4, alpha=0.5))
    probe = train(callback, epochs=4, batches=3)
    assert_weights_close(read_weights(probe.network), mean_of(probe.raw_after_step[7:13]))


def test_gluonts_epochs_that_differ_from_the_trainers_get_a_warning(caplog):
    callback = IterationAveragingCallback(avg_strategy=NTA(epochs=10))
    with caplog.at_level("WARNING", logger="modavg_plugin"):
        train(callback, epochs=2, batches=2)
    assert "avg_strategy was built for epochs=10, the trainer runs 2" in caplog.text


def test_iteration_averaging_round_trips_through_serde():
    callback = IterationAveragingCallback(avg_strategy=NTA(epochs=4, n=3))
    restored = serde.decode(serde.encode(callback))
    assert isinstance(restored, IterationAveragingCallback) and restored.run.trigger.n == 3


# AllenNLP: MovingAverage.from_params(...) works; an empty parameter list says what is wrong


class Params(dict):
    """AllenNLP's Params: a dict with as_dict()."""

    def as_dict(self) -> dict:
        return dict(self)


def test_from_params_is_from_config():
    net = mx.gluon.nn.Dense(2, in_units=2)
    net.initialize()
    parameters = list(net.collect_params().items())
    average = MovingAverage.from_params(Params({"type": "exponential", "decay": 0.9}), parameters=parameters)
    assert type(average).__name__ == "ExponentialMovingAverage" and average.decay == 0.9
    assert MovingAverage.from_params({"type": "cumulative"}, parameters=parameters).eta == 0.0


def test_an_empty_parameter_list_is_an_error_in_the_users_terms():
    with pytest.raises(ConfigurationError) as error:
        MovingAverage.from_params({"type": "exponential"}, parameters=[])
    assert str(error.value).startswith("parameters is empty: nothing to average")
    assert "include" not in str(error.value)


# PyTorch: AveragedModel / timm's first update copies the weights -> start_step=1 (tests/test_averages.py);
# torch.optim.swa_utils.update_bn(loader, model) -> update_bn(net, batches) (tests/test_batchnorm.py)


def test_update_bn_takes_the_batches_as_torch_does():
    from modavg_plugin import update_bn

    net = mx.gluon.nn.HybridSequential()
    net.add(mx.gluon.nn.Dense(4, in_units=3), mx.gluon.nn.BatchNorm(in_channels=4))
    net.initialize()
    loader = [mx.nd.array(np.random.RandomState(seed).randn(8, 3)) for seed in range(3)]
    assert update_bn(net, loader) == 3
