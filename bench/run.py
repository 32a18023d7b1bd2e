"""``make bench``: every benchmark side by side in one run; prints tables, writes results.json.

Run as ``python -m bench.run`` from the repository root (``--quick`` for a
short smoke run).
"""

import argparse
import datetime
import json
import logging
import os
import platform
import warnings
from typing import Any, Dict, List, Optional, Sequence

warnings.filterwarnings("ignore", message="Using `json`-module", category=UserWarning)

import mxnet as mx  # noqa: E402 (after the warning filter)

from . import checkpoint_averaging, ema_update, training_overhead  # noqa: E402

RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json")


def machine() -> Dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": checkpoint_averaging.processor_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "mxnet": mx.__version__,
    }


def row_for(rows: List[Dict[str, Any]], **match: Any) -> Dict[str, Any]:
    return next(row for row in rows if all(row[key] == value for key, value in match.items()))


def targets(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met."""
    resnet = row_for(results["ema_update"], parameter_set="ResNet-50")
    tiny = row_for(results["ema_update"], parameter_set="2,000 tiny tensors")
    overhead = results["training_overhead"]
    averaging = results["checkpoint_averaging"]["rows"]
    count = 8 if any(row["checkpoints"] == 8 for row in averaging) else max(row["checkpoints"] for row in averaging)
    applied = row_for(averaging, checkpoints=count, method="modavg_plugin")
    streamed = row_for(averaging, checkpoints=count, method="modavg_plugin (no write)")
    checks = [
        ("ResNet-50 EMA update / NumPy floor", resnet["modavg_vs_floor"], "<=", 2.5),
        ("ResNet-50 per-parameter loop / EMA update", resnet["speedup_vs_loop"], ">=", 6.0),
        ("2,000 tiny tensors: per-parameter loop / EMA update", tiny["speedup_vs_loop"], ">=", 30.0),
        ("DeepAR per-batch overhead, percent", overhead["overhead_percent"], "<=", 3.0),
        (
            f"averaging {count} checkpoints (apply): extra peak, model sizes",
            applied["extra_peak_model_sizes"],
            "<=",
            3.0,
        ),
        (f"averaging {count} checkpoints (no write): time / bare read", streamed["time_vs_bare_read"], "<=", 1.5),
    ]
    return [
        {
            "target": name,
            "measured": value,
            "bound": f"{sign} {bound}",
            "met": value <= bound if sign == "<=" else value >= bound,
        }
        for name, value, sign, bound in checks
    ]


def apply_note(results: Dict[str, Any]) -> str:
    """``apply`` also writes the average durably, which a bare read does not: reported, not a target."""
    rows = [row for row in results["checkpoint_averaging"]["rows"] if row["method"] == "modavg_plugin"]
    ratios = ", ".join(f"N={row['checkpoints']}: {row['time_vs_bare_read']:.2f}x" for row in rows)
    return f"info     apply (average + temporary file, fsync, rename) / bare read: {ratios}"


def parse_arguments(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, small runs (a smoke test)")
    parser.add_argument("--output", default=RESULTS_PATH, help="where to write the JSON results")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    arguments = parse_arguments(argv)
    logging.getLogger("gluonts").setLevel(logging.WARNING)
    quick = arguments.quick
    results: Dict[str, Any] = {"machine": machine(), "quick": quick}
    # checkpoint averaging first, before the other benchmarks churn gigabytes of memory in this process
    results["checkpoint_averaging"] = checkpoint_averaging.run(
        counts=(2,) if quick else (5, 8, 10), repeats=1 if quick else 5
    )
    print(checkpoint_averaging.format_table(results["checkpoint_averaging"]), flush=True)
    data = training_overhead.co2_dataset()
    results["ema_update"] = ema_update.run(training_overhead.training_network(data), repeats=5 if quick else 30)
    print(ema_update.format_table(results["ema_update"]), flush=True)
    results["training_overhead"] = training_overhead.run(
        pairs=1 if quick else 5, epochs=2 if quick else 4, batches=5 if quick else 50
    )
    print(training_overhead.format_table(results["training_overhead"]), flush=True)
    results["targets"] = targets(results)
    for target in results["targets"]:
        print(
            f"{'met    ' if target['met'] else 'NOT MET'}  {target['target']}: {target['measured']:.2f} ({target['bound']})"
        )
    print(apply_note(results))
    with open(arguments.output, "w") as file:
        json.dump(results, file, indent=2)
    print(f"machine: {results['machine']}; results written to {arguments.output}")
    return results


if __name__ == "__main__":
    main()
