"""MXNet's symbolic ``Module.fit`` with weight averaging, on scikit-learn's digits.

Data: ``sklearn.datasets.load_digits``, bundled with scikit-learn (nothing is
downloaded): 1,797 8x8 images of hand-written digits, the test set of UCI's
"Optical Recognition of Handwritten Digits" (E. Alpaydin, C. Kaynak, 1998;
UCI lists it under CC BY 4.0; scikit-learn itself is BSD-3-Clause). A fixed
stratified split (seed 0) gives 1,000 training, 397 validation and 400 test
images; pixels are scaled to [0, 1].

Network: 64 -> 64 (BatchNorm, ReLU) -> 10, softmax; SGD with momentum 0.9 and
a deliberately large learning rate (0.2), 30 epochs of 32 batches. One
``Module.fit`` per seed through :class:`modavg_plugin.module.ModuleAveraging`
gives three models: the last iterate (the raw weights Module.fit hands to the
last ``epoch_end_callback``; the adapter does not change training), the EMA
(decay 0.99), and the mean of the 3 per-epoch EMAs with the best validation
accuracy (what the module holds at the end). Test accuracy is reported for
each.

Run ``python examples/module_digits.py``; ``--quick`` is the tiny setting used
by the tests.
"""

import argparse
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from modavg_plugin.module import ModuleAveraging

BATCH_SIZE = 32
FULL_EPOCHS = 30
QUICK_EPOCHS = 2
EMA_DECAY = 0.99
BEST_EPOCHS = 3
METHODS = ("last iterate", f"EMA (decay {EMA_DECAY})", f"mean of {BEST_EPOCHS} best epoch EMAs")

Split = Tuple[np.ndarray, np.ndarray]


def digits_splits() -> Tuple[Split, Split, Split]:
    """Training, validation and test (features in [0, 1], float32 labels), stratified, seed 0."""
    digits = load_digits()
    features, labels = (digits.data / 16.0).astype(np.float32), digits.target.astype(np.float32)
    rest_x, test_x, rest_y, test_y = train_test_split(features, labels, test_size=400, stratify=labels, random_state=0)
    train_x, valid_x, train_y, valid_y = train_test_split(
        rest_x, rest_y, test_size=397, stratify=rest_y, random_state=0
    )
    return (train_x, train_y), (valid_x, valid_y), (test_x, test_y)


def iterator(split: Split, shuffle: bool = False) -> mx.io.NDArrayIter:
    return mx.io.NDArrayIter(split[0], split[1], batch_size=BATCH_SIZE, shuffle=shuffle, label_name="softmax_label")


def network() -> mx.sym.Symbol:
    hidden = mx.sym.FullyConnected(mx.sym.Variable("data"), num_hidden=64, name="fc1")
    hidden = mx.sym.Activation(mx.sym.BatchNorm(hidden, name="bn1"), act_type="relu")
    return mx.sym.SoftmaxOutput(mx.sym.FullyConnected(hidden, num_hidden=10, name="fc2"), name="softmax")


class LastRawWeights:
    """``epoch_end_callback`` keeping the raw parameters of the latest epoch."""

    def __init__(self) -> None:
        self.arg_params: Dict[str, mx.nd.NDArray] = {}
        self.aux_params: Dict[str, mx.nd.NDArray] = {}

    def __call__(self, epoch: int, symbol: mx.sym.Symbol, arg_params: Dict, aux_params: Dict) -> None:
        self.arg_params = {name: value.copy() for name, value in arg_params.items()}
        self.aux_params = {name: value.copy() for name, value in aux_params.items()}


def accuracy(module: mx.mod.Module, split: Split) -> float:
    """Share of ``split`` classified right (``predict`` drops the padding of the last batch; ``score`` would not)."""
    probabilities = module.predict(iterator(split)).asnumpy()
    return float(np.mean(probabilities.argmax(axis=1) == split[1]))


def train_one_seed(seed: int, epochs: int, splits: Tuple[Split, Split, Split]) -> Dict[str, float]:
    """Train once; test accuracy of the last iterate, the EMA and the best-epochs mean."""
    training, validation, test = splits
    mx.random.seed(seed)
    np.random.seed(seed)
    module = mx.mod.Module(network(), context=mx.cpu())
    raw = LastRawWeights()
    with tempfile.TemporaryDirectory() as folder:
        averaging = ModuleAveraging(
            module,
            {"type": "exponential", "decay": EMA_DECAY},
            {"type": "mean", "num_models": BEST_EPOCHS, "metric": "accuracy", "maximize": True},
            checkpoint_prefix=f"{folder}/digits",
        )
        averaging.fit(
            iterator(training, shuffle=True),
            eval_data=iterator(validation),
            epoch_end_callback=raw,
            num_epoch=epochs,
            optimizer="sgd",
            optimizer_params={"learning_rate": 0.2, "momentum": 0.9},
            initializer=mx.init.Xavier(),
            eval_metric="acc",
        )
    results = {METHODS[2]: accuracy(module, test)}
    shadows = averaging.moving_average.shadows
    module.set_params(
        {name[4:]: value for name, value in shadows.items() if name.startswith("arg:")},
        {name[4:]: value for name, value in shadows.items() if name.startswith("aux:")},
    )
    results[METHODS[1]] = accuracy(module, test)
    module.set_params(raw.arg_params, raw.aux_params)
    results[METHODS[0]] = accuracy(module, test)
    return {method: results[method] for method in METHODS}


def print_table(per_seed: Dict[int, Dict[str, float]], epochs: int) -> None:
    width = max(len(method) for method in METHODS)
    print(f"data set: scikit-learn digits (1000 train / 397 validation / 400 test), Module.fit, {epochs} epochs")
    print(f"seed | {'weights':<{width}} | test accuracy")
    for seed, results in per_seed.items():
        for method in METHODS:
            print(f"{seed:>4} | {method:<{width}} | {results[method]:.4f}")
    if len(per_seed) > 1:
        for method in METHODS:
            values = [results[method] for results in per_seed.values()]
            print(f"mean | {method:<{width}} | {np.mean(values):.4f} +- {np.std(values):.4f}")


def parse_arguments(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"tiny setting: {QUICK_EPOCHS} epochs, seed 0")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train per seed, print the table, return ``{"epochs", "results": {seed: {method: accuracy}}}``."""
    arguments = parse_arguments(argv)
    epochs = QUICK_EPOCHS if arguments.quick else FULL_EPOCHS
    seeds: List[int] = [0] if arguments.quick else arguments.seeds
    splits = digits_splits()
    per_seed = {seed: train_one_seed(seed, epochs, splits) for seed in seeds}
    print_table(per_seed, epochs)
    return {"epochs": epochs, "results": per_seed}


if __name__ == "__main__":
    main()
