"""Benchmark: averaging N ResNet-50-sized checkpoints, side by side.

Four methods average (or just read) the same ``N`` checkpoint files:

``modavg_plugin``
    ``modavg_plugin.SelectNBestMean(num_models=N).apply(folder)``: streams the
    checkpoints one at a time into a running sum, then writes the average
    durably (temporary file, ``fsync``, rename).
``modavg_plugin (no write)``
    ``modavg_plugin.checkpoints.average_checkpoint_files``: the same streaming
    average without writing it (what compares with a bare read).
``gluonts``
    ``gluonts.mx.trainer.model_averaging.SelectNBestMean(num_models=N).apply(folder)``:
    loads all N checkpoints, then sums.
``bare read``
    ``mx.nd.load(path)`` of each file in turn, keeping nothing: the lower bound
    for time.

Every measurement runs in a fresh Python process (this file with the hidden
``--measure METHOD FOLDER N`` mode) that reports its wall time and its peak
resident set size above the baseline taken after imports, as one JSON line.
The files are written, flushed to disk (``os.sync``) and read once, untimed,
before any timing, so all methods read them from the page cache and no
write-back of the fresh files falls into a timed run. Each method's
``averaged_model-0000.params`` is removed after its run.

Peak memory is ``VmHWM`` from ``/proc/self/status``, reset to the current RSS
(``/proc/self/clear_refs``) just before the work. ``ru_maxrss`` is recorded
too but not used: on Linux a child process inherits its parent's high-water
mark at ``exec``, so it can report the parent's peak instead of its own.

Run ``python bench/checkpoint_averaging.py [--counts 5 8 10] [--repeats 3]``.
"""

import argparse
import gc
import glob
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

__all__ = ["format_table", "run"]

MODAVG_METHOD = "modavg_plugin"
MODAVG_AVERAGE_METHOD = "modavg_plugin (no write)"
GLUONTS_METHOD = "gluonts"
BARE_READ_METHOD = "bare read"
METHODS = (MODAVG_METHOD, MODAVG_AVERAGE_METHOD, GLUONTS_METHOD, BARE_READ_METHOD)

MEASURE_FLAG = "--measure"
AVERAGED_MODEL_NAME = "averaged_model-0000.params"
CHECKPOINT_PATTERN = "epoch-*.params"
BYTES_PER_MEGABYTE = 1_000_000
BYTES_PER_KIBIBYTE = 1024
MEASUREMENT_TIMEOUT_SECONDS = 600

ParameterSpecification = Dict[str, Tuple[Tuple[int, ...], np.dtype]]
Measurement = Dict[str, Any]


# Checkpoints ------------------------------------------------------------------


def resnet50_parameter_specification() -> ParameterSpecification:
    """Name -> (shape, dtype) of ResNet-50 v1's parameters (initialised, no download).

    Returns
    -------
    ParameterSpecification
        The parameter dict of ``resnet50_v1()`` after ``initialize()`` and one
        forward pass, reduced to shapes and dtypes.
    """
    network = mx.gluon.model_zoo.vision.resnet50_v1()
    network.initialize()
    network(mx.nd.ones((1, 3, 224, 224))).wait_to_read()
    return {
        name: (tuple(parameter.shape), np.dtype(parameter.dtype))
        for name, parameter in network.collect_params().items()
    }


def model_megabytes(specification: ParameterSpecification) -> float:
    """The model size: sum of the parameters' ``nbytes``, in MB (10**6 bytes)."""
    total_bytes = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in specification.values())
    return total_bytes / BYTES_PER_MEGABYTE


def random_parameters(specification: ParameterSpecification, seed: int) -> Dict[str, mx.nd.NDArray]:
    """Normally distributed arrays of the given shapes and dtypes, different for each seed."""
    mx.random.seed(seed)
    return {name: mx.nd.random.normal(shape=shape, dtype=dtype.name) for name, (shape, dtype) in specification.items()}


def write_checkpoints(folder: str, specification: ParameterSpecification, count: int) -> List[str]:
    """Write ``count`` checkpoints with epoch-info records that both libraries read.

    Parameters
    ----------
    folder
        An existing, empty folder.
    specification
        Shapes and dtypes of the parameters.
    count
        How many checkpoints (``epoch-0000.params`` ...) to write.

    Returns
    -------
    List[str]
        The absolute paths of the ``.params`` files, in epoch order.
    """
    from modavg_plugin import save_epoch_info

    paths = []
    for epoch in range(count):
        base = os.path.join(os.path.abspath(folder), f"epoch-{epoch:04d}")
        params_path = f"{base}.params"
        mx.nd.save(params_path, random_parameters(specification, seed=epoch))
        save_epoch_info(base, {"params_path": params_path, "epoch_no": epoch, "score": 1.0 + 0.125 * epoch})
        paths.append(params_path)
    mx.nd.waitall()
    return paths


def read_untimed(paths: Sequence[str]) -> None:
    """Load every file once, keeping nothing, so that all of them sit in the page cache."""
    for path in paths:
        mx.nd.load(path)
    mx.nd.waitall()


def remove_averaged_model(folder: str) -> None:
    """Delete a previous method's ``averaged_model-0000.params``, if any."""
    averaged_path = os.path.join(folder, AVERAGED_MODEL_NAME)
    if os.path.exists(averaged_path):
        os.remove(averaged_path)


# Measurement inside a fresh process ---------------------------------------------


def status_kibibytes(field: str) -> int:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of ``/proc/self/status``."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def reset_peak_resident_size() -> bool:
    """Reset ``VmHWM`` to the current RSS; whether the kernel allowed it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def checkpoint_paths(folder: str, count: int) -> List[str]:
    """The first ``count`` checkpoint files of ``folder``, in epoch order."""
    return sorted(glob.glob(os.path.join(glob.escape(folder), CHECKPOINT_PATTERN)))[:count]


def read_each(paths: Sequence[str]) -> None:
    """``mx.nd.load`` every file in turn, dropping each result before the next read."""
    for path in paths:
        mx.nd.load(path)


def prepare_work(method: str, folder: str, count: int) -> Callable[[], Any]:
    """Import what ``method`` needs and return the zero-argument work to time."""
    if method == MODAVG_METHOD:
        import modavg_plugin

        return lambda: modavg_plugin.SelectNBestMean(num_models=count).apply(folder)
    if method == MODAVG_AVERAGE_METHOD:
        from modavg_plugin.weighted_sum import average_checkpoint_files

        paths = checkpoint_paths(folder, count)
        return lambda: average_checkpoint_files(paths, [1.0 / count] * count)
    if method == GLUONTS_METHOD:
        from gluonts.mx.trainer import model_averaging

        return lambda: model_averaging.SelectNBestMean(num_models=count).apply(folder)
    if method == BARE_READ_METHOD:
        paths = checkpoint_paths(folder, count)
        return lambda: read_each(paths)
    raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")


def settle() -> None:
    """Start the engine's workers, finish pending work and free garbage before the baseline."""
    (mx.nd.ones((4,)) * 2).wait_to_read()
    mx.nd.waitall()
    gc.collect()


def measure(method: str, folder: str, count: int) -> Measurement:
    """Time one run of ``method`` and take its peak RSS above the baseline (this process).

    Returns
    -------
    Measurement
        ``method``, ``checkpoints``, ``seconds``, ``extra_peak_megabytes`` and
        the raw numbers they come from (KiB).
    """
    work = prepare_work(method, folder, count)
    settle()
    peak_was_reset = reset_peak_resident_size()
    baseline_kibibytes = status_kibibytes("VmRSS")
    start = time.perf_counter()
    work()
    mx.nd.waitall()
    seconds = time.perf_counter() - start
    peak_kibibytes = status_kibibytes("VmHWM")
    return {
        "method": method,
        "checkpoints": count,
        "seconds": seconds,
        "extra_peak_megabytes": (peak_kibibytes - baseline_kibibytes) * BYTES_PER_KIBIBYTE / BYTES_PER_MEGABYTE,
        "baseline_kibibytes": baseline_kibibytes,
        "peak_kibibytes": peak_kibibytes,
        "peak_was_reset": peak_was_reset,
        "ru_maxrss_kibibytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def measure_in_fresh_process(method: str, folder: str, count: int) -> Measurement:
    """Run :func:`measure` in a new Python process and parse its JSON line."""
    command = [sys.executable, os.path.abspath(__file__), MEASURE_FLAG, method, folder, str(count)]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=MEASUREMENT_TIMEOUT_SECONDS, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"measuring {method!r} with {count} checkpoints failed:\n{completed.stderr[-3000:]}")
    json_lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if not json_lines:
        raise RuntimeError(f"measuring {method!r} printed no JSON line:\n{completed.stdout[-3000:]}")
    return json.loads(json_lines[-1])


# Benchmark ------------------------------------------------------------------------


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the results."""
    print(message, file=sys.stderr, flush=True)


def measure_count(folder: str, count: int, repeats: int) -> Dict[str, List[Measurement]]:
    """All repeats of every method on ``count`` checkpoints, methods interleaved."""
    measurements: Dict[str, List[Measurement]] = {method: [] for method in METHODS}
    for repeat in range(repeats):
        for method in METHODS:
            remove_averaged_model(folder)
            measurement = measure_in_fresh_process(method, folder, count)
            remove_averaged_model(folder)
            measurements[method].append(measurement)
            log(
                f"  N={count} repeat {repeat + 1}/{repeats} {method:>24}: {measurement['seconds']:.3f} s, "
                f"extra peak {measurement['extra_peak_megabytes']:.0f} MB"
            )
    return measurements


def summarise(count: int, measurements: Dict[str, List[Measurement]], megabytes: float) -> List[Dict[str, Any]]:
    """One row per method: median time, median extra peak, and both relative to the model and bare read."""
    medians = {
        method: (
            statistics.median(measurement["seconds"] for measurement in runs),
            statistics.median(measurement["extra_peak_megabytes"] for measurement in runs),
        )
        for method, runs in measurements.items()
    }
    bare_read_seconds = medians[BARE_READ_METHOD][0]
    return [
        {
            "checkpoints": count,
            "method": method,
            "seconds": seconds,
            "extra_peak_megabytes": extra_megabytes,
            "time_vs_bare_read": seconds / bare_read_seconds,
            "extra_peak_model_sizes": extra_megabytes / megabytes,
        }
        for method, (seconds, extra_megabytes) in medians.items()
    ]


def benchmark_count(root: str, specification: ParameterSpecification, count: int, repeats: int) -> List[Dict[str, Any]]:
    """Write ``count`` checkpoints into their own folder, measure every method, remove the folder."""
    folder = tempfile.mkdtemp(prefix=f"checkpoints-{count}-", dir=root)
    try:
        log(f"N={count}: writing {count} checkpoints to {folder}")
        paths = write_checkpoints(folder, specification, count)
        os.sync()  # write back now, not during a timed run (an fsync there would wait for it)
        read_untimed(paths)
        measurements = measure_count(folder, count, repeats)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return summarise(count, measurements, model_megabytes(specification))


def run(counts: Sequence[int] = (5, 8, 10), repeats: int = 3) -> Dict[str, Any]:
    """Average ``N`` ResNet-50-sized checkpoints with each method, for every ``N`` in ``counts``.

    Parameters
    ----------
    counts
        The numbers of checkpoints to average.
    repeats
        Fresh-process runs per (method, N); the medians are reported.

    Returns
    -------
    Dict[str, Any]
        ``{"model_megabytes": float, "rows": [{"checkpoints", "method",
        "seconds", "extra_peak_megabytes", "time_vs_bare_read",
        "extra_peak_model_sizes"}, ...]}``, rows grouped by N, methods in the
        order of ``METHODS``.
    """
    if repeats < 1 or any(count < 1 for count in counts):
        raise ValueError(f"counts and repeats must be >= 1, got counts={list(counts)}, repeats={repeats}")
    specification = resnet50_parameter_specification()
    root = tempfile.mkdtemp(prefix="checkpoint-averaging-bench-")
    try:
        rows = [row for count in counts for row in benchmark_count(root, specification, count, repeats)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"model_megabytes": model_megabytes(specification), "rows": rows}


def format_table(results: Dict[str, Any]) -> str:
    """The rows of :func:`run` as a plain-text table, with the model size on top."""
    header = ("N", "method", "seconds", "x bare read", "extra peak MB", "extra peak / model")
    cells = [header] + [
        (
            str(row["checkpoints"]),
            row["method"],
            f"{row['seconds']:.3f}",
            f"{row['time_vs_bare_read']:.2f}",
            f"{row['extra_peak_megabytes']:.0f}",
            f"{row['extra_peak_model_sizes']:.2f}",
        )
        for row in results["rows"]
    ]
    widths = [max(len(line[column]) for line in cells) for column in range(len(header))]
    rendered = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells]
    rendered.insert(1, "  ".join("-" * width for width in widths))
    title = f"Model size: {results['model_megabytes']:.1f} MB (sum of nbytes; MB = 10**6 bytes); medians"
    return "\n".join([title] + rendered)


def processor_name() -> str:
    """The CPU model from ``/proc/cpuinfo``, else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown processor"


def machine_note() -> str:
    """One line: cores, CPU, memory and library versions."""
    memory_gibibytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"Machine: {os.cpu_count()} cores, {processor_name()}, {memory_gibibytes:.0f} GiB; "
        f"Python {platform.python_version()}, mxnet {mx.__version__}, "
        f"gluonts {importlib.metadata.version('gluonts')}, numpy {np.__version__}"
    )


def parse_arguments(arguments: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """``--counts``, ``--repeats`` and the hidden ``--measure METHOD FOLDER N``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[5, 8, 10], help="numbers of checkpoints")
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs per method and N")
    parser.add_argument(MEASURE_FLAG, nargs=3, metavar=("METHOD", "FOLDER", "N"), help=argparse.SUPPRESS)
    return parser.parse_args(arguments)


def main(arguments: Optional[Sequence[str]] = None) -> None:
    """Run the benchmark and print the table, or one measurement in ``--measure`` mode."""
    options = parse_arguments(arguments)
    if options.measure:
        method, folder, count = options.measure
        print(json.dumps(measure(method, folder, int(count))), flush=True)
        return
    start = time.perf_counter()
    print(format_table(run(options.counts, options.repeats)))
    print(machine_note())
    print(f"Total wall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
