"""BatchNorm running statistics recomputed for the weights a network now holds (PyTorch's ``update_bn``).

Averaged weights do not match the running mean and variance of any single
iterate: the statistics that go with them are those of the activations the
averaged weights produce. :func:`refresh_statistics` recomputes them as the
exact mean of per-batch statistics over some training batches: before each
batch every running statistic is set to 0, so the batch's training pass
leaves ``(1 - momentum) * batch statistic`` in it, which is read back and
summed; at the end each holds the mean over the batches (and devices). The
layers' momentum is never changed, so hybridized networks work as they are.
MXNet 1.x updates running statistics in the *backward* pass of a training
step (not in the forward pass), so each batch runs forward and backward; the
gradients it writes are put back as they were.
:func:`update_bn` does this for a Gluon network; the Module adapter for a
``Module``.
"""

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Sequence

import mxnet as mx
import numpy as np

from .parameters import write_array

__all__ = ["RunningStatistics", "batchnorm_statistics", "refresh_statistics", "update_bn"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunningStatistics:
    """One BatchNorm layer's running statistics: every device copy of its mean and variance, and its momentum."""

    name: str
    means: Callable[[], List[mx.nd.NDArray]]
    variances: Callable[[], List[mx.nd.NDArray]]
    momentum: float


def refresh_statistics(statistics: Sequence[RunningStatistics], passes: Iterable[Callable[[], None]]) -> int:
    """Set every running mean and variance to the mean of its per-batch statistics over ``passes``.

    Each of ``passes`` runs one training-mode forward pass of one batch (on
    every device). Returns the number of passes; with none, or no statistics,
    nothing changes.
    """
    if not statistics:
        return 0
    kept = [[copy.copy() for copy in layer.means() + layer.variances()] for layer in statistics]
    sums = [[np.zeros(copy.shape, np.float64) for copy in copies] for copies in kept]
    count = 0
    for run_pass in passes:
        for layer in statistics:
            for copy in layer.means() + layer.variances():
                write_array(mx.nd.zeros(copy.shape, ctx=copy.context, dtype=copy.dtype), copy)
        run_pass()
        mx.nd.waitall()  # BatchNorm's backward writes the statistics without the engine knowing: reading must wait
        for layer, totals in zip(statistics, sums):
            for total, copy in zip(totals, layer.means() + layer.variances()):
                total += copy.asnumpy().astype(np.float64) / (1.0 - layer.momentum)
        count += 1
    for layer, totals, saved in zip(statistics, sums, kept):
        copies = layer.means() + layer.variances()
        devices = len(layer.means())
        for index, copy in enumerate(copies):
            if count == 0:
                write_array(saved[index], copy)
                continue
            same_kind = totals[:devices] if index < devices else totals[devices:]  # this statistic on every device
            mean = np.mean(same_kind, axis=0) / count
            write_array(mx.nd.array(mean, ctx=copy.context, dtype=copy.dtype), copy)
    return count


def batchnorm_statistics(network: mx.gluon.Block) -> List[RunningStatistics]:
    """The running statistics of every BatchNorm layer in ``network`` that keeps them (not ``use_global_stats``)."""
    layers: List[RunningStatistics] = []

    def visit(block: mx.gluon.Block) -> None:
        if isinstance(block, mx.gluon.nn.BatchNorm) and not block._kwargs.get("use_global_stats", False):
            layers.append(
                RunningStatistics(
                    block.name,
                    block.running_mean.list_data,
                    block.running_var.list_data,
                    float(block._kwargs.get("momentum", 0.9)),  # no public accessor
                )
            )

    network.apply(visit)
    return layers


def update_bn(network: mx.gluon.Block, batches: Iterable[Any], ctx: Any = None) -> int:
    """Recompute the BatchNorm running statistics of ``network`` for the weights it holds, from ``batches``.

    Use it after putting averaged weights into a network with BatchNorm
    layers (as PyTorch's ``torch.optim.swa_utils.update_bn``): each batch is
    one training pass (forward and backward, as MXNet updates the statistics
    in the backward pass), its statistics are averaged exactly (see the
    module docstring). The parameters and their gradients are left as they
    were; dropout and other training-mode layers run as in training.

    Parameters
    ----------
    network
        The network, with the weights to compute statistics for.
    batches
        The inputs of each forward pass: an NDArray, or a tuple of NDArrays
        passed as ``network(*batch)`` (e.g. the training data's inputs); the
        first output (or the only one) is differentiated, as a loss.
    ctx
        The device(s) to run on, a context or a list (each batch split evenly
        over them); ``None``: the batches' own.

    Returns
    -------
    int
        The number of batches used (0: nothing changed).
    """
    contexts = [ctx] if isinstance(ctx, mx.Context) else list(ctx or [])

    def training_pass(batch: Any) -> Callable[[], None]:
        inputs = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)

        def run_pass() -> None:
            device_inputs = [inputs]
            if contexts:
                slices = [mx.gluon.utils.split_and_load(x, contexts, even_split=False) for x in inputs]
                device_inputs = list(zip(*slices))
            for one in device_inputs:
                with mx.autograd.record():
                    output = network(*one)
                mx.autograd.backward([output[0] if isinstance(output, (tuple, list)) else output])

        return run_pass

    gradients = _gradients(network)
    kept = [gradient.copy() for gradient in gradients]
    try:
        count = refresh_statistics(batchnorm_statistics(network), (training_pass(batch) for batch in batches))
    finally:
        for gradient, saved in zip(gradients, kept):
            write_array(saved, gradient)
    mx.nd.waitall()
    logger.info("recomputed the BatchNorm running statistics from %d batches", count)
    return count


def _gradients(network: mx.gluon.Block) -> List[mx.nd.NDArray]:
    """Every device copy of every gradient the network keeps (parameters with ``grad_req`` other than ``"null"``)."""
    return [
        gradient
        for parameter in network.collect_params().values()
        if parameter.grad_req != "null"
        for gradient in parameter.list_grad()
    ]
