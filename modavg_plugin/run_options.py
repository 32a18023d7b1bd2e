"""The options of an :class:`~modavg_plugin.run.AveragingRun`, checked when it is built.

Each check refuses a bad value with a :class:`~modavg_plugin.ConfigurationError` naming it,
so a run fails before training starts, not at its first epoch's end.
"""

import os
from typing import Any, Dict, Mapping, Optional, Union

import mxnet as mx

from .auto import AutoOptions, auto_options
from .averages import MovingAverage
from .checks import check_integer
from .parameters import DeviceArrays
from .registry import ConfigurationError
from .snapshots import DEFAULT_SIGMA_RELS, check_sigma_rels
from .strategies import AveragingStrategy

__all__ = ["POSTHOC_FOLDER", "checked_average_config", "posthoc_options", "strategy_from_config"]

AverageConfig = Union[None, str, Mapping[str, Any]]
StrategyConfig = Union[None, str, Mapping[str, Any], AveragingStrategy, Any]  # Any: GluonTS's own strategies
POSTHOC_FOLDER = "posthoc"
"""Post-hoc snapshots go to ``{checkpoint_dir}/posthoc``."""
GLUONTS_STRATEGIES = {"SelectNBestMean": "mean", "SelectNBestSoftmax": "softmax"}
POSTHOC_DEFAULTS: Mapping[str, Any] = {"sigma_rels": list(DEFAULT_SIGMA_RELS), "every_epochs": 1}


def checked_average_config(average: AverageConfig) -> Optional[Dict[str, Any]]:
    """A moving-average config as a dict with its ``type``, every value checked now; ``None`` stays ``None``.

    Raises
    ------
    ConfigurationError
        An unknown name or key (naming it), ``parameters`` or
        ``shadow_context`` inside it, or a value out of range.
    """
    if average is None:
        return None
    if isinstance(average, str):
        average = {"type": average}
    if not isinstance(average, Mapping):
        raise ConfigurationError(f"average must be a name or a dict such as {{'type': 'exponential'}}, got {average!r}")
    config = {"type": MovingAverage.default_implementation, **average}
    MovingAverage.by_name(str(config["type"]))  # an unknown name: refused with the names available
    for key in ("parameters", "shadow_context"):
        if key in config:
            where = (
                "the network's parameters are given by the host" if key == "parameters" else "give it next to average"
            )
            raise ConfigurationError(f"average: {key!r} is not part of an average's config ({where})")
    probe = [("probe", DeviceArrays(lambda: [mx.nd.zeros((1,))]))]  # every value checked, without a network
    MovingAverage.from_config({**config, "include": None, "exclude": None}, parameters=probe)
    for key in ("include", "exclude"):
        if config.get(key) is not None:
            _check_patterns(key, config[key])
    return config


def _check_patterns(option: str, patterns: Any) -> None:
    patterns = [patterns] if isinstance(patterns, str) else patterns
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(pattern, str) and pattern for pattern in patterns):
        raise ConfigurationError(f"{option} must be a list of name patterns such as ['*weight'], got {patterns!r}")


def strategy_from_config(avg_strategy: StrategyConfig) -> Optional[AveragingStrategy]:
    """An :class:`~modavg_plugin.AveragingStrategy` from itself, a name, a dict, or GluonTS's own strategy object; ``None`` stays ``None``.

    GluonTS's ``SelectNBestMean`` and ``SelectNBestSoftmax`` (from
    ``gluonts.mx.trainer.model_averaging``) become ours with the same
    ``num_models``, ``metric`` and ``maximize``: recognised by their names
    and attributes, so the engine needs no GluonTS import.
    """
    if avg_strategy is None or isinstance(avg_strategy, AveragingStrategy):
        return avg_strategy
    if isinstance(avg_strategy, (str, Mapping)):
        return AveragingStrategy.from_config(avg_strategy)
    name = GLUONTS_STRATEGIES.get(type(avg_strategy).__name__)
    if name is not None and type(avg_strategy).__module__.startswith("gluonts."):
        settings = {key: getattr(avg_strategy, key) for key in ("num_models", "metric", "maximize")}
        return AveragingStrategy.from_config({"type": name, **settings})
    raise ConfigurationError(
        f"avg_strategy: an AveragingStrategy, a name, a dict or GluonTS's SelectNBestMean/SelectNBestSoftmax "
        f"expected, got {avg_strategy!r}"
    )


def posthoc_options(
    posthoc: Optional[Mapping[str, Any]], checkpoint_dir: Optional[str], temporary: bool = False
) -> Optional[Dict[str, Any]]:
    """The ``posthoc`` option checked, with its defaults and its folder; ``None`` when not asked for.

    ``temporary``: without a checkpoint folder the snapshots may go to the
    run's temporary one (the folder is then ``None`` until the run starts).
    """
    if posthoc is None:
        return None
    if not isinstance(posthoc, Mapping):
        raise ConfigurationError(f"posthoc must be a dict such as {dict(POSTHOC_DEFAULTS)}, got {posthoc!r}")
    unknown = sorted(set(posthoc) - set(POSTHOC_DEFAULTS))
    if unknown:
        raise ConfigurationError(f"posthoc: unknown key {unknown[0]!r}; accepted: {sorted(POSTHOC_DEFAULTS)}")
    if checkpoint_dir is None and not temporary:
        raise ConfigurationError("posthoc needs a checkpoint folder: the snapshots go to {checkpoint folder}/posthoc")
    folder = None if checkpoint_dir is None else os.path.join(checkpoint_dir, POSTHOC_FOLDER)
    options = {**POSTHOC_DEFAULTS, **posthoc, "folder": folder}
    options["every_epochs"] = check_integer("posthoc every_epochs", options["every_epochs"], 1)
    options["sigma_rels"] = check_sigma_rels(options["sigma_rels"])
    return options


def auto_mode(average: AverageConfig, avg_strategy: StrategyConfig, posthoc: Any) -> Optional[AutoOptions]:
    """The ``"auto"`` mode's options when ``average`` asks for it (``"auto"`` or ``{"type": "auto", ...}``), else ``None``."""
    config = {"type": average} if isinstance(average, str) else average
    if not isinstance(config, Mapping) or config.get("type") != "auto":
        return None
    for name, value in (("avg_strategy", avg_strategy), ("posthoc", posthoc)):
        if value is not None:
            raise ConfigurationError(f"the 'auto' mode chooses by itself: give no {name} with it")
    return auto_options(config)
