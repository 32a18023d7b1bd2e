"""Gluon networks as hosts: their parameters by stable names, and validation passes with the averages in.

Used by the GluonTS callbacks and by plain Gluon loops alike; nothing here
imports GluonTS.
"""

import collections
import math
from typing import Any, Callable, Deque, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from .parameters import NamedParameters, named_parameters

__all__ = ["AveragedValidation", "ForwardHook", "TrainingInputs", "element_losses", "mean_loss", "network_parameters"]


def network_parameters(network: mx.gluon.Block) -> NamedParameters:
    """All of ``network.collect_params()``, named without the network's own prefix.

    Gluon numbers block prefixes per process (``...network0_``,
    ``...network1_``), so full names differ between two runs in one process;
    names relative to the network do not, and a resumed run's checkpoints
    match the earlier run's.
    """
    prefix = network.prefix
    return named_parameters(
        (name[len(prefix) :] if prefix and name.startswith(prefix) else name, parameter)
        for name, parameter in network.collect_params().items()
    )


class ForwardHook:
    """Runs ``_pass`` in place of a network's forward pass while attached (the network's own ``forward`` after)."""

    def __init__(self) -> None:
        self._network: Optional[mx.gluon.Block] = None

    def attach(self, network: mx.gluon.Block) -> None:
        """Start on ``network``."""
        self.detach()
        original_forward = network.forward

        def hooked_forward(*inputs: Any) -> Any:
            return self._pass(original_forward, inputs)

        network.forward = hooked_forward  # Block.__call__ calls self.forward: this instance attribute first
        self._network = network

    def detach(self) -> None:
        """Stop: the network's own ``forward`` again."""
        if self._network is not None and "forward" in vars(self._network):
            del self._network.forward
        self._network = None

    def _pass(self, forward: Callable[..., Any], inputs: Sequence[Any]) -> Any:
        raise NotImplementedError


class AveragedValidation(ForwardHook):
    """Validation forward passes with the averages swapped in, one pass at a time.

    While attached to a network, each forward pass of it (the trainer's
    validation batches) runs with the averages swapped in by
    ``swap_average``, and ``swap_raw`` puts the raw weights back right after
    the pass, also when it raises (the hook then detaches itself). Between
    batches, and whatever happens, the network holds its raw weights. With
    ``measure_raw``, a second pass on the same inputs measures the raw
    weights' loss, summarised as GluonTS's trainer does: the first output
    (or the only one), averaged over all its elements; batches whose
    averaged loss is not finite are skipped, as the trainer skips them.

    Parameters
    ----------
    swap_average, swap_raw
        Put the averages in the network, and the raw weights back.
    measure_raw
        Also measure the raw weights' loss (one more forward pass a batch).
    keep_inputs
        Keep the inputs of the passes since :meth:`attach` in ``inputs``
        (references to the batches, no copies), for evaluating other weights
        on the same validation data later.
    """

    def __init__(
        self,
        swap_average: Callable[[], None],
        swap_raw: Callable[[], None],
        measure_raw: bool,
        keep_inputs: bool = False,
    ) -> None:
        self._swap_average = swap_average
        self._swap_raw = swap_raw
        self.measure_raw = measure_raw
        self.keep_inputs = keep_inputs
        super().__init__()
        self.inputs: List[Tuple[Any, ...]] = []
        self._total = 0.0
        self._count = 0

    def attach(self, network: mx.gluon.Block) -> None:
        """Start on ``network`` (forgetting any earlier measurement)."""
        super().attach(network)
        self._total, self._count, self.inputs = 0.0, 0, []

    @property
    def raw_loss(self) -> float:
        """Mean raw loss per element over the measured batches (NaN before any)."""
        return self._total / self._count if self._count else math.nan

    def _pass(self, forward: Callable[..., Any], inputs: Sequence[Any]) -> Any:
        if self.keep_inputs:
            self.inputs.append(tuple(inputs))
        with mx.autograd.pause():  # validation runs inside autograd.record(): no swapping there
            self._swap_average()
        try:
            output = forward(*inputs)
        except BaseException:
            self.detach()
            raise
        finally:
            with mx.autograd.pause():
                self._swap_raw()
        if self.measure_raw and math.isfinite(float(_loss_of(output).sum().asscalar())):
            with mx.autograd.pause():
                raw_loss = _loss_of(forward(*inputs))
            self._total += float(raw_loss.sum().asscalar())
            self._count += raw_loss.size
        return output


def _loss_of(output: Any) -> mx.nd.NDArray:
    """The loss among a network's outputs: the first of several, as GluonTS takes it."""
    return output[0] if isinstance(output, (list, tuple)) else output


def mean_loss(network: mx.gluon.Block, batches: Sequence[Sequence[Any]]) -> float:
    """The network's mean loss per element over ``batches``, as GluonTS's trainer sums validation (NaN for none)."""
    losses = element_losses(network, batches)
    return float(losses.mean()) if losses.size else math.nan


def element_losses(network: mx.gluon.Block, batches: Sequence[Sequence[Any]]) -> np.ndarray:
    """Every element of the network's loss over ``batches``, flat, as float64.

    Predict mode, no gradient; batches whose loss is not finite are skipped,
    as GluonTS's trainer skips them.
    """
    kept: List[np.ndarray] = []
    with mx.autograd.pause(train_mode=False):
        for inputs in batches:
            loss = _loss_of(network(*inputs)).asnumpy().astype(np.float64).reshape(-1)
            if math.isfinite(float(loss.sum())):
                kept.append(loss)
    return np.concatenate(kept) if kept else np.zeros(0)


class TrainingInputs(ForwardHook):
    """Keeps the inputs of a network's last ``count`` forward passes (references to the batches, no copies).

    Attached during training epochs, it gives a host that sees no batches
    (GluonTS's callbacks) the training batches for
    :func:`~modavg_plugin.batchnorm.update_bn`.
    """

    def __init__(self, count: int) -> None:
        super().__init__()
        self.inputs: Deque[Tuple[Any, ...]] = collections.deque(maxlen=count)

    def _pass(self, forward: Callable[..., Any], inputs: Sequence[Any]) -> Any:
        self.inputs.append(tuple(inputs))
        return forward(*inputs)
