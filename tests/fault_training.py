"""GluonTS training runs for tests/test_fault_injection.py to kill (not a test module).

``python tests/fault_training.py FOLDER [--callback exponential|checkpoints]``
trains a small ``SimpleFeedForwardEstimator`` for (practically) ever, one
batch per epoch, with an averaging callback that writes every epoch's
checkpoint and epoch-info record into FOLDER and deletes the ones its
strategy (the mean of the 3 best) can no longer select. The hidden layers
are wide enough for a checkpoint of about 1 MB, so writing and deleting
files is much of each epoch: about a third of the kills at random moments
land inside a write.

On stdout, each line written whole at once: ``started PID`` when the
imports are done and training begins; ``network {JSON}``, every parameter's
name and shape, once the network is initialised; then ``epoch N`` after each
epoch's files are written and pruned. The parent kills the process with
SIGKILL; nothing here cleans up.

``python tests/fault_training.py --serve`` pays for the imports (3-5 s of
MXNet and GluonTS) once for many runs: it prints ``ready``, then for each
line ``["FOLDER", "KIND"]`` (JSON) on stdin forks a child that trains as
above, printing on the same stdout, prints ``forked PID``, waits for the
child to end (the parent kills it) and prints ``exited STATUS`` (``-9``:
killed by SIGKILL). ``forked`` and the child's first lines may come in
either order; every line is written whole. The server itself runs no MXNet
operation, so each child starts MXNet's engine and thread pools afresh, as
a new process would; a child dies with the server.
"""

import argparse
import contextlib
import ctypes
import json
import os
import signal
import sys
import traceback
from typing import Any, Dict, List, NoReturn, Optional, Sequence

import mxnet as mx
import numpy as np
from gluonts.dataset.common import ListDataset
from gluonts.mx import SimpleFeedForwardEstimator, Trainer
from gluonts.mx.trainer.callback import Callback

from modavg_plugin import AveragingCallback

HIDDEN_UNITS = [256, 256]  # 0.26 M float32 weights, a 1 MB checkpoint (the last layer has 4 x 256 units)
CONTEXT_LENGTH = 8
PREDICTION_LENGTH = 4
NUM_MODELS = 3
EPOCHS = 100_000  # never reached: the parent kills the run
CALLBACKS = ("exponential", "checkpoints")
PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


class Announcer(Callback):
    """Listed after the averaging callback: prints the network's shapes, then each finished epoch."""

    def on_network_initializing_end(self, training_network: mx.gluon.HybridBlock, **kwargs: Any) -> None:
        shapes = {name: list(parameter.shape) for name, parameter in training_network.collect_params().items()}
        announce(f"network {json.dumps(shapes)}")

    def on_epoch_end(self, epoch_no: int, **kwargs: Any) -> bool:
        announce(f"epoch {int(epoch_no)}")
        return True


def announce(line: str) -> None:
    """Write ``line`` to stdout in one system call.

    A pipe takes a write of up to 4096 bytes (``PIPE_BUF``) whole, so the
    line is never cut by the kill nor mixed into the fork server's lines on
    the same pipe (``print`` may write the text and the newline separately).
    """
    os.write(sys.stdout.fileno(), f"{line}\n".encode())


def callback_config(kind: str, folder: str) -> Dict[str, Any]:
    """The averaging callback's config: ``"exponential"`` (EMA) or ``"checkpoints"`` (raw weights)."""
    config: Dict[str, Any] = {
        "type": kind,
        "avg_strategy": {"type": "mean", "num_models": NUM_MODELS},
        "checkpoint_dir": folder,
    }
    if kind == "exponential":
        config["decay"] = 0.9
    return config


def dataset() -> ListDataset:
    """Four noisy sine series of 120 daily steps (fixed seed)."""
    rng = np.random.RandomState(0)
    series = [np.sin(np.arange(120) / 4.0) + 0.2 * rng.randn(120) for _ in range(4)]
    return ListDataset([{"start": "2021-01-01", "target": target} for target in series], freq="D")


def estimator(callbacks: List[Callback], epochs: int) -> SimpleFeedForwardEstimator:
    """A SimpleFeedForward forecaster with wide hidden layers, one batch of 8 windows per epoch."""
    return SimpleFeedForwardEstimator(
        prediction_length=PREDICTION_LENGTH,
        context_length=CONTEXT_LENGTH,
        num_hidden_dimensions=HIDDEN_UNITS,
        batch_size=8,
        trainer=Trainer(
            epochs=epochs,
            num_batches_per_epoch=1,
            learning_rate=1e-3,
            callbacks=callbacks,
            add_default_callbacks=False,
        ),
    )


def train(folder: str, kind: str, epochs: int = EPOCHS) -> None:
    """Train with the ``kind`` averaging callback writing into ``folder``; announce the start and each epoch."""
    mx.random.seed(7)
    np.random.seed(7)
    callbacks = [AveragingCallback.from_config(callback_config(kind, folder)), Announcer()]
    data = dataset()
    announce(f"started {os.getpid()}")
    estimator(callbacks, epochs).train(data)


def serve() -> None:
    """The fork server: one child per request line, its process id printed, waited for, its exit status printed."""
    announce("ready")
    for request in sys.stdin:
        folder, kind = json.loads(request)
        server = os.getpid()
        child = os.fork()
        if child == 0:
            die_with(server)
            train_and_exit(folder, kind)
        announce(f"forked {child}")
        _, status = os.waitpid(child, 0)
        announce(f"exited {os.waitstatus_to_exitcode(status)}")


def die_with(server: int) -> None:
    """In a forked child: have Linux SIGKILL this process when the server dies, so that no run outlives it."""
    with contextlib.suppress(AttributeError, OSError):  # prctl is Linux's
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server:  # the server died before prctl
        os._exit(1)


def train_and_exit(folder: str, kind: str) -> NoReturn:
    """In a forked child: train, then leave without running the server's clean-up (status 1 on an error)."""
    status = 1
    try:
        train(folder, kind)
        status = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def parse_arguments(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """The command line: FOLDER (or ``--serve``), ``--callback`` and ``--epochs``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", help="checkpoint folder (created if needed)")
    parser.add_argument("--callback", choices=CALLBACKS, default=CALLBACKS[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="stop after this many epochs (default: never)")
    parser.add_argument("--serve", action="store_true", help="fork a run for each request read from stdin")
    arguments = parser.parse_args(argv)
    if arguments.serve == (arguments.folder is not None):
        parser.error("give either FOLDER or --serve")
    return arguments


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the training (or the fork server) described by the command line; 0 if it ends on its own."""
    arguments = parse_arguments(argv)
    if arguments.serve:
        serve()
    else:
        train(arguments.folder, arguments.callback, arguments.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
