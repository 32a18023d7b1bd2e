"""The forecasting demo's tables for the site, from the committed ``demo-output/results.json``.

``make demo`` writes that file; the ``{demo-results}`` directive turns it
into Markdown at every build, so the site cannot quote numbers no run produced.
"""

import json
import pathlib
from typing import Any, Dict, List

__all__ = ["RESULTS_PATH", "demo_results"]

RESULTS_PATH = pathlib.Path(__file__).resolve().parents[2] / "demo-output" / "results.json"
METRICS = (("MASE", "MASE", 3), ("sMAPE", "sMAPE", 4), ("mean_wQuantileLoss", "mean wQL", 4))
BASELINE = "last iterate"
WIN_COUNTS = ("seeds_with_lower_MASE", "seeds_no_worse_MASE")


def load_results() -> Dict[str, Any]:
    """The committed results of a full (not ``--quick``) demo run."""
    if not RESULTS_PATH.exists():
        raise ValueError(f"{RESULTS_PATH} is missing: run `make demo` and commit it")
    results = json.loads(RESULTS_PATH.read_text())
    if results["settings"]["quick"]:
        raise ValueError(f"{RESULTS_PATH} comes from a --quick run: run `make demo` for the real numbers")
    return results


def demo_results() -> str:
    """When and where it ran, the settings, then one table per data set."""
    results = load_results()
    measured, settings = results["measured"], results["settings"]
    lines = [
        f"Measured on {measured['date']}: {measured['machine']}, CPython {measured['python']}, "
        f"MXNet {measured['mxnet']}, GluonTS {measured['gluonts']}; {settings['estimator']}, "
        f"{settings['epochs']} epochs x {settings['batches_per_epoch']} batches, Adam at "
        f"{settings['learning_rate']:g}, seeds {', '.join(str(seed) for seed in settings['seeds'])}; "
        f"the whole demo took {measured['wall_seconds'] / 60:.1f} minutes with {measured['workers']} worker processes "
        f'(so "train s", the mean seconds per training run, is with two runs sharing the cores). '
        f"Mean ± standard deviation over the seeds (ddof=1); lower is better for every score.",
    ]
    for dataset, by_method in results["summary"].items():
        lines += ["", *dataset_table(results, dataset, by_method)]
    return "\n".join(lines) + "\n"


def dataset_table(results: Dict[str, Any], dataset: str, by_method: Dict[str, Any]) -> List[str]:
    """A Markdown table of one data set's methods."""
    description = results["datasets"][dataset]
    seeds = len(results["settings"]["seeds"])
    lines = [
        f"**{description['title']}**: {description['windows']} test windows of {description['prediction_length']} "
        f"steps, context {description['context_length']}.",
        "",
        "| method | "
        + " | ".join(label for _, label, _ in METRICS)
        + " | MASE lower than last iterate's | no higher | train s |",
        "|---|" + "---:|" * len(METRICS) + "---:|---:|---:|",
    ]
    for method, scores in by_method.items():
        cells = [f"{scores[key]['mean']:.{digits}f} ± {scores[key]['std']:.{digits}f}" for key, _, digits in METRICS]
        wins = ["", ""] if method == BASELINE else [f"{scores[key]} of {seeds}" for key in WIN_COUNTS]
        lines.append(f"| {method} | " + " | ".join([*cells, *wins]) + f" | {scores['train_seconds']['mean']:.1f} |")
    return lines
