"""A plain MXNet Gluon loop driving the averaging engine: EMA, per-epoch checkpoints, the best epochs' mean.

The same task and network as ``examples/gluon_loop.py`` (statsmodels'
``macrodata``: the quarterly change of the US unemployment rate from the
same quarter's growth figures; the last 42 quarters held out), but the loop
hands its hooks to an :class:`~modavg_plugin.AveragingRun`, as the GluonTS
callbacks and ``ModuleAveraging`` do: ``run.step()`` after each optimiser
step, validation with the averages swapped in (``with run.averaged():``),
``run.end_epoch(score=...)`` to save the epoch's EMA and prune, and
``run.finish(...)`` to leave the mean of the 3 per-epoch EMAs with the best
validation loss in the network. The last 20 training quarters validate.
With ``--checkpoint-dir`` the folder is kept, and a second run with the same
folder resumes after the last finished epoch (``run.resume()``; the
optimiser's momentum restarts, which a loop keeping ``trainer.save_states``
next to it would avoid).

Run ``python examples/gluon_loop_run.py``; ``--quick`` is the tiny setting used
by the tests.
"""

import argparse
import os
import sys
from typing import Any, Dict, Optional, Sequence

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gluon_loop import (
    EMA_DECAY,
    Arrays,
    build_network,
    load_features_and_target,
    mean_squared_error,
    print_errors,
    shuffled_batches,
    standardised_split,
)

import modavg_plugin
from modavg_plugin.gluon import network_parameters
from modavg_plugin.parameters import write_into_parameters

VALIDATION_ROWS = 20
FULL_EPOCHS = 100
QUICK_EPOCHS = 6


def split_validation(training: Arrays) -> Sequence[Arrays]:
    """The last ``VALIDATION_ROWS`` training quarters validate (chronological)."""
    features, target = training
    cut = len(features) - VALIDATION_ROWS
    return (features[:cut], target[:cut]), (features[cut:], target[cut:])


def train(
    net: gluon.nn.HybridSequential, data: Arrays, validation: Arrays, epochs: int, seed: int, folder: Optional[str]
):
    """Train ``net`` in place, the run averaging along; return the run (not finished) and the held-out setting."""
    generator = np.random.default_rng(seed)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.05, "momentum": 0.9, "wd": 1e-2})
    loss_function = gluon.loss.L2Loss()
    run = modavg_plugin.AveragingRun(
        {"type": "exponential", "decay": EMA_DECAY},
        avg_strategy={"type": "mean", "num_models": 3},
        checkpoint_dir=folder,
        resume=folder is not None,
    )
    parameters = network_parameters(net)  # names without Gluon's per-process prefix: the same after a restart
    resumed = run.resume()
    if resumed is not None:  # a stopped run in ``folder``: its raw weights back, then on from its next epoch
        write_into_parameters(resumed.raw, parameters, folder)
    run.start(parameters, epochs_ahead=epochs - run.epochs_done)
    for _ in range(run.epochs_done, epochs):
        for features, target in shuffled_batches(data, generator):
            with autograd.record():
                loss = loss_function(net(features), target)
            loss.backward()
            trainer.step(features.shape[0])
            run.step()
        with run.averaged():
            validation_loss = mean_squared_error(net, validation)
        run.end_epoch(score=validation_loss, notes={"validation_loss": validation_loss})
    return run


def parse_arguments(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"tiny setting: {QUICK_EPOCHS} epochs")
    parser.add_argument("--seed", type=int, default=0, help="seed for MXNet and NumPy (default 0)")
    parser.add_argument(
        "--checkpoint-dir", help="keep the checkpoints and the resume state here (default: a temporary folder)"
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train once; print the held-out errors of the last iterate, the final EMA and the best epochs' mean."""
    arguments = parse_arguments(argv)
    epochs = QUICK_EPOCHS if arguments.quick else FULL_EPOCHS
    mx.random.seed(arguments.seed)
    np.random.seed(arguments.seed)
    training, held_out = standardised_split(*load_features_and_target())
    training, validation = split_validation(training)
    net = build_network(input_units=training[0].shape[1])
    run = train(net, training, validation, epochs, arguments.seed, arguments.checkpoint_dir)
    results = {"last iterate": mean_squared_error(net, held_out)}
    with run.averaged():
        results[f"EMA (decay {EMA_DECAY})"] = mean_squared_error(net, held_out)
    run.finish()
    results["mean of 3 best epoch EMAs"] = mean_squared_error(net, held_out)
    print(
        f"data set: statsmodels macrodata, {len(training[0])} training / {len(validation[0])} validation / "
        f"{len(held_out[0])} held-out quarters, {epochs} epochs, seed: {arguments.seed}"
    )
    print_errors(results)
    final = {name: value.asnumpy() for name, value in run.raw_weights().items()}  # by the names in the checkpoints
    return {"epochs": epochs, "seed": arguments.seed, "held_out_mse": results, "history": run.history, "final": final}


if __name__ == "__main__":
    main()
