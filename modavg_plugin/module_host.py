"""Reaching into an MXNet ``Module``: its device arrays, writing arrays into it, its optimiser state, the final broadcast.

``Module`` has no public access to its device arrays: ``get_params()``
copies every parameter to the CPU (averaging over devices) on each call.
The adapter reads the arrays the module updates in place, those of its
executor group (``module._exec_group``), and the optimiser's step counters,
which ``Module.save_optimizer_states`` leaves out (Adam's bias correction
and learning-rate schedules read them: without them a resumed Adam run
drifts away). This module is the one place the plugin reaches into a host's
private state.
"""

import itertools
import json
import os
import tempfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import mxnet as mx

from .batchnorm import RunningStatistics, refresh_statistics
from .files import TEMPORARY_PREFIX
from .parameters import DeviceArrays, NamedParameters, write_array, write_into_parameters

__all__ = [
    "ARG_PREFIX",
    "AUX_PREFIX",
    "bind_from_arrays",
    "broadcast_from_rank_zero",
    "checkpoint_names",
    "distributed_kvstore",
    "load_optimizer_state",
    "metric_values",
    "module_arrays",
    "optimizer_state",
    "update_module_bn",
    "write_module_arrays",
]

ARG_PREFIX = "arg:"
AUX_PREFIX = "aux:"


def module_arrays(module: mx.mod.Module) -> NamedParameters:
    """``("arg:NAME", arrays)`` per parameter and ``("aux:NAME", arrays)`` per auxiliary state.

    Each entry follows the executor group's device copies (first device
    first), the arrays ``Module.fit`` updates in place.
    """
    if not (module.binded and module.params_initialized):
        raise ValueError("the module must be bound and its parameters initialised (Module.fit does both)")
    group = getattr(module, "_exec_group", None)
    if group is None or not hasattr(group, "param_arrays"):
        raise TypeError(f"{type(module).__name__} has no executor group: ModuleAveraging supports mx.mod.Module")

    def copies(kind: str, index: int) -> Callable[[], List[mx.nd.NDArray]]:
        return lambda: getattr(module._exec_group, kind)[index]

    pairs = [
        (ARG_PREFIX + name, DeviceArrays(copies("param_arrays", index))) for index, name in enumerate(group.param_names)
    ]
    pairs += [
        (AUX_PREFIX + name, DeviceArrays(copies("aux_arrays", index), grad_req="null"))
        for index, name in enumerate(group.aux_names)
    ]
    return pairs


def checkpoint_names(arg_params: Mapping[str, mx.nd.NDArray], aux_params: Mapping[str, mx.nd.NDArray]) -> Dict:
    """One mapping with Module checkpoint names: ``arg:NAME`` and ``aux:NAME``."""
    named = {ARG_PREFIX + name: value for name, value in arg_params.items()}
    named.update({AUX_PREFIX + name: value for name, value in aux_params.items()})
    return named


def write_module_arrays(module: mx.mod.Module, arrays: Mapping[str, mx.nd.NDArray]) -> None:
    """Write ``arg:``/``aux:`` arrays into every device copy the module computes with, all checked first.

    Written in place (:func:`~modavg_plugin.parameters.write_array`, safe for
    arrays MKLDNN reordered), never through ``set_params``, whose ``copyto``
    fails on them; the module's own CPU copy is then marked stale, so
    ``get_params()`` and ``save_checkpoint`` read the new values.
    """
    tracked = module_arrays(module)
    unknown = sorted(set(arrays) - {name for name, _ in tracked})
    if unknown:
        raise KeyError(f"the averaged weights have {unknown[0]!r}, which the module does not have")
    write_into_parameters(arrays, [(name, p) for name, p in tracked if name in arrays], "the averaged weights")
    module._params_dirty = True  # no public way to say the devices hold newer values than its CPU copy


def bind_from_arrays(
    module: mx.mod.Module,
    raw: Mapping[str, mx.nd.NDArray],
    train_data: mx.io.DataIter,
    fit_arguments: Mapping[str, Any],
) -> None:
    """Bind the module and initialise its parameters (from ``raw``) and optimiser, as ``Module.fit`` would."""
    module.bind(data_shapes=train_data.provide_data, label_shapes=train_data.provide_label, for_training=True)
    arg_params = {name[len(ARG_PREFIX) :]: value for name, value in raw.items() if name.startswith(ARG_PREFIX)}
    aux_params = {name[len(AUX_PREFIX) :]: value for name, value in raw.items() if name.startswith(AUX_PREFIX)}
    module.init_params(arg_params=arg_params, aux_params=aux_params, force_init=True)
    module.init_optimizer(
        kvstore=fit_arguments.get("kvstore", "local"),
        optimizer=fit_arguments.get("optimizer", "sgd"),
        optimizer_params=fit_arguments.get("optimizer_params", (("learning_rate", 0.01),)),
    )


def metric_values(metric: Optional[mx.metric.EvalMetric]) -> Dict[str, float]:
    """Every metric's value by name (the first is the epoch's score)."""
    if metric is None:
        return {}
    return {str(name): float(value) for name, value in metric.get_name_value()}


def distributed_kvstore(module: mx.mod.Module) -> Optional[mx.kvstore.KVStore]:
    """The module's kvstore when it is distributed (``dist_*``), else ``None``."""
    kvstore = getattr(module, "_kvstore", None)  # set by Module.init_optimizer; no public accessor
    return kvstore if kvstore is not None and "dist" in kvstore.type else None


def broadcast_from_rank_zero(
    kvstore: mx.kvstore.KVStore, arrays: Mapping[str, mx.nd.NDArray]
) -> Dict[str, mx.nd.NDArray]:
    """Rank 0's ``arrays`` on every worker (a collective: every worker calls it with the same names).

    Uses ``KVStore.broadcast`` (init from rank 0, then pull) under keys of
    their own, ``modavg-final:NAME``: string keys, like ``Module``'s.
    """
    names = sorted(arrays)
    received = {name: arrays[name].copy() for name in names}
    keys = [f"modavg-final:{name}" for name in names]
    kvstore.broadcast(keys, [arrays[name] for name in names], out=[received[name] for name in names])
    mx.nd.waitall()
    return received


def optimizer_state(module: mx.mod.Module, folder: str) -> Tuple[Dict[str, Any], Dict[str, bytes]]:
    """The optimiser's step counters (JSON-ready) and ``Module.save_optimizer_states``'s bytes, for the state file."""
    optimizer = getattr(module, "_optimizer", None)  # no public accessor
    extras = {"optimizer_update_counts": _update_counts(optimizer)} if optimizer is not None else {}
    handle, path = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, dir=folder)
    os.close(handle)
    try:
        module.save_optimizer_states(path)  # writes only to a file
        with open(path, "rb") as file:
            return extras, {"optimizer": file.read()}
    finally:
        os.remove(path)


def load_optimizer_state(
    module: mx.mod.Module, extras: Mapping[str, Any], blobs: Mapping[str, bytes], folder: str
) -> None:
    """Put :func:`optimizer_state`'s parts back into a module whose optimiser is initialised."""
    if "optimizer" in blobs:
        handle, path = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, dir=folder)
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(blobs["optimizer"])
            module.load_optimizer_states(path)
        finally:
            os.remove(path)
    if "optimizer_update_counts" in extras:
        _restore_update_counts(module._optimizer, extras["optimizer_update_counts"])


def _update_counts(optimizer: mx.optimizer.Optimizer) -> Dict[str, Any]:
    counts = {
        str(device): {str(index): int(count) for index, count in by_index.items()}
        for device, by_index in optimizer._all_index_update_counts.items()
    }
    return {"num_update": int(optimizer.num_update), "index_update_counts": counts}


def _restore_update_counts(optimizer: mx.optimizer.Optimizer, saved: Mapping[str, Any]) -> None:
    optimizer.num_update = int(saved["num_update"])
    optimizer._all_index_update_counts = {
        int(device): {int(index): int(count) for index, count in by_index.items()}
        for device, by_index in saved["index_update_counts"].items()
    }
    optimizer._index_update_count = optimizer._all_index_update_counts.setdefault(0, {})


def update_module_bn(module: mx.mod.Module, train_data: mx.io.DataIter, count: int) -> int:
    """Recompute the module's BatchNorm running statistics from the first ``count`` batches of ``train_data``.

    Each batch runs ``forward_backward`` (MXNet updates the statistics in
    the backward pass; the gradients are put back as they were); see
    :mod:`modavg_plugin.batchnorm`. Returns the number of batches used.
    """
    group = module._exec_group
    gradients = [array for arrays in group.grad_arrays for array in arrays if array is not None]
    kept = [gradient.copy() for gradient in gradients]

    def training_pass(batch: mx.io.DataBatch) -> Callable[[], None]:
        return lambda: module.forward_backward(batch)

    train_data.reset()
    try:
        batches = itertools.islice(iter(train_data), count)
        used = refresh_statistics(_module_statistics(module), (training_pass(batch) for batch in batches))
    finally:
        for gradient, saved in zip(gradients, kept):
            write_array(saved, gradient)
        train_data.reset()
    module._params_dirty = True  # the running statistics on the devices are newer than its CPU copy
    return used


def _module_statistics(module: mx.mod.Module) -> List[RunningStatistics]:
    """The running statistics of the symbol's BatchNorm layers (not ``use_global_stats``), on every device."""
    group = module._exec_group
    layers = []
    for node in json.loads(module.symbol.tojson())["nodes"]:
        attributes = node.get("attrs", {})
        if node["op"] != "BatchNorm" or attributes.get("use_global_stats", "False") == "True":
            continue
        mean, variance = (
            group.aux_names.index(f"{node['name']}_moving_mean"),
            group.aux_names.index(f"{node['name']}_moving_var"),
        )
        layers.append(
            RunningStatistics(
                node["name"],
                lambda index=mean: group.aux_arrays[index],
                lambda index=variance: group.aux_arrays[index],
                float(attributes.get("momentum", 0.9)),
            )
        )
    return layers
