"""Post-hoc EMA snapshots during training: a few power-function EMAs, saved now and then.

Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion
Models" (2024), sec. 3. :class:`PostHocSnapshots` tracks one
:class:`~modavg_plugin.averages.PowerMovingAverage` per ``sigma_rel`` and
saves each as a *snapshot*; :mod:`modavg_plugin.posthoc` rebuilds the EMA of
any other width from them after training.

A snapshot folder holds, per save and per tracked average ``index``,
``posthoc-{step:08d}-{index}.params`` (Gluon names) and its record
``posthoc-{step:08d}-{index}-posthoc-info.json``:
``{"params_path": <file name>, "step": t, "gamma": g, "sigma_rel": s}``.
Both are written atomically.
"""

import logging
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import mxnet as mx

from .averages import MAX_SIGMA_REL, MIN_SIGMA_REL, PowerMovingAverage
from .checks import check_number, shown_value
from .files import remove_quietly, save_json, save_params
from .folders import POSTHOC_INFO_SUFFIX
from .parameters import ParameterLike
from .registry import ConfigurationError

__all__ = ["DEFAULT_SIGMA_RELS", "PostHocSnapshots", "check_no_earlier_snapshots", "check_sigma_rels", "posthoc_stem"]

logger = logging.getLogger(__name__)

DEFAULT_SIGMA_RELS = (0.05, 0.10)
POSTHOC_PREFIX = "posthoc-"


def posthoc_stem(step: int, index: int) -> str:
    """The file-name stem of the snapshot of average ``index`` at ``step``: ``posthoc-{step:08d}-{index}``."""
    return f"{POSTHOC_PREFIX}{step:08d}-{index}"


def check_sigma_rels(sigma_rels: Sequence[float]) -> Tuple[float, ...]:
    """``sigma_rels`` as floats: at least one, distinct, each in ``(0, MAX_SIGMA_REL)``.

    Raises
    ------
    ConfigurationError
        Naming the offending value and the allowed range.
    """
    if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Iterable):
        shown = shown_value(sigma_rels)
        raise ConfigurationError(f"sigma_rels must be a sequence of numbers in (0, {MAX_SIGMA_REL:.4f}), got {shown}")
    values = list(sigma_rels)
    if not values:
        raise ConfigurationError(f"sigma_rels must hold at least one number in (0, {MAX_SIGMA_REL:.4f}), got none")
    for index, value in enumerate(values):
        check_number(f"sigma_rels[{index}]", value, MIN_SIGMA_REL, MAX_SIGMA_REL, open_high=True)
    for index, value in enumerate(values):
        if value in values[:index]:
            raise ConfigurationError(
                f"sigma_rels must be distinct: {value!r} is at positions {values.index(value)} and {index}"
            )
    return tuple(float(value) for value in values)


class PostHocSnapshots:
    """A few power-function EMAs tracked together and saved now and then, for post-hoc reconstruction.

    Call :meth:`apply` after every optimiser step and :meth:`save` a few
    dozen times or more over the run, evenly spaced; afterwards
    :func:`~modavg_plugin.posthoc.reconstruct_posthoc` rebuilds the EMA of
    any width from the saved snapshots. Memory: one copy of the weights per
    ``sigma_rel``.

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
    run_id
        Stamped on each record (``"run_id"``), so that snapshots of two runs
        in one folder are told apart; ``None``: not stamped.

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
        run_id: Optional[str] = None,
    ) -> None:
        self.sigma_rels = check_sigma_rels(sigma_rels)
        self.run_id = run_id
        #: Where the snapshots are written.
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
            logger.warning(
                "could not save post-hoc EMA snapshots at step %d in %s: %s", self.num_steps, self.folder, error
            )
            return False
        return True

    def _save_snapshot(self, index: int, step: int) -> str:
        stem = posthoc_stem(step, index)
        params_name = f"{stem}.params"
        params_path = os.path.join(self.folder, params_name)
        average = self.averages[index]
        save_params(params_path, average.shadows)
        record = {"params_path": params_name, "step": step, "gamma": average.gamma, "sigma_rel": self.sigma_rels[index]}
        if self.run_id is not None:
            record["run_id"] = self.run_id
        try:
            save_json(os.path.join(self.folder, stem + POSTHOC_INFO_SUFFIX), record)
        except OSError:
            remove_quietly(params_path)  # no snapshot without its record
            raise
        return params_path

    # State --------------------------------------------------------------------

    def counters(self) -> Dict[str, Any]:
        """The JSON-ready part of the state: the widths and each average's counters, keyed by index."""
        return {
            "sigma_rels": list(self.sigma_rels),
            "averages": {str(index): average.counters() for index, average in enumerate(self.averages)},
        }

    def state_arrays(self) -> Dict[str, mx.nd.NDArray]:
        """The averages' shadows, named ``INDEX/NAME``."""
        return {
            f"{index}/{name}": shadow
            for index, average in enumerate(self.averages)
            for name, shadow in average.shadows.items()
        }

    def state_dict(self) -> Dict[str, Any]:
        """Plain data to resume from: the widths and each average's state, keyed by its index."""
        return {
            "type": type(self).__name__,
            "sigma_rels": list(self.sigma_rels),
            "averages": {index: average.state_dict() for index, average in enumerate(self.averages)},
        }

    def load_state(self, counters: Mapping[str, Any], arrays: Mapping[str, mx.nd.NDArray]) -> None:
        """Continue from :meth:`counters` and :meth:`state_arrays` (see :meth:`load_state_dict`)."""
        averages = counters.get("averages") if isinstance(counters, Mapping) else None
        if not isinstance(averages, Mapping):
            raise KeyError("post-hoc state has no 'averages'")
        state = {"sigma_rels": counters.get("sigma_rels", list(self.sigma_rels)), "averages": {}}
        for index, average_counters in averages.items():
            prefix = f"{index}/"
            shadows = {name[len(prefix) :]: value for name, value in arrays.items() if name.startswith(prefix)}
            state["averages"][index] = {**average_counters, "shadows": shadows}
        self.load_state_dict(state)

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
            average.check_state_dict(average_state)  # every average checked before any is changed
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
