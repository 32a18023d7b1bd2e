"""What the documentation's code blocks run in (``tests/test_snippets.py``): tiny real data for the names they use.

Each ``*_namespace`` function returns the globals one kind of block is executed
with; the other functions build the folders the command-line blocks name and
reproduce the messages the ``modavg`` command prints. Everything is written
under the current working directory, which the tests make a temporary one.
"""

import contextlib
import io
import os
import pathlib
import re
import sys
from typing import Any, Callable, Dict, List, Sequence, Tuple

import mxnet as mx
import numpy as np
import statsmodels.api as sm
from gluonts.dataset.common import ListDataset
from gluonts.mx.trainer.callback import Callback
from mxnet import autograd, gluon

from modavg_plugin import AveragingCallback, save_epoch_info
from modavg_plugin.cli import main
from modavg_plugin.module import ModuleAveraging

from conftest import data_iterator, dataset, module_symbol, read_weights, seed_everything, tiny_estimator

Namespace = Dict[str, Any]
Weights = Dict[str, np.ndarray]

PREDICTION_LENGTH = 13  # the blocks' estimator forecasts 13 weeks
FEATURES = 4
BATCH_SIZE = 16
TRAINING_STEP_LINE = re.compile(r"^(?P<indent>\s*)\.\.\.\s*# forward, backward, trainer\.step\(batch_size\)\s*$")
TRAINING_STEP_CALL = "train_step(data, label)  # the set-up's forward, backward and trainer.step"
RUN_FOLDER_EPOCHS = 10  # epochs 1-10, so run/epoch-0007.params ... run/epoch-0009.params are among them
TRANSCRIPT_SCORES = {1: 2.0, 2: 1.0}  # a score difference of 1: softmax weights 0.731059 and 0.268941


# GluonTS: weekly Mauna Loa CO2 (statsmodels, offline) ----------------------------------------------


def gluonts_namespace() -> Namespace:
    """``train_data`` (all but the last 13 weeks of weekly CO2) and ``validation_data`` (all of it)."""
    seed_everything()
    series = sm.datasets.co2.load_pandas().data["co2"].interpolate()
    start = series.index[0]
    values = series.to_numpy(dtype=np.float32)
    train_data = ListDataset([{"start": start, "target": values[:-PREDICTION_LENGTH]}], freq="W-SAT")
    validation_data = ListDataset([{"start": start, "target": values}], freq="W-SAT")
    return {"train_data": train_data, "validation_data": validation_data}


def train_tiny_gluonts(callback: Callback, batch_norm: bool, epochs: int = 4) -> None:
    """The suite's tiny SimpleFeedForward run (3 batches an epoch, with validation) with ``callback``."""
    seed_everything()
    data = dataset()
    tiny_estimator([callback], epochs=epochs, batches=3, batch_norm=batch_norm).train(data, validation_data=data)


def callback_config_namespace() -> Namespace:
    """The one name the callback-config block uses: ``AveragingCallback``."""
    return {"AveragingCallback": AveragingCallback}


# Plain Gluon loops: a small regression network on synthetic data -------------------------------------


class RecordingTrainer:
    """A ``gluon.Trainer`` that remembers the raw weights after its last step."""

    def __init__(self, net: gluon.Block) -> None:
        self.net = net
        self.trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.05, "momentum": 0.9})
        self.steps = 0
        self.after_last_step: Weights = {}

    def step(self, batch_size: int) -> None:
        """``gluon.Trainer.step``, then a copy of the weights."""
        self.trainer.step(batch_size)
        self.steps += 1
        self.after_last_step = read_weights(self.net)


class RecordingEvaluation:
    """``evaluate(net)``: the mean squared error on held-out data, remembering the weights each call saw and the result."""

    def __init__(self, features: mx.nd.NDArray, target: mx.nd.NDArray) -> None:
        self.features, self.target = features, target
        self.seen: List[Weights] = []
        self.losses: List[float] = []

    def __call__(self, net: gluon.Block) -> float:
        self.seen.append(read_weights(net))
        self.losses.append(float(((net(self.features) - self.target) ** 2).mean().asscalar()))
        return self.losses[-1]


def regression_network() -> gluon.nn.HybridSequential:
    """Two dense layers with their input size given, so the parameters exist before the first batch."""
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(8, in_units=FEATURES, activation="relu"), gluon.nn.Dense(1, in_units=8))
    net.initialize(mx.init.Xavier())
    return net


def regression_batches(batches: int, seed: int) -> List[Tuple[mx.nd.NDArray, mx.nd.NDArray]]:
    """``batches`` (features, target) pairs of a noisy linear target."""
    rng = np.random.default_rng(seed)
    coefficients = np.array([1.0, -2.0, 0.5, 3.0])
    pairs = []
    for _ in range(batches):
        features = rng.normal(size=(BATCH_SIZE, FEATURES))
        target = features @ coefficients + 0.3 * rng.normal(size=BATCH_SIZE)
        pairs.append((mx.nd.array(features), mx.nd.array(target[:, None])))
    return pairs


def gluon_namespace(batches: int = 40) -> Namespace:
    """``net``, ``train_batches``, ``autograd``, ``loss_function``, ``trainer`` and ``evaluate`` for one pass."""
    seed_everything()
    net = regression_network()
    held_out_features, held_out_target = regression_batches(1, seed=1)[0]
    return {
        "net": net,
        "train_batches": regression_batches(batches, seed=0),
        "autograd": autograd,
        "loss_function": gluon.loss.L2Loss(),
        "trainer": RecordingTrainer(net),
        "evaluate": RecordingEvaluation(held_out_features, held_out_target),
    }


def gluon_run_namespace(epochs: int = 6, batches: int = 10) -> Namespace:
    """The names of the ``AveragingRun`` block (``net``, ``epochs``, ``train_batches``, ``evaluate``) and ``train_step``.

    ``train_step(data, label)`` is what :func:`substitute_training_step` puts
    in place of the block's ``...`` line: forward, backward and
    ``trainer.step`` on the batch.
    """
    namespace = gluon_namespace(batches)
    namespace["epochs"] = epochs

    def train_step(data: mx.nd.NDArray, label: mx.nd.NDArray) -> None:
        with autograd.record():
            loss = namespace["loss_function"](namespace["net"](data), label)
        loss.backward()
        namespace["trainer"].step(data.shape[0])

    namespace["train_step"] = train_step
    return namespace


def substitute_training_step(text: str) -> str:
    """``text`` with its ``...  # forward, backward, trainer.step(batch_size)`` line calling ``train_step``.

    One line for one line, so the block keeps its line numbers.

    Raises
    ------
    ValueError
        The block has no such line, or more than one.
    """
    lines = text.splitlines()
    matches = [index for index, line in enumerate(lines) if TRAINING_STEP_LINE.match(line)]
    if len(matches) != 1:
        raise ValueError(
            f"expected one line '...  # forward, backward, trainer.step(batch_size)' in the block, found {len(matches)}"
        )
    indent = TRAINING_STEP_LINE.match(lines[matches[0]]).group("indent")
    lines[matches[0]] = f"{indent}{TRAINING_STEP_CALL}"
    return "\n".join(lines) + "\n"


# Module.fit: the suite's tiny classifier (FullyConnected, BatchNorm, softmax) -----------------------


def module_namespace() -> Namespace:
    """``mx``, ``symbol`` and labelled ``train_iter`` / ``val_iter`` (96 samples, 3 classes, batches of 16)."""
    seed_everything()
    return {"mx": mx, "symbol": module_symbol(), "train_iter": data_iterator(0), "val_iter": data_iterator(1)}


def batches_per_epoch(iterator: mx.io.DataIter) -> int:
    """How many batches one pass over ``iterator`` gives (it is reset before and after)."""
    iterator.reset()
    count = sum(1 for _ in iterator)
    iterator.reset()
    return count


# Folders the command-line blocks name ------------------------------------------------------------


def build_run_folder() -> None:
    """``run/``: a real ``ModuleAveraging`` run of 10 epochs, every checkpoint kept, with post-hoc snapshots.

    A Module run because the blocks rank by ``--metric accuracy``: ``Module.fit``
    with ``eval_metric="acc"`` records a real ``accuracy`` (and ``score``, the
    same value) in every epoch-info record, where a GluonTS run records only a
    validation loss. ``num_models`` is the number of epochs, so no checkpoint is
    pruned and ``run/epoch-0007.params`` ... ``run/epoch-0009.params`` exist;
    ``run/posthoc`` holds the snapshots of two power EMAs for ``modavg posthoc``.
    """
    seed_everything()
    averaging = ModuleAveraging(
        mx.mod.Module(module_symbol(), context=mx.cpu()),
        {"type": "exponential", "decay": 0.9},
        avg_strategy={"type": "mean", "num_models": RUN_FOLDER_EPOCHS, "metric": "accuracy", "maximize": True},
        checkpoint_prefix="run/epoch",
        posthoc={"sigma_rels": [0.05, 0.1]},
    )
    averaging.fit(
        data_iterator(0),
        eval_data=data_iterator(1),
        num_epoch=RUN_FOLDER_EPOCHS,
        optimizer="adam",
        optimizer_params={"learning_rate": 0.05},
        eval_metric="acc",
    )


def random_arrays(seed: int, prefix: str = "") -> Dict[str, np.ndarray]:
    """A tiny Dense layer's weight and bias, names prefixed with ``prefix`` (``"arg:"`` for Module names)."""
    rng = np.random.default_rng(seed)
    shapes = {"dense0_weight": (3, 4), "dense0_bias": (3,)}
    return {f"{prefix}{name}": rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}


def save_arrays(path: str, arrays: Dict[str, np.ndarray]) -> None:
    mx.nd.save(path, {name: mx.nd.array(value, dtype=value.dtype) for name, value in arrays.items()})


def build_transcript_folder() -> None:
    """``ck/``: two Gluon checkpoints with epoch info, epoch 2's score lower than epoch 1's by 1."""
    os.makedirs("ck")
    for epoch, score in TRANSCRIPT_SCORES.items():
        save_arrays(f"ck/epoch-{epoch:04d}.params", random_arrays(epoch))
        info = {"params_path": f"epoch-{epoch:04d}.params", "epoch_no": epoch, "score": score}
        save_epoch_info(f"ck/epoch-{epoch:04d}", info)


def command_argv(words: Sequence[str]) -> List[str]:
    """A documented command line as run here: ``modavg`` is the installed script, ``python`` this interpreter.

    Raises
    ------
    ValueError
        The line starts with another program.
    """
    program, *arguments = words
    if program == "modavg":
        return [str(pathlib.Path(sys.executable).parent / "modavg"), *arguments]
    if program == "python":
        return [sys.executable, *arguments]
    raise ValueError(f"a documented command must start with 'modavg' or 'python', not {program!r}")


# The messages of the modavg command -------------------------------------------------------------


def run_modavg(argv: Sequence[str]) -> Tuple[int, List[str]]:
    """``modavg ARGV`` in this process: its exit status and the lines it printed on stderr."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return code, stderr.getvalue().splitlines()


def truncate(path: str, size: int) -> None:
    """Keep the first ``size`` bytes of ``path``: a checkpoint cut short by a crash."""
    with open(path, "r+b") as file:
        file.truncate(size)


def message_scenarios() -> List[Tuple[List[str], Callable[[], None]]]:
    """Bad inputs, each an argument list and what to break first, in the folders of :func:`build_message_folders`."""
    nothing = lambda: None
    return [
        (["average", "epoch-0000.params", "mod.params", "-o", "out.params"], nothing),  # Gluon and Module names
        (["average", "epoch-0000.params", "epoch-0004.params", "-o", "out.params"], nothing),  # a missing file
        (["average", "a.params", "b.params", "-o", "out.params"], nothing),  # b.params has one more array
        (["average", "empty"], nothing),  # a folder without epoch info
        (["average", "ck", "--strategy", "softmx"], nothing),  # a misspelt strategy
        (["average", "ck", "--num-models", "0"], nothing),  # a malformed command line
        (
            ["average", "ck"],
            lambda: truncate("ck/epoch-0002.params", 40),
        ),  # a checkpoint cut short (last: it breaks ck)
    ]


def build_message_folders() -> None:
    """The files :func:`message_scenarios` name: ``ck/``, ``empty/`` and loose checkpoints."""
    build_transcript_folder()
    os.makedirs("empty")
    save_arrays("epoch-0000.params", random_arrays(0))
    save_arrays("mod.params", random_arrays(1, prefix="arg:"))
    save_arrays("a.params", random_arrays(2))
    save_arrays("b.params", {**random_arrays(3), "dense1_bias": np.zeros(2, np.float32)})


def printed_messages() -> List[Tuple[int, str]]:
    """Every stderr line of every scenario, with the exit status of the run that printed it."""
    build_message_folders()
    printed = []
    for argv, prepare in message_scenarios():
        prepare()
        code, lines = run_modavg(argv)
        printed.extend((code, line) for line in lines)
    return printed
