"""The forecasting demo's figures, drawn with matplotlib's Agg backend (no display needed).

* ``validation_loss.png``: per data set, the validation loss after each epoch
  of the raw weights and of the EMA (both measured in the same run by the
  ``"exponential"`` callback with ``compare_raw``), one pair of lines per seed.
* ``forecast_fan.png``: per data set, the first series' last test window:
  the EMA model's 10-90% and 30-70% forecast bands and median, the last
  iterate's median, and what happened.
* ``auto_choice.png``: per data set, what the ``"auto"`` callback measured
  after training: the validation loss of each rebuilt EMA against its width
  (``sigma_rel``), one line per seed, the last iterate's at width 0, and the
  candidate each seed shipped, ringed.
"""

import pathlib
from typing import Any, Dict, List

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd

RAW_COLOUR, EMA_COLOUR = "tab:orange", "tab:blue"


def draw_figures(results: Dict[str, Any], folder: pathlib.Path) -> List[pathlib.Path]:
    """Write both figures into ``folder``; return their paths."""
    figures = [
        draw_validation_loss(results, folder / "validation_loss.png"),
        draw_fans(results, folder / "forecast_fan.png"),
    ]
    if any(run.get("choice") for run in results["runs"]):
        figures.append(draw_auto_choice(results, folder / "auto_choice.png"))
    return figures


def _runs(results: Dict[str, Any], dataset: str, method: str) -> List[Dict[str, Any]]:
    return [run for run in results["runs"] if run["dataset"] == dataset and run["method"] == method]


def draw_validation_loss(results: Dict[str, Any], path: pathlib.Path) -> pathlib.Path:
    """Raw versus EMA validation loss per epoch, one panel per data set."""
    datasets = list(results["datasets"])
    figure, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        for index, run in enumerate(_runs(results, dataset, "EMA")):
            epochs = [entry["epoch_no"] + 1 for entry in run["history"]]
            label = index == 0
            axis.plot(
                epochs,
                [e["raw_validation_loss"] for e in run["history"]],
                color=RAW_COLOUR,
                alpha=0.8,
                label="raw weights" if label else None,
            )
            axis.plot(
                epochs,
                [e["validation_loss"] for e in run["history"]],
                color=EMA_COLOUR,
                alpha=0.8,
                label="EMA (decay 0.999)" if label else None,
            )
        axis.set(title=results["datasets"][dataset]["title"], xlabel="epoch", ylabel="validation loss (NLL)")
        axis.legend()
        axis.grid(alpha=0.3)
    figure.suptitle("Validation loss per epoch, one line per seed: raw weights vs their EMA")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def draw_fans(results: Dict[str, Any], path: pathlib.Path) -> pathlib.Path:
    """Forecast fan of the EMA model and the last iterate's median, one panel per data set."""
    datasets = list(results["datasets"])
    figure, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        averaged = next(run["fan"] for run in _runs(results, dataset, "EMA") if run["fan"])
        last = next(run["fan"] for run in _runs(results, dataset, "last iterate") if run["fan"])
        observed_time = _times(averaged["observed_time"])
        forecast_time = _times(averaged["forecast_time"])
        quantiles = averaged["quantiles"]
        axis.plot(observed_time, averaged["observed"], color="black", label="observed")
        axis.fill_between(
            forecast_time, quantiles["0.1"], quantiles["0.9"], color=EMA_COLOUR, alpha=0.2, label="EMA 10-90%"
        )
        axis.fill_between(
            forecast_time, quantiles["0.3"], quantiles["0.7"], color=EMA_COLOUR, alpha=0.4, label="EMA 30-70%"
        )
        axis.plot(forecast_time, quantiles["0.5"], color=EMA_COLOUR, label="EMA median")
        axis.plot(
            forecast_time, last["quantiles"]["0.5"], color=RAW_COLOUR, linestyle="--", label="last iterate median"
        )
        series = "" if averaged["item_id"] == dataset else f" {averaged['item_id']}"
        axis.set(title=f"{dataset}{series}: last test window, seed {results['settings']['seeds'][0]}")
        axis.legend(fontsize="small")
        axis.grid(alpha=0.3)
    figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _times(periods: List[str]) -> pd.DatetimeIndex:
    """Period strings (``2001-12-23/2001-12-29``, ``2009Q3``) as timestamps at each period's start."""
    return pd.DatetimeIndex(
        [pd.Period(period.split("/")[0] if "/" in period else period).start_time for period in periods]
    )


BEST_EPOCHS_POSITION = 0.3  # where the best epochs' mean is drawn, right of the widest power EMA (0.25)


def _is_best_epochs_mean(entry: Dict[str, Any]) -> bool:
    return entry["sigma_rel"] is None and entry["name"] != "last iterate"


def _choice_position(entry: Dict[str, Any]) -> float:
    if _is_best_epochs_mean(entry):
        return BEST_EPOCHS_POSITION
    return entry["sigma_rel"] or 0.0


def draw_auto_choice(results: Dict[str, Any], path: pathlib.Path) -> pathlib.Path:
    """Validation loss against the averaging width, as the "auto" callback measured it, one line per seed."""
    datasets = list(results["datasets"])
    figure, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        for run in _runs(results, dataset, "auto"):
            points = [(_choice_position(entry), entry) for entry in run["choice"]]
            widths = [(x, entry) for x, entry in points if not _is_best_epochs_mean(entry)]
            line = axis.plot(
                [x for x, _ in widths],
                [entry["validation_loss"] for _, entry in widths],
                marker=".",
                alpha=0.8,
                label=f"seed {run['seed']}",
            )
            color = line[0].get_color()
            for x, entry in points:
                if _is_best_epochs_mean(entry):
                    axis.plot([x], [entry["validation_loss"]], "x", color=color)
                if entry["chosen"]:
                    axis.plot([x], [entry["validation_loss"]], "o", markersize=10, fillstyle="none", color=color)
        axis.set(
            title=results["datasets"][dataset]["title"],
            xlabel="sigma_rel (0: last iterate; x at 0.3: mean of the best epochs' EMAs)",
            ylabel="validation loss (NLL)",
        )
        axis.legend(fontsize="small")
        axis.grid(alpha=0.3)
    figure.suptitle('What "auto" measured after training, and what it shipped (ringed)')
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
