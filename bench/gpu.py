"""The EMA update on a GPU: time against the per-parameter loop, values against the CPU path.

Run ``python -m bench.gpu`` (or ``make bench`` with ``BENCH_ARGS=--gpu``) on a
machine with an NVIDIA GPU and MXNet's CUDA build (for example
``pip install mxnet-cu112==1.9.1``). On the GPU the averages are updated by
``multi_sgd_update``, 60 arrays a call
(:class:`modavg_plugin.update_kernels.MultiTensorUpdateGroup`); this checks
that after ``STEPS`` updates with changing weights its shadows equal those of
the CPU path within float32 round-off, and times one update of each parameter
set against AllenNLP's per-parameter loop. Where MXNet sees no GPU it says so
and exits 0, measuring nothing.
"""

import argparse
import json
import sys
from typing import Any, Dict, List, Optional, Sequence

import mxnet as mx
import numpy as np

from modavg_plugin import ExponentialMovingAverage

from .ema_update import DECAY, TinyTensors
from .timing import median_milliseconds

STEPS = 20
TOLERANCE = 1e-5
"""Largest difference allowed between the GPU and CPU shadows, relative to the largest weight."""


def gpu_count() -> int:
    """GPUs MXNet can use here (0 for a CPU-only build)."""
    try:
        return mx.context.num_gpus()
    except mx.base.MXNetError:
        return 0


def parameter_sets(context: mx.Context) -> Dict[str, mx.gluon.Block]:
    """ResNet-50 (random weights, nothing downloaded) and 2,000 tiny tensors, on ``context``."""
    resnet = mx.gluon.model_zoo.vision.resnet50_v1()
    resnet.initialize(mx.init.Xavier(), ctx=context)
    resnet(mx.nd.ones((1, 3, 224, 224), ctx=context)).wait_to_read()
    tiny = TinyTensors()
    tiny.initialize(mx.init.Uniform(), ctx=context)
    return {"ResNet-50": resnet, "2,000 tiny tensors": tiny}


def shadows_after_steps(parameters: List[Any], context: mx.Context, seed: int) -> Dict[str, np.ndarray]:
    """Copies of ``parameters`` on ``context``, ``STEPS`` updates with random weights, the shadows as NumPy."""
    copies = []
    for name, parameter in parameters:
        copy = mx.gluon.Parameter(name, shape=parameter.shape, dtype=parameter.dtype)
        copy.initialize(ctx=context)
        copy.set_data(parameter.data().as_in_context(context))
        copies.append((name, copy))
    average = ExponentialMovingAverage(copies, decay=DECAY)
    rng = np.random.default_rng(seed)
    for step in range(1, STEPS + 1):
        for _, copy in copies:
            copy.data()[:] = mx.nd.array(rng.standard_normal(copy.shape), ctx=context)
        average.apply(num_updates=step)
    return {name: shadow.asnumpy() for name, shadow in average.shadows.items()}


def largest_difference(network: mx.gluon.Block, context: mx.Context) -> float:
    """Largest |GPU shadow - CPU shadow| over the largest weight, after the same updates on both."""
    parameters = list(network.collect_params().items())
    on_device = shadows_after_steps(parameters, context, seed=0)
    on_cpu = shadows_after_steps(parameters, mx.cpu(), seed=0)
    scale = max(float(np.abs(values).max()) for values in on_cpu.values())
    return max(float(np.abs(on_device[name] - on_cpu[name]).max()) for name in on_cpu) / scale


def per_parameter_loop(network: mx.gluon.Block):
    shadows = {name: parameter.data().copy() for name, parameter in network.collect_params().items()}

    def update() -> None:
        for name, parameter in network.collect_params().items():
            shadows[name][:] = DECAY * shadows[name] + (1.0 - DECAY) * parameter.data()

    return update


def measure(context: mx.Context, repeats: int) -> List[Dict[str, Any]]:
    """Per parameter set: milliseconds per update, ours and the loop's, and the difference from the CPU path."""
    rows = []
    for label, network in parameter_sets(context).items():
        average = ExponentialMovingAverage(network.collect_params().items(), decay=DECAY)
        ours = median_milliseconds(average.apply, repeats)
        loop = median_milliseconds(per_parameter_loop(network), max(3, repeats // 4))
        difference = largest_difference(network, context)
        rows.append(
            {
                "parameter_set": label,
                "context": str(context),
                "milliseconds": {"modavg_plugin": ours, "per-parameter loop": loop},
                "speedup_vs_loop": loop / ours,
                "largest_difference_from_cpu": difference,
                "matches_cpu": difference <= TOLERANCE,
            }
        )
    return rows


def run(repeats: int = 20) -> Dict[str, Any]:
    """Measure on the first GPU, or say why not."""
    if gpu_count() == 0:
        return {"skipped": "MXNet sees no GPU here (a CPU-only build, or no NVIDIA GPU and driver): nothing measured"}
    return {"rows": measure(mx.gpu(0), repeats)}


def format_table(result: Dict[str, Any]) -> str:
    if "skipped" in result:
        return f"GPU: skipped: {result['skipped']}"
    lines = []
    for row in result["rows"]:
        times = row["milliseconds"]
        lines.append(
            f"GPU {row['parameter_set']} on {row['context']}: ours {times['modavg_plugin']:.3f} ms, loop "
            f"{times['per-parameter loop']:.3f} ms ({row['speedup_vs_loop']:.1f}x); largest difference from the CPU "
            f"path {row['largest_difference_from_cpu']:.1e} ({'ok' if row['matches_cpu'] else 'TOO LARGE'})"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    arguments = parser.parse_args(argv)
    result = run(arguments.repeats)
    print(json.dumps(result, indent=2) if arguments.json else format_table(result))
    return 0 if all(row["matches_cpu"] for row in result.get("rows", [])) else 1


if __name__ == "__main__":
    sys.exit(main())
