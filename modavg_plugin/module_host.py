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

import io
import itertools
import json
import pickle  # only to read the optimiser state of old files, through an unpickler that builds arrays only
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import mxnet as mx

from .batchnorm import RunningStatistics, refresh_statistics
from .checks import CheckpointError
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
    expected = checkpoint_names(*_shapes(module))
    saved = {name: tuple(value.shape) for name, value in raw.items()}
    if saved != expected:
        different = sorted(set(saved) ^ set(expected)) or sorted(
            name for name in saved if saved[name] != expected[name]
        )
        name = different[0]
        raise CheckpointError(
            f"the saved weights do not fit this module: {name!r} is {saved.get(name, 'missing')} in the state, "
            f"{expected.get(name, 'missing')} in the module"
        )
    module.init_params(arg_params=arg_params, aux_params=aux_params, force_init=True)
    module.init_optimizer(
        kvstore=fit_arguments.get("kvstore", "local"),
        optimizer=fit_arguments.get("optimizer", "sgd"),
        optimizer_params=fit_arguments.get("optimizer_params", (("learning_rate", 0.01),)),
    )


def _shapes(module: mx.mod.Module) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, Tuple[int, ...]]]:
    """The shapes of a bound module's parameters and auxiliary states, by name."""
    group = module._exec_group
    arg = {name: tuple(arrays[0].shape) for name, arrays in zip(group.param_names, group.param_arrays)}
    aux = {name: tuple(arrays[0].shape) for name, arrays in zip(group.aux_names, group.aux_arrays)}
    return arg, aux


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


def optimizer_state(module: mx.mod.Module) -> Tuple[Dict[str, Any], Dict[str, mx.nd.NDArray]]:
    """The optimiser's state as plain data and arrays, for the run's state file (nothing pickled).

    The updater's per-parameter states (``None``, an NDArray, or tuples and
    lists of them: momentum, Adam's mean and variance...) become arrays
    named ``optimizer:KEY:PATH`` and a JSON description of their nesting;
    the step counters (which ``save_optimizer_states`` leaves out) are plain
    numbers. Empty when the optimiser state lives on a distributed kvstore's
    servers.
    """
    updater = _updater(module)
    if updater is None:
        return {}, {}
    arrays: Dict[str, mx.nd.NDArray] = {}
    layout = {}
    for key, state in updater.states.items():
        name = f"{type(key).__name__}:{key}"
        layout[name] = _describe_state(state, f"{OPTIMIZER_ARRAYS}{name}", arrays)
    extras = {
        "optimizer_type": type(updater.optimizer).__name__,
        "optimizer_states": layout,
        "optimizer_update_counts": _update_counts(updater.optimizer),
    }
    return extras, arrays


def load_optimizer_state(
    module: mx.mod.Module, extras: Mapping[str, Any], arrays: Mapping[str, mx.nd.NDArray], blobs: Mapping[str, bytes]
) -> None:
    """Put :func:`optimizer_state`'s parts back into a module whose optimiser is initialised.

    A state file written before this version holds ``Module.save_optimizer_states``'s
    pickle instead (``blobs["optimizer"]``): it is read by an unpickler that
    builds nothing but NDArrays and plain containers (any other class is
    refused, so no code from the file runs).

    Raises
    ------
    CheckpointError
        The saved state does not fit this module's optimiser (other
        parameters, or a pickle holding anything but arrays).
    """
    updater = _updater(module)
    if updater is None:
        return
    saved_type, current_type = extras.get("optimizer_type"), type(updater.optimizer).__name__
    if saved_type is not None and saved_type != current_type:
        raise CheckpointError(f"the saved optimiser state is {saved_type}'s, and this fit uses {current_type}")
    if "optimizer_states" in extras:
        states = {
            _key(name): _rebuild_state(layout, arrays) for name, layout in dict(extras["optimizer_states"]).items()
        }
    elif "optimizer" in blobs:
        states = _arrays_only_unpickler(blobs["optimizer"])
    else:
        states = None
    if states is not None:
        if not isinstance(states, dict) or (updater.states and set(states) != set(updater.states)):
            raise CheckpointError("the saved optimiser state is for other parameters than this module's")
        updater.states = states
        updater.states_synced = dict.fromkeys(states, False)  # moved to each weight's device at the next update
    if "optimizer_update_counts" in extras:
        _restore_update_counts(module._optimizer, extras["optimizer_update_counts"])


OPTIMIZER_ARRAYS = "optimizer:"


def _updater(module: mx.mod.Module) -> Any:
    """The updater holding the optimiser states: the module's, or its local kvstore's (``None`` when distributed)."""
    if getattr(module, "_update_on_kvstore", False):  # no public accessor
        return getattr(module._kvstore, "_updater", None)
    return getattr(module, "_updater", None)


def _describe_state(state: Any, name: str, arrays: Dict[str, mx.nd.NDArray]) -> Any:
    if state is None:
        return None
    if isinstance(state, mx.nd.NDArray):
        arrays[name] = state
        return {"array": name}
    if isinstance(state, (tuple, list)):
        items = [_describe_state(item, f"{name}.{index}", arrays) for index, item in enumerate(state)]
        return {"tuple" if isinstance(state, tuple) else "list": items}
    raise TypeError(f"optimizer state {name} is a {type(state).__name__}, not arrays")


def _rebuild_state(layout: Any, arrays: Mapping[str, mx.nd.NDArray]) -> Any:
    if layout is None:
        return None
    if isinstance(layout, dict) and len(layout) == 1:
        ((kind, value),) = layout.items()
        if kind == "array" and isinstance(value, str) and value in arrays:
            return arrays[value]
        if kind in ("tuple", "list") and isinstance(value, list):
            items = [_rebuild_state(item, arrays) for item in value]
            return tuple(items) if kind == "tuple" else items
    raise CheckpointError(f"the saved optimiser state is not one this library wrote ({str(layout)[:80]})")


def _key(name: str) -> Any:
    kind, _, key = name.partition(":")
    if kind == "int" and key.lstrip("-").isdigit():
        return int(key)
    if kind == "str":
        return key
    raise CheckpointError(f"the saved optimiser state has a key {name[:80]!r} this library did not write")


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Builds NDArrays and plain containers only: any other class in the pickle is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("mxnet.ndarray.ndarray", "NDArray"):
            return mx.nd.NDArray
        if (module, name) == ("builtins", "bytearray"):  # an NDArray's raw bytes
            return bytearray
        raise CheckpointError(f"the saved optimiser state refers to {module}.{name}; only arrays are read back")


def _arrays_only_unpickler(data: bytes) -> Any:
    try:
        return _ArraysOnlyUnpickler(io.BytesIO(data)).load()
    except CheckpointError:
        raise
    except Exception as error:  # a damaged pickle: any of pickle's many errors
        raise CheckpointError(f"the saved optimiser state cannot be read ({type(error).__name__}: {error})") from None


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
