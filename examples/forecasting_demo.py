"""Does weight averaging help a GluonTS forecaster? Five ways to pick the shipped weights, two real data sets.

Data (both bundled with statsmodels, public domain; nothing is downloaded):

* ``co2``: "Mauna Loa Weekly Atmospheric CO2 Data", weekly CO2 (ppmv) at
  Mauna Loa, March 1958 to December 2001 (2284 weeks; statsmodels' ``NOTE``
  counts 2225 observations, the 59 missing weeks are filled by time
  interpolation). Source: Keeling, C.D. and T.P. Whorf (2004), Scripps
  Institution of Oceanography CO2 program, CDIAC. statsmodels' ``COPYRIGHT``:
  "This is public domain."
* ``macrodata``: "US Macroeconomic Data for 1959Q1 - 2009Q3" (203 quarters),
  compiled by Skipper Seabold from FRED (Federal Reserve Bank of St. Louis)
  and the Bureau of Labor Statistics; seven level series are forecast jointly
  (real GDP, consumption, investment, government spending, disposable income,
  CPI, M1). statsmodels' ``COPYRIGHT``: "This is public domain."

Protocol, per data set: the last ``windows x prediction_length`` steps are
the test region (rolling, non-overlapping forecasts, each conditioned on all
the data before it); the ``windows`` windows before that are the validation
region (GluonTS's validation loss: one window at the end of each truncated
copy of the series); the model trains on what is left. A
``SimpleFeedForwardEstimator`` is trained once per method and seed, with the
same seed, settings and validation data, so the five runs of a seed follow
the same raw trajectory and differ only in the weights kept at the end:

* last iterate: no averaging callback;
* EMA: the ``"exponential"`` callback, ``decay=0.999``;
* EMA + best-5 mean: the same, then the mean of the 5 per-epoch EMAs with the
  lowest validation loss (``SelectNBestMean``);
* checkpoint mean: no EMA, the mean of the 5 raw epoch checkpoints with the
  lowest validation loss (``"checkpoints"``, like GluonTS's ``ModelAveraging``);
* auto: ``{"type": "auto"}``, the averaging chosen after training on the
  validation data (:mod:`modavg_plugin.auto`).

A sixth row is derived from the runs, not trained: "raw or EMA by
validation", the last iterate's or the EMA's run, whichever had the lower
validation loss at the last epoch (the plain two-way choice).

``add_default_callbacks=False`` everywhere: otherwise GluonTS adds its own
best-epoch reload to the baseline and a learning-rate schedule driven by
losses that differ between runs. Scores come from GluonTS's ``Evaluator`` on
the test windows: MASE (scaled by the in-sample seasonal naive error;
seasonality 1 for weekly data, 4 for quarterly), sMAPE and the mean weighted
quantile loss over the quantiles 0.1 to 0.9.

Run ``python examples/forecasting_demo.py`` (what ``make demo`` does); it
prints the table, writes ``demo-output/results.json`` and the figures. Runs
go to ``--workers`` processes (default 2). ``--quick`` is the tiny setting
used by the tests.
"""

import argparse
import datetime
import functools
import json
import logging
import multiprocessing
import os
import pathlib
import platform
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

# GluonTS warns at import time that it fell back to the standard json module, and
# pandas 2.2+ warns inside GluonTS that the frequency names "Q" and "Q-DEC" will change.
warnings.filterwarnings("ignore", message="Using `json`-module", category=UserWarning)
warnings.filterwarnings("ignore", message="'Q(-DEC)?' is deprecated", category=FutureWarning)

import gluonts  # noqa: E402 (after the warning filter)
import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import statsmodels.api as sm  # noqa: E402
from demo_figures import draw_figures  # noqa: E402 (examples/demo_figures.py, next to this script)
from gluonts.dataset.common import ListDataset  # noqa: E402
from gluonts.dataset.split import TestData, split  # noqa: E402
from gluonts.dataset.util import to_pandas  # noqa: E402
from gluonts.env import env  # noqa: E402
from gluonts.evaluation import Evaluator  # noqa: E402
from gluonts.model.forecast import Forecast  # noqa: E402
from gluonts.mx import SimpleFeedForwardEstimator, Trainer  # noqa: E402
from tqdm import tqdm  # noqa: E402

import modavg_plugin  # noqa: E402

QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
METRICS = ("MASE", "sMAPE", "mean_wQuantileLoss")
EMA = {"type": "exponential", "decay": 0.999}
METHODS: Dict[str, Optional[Dict[str, Any]]] = {
    "last iterate": None,
    "EMA": EMA,
    "EMA + best-5 mean": {**EMA, "avg_strategy": {"type": "mean", "num_models": 5}},
    "checkpoint mean": {"type": "checkpoints", "avg_strategy": {"type": "mean", "num_models": 5}},
    "auto": {"type": "auto"},
}
TWO_WAY = "raw or EMA by validation"
"""Not trained: per seed, the last iterate's or the EMA's scores, whichever had the lower final validation loss."""
BASELINE = "last iterate"
MACRO_SERIES = ("realgdp", "realcons", "realinv", "realgovt", "realdpi", "cpi", "m1")


@dataclass(frozen=True)
class DataSet:
    """A bundled data set and how it is forecast."""

    name: str
    title: str
    source: str
    frequency: str
    prediction_length: int
    context_length: int
    windows: int

    def load(self) -> pd.DataFrame:
        """One column per series, indexed by period."""
        return LOADERS[self.name]()


@dataclass(frozen=True)
class Settings:
    """How long each run trains, and on which seeds."""

    epochs: int
    batches_per_epoch: int
    learning_rate: float
    seeds: Tuple[int, ...]


@dataclass(frozen=True)
class Job:
    """One training run."""

    dataset: str
    method: str
    seed: int
    settings: Settings


def load_co2() -> pd.DataFrame:
    """The weekly Mauna Loa series, missing weeks filled by time interpolation."""
    data = sm.datasets.co2.load_pandas().data
    series = data["co2"].interpolate(method="time").asfreq("W-SAT")
    return series.to_frame().set_axis(series.index.to_period("W-SAT"))


def load_macrodata() -> pd.DataFrame:
    """Seven quarterly US level series, 1959Q1 to 2009Q3."""
    data = sm.datasets.macrodata.load_pandas().data
    index = pd.period_range("1959Q1", periods=len(data), freq="Q")
    return data[list(MACRO_SERIES)].set_axis(index)


LOADERS: Dict[str, Callable[[], pd.DataFrame]] = {"co2": load_co2, "macrodata": load_macrodata}
DATASETS = {
    "co2": DataSet(
        "co2",
        "statsmodels co2: weekly Mauna Loa CO2, 1958-2001, 1 series",
        "Scripps CO2 program (Keeling and Whorf 2004), public domain",
        "W-SAT",
        prediction_length=13,
        context_length=52,
        windows=4,
    ),
    "macrodata": DataSet(
        "macrodata",
        "statsmodels macrodata: US quarterly, 1959-2009, 7 series",
        "FRED and BLS, compiled by Skipper Seabold, public domain",
        "Q",
        prediction_length=8,
        context_length=16,
        windows=2,
    ),
}
FULL = Settings(epochs=40, batches_per_epoch=50, learning_rate=1e-3, seeds=(0, 1, 2, 3, 4))
QUICK = Settings(epochs=2, batches_per_epoch=5, learning_rate=1e-3, seeds=(0,))


# Data -------------------------------------------------------------------------


@dataclass(frozen=True)
class Splits:
    """Training series, validation series (one per window) and the rolling test windows."""

    training: ListDataset
    validation: ListDataset
    test: TestData


def entries(frame: pd.DataFrame, end: int) -> List[Dict[str, Any]]:
    """Each column as a GluonTS entry, cut after its first ``end`` values."""
    return [{"start": frame.index[0], "target": frame[column].to_numpy()[:end], "item_id": column} for column in frame]


@functools.lru_cache(maxsize=None)
def make_splits(name: str) -> Splits:
    """Train / validation / test as in the module docstring."""
    dataset = DATASETS[name]
    frame = dataset.load()
    region = dataset.windows * dataset.prediction_length
    training_end = len(frame) - 2 * region
    validation_ends = [training_end + (window + 1) * dataset.prediction_length for window in range(dataset.windows)]
    whole = ListDataset(entries(frame, len(frame)), freq=dataset.frequency)
    _, test_template = split(whole, offset=-region)
    return Splits(
        training=ListDataset(entries(frame, training_end), freq=dataset.frequency),
        validation=ListDataset(
            [entry for end in validation_ends for entry in entries(frame, end)], freq=dataset.frequency
        ),
        test=test_template.generate_instances(dataset.prediction_length, windows=dataset.windows),
    )


# One run ----------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed MXNet (initialisation, sampling) and NumPy (GluonTS's instance sampler)."""
    mx.random.seed(seed)
    np.random.seed(seed)


def run_job(job: Job) -> Dict[str, Any]:
    """Train, evaluate on the test windows; scores, timing, per-epoch history and a fan chart's data."""
    logging.getLogger("gluonts").setLevel(logging.WARNING)
    dataset, splits, config = DATASETS[job.dataset], make_splits(job.dataset), METHODS[job.method]
    callbacks = [] if config is None else [modavg_plugin.AveragingCallback.from_config(config)]
    trainer = Trainer(
        epochs=job.settings.epochs,
        num_batches_per_epoch=job.settings.batches_per_epoch,
        learning_rate=job.settings.learning_rate,
        hybridize=True,
        callbacks=callbacks,
        add_default_callbacks=False,
    )
    estimator = SimpleFeedForwardEstimator(
        prediction_length=dataset.prediction_length, context_length=dataset.context_length, trainer=trainer
    )
    seed_everything(job.seed)
    started = time.perf_counter()
    with env._let(use_tqdm=False):
        predictor = estimator.train(splits.training, validation_data=splits.validation)
    train_seconds = time.perf_counter() - started
    seed_everything(job.seed)
    forecasts = list(predictor.predict(splits.test.input))
    return {
        "dataset": job.dataset,
        "method": job.method,
        "seed": job.seed,
        **evaluate(splits.test, forecasts, dataset.frequency),
        "train_seconds": round(train_seconds, 2),
        "history": callbacks[0].history if callbacks else [],
        "choice": callbacks[0].choice if callbacks else [],
        "fan": fan_data(splits.test, forecasts, dataset.prediction_length)
        if job.seed == job.settings.seeds[0]
        else None,
    }


def observed_series(test: TestData) -> List[pd.Series]:
    """Each test window's past and future, as one series."""
    return [
        to_pandas({"start": past["start"], "target": np.concatenate([past["target"], future["target"]])})
        for past, future in test
    ]


def evaluate(test: TestData, forecasts: List[Forecast], frequency: str) -> Dict[str, float]:
    """GluonTS's aggregate MASE, sMAPE and mean weighted quantile loss over every test window."""
    evaluator = Evaluator(quantiles=QUANTILES, num_workers=0)
    with env._let(use_tqdm=False):
        aggregate, _ = evaluator(observed_series(test), forecasts, num_series=len(forecasts))
    return {metric: float(aggregate[metric]) for metric in METRICS}


def fan_data(test: TestData, forecasts: List[Forecast], prediction_length: int) -> Dict[str, Any]:
    """The first series' last test window: recent history, what happened, and the forecast quantiles."""
    window = max(index for index, forecast in enumerate(forecasts) if forecast.item_id == forecasts[0].item_id)
    forecast, series = forecasts[window], observed_series(test)[window]
    shown = series.iloc[-4 * prediction_length :]
    return {
        "item_id": forecast.item_id,
        "observed_time": [str(period) for period in shown.index],
        "observed": shown.to_numpy().tolist(),
        "forecast_time": [str(period) for period in forecast.index],
        "quantiles": {str(level): forecast.quantile(level).tolist() for level in (0.1, 0.3, 0.5, 0.7, 0.9)},
    }


# All runs ---------------------------------------------------------------------


def make_jobs(settings: Settings) -> List[Job]:
    """Every data set x seed x method, methods of one seed together."""
    return [
        Job(dataset, method, seed, settings) for dataset in DATASETS for seed in settings.seeds for method in METHODS
    ]


def run_all(jobs: Sequence[Job], workers: int) -> List[Dict[str, Any]]:
    """Run ``jobs`` (in ``workers`` processes when more than one) behind a progress bar."""
    progress = tqdm(total=len(jobs), desc="training runs", unit="run")
    try:
        if workers <= 1:
            return [_advance(progress, run_job(job)) for job in jobs]
        # spawn, not fork: MXNet's engine threads do not survive a fork.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return [_advance(progress, outcome) for outcome in pool.map(run_job, jobs)]
    finally:
        progress.close()


def _advance(progress: tqdm, outcome: Dict[str, Any]) -> Dict[str, Any]:
    progress.set_postfix_str(f"{outcome['dataset']}, {outcome['method']}, seed {outcome['seed']}", refresh=False)
    progress.update()
    return outcome


def two_way_choices(runs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The plain two-way choice, per data set and seed: the raw weights or the fixed EMA, whichever had the lower
    validation loss after the last epoch (the EMA run measures both on the same raw trajectory)."""
    by_key = {(run["dataset"], run["method"], run["seed"]): run for run in runs}
    derived = []
    for (dataset, method, seed), run in sorted(by_key.items()):
        if method != "EMA" or not run["history"]:
            continue
        last = run["history"][-1]
        picked = run if last["validation_loss"] <= last["raw_validation_loss"] else by_key[(dataset, BASELINE, seed)]
        derived.append({**picked, "method": TWO_WAY, "history": [], "fan": None, "picked": picked["method"]})
    return derived


def summarise(runs: Iterable[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Per data set and method: mean and sample standard deviation (ddof=1; 0 for one seed) over
    seeds, and on how many seeds the MASE was lower than the last iterate's, or no higher."""
    grouped: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for run in runs:
        grouped.setdefault((run["dataset"], run["method"]), []).append(run)
    summary: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for (dataset, method), group in grouped.items():
        baseline = {run["seed"]: run["MASE"] for run in grouped[(dataset, BASELINE)]}
        summary.setdefault(dataset, {})[method] = {
            **{metric: _mean_and_std([run[metric] for run in group]) for metric in (*METRICS, "train_seconds")},
            "seeds_with_lower_MASE": sum(run["MASE"] < baseline[run["seed"]] for run in group),
            "seeds_no_worse_MASE": sum(run["MASE"] <= baseline[run["seed"]] for run in group),
        }
    return summary


def _mean_and_std(values: Sequence[float]) -> Dict[str, float]:
    spread = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": spread}


# Report -----------------------------------------------------------------------


def format_tables(results: Dict[str, Any]) -> str:
    """One aligned table per data set: mean +- std over seeds, and wins over the last iterate."""
    lines: List[str] = []
    for dataset, by_method in results["summary"].items():
        lines += ["", f"{DATASETS[dataset].title} ({len(results['settings']['seeds'])} seeds)"]
        header = f"{'method':<24} | {'MASE':>15} | {'sMAPE':>17} | {'mean wQL':>17} | {'train s':>7} | MASE vs last iterate: lower, no higher"
        lines += [header, "-" * len(header)]
        for method, scores in by_method.items():
            cells = [_cell(scores[metric], digits) for metric, digits in zip(METRICS, (3, 4, 4))]
            seeds = len(results["settings"]["seeds"])
            won = "" if method == BASELINE else _wins(scores, seeds)
            lines.append(
                f"{method:<24} | {cells[0]:>15} | {cells[1]:>17} | {cells[2]:>17} | "
                f"{scores['train_seconds']['mean']:>7.1f} | {won}"
            )
    return "\n".join(lines[1:])


def _wins(scores: Dict[str, Any], seeds: int) -> str:
    return f"{scores['seeds_with_lower_MASE']} of {seeds}, {scores['seeds_no_worse_MASE']} of {seeds}"


def _cell(score: Dict[str, float], digits: int) -> str:
    return f"{score['mean']:.{digits}f} +- {score['std']:.{digits}f}"


def machine_description() -> str:
    """CPU model and core count, from /proc/cpuinfo where there is one."""
    model = platform.processor() or platform.machine()
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores"


def parse_arguments(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (2 epochs x 5 batches, seed 0)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2 3 4; --quick: 0)")
    parser.add_argument("--workers", type=int, default=2, help="training processes (default 2; 1: this process)")
    parser.add_argument("--output", default="demo-output", help="folder for results.json and the figures")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run every job, print the tables, write results.json and the figures; return the results."""
    arguments = parse_arguments(argv)
    settings = QUICK if arguments.quick else FULL
    if arguments.seeds:
        settings = Settings(settings.epochs, settings.batches_per_epoch, settings.learning_rate, tuple(arguments.seeds))
    started = time.perf_counter()
    runs = run_all(make_jobs(settings), arguments.workers)
    runs += two_way_choices(runs)
    results = {
        "measured": {
            "date": datetime.date.today().isoformat(),
            "machine": machine_description(),
            "python": platform.python_version(),
            "mxnet": mx.__version__,
            "gluonts": gluonts.__version__,
            "workers": arguments.workers,
            "wall_seconds": round(time.perf_counter() - started, 1),
        },
        "settings": {
            **asdict(settings),
            "quick": arguments.quick,
            "estimator": "SimpleFeedForward",
            "methods": METHODS,
        },
        "datasets": {name: asdict(dataset) for name, dataset in DATASETS.items()},
        "summary": summarise(runs),
        "runs": runs,
    }
    output = pathlib.Path(arguments.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    figures = draw_figures(results, output)
    print(format_tables(results))
    print(f"\nwrote {output / 'results.json'} and {', '.join(str(path) for path in figures)}")
    return results


if __name__ == "__main__":
    main()
