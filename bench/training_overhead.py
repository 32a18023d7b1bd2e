"""Per-batch cost of the EMA callback inside real GluonTS training (EMA on vs off), and of validation.

Training: DeepAR (GluonTS defaults) and SimpleFeedForward (hybridized,
batch 32, two hidden layers of 40) train on statsmodels' bundled weekly Mauna
Loa CO2 series. Runs with and without ``AveragingCallback.from_config({"decay":
0.999})`` alternate (off/on, then on/off, ...), so drift of the machine hits
both alike. A timing callback measures each epoch from ``on_train_epoch_start``
to ``on_train_epoch_end`` (the batches, including the EMA's per-batch update;
not the once-per-epoch work) with ``mx.nd.waitall()`` at both ends; the first
epoch (hybridisation, warm-up) is left out. The overhead is the median over
pairs of ``on / off - 1``; the spread is ``(max - min) / median`` of the
EMA-off runs, the noise the overhead is to be read against.

On a shared virtual machine the runs drift by several percent (tens of
percent for a 3 ms step), more than the overheads to be measured. So each
estimator is also measured within single runs: the callback updates the
average in every other epoch only (:class:`EveryOtherEpochAverage`), and the
overhead of a run is the median seconds per batch of its averaging epochs over
that of its other epochs, neighbours in time. That is the figure the targets
are read from; the interleaved runs are reported beside it.

Validation: the same SimpleFeedForward with validation data (the last 52
weeks held out), seconds per validation pass without the callback, with it,
and with it and ``compare_raw=True`` (the raw weights validated as well).
"""

import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import mxnet as mx
import numpy as np
import statsmodels.api as sm
from gluonts.dataset.common import ListDataset
from gluonts.env import env
from gluonts.mx import DeepAREstimator, SimpleFeedForwardEstimator, Trainer
from gluonts.mx.trainer.callback import Callback

from modavg_plugin import AveragingCallback, ExponentialAveragingCallback

PREDICTION_LENGTH = 13
FREQUENCY = "W-SAT"
ESTIMATORS: Dict[str, Callable[[Trainer], Any]] = {
    "SimpleFeedForward": lambda trainer: SimpleFeedForwardEstimator(
        prediction_length=PREDICTION_LENGTH,
        context_length=52,
        num_hidden_dimensions=[40, 40],
        batch_size=32,
        trainer=trainer,
    ),
    "DeepAR": lambda trainer: DeepAREstimator(freq=FREQUENCY, prediction_length=PREDICTION_LENGTH, trainer=trainer),
}


class EpochTimer(Callback):
    """Seconds per batch of every training epoch but the first, and seconds per validation pass; keeps the network."""

    def __init__(self, batches_per_epoch: int) -> None:
        self.batches_per_epoch = batches_per_epoch
        self.seconds_per_batch: List[float] = []
        self.validation_seconds: List[float] = []
        self.network: Optional[mx.gluon.Block] = None
        self._started = 0.0
        self._epoch = 0

    def on_network_initializing_end(self, training_network: mx.gluon.Block, **kwargs: Any) -> None:
        self.network = training_network

    def on_train_epoch_start(self, training_network: mx.gluon.Block, **kwargs: Any) -> None:
        self._started = _synchronised_clock()

    def on_train_epoch_end(self, **kwargs: Any) -> bool:
        seconds = _synchronised_clock() - self._started
        if self._epoch > 0:
            self.seconds_per_batch.append(seconds / self.batches_per_epoch)
        self._epoch += 1
        return True

    def on_validation_epoch_start(self, training_network: mx.gluon.Block, **kwargs: Any) -> None:
        self._started = _synchronised_clock()

    def on_validation_epoch_end(self, **kwargs: Any) -> bool:
        if self._epoch > 1:
            self.validation_seconds.append(_synchronised_clock() - self._started)
        return True


def _synchronised_clock() -> float:
    mx.nd.waitall()
    return time.perf_counter()


class AlternatingAverage(ExponentialAveragingCallback):
    """The EMA callback, updating the average in every other block of ``block`` batches, timing each block.

    Each block ends with ``mx.nd.waitall()``, in both kinds of block alike,
    so a block's time includes the work its batches queued.
    """

    def __init__(self, block: int) -> None:
        super().__init__(decay=0.999, compare_raw=False)
        self.block = block
        self.seconds: Dict[bool, List[float]] = {False: [], True: []}  # averaging or not -> seconds per block
        self._batches = 0
        self._started = 0.0

    def on_train_epoch_start(self, training_network: mx.gluon.Block, **kwargs: Any) -> None:
        super().on_train_epoch_start(training_network, **kwargs)
        self._batches, self._started = 0, _synchronised_clock()

    def on_train_batch_end(self, training_network: mx.gluon.Block, **kwargs: Any) -> bool:
        averaging = (self._batches // self.block) % 2 == 1
        if averaging:
            super().on_train_batch_end(training_network, **kwargs)
        self._batches += 1
        if self._batches % self.block == 0:
            now = _synchronised_clock()
            self.seconds[averaging].append(now - self._started)
            self._started = now
        return True


def co2_series() -> np.ndarray:
    """The weekly CO2 series (pandas), missing weeks interpolated."""
    series = sm.datasets.co2.load_pandas().data["co2"].interpolate(method="time").asfreq(FREQUENCY)
    return series


def co2_dataset(hold_out: int = 0) -> ListDataset:
    """The weekly CO2 series as one training series, without its last ``hold_out`` weeks."""
    series = co2_series()
    values = series.to_numpy()
    return ListDataset([{"start": series.index[0], "target": values[: len(values) - hold_out]}], freq=FREQUENCY)


def train_once(
    estimator_name: str,
    callback: Optional[Callback],
    epochs: int,
    batches: int,
    seed: int,
    validation: bool = False,
) -> EpochTimer:
    """One training run; returns its timer (listed after ``callback``)."""
    mx.random.seed(seed)
    np.random.seed(seed)
    timer = EpochTimer(batches)
    callbacks: List[Callback] = [callback] if callback is not None else []
    trainer = Trainer(
        epochs=epochs, num_batches_per_epoch=batches, callbacks=callbacks + [timer], add_default_callbacks=False
    )
    estimator = ESTIMATORS[estimator_name](trainer)
    with env._let(use_tqdm=False):
        if validation:
            estimator.train(co2_dataset(hold_out=52), validation_data=co2_dataset())
        else:
            estimator.train(co2_dataset())
    return timer


def ema_callback(compare_raw: bool = False) -> Callback:
    return AveragingCallback.from_config({"decay": 0.999, "compare_raw": compare_raw})


def training_network(estimator_name: str = "DeepAR") -> mx.gluon.Block:
    """A training network as GluonTS builds and initialises it."""
    return train_once(estimator_name, None, epochs=1, batches=1, seed=0).network


def run(estimator_name: str, pairs: int = 6, epochs: int = 4, batches: int = 100) -> Dict[str, Any]:
    """Median seconds per batch with and without the EMA, the paired overhead, and the noise."""
    per_run: Dict[str, List[float]] = {"off": [], "on": []}
    for pair in range(pairs):
        order = [False, True] if pair % 2 == 0 else [True, False]
        for with_ema in order:
            timer = train_once(estimator_name, ema_callback() if with_ema else None, epochs, batches, seed=pair)
            per_run["on" if with_ema else "off"].append(statistics.median(timer.seconds_per_batch))
    off, on = statistics.median(per_run["off"]), statistics.median(per_run["on"])
    paired = [100.0 * (with_ema / without - 1.0) for with_ema, without in zip(per_run["on"], per_run["off"])]
    return {
        "estimator": estimator_name,
        "pairs": pairs,
        "epochs": epochs,
        "batches_per_epoch": batches,
        "milliseconds_per_batch": {"ema off": 1000 * off, "ema on": 1000 * on},
        "runs_milliseconds_per_batch": {key: [1000 * value for value in values] for key, values in per_run.items()},
        "overhead_percent": statistics.median(paired),
        "paired_overhead_percent": paired,
        "run_to_run_spread_percent": 100.0 * (max(per_run["off"]) - min(per_run["off"])) / off,
    }


def run_alternating(estimator_name: str, batches: int = 1000, block: int = 5, seed: int = 0) -> Dict[str, Any]:
    """One run averaging in every other block of batches: the paired overheads of neighbouring blocks."""
    callback = AlternatingAverage(block)
    train_once(estimator_name, callback, epochs=1, batches=batches, seed=seed)
    off, on = callback.seconds[False][1:], callback.seconds[True][1:]  # the first pair warms up
    paired = [100.0 * (with_ema / without - 1.0) for with_ema, without in zip(on, off)]
    quartiles = statistics.quantiles(paired, n=4)
    return {
        "estimator": estimator_name,
        "blocks": len(paired),
        "batches_per_block": block,
        "milliseconds_per_batch": {
            "ema off": 1000 * statistics.median(off) / block,
            "ema on": 1000 * statistics.median(on) / block,
        },
        "overhead_percent": 100.0 * (sum(on) / sum(off) - 1.0),
        "median_paired_overhead_percent": statistics.median(paired),
        "paired_overhead_quartiles_percent": [quartiles[0], quartiles[2]],
    }


def run_validation(pairs: int = 3, epochs: int = 4, batches: int = 20) -> Dict[str, Any]:
    """Median seconds per validation pass: no callback, the EMA callback, and with ``compare_raw=True``."""
    settings: Dict[str, Callable[[], Optional[Callback]]] = {
        "no callback": lambda: None,
        "EMA": lambda: ema_callback(compare_raw=False),
        "EMA, compare_raw": lambda: ema_callback(compare_raw=True),
    }
    seconds: Dict[str, List[float]] = {name: [] for name in settings}
    for pair in range(pairs):
        names = list(settings) if pair % 2 == 0 else list(reversed(settings))
        for name in names:
            timer = train_once("SimpleFeedForward", settings[name](), epochs, batches, seed=pair, validation=True)
            seconds[name].append(statistics.median(timer.validation_seconds))
    medians = {name: 1000 * statistics.median(values) for name, values in seconds.items()}
    return {
        "estimator": "SimpleFeedForward",
        "pairs": pairs,
        "milliseconds_per_validation": medians,
        "runs_milliseconds_per_validation": {
            name: [1000 * value for value in values] for name, values in seconds.items()
        },
        "ratio_to_no_callback": {name: value / medians["no callback"] for name, value in medians.items()},
    }


def format_table(result: Dict[str, Any]) -> str:
    """Two lines: per-batch times, overhead and the noise it is compared with."""
    times = result["milliseconds_per_batch"]
    return (
        f"{result['estimator']} per batch: EMA off {times['ema off']:.3f} ms, EMA on {times['ema on']:.3f} ms "
        f"(medians of {result['pairs']} interleaved runs each)\n"
        f"overhead {result['overhead_percent']:+.2f}% (median of the pairs; pairs "
        f"{', '.join(f'{value:+.1f}' for value in result['paired_overhead_percent'])}); run-to-run spread of the "
        f"EMA-off runs (max-min)/median {result['run_to_run_spread_percent']:.1f}%"
    )


def format_alternating_table(result: Dict[str, Any]) -> str:
    """One line: the overhead from alternating blocks, with the spread of the block pairs."""
    low, high = result["paired_overhead_quartiles_percent"]
    return (
        f"{result['estimator']} within one run ({result['blocks']} pairs of {result['batches_per_block']}-batch "
        f"blocks, {result['milliseconds_per_batch']['ema off']:.3f} ms a batch without averaging): overhead "
        f"{result['overhead_percent']:+.2f}% (total time of the averaging blocks over the others); median pair "
        f"{result['median_paired_overhead_percent']:+.2f}%, quartiles {low:+.1f}% to {high:+.1f}%"
    )


def format_validation_table(result: Dict[str, Any]) -> str:
    """One line per setting: milliseconds per validation pass and the ratio to no callback."""
    lines = [f"{result['estimator']} validation pass (medians of {result['pairs']} runs each):"]
    for name, milliseconds in result["milliseconds_per_validation"].items():
        lines.append(f"  {name:<18} {milliseconds:8.2f} ms  x{result['ratio_to_no_callback'][name]:.2f}")
    return "\n".join(lines)
