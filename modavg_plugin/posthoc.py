"""Post-hoc EMA: any power-function EMA, rebuilt after training from a few saved ones.

Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion
Models" (2024), sec. 3. During training, :class:`PostHocSnapshots` keeps a
few power-function EMAs (:class:`~modavg_plugin.averages.PowerMovingAverage`,
by default ``sigma_rel`` 0.05 and 0.10) and now and then saves each as a
*snapshot*. After training, :func:`reconstruct_posthoc` approximates the EMA
of any other width (``sigma_rel`` or ``gamma``) at any saved step by a linear
combination of the snapshots, so the averaging length can be chosen by
validation instead of before training.

The maths is exact and discrete. After ``t`` applies, an average with exponent
``gamma`` gives the weights of training step ``k`` the weight
``w_{t,gamma}(k) = (k**(gamma+1) - (k-1)**(gamma+1)) / t**(gamma+1)`` for
``k <= t`` and 0 after (:func:`power_profile`), so snapshot ``i`` is
``sum_k w_i(k) theta_k`` and ``sum_i x_i snapshot_i = sum_k (sum_i x_i w_i(k)) theta_k``.
:func:`posthoc_coefficients` chooses ``x`` by least squares so that
``sum_i x_i w_i`` is close to the target profile, and reports the L1 norm
``r`` of the difference: the reconstruction then differs from the true
target EMA by at most ``r * max_k |theta_k|``, element by element.

A snapshot folder holds, per save and per tracked average ``index``,
``posthoc-{step:08d}-{index}.params`` (Gluon names) and its record
``posthoc-{step:08d}-{index}-posthoc-info.json``:
``{"params_path": <file name>, "step": t, "gamma": g, "sigma_rel": s}``.
Both are written atomically; reading trusts nothing in the folder (see
:func:`read_posthoc_snapshots`).
"""

import logging
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Type, Union

import mxnet as mx
import numpy as np

from .averages import MAX_SIGMA_REL, PowerMovingAverage, sigma_rel_to_gamma
from .checkpoints import (
    CheckpointError,
    WeightedSum,
    is_finite_file,
    is_inside_folder,
    list_folder_files,
    list_some,
    load_params,
    open_params,
    read_array_names,
    read_json_object,
    reused_file_reason,
    save_json,
    save_params,
    shown_value,
)
from .parameters import ParameterLike
from .params_files import ParamsFileReader, ParamsFormatError
from .registry import ConfigurationError

__all__ = [
    "DEFAULT_SIGMA_RELS",
    "POSTHOC_DEFAULTS",
    "POSTHOC_FOLDER",
    "POSTHOC_INFO_SUFFIX",
    "POSTHOC_STATE_PREFIX",
    "PostHocSnapshots",
    "PosthocPlan",
    "check_output_path",
    "combine_snapshots",
    "plan_posthoc",
    "check_no_earlier_snapshots",
    "posthoc_coefficients",
    "posthoc_options",
    "posthoc_state",
    "posthoc_state_parts",
    "power_profile",
    "read_posthoc_snapshots",
    "reconstruct_posthoc",
    "save_posthoc",
]

logger = logging.getLogger("gluonts.modavg_plugin.posthoc")

DEFAULT_SIGMA_RELS = (0.05, 0.10)
POSTHOC_PREFIX = "posthoc-"
POSTHOC_INFO_SUFFIX = "-posthoc-info.json"
PROFILE_CHUNK_STEPS = 1 << 16  # steps per block of profiles: 40 snapshots x 65,536 steps is 21 MB of float64
POOR_RESIDUAL = 0.1  # a residual above this is logged as a warning: the snapshots cannot express the target


def posthoc_stem(step: int, index: int) -> str:
    """The file-name stem of the snapshot of average ``index`` at ``step``: ``posthoc-{step:08d}-{index}``."""
    return f"{POSTHOC_PREFIX}{step:08d}-{index}"


# Tracking during training ---------------------------------------------------------------------


def check_sigma_rels(sigma_rels: Sequence[float]) -> Tuple[float, ...]:
    """``sigma_rels`` as floats: at least one, distinct, each in ``(0, MAX_SIGMA_REL)``.

    Raises
    ------
    ConfigurationError
        Naming the offending value and the allowed range.
    """
    allowed = f"(0, {MAX_SIGMA_REL:.4f})"
    if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Iterable):
        shown = shown_value(sigma_rels)
        raise ConfigurationError(f"sigma_rels must be a sequence of numbers in {allowed}, got {shown}")
    values = list(sigma_rels)
    if not values:
        raise ConfigurationError(f"sigma_rels must hold at least one number in {allowed}, got none")
    for index, value in enumerate(values):
        if not (_is_real(value) and 0.0 < value < MAX_SIGMA_REL):
            raise ConfigurationError(f"sigma_rels[{index}] must be a number in {allowed}, got {shown_value(value)}")
    for index, value in enumerate(values):
        if value in values[:index]:
            raise ConfigurationError(
                f"sigma_rels must be distinct: {value!r} is at positions {values.index(value)} and {index}"
            )
    return tuple(float(value) for value in values)


def _is_real(value: Any) -> bool:
    """Whether ``value`` is a real number (not a bool) and finite."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


class PostHocSnapshots:
    """A few power-function EMAs tracked together and saved now and then, for post-hoc reconstruction.

    Call :meth:`apply` after every optimiser step and :meth:`save` a few
    dozen times or more over the run, evenly spaced; afterwards
    :func:`reconstruct_posthoc` rebuilds the EMA of any width from the
    saved snapshots. Memory: one copy of the weights per ``sigma_rel``.

    Parameters
    ----------
    parameters
        The ``(name, mx.gluon.Parameter)`` pairs to average, e.g.
        ``net.collect_params().items()``, every one initialised.
    folder
        Where :meth:`save` writes the snapshots (created if missing).
    sigma_rels
        The relative widths of the tracked averages: at least one, distinct,
        each in (0, 0.2887). Two work well: saved 40 times over a run, the
        default 0.05 and 0.10 rebuild widths 0.03 to 0.25 with a residual
        below 0.02 (0.0005 for 0.08).
    shadow_context
        Where the averages live: an ``mx.Context`` or text such as ``"cpu"``;
        ``None``: each parameter's first device copy.

    Examples
    --------
    >>> snapshots = PostHocSnapshots(net.collect_params().items(), "out/posthoc")  # doctest: +SKIP
    >>> trainer.step(batch_size); snapshots.apply()                               # doctest: +SKIP
    >>> if snapshots.num_steps % 1000 == 0: snapshots.save()                      # doctest: +SKIP
    """

    def __init__(
        self,
        parameters: Iterable[Tuple[str, ParameterLike]],
        folder: str,
        sigma_rels: Sequence[float] = DEFAULT_SIGMA_RELS,
        shadow_context: Union[None, str, mx.Context] = None,
    ) -> None:
        self.sigma_rels = check_sigma_rels(sigma_rels)
        self.folder = os.fspath(folder)
        parameters = list(parameters)  # read once per average
        self.averages = [
            PowerMovingAverage(parameters, sigma_rel=sigma_rel, shadow_context=shadow_context)
            for sigma_rel in self.sigma_rels
        ]
        self.last_saved_step = 0

    @property
    def num_steps(self) -> int:
        """How many training steps the averages hold (calls of :meth:`apply`, counting resumed ones)."""
        return self.averages[0].num_applied

    def apply(self) -> None:
        """Add the parameters' current values to every average (call once per training step)."""
        for average in self.averages:
            average.apply()

    def save(self) -> List[str]:
        """Write one snapshot per average at the current step into :attr:`folder`; the ``.params`` paths.

        Each ``.params`` file is written before its record, both atomically,
        so a record always names a complete file. Saving twice at the same
        step overwrites the first snapshot.

        Raises
        ------
        ValueError
            Before the first :meth:`apply` (there is nothing to save).
        OSError
            The folder cannot be created or written.
        """
        step = self.num_steps
        if step < 1:
            raise ValueError("nothing to save: apply() has not been called yet (num_steps is 0)")
        os.makedirs(self.folder, exist_ok=True)
        paths = [self._save_snapshot(index, step) for index in range(len(self.averages))]
        logger.debug("saved %d post-hoc snapshots of step %d in %s", len(paths), step, self.folder)
        self.last_saved_step = step
        return paths

    def save_new(self) -> bool:
        """:meth:`save`, unless nothing was applied or this step is saved already; an ``OSError`` is logged.

        For training loops that must go on when the disk is full: returns
        whether snapshots were written.
        """
        if self.num_steps in (0, self.last_saved_step):
            return False
        try:
            self.save()
        except OSError as error:
            logger.warning("could not save post-hoc EMA snapshots at step %d in %s: %s", self.num_steps, self.folder, error)
            return False
        return True

    def _save_snapshot(self, index: int, step: int) -> str:
        stem = posthoc_stem(step, index)
        params_name = f"{stem}.params"
        params_path = os.path.join(self.folder, params_name)
        average = self.averages[index]
        save_params(params_path, average.shadows)
        record = {"params_path": params_name, "step": step, "gamma": average.gamma, "sigma_rel": self.sigma_rels[index]}
        save_json(os.path.join(self.folder, stem + POSTHOC_INFO_SUFFIX), record)
        return params_path

    def state_dict(self) -> Dict[str, Any]:
        """Plain data to resume from: the widths and each average's state, keyed by its index."""
        return {
            "type": type(self).__name__,
            "sigma_rels": list(self.sigma_rels),
            "averages": {index: average.state_dict() for index, average in enumerate(self.averages)},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` (index keys may also be strings, as after a JSON round trip).

        Raises
        ------
        ValueError
            The state tracks other ``sigma_rels``, or its averages hold
            different numbers of steps.
        KeyError
            An average's state is missing, or has a missing or extra shadow.
        """
        if "averages" not in state:
            raise KeyError("post-hoc state has no 'averages'")
        saved_sigma_rels = [float(value) for value in state.get("sigma_rels", self.sigma_rels)]
        if saved_sigma_rels != list(self.sigma_rels):
            raise ValueError(
                f"post-hoc state tracks sigma_rels {saved_sigma_rels}, this object {list(self.sigma_rels)}"
            )
        states = [self._average_state(state["averages"], index) for index in range(len(self.averages))]
        counts = sorted({int(average_state["num_applied"]) for average_state in states})
        if len(counts) > 1:
            raise ValueError(f"post-hoc state: its averages hold different numbers of steps {counts}")
        for average, average_state in zip(self.averages, states):
            average.load_state_dict(average_state)
        self.last_saved_step = self.num_steps  # the stopped run saved (or chose not to save) this step

    def _average_state(self, averages: Mapping[Any, Any], index: int) -> Mapping[str, Any]:
        for key in (index, str(index)):
            if key in averages:
                if "num_applied" not in averages[key]:
                    raise KeyError(f"post-hoc state of average {index} has no 'num_applied'")
                return averages[key]
        raise KeyError(f"post-hoc state has no average {index} (sigma_rel {self.sigma_rels[index]})")


# Reading a snapshot folder --------------------------------------------------------------------


def read_posthoc_snapshots(folder: str) -> List[Dict[str, Any]]:
    """Every usable ``*-posthoc-info.json`` record in ``folder``, ordered by step, then gamma.

    Each record is the file's JSON object with ``params_path`` made absolute
    and ``info_path`` added. Leftovers of interrupted writes (``.tmp-*``) are
    ignored. A record is skipped, all of them named with their reasons in
    one warning, when its file is larger than 1 MiB, unreadable, not a JSON
    object, when ``params_path`` is not a non-empty string, ``step`` not an
    integer >= 1, ``gamma`` not a finite number > 0, when ``params_path``
    resolves (symbolic links followed) outside ``folder``, when its parameter
    file is missing or has unreadable headers (values are not read here), or
    when an earlier record names the same parameter file.

    Raises
    ------
    CheckpointError
        ``folder`` is not a folder, holds no records, or none is usable (the
        message lists each file and why it was skipped).
    """
    info_names = [name for name in list_folder_files(folder) if name.endswith(POSTHOC_INFO_SUFFIX)]
    if not info_names:
        raise CheckpointError(f"no post-hoc snapshots (*{POSTHOC_INFO_SUFFIX}) in folder {folder}")
    records: List[Dict[str, Any]] = []
    skipped: List[str] = []
    params_files: Dict[str, str] = {}  # real path of each parameter file -> the record naming it
    for name in info_names:
        try:
            record = _read_posthoc_record(folder, name)
            _check_first_use(record, name, params_files)
        except CheckpointError as reason:
            skipped.append(f"{name}: {reason}")
            continue
        records.append(record)
    if not records:
        reasons = list_some(skipped, "; ", "; ")
        raise CheckpointError(
            f"no usable post-hoc snapshot in folder {folder}: all {len(skipped)} records were skipped ({reasons})"
        )
    if skipped:
        logger.warning("skipping %d post-hoc record(s) in %s: %s", len(skipped), folder, list_some(skipped, "; ", "; "))
    return sorted(records, key=lambda record: (record["step"], record["gamma"]))


def _read_posthoc_record(folder: str, name: str) -> Dict[str, Any]:
    """One record, checked, ``params_path`` made absolute, ``info_path`` added; else :class:`CheckpointError` (why)."""
    record = read_json_object(os.path.join(folder, name))
    params_path, step, gamma = record.get("params_path"), record.get("step"), record.get("gamma")
    if not isinstance(params_path, str) or not params_path or "\0" in params_path:
        raise CheckpointError(f"'params_path' must be a non-empty file name, got {_shown_field(record, 'params_path')}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise CheckpointError(f"'step' must be an integer >= 1, got {_shown_field(record, 'step')}")
    if not (_is_real(gamma) and gamma > 0):
        raise CheckpointError(f"'gamma' must be a finite number > 0, got {_shown_field(record, 'gamma')}")
    path = os.path.abspath(os.path.join(folder, params_path))
    if not is_inside_folder(path, folder):
        shown = shown_value(params_path, 200)
        raise CheckpointError(f"'params_path' {shown} resolves to {os.path.realpath(path)}, outside the folder")
    read_array_names(path)  # CheckpointError naming the file if missing or unreadable
    info_path = os.path.join(os.path.abspath(folder), name)
    return {**record, "params_path": path, "gamma": float(gamma), "info_path": info_path}


def _shown_field(record: Mapping[str, Any], key: str) -> str:
    return "nothing" if key not in record else shown_value(record[key])


def _check_first_use(record: Mapping[str, Any], name: str, params_files: Dict[str, str]) -> None:
    """:class:`CheckpointError` if an earlier record names the same parameter file (it would count twice)."""
    reason = reused_file_reason(record["params_path"], name, params_files)
    if reason is not None:
        raise CheckpointError(reason)


# The maths ------------------------------------------------------------------------------------


def power_profile(gamma: float, step: int, positions: Union[Sequence[int], np.ndarray]) -> np.ndarray:
    """The weight a power-function EMA with exponent ``gamma`` gives each of ``positions`` after ``step`` applies.

    ``w(k) = (k**(gamma+1) - (k-1)**(gamma+1)) / step**(gamma+1)`` for
    ``1 <= k <= step`` and 0 for ``k > step``, in float64, computed as
    ``-expm1((gamma+1) log1p(-1/k)) * (k/step)**(gamma+1)`` (no cancellation,
    no overflow for large ``k``). Over ``k = 1..step`` the weights sum to 1.

    Parameters
    ----------
    gamma
        The exponent, a finite number > 0.
    step
        The number of applies, an integer >= 1.
    positions
        The 1-based training steps ``k`` (integers >= 1).
    """
    _check_positive("gamma", gamma, ValueError)
    _check_step("step", step)
    positions = np.asarray(positions, dtype=np.float64)
    if positions.size and positions.min() < 1:
        raise ValueError(f"positions must be integers >= 1, got {positions.min()!r}")
    profile = _profiles(np.array([float(gamma)]), np.array([float(step)]), positions.reshape(-1))[0]
    return profile.reshape(positions.shape)


def _profiles(gammas: np.ndarray, steps: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The profiles of averages ``(gammas[i], steps[i])`` at ``positions``: shape ``(len(gammas), len(positions))``."""
    exponents = (gammas + 1.0)[:, None]
    with np.errstate(divide="ignore"):
        log_previous_fraction = np.log1p(-1.0 / positions)[None, :]  # log((k-1)/k): -inf at k = 1
    increments = -np.expm1(exponents * log_previous_fraction)  # 1 - ((k-1)/k)**(gamma+1)
    fractions = positions[None, :] / steps[:, None]
    scales = np.power(np.minimum(fractions, 1.0), exponents)  # (k/t)**(gamma+1); clipped past t (masked below)
    return np.where(fractions <= 1.0, increments * scales, 0.0)


def _check_positive(name: str, value: Any, error: Type[ValueError]) -> None:
    if not (_is_real(value) and value > 0):
        raise error(f"{name} must be a finite number > 0, got {shown_value(value)}")


def _check_step(name: str, value: Any) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {shown_value(value)}")


def posthoc_coefficients(
    snapshots: Sequence[Tuple[float, int]],
    target_gamma: float,
    target_step: int,
    chunk_steps: int = PROFILE_CHUNK_STEPS,
) -> Tuple[np.ndarray, float]:
    """The least-squares coefficients ``x`` with ``sum_i x_i w_i`` closest to the target profile, and the residual.

    Profiles are the exact discrete ones of :func:`power_profile` over
    ``k = 1..target_step``. The normal equations are accumulated
    ``chunk_steps`` steps at a time (memory: ``len(snapshots) * chunk_steps``
    floats, whatever the run's length) and solved with ``numpy.linalg.lstsq``.

    Parameters
    ----------
    snapshots
        ``(gamma_i, step_i)`` of each saved average; every ``step_i`` at most
        ``target_step`` (a later snapshot holds weights of later steps:
        leave it out).
    target_gamma
        The exponent of the wanted average, a finite number > 0.
    target_step
        The step of the wanted average, an integer >= 1.
    chunk_steps
        Steps per accumulated block.

    Returns
    -------
    Tuple[np.ndarray, float]
        ``x`` (float64, one per snapshot, signed) and the L1 norm of the
        residual profile, ``sum_k |sum_i x_i w_i(k) - w_target(k)|``: the
        reconstruction is within ``residual * max_k |theta_k|`` of the true
        target average, element by element.

    Raises
    ------
    ValueError
        ``snapshots`` is empty, holds a bad ``gamma`` or ``step`` or one
        after ``target_step``; or a target is out of range (naming it).
    """
    _check_positive("target_gamma", target_gamma, ValueError)
    _check_step("target_step", target_step)
    _check_step("chunk_steps", chunk_steps)
    gammas, steps = _checked_snapshots(snapshots, target_step)
    target = (np.array([float(target_gamma)]), np.array([float(target_step)]))
    gram = np.zeros((len(gammas), len(gammas)))
    products = np.zeros(len(gammas))
    for positions in _position_chunks(target_step, chunk_steps):
        profiles = _profiles(gammas, steps, positions)
        gram += profiles @ profiles.T
        products += profiles @ _profiles(*target, positions)[0]
    coefficients = np.linalg.lstsq(gram, products, rcond=None)[0]
    residual = sum(
        float(np.abs(coefficients @ _profiles(gammas, steps, positions) - _profiles(*target, positions)[0]).sum())
        for positions in _position_chunks(target_step, chunk_steps)
    )
    return coefficients, residual


def _checked_snapshots(snapshots: Sequence[Tuple[float, int]], target_step: int) -> Tuple[np.ndarray, np.ndarray]:
    """The snapshots' gammas and steps as float64 arrays, each checked; ``ValueError`` naming the first bad one."""
    pairs = list(snapshots)
    if not pairs:
        raise ValueError("snapshots is empty: nothing to combine")
    for index, (gamma, step) in enumerate(pairs):
        _check_positive(f"the gamma of snapshot {index}", gamma, ValueError)
        _check_step(f"the step of snapshot {index}", step)
        if step > target_step:
            raise ValueError(
                f"snapshot {index} is of step {step}, after target_step {target_step}: "
                "it holds weights of later steps; leave it out"
            )
    return np.array([float(gamma) for gamma, _ in pairs]), np.array([float(step) for _, step in pairs])


def _position_chunks(last: int, chunk_steps: int) -> Iterator[np.ndarray]:
    """The steps ``1..last`` as float64 arrays of at most ``chunk_steps`` values."""
    for start in range(1, last + 1, chunk_steps):
        yield np.arange(start, min(start + chunk_steps, last + 1), dtype=np.float64)


def _sigma_rel_of(gamma: float) -> float:
    """The relative width of the power-function profile with exponent ``gamma`` (Karras et al., eq. 3)."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


# Reconstruction -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PosthocPlan:
    """What a reconstruction combines: the target, the snapshots used and their signed coefficients."""

    folder: str
    gamma: float
    sigma_rel: float
    step: int
    snapshots: Tuple[Dict[str, Any], ...]  # records of read_posthoc_snapshots, by step then gamma
    coefficients: Tuple[float, ...]
    residual: float  # sum_k |combined profile(k) - target profile(k)|

    @property
    def paths(self) -> List[str]:
        """The ``.params`` files combined, in the order of :attr:`snapshots`."""
        return [record["params_path"] for record in self.snapshots]


def plan_posthoc(
    folder: str, *, sigma_rel: Optional[float] = None, gamma: Optional[float] = None, step: Optional[int] = None
) -> PosthocPlan:
    """The coefficients rebuilding the target EMA from the usable snapshots in ``folder`` (values not read).

    Parameters
    ----------
    folder
        A folder :class:`PostHocSnapshots` saved into.
    sigma_rel
        The target's relative width, in (0, 0.2887); give it or ``gamma``.
    gamma
        The target's exponent, a finite number > 0.
    step
        The training step to rebuild the EMA at, between the first and the
        last snapshot's step (later steps are in no snapshot); default: the
        last. Every snapshot up to it is used.

    Raises
    ------
    ConfigurationError
        Not exactly one of ``sigma_rel`` and ``gamma``, or a value out of range.
    CheckpointError
        ``folder`` holds no usable snapshot (see :func:`read_posthoc_snapshots`).
    """
    target_gamma = _target_gamma(sigma_rel, gamma)
    records = read_posthoc_snapshots(folder)
    target_step = _target_step(step, records, folder)
    used = tuple(record for record in records if record["step"] <= target_step)
    pairs = [(record["gamma"], record["step"]) for record in used]
    coefficients, residual = posthoc_coefficients(pairs, target_gamma, target_step)
    shown_sigma_rel = float(sigma_rel) if sigma_rel is not None else _sigma_rel_of(target_gamma)
    _log_residual(residual, shown_sigma_rel, target_step, len(used))
    return PosthocPlan(
        os.fspath(folder), target_gamma, shown_sigma_rel, target_step, used, tuple(coefficients.tolist()), residual
    )


def _target_gamma(sigma_rel: Optional[float], gamma: Optional[float]) -> float:
    if (sigma_rel is None) == (gamma is None):
        given = "both" if sigma_rel is not None else "neither"
        raise ConfigurationError(
            f"give exactly one of sigma_rel (in (0, {MAX_SIGMA_REL:.4f})) and gamma (> 0), got {given}"
        )
    if gamma is not None:
        _check_positive("gamma", gamma, ConfigurationError)
        return float(gamma)
    if not _is_real(sigma_rel):
        shown = shown_value(sigma_rel)
        raise ConfigurationError(f"sigma_rel must be a number in (0, {MAX_SIGMA_REL:.4f}), got {shown}")
    return sigma_rel_to_gamma(float(sigma_rel))


def _target_step(step: Optional[int], records: Sequence[Mapping[str, Any]], folder: str) -> int:
    first, last = records[0]["step"], records[-1]["step"]
    if step is None:
        return last
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)) or not first <= step <= last:
        raise ConfigurationError(
            f"step must be an integer in [{first}, {last}] (the steps of the snapshots in {folder}), "
            f"got {shown_value(step)}"
        )
    return int(step)


def _log_residual(residual: float, sigma_rel: float, step: int, count: int) -> None:
    if residual > POOR_RESIDUAL:
        logger.warning(
            "post-hoc EMA of sigma_rel %.4g at step %d: residual %.3g from %d snapshots (above %g: the snapshots "
            "cannot express this profile well; track widths closer to it or save more often)",
            sigma_rel, step, residual, count, POOR_RESIDUAL,
        )
    else:
        message = "post-hoc EMA of sigma_rel %.4g at step %d: residual %.3g from %d snapshots"
        logger.info(message, sigma_rel, step, residual, count)


def combine_snapshots(plan: PosthocPlan, progress: Optional[Callable[[str], None]] = None) -> Dict[str, mx.nd.NDArray]:
    """``sum_i x_i snapshot_i`` exactly (not divided by ``sum_i x_i``), streamed one file at a time.

    The sums are kept in float32 or wider (:class:`WeightedSum`), one model
    size in memory whatever the number of snapshots; arrays come back in
    their saved dtype on the CPU. Integer arrays are copied from the latest
    snapshot. ``progress(path)`` is called after each file.

    Raises
    ------
    CheckpointError
        A snapshot cannot be read, its names or shapes differ from another's,
        or the result is not finite (naming the snapshots holding NaN or inf).
    """
    total = WeightedSum()
    reader = ParamsFileReader()
    latest_first = sorted(zip(plan.snapshots, plan.coefficients), key=lambda pair: pair[0]["step"], reverse=True)
    for record, coefficient in latest_first:
        _add_snapshot(total, reader, record["params_path"], coefficient)
        if progress is not None:
            progress(record["params_path"])
    if not total.all_finite():
        raise CheckpointError(_non_finite_message(plan.paths))
    # WeightedSum.average divides by the total weight unless it is 1; the coefficients of a least-squares fit
    # sum only to about 1 (the fit's error), and the bound on the result holds for the plain sum.
    total.total_weight = 1.0
    return total.average()


def _add_snapshot(total: WeightedSum, reader: ParamsFileReader, path: str, coefficient: float) -> None:
    """Add ``coefficient *`` the arrays of ``path``: chunk by chunk, or whole for layouts left to ``mx.nd.load``."""
    params_file = open_params(reader, path)
    if params_file is None:
        try:
            total.add(load_params(path), coefficient, path)
        except (mx.base.MXNetError, TypeError) as error:  # e.g. a dtype NumPy does not have
            raise CheckpointError(f"snapshot {path} has an array NumPy cannot hold ({error})") from None
        return
    with params_file:
        try:
            total.add_file(params_file, coefficient)
        except (ParamsFormatError, OSError) as error:
            raise CheckpointError(f"snapshot {path} changed while being read ({error})") from None


def _non_finite_message(paths: Sequence[str]) -> str:
    culprits = [path for path in paths if not is_finite_file(path)]
    shown = list_some(culprits, ", ", ", ") if culprits else "none alone (the sum overflowed)"
    return f"the post-hoc EMA is not finite: NaN or infinite values in {shown}"


def check_output_path(output: str, plan: PosthocPlan) -> None:
    """:class:`CheckpointError` unless ``output`` can be written: no folder, in an existing folder, no snapshot."""
    if os.path.isdir(output):
        raise CheckpointError(f"output {output} is a folder; give a file name such as posthoc-ema.params")
    if not os.path.isdir(os.path.dirname(os.path.abspath(output))):
        raise CheckpointError(f"the folder of output {output} does not exist")
    if os.path.realpath(output) in {os.path.realpath(path) for path in plan.paths}:
        raise CheckpointError(f"output {output} is one of the snapshots being combined; choose another name")


def reconstruct_posthoc(
    folder: str,
    *,
    sigma_rel: Optional[float] = None,
    gamma: Optional[float] = None,
    step: Optional[int] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> Tuple[Dict[str, mx.nd.NDArray], PosthocPlan]:
    """The power-function EMA of ``sigma_rel`` (or ``gamma``) at ``step``, rebuilt from the snapshots in ``folder``.

    :func:`plan_posthoc` (its arguments and errors), then
    :func:`combine_snapshots`: the arrays are ``sum_i x_i snapshot_i`` with
    the signed least-squares coefficients, within
    ``plan.residual * max_k |theta_k|`` of the true EMA, element by element.

    Returns
    -------
    Tuple[Dict[str, mx.nd.NDArray], PosthocPlan]
        The arrays by (Gluon) name, on the CPU, and the plan (coefficients, residual).
    """
    plan = plan_posthoc(folder, sigma_rel=sigma_rel, gamma=gamma, step=step)
    return combine_snapshots(plan, progress), plan


def save_posthoc(
    folder: str,
    output: str,
    *,
    sigma_rel: Optional[float] = None,
    gamma: Optional[float] = None,
    step: Optional[int] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> str:
    """:func:`reconstruct_posthoc`, written atomically to ``output`` (``.params``; load it with :func:`~modavg_plugin.checkpoints.load_weights`).

    Returns
    -------
    str
        ``output``.

    Raises
    ------
    CheckpointError
        Also when ``output`` is a folder, its folder does not exist, or it is one of the snapshots.
    """
    plan = plan_posthoc(folder, sigma_rel=sigma_rel, gamma=gamma, step=step)
    check_output_path(output, plan)
    save_params(output, combine_snapshots(plan, progress))
    return output

# Options of the callback and the Module adapter, and their resume state ---------------------------

POSTHOC_FOLDER = "posthoc"
"""The callbacks' and the Module adapter's snapshots go to ``{checkpoint folder}/posthoc``."""
POSTHOC_DEFAULTS: Mapping[str, Any] = {"sigma_rels": list(DEFAULT_SIGMA_RELS), "every_epochs": 1}
POSTHOC_STATE_PREFIX = "posthoc:"
"""Names of the post-hoc EMAs' arrays in an adapter's resume-state file: ``posthoc:INDEX/NAME``."""


def posthoc_options(posthoc: Optional[Mapping[str, Any]], checkpoint_dir: Optional[str]) -> Optional[Dict[str, Any]]:
    """The ``posthoc`` option checked, with its defaults and its folder; ``None`` when not asked for."""
    if posthoc is None:
        return None
    unknown = sorted(set(posthoc) - set(POSTHOC_DEFAULTS))
    if unknown:
        raise ConfigurationError(f"posthoc: unknown key {unknown[0]!r}; accepted: {sorted(POSTHOC_DEFAULTS)}")
    if checkpoint_dir is None:
        raise ConfigurationError("posthoc needs checkpoint_dir: the snapshots go to {checkpoint_dir}/posthoc")
    options = {**POSTHOC_DEFAULTS, **posthoc, "folder": os.path.join(checkpoint_dir, POSTHOC_FOLDER)}
    every = options["every_epochs"]
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigurationError(f"posthoc every_epochs must be an integer >= 1, got {every!r}")
    options["sigma_rels"] = check_sigma_rels(options["sigma_rels"])
    return options


def posthoc_state_parts(snapshots: PostHocSnapshots) -> Tuple[Dict[str, Any], Dict[str, mx.nd.NDArray]]:
    """:meth:`PostHocSnapshots.state_dict` split for a state file: JSON-ready counters, and arrays named ``INDEX/NAME``."""
    counters: Dict[str, Any] = {"sigma_rels": list(snapshots.sigma_rels), "averages": {}}
    arrays: Dict[str, mx.nd.NDArray] = {}
    for index, average in enumerate(snapshots.averages):
        counters["averages"][str(index)] = average.counters()
        arrays.update({f"{index}/{name}": shadow for name, shadow in average.shadows.items()})
    return counters, arrays


def posthoc_state(counters: Mapping[str, Any], arrays: Mapping[str, mx.nd.NDArray]) -> Dict[str, Any]:
    """The inverse of :func:`posthoc_state_parts`: a state for :meth:`PostHocSnapshots.load_state_dict`."""
    averages = {}
    for index, average_counters in counters["averages"].items():
        prefix = f"{index}/"
        shadows = {name[len(prefix):]: value for name, value in arrays.items() if name.startswith(prefix)}
        averages[index] = {**average_counters, "shadows": shadows}
    return {"sigma_rels": counters["sigma_rels"], "averages": averages}


def check_no_earlier_snapshots(folder: str) -> None:
    """Refuse to start a run's snapshots where an earlier run left some: a reconstruction would mix both runs.

    Raises
    ------
    ConfigurationError
        ``folder`` holds post-hoc records; the message says what to do.
    """
    if os.path.isdir(folder) and any(name.endswith(POSTHOC_INFO_SUFFIX) for name in os.listdir(folder)):
        raise ConfigurationError(
            f"post-hoc folder {folder} already holds snapshots of an earlier run, which a reconstruction would mix "
            "with this run's: give another checkpoint folder, remove them, or resume that run (resume=True)"
        )
