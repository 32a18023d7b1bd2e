"""Last iterate versus an exponential moving average of the weights, on real CO2 data.

Data: the ``co2`` data set bundled with statsmodels
(``statsmodels.api.datasets.co2``), "Mauna Loa Weekly Atmospheric CO2 Data":
weekly CO2 concentrations (ppmv) at Mauna Loa, March 1958 to December 2001,
2284 weeks, from the Scripps Institution of Oceanography (SIO) CO2 program.
statsmodels' ``COPYRIGHT`` attribute says "This is public domain."; its
``SOURCE`` cites Keeling, C.D. and T.P. Whorf (2004), "Atmospheric CO2
concentrations derived from flask air samples at sites in the SIO network",
Trends: A Compendium of Data on Global Change, CDIAC, Oak Ridge National
Laboratory. Its ``NOTE`` counts 2225 observations: the 59 missing weeks are
filled here by time interpolation. Nothing is downloaded.

Protocol: the last ``windows x 13`` weeks are the test region (rolling,
non-overlapping 13-week forecasts, each from all the data before it); the
model trains only on the weeks before that region. A ``SimpleFeedForward``
estimator is trained twice with the same seeds and settings: once without an
averaging callback (the network keeps its last iterate) and once with
``AveragingCallback.from_config({"type": "exponential", "decay": 0.999})``.

Choices: ``add_default_callbacks=False`` in both runs. Otherwise GluonTS adds
``ModelAveraging(SelectNBestMean(num_models=1))`` to the first run, which then
keeps its best epoch rather than its last iterate, and a learning-rate
schedule driven by losses that differ between the runs. So both runs follow
the same raw trajectory and differ only in the weights kept at the end. No
validation data is passed: with no schedule and no checkpoint selection it
would change nothing but the logs. MASE is scaled by the in-sample one-step
naive error (GluonTS's seasonality for weekly data is 1).

Run ``python examples/gluonts_co2.py`` (or ``make demo``); ``--quick`` is the
tiny setting used by the tests.
"""

import argparse
import contextlib
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

# GluonTS warns at import time that it fell back to the standard json module.
warnings.filterwarnings("ignore", message="Using `json`-module", category=UserWarning)

import mxnet as mx  # noqa: E402 (after the warning filter)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import statsmodels.api as sm  # noqa: E402
from gluonts.dataset.common import ListDataset  # noqa: E402
from gluonts.dataset.split import TestData, TrainingDataset, split  # noqa: E402
from gluonts.dataset.util import to_pandas  # noqa: E402
from gluonts.env import env  # noqa: E402
from gluonts.evaluation import Evaluator  # noqa: E402
from gluonts.model.predictor import Predictor  # noqa: E402
from gluonts.mx import SimpleFeedForwardEstimator, Trainer  # noqa: E402
from gluonts.mx.trainer.callback import Callback  # noqa: E402

import modavg_plugin  # noqa: E402

FREQUENCY = "W-SAT"
PREDICTION_LENGTH = 13
CONTEXT_LENGTH = 52
QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
EMA_CONFIG = {"type": "exponential", "decay": 0.999}


@dataclass(frozen=True)
class RunSettings:
    """How long to train and how many test windows to score."""

    epochs: int
    batches_per_epoch: int
    test_windows: int


FULL_SETTINGS = RunSettings(epochs=40, batches_per_epoch=50, test_windows=4)
QUICK_SETTINGS = RunSettings(epochs=2, batches_per_epoch=5, test_windows=1)


def load_co2_series() -> pd.Series:
    """The weekly Mauna Loa CO2 series, missing weeks filled by time interpolation."""
    data = sm.datasets.co2.load_pandas().data
    return data["co2"].interpolate(method="time").asfreq(FREQUENCY)


def make_datasets(series: pd.Series, test_windows: int) -> Tuple[TrainingDataset, TestData]:
    """Training data before the test region and the rolling test windows."""
    start = pd.Period(series.index[0], freq=FREQUENCY)
    dataset = ListDataset([{"start": start, "target": series.to_numpy()}], freq=FREQUENCY)
    training_data, test_template = split(dataset, offset=-PREDICTION_LENGTH * test_windows)
    return training_data, test_template.generate_instances(PREDICTION_LENGTH, windows=test_windows)


def seed_everything(seed: int) -> None:
    """Seed MXNet (initialisation, sampling) and NumPy (GluonTS's instance sampler)."""
    mx.random.seed(seed)
    np.random.seed(seed)


@contextlib.contextmanager
def quiet_gluonts() -> Iterator[None]:
    """No progress bars and only warnings from GluonTS's loggers, restored on exit."""
    gluonts_logger = logging.getLogger("gluonts")
    level = gluonts_logger.level
    gluonts_logger.setLevel(logging.WARNING)
    try:
        with env._let(use_tqdm=False):
            yield
    finally:
        gluonts_logger.setLevel(level)


def train_predictor(
    training_data: TrainingDataset, settings: RunSettings, seed: int, callbacks: List[Callback]
) -> Tuple[Predictor, float]:
    """Train one SimpleFeedForward model; return it and the training seconds."""
    seed_everything(seed)
    trainer = Trainer(
        epochs=settings.epochs,
        num_batches_per_epoch=settings.batches_per_epoch,
        learning_rate=1e-3,
        hybridize=True,
        callbacks=callbacks,
        add_default_callbacks=False,
    )
    estimator = SimpleFeedForwardEstimator(
        prediction_length=PREDICTION_LENGTH, context_length=CONTEXT_LENGTH, trainer=trainer
    )
    started = time.perf_counter()
    predictor = estimator.train(training_data)
    return predictor, time.perf_counter() - started


def evaluate(predictor: Predictor, test_data: TestData, seed: int) -> Dict[str, float]:
    """MASE and mean weighted quantile loss over all test windows."""
    seed_everything(seed)
    forecasts = list(predictor.predict(test_data.input))
    observed = [
        to_pandas({"start": past["start"], "target": np.concatenate([past["target"], future["target"]])})
        for past, future in test_data
    ]
    evaluator = Evaluator(quantiles=QUANTILES, num_workers=0)
    aggregate_metrics, _ = evaluator(observed, forecasts, num_series=len(forecasts))
    return {"MASE": float(aggregate_metrics["MASE"]), "mean_wQuantileLoss": float(aggregate_metrics["mean_wQuantileLoss"])}


def format_table(results: Dict[int, Dict[str, Dict[str, float]]]) -> str:
    """An aligned text table: one row per seed and method, then mean +- std per method."""
    methods = list(next(iter(results.values())))
    width = max(len("method"), *(len(method) for method in methods))
    header = f"{'seed':>4} | {'method':<{width}} | {'MASE':>15} | {'mean wQL':>17} | {'train s':>7}"
    lines = [header, "-" * len(header)]
    for seed, by_method in results.items():
        for method, metrics in by_method.items():
            lines.append(
                f"{seed:>4} | {method:<{width}} | {metrics['MASE']:>15.3f} | "
                f"{metrics['mean_wQuantileLoss']:>17.5f} | {metrics['train_seconds']:>7.1f}"
            )
    lines.append("-" * len(header))
    for method in methods:
        mase = np.array([results[seed][method]["MASE"] for seed in results])
        loss = np.array([results[seed][method]["mean_wQuantileLoss"] for seed in results])
        seconds = np.mean([results[seed][method]["train_seconds"] for seed in results])
        mase_cell = f"{mase.mean():.3f} +- {mase.std():.3f}"
        loss_cell = f"{loss.mean():.5f} +- {loss.std():.5f}"
        lines.append(f"{'mean':>4} | {method:<{width}} | {mase_cell:>15} | {loss_cell:>17} | {seconds:>7.1f}")
    return "\n".join(lines)


def count_wins(results: Dict[int, Dict[str, Dict[str, float]]], metric: str) -> int:
    """On how many seeds the EMA scored lower than the last iterate."""
    last, averaged = list(next(iter(results.values())))
    return sum(results[seed][averaged][metric] < results[seed][last][metric] for seed in results)


def parse_arguments(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Command-line options: ``--quick`` and ``--seeds``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (2 epochs x 5 batches, 1 window)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train both ways for every seed, print the table and return the settings and metrics."""
    arguments = parse_arguments(argv)
    settings = QUICK_SETTINGS if arguments.quick else FULL_SETTINGS
    training_data, test_data = make_datasets(load_co2_series(), settings.test_windows)
    callbacks: Dict[str, Callable[[], List[Callback]]] = {
        "last iterate": lambda: [],
        "EMA (decay 0.999)": lambda: [modavg_plugin.AveragingCallback.from_config(EMA_CONFIG)],
    }
    results: Dict[int, Dict[str, Dict[str, float]]] = {}
    with quiet_gluonts():
        for seed in arguments.seeds:
            results[seed] = {}
            for method, make_callbacks in callbacks.items():
                predictor, seconds = train_predictor(training_data, settings, seed, make_callbacks())
                results[seed][method] = {**evaluate(predictor, test_data, seed), "train_seconds": seconds}
    print(
        f"data set: statsmodels co2 (weekly Mauna Loa CO2), estimator: SimpleFeedForward, "
        f"epochs: {settings.epochs} x {settings.batches_per_epoch} batches, "
        f"test windows: {settings.test_windows} x {PREDICTION_LENGTH} weeks, seeds: {arguments.seeds}"
    )
    print(format_table(results))
    print(
        f"EMA lower than last iterate on {count_wins(results, 'MASE')} of {len(results)} seeds (MASE), "
        f"{count_wins(results, 'mean_wQuantileLoss')} of {len(results)} (mean wQL)"
    )
    return {"settings": asdict(settings) | {"seeds": arguments.seeds}, "results": results}


if __name__ == "__main__":
    main()
