"""``make bench``'s figures for the site's performance page, from the committed ``bench/results.json``.

``make bench`` writes that file; the ``{bench-results}`` directive turns it
into Markdown at every build, so the site cannot quote numbers no run produced.
"""

import json
import pathlib
from typing import Any, Dict, List

__all__ = ["RESULTS_PATH", "bench_results"]

RESULTS_PATH = pathlib.Path(__file__).resolve().parents[2] / "bench" / "results.json"
UPDATE_METHODS = ("per-parameter loop", "gluonts iteration averaging")
CHECKPOINT_METHODS = ("modavg_plugin (no write)", "modavg_plugin", "gluonts")


def load_results() -> Dict[str, Any]:
    """The committed results of a full (not ``--quick``) benchmark run."""
    if not RESULTS_PATH.exists():
        raise ValueError(f"{RESULTS_PATH} is missing: run `make bench` and commit it")
    results = json.loads(RESULTS_PATH.read_text())
    if results["quick"]:
        raise ValueError(f"{RESULTS_PATH} comes from a --quick run: run `make bench` for the real numbers")
    return results


def bench_results() -> str:
    """When and where it ran, the targets, then one table or paragraph per benchmark."""
    results = load_results()
    machine = results["machine"]
    lines = [
        f"Measured on {machine['date']}: {machine['cpu']}, {machine['cores']} cores (a shared VM), CPython "
        f"{machine['python']}, MXNet {machine['mxnet']} (CPU); the whole run took "
        f"{results['wall_seconds'] / 60:.0f} minutes. Medians after warm-up, `mx.nd.waitall()` before every clock "
        "reading unless said otherwise.",
        "",
        "| target | measured | bound | met |",
        "|---|---:|---|---|",
        *[
            f"| {target['target']} | {target['measured']:.2f} | {target['bound']} | {'yes' if target['met'] else 'NO'} |"
            for target in results["targets"]
        ],
        "",
        *update_table(results["ema_update"]),
        "",
        *training_paragraphs(results),
        "",
        *epoch_cost_table(results["epoch_costs"]),
        "",
        *checkpoint_table(results["checkpoint_averaging"]),
    ]
    return "\n".join(lines) + "\n"


def update_table(rows: List[Dict[str, Any]]) -> List[str]:
    """One EMA update per parameter set: ours (done, and to return), the alternatives, the floor."""
    lines = [
        "**One EMA update** (milliseconds; in brackets, how many times slower than this project):",
        "",
        "| parameter set | tensors | floats | modavg_plugin, done | returned to the caller | per-parameter loop | "
        "GluonTS iteration averaging | NumPy floor (`s += p`, one flat array) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        times = row["milliseconds"]
        ours = times["modavg_plugin"]
        slower = [f"{times[method]:,.2f} ({times[method] / ours:,.0f}x)" for method in UPDATE_METHODS]
        lines.append(
            f"| {row['parameter_set']} | {row['tensors']:,} | {row['floats']:,} | **{ours:.3f}** | "
            f"{times['modavg_plugin (caller)']:.3f} | {' | '.join(slower)} | {times['numpy floor']:.3f} "
            f"(ours = {row['modavg_vs_floor']:.2f}x) |"
        )
    return lines


def training_paragraphs(results: Dict[str, Any]) -> List[str]:
    """Overhead inside training (within runs and interleaved runs), and validation."""
    lines = ["**Inside GluonTS training** (the CO2 series; per batch, the EMA callback against none):", ""]
    for row in results["training_overhead_within_runs"]:
        low, high = row["paired_overhead_quartiles_percent"]
        lines.append(
            f"- {row['estimator']}, within one run ({row['blocks']} pairs of neighbouring {row['batches_per_block']}"
            f"-batch blocks, averaging in every other block): {row['milliseconds_per_batch']['ema off']:.2f} ms a "
            f"batch without averaging, overhead **{row['overhead_percent']:+.2f}%** (quartiles of the pairs "
            f"{low:+.1f}% to {high:+.1f}%)."
        )
    for row in results["training_overhead_interleaved_runs"]:
        times = row["milliseconds_per_batch"]
        lines.append(
            f"- {row['estimator']}, {row['pairs']} interleaved pairs of runs: {times['ema off']:.2f} ms without, "
            f"{times['ema on']:.2f} ms with ({row['overhead_percent']:+.1f}%), while the runs without the EMA alone "
            f"spread by {row['run_to_run_spread_percent']:.0f}%."
        )
    validation = results["validation"]
    per_pass = validation["milliseconds_per_validation"]
    ratios = validation["ratio_to_no_callback"]
    lines.append(
        f"- Validation, {validation['estimator']}: {per_pass['no callback']:.2f} ms a pass without the callback, "
        f"{per_pass['EMA']:.2f} ms with it (x{ratios['EMA']:.2f}: the averages are swapped in around each forward "
        f"pass), {per_pass['EMA, compare_raw']:.2f} ms with `compare_raw=True` (x{ratios['EMA, compare_raw']:.2f})."
    )
    return lines


def epoch_cost_table(rows: List[Dict[str, Any]]) -> List[str]:
    """Per-epoch saves on the demo's networks."""
    lines = [
        "**Saving every epoch** (the demo's SimpleFeedForward networks, 10 epochs of 50 batches, a `checkpoint_dir`):",
        "",
        "| data set | configuration | model | epoch end (checkpoint, state, snapshots) | of which a snapshot save | "
        "folder after epoch 1 | then per epoch | end of training |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        sizes = row["folder_bytes_after_each_epoch"]
        growth = [after - before for before, after in zip(sizes, sizes[1:])]
        snapshot = "" if row["snapshot_save_ms_median"] is None else f"{row['snapshot_save_ms_median']:.1f} ms"
        lines.append(
            f"| {row['dataset']} | {row['method']} | {row['model_bytes'] / 1024:.0f} KiB | "
            f"{row['epoch_end_ms_median']:.1f} ms | {snapshot} | {sizes[0] / 1024:.0f} KiB | "
            f"+{min(growth) / 1024:.0f} to +{max(growth) / 1024:.0f} KiB | {row['finish_seconds']:.3f} s |"
        )
    return lines


def checkpoint_table(averaging: Dict[str, Any]) -> List[str]:
    """Averaging N checkpoints: times against a bare read, and peak memory."""
    by_count: Dict[int, Dict[str, Dict[str, Any]]] = {}
    for row in averaging["rows"]:
        by_count.setdefault(row["checkpoints"], {})[row["method"]] = row
    lines = [
        f"**Averaging N checkpoints of {averaging['model_megabytes']:.1f} MB** (a fresh process per run, the files "
        "in the page cache):",
        "",
        "| N | bare read (`mx.nd.load` each, keep nothing) | modavg_plugin streaming average | modavg_plugin "
        "`SelectNBestMean.apply` (+ write, `fsync`, rename) | GluonTS `SelectNBestMean.apply` | extra peak memory, "
        "ours / GluonTS's (model sizes) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for count, methods in sorted(by_count.items()):
        bare = methods["bare read"]["seconds"]
        cells = [_against(methods[method]["seconds"], bare) for method in CHECKPOINT_METHODS]
        lines.append(
            f"| {count} | {bare:.3f} s | {' | '.join(cells)} | {methods['modavg_plugin']['extra_peak_model_sizes']:.2f}"
            f" / {methods['gluonts']['extra_peak_model_sizes']:.2f} |"
        )
    return lines


def _against(seconds: float, bare: float) -> str:
    return f"{seconds:.3f} s ({seconds / bare:.2f}x)"
