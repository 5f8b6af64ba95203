"""Input validation shared by the public wrappers.

Every message has one format (scikit-learn / xarray style)::

    `lr` must be a float in (0, inf); got -0.1.

so that tests can pin them with ``pytest.raises(ValueError, match=...)``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = [
    "check_real",
    "check_int",
    "check_spectrum",
    "check_steps",
]


def _fmt(value) -> str:
    return repr(value) if not isinstance(value, float) else f"{value:g}"


def check_real(
    name: str,
    value,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float after checking it lies in the interval.

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is NaN or outside the interval.
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"`{name}` must be a real number; got {type(value).__name__}.")
    x = float(value)
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    interval = f"{lo}{low:g}, {high:g}{hi}"
    bad = (
        math.isnan(x)
        or x < low
        or x > high
        or (low_open and x == low)
        or (high_open and x == high)
    )
    if bad:
        raise ValueError(f"`{name}` must be a float in {interval}; got {_fmt(x)}.")
    return x


def check_int(name: str, value, *, low: int = 0, high: float = math.inf) -> int:
    """Return ``value`` as an int after checking ``low <= value <= high``.

    Accepts Python and numpy integers, and floats holding an integer.
    """
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be an integer; got bool.")
    if isinstance(value, (numbers.Integral, np.integer)):
        v = int(value)
    elif isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        v = int(value)
    else:
        raise TypeError(f"`{name}` must be an integer; got {_fmt(value)}.")
    if v < low or v > high:
        hi = "inf" if high == math.inf else f"{int(high)}"
        raise ValueError(f"`{name}` must be an integer in [{low}, {hi}]; got {v}.")
    return v


def check_spectrum(name: str, values, *, dim: int | None = None, positive: bool = True) -> np.ndarray:
    """Return a 1-D float64 copy of ``values``; finite, > 0 (or >= 0), length ``dim`` if given.

    A scalar is broadcast to length ``dim``.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0 and dim is not None:
        arr = np.full(dim, float(arr))
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"`{name}` must be a non-empty 1-D array; got shape {arr.shape}.")
    if dim is not None and arr.size != dim:
        raise ValueError(f"`{name}` must have length {dim} to match the spectrum; got {arr.size}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` must be finite; got {int(np.sum(~np.isfinite(arr)))} non-finite entries.")
    if positive and np.any(arr <= 0):
        raise ValueError(f"`{name}` must be > 0 everywhere; got min {arr.min():g}.")
    if not positive and np.any(arr < 0):
        raise ValueError(f"`{name}` must be >= 0 everywhere; got min {arr.min():g}.")
    return arr.copy()


def check_steps(steps) -> np.ndarray:
    """Validate ``steps``: a count n (meaning 0..n) or a 1-D array of step indices.

    Returns a sorted-unique int64 array of step indices.
    """
    if np.ndim(steps) == 0:
        n = check_int("steps", steps, low=0)
        return np.arange(n + 1, dtype=np.int64)
    arr = np.asarray(steps)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"`steps` must be a count or a non-empty 1-D array of step indices; got shape {arr.shape}.")
    if not np.all(np.isfinite(arr.astype(np.float64))) or np.any(arr < 0) or np.any(arr != np.floor(arr)):
        raise ValueError("`steps` must hold non-negative integers.")
    if np.any(np.diff(arr) <= 0):
        raise ValueError("`steps` must be strictly increasing.")
    return arr.astype(np.int64)
