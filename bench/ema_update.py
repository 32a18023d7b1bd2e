"""Time of one EMA update per parameter set: this project versus the alternatives.

Parameter sets: ResNet-50 from ``mx.gluon.model_zoo`` (no weights downloaded:
initialised and run once, so MKLDNN has reordered its convolution weights),
GluonTS DeepAR and SimpleFeedForward training networks, and 2,000 tiny
tensors of 256 floats. Methods, measured side by side in one process:

- ``modavg_plugin``: ``ExponentialMovingAverage.apply(num_updates=k)`` until
  the update is done (MXNet's engine runs it: ``mx.nd.waitall()`` after);
- ``modavg_plugin (caller)``: the same call, timed until it returns, which is
  what the training loop's thread pays (the engine runs the update meanwhile);
- ``per-parameter loop``: AllenNLP's update translated to MXNet,
  ``shadow[:] = d * shadow + (1 - d) * param.data()`` for each parameter;
- ``gluonts iteration averaging``: GluonTS's ``IterationAveragingStrategy.apply``
  as written (it calls ``collect_params()`` inside its per-parameter loop);
- ``numpy floor``: ``s += p`` on one flat float32 array of the same total size
  (three memory streams, no per-tensor work: the floor any update can reach).
"""

from typing import Any, Dict, List, Tuple

import mxnet as mx
import numpy as np
from gluonts.mx.trainer.model_iteration_averaging import IterationAveragingStrategy

from modavg_plugin import ExponentialMovingAverage

from .timing import median_milliseconds, median_milliseconds_to_return

DECAY = 0.999
NamedParameters = List[Tuple[str, mx.gluon.Parameter]]


class TinyTensors(mx.gluon.Block):
    """A block owning ``count`` parameters of ``size`` floats each."""

    def __init__(self, count: int = 2000, size: int = 256) -> None:
        super().__init__()
        for index in range(count):
            self.params.get(f"tiny{index}", shape=(size,))


def resnet50() -> mx.gluon.Block:
    """ResNet-50 v1 with random weights (nothing downloaded)."""
    network = mx.gluon.model_zoo.vision.resnet50_v1()
    network.initialize(mx.init.Xavier())
    network(mx.nd.ones((1, 3, 224, 224))).wait_to_read()
    return network


def tiny_tensors() -> mx.gluon.Block:
    """2,000 tensors of 256 floats."""
    network = TinyTensors()
    network.initialize(mx.init.Uniform())
    return network


def per_parameter_loop(parameters: NamedParameters):
    """AllenNLP's per-parameter update, translated to MXNet NDArrays."""
    shadows = {name: parameter.data().copy() for name, parameter in parameters}

    def update() -> None:
        for name, parameter in parameters:
            shadow = shadows[name]
            shadow[:] = DECAY * shadow + (1.0 - DECAY) * parameter.data()

    return update


def gluonts_iteration_averaging(network: mx.gluon.Block):
    """GluonTS's per-batch update (``IterationAveragingStrategy.apply``) as written."""
    strategy = IterationAveragingStrategy(eta=0.0)
    strategy.averaging_started = True
    strategy.apply(network)  # the first call only copies
    return lambda: strategy.apply(network)


def modavg_update(parameters: NamedParameters):
    """This project's update."""
    average = ExponentialMovingAverage(parameters, decay=DECAY)
    counter = iter(range(1, 10**9))
    return lambda: average.apply(num_updates=next(counter))


def numpy_floor(total_floats: int):
    """``s += p`` on flat arrays of the same total size."""
    shadow = np.ones(total_floats, dtype=np.float32)
    value = np.ones(total_floats, dtype=np.float32)
    return lambda: np.add(shadow, value, out=shadow)


def measure_parameter_set(label: str, network: mx.gluon.Block, repeats: int) -> Dict[str, Any]:
    """Median milliseconds per update for every method on one parameter set."""
    parameters = list(network.collect_params().items())
    total = int(sum(parameter.data().size for _, parameter in parameters))
    slow_repeats = max(3, repeats // 4)
    milliseconds = {
        "modavg_plugin": median_milliseconds(modavg_update(parameters), repeats),
        "modavg_plugin (caller)": median_milliseconds_to_return(modavg_update(parameters), repeats),
        "per-parameter loop": median_milliseconds(per_parameter_loop(parameters), slow_repeats),
        "gluonts iteration averaging": median_milliseconds(gluonts_iteration_averaging(network), slow_repeats),
        "numpy floor": median_milliseconds(numpy_floor(total), repeats),
    }
    ours = milliseconds["modavg_plugin"]
    return {
        "parameter_set": label,
        "tensors": len(parameters),
        "floats": total,
        "milliseconds": milliseconds,
        "modavg_vs_floor": ours / milliseconds["numpy floor"],
        "speedup_vs_loop": milliseconds["per-parameter loop"] / ours,
        "speedup_vs_gluonts": milliseconds["gluonts iteration averaging"] / ours,
    }


def run(networks: Dict[str, mx.gluon.Block], repeats: int = 20) -> List[Dict[str, Any]]:
    """Measure ResNet-50, the given networks (by label) and 2,000 tiny tensors."""
    return [
        measure_parameter_set("ResNet-50", resnet50(), repeats),
        *[measure_parameter_set(label, network, repeats) for label, network in networks.items()],
        measure_parameter_set("2,000 tiny tensors", tiny_tensors(), repeats),
    ]


def format_table(rows: List[Dict[str, Any]]) -> str:
    """One line per parameter set: times in ms, then ratios."""
    methods = list(rows[0]["milliseconds"])
    header = f"{'parameter set':<24} {'tensors':>7} {'floats':>10} " + " ".join(f"{m:>22.22}" for m in methods)
    header += f" {'ours/floor':>10} {'loop/ours':>9} {'gluonts/ours':>12}"
    lines = [header, "-" * len(header)]
    for row in rows:
        times = " ".join(f"{row['milliseconds'][m]:>19.3f} ms" for m in methods)
        lines.append(
            f"{row['parameter_set']:<24} {row['tensors']:>7} {row['floats']:>10} {times} "
            f"{row['modavg_vs_floor']:>10.2f} {row['speedup_vs_loop']:>9.1f} {row['speedup_vs_gluonts']:>12.1f}"
        )
    return "\n".join(lines)
