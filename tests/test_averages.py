import math
import pickle

import mxnet as mx
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from modavg_plugin import ConfigurationError, ExponentialMovingAverage, MovingAverage
from modavg_plugin.averages import exponential_decay

CONTEXTS = [mx.cpu(0), mx.cpu(1)]


def scalar_network(value: float, ctx=None, dtype="float32") -> mx.gluon.nn.Dense:
    net = mx.gluon.nn.Dense(1, in_units=1, use_bias=False, dtype=dtype)
    net.initialize(mx.init.Constant(value), ctx=ctx or mx.cpu())
    return net


def set_everywhere(parameter: mx.gluon.Parameter, value) -> None:
    for copy in parameter.list_data():
        copy[:] = value


def test_closed_form_fixed_decay():
    """AllenNLP's reference: start 1, then 5, then 25 with decay 0.9999."""
    net = scalar_network(1.0)
    ema = ExponentialMovingAverage(net.collect_params().items(), decay=0.9999)
    set_everywhere(net.weight, 5.0)
    ema.apply()
    set_everywhere(net.weight, 25.0)
    ema.apply()
    with ema.average_parameters():
        assert_allclose(net.weight.data().asnumpy(), [[1 * 0.9999**2 + 5 * 0.9999 * 0.0001 + 25 * 0.0001]], rtol=1e-6)
    assert_array_equal(net.weight.data().asnumpy(), [[25.0]])
    assert ema.num_applied == 2


def test_closed_form_with_num_updates_warmup():
    net = scalar_network(1.0)
    ema = ExponentialMovingAverage(net.collect_params().items(), decay=0.9999, numerator=1.0, denominator=10.0)
    set_everywhere(net.weight, 5.0)
    ema.apply(num_updates=1)  # d = 2/11
    set_everywhere(net.weight, 25.0)
    ema.apply(num_updates=2)  # d = 3/12
    d1, d2 = 2 / 11, 3 / 12
    expected = (1 * d1 + 5 * (1 - d1)) * d2 + 25 * (1 - d2)
    assert_allclose(ema.shadows[net.weight.name].asnumpy(), [[expected]], rtol=1e-6)


def test_decay_schedule_is_capped_by_decay():
    assert exponential_decay(0.9, None) == 0.9
    assert exponential_decay(0.9, 0) == pytest.approx(0.1)
    assert exponential_decay(0.9, 10**6) == 0.9
    with pytest.raises(ValueError, match="num_updates must be an integer >= 0"):
        exponential_decay(0.9, -1)


@pytest.mark.parametrize("decay", [-0.1, 1.5, math.nan, "0.9"])
def test_bad_decay_is_refused_with_range(decay):
    net = scalar_network(1.0)
    with pytest.raises(ConfigurationError, match=r"decay must be a number in \[0, 1\]"):
        ExponentialMovingAverage(net.collect_params().items(), decay=decay)


@pytest.mark.parametrize("key, value", [("denominator", 0.0), ("numerator", -1.0), ("denominator", math.inf)])
def test_bad_warmup_arguments_are_refused(key, value):
    net = scalar_network(1.0)
    with pytest.raises(ConfigurationError, match=key):
        ExponentialMovingAverage(net.collect_params().items(), **{key: value})


def test_from_config_builds_the_default():
    net = scalar_network(1.0)
    ema = MovingAverage.from_config({"decay": 0.5}, parameters=net.collect_params().items())
    assert isinstance(ema, ExponentialMovingAverage) and ema.decay == 0.5


def test_deferred_initialisation_is_named():
    net = mx.gluon.nn.Dense(2)
    net.initialize()
    with pytest.raises(ValueError, match=r"parameter 'dense\d+_weight' is not initialised yet"):
        ExponentialMovingAverage(net.collect_params().items())


def test_assign_and_restore_touch_every_device_copy():
    net = scalar_network(1.0, ctx=CONTEXTS)
    ema = ExponentialMovingAverage(net.collect_params().items(), decay=0.5)
    assert ema.shadows[net.weight.name].context == mx.cpu(0)
    set_everywhere(net.weight, 3.0)
    ema.apply()  # shadow 2.0
    ema.assign_average_value()
    assert [copy.asscalar() for copy in net.weight.list_data()] == [2.0, 2.0]
    ema.restore()
    assert [copy.asscalar() for copy in net.weight.list_data()] == [3.0, 3.0]


@pytest.mark.parametrize("shadow_context", [mx.cpu(1), "cpu(1)"])
def test_shadows_live_on_the_named_context_and_reach_every_copy(shadow_context):
    net = scalar_network(1.0, ctx=CONTEXTS)
    ema = ExponentialMovingAverage(net.collect_params().items(), decay=0.5, shadow_context=shadow_context)
    assert ema.shadows[net.weight.name].context == mx.cpu(1)
    set_everywhere(net.weight, 3.0)
    ema.apply()  # 0.5 * 1 + 0.5 * 3
    set_everywhere(net.weight, 7.0)
    ema.apply()  # 0.5 * 2 + 0.5 * 7
    with ema.average_parameters():
        assert [copy.asscalar() for copy in net.weight.list_data()] == [4.5, 4.5]
    assert [copy.asscalar() for copy in net.weight.list_data()] == [7.0, 7.0]


def test_bad_shadow_context_is_refused_with_the_allowed_form():
    with pytest.raises(ValueError, match=r"shadow_context must be an mx.Context or text like 'cpu'.*got 'tpu\(0\)'"):
        ExponentialMovingAverage(scalar_network(1.0).collect_params().items(), shadow_context="tpu(0)")


def test_second_assign_keeps_the_raw_weights_and_restore_is_idempotent():
    net = scalar_network(1.0)
    ema = ExponentialMovingAverage(net.collect_params().items(), decay=0.5)
    set_everywhere(net.weight, 3.0)
    ema.apply()
    ema.assign_average_value()
    ema.assign_average_value()
    ema.restore()
    ema.restore()
    assert net.weight.data().asscalar() == 3.0


def test_average_parameters_restores_when_the_body_raises():
    net = scalar_network(1.0)
    ema = ExponentialMovingAverage(net.collect_params().items(), decay=0.5)
    set_everywhere(net.weight, 3.0)
    ema.apply()
    with pytest.raises(RuntimeError, match="evaluation failed"):
        with ema.average_parameters():
            assert net.weight.data().asscalar() == 2.0
            raise RuntimeError("evaluation failed")
    assert net.weight.data().asscalar() == 3.0
    assert not ema.is_assigned


def test_float16_parameters_get_float32_shadows():
    net = scalar_network(1.0, dtype="float16")
    ema = ExponentialMovingAverage(net.collect_params().items(), decay=0.999)
    shadow = ema.shadows[net.weight.name]
    assert shadow.dtype == np.float32
    for _ in range(3):
        ema.apply()  # the fp16 value 1.0 stays exact
    set_everywhere(net.weight, 2.0)
    ema.apply()
    # 0.999 * 1 + 0.001 * 2 = 1.001 is representable in float32, not in float16 (spacing ~0.001 near 1)
    assert_allclose(shadow.asnumpy(), [[1.001]], rtol=1e-7)
    with ema.average_parameters():
        assert net.weight.data().dtype == np.float16
        assert net.weight.data().asscalar() == np.float16(1.001)


def test_integer_parameters_are_copied_not_averaged():
    steps = mx.gluon.Parameter("steps", shape=(2,), dtype="int32", grad_req="null", init=mx.init.Zero())
    steps.initialize()
    ema = ExponentialMovingAverage([("steps", steps)], decay=0.9)
    steps.set_data(mx.nd.array([7, 9], dtype="int32"))
    ema.apply()
    assert_array_equal(ema.shadows["steps"].asnumpy(), [7, 9])
    assert ema.shadows["steps"].dtype == np.int32


def test_swaps_never_call_set_data(monkeypatch):
    net = scalar_network(1.0, ctx=CONTEXTS)
    ema = ExponentialMovingAverage(net.collect_params().items(), decay=0.5)

    def forbidden(*args, **kwargs):
        raise AssertionError("set_data resets the trainer's kvstore")

    monkeypatch.setattr(mx.gluon.Parameter, "set_data", forbidden)
    ema.apply()
    with ema.average_parameters():
        pass
    ema.keep_average_value()


def test_state_dict_is_plain_data_and_resumes_exactly():
    net = scalar_network(1.0)
    ema = ExponentialMovingAverage(net.collect_params().items(), decay=0.9)
    for value in (2.0, 4.0):
        set_everywhere(net.weight, value)
        ema.apply(num_updates=ema.num_applied + 1)
    state = ema.state_dict()
    assert set(state) == {"type", "num_applied", "num_steps", "start_step", "shadows"}
    assert all(isinstance(value, np.ndarray) for value in state["shadows"].values())
    restored_state = pickle.loads(pickle.dumps(state))

    resumed = ExponentialMovingAverage(net.collect_params().items(), decay=0.9)
    resumed.load_state_dict(restored_state)
    assert resumed.num_applied == 2
    for average in (ema, resumed):
        set_everywhere(net.weight, 8.0)
        average.apply(num_updates=average.num_applied + 1)
    assert_array_equal(resumed.shadows[net.weight.name].asnumpy(), ema.shadows[net.weight.name].asnumpy())


def test_load_state_dict_follows_the_live_parameters():
    """AllenNLP re-binds to the loaded copies; here the live parameter keeps driving the shadow."""
    net = scalar_network(1.0)
    ema = ExponentialMovingAverage(net.collect_params().items(), decay=0.5)
    ema.load_state_dict({"num_applied": 0, "shadows": {net.weight.name: np.array([[10.0]], dtype=np.float32)}})
    set_everywhere(net.weight, 20.0)
    ema.apply()
    assert ema.shadows[net.weight.name].asscalar() == 15.0


def test_load_state_dict_names_bad_keys_and_shapes():
    net = scalar_network(1.0)
    name = net.weight.name
    ema = ExponentialMovingAverage(net.collect_params().items())
    with pytest.raises(KeyError, match="'other'"):
        ema.load_state_dict({"num_applied": 0, "shadows": {name: np.ones((1, 1)), "other": np.ones(1)}})
    with pytest.raises(KeyError, match=name):
        ema.load_state_dict({"num_applied": 0, "shadows": {}})
    with pytest.raises(ValueError, match=f"{name}.*shape"):
        ema.load_state_dict({"num_applied": 0, "shadows": {name: np.ones((2, 2))}})
    with pytest.raises(KeyError, match="num_applied"):
        ema.load_state_dict({"shadows": {}})


def train_two_devices(swap_every_step: bool) -> list:
    """Adam on [cpu(0), cpu(1)] with kvstore='device' (the trainer updates on the kvstore)."""
    mx.random.seed(1)
    np.random.seed(1)
    net = mx.gluon.nn.HybridSequential()
    net.add(mx.gluon.nn.Dense(8, activation="tanh", in_units=3), mx.gluon.nn.Dense(1, in_units=8))
    net.initialize(mx.init.Xavier(), ctx=CONTEXTS)
    trainer = mx.gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 0.05}, kvstore="device")
    ema = ExponentialMovingAverage(net.collect_params().items(), decay=0.9)
    inputs = np.random.RandomState(0).randn(6, 16, 3).astype(np.float32)
    for step, batch in enumerate(inputs, start=1):
        with mx.autograd.record():
            losses = [
                (net(mx.nd.array(half, ctx=ctx)) - 1.0).square().sum()
                for half, ctx in zip(np.split(batch, 2), CONTEXTS)
            ]
        mx.autograd.backward(losses)
        trainer.step(len(batch))
        ema.apply(num_updates=step)
        if step == 1:
            assert trainer._update_on_kvstore, "the test must exercise a trainer that updates on the kvstore"
        if swap_every_step:
            with ema.average_parameters():
                [net(mx.nd.array(batch, ctx=ctx)).wait_to_read() for ctx in CONTEXTS]
    return [[copy.asnumpy() for copy in parameter.list_data()] for parameter in net.collect_params().values()]


def test_swapping_between_steps_leaves_multi_device_training_bit_for_bit_identical():
    reference = train_two_devices(swap_every_step=False)
    swapped = train_two_devices(swap_every_step=True)
    assert len(reference) == len(swapped) == 4
    for copies, other_copies in zip(reference, swapped):
        for copy, other in zip(copies, other_copies):
            assert_array_equal(copy, other)


def _apply_sequence(average, net: mx.gluon.Block, values: list) -> None:
    """Set the network's weights to each of ``values`` (per parameter) in turn, applying the average after each."""
    for step, by_name in enumerate(values, start=1):
        for name, parameter in net.collect_params().items():
            parameter.set_data(mx.nd.array(by_name[name]))
        average.apply(num_updates=step)


def _random_weights(net: mx.gluon.Block, count: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [{name: rng.standard_normal(p.shape) for name, p in net.collect_params().items()} for _ in range(count)]


def test_cumulative_average_is_the_arithmetic_mean_of_the_applied_weights():
    from modavg_plugin import CumulativeMovingAverage

    net = mx.gluon.nn.Dense(3, in_units=4)
    net.initialize(mx.init.Constant(100.0))  # the weights at construction are not counted
    average = MovingAverage.from_config({"type": "cumulative"}, parameters=net.collect_params().items())
    assert isinstance(average, CumulativeMovingAverage)
    values = _random_weights(net, 7, seed=0)
    _apply_sequence(average, net, values)
    for name, shadow in average.shadows.items():
        expected = np.mean([value[name] for value in values], axis=0)
        np.testing.assert_allclose(shadow.asnumpy(), expected, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("eta", [0.0, 1.0, 3.5])
def test_cumulative_average_with_eta_matches_gluonts_iteration_averaging(eta):
    """GluonTS's own polynomial-decay averaging (IterationAveragingStrategy) as the reference."""
    from gluonts.mx.trainer.model_iteration_averaging import IterationAveragingStrategy

    net = mx.gluon.nn.Dense(3, in_units=4)
    net.initialize()
    ours = MovingAverage.from_config({"type": "cumulative", "eta": eta}, parameters=net.collect_params().items())
    reference = IterationAveragingStrategy(eta=eta)
    values = _random_weights(net, 9, seed=1)
    for step, by_name in enumerate(values, start=1):
        for name, parameter in net.collect_params().items():
            parameter.set_data(mx.nd.array(by_name[name]))
        ours.apply(num_updates=step)
        reference.update_average(net)
    for name, shadow in ours.shadows.items():
        np.testing.assert_allclose(shadow.asnumpy(), reference.averaged_model[name].asnumpy(), rtol=1e-5, atol=1e-6)
        plain_mean = np.mean([value[name] for value in values], axis=0)
        assert np.allclose(shadow.asnumpy(), plain_mean, rtol=1e-5, atol=1e-6) == (
            eta == 0
        )  # eta > 0: later count more


@pytest.mark.parametrize("eta", [-0.5, float("nan"), float("inf")])
def test_cumulative_average_refuses_a_bad_eta(eta):
    net = mx.gluon.nn.Dense(1, in_units=1)
    net.initialize()
    with pytest.raises(ConfigurationError, match=r"eta must be a finite number >= 0"):
        MovingAverage.from_config({"type": "cumulative", "eta": eta}, parameters=net.collect_params().items())


@pytest.mark.parametrize("gamma", [0.5, 6.94, 16.97])
def test_power_average_has_the_closed_form_weight_profile(gamma):
    """Karras et al. 2024: after t steps, step k weighs (k**(g+1) - (k-1)**(g+1)) / t**(g+1)."""
    net = mx.gluon.nn.Dense(3, in_units=4)
    net.initialize()
    average = MovingAverage.from_config({"type": "power", "gamma": gamma}, parameters=net.collect_params().items())
    values = _random_weights(net, 12, seed=2)
    _apply_sequence(average, net, values)
    t = len(values)
    weights = np.array([(k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / t ** (gamma + 1) for k in range(1, t + 1)])
    assert math.isclose(weights.sum(), 1.0, rel_tol=1e-12)
    for name, shadow in average.shadows.items():
        expected = np.tensordot(weights, np.array([value[name] for value in values]), axes=1)
        np.testing.assert_allclose(shadow.asnumpy(), expected, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("sigma_rel, gamma", [(0.05, 16.97), (0.10, 6.94)])  # the paper's pairs
def test_power_average_takes_sigma_rel_as_in_the_paper(sigma_rel, gamma):
    from modavg_plugin.averages import sigma_rel_to_gamma

    assert sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma, abs=0.005)
    found = sigma_rel_to_gamma(sigma_rel)
    assert math.sqrt((found + 1) / ((found + 2) ** 2 * (found + 3))) == pytest.approx(sigma_rel, rel=1e-12)
    net = mx.gluon.nn.Dense(1, in_units=1)
    net.initialize()
    average = MovingAverage.from_config(
        {"type": "power", "sigma_rel": sigma_rel}, parameters=net.collect_params().items()
    )
    assert average.gamma == pytest.approx(gamma, abs=0.005)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"sigma_rel": 0.3}, r"sigma_rel must be a number in \[1e-06, 0.2887\)"),
        ({"sigma_rel": None}, "give gamma or sigma_rel"),
        ({"gamma": -1.0}, r"gamma must be a finite number > 0"),
    ],
)
def test_power_average_refuses_bad_arguments(config, message):
    net = mx.gluon.nn.Dense(1, in_units=1)
    net.initialize()
    with pytest.raises(ConfigurationError, match=message):
        MovingAverage.from_config({"type": "power", **config}, parameters=net.collect_params().items())


# Options every moving average takes -------------------------------------------------


def vector_network(values: np.ndarray) -> mx.gluon.nn.Dense:
    """A network of one weight vector (a Dense(len, in_units=1) without bias), set to ``values``."""
    net = mx.gluon.nn.Dense(len(values), in_units=1, use_bias=False, prefix="vector_")
    net.initialize(mx.init.Constant(0.0))
    net.weight.set_data(mx.nd.array(np.asarray(values).reshape(-1, 1)))
    return net


def visit(average: MovingAverage, net: mx.gluon.Block, values: np.ndarray, with_num_updates: bool = False) -> None:
    """Step k (1-based) sets the weight to values[k - 1], then applies."""
    for step, value in enumerate(values, start=1):
        set_everywhere(net.weight, mx.nd.array(value.reshape(-1, 1)))
        average.apply(num_updates=step if with_num_updates else None)


def shadow(average: MovingAverage) -> np.ndarray:
    return average.shadows["vector_weight"].asnumpy().reshape(-1).astype(np.float64)


TRAJECTORY = np.random.RandomState(3).randn(12, 4)


@pytest.mark.parametrize("with_num_updates", [False, True])
def test_start_step_averages_only_the_steps_after_it_and_follows_before(with_num_updates):
    net = vector_network(TRAJECTORY[0])
    average = MovingAverage.from_config(
        {"type": "cumulative", "start_step": 5}, parameters=net.collect_params().items()
    )
    visit(average, net, TRAJECTORY[:5], with_num_updates)
    assert_allclose(shadow(average), TRAJECTORY[4], rtol=1e-6)  # not started: the latest weights
    assert average.num_applied == 0 and not average.started
    visit_from = TRAJECTORY[5:]
    for step, value in enumerate(visit_from, start=6):
        set_everywhere(net.weight, mx.nd.array(value.reshape(-1, 1)))
        average.apply(num_updates=step if with_num_updates else None)
    assert_allclose(shadow(average), TRAJECTORY[5:].mean(axis=0), rtol=1e-5, atol=1e-6)
    assert average.num_applied == 7


def test_update_every_averages_every_kth_step_after_the_start():
    net = vector_network(TRAJECTORY[0])
    average = MovingAverage.from_config(
        {"type": "cumulative", "start_step": 1, "update_every": 3}, parameters=net.collect_params().items()
    )
    visit(average, net, TRAJECTORY)
    # steps 4, 7, 10 (1 + 3k) are averaged: rows 3, 6, 9
    assert_allclose(shadow(average), TRAJECTORY[[3, 6, 9]].mean(axis=0), rtol=1e-5, atol=1e-6)
    assert average.num_applied == 3 and average.num_steps == 12


@pytest.mark.parametrize("warmup", ["ratio", "power"])
def test_the_warm_up_counts_averaged_steps_not_optimiser_steps(warmup):
    """With update_every=2 the 4th averaged step (optimiser step 8) is warmed up with n = 4."""
    net = vector_network(TRAJECTORY[0])
    config = {"type": "exponential", "decay": 0.99, "update_every": 2, "warmup": warmup}
    average = MovingAverage.from_config(config, parameters=net.collect_params().items())
    visit(average, net, TRAJECTORY[:10], with_num_updates=True)
    expected = TRAJECTORY[0].astype(np.float64)
    for n, step in enumerate((2, 4, 6, 8, 10), start=1):  # the averaged optimiser steps
        d = min(0.99, (1 + n) / (10 + n)) if warmup == "ratio" else min(0.99, 1 - (1 + n) ** -0.75)
        expected = d * expected + (1 - d) * TRAJECTORY[step - 1]
    assert_allclose(shadow(average), expected, rtol=1e-5, atol=1e-6)
    assert average.num_applied == 5


def test_start_step_one_reproduces_the_peers_copy_at_the_first_update():
    """torch's AveragedModel (EMA avg_fn) and timm copy the weights at their first update, then blend: start_step=1."""
    net = vector_network(np.zeros(4))  # weights at construction that the peers never see
    config = {"type": "exponential", "decay": 0.9, "warmup": "none", "start_step": 1}
    average = MovingAverage.from_config(config, parameters=net.collect_params().items())
    visit(average, net, TRAJECTORY)
    expected = TRAJECTORY[0].astype(np.float64)  # their first update: a copy
    for value in TRAJECTORY[1:]:
        expected = 0.9 * expected + 0.1 * value  # ema_param.lerp_(param, 1 - decay)
    assert_allclose(shadow(average), expected, rtol=1e-5, atol=1e-6)


def test_start_now_starts_after_the_current_step():
    net = vector_network(TRAJECTORY[0])
    average = MovingAverage.from_config(
        {"type": "cumulative", "start_step": None}, parameters=net.collect_params().items()
    )
    visit(average, net, TRAJECTORY[:4])
    average.start_now()
    assert average.start_step == 4
    for value in TRAJECTORY[4:]:
        set_everywhere(net.weight, mx.nd.array(value.reshape(-1, 1)))
        average.apply()
    assert_allclose(shadow(average), TRAJECTORY[4:].mean(axis=0), rtol=1e-5, atol=1e-6)
    average.start_now()  # started already: nothing changes
    assert average.start_step == 4


@pytest.mark.parametrize("warmup, gamma, power", [("power", 1.0, 0.75), ("power", 4.0, 2 / 3), ("none", 1.0, 0.75)])
def test_exponential_warmup_schedules_match_the_formula(warmup, gamma, power):
    net = vector_network(TRAJECTORY[0])
    average = ExponentialMovingAverage(
        net.collect_params().items(), decay=0.9, warmup=warmup, warmup_gamma=gamma, warmup_power=power, start_step=2
    )
    visit(average, net, TRAJECTORY, with_num_updates=True)
    expected = TRAJECTORY[1].copy()  # steps 1-2 are followed; step 3 is the first averaged, k = 1
    for k, value in enumerate(TRAJECTORY[2:], start=1):
        decay = 0.9 if warmup == "none" else min(0.9, 1 - (1 + k / gamma) ** -power)
        expected = decay * expected + (1 - decay) * value
    assert_allclose(shadow(average), expected, rtol=1e-5, atol=1e-6)


def batchnorm_network() -> mx.gluon.nn.HybridSequential:
    net = mx.gluon.nn.HybridSequential(prefix="net_")
    with net.name_scope():
        net.add(mx.gluon.nn.Dense(3, in_units=2), mx.gluon.nn.BatchNorm(in_channels=3))
    net.initialize()
    return net


@pytest.mark.parametrize("non_trainable", ["average", "copy", "exclude"])
def test_non_trainable_states_are_averaged_copied_or_left_out(non_trainable):
    net = batchnorm_network()
    params = dict(net.collect_params().items())
    running = "net_batchnorm0_running_mean"
    weight = "net_dense0_weight"
    assert params[running].grad_req == "null"
    average = MovingAverage.from_config(
        {"type": "cumulative", "non_trainable": non_trainable}, parameters=net.collect_params().items()
    )
    for value in (1.0, 2.0, 6.0):
        set_everywhere(params[running], value)
        set_everywhere(params[weight], value)
        average.apply()
    assert_allclose(average.shadows[weight].asnumpy(), 3.0, rtol=1e-6)  # weights are always averaged
    if non_trainable == "exclude":
        assert running not in average.shadows
        assert all(parameter.grad_req != "null" for _, parameter in average.parameters)
    else:
        assert_allclose(average.shadows[running].asnumpy(), 3.0 if non_trainable == "average" else 6.0, rtol=1e-6)
    set_everywhere(params[running], 100.0)
    with average.average_parameters():
        expected_running = {"average": 3.0, "copy": 6.0, "exclude": 100.0}[non_trainable]
        assert_allclose(params[running].data().asnumpy(), expected_running, rtol=1e-6)


def test_include_and_exclude_patterns_choose_the_averaged_parameters():
    net = batchnorm_network()
    pairs = list(net.collect_params().items())
    average = MovingAverage.from_config(
        {"type": "cumulative", "include": ["*dense*"], "exclude": "*bias"}, parameters=pairs
    )
    assert sorted(average.shadows) == ["net_dense0_weight"]
    everything_but_batchnorm = MovingAverage.from_config({"exclude": ["net_batchnorm0_*"]}, parameters=pairs)
    assert sorted(everything_but_batchnorm.shadows) == ["net_dense0_bias", "net_dense0_weight"]


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"exclude": ["*batchnrom*"]},
            r"exclude pattern '\*batchnrom\*' matches no parameter; the names are like 'net_dense0_weight'",
        ),
        ({"include": ["*dense*"], "exclude": ["*dense*"]}, r"leave no parameter to average"),
        ({"include": [3]}, r"include must be a list of name patterns such as \['\*weight'\], got \[3\]"),
        ({"start_step": -1}, r"start_step must be an integer >= 0, got -1"),
        ({"update_every": 0}, r"update_every must be an integer >= 1, got 0"),
        ({"non_trainable": "skip"}, r"non_trainable must be one of \['average', 'copy', 'exclude'\], got 'skip'"),
        ({"warmup": "linear"}, r"warmup must be one of \['ratio', 'power', 'none'\], got 'linear'"),
        ({"warmup_power": 0}, r"warmup_power must be a finite number > 0, got 0"),
        ({"start_stpe": 3}, r"unknown key 'start_stpe'.*did you mean 'start_step'"),
    ],
)
def test_bad_shared_options_name_the_culprit(config, message):
    with pytest.raises(ConfigurationError, match=message):
        MovingAverage.from_config(config, parameters=batchnorm_network().collect_params().items())


def test_state_round_trip_keeps_the_schedule():
    net = vector_network(TRAJECTORY[0])
    first = MovingAverage.from_config(
        {"type": "cumulative", "start_step": None}, parameters=net.collect_params().items()
    )
    visit(first, net, TRAJECTORY[:3])
    first.start_now()
    visit(first, net, TRAJECTORY[3:6])
    second = MovingAverage.from_config(
        {"type": "cumulative", "start_step": None}, parameters=net.collect_params().items()
    )
    second.load_state_dict(pickle.loads(pickle.dumps(first.state_dict())))
    assert (second.start_step, second.num_steps, second.num_applied) == (3, 6, 3)
    for value in TRAJECTORY[6:]:
        set_everywhere(net.weight, mx.nd.array(value.reshape(-1, 1)))
        second.apply()
    assert_allclose(shadow(second), TRAJECTORY[3:].mean(axis=0), rtol=1e-5, atol=1e-6)
