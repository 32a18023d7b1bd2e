"""Per-batch cost of the EMA callback inside real DeepAR training (EMA on vs off).

DeepAR (GluonTS, MXNet) trains on statsmodels' bundled weekly Mauna Loa CO2
series. Runs with and without ``AveragingCallback.from_config({"decay": 0.999})``
alternate (off/on, then on/off, ...), so drift of the machine hits both alike.
A timing callback measures each epoch from ``on_train_epoch_start`` to
``on_train_epoch_end`` (the batches, including the EMA's per-batch update;
not the once-per-epoch checkpoint save) with ``mx.nd.waitall()`` at both ends;
the first epoch (hybridisation, warm-up) is left out.
"""

import statistics
import time
from typing import Any, Dict, List, Optional

import mxnet as mx
import numpy as np
import statsmodels.api as sm
from gluonts.dataset.common import ListDataset
from gluonts.env import env
from gluonts.mx import DeepAREstimator, Trainer
from gluonts.mx.trainer.callback import Callback

from modavg_plugin import AveragingCallback

PREDICTION_LENGTH = 13


class EpochTimer(Callback):
    """Seconds per batch of every epoch but the first; keeps the network it saw."""

    def __init__(self, batches_per_epoch: int) -> None:
        self.batches_per_epoch = batches_per_epoch
        self.seconds_per_batch: List[float] = []
        self.network: Optional[mx.gluon.Block] = None
        self._started = 0.0
        self._epoch = 0

    def on_network_initializing_end(self, training_network: mx.gluon.Block, **kwargs: Any) -> None:
        self.network = training_network

    def on_train_epoch_start(self, training_network: mx.gluon.Block, **kwargs: Any) -> None:
        mx.nd.waitall()
        self._started = time.perf_counter()

    def on_train_epoch_end(self, **kwargs: Any) -> bool:
        mx.nd.waitall()
        if self._epoch > 0:
            self.seconds_per_batch.append((time.perf_counter() - self._started) / self.batches_per_epoch)
        self._epoch += 1
        return True


def co2_dataset() -> ListDataset:
    """The weekly CO2 series (missing weeks interpolated) as one training series."""
    series = sm.datasets.co2.load_pandas().data["co2"].interpolate(method="time").asfreq("W-SAT")
    return ListDataset([{"start": series.index[0], "target": series.to_numpy()}], freq="W-SAT")


def train_once(data: ListDataset, with_ema: bool, epochs: int, batches: int, seed: int) -> EpochTimer:
    """One DeepAR run; returns its timer."""
    mx.random.seed(seed)
    np.random.seed(seed)
    timer = EpochTimer(batches)
    callbacks: List[Callback] = [AveragingCallback.from_config({"decay": 0.999})] if with_ema else []
    trainer = Trainer(
        epochs=epochs, num_batches_per_epoch=batches, callbacks=callbacks + [timer], add_default_callbacks=False
    )
    estimator = DeepAREstimator(freq="W-SAT", prediction_length=PREDICTION_LENGTH, trainer=trainer)
    with env._let(use_tqdm=False):
        estimator.train(data)
    return timer


def training_network(data: ListDataset) -> mx.gluon.Block:
    """A DeepAR training network as GluonTS builds and initialises it."""
    return train_once(data, with_ema=False, epochs=1, batches=1, seed=0).network


def run(pairs: int = 5, epochs: int = 4, batches: int = 50) -> Dict[str, Any]:
    """Median seconds per batch with and without the EMA, and the overhead."""
    data = co2_dataset()
    per_run: Dict[str, List[float]] = {"off": [], "on": []}
    for pair in range(pairs):
        order = [False, True] if pair % 2 == 0 else [True, False]
        for with_ema in order:
            timer = train_once(data, with_ema, epochs, batches, seed=pair)
            per_run["on" if with_ema else "off"].append(statistics.median(timer.seconds_per_batch))
    off, on = statistics.median(per_run["off"]), statistics.median(per_run["on"])
    spread = (max(per_run["off"]) - min(per_run["off"])) / off
    return {
        "pairs": pairs,
        "epochs": epochs,
        "batches_per_epoch": batches,
        "milliseconds_per_batch": {"ema off": 1000 * off, "ema on": 1000 * on},
        "runs_milliseconds_per_batch": {key: [1000 * value for value in values] for key, values in per_run.items()},
        "overhead_percent": 100.0 * (on - off) / off,
        "run_to_run_spread_percent": 100.0 * spread,
    }


def format_table(result: Dict[str, Any]) -> str:
    """Two lines: per-batch times, overhead and the noise it is compared with."""
    times = result["milliseconds_per_batch"]
    return (
        f"DeepAR per batch: EMA off {times['ema off']:.2f} ms, EMA on {times['ema on']:.2f} ms "
        f"(medians of {result['pairs']} interleaved runs each)\n"
        f"overhead {result['overhead_percent']:+.2f}%; run-to-run spread of the EMA-off runs "
        f"(max-min)/median {result['run_to_run_spread_percent']:.2f}%"
    )
