"""``make bench``: every benchmark side by side in one run; prints tables, writes results.json.

Run as ``python -m bench.run`` from the repository root (``--quick`` for a
short smoke run, ``--gpu`` to add :mod:`bench.gpu`, which says so and measures
nothing where MXNet sees no GPU).
"""

import argparse
import datetime
import json
import logging
import os
import platform
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence

warnings.filterwarnings("ignore", message="Using `json`-module", category=UserWarning)

import mxnet as mx  # noqa: E402 (after the warning filter)

from . import checkpoint_averaging, ema_update, epoch_costs, gpu, training_overhead  # noqa: E402

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
    """The issues' targets, each with the measured value and whether it is met."""
    resnet = row_for(results["ema_update"], parameter_set="ResNet-50")
    tiny = row_for(results["ema_update"], parameter_set="2,000 tiny tensors")
    within = {row["estimator"]: row for row in results["training_overhead_within_runs"]}
    averaging = results["checkpoint_averaging"]["rows"]
    count = 8 if any(row["checkpoints"] == 8 for row in averaging) else max(row["checkpoints"] for row in averaging)
    applied = row_for(averaging, checkpoints=count, method="modavg_plugin")
    streamed = row_for(averaging, checkpoints=count, method="modavg_plugin (no write)")
    checks = [
        ("ResNet-50 EMA update / NumPy floor", resnet["modavg_vs_floor"], "<=", 1.3),
        ("2,000 tiny tensors: per-parameter loop / EMA update", tiny["speedup_vs_loop"], ">=", 100.0),
        ("SimpleFeedForward per-batch overhead, percent", within["SimpleFeedForward"]["overhead_percent"], "<=", 3.0),
        ("DeepAR per-batch overhead, percent", within["DeepAR"]["overhead_percent"], "<=", 0.5),
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
    parser.add_argument("--gpu", action="store_true", help="also time and check the update on the first GPU")
    parser.add_argument("--output", default=RESULTS_PATH, help="where to write the JSON results")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    arguments = parse_arguments(argv)
    logging.getLogger("gluonts").setLevel(logging.WARNING)
    quick = arguments.quick
    started = time.perf_counter()
    results: Dict[str, Any] = {"machine": machine(), "quick": quick}
    # checkpoint averaging first, before the other benchmarks churn gigabytes of memory in this process
    results["checkpoint_averaging"] = checkpoint_averaging.run(
        counts=(2,) if quick else (5, 8, 10), repeats=1 if quick else 5
    )
    print(checkpoint_averaging.format_table(results["checkpoint_averaging"]), flush=True)
    networks = {
        f"{name} training network": training_overhead.training_network(name) for name in ("DeepAR", "SimpleFeedForward")
    }
    results["ema_update"] = ema_update.run(networks, repeats=5 if quick else 30)
    print(ema_update.format_table(results["ema_update"]), flush=True)
    results["training_overhead_within_runs"] = [
        training_overhead.run_alternating("SimpleFeedForward", batches=60 if quick else 2000),
        training_overhead.run_alternating("DeepAR", batches=30 if quick else 600),
    ]
    for row in results["training_overhead_within_runs"]:
        print(training_overhead.format_alternating_table(row), flush=True)
    results["training_overhead_interleaved_runs"] = [
        training_overhead.run("SimpleFeedForward", pairs=1 if quick else 6, epochs=2 if quick else 4, batches=100),
        training_overhead.run("DeepAR", pairs=1 if quick else 4, epochs=2 if quick else 3, batches=5 if quick else 50),
    ]
    for row in results["training_overhead_interleaved_runs"]:
        print(training_overhead.format_table(row), flush=True)
    results["validation"] = training_overhead.run_validation(pairs=1 if quick else 3, epochs=3 if quick else 6)
    print(training_overhead.format_validation_table(results["validation"]), flush=True)
    results["epoch_costs"] = epoch_costs.run(epochs=3 if quick else 10, batches=5 if quick else 50)
    print(epoch_costs.format_table(results["epoch_costs"]), flush=True)
    if arguments.gpu:
        results["gpu"] = gpu.run(repeats=5 if quick else 20)
        print(gpu.format_table(results["gpu"]), flush=True)
    results["targets"] = targets(results)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
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
