"""Reading and writing Gluon parameters in place, on every device copy.

Nothing here calls ``Parameter.set_data``: with a trainer that updates on the
kvstore (several devices, distributed) ``set_data`` resets the kvstore, which
throws away optimiser state or raises. Values are copied into the arrays the
parameter already owns instead.
"""

import fnmatch
import os
import re
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import mxnet as mx
import numpy as np

from .checks import CheckpointError
from .dtypes import is_bfloat16
from .params_files import load_params
from .registry import ConfigurationError

__all__ = [
    "DeviceArrays",
    "NamedParameters",
    "as_context",
    "check_compatible",
    "device_copies",
    "is_trainable",
    "load_weights",
    "named_parameters",
    "readable_in_place",
    "select_by_name",
    "write_array",
    "write_into_parameters",
]


class DeviceArrays:
    """The device copies of an array that is not a Gluon ``Parameter``, e.g. a Module's executor arrays.

    Offers what the averages use of a ``Parameter``: ``list_data()``,
    ``shape`` and ``dtype``.

    Parameters
    ----------
    source
        Returns the current device copies (first copy first). It is called on
        every use, so arrays the host re-creates are followed.
    grad_req
        ``"write"`` for trained arrays, ``"null"`` for states the optimiser
        does not update (a Module's auxiliary states), as Gluon names them.
    """

    def __init__(self, source: Callable[[], Sequence[mx.nd.NDArray]], grad_req: str = "write") -> None:
        self._source = source
        self.grad_req = grad_req

    def list_data(self) -> List[mx.nd.NDArray]:
        return list(self._source())

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self._source()[0].shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._source()[0].dtype)


ParameterLike = Union[mx.gluon.Parameter, DeviceArrays]
NamedParameters = List[Tuple[str, ParameterLike]]


def named_parameters(parameters: Iterable[Tuple[str, ParameterLike]]) -> NamedParameters:
    """Materialise ``(name, Parameter)`` pairs, refusing duplicates and uninitialised ones."""
    pairs = list(parameters)
    seen = set()
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[1], (mx.gluon.Parameter, DeviceArrays))):
            raise TypeError(
                "parameters must be (name, mx.gluon.Parameter) pairs, e.g. net.collect_params().items(), "
                f"or (name, DeviceArrays) pairs; got {pair!r}"
            )
        name, parameter = pair
        if name in seen:
            raise ValueError(f"parameter name {name!r} is given twice")
        seen.add(name)
        device_copies(name, parameter)
    return pairs


def select_by_name(
    parameters: NamedParameters, include: Optional[Sequence[str]], exclude: Optional[Sequence[str]]
) -> NamedParameters:
    """The parameters whose name matches a pattern of ``include`` (all when ``None``) and none of ``exclude``.

    Patterns are shell-style (:mod:`fnmatch`, case-sensitive): ``"*weight"``,
    ``"*batchnorm*"``, ``"dense0_*"``. A pattern that matches no parameter is
    an error (a typo would otherwise silently change what is averaged), and so
    is a selection that leaves nothing.
    """
    names = [name for name, _ in parameters]
    for option, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns or ():
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                shown = ", ".join(repr(name) for name in names[:5]) + (", ..." if len(names) > 5 else "")
                raise ConfigurationError(
                    f"{option} pattern {pattern!r} matches no parameter; the names are like {shown}"
                )
    selected = [
        (name, parameter)
        for name, parameter in parameters
        if (include is None or _matches(name, include)) and not _matches(name, exclude or ())
    ]
    if not selected:
        raise ConfigurationError(
            f"include={list(include or [])} and exclude={list(exclude or [])} leave no parameter to average"
        )
    return selected


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def is_trainable(parameter: ParameterLike) -> bool:
    """Whether the optimiser updates ``parameter`` (``grad_req`` is not ``"null"``, e.g. not BatchNorm's running statistics)."""
    return getattr(parameter, "grad_req", "write") != "null"


def device_copies(name: str, parameter: ParameterLike) -> List[mx.nd.NDArray]:
    """Every device copy of ``parameter``; a clear error if it has no data yet."""
    try:
        return parameter.list_data()
    except mx.gluon.parameter.DeferredInitializationError:
        raise ValueError(
            f"parameter {name!r} is not initialised yet (deferred initialisation): "
            "run one forward pass before tracking it"
        ) from None
    except RuntimeError as error:
        raise ValueError(f"parameter {name!r} has no data: {error}") from None


def first_copies(parameters: Sequence[ParameterLike]) -> List[mx.nd.NDArray]:
    """The first device copy of each parameter, as the averages read them every step.

    Gluon ``Parameter``s are read from their list of device copies directly:
    ``list_data()`` checks the storage type and the initialisation on every
    call (0.5 µs a parameter, 1 ms a step for 2,000 of them). MXNet 1.9 only
    ever replaces that list, never changes it in place, and the update groups
    notice new arrays. Anything else (uninitialised, :class:`DeviceArrays`)
    goes through :func:`device_copies` and its errors.
    """
    try:
        return [parameter._data[0] for parameter in parameters]  # type: ignore[union-attr]
    except (AttributeError, TypeError):
        return [device_copies(getattr(parameter, "name", "?"), parameter)[0] for parameter in parameters]


CONTEXT_PATTERN = re.compile(r"^(cpu|gpu|cpu_pinned|cpu_shared)(?:\((\d+)\))?$")
HOST_DEVICE_TYPES = ("cpu", "cpu_pinned", "cpu_shared")


def as_context(context: Union[None, str, mx.Context]) -> Optional[mx.Context]:
    """``None``, an ``mx.Context``, or one from text such as ``"cpu"``, ``"cpu(0)"``, ``"gpu(1)"``."""
    if context is None or isinstance(context, mx.Context):
        return context
    match = CONTEXT_PATTERN.match(str(context).strip()) if isinstance(context, str) else None
    if match is None:
        raise ValueError(
            f"shadow_context must be an mx.Context or text like 'cpu', 'cpu(0)', 'gpu(1)'; got {context!r}"
        )
    return mx.Context(match.group(1), int(match.group(2) or 0))


def readable_in_place(value_context: mx.Context, context: mx.Context) -> bool:
    """Whether code on ``context`` reads arrays on ``value_context`` where they are (same context, or both host memory)."""
    both_host = value_context.device_type in HOST_DEVICE_TYPES and context.device_type in HOST_DEVICE_TYPES
    return value_context == context or both_host


def check_compatible(values: Mapping[str, mx.nd.NDArray], parameters: NamedParameters, source: str) -> None:
    """Raise, naming the key and ``source``, unless ``values`` fits ``parameters`` exactly."""
    for name, parameter in parameters:
        if name not in values:
            raise KeyError(f"{source} has no value for parameter {name!r}")
        if tuple(values[name].shape) != tuple(parameter.shape):
            raise ValueError(
                f"{source}: parameter {name!r} has shape {tuple(values[name].shape)}, "
                f"the network expects {tuple(parameter.shape)}"
            )


def write_into_parameters(values: Mapping[str, mx.nd.NDArray], parameters: NamedParameters, source: str) -> None:
    """Copy ``values[name]`` into every device copy of each parameter.

    Everything is checked before anything is written, so on error the network
    keeps the weights it had. Values are cast to each copy's dtype.
    """
    check_compatible(values, parameters, source)
    for name, parameter in parameters:
        for copy in device_copies(name, parameter):
            write_array(values[name], copy)


def write_array(value: mx.nd.NDArray, target: mx.nd.NDArray) -> None:
    """Copy ``value`` into the existing array ``target`` (same handle), whatever memory layout MXNet left it in.

    Every write into a network goes through here. On the CPU, MKLDNN may have
    reordered a convolution weight in place into a blocked layout during an
    inference pass, and ``copyto`` into such an array fails
    (``Check failed: to.IsDefaultData()``); an operator writing into
    ``out=target`` replaces the layout instead. Values are cast to
    ``target``'s dtype and moved to its device.
    """
    if value.context != target.context:
        value = value.as_in_context(target.context)
    if value.dtype == target.dtype:
        mx.nd.identity(value, out=target)
    elif is_bfloat16(target.dtype):  # cast truncates to bfloat16; amp_cast rounds (with MKLDNN: to nearest, even)
        mx.nd.amp_cast(value, dtype=target.dtype, out=target)
    else:
        mx.nd.cast(value, dtype=target.dtype, out=target)


def load_weights(network: mx.gluon.Block, source: Union[str, Mapping[str, mx.nd.NDArray]]) -> None:
    """Write a checkpoint this library saved (a ``.params`` path, or arrays by name) into ``network``, in place.

    Use it to put an averaged or rebuilt checkpoint into a network or a
    GluonTS predictor's ``prediction_net``. The files name parameters
    relative to the training network (``dense0_weight``), while a network's
    own names carry a prefix: Gluon's per-process one, or, in a GluonTS
    predictor, the training network's, whose parameters it shares (so
    ``load_parameters`` refuses them). Each parameter is matched with the
    longest array name its own name ends with, and the prefix left over must
    be the same for every parameter. Values are copied into every device
    copy (never ``set_data``), after every name and shape is checked.

    Raises
    ------
    CheckpointError
        A parameter has no array, an array matches no parameter, or the
        prefixes left over differ (naming the parameter or array).
    """
    arrays = load_params(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else dict(source)
    label = str(source) if isinstance(source, (str, os.PathLike)) else "the arrays given"
    parameters = list(network.collect_params().items())
    saved_name_of: Dict[str, str] = {}
    for full_name, _ in parameters:
        endings = [name for name in arrays if full_name.endswith(name)]
        if not endings:
            raise CheckpointError(
                f"{label} has no array for parameter {full_name!r} (array names are like {sorted(arrays)[:3]})"
            )
        saved_name_of[full_name] = max(endings, key=len)
    prefixes = {full_name[: len(full_name) - len(name)] for full_name, name in saved_name_of.items()}
    unused = sorted(set(arrays) - set(saved_name_of.values()))
    if unused:
        raise CheckpointError(f"{label}: array {unused[0]!r} matches no parameter of the network")
    if len(prefixes) > 1:
        raise CheckpointError(
            f"{label}: the network's parameter names do not share one prefix before the saved names: {sorted(prefixes)}"
        )
    write_into_parameters({full_name: arrays[name] for full_name, name in saved_name_of.items()}, parameters, label)
