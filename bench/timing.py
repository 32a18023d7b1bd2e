"""Timing helpers shared by the benchmarks: medians after warm-up, MXNet synchronised."""

import statistics
import time
from typing import Callable, List

import mxnet as mx


def measure_seconds(run: Callable[[], object], repeats: int, warmups: int = 1) -> List[float]:
    """Wall-clock seconds of ``repeats`` calls of ``run`` after ``warmups`` untimed ones.

    ``mx.nd.waitall()`` runs before each clock reading, so asynchronous MXNet
    work is counted in the call that queued it.
    """
    for _ in range(warmups):
        run()
    mx.nd.waitall()
    seconds = []
    for _ in range(repeats):
        mx.nd.waitall()
        start = time.perf_counter()
        run()
        mx.nd.waitall()
        seconds.append(time.perf_counter() - start)
    return seconds


def median_milliseconds(run: Callable[[], object], repeats: int, warmups: int = 1) -> float:
    """Median milliseconds of :func:`measure_seconds`."""
    return 1000.0 * statistics.median(measure_seconds(run, repeats, warmups))


def median_milliseconds_to_return(run: Callable[[], object], repeats: int, warmups: int = 1) -> float:
    """Median milliseconds until ``run()`` returns, the engine idle before each call (its queued work not counted)."""
    for _ in range(warmups):
        run()
    seconds = []
    for _ in range(repeats):
        mx.nd.waitall()
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    mx.nd.waitall()
    return 1000.0 * statistics.median(seconds)
