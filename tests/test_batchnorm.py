"""BatchNorm running statistics recomputed for the final weights, checked against statistics computed with NumPy."""

import logging

import mxnet as mx
import numpy as np
import pytest
from numpy.testing import assert_allclose

from modavg_plugin import ExponentialAveragingCallback, update_bn
from modavg_plugin.module import ModuleAveraging

from conftest import data_iterator, fit_arguments, new_module, seed_everything, train


def small_network() -> mx.gluon.nn.HybridSequential:
    net = mx.gluon.nn.HybridSequential(prefix="small_")
    with net.name_scope():
        net.add(
            mx.gluon.nn.Dense(8, in_units=4), mx.gluon.nn.BatchNorm(in_channels=8), mx.gluon.nn.Dense(1, in_units=8)
        )
    return net


def expected_statistics(batches, weight: np.ndarray, bias: np.ndarray):
    """The mean over batches of each batch's mean and (biased, as MXNet) variance of the BatchNorm's input."""
    inputs = [batch.asnumpy().astype(np.float64) @ weight.T + bias for batch in batches]
    return np.mean([x.mean(axis=0) for x in inputs], axis=0), np.mean([x.var(axis=0) for x in inputs], axis=0)


@pytest.mark.parametrize("hybridize", [False, True])
@pytest.mark.parametrize("contexts", [[mx.cpu(0)], [mx.cpu(0), mx.cpu(1)]], ids=["1dev", "2dev"])
def test_update_bn_gives_the_mean_of_per_batch_statistics_and_leaves_weights_and_gradients(hybridize, contexts):
    net = small_network()
    net.initialize(mx.init.Xavier(), ctx=contexts)
    if hybridize:
        net.hybridize()
    rng = np.random.RandomState(0)
    batches = [mx.nd.array(rng.randn(16, 4) * (index + 1) + index) for index in range(5)]
    weights = {name: p.data().asnumpy() for name, p in net.collect_params().items() if p.grad_req != "null"}
    for parameter in net.collect_params().values():
        if parameter.grad_req != "null":
            for gradient in parameter.list_grad():
                gradient[:] = 7.0
    assert update_bn(net, batches, ctx=contexts) == 5
    # with two devices each batch is split in two halves: the mean over every half
    halves = batches if len(contexts) == 1 else [half for batch in batches for half in (batch[:8], batch[8:])]
    mean, variance = expected_statistics(halves, net[0].weight.data().asnumpy(), net[0].bias.data().asnumpy())
    for copy in net[1].running_mean.list_data():
        assert_allclose(copy.asnumpy(), mean, rtol=1e-5, atol=1e-5)
    for copy in net[1].running_var.list_data():
        assert_allclose(copy.asnumpy(), variance, rtol=1e-5, atol=1e-4)
    for name, parameter in net.collect_params().items():
        if parameter.grad_req != "null":
            assert_allclose(parameter.data().asnumpy(), weights[name], rtol=0, atol=0)
            for gradient in parameter.list_grad():
                assert float(gradient.asnumpy().min()) == float(gradient.asnumpy().max()) == 7.0


def test_update_bn_without_batches_changes_nothing():
    net = small_network()
    net.initialize()
    before = net[1].running_var.data().asnumpy().copy()
    assert update_bn(net, []) == 0
    assert_allclose(net[1].running_var.data().asnumpy(), before, rtol=0, atol=0)


@pytest.mark.parametrize("hybridize", [False, True])
def test_the_gluonts_callback_recomputes_the_statistics_from_its_last_training_batches(hybridize):
    from gluonts.mx import SimpleFeedForwardEstimator  # noqa: F401  (the conftest run builds it)

    callback = ExponentialAveragingCallback(decay=0.9, update_bn=2)
    probe = train(callback, with_validation=False, epochs=2, batches=3, hybridize=hybridize, batch_norm=True)
    kept = list(callback._training_inputs.inputs)
    assert len(kept) == 2  # the last two training batches
    network = probe.network
    layers = [block for block in _blocks(network) if isinstance(block, mx.gluon.nn.BatchNorm)]
    assert layers, "SimpleFeedForward(batch_normalization=True) has BatchNorm layers"
    seen = {id(layer): [] for layer in layers}  # each layer's input during a training pass with the final weights
    network.hybridize(active=False)
    handles = [
        layer.register_forward_pre_hook(lambda block, x: seen[id(block)].append(x[0].asnumpy())) for layer in layers
    ]
    finals = [(layer.running_mean.data().asnumpy(), layer.running_var.data().asnumpy()) for layer in layers]
    for inputs in kept:
        with mx.autograd.record():  # training mode: earlier BatchNorm layers normalise with the batch's statistics
            network(*inputs)
    for handle in handles:
        handle.detach()
    for layer, (running_mean, running_var) in zip(layers, finals):
        activations = [
            x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1).reshape(-1, x.shape[1]) for x in seen[id(layer)]
        ]
        assert_allclose(running_mean, np.mean([a.mean(axis=0) for a in activations], axis=0), rtol=1e-4, atol=1e-5)
        assert_allclose(running_var, np.mean([a.var(axis=0) for a in activations], axis=0), rtol=1e-4, atol=1e-5)


def _blocks(network: mx.gluon.Block):
    found = []
    network.apply(found.append)
    return found


def test_module_averaging_recomputes_the_statistics_from_the_first_training_batches(caplog):
    seed_everything()
    module = new_module([mx.cpu(0)])
    averaging = ModuleAveraging(module, {"type": "exponential", "decay": 0.9}, update_bn=2)
    with caplog.at_level(logging.INFO, logger="modavg_plugin"):
        averaging.fit(data_iterator(0), eval_data=data_iterator(1), **fit_arguments())
    assert "recomputed for the final weights from 2 batches" in caplog.text
    arg_params, aux_params = module.get_params()
    weight, bias = arg_params["fc1_weight"].asnumpy(), arg_params["fc1_bias"].asnumpy()
    batches = [batch.data[0] for batch in list(data_iterator(0))[:2]]
    mean, variance = expected_statistics(batches, weight, bias)
    assert_allclose(aux_params["bn1_moving_mean"].asnumpy(), mean, rtol=1e-4, atol=1e-5)
    assert_allclose(aux_params["bn1_moving_var"].asnumpy(), variance, rtol=1e-4, atol=1e-4)


def test_update_bn_is_an_option_of_the_run_checked_when_built():
    from modavg_plugin import AveragingRun, ConfigurationError

    with pytest.raises(ConfigurationError, match="update_bn must be an integer >= 1, got 0"):
        AveragingRun(update_bn=0)
