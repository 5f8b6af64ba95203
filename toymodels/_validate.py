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
  values it must refuse (:meth:`Constraint.bad_values`), so ``tests/test_validation_toymodels.py``
  generates bad input for every registered public function from the declarations themselves.

Sizes are estimated before anything large is allocated (:func:`check_bytes`, at most
:data:`MAX_BYTES`), and every iteration count declares a finite upper bound.

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
    "MAX_BYTES",
    "MAX_STEPS",
    "Array",
    "Callable",
    "AnyOf",
    "Steps",
    "check_bytes",
    "validate_init",
]

MAX_EXACT_INT = 2**53  # above this a float no longer holds every integer: not a count
MAX_BYTES = 2**32  # 4 GiB: the largest array a public function allocates (estimated before allocating)
MAX_STEPS = 10**15  # the largest step index any exact curve or search accepts (closed forms jump there)


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


def check_steps(steps, *, high: int = MAX_STEPS, name: str = "steps") -> np.ndarray:
    """Validate ``steps``: a count n (meaning 0..n) or a 1-D array of step indices <= ``high``.

    A count allocates ``n + 1`` indices, so it must stay below :data:`MAX_BYTES` (pass an array of
    the steps wanted, e.g. a log grid, for long curves).  Returns a strictly increasing int64 array.
    """
    if steps is None or isinstance(steps, (str, bytes)) or np.ndim(steps) == 0:
        n = check_int(name, steps, low=0, high=high)
        check_bytes(name, 8.0 * (n + 1), what=f"a count of {n} steps (all {n + 1} indices); pass an array "
                                              f"of the steps wanted instead")
        return np.arange(n + 1, dtype=np.int64)
    arr = np.asarray(steps)
    if arr.dtype.kind not in "iuf" or arr.dtype == np.bool_:
        raise TypeError(f"`{name}` must be a count or a 1-D array of step indices; got dtype {arr.dtype}.")
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"`{name}` must be a count or a non-empty 1-D array of step indices; got shape {arr.shape}.")
    f = arr.astype(np.float64)
    if not np.all(np.isfinite(f)) or np.any(f < 0) or np.any(f != np.floor(f)) or np.any(f > high):
        raise ValueError(f"`{name}` must be step indices, integers in [0, {high}]; got min {f.min():g}, max {f.max():g}.")
    if np.any(np.diff(f) <= 0):
        raise ValueError(f"`{name}` must be strictly increasing.")
    return arr.astype(np.int64)


def check_bytes(name: str, n_bytes: float, *, what: str = "", limit: float | None = None, where: str = "",
                remedy: str = "") -> None:
    """Refuse, before allocating, an array of ``n_bytes`` above ``limit`` (default :data:`MAX_BYTES`;
    :mod:`deepmodels` passes the memory available on the device, ``where`` naming it).

    Raises:
        ValueError: naming the argument that sets the size, with the estimate.
    """
    limit = MAX_BYTES if limit is None else limit
    if not n_bytes <= limit:
        detail = f" ({what})" if what else ""
        raise ValueError(f"`{name}` must be small enough for its arrays to fit in {_size(limit)}{where}; got an "
                         f"estimated {_size(n_bytes)}{detail}." + (f" {remedy}" if remedy else ""))


def _size(n_bytes: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{n_bytes:.0f} B"


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


class Array(Constraint):
    """A real, finite numpy array (returned as a float64 copy).

    Args:
        ndim: the accepted numbers of dimensions (an int or a tuple); ``0`` in it accepts scalars.
        low, high, low_open, high_open: the interval every entry must lie in.
        min_size: the least number of entries.
        what: how the message names it (default "a real array").

    Complex, string, boolean and object input is a ``TypeError``; NaN, +-inf, wrong dimensions and
    entries out of the interval a ``ValueError``.
    """

    def __init__(self, ndim=1, *, low=-math.inf, high=math.inf, low_open=False, high_open=False, min_size=1,
                 what: str | None = None, posinf: bool = False):
        self.ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        self.posinf = posinf
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open
        self.min_size = min_size
        self.dims = " or ".join("scalar" if d == 0 else f"{d}-D" for d in self.ndims)
        self.what = what or f"a {'non-empty ' if min_size >= 1 else ''}{self.dims} array of reals"

    def __call__(self, name, value):
        if value is None or isinstance(value, (str, bytes)):
            raise TypeError(f"`{name}` must be {self.what}; got {type(value).__name__}.")
        try:
            arr = np.asarray(value)
        except ValueError:  # ragged nested lists
            raise ValueError(f"`{name}` must be {self.what}; got a ragged sequence.") from None
        if arr.dtype.kind not in "iuf":
            got = "complex" if arr.dtype.kind == "c" else f"dtype {arr.dtype}"
            raise TypeError(f"`{name}` must be {self.what}; got {got}.")
        if arr.ndim not in self.ndims:
            raise ValueError(f"`{name}` must be {self.what}; got shape {arr.shape}.")
        if arr.size < self.min_size:
            need = "non-empty" if self.min_size == 1 else f"at least {self.min_size}-entry"
            raise ValueError(f"`{name}` must be a {need} {self.dims} array; got shape {arr.shape}.")
        arr = np.array(arr, dtype=np.float64)
        bad = ~np.isfinite(arr)
        if self.posinf:
            bad &= arr != math.inf
        if bad.any():
            if self.posinf:
                raise ValueError(f"`{name}` must be finite or +inf; got {int(bad.sum())} NaN or -inf entries.")
            raise ValueError(f"`{name}` must be finite; got {int(bad.sum())} non-finite entries.")
        if arr.size == 0:
            return arr
        fin = arr[np.isfinite(arr)] if self.posinf else arr
        lo = fin.min() if fin.size else math.inf
        hi = arr.max()
        below = lo < self.low or (self.low_open and lo == self.low)
        above = hi > self.high or (self.high_open and hi == self.high)
        if below or above:
            if self.low > -math.inf and self.high < math.inf:
                a, b = "(" if self.low_open else "[", ")" if self.high_open else "]"
                raise ValueError(f"`{name}` must be in {a}{self.low:g}, {self.high:g}{b} everywhere; "
                                 f"got min {lo:g}, max {hi:g}.")
            if below:
                op = ">" if self.low_open else ">="
                raise ValueError(f"`{name}` must be {op} {self.low:g} everywhere; got min {lo:g}.")
            op = "<" if self.high_open else "<="
            raise ValueError(f"`{name}` must be {op} {self.high:g} everywhere; got max {hi:g}.")
        return arr

    def _example(self, fill):
        nd = max(self.ndims)
        return np.full((max(1, self.min_size),) + (1,) * (nd - 1), fill) if nd else fill

    def bad_values(self):
        nd = max(self.ndims)
        bad = [None, "1", self._example(1.0 + 1j), self._example(math.nan), self._example(-math.inf),
               np.array([["x"]]) if nd == 2 else np.array(["x"])]
        if not self.posinf:
            bad.append(self._example(math.inf))
        if 0 not in self.ndims:
            bad.append(np.ones((1,) * (nd + 1)))
        if self.min_size >= 1:
            bad.append(np.zeros((0,) * nd))
        if self.low > -math.inf:
            bad.append(self._example(self.low if self.low_open else self.low - max(1.0, abs(self.low))))
        if self.high < math.inf:
            bad.append(self._example(self.high if self.high_open else self.high + max(1.0, abs(self.high))))
        return [b for b in bad if not (isinstance(b, np.ndarray) and b.ndim not in self.ndims and b.ndim < nd)]

    def __repr__(self):
        return f"Array(ndim={self.ndims})"


class Callable(Constraint):
    """Any callable."""

    def __call__(self, name, value):
        if not callable(value):
            raise TypeError(f"`{name}` must be callable; got {type(value).__name__}.")
        return value

    def bad_values(self):
        return [None, "1", 1.5]


class AnyOf(Constraint):
    """What one of ``constraints`` accepts (the first that does converts the value).  When all
    refuse: ``ValueError`` if one of them refused the value (an accepted type out of range), else
    ``TypeError``; both name ``what``."""

    def __init__(self, *constraints: Constraint, what: str):
        self.constraints, self.what = constraints, what

    def __call__(self, name, value):
        value_error = False
        for c in self.constraints:
            try:
                return c(name, value)
            except ValueError:
                value_error = True
            except TypeError:
                pass
        if value_error:
            raise ValueError(f"`{name}` must be {self.what}; got {_fmt(value)}.")
        raise TypeError(f"`{name}` must be {self.what}; got {type(value).__name__}.")

    def bad_values(self):
        out = []
        for c in self.constraints:
            for v in c.bad_values():
                try:
                    self("_", v)
                except (TypeError, ValueError):
                    out.append(v)
        return out

    def __repr__(self):
        return f"AnyOf({', '.join(map(repr, self.constraints))})"


class Steps(Constraint):
    """Step indices: a count n (0..n) or a strictly increasing 1-D array, each <= ``high``
    (:func:`check_steps`)."""

    def __init__(self, high: int = MAX_STEPS):
        self.high = high

    def __call__(self, name, value):
        return check_steps(value, high=self.high, name=name)

    def bad_values(self):
        return [None, "1", 1 + 1j, math.nan, -1, 1.5, True, 1e30, self.high + 1, np.array([3, 2]),
                np.array([]), np.array([0.0, math.nan]), np.array([-1, 2]), np.array([0.5]),
                np.array([1 + 1j])]


def validate_init(**constraints):
    """Class decorator: :func:`validate` the generated ``__init__`` of a dataclass (registered as
    ``module.Class.__init__``)."""

    def decorate(cls):
        init = cls.__init__
        init.__qualname__ = f"{cls.__qualname__}.__init__"
        init.__module__ = cls.__module__
        cls.__init__ = validate(**constraints)(init)
        return cls

    return decorate


REGISTRY: dict = {}
"""Every function decorated with :func:`validate`: qualified name -> function (its constraints in
``function.__constraints__``)."""


class _PlainBinding:
    """How a call binds to a signature without ``*args``, ``**kwargs`` or positional-only parameters,
    decided as ``Signature.bind`` decides it (a per-step call pays a few set operations, not a
    ``BoundArguments``): ``index[name]`` is the position of a constrained argument (``inf`` for a
    keyword-only one)."""

    def __init__(self, sig, constraints):
        params = list(sig.parameters.values())
        self.positional = tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD)
        self.names = frozenset(sig.parameters)
        self.required = frozenset(p.name for p in params if p.default is p.empty)
        self.index = {a: self.positional.index(a) if a in self.positional else math.inf for a in constraints}

    def binds(self, args, kwargs) -> bool:
        """Whether ``Signature.bind(*args, **kwargs)`` succeeds (else the caller binds, for the message)."""
        if len(args) > len(self.positional):
            return False
        given = self.positional[:len(args)]
        keys = kwargs.keys()
        return keys <= self.names and keys.isdisjoint(given) and self.required <= keys | set(given)


def _plain_binding(sig, constraints) -> _PlainBinding | None:
    kinds = {p.kind for p in sig.parameters.values()}
    return _PlainBinding(sig, constraints) if kinds <= {inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                        inspect.Parameter.KEYWORD_ONLY} else None


def validate(**constraints):
    """Decorator: check the named arguments of every call against their declared constraints and
    pass the converted values on (arguments left at their default are not checked).  Registers
    the function in :data:`REGISTRY`."""

    def decorate(func):
        sig = inspect.signature(func)
        unknown = set(constraints) - set(sig.parameters)
        if unknown:
            raise TypeError(f"validate: {func.__qualname__} has no argument(s) {sorted(unknown)}")
        plain = _plain_binding(sig, constraints)

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            if plain is not None and plain.binds(args, kwargs):  # a call per step costs no Signature.bind
                args = list(args)
                for arg, check in constraints.items():
                    i = plain.index[arg]
                    if i < len(args):
                        args[i] = check(arg, args[i])
                    elif arg in kwargs:
                        kwargs[arg] = check(arg, kwargs[arg])
                return func(*args, **kwargs)
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
