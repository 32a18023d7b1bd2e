"""Shared test helpers: tiny GluonTS training runs and a tiny symbolic Module, and the suite's settings.

Test files import these helpers from here (``from conftest import train``),
never from one another.
"""

import logging
import os
import warnings
from typing import Dict, List, Sequence

import mxnet as mx
import numpy as np
import pytest
from gluonts.dataset.common import ListDataset
from gluonts.mx import SimpleFeedForwardEstimator, Trainer
from gluonts.mx.trainer.callback import Callback
from numpy.testing import assert_allclose

warnings.filterwarnings("ignore", message="Using `json`-module")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(autouse=True)
def quiet_gluonts():
    logging.getLogger("gluonts").setLevel(logging.WARNING)
    yield


# GluonTS: a tiny SimpleFeedForward run, and a probe of what the network holds at each hook ------------

Weights = Dict[str, np.ndarray]


def read_weights(network: mx.gluon.Block) -> Weights:
    return {name: parameter.data().asnumpy().astype(np.float64) for name, parameter in network.collect_params().items()}


class Probe(Callback):
    """Listed after the averaging callback: records what the network holds at each hook."""

    def __init__(self) -> None:
        self.raw_after_step: List[Weights] = []
        self.during_validation: List[Weights] = []
        self.raw_at_validation_start: List[Weights] = []
        self.raw_at_epoch_start: List[Weights] = []
        self.raw_at_epoch_end: List[Weights] = []
        self.scores: List[float] = []
        self.files_at_epoch_end: List[int] = []
        self.network = None

    def on_network_initializing_end(self, training_network, **kwargs) -> None:
        self.network = training_network
        self.raw_after_step.append(read_weights(training_network))
        # What a validation batch computes with is only visible inside the network's forward pass:
        # a pre-hook on a block inside it records the weights on the first call of each validation.
        inner: List[mx.gluon.Block] = []
        training_network.apply(lambda block: inner.append(block) if block is not training_network else None)
        inner[0].register_forward_pre_hook(lambda block, inputs: self._inside_forward(training_network))
        self._validating = False

    def _inside_forward(self, network) -> None:
        if self._validating and self._first_validation_pass:
            self.during_validation.append(read_weights(network))
            self._first_validation_pass = False

    def on_train_epoch_start(self, training_network, **kwargs) -> None:
        self.raw_at_epoch_start.append(read_weights(training_network))

    def on_train_batch_end(self, training_network, **kwargs) -> bool:
        self.raw_after_step.append(read_weights(training_network))
        return True

    def on_validation_epoch_start(self, training_network, **kwargs) -> None:
        self._validating, self._first_validation_pass = True, True
        self.raw_at_validation_start.append(read_weights(training_network))

    def on_validation_epoch_end(self, **kwargs) -> bool:
        self._validating = False
        return True

    def on_epoch_end(self, epoch_no, epoch_loss, training_network, checkpoint_dir=None, **kwargs) -> bool:
        self.raw_at_epoch_end.append(read_weights(training_network))
        self.scores.append(epoch_loss)
        return True


def dataset() -> ListDataset:
    rng = np.random.RandomState(0)
    series = [np.sin(np.arange(120) / 4.0) + 0.2 * rng.randn(120) for _ in range(4)]
    return ListDataset([{"start": "2021-01-01", "target": target} for target in series], freq="D")


def train(
    callback: Callback,
    with_validation: bool = True,
    epochs: int = 4,
    batches: int = 3,
    extra_callbacks: Sequence[Callback] = (),
    hybridize: bool = False,
    batch_norm: bool = False,
) -> Probe:
    """A tiny SimpleFeedForward run with ``callback``, then ``extra_callbacks``, then a probe.

    Not hybridized by default: the probe sees what a validation pass computes with only through a
    hook on a block inside the network, which a hybridized network does not call.
    """
    probe = Probe()
    mx.random.seed(7)
    np.random.seed(7)
    estimator = tiny_estimator([callback, *extra_callbacks, probe], epochs, batches, hybridize, batch_norm)
    data = dataset()
    estimator.train(data, validation_data=data if with_validation else None)
    return probe


def tiny_estimator(
    callbacks: Sequence[Callback], epochs: int, batches: int, hybridize: bool = False, batch_norm: bool = False
):
    """The tiny SimpleFeedForward estimator of :func:`train`, with these trainer callbacks."""
    return SimpleFeedForwardEstimator(
        prediction_length=4,
        context_length=8,
        num_hidden_dimensions=[8, 6] if batch_norm else [6],  # BatchNorm follows each hidden layer but the last
        batch_size=8,
        batch_normalization=batch_norm,
        trainer=Trainer(
            epochs=epochs, num_batches_per_epoch=batches, learning_rate=1e-2, callbacks=callbacks, hybridize=hybridize
        ),
    )


def independent_ema(raw_after_step: List[Weights], decay: float, steps: int) -> Weights:
    """The EMA with warm-up min(decay, (1 + k) / (10 + k)), in float64, over the first ``steps`` steps."""
    average = {name: value.copy() for name, value in raw_after_step[0].items()}
    for k in range(1, steps + 1):
        d = min(decay, (1 + k) / (10 + k))
        average = {name: d * average[name] + (1 - d) * raw_after_step[k][name] for name in average}
    return average


def assert_weights_close(actual: Weights, expected: Weights, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for name in actual:
        assert_allclose(actual[name], expected[name], rtol=rtol, atol=atol, err_msg=name)


def mean_of(weights: List[Weights]) -> Weights:
    return {name: np.mean([w[name] for w in weights], axis=0) for name in weights[0]}


# Module.fit: a tiny classifier with a BatchNorm ----------------------------------------------------

MODULE_DECAY = 0.9
MODULE_EPOCHS = 3
MODULE_BATCH = 16


def module_symbol() -> mx.sym.Symbol:
    data = mx.sym.Variable("data")
    hidden = mx.sym.FullyConnected(data, num_hidden=16, name="fc1")
    hidden = mx.sym.BatchNorm(hidden, name="bn1")
    hidden = mx.sym.Activation(hidden, act_type="relu")
    output = mx.sym.FullyConnected(hidden, num_hidden=3, name="fc2")
    return mx.sym.SoftmaxOutput(output, name="softmax")


def data_iterator(seed: int, samples: int = 96) -> mx.io.NDArrayIter:
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, 3, size=samples)
    features = rng.randn(samples, 5).astype(np.float32) + labels[:, None].astype(np.float32)
    return mx.io.NDArrayIter(features, labels.astype(np.float32), batch_size=MODULE_BATCH, label_name="softmax_label")


def new_module(contexts) -> mx.mod.Module:
    return mx.mod.Module(module_symbol(), context=contexts)


def fit_arguments(kvstore: str = "local") -> dict:
    return dict(
        num_epoch=MODULE_EPOCHS,
        optimizer="adam",
        optimizer_params={"learning_rate": 0.05},
        initializer=mx.init.Xavier(),
        eval_metric="acc",
        kvstore=kvstore,
    )


def executor_values(module: mx.mod.Module) -> dict:
    """The first device's arrays, read the way an independent observer would."""
    group = module._exec_group
    values = {f"arg:{n}": a[0].asnumpy() for n, a in zip(group.param_names, group.param_arrays)}
    values.update({f"aux:{n}": a[0].asnumpy() for n, a in zip(group.aux_names, group.aux_arrays)})
    return values


def seed_everything() -> None:
    mx.random.seed(7)
    np.random.seed(7)
