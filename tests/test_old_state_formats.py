"""Runs stopped by the code of commit c7c6584 resume to the result that code resumed them to.

tests/fixtures/old_callback_state/ and old_module_state/ are folders as a killed
run left them (the resume state file, the kept epoch checkpoints with their
epoch-info records, the post-hoc snapshots), written by
tests/fixtures/make_old_state_fixtures.py with that commit's code, next to what
its resumed run ended with (expected_*.params; see tests/fixtures/README.md).
Each test copies a folder (never resumes in place), resumes through the public
API only, and compares. The helpers repeat the generator's on purpose: this
test must not depend on it.
"""

import hashlib
import os
import shutil
from typing import Dict, Iterable

import mxnet as mx
import numpy as np
import pytest
from numpy.testing import assert_allclose

from modavg_plugin import AveragingCallback, reconstruct_posthoc
from modavg_plugin.module import ModuleAveraging

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
EXPECTED_FINAL = "expected_final.params"
EXPECTED_POSTHOC = "expected_posthoc_0.08.params"
ADDED_FILES = (EXPECTED_FINAL, EXPECTED_POSTHOC, "uninterrupted_final.params")  # not written by the stopped run
POSTHOC_SIGMA_REL = 0.08

# The GluonTS callback run: killed after epoch 3 of 6 ---------------------------------------------

CALLBACK_EPOCHS = 6
CALLBACK_STOP = 3
STEPS_PER_EPOCH = 3
SCORES = [5.0, 1.0, 4.0, 3.0, 2.0, 0.5]  # NTA (n = 1) fires after epoch 4; the best two are epochs 2 and 6


def callback_config(folder: str, resume: bool = False) -> Dict:
    return {
        "type": "moving_average",
        "average": {"type": "exponential", "decay": 0.8, "denominator": 2.0},
        "avg_strategy": {"type": "mean", "num_models": 2},
        "checkpoint_dir": folder,
        "trigger": {"type": "nta", "n": 1},
        "posthoc": {"sigma_rels": [0.05, 0.1], "every_epochs": 1},
        "resume": resume,
    }


def dense_network(seed: int) -> mx.gluon.nn.Dense:
    mx.random.seed(seed)
    net = mx.gluon.nn.Dense(3, in_units=4)
    net.initialize(mx.init.Uniform(5.0))
    return net


def optimiser_step(net: mx.gluon.Block, step: int) -> None:
    """A deterministic stand-in for the optimiser: halfway from the current weights to a target of ``step``."""
    for index, parameter in enumerate(net.collect_params().values()):
        target = np.sin(0.7 * step + index + np.arange(parameter.data().size)).reshape(parameter.shape)
        parameter.set_data(0.5 * parameter.data() + 0.5 * mx.nd.array(target))


def gluon_weights(net: mx.gluon.Block) -> Dict[str, np.ndarray]:
    """The weights by name relative to the network (Gluon numbers prefixes per process)."""
    prefix = net.prefix
    return {name[len(prefix) :]: parameter.data().asnumpy() for name, parameter in net.collect_params().items()}


def run_callback_epochs(callback, net: mx.gluon.Block, epochs: Iterable[int], first_step: int) -> None:
    """Drive the hooks as GluonTS's Trainer does (no validation data) for global ``epochs``."""
    step = first_step
    for local_epoch, epoch in enumerate(epochs):  # the hooks get run-local epoch numbers
        callback.on_train_epoch_start(training_network=net)
        for _ in range(STEPS_PER_EPOCH):
            step += 1
            optimiser_step(net, step)
            callback.on_train_batch_end(training_network=net)
        callback.on_train_epoch_end(epoch_no=local_epoch, epoch_loss=10.0 + epoch, training_network=net)
        callback.on_epoch_end(epoch_no=local_epoch, epoch_loss=SCORES[epoch], training_network=net)


def resume_callback_run(folder: str) -> Dict[str, np.ndarray]:
    callback = AveragingCallback.from_config(callback_config(folder, resume=True))
    net = dense_network(seed=1)  # a new process: other random weights, replaced by the saved raw ones
    callback.on_train_start(max_epochs=CALLBACK_EPOCHS - CALLBACK_STOP)
    callback.on_network_initializing_end(training_network=net)
    run_callback_epochs(
        callback, net, range(CALLBACK_STOP, CALLBACK_EPOCHS), first_step=CALLBACK_STOP * STEPS_PER_EPOCH
    )
    callback.on_train_end(training_network=net)
    return gluon_weights(net)


# The Module.fit run: killed in epoch 3 of 4 ------------------------------------------------------

MODULE_EPOCHS = 4
BATCH = 16


def module_symbol() -> mx.sym.Symbol:
    data = mx.sym.Variable("data")
    hidden = mx.sym.FullyConnected(data, num_hidden=8, name="fc1")
    hidden = mx.sym.BatchNorm(hidden, name="bn1")
    hidden = mx.sym.Activation(hidden, act_type="relu", name="relu1")
    output = mx.sym.FullyConnected(hidden, num_hidden=3, name="fc2")
    return mx.sym.SoftmaxOutput(output, name="softmax")


def module_data(seed: int, samples: int) -> mx.io.NDArrayIter:
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, 3, size=samples)
    features = rng.randn(samples, 5).astype(np.float32) + labels[:, None].astype(np.float32)
    return mx.io.NDArrayIter(features, labels.astype(np.float32), batch_size=BATCH, label_name="softmax_label")


def resume_module_run(folder: str) -> Dict[str, np.ndarray]:
    mx.random.seed(7)
    np.random.seed(7)
    module = mx.mod.Module(module_symbol(), context=[mx.cpu(0)])
    averaging = ModuleAveraging(
        module,
        {"type": "exponential", "decay": 0.9, "denominator": 2.0},
        avg_strategy={"type": "mean", "num_models": 3},
        checkpoint_prefix=os.path.join(folder, "model"),
        resume=True,
        posthoc={"sigma_rels": [0.05, 0.1], "every_epochs": 1},
    )
    averaging.fit(
        module_data(0, 64),
        eval_data=module_data(1, 32),
        num_epoch=MODULE_EPOCHS,
        optimizer="adam",
        optimizer_params={"learning_rate": 0.05},
        initializer=mx.init.Xavier(),
        eval_metric="ce",
        kvstore="local",
    )
    arg_params, aux_params = module.get_params()
    weights = {f"arg:{name}": value.asnumpy() for name, value in arg_params.items()}
    weights.update({f"aux:{name}": value.asnumpy() for name, value in aux_params.items()})
    return weights


# The checks --------------------------------------------------------------------------------------


def folder_digest(folder: str) -> Dict[str, str]:
    digest = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as file:
                digest[os.path.relpath(path, folder)] = hashlib.sha256(file.read()).hexdigest()
    return digest


def assert_same_arrays(actual: Dict[str, np.ndarray], expected_path: str) -> None:
    expected = {name: value.asnumpy() for name, value in mx.nd.load(expected_path).items()}
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert_allclose(actual[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(
    "fixture, resume",
    [("old_callback_state", resume_callback_run), ("old_module_state", resume_module_run)],
    ids=["gluonts-callback", "module-fit"],
)
def test_a_run_stopped_by_the_old_code_resumes_to_the_old_result(tmp_path, fixture, resume):
    original = os.path.join(FIXTURES, fixture)
    before = folder_digest(original)
    folder = str(tmp_path / fixture)
    shutil.copytree(original, folder, ignore=shutil.ignore_patterns(*ADDED_FILES))

    final = resume(folder)

    assert_same_arrays(final, os.path.join(original, EXPECTED_FINAL))
    posthoc, _ = reconstruct_posthoc(os.path.join(folder, "posthoc"), sigma_rel=POSTHOC_SIGMA_REL)
    assert_same_arrays(
        {name: value.asnumpy() for name, value in posthoc.items()}, os.path.join(original, EXPECTED_POSTHOC)
    )
    assert folder_digest(original) == before  # the fixture itself is never touched
