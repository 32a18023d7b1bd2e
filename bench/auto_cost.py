"""What the ``"auto"`` mode costs on the demo's networks: disk per epoch, snapshot writes, the choice at the end.

The demo's setting (``examples/forecasting_demo.py``: SimpleFeedForward on
co2 and macrodata, 50 batches an epoch) with ``{"type": "auto"}`` and a
``checkpoint_dir``, timed from inside: each post-hoc save, each epoch end
(checkpoint, snapshots and state), and the end of training (rebuilding and
evaluating every candidate, then writing the chosen one). Disk: the bytes the
folder holds after each epoch end.
"""

import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict

import mxnet as mx
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import forecasting_demo as demo
from gluonts.env import env
from gluonts.mx import SimpleFeedForwardEstimator, Trainer

import modavg_plugin
from modavg_plugin import run as run_module
from modavg_plugin import snapshots


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def timed(holder: list, function: Callable) -> Callable:
    def wrapper(*arguments: Any, **keywords: Any) -> Any:
        mx.nd.waitall()
        started = time.perf_counter()
        try:
            return function(*arguments, **keywords)
        finally:
            mx.nd.waitall()
            holder.append(time.perf_counter() - started)

    return wrapper


def measure(dataset_name: str, epochs: int = 10, batches: int = 50, seed: int = 0) -> Dict[str, Any]:
    """One auto run of the demo's setting, timed and weighed from inside."""
    dataset, splits = demo.DATASETS[dataset_name], demo.make_splits(dataset_name)
    saves, epoch_ends, finishes, sizes = [], [], [], []
    original = (snapshots.PostHocSnapshots.save, run_module.AveragingRun.end_epoch, run_module.AveragingRun.finish)
    snapshots.PostHocSnapshots.save = timed(saves, original[0])
    run_module.AveragingRun.end_epoch = timed(epoch_ends, original[1])
    run_module.AveragingRun.finish = timed(finishes, original[2])
    try:
        with tempfile.TemporaryDirectory() as folder:
            callback = modavg_plugin.AveragingCallback.from_config({"type": "auto", "checkpoint_dir": folder})
            original_end = callback.run.__class__.end_epoch

            def weigh_after(*arguments: Any, **keywords: Any) -> Any:
                outcome = original_end(*arguments, **keywords)
                sizes.append(folder_bytes(folder))
                return outcome

            run_module.AveragingRun.end_epoch = weigh_after
            trainer = Trainer(
                epochs=epochs, num_batches_per_epoch=batches, learning_rate=1e-3, hybridize=True,
                callbacks=[callback], add_default_callbacks=False,
            )  # fmt: skip
            estimator = SimpleFeedForwardEstimator(
                prediction_length=dataset.prediction_length, context_length=dataset.context_length, trainer=trainer
            )
            demo.seed_everything(seed)
            started = time.perf_counter()
            with env._let(use_tqdm=False):
                estimator.train(splits.training, validation_data=splits.validation)
            train_seconds = time.perf_counter() - started
            parameters = sum(value.size for value in callback.run.raw_weights().values())
    finally:
        snapshots.PostHocSnapshots.save, run_module.AveragingRun.end_epoch, run_module.AveragingRun.finish = original
    return {
        "dataset": dataset_name,
        "parameters": parameters,
        "model_bytes": 4 * parameters,
        "epochs": epochs,
        "train_seconds": round(train_seconds, 2),
        "folder_bytes_after_each_epoch": sizes,
        "snapshot_save_ms_median": round(1000 * statistics.median(saves), 2),
        "epoch_end_ms_median": round(1000 * statistics.median(epoch_ends), 2) if epoch_ends else None,
        "choice_seconds": round(finishes[-1], 3),
        "candidates": len(callback.choice),
    }


def run() -> Dict[str, Any]:
    return {name: measure(name) for name in demo.DATASETS}


if __name__ == "__main__":
    for result in run().values():
        growth = np.diff([0, *result["folder_bytes_after_each_epoch"]])
        print(
            f"{result['dataset']}: {result['parameters']} parameters ({result['model_bytes'] / 1024:.0f} KiB); "
            f"folder after each epoch {[round(size / 1024) for size in result['folder_bytes_after_each_epoch']]} KiB "
            f"(growth {[round(g / 1024) for g in growth]} KiB); snapshot save {result['snapshot_save_ms_median']} ms; "
            f"epoch end {result['epoch_end_ms_median']} ms; choice at the end {result['choice_seconds']} s over "
            f"{result['candidates']} candidates; training {result['train_seconds']} s"
        )
