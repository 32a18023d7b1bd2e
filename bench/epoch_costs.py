"""What saving costs per epoch on the demo's networks: checkpoint, resume state, snapshots, and the end.

The demo's setting (``examples/forecasting_demo.py``: SimpleFeedForward on
co2 and macrodata, 50 batches an epoch) with a ``checkpoint_dir``, for two
configurations: the EMA with the mean of the 5 best epochs (a checkpoint and
the resume state every epoch) and ``{"type": "auto"}`` (post-hoc snapshots as
well). Timed from inside, each with ``mx.nd.waitall()`` at both ends: each
epoch end (checkpoint, snapshots, state, pruning), each post-hoc save, and the
end of training (for auto: rebuilding and evaluating every candidate, then
writing the chosen one). Disk: the bytes the folder holds after each epoch.
"""

import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

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


CONFIGS = {
    "EMA + best-5 mean": {"type": "exponential", "decay": 0.999, "avg_strategy": {"type": "mean", "num_models": 5}},
    "auto": {"type": "auto"},
}


def measure(dataset_name: str, method: str, epochs: int = 10, batches: int = 50, seed: int = 0) -> Dict[str, Any]:
    """One run of the demo's setting with ``CONFIGS[method]``, timed and weighed from inside."""
    dataset, splits = demo.DATASETS[dataset_name], demo.make_splits(dataset_name)
    saves, epoch_ends, finishes, sizes = [], [], [], []
    original = (snapshots.PostHocSnapshots.save, run_module.AveragingRun.end_epoch, run_module.AveragingRun.finish)
    snapshots.PostHocSnapshots.save = timed(saves, original[0])
    run_module.AveragingRun.end_epoch = timed(epoch_ends, original[1])
    run_module.AveragingRun.finish = timed(finishes, original[2])
    try:
        with tempfile.TemporaryDirectory() as folder:
            callback = modavg_plugin.AveragingCallback.from_config({**CONFIGS[method], "checkpoint_dir": folder})
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
        "method": method,
        "parameters": parameters,
        "model_bytes": 4 * parameters,
        "epochs": epochs,
        "train_seconds": round(train_seconds, 2),
        "folder_bytes_after_each_epoch": sizes,
        "snapshot_save_ms_median": round(1000 * statistics.median(saves), 2) if saves else None,
        "epoch_end_ms_median": round(1000 * statistics.median(epoch_ends), 2),
        "finish_seconds": round(finishes[-1], 3),
        "candidates": len(callback.choice),
    }


def run(epochs: int = 10, batches: int = 50) -> List[Dict[str, Any]]:
    """Every data set of the demo under every configuration."""
    return [measure(name, method, epochs, batches) for name in demo.DATASETS for method in CONFIGS]


def format_table(rows: List[Dict[str, Any]]) -> str:
    """One line per data set and configuration."""
    lines = []
    for row in rows:
        growth = np.diff([0, *row["folder_bytes_after_each_epoch"]]) / 1024
        snapshot = (
            "" if row["snapshot_save_ms_median"] is None else f"; snapshot save {row['snapshot_save_ms_median']} ms"
        )
        lines.append(
            f"{row['dataset']}, {row['method']}: model {row['model_bytes'] / 1024:.0f} KiB; epoch end "
            f"{row['epoch_end_ms_median']} ms{snapshot}; folder {growth[0]:.0f} KiB after the first epoch, then "
            f"+{growth[1:].min():.0f} to +{growth[1:].max():.0f} KiB an epoch, {row['folder_bytes_after_each_epoch'][-1] / 1024:.0f} "
            f"KiB after {row['epochs']}; end of "
            f"training {row['finish_seconds']} s" + (f" ({row['candidates']} candidates)" if row["candidates"] else "")
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(run()))
