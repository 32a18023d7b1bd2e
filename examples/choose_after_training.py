"""Choose the EMA length after training: post-hoc EMA and a greedy soup from one GluonTS run.

One ``SimpleFeedForwardEstimator`` trains once on the weekly Mauna Loa CO2
series bundled with statsmodels, split as in ``examples/forecasting_demo.py``
(whose data preparation and scoring this script imports): the last 4 windows
of 13 weeks are the test region, the 4 windows before them the validation
region, the model trains on what is left. The ``"moving_average"`` callback

* tracks a power-function EMA of ``sigma_rel`` 0.08 (Karras et al., 2024),
  validates with it and saves it after every epoch;
* with ``posthoc``, also tracks power EMAs of ``sigma_rel`` 0.05 and 0.10 and
  saves both after every epoch into ``{checkpoint folder}/posthoc``;
* with ``avg_strategy`` ``"greedy"``, ends with a greedy soup (Wortsman et
  al., 2022) of the 5 per-epoch 0.08 averages with the lowest validation
  loss: tried best first, each kept only if the mean with it has a lower
  validation loss.

After training, ``modavg_plugin.reconstruct_posthoc`` rebuilds from the saved
snapshots the power EMA of each ``sigma_rel`` in 0.02, 0.03, 0.05, 0.08,
0.10, 0.15 and 0.20 (least-squares combinations; ``residual`` bounds the
error: see the README). Each is loaded into a copy of the trained
predictor and scored with GluonTS's ``Evaluator`` (MASE and mean weighted
quantile loss) on the validation windows and on the test windows; so are
the last raw iterate (from the resume state the callback saves after each
epoch), the 0.08 average the callback tracked (the rebuilt 0.08 should score
the same), and the greedy soup the trained predictor holds. The script then
says which ``sigma_rel`` the validation windows pick (lowest validation
MASE) and how that choice scores on the test windows: the EMA length is
chosen after training, without training again for each candidate.

The validation scores of the picked width and of the soup are optimistic
(both were chosen on those windows); the test scores are the honest ones.
Every forecast is sampled with the same seed, so rows differ only by weights.

Run ``.venv/bin/python examples/choose_after_training.py`` (about 25 s on
2 cores, 17 of them training); ``--epochs``, ``--batches`` and ``--seed``
change the run, ``--output FOLDER`` keeps the checkpoints and snapshots in a
new or empty folder (default: a temporary folder, removed at the end),
``--quick`` is the tiny setting the tests run (3 epochs x 5 batches). The
library logs a warning for each width whose residual is above 0.1 (in
``--quick``, most of them).
"""

import argparse
import copy
import logging
import os
import pathlib
import sys
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # forecasting_demo, also when imported by path

import forecasting_demo as demo
import mxnet as mx
import numpy as np
from gluonts.dataset.common import ListDataset
from gluonts.dataset.split import TestData, split
from gluonts.env import env
from gluonts.model.predictor import Predictor
from gluonts.mx import SimpleFeedForwardEstimator, Trainer

import modavg_plugin

DATASET = demo.DATASETS["co2"]
TRACKED_SIGMA_REL = 0.08
SNAPSHOT_SIGMA_RELS = (0.05, 0.10)
SIGMA_RELS = (0.02, 0.03, 0.05, 0.08, 0.10, 0.15, 0.20)
SOUP_CANDIDATES = 5
STATE_FILE = "averaging-state.params"  # the callback's resume state: raw weights as "raw:NAME" arrays
FULL_EPOCHS, FULL_BATCHES = 30, 50
QUICK_EPOCHS, QUICK_BATCHES = 3, 5


def callback_config(folder: str) -> Dict[str, Any]:
    """The ``"moving_average"`` callback: tracked power EMA, post-hoc snapshots, greedy soup at the end."""
    return {
        "type": "moving_average",
        "average": {"type": "power", "sigma_rel": TRACKED_SIGMA_REL},
        "checkpoint_dir": folder,
        "posthoc": {"sigma_rels": list(SNAPSHOT_SIGMA_RELS), "every_epochs": 1},
        "avg_strategy": {"type": "greedy", "num_models": SOUP_CANDIDATES},
    }


def validation_windows() -> TestData:
    """The validation region as rolling forecast windows, each conditioned on all the data before it.

    The same weeks as the validation data the trainer sees (``demo.make_splits``),
    cut into windows as the demo cuts the test region.
    """
    frame = DATASET.load()
    region = DATASET.windows * DATASET.prediction_length
    until_test = ListDataset(demo.entries(frame, len(frame) - region), freq=DATASET.frequency)
    _, template = split(until_test, offset=-region)
    return template.generate_instances(DATASET.prediction_length, windows=DATASET.windows)


def train(folder: str, epochs: int, batches: int, seed: int) -> Tuple[Predictor, Any]:
    """One training run; the predictor (holding the greedy soup) and the callback."""
    callback = modavg_plugin.AveragingCallback.from_config(callback_config(folder))
    trainer = Trainer(
        epochs=epochs,
        num_batches_per_epoch=batches,
        learning_rate=demo.FULL.learning_rate,
        hybridize=True,
        callbacks=[callback],
        add_default_callbacks=False,
    )
    estimator = SimpleFeedForwardEstimator(
        prediction_length=DATASET.prediction_length, context_length=DATASET.context_length, trainer=trainer
    )
    splits = demo.make_splits(DATASET.name)
    demo.seed_everything(seed)
    with env._let(use_tqdm=False):
        predictor = estimator.train(splits.training, validation_data=splits.validation)
    return predictor, callback


def score(predictor: Predictor, windows: TestData, seed: int) -> Dict[str, float]:
    """MASE and mean wQL on ``windows``, forecasts sampled with ``seed`` (as the demo scores)."""
    demo.seed_everything(seed)
    forecasts = list(predictor.predict(windows.input))
    return demo.evaluate(windows, forecasts, DATASET.frequency)


def soup_trials(trials: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """The greedy soup's candidates in the order tried: epoch, score, kept."""
    return [{"epoch": trial["epoch_no"], "score": trial["score"], "kept": trial["kept"]} for trial in trials]


def last_iterate(folder: str) -> Dict[str, mx.nd.NDArray]:
    """The raw weights after the last epoch, from the resume state the callback saves in ``folder`` each epoch."""
    saved = mx.nd.load(os.path.join(folder, STATE_FILE))
    return {name[len("raw:") :]: value for name, value in saved.items() if name.startswith("raw:")}


def largest_difference(first: Mapping[str, mx.nd.NDArray], second: Mapping[str, mx.nd.NDArray]) -> float:
    """The largest element-wise absolute difference between two sets of arrays with the same names."""
    return max(float(np.abs(first[name].asnumpy() - second[name].asnumpy()).max()) for name in first)


def parse_arguments(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=FULL_EPOCHS, help=f"training epochs (default {FULL_EPOCHS})")
    parser.add_argument("--batches", type=int, default=FULL_BATCHES, help=f"batches per epoch (default {FULL_BATCHES})")
    parser.add_argument("--seed", type=int, default=0, help="seed for MXNet and NumPy (default 0)")
    parser.add_argument(
        "--quick", action="store_true", help=f"tiny setting: {QUICK_EPOCHS} epochs x {QUICK_BATCHES} batches"
    )
    parser.add_argument(
        "--output", help="new or empty folder for the checkpoints and snapshots, kept (default: a temporary one)"
    )
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.epochs, arguments.batches = QUICK_EPOCHS, QUICK_BATCHES
    if arguments.epochs < 1 or arguments.batches < 1:
        parser.error("--epochs and --batches must be at least 1")
    if arguments.output and os.path.isdir(arguments.output) and os.listdir(arguments.output):
        # reconstruct_posthoc reads every snapshot in the folder: an earlier run's would be mixed with this run's
        parser.error(f"--output {arguments.output} is not empty; give a new or empty folder")
    return arguments


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train once, rebuild and score the post-hoc EMAs, print the table; return what it shows."""
    arguments = parse_arguments(argv)
    logging.getLogger("gluonts").setLevel(logging.WARNING)  # as the demo: GluonTS's INFO lines off, warnings on
    with tempfile.TemporaryDirectory(prefix="choose-after-training-") as temporary:
        return run(arguments.output or temporary, arguments)


def run(folder: str, arguments: argparse.Namespace) -> Dict[str, Any]:
    """:func:`main` once the checkpoint folder is chosen."""
    started = time.perf_counter()
    predictor, callback = train(folder, arguments.epochs, arguments.batches, arguments.seed)
    train_seconds = time.perf_counter() - started
    windows = {"validation": validation_windows(), "test": demo.make_splits(DATASET.name).test}
    copied = copy.deepcopy(predictor)  # the trained predictor keeps the soup; the copy takes each candidate in turn

    def row(
        weights: str,
        arrays: Optional[Mapping[str, mx.nd.NDArray]],
        sigma_rel: Optional[float] = None,
        residual: Optional[float] = None,
    ) -> Dict[str, Any]:
        """Score ``arrays`` in the copy (``None``: the trained predictor as it is) on both regions."""
        if arrays is not None:
            modavg_plugin.load_weights(copied.prediction_net, arrays)
        scored = predictor if arrays is None else copied
        scores = {region: score(scored, data, arguments.seed) for region, data in windows.items()}
        return {"weights": weights, "sigma_rel": sigma_rel, "residual": residual, **scores}

    rows, rebuilt, snapshots = [], {}, os.path.join(folder, "posthoc")
    for sigma_rel in SIGMA_RELS:
        rebuilt[sigma_rel], plan = modavg_plugin.reconstruct_posthoc(snapshots, sigma_rel=sigma_rel)
        rows.append(row("post-hoc EMA, rebuilt", rebuilt[sigma_rel], sigma_rel, plan.residual))
    tracked = callback.moving_average.shadows  # the callback's own 0.08 average after the last step
    rows.append(row("last raw iterate", last_iterate(folder)))
    rows.append(row("power EMA, tracked", tracked, TRACKED_SIGMA_REL))
    rows.append(row("greedy soup (trained predictor)", None))
    outcome = {
        "epochs": arguments.epochs,
        "batches": arguments.batches,
        "seed": arguments.seed,
        "train_seconds": train_seconds,
        "rows": rows,
        "soup_trials": soup_trials(callback.avg_strategy.trials),
        "picked": min(rows[: len(SIGMA_RELS)], key=lambda candidate: candidate["validation"]["MASE"]),
        "best_on_test": min(rows[: len(SIGMA_RELS)], key=lambda candidate: candidate["test"]["MASE"]),
        "largest_difference": largest_difference(rebuilt[TRACKED_SIGMA_REL], tracked),
    }
    print_report(outcome)
    return outcome


def print_report(outcome: Mapping[str, Any]) -> None:
    """The table and what it says."""
    rows, epochs, batches = outcome["rows"], outcome["epochs"], outcome["batches"]
    print(
        f"{DATASET.title}: SimpleFeedForward, {epochs} epochs x {batches} batches ({epochs * batches} steps, "
        f"trained in {outcome['train_seconds']:.1f} s), seed {outcome['seed']}; "
        f"{DATASET.windows} validation and {DATASET.windows} test windows of {DATASET.prediction_length} weeks"
    )
    widths = " and ".join(f"{sigma_rel:g}" for sigma_rel in SNAPSHOT_SIGMA_RELS)
    count = len(SNAPSHOT_SIGMA_RELS) * epochs
    print(f"post-hoc snapshots: power EMAs of sigma_rel {widths} after every epoch ({count} snapshots)")
    print("lower scores are better; wQL: mean weighted quantile loss, quantiles 0.1 to 0.9\n")
    width = max(len(row["weights"]) for row in rows)
    header = (
        f"{'weights':<{width}} | {'sigma_rel':>9} | {'residual':>8} | {'val MASE':>9} | {'val wQL':>8} | "
        f"{'test MASE':>9} | {'test wQL':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        sigma_rel = "" if row["sigma_rel"] is None else f"{row['sigma_rel']:.2f}"
        residual = "" if row["residual"] is None else f"{row['residual']:.4f}"
        validation, test = row["validation"], row["test"]
        print(
            f"{row['weights']:<{width}} | {sigma_rel:>9} | {residual:>8} | {validation['MASE']:>9.4f} | "
            f"{validation['mean_wQuantileLoss']:>8.6f} | {test['MASE']:>9.4f} | {test['mean_wQuantileLoss']:>8.6f}"
        )
    trials = outcome["soup_trials"]
    tried = ", ".join(f"{trial['epoch']} ({'kept' if trial['kept'] else 'rejected'})" for trial in trials)
    kept = ", ".join(str(trial["epoch"]) for trial in trials if trial["kept"])
    print(f"\ngreedy soup: candidate epochs tried best first: {tried}; the predictor holds the mean of epochs {kept}")
    residual = rows[SIGMA_RELS.index(TRACKED_SIGMA_REL)]["residual"]
    print(
        f"rebuilt against tracked {TRACKED_SIGMA_REL:.2f}: largest element-wise difference "
        f"{outcome['largest_difference']:.2g} (residual {residual:.4f})"
    )
    picked, best = outcome["picked"], outcome["best_on_test"]
    print(
        f"validation picks sigma_rel {picked['sigma_rel']:.2f} (validation MASE {picked['validation']['MASE']:.4f}): "
        f"test MASE {picked['test']['MASE']:.4f}, test wQL {picked['test']['mean_wQuantileLoss']:.6f}; "
        f"lowest test MASE: sigma_rel {best['sigma_rel']:.2f} ({best['test']['MASE']:.4f})"
    )


if __name__ == "__main__":
    main()
