"""Input validation shared by the public wrappers of both packages.

Every message has one format (scikit-learn / xarray style)::

    `lr` must be a float in (0, inf); got -0.1.

so that tests can pin them with ``pytest.raises(ValueError, match=...)``.

Two ways to use it:

* the ``check_*`` functions, for checks that depend on other arguments (a length that must match
  the spectrum, an upper bound that is the data size);
* declared constraints, scikit-learn style: ``@validate(lr=Real(0, inf, low_open=True),
  n_steps=Integer(1, MAX_STEPS))`` checks (and converts) the named arguments on every call, and
  registers the function in :data:`REGISTRY` with its constraints.  Each constraint also lists
  values it must refuse (:meth:`Constraint.bad_values`), so ``tests/test_validation.py`` generates
  bad input for every registered public function from the declarations themselves.

:mod:`deepmodels._validate` adds the torch constraints (tensor dtype, device, shape).
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers

import numpy as np

__all__ = [
    "check_real",
    "check_int",
    "check_spectrum",
    "check_steps",
    "Constraint",
    "Real",
    "Integer",
    "Options",
    "Instance",
    "Boolean",
    "Maybe",
    "validate",
    "REGISTRY",
    "MAX_EXACT_INT",
]

MAX_EXACT_INT = 2**53  # above this a float no longer holds every integer: not a count


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

    Accepts Python and numpy integers, and floats holding an integer of magnitude at most 2**53
    (a float like 1e30 is not a count: it does not even hold its neighbours).
    """
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be an integer; got bool.")
    if isinstance(value, (numbers.Integral, np.integer)):
        v = int(value)
    elif (isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer()
          and abs(float(value)) <= MAX_EXACT_INT):
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


# --------------------------------------------------------------------------------------------------
# declared constraints
# --------------------------------------------------------------------------------------------------
class Constraint:
    """What one argument accepts: ``constraint(name, value)`` returns the checked (converted)
    value or raises ``TypeError`` / ``ValueError`` naming the argument; :meth:`bad_values` lists
    values that must be refused (the generated bad-input tests use them)."""

    def __call__(self, name: str, value):
        raise NotImplementedError

    def bad_values(self) -> list:
        return [None, "1", 1 + 1j]


class Real(Constraint):
    """A real number in an interval (NaN always refused, +-inf only where the interval is closed
    there).  Accepts Python and numpy numbers; returns a float."""

    def __init__(self, low=-math.inf, high=math.inf, *, low_open=False, high_open=False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def __call__(self, name, value):
        return check_real(name, value, low=self.low, high=self.high, low_open=self.low_open,
                          high_open=self.high_open)

    def bad_values(self):
        bad = super().bad_values() + [math.nan, True]
        if self.low > -math.inf:
            bad.append(self.low if self.low_open else self.low - max(1.0, abs(self.low)))
        elif self.low_open:
            bad.append(-math.inf)
        if self.high < math.inf:
            bad.append(self.high if self.high_open else self.high + max(1.0, abs(self.high)))
        elif self.high_open:
            bad.append(math.inf)
        return bad

    def __repr__(self):
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open else "]"
        return f"Real{lo}{self.low:g}, {self.high:g}{hi}"


class Integer(Constraint):
    """An integer in [low, high]; a float is accepted only if it holds an integer <= 2**53.
    Iteration counts should declare a finite ``high`` (documented), so no loop runs without end."""

    def __init__(self, low=0, high=math.inf):
        self.low, self.high = low, high

    def __call__(self, name, value):
        return check_int(name, value, low=self.low, high=self.high)

    def bad_values(self):
        bad = super().bad_values() + [math.nan, math.inf, 1.5 + self.low, True, 1e30, self.low - 1]
        if self.high < math.inf:
            bad.append(int(self.high) + 1)
        return bad

    def __repr__(self):
        return f"Integer[{self.low}, {self.high}]"


class Options(Constraint):
    """One of a fixed set of values (strings, usually)."""

    def __init__(self, *choices):
        self.choices = choices

    def __call__(self, name, value):
        for c in self.choices:
            if type(value) is type(c) and value == c:
                return value
        raise ValueError(f"`{name}` must be one of {', '.join(repr(c) for c in self.choices)}; got {value!r}.")

    def bad_values(self):
        return [None, 1, "not-an-option"]


class Instance(Constraint):
    """An instance of one of ``types``; ``what`` names them in the message (default: the type names)."""

    def __init__(self, *types, what: str | None = None):
        self.types = types
        self.what = what or " or ".join(t.__name__ for t in types)

    def __call__(self, name, value):
        if isinstance(value, bool) and bool not in self.types:
            raise TypeError(f"`{name}` must be {self.what}; got bool.")
        if not isinstance(value, self.types):
            raise TypeError(f"`{name}` must be {self.what}; got {type(value).__name__}.")
        return value

    def bad_values(self):
        return [v for v in (None, "1", 1.5, object()) if not isinstance(v, self.types)]


class Boolean(Constraint):
    """``True`` or ``False`` (numpy bools too); no other truthy values."""

    def __call__(self, name, value):
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise TypeError(f"`{name}` must be True or False; got {type(value).__name__}.")

    def bad_values(self):
        return [None, "yes", 1]


class Maybe(Constraint):
    """``None`` or what ``inner`` accepts."""

    def __init__(self, inner: Constraint):
        self.inner = inner

    def __call__(self, name, value):
        return None if value is None else self.inner(name, value)

    def bad_values(self):
        return [v for v in self.inner.bad_values() if v is not None]

    def __repr__(self):
        return f"Maybe({self.inner!r})"


REGISTRY: dict = {}
"""Every function decorated with :func:`validate`: qualified name -> function (its constraints in
``function.__constraints__``)."""


def validate(**constraints):
    """Decorator: check the named arguments of every call against their declared constraints and
    pass the converted values on (arguments left at their default are not checked).  Registers
    the function in :data:`REGISTRY`."""

    def decorate(func):
        sig = inspect.signature(func)
        unknown = set(constraints) - set(sig.parameters)
        if unknown:
            raise TypeError(f"validate: {func.__qualname__} has no argument(s) {sorted(unknown)}")

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError as err:
                raise TypeError(f"{func.__qualname__}(): {err}") from None
            for arg, check in constraints.items():
                if arg in bound.arguments:
                    bound.arguments[arg] = check(arg, bound.arguments[arg])
            return func(*bound.args, **bound.kwargs)

        wrapper.__constraints__ = dict(constraints)
        REGISTRY[f"{func.__module__}.{func.__qualname__}"] = wrapper
        return wrapper

    return decorate
