"""Argument checks shared by every module, and the error for unusable checkpoints.

Each check raises an error naming the argument, the allowed range and the
value it got (shortened: values read from files may be huge), and returns
the value converted (``int``, ``float``).
"""

import math
import numbers
from typing import Any, Optional, Sequence, Type

import numpy as np

from .registry import ConfigurationError

__all__ = [
    "MAX_REASONS_SHOWN",
    "CheckpointError",
    "check_choice",
    "check_integer",
    "check_number",
    "is_real",
    "list_some",
    "shown_value",
]

MAX_REASONS_SHOWN = 20  #: files or records named in one warning or error; the rest are counted


class CheckpointError(ValueError):
    """A checkpoint folder, record or file cannot be used; the message names it."""


def shown_value(value: Any, limit: int = 60) -> str:
    """``repr(value)`` and its type for a message, cut to about ``limit`` characters (values may be huge)."""
    if isinstance(value, int) and abs(value) >= 10**limit:  # repr of a huge int is slow, or refused
        text = f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    else:
        text = repr(value)
        text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{text} ({type(value).__name__})"


def list_some(items: Sequence[str], separator: str, before_count: str) -> str:
    """``items`` joined by ``separator``: the first :data:`MAX_REASONS_SHOWN` named, the rest counted."""
    hidden = len(items) - MAX_REASONS_SHOWN
    return separator.join(items[:MAX_REASONS_SHOWN]) + (f"{before_count}and {hidden} more" if hidden > 0 else "")


def is_real(value: Any) -> bool:
    """Whether ``value`` is a finite real number (an ``int`` or ``float``, not a ``bool``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def check_integer(name: str, value: Any, low: int, error: Type[ValueError] = ConfigurationError) -> int:
    """``value`` as an ``int``; ``error`` unless it is an integer (not a ``bool``) ``>= low``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise error(f"{name} must be an integer >= {low}, got {shown_value(value)}")
    return int(value)


def check_number(
    name: str,
    value: Any,
    low: Optional[float] = None,
    high: Optional[float] = None,
    *,
    open_low: bool = False,
    open_high: bool = False,
    error: Type[ValueError] = ConfigurationError,
) -> float:
    """``value`` as a ``float``; ``error`` unless it is a finite number within the bounds given.

    ``low``/``high`` are inclusive unless ``open_low``/``open_high``; the
    message states the range as ``[0, 1]``, ``(0, 0.2887)``, ``>= 0`` or ``> 0``.
    """
    ok = is_real(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value < high if open_high else value <= high
    if not ok:
        raise error(f"{name} must be {_range_text(low, high, open_low, open_high)}, got {shown_value(value)}")
    return float(value)


def _range_text(low: Optional[float], high: Optional[float], open_low: bool, open_high: bool) -> str:
    if low is not None and high is not None:
        return f"a number in {'(' if open_low else '['}{low:g}, {high:.4g}{')' if open_high else ']'}"
    if low is not None:
        return f"a finite number {'>' if open_low else '>='} {low:g}"
    if high is not None:
        return f"a finite number {'<' if open_high else '<='} {high:g}"
    return "a finite number"


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` unless it is not one of ``choices`` (:class:`~modavg_plugin.ConfigurationError` listing them)."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigurationError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value
