"""The NTA and alpha-suffix triggers decide exactly as GluonTS's own implementations."""

import math

import numpy as np
import pytest
from gluonts.mx.trainer.model_iteration_averaging import NTA, Alpha_Suffix

from modavg_plugin.registry import ConfigurationError
from modavg_plugin.triggers import AlphaSuffixTrigger, AveragingTrigger, NonMonotonicTrigger, trigger_from_config


def first_trigger_epoch(trigger: AveragingTrigger, metrics, max_epochs: int):
    for epochs_done, metric in enumerate(metrics, start=1):
        if trigger.should_start(epochs_done, metric, max_epochs):
            return epochs_done
    return None


def gluonts_first_trigger_epoch(strategy, metrics):
    """GluonTS's callback calls update_average_trigger(metric, epoch=epoch_no + 1) at each epoch's end."""
    for epochs_done, metric in enumerate(metrics, start=1):
        strategy.update_average_trigger(metric=metric, epoch=epochs_done)
        if strategy.averaging_started:
            return epochs_done
    return None


def random_metric_sequences(count: int, length: int):
    rng = np.random.RandomState(0)
    for _ in range(count):  # a falling loss with noise: the first non-improvement comes at different epochs
        yield list(np.exp(-np.arange(length) / rng.uniform(2, 30)) + rng.uniform(0, 0.2) * rng.rand(length))


@pytest.mark.parametrize("n", [1, 3, 5])
@pytest.mark.parametrize("last_n_trigger", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_nta_starts_at_the_same_epoch_as_gluonts(n, last_n_trigger, maximize):
    epochs = 40
    for metrics in random_metric_sequences(25, epochs):
        metrics = [-value for value in metrics] if maximize else metrics
        ours = NonMonotonicTrigger(n=n, maximize=maximize, last_n_trigger=last_n_trigger, fallback_alpha=0.05)
        theirs = NTA(epochs=epochs, n=n, maximize=maximize, last_n_trigger=last_n_trigger, fallback_alpha=0.05)
        assert first_trigger_epoch(ours, metrics, epochs) == gluonts_first_trigger_epoch(theirs, metrics)


def test_nta_hand_worked_example():
    # n = 2: epoch 4's 0.45 is better than the best before the last two epochs (min(1.0) = 1.0);
    # epoch 5's 0.6 is worse than the best before the last two (min(1.0, 0.5) = 0.5): start.
    trigger = NonMonotonicTrigger(n=2, fallback_alpha=0.0)
    assert first_trigger_epoch(trigger, [1.0, 0.5, 0.4, 0.45, 0.6], max_epochs=100) == 5


def test_nta_falls_back_to_the_last_fraction_of_epochs():
    trigger = NonMonotonicTrigger(n=5, fallback_alpha=0.25)
    assert first_trigger_epoch(trigger, [10.0 - epoch for epoch in range(8)], max_epochs=8) == 6  # 8 * 0.75


def test_nta_ignores_non_finite_metrics():
    trigger = NonMonotonicTrigger(n=1, fallback_alpha=0.0)
    # Recorded: 1.0, 0.5, 0.4; epoch 6's 1.2 is worse than min(1.0, 0.5) (the epochs before the last one).
    assert first_trigger_epoch(trigger, [1.0, math.nan, 0.5, math.inf, 0.4, 1.2], max_epochs=100) == 6
    assert trigger.metrics == [1.0, 0.5, 0.4, 1.2]


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_alpha_suffix_starts_at_the_same_epoch_as_gluonts(alpha):
    metrics = [1.0] * 12
    assert first_trigger_epoch(AlphaSuffixTrigger(alpha), metrics, 12) == gluonts_first_trigger_epoch(
        Alpha_Suffix(epochs=12, alpha=alpha), metrics
    )


def test_nta_state_round_trip_continues_identically():
    metrics = [1.0, 0.8, 0.7, 0.65, 0.75, 0.5]  # n = 1: epoch 5's 0.75 > min(1.0, 0.8, 0.7)
    whole = NonMonotonicTrigger(n=1, fallback_alpha=0.0)
    first = NonMonotonicTrigger(n=1, fallback_alpha=0.0)
    for epochs_done, metric in enumerate(metrics[:3], start=1):
        assert not first.should_start(epochs_done, metric, 100)
        whole.should_start(epochs_done, metric, 100)
    second = NonMonotonicTrigger(n=1, fallback_alpha=0.0)
    second.load_state_dict(first.state_dict())
    later = [second.should_start(epochs_done, metric, 100) for epochs_done, metric in enumerate(metrics[3:], start=4)]
    expected = [whole.should_start(epochs_done, metric, 100) for epochs_done, metric in enumerate(metrics[3:], start=4)]
    assert later == expected == [False, True, False]


@pytest.mark.parametrize(
    "config, message",
    [
        ({"type": "nta", "n": 0}, r"n must be an integer >= 1, got 0"),
        ({"type": "nta", "fallback_alpha": 1.5}, r"fallback_alpha must be a number in \[0, 1\], got 1.5"),
        ({"type": "alpha_suffix", "alpha": "half"}, r"alpha must be a number in \[0, 1\], got 'half'"),
        ({"type": "ntaa"}, r"'ntaa' is not a registered AveragingTrigger.*did you mean 'nta'"),
    ],
)
def test_bad_trigger_configs_name_the_culprit(config, message):
    with pytest.raises(ConfigurationError, match=message):
        AveragingTrigger.from_config(config)


def test_a_trigger_and_a_start_step_together_are_refused():
    with pytest.raises(ConfigurationError, match="start_step or a trigger, not both"):
        trigger_from_config({"type": "nta"}, {"type": "cumulative", "start_step": 100})
    assert isinstance(trigger_from_config({"type": "alpha_suffix"}, {"type": "cumulative"}), AlphaSuffixTrigger)
    assert trigger_from_config(None, {"start_step": 100}) is None
