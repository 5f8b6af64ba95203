"""Input validation for the torch probe: the generic constraints of :mod:`toymodels._validate`
(re-exported) and the torch ones.

Same message format as the toy models::

    `x` must be a float tensor of shape (B, ...); got float64.

Policy (one rule for every public function of :mod:`deepmodels`):

* a tensor fed to the model (``x``) must already have the model's floating dtype and device;
  float64 input to a float32 model is refused, not converted (convert with ``x.float()``, or the
  model with ``model.double()``).  Class labels ``y`` are int64 in ``[0, n_classes)``, where the
  number of classes is the model's output width (so ``ignore_index=-100`` labels are refused);
  float targets (regression) have the model's dtype.
  Direction vectors (``v``, ``directions`` of :mod:`deepmodels.hessian`) are converted to the
  parameters' dtype, as documented there.
* NaN or inf in an input tensor or a hyper-parameter is refused;
* a device that this torch build cannot use (``"cuda"`` without CUDA) is refused by name;
* counts of iterations have finite upper bounds (:data:`MAX_STEPS`, :data:`MAX_ITER`,
  :data:`MAX_DRAWS`), and an array whose size follows from the arguments is estimated first and
  refused when it cannot fit in the memory available (:func:`check_bytes`);
* the checks across arguments and of memory live in :mod:`deepmodels._checks` (re-exported here);
* a model whose trainable parameters are not finite (a diverged run) is reported: the probes of
  :mod:`deepmodels.probes` return ``inf`` statistics with the reason in ``attrs["diverged"]``; the
  other functions raise :class:`Diverged` (a ``ValueError``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from toymodels._validate import (  # noqa: F401  (re-exported)
    MAX_EXACT_INT,
    AnyOf,
    REGISTRY,
    Boolean,
    Constraint,
    Instance,
    Integer,
    Maybe,
    Options,
    Real,
    check_int,
    check_real,
    validate,
)

__all__ = [
    "Boolean", "Constraint", "Instance", "Integer", "Maybe", "Options", "Real", "REGISTRY", "validate", "MAX_EXACT_INT",
    "check_int", "check_real",
    "Tensor", "Module", "Device", "LossFn", "Function", "SequenceOf", "DictOf", "AnyOf", "Seed", "Batch", "TokenIds",
    "batch_leaves", "batch_size_of", "map_batch", "check_batch_loss",
    "check_losses", "model_output",
    "Diverged", "check_batch", "check_model_input", "check_bytes", "available_bytes", "nonfinite_params",
    "check_finite_params", "n_trainable", "OptimizerClass", "check_data_fits", "check_model_fn", "check_one_target",
    "MAX_SEED", "MAX_STEPS", "MAX_ITER", "MAX_DRAWS", "MAX_WIDTH",
]

MAX_SEED = 2**62  # seeds go to numpy and to torch.Generator, which take 64-bit values; train adds offsets
MAX_STEPS = 10**7  # training steps of one run
MAX_ITER = 10**4  # iterations of an inner algorithm (clustering)
MAX_DRAWS = 10**6  # random draws of an estimator (bootstrap resamples, Hutchinson vectors, batches)
MAX_WIDTH = 2**31 - 1  # layer widths and counts that index a tensor dimension

_DTYPE_KINDS = {
    "float": "a float tensor",
    "int": "an int64 tensor",
    "label": "an int64 (class labels) or float (targets) tensor",
}


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def Seed():  # noqa: N802  (reads like the other constraints)
    """A seed: an integer in [0, 2**62]."""
    return Integer(0, MAX_SEED)


class Diverged(ValueError):
    """The model's parameters (or the loss, or its gradients) are not finite: the run diverged."""


# --------------------------------------------------------------------------------------------------
# constraints
# --------------------------------------------------------------------------------------------------
class Tensor(Constraint):
    """A ``torch.Tensor`` of a dtype kind (``"float"``: any floating dtype, ``"int"``: int64,
    ``"label"``: int64 or floating), with ``ndim`` dimensions (or at least ``min_ndim``), a
    non-empty first axis if ``nonempty``, and (``finite``) no NaN or inf; ``finite="no-nan"``
    allows +-inf.  Checked in that order; never converted (see the module's policy)."""

    def __init__(self, kind: str = "float", *, ndim: int | None = None, min_ndim: int = 0, nonempty: bool = False,
                 finite=True, what: str | None = None):
        if kind not in _DTYPE_KINDS:
            raise ValueError(f"Tensor: unknown kind {kind!r}")
        self.kind, self.ndim, self.min_ndim, self.nonempty, self.finite = kind, ndim, min_ndim, nonempty, finite
        self.what = what or _DTYPE_KINDS[kind] + (f" of {ndim} dimensions" if ndim is not None else
                                                  " of shape (B, ...)" if min_ndim >= 1 else "")

    def __call__(self, name, value):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"`{name}` must be {self.what}; got {type(value).__name__}.")
        if value.device.type == "meta":
            raise TypeError(f"`{name}` must be {self.what} holding data; got a tensor on the 'meta' device.")
        dt = value.dtype
        ok = ((self.kind in ("float", "label") and dt.is_floating_point)
              or (self.kind in ("int", "label") and dt == torch.int64))
        if not ok:
            raise TypeError(f"`{name}` must be {self.what}; got {_dtype_name(dt)}.")
        if self.ndim is not None and value.dim() != self.ndim:
            raise ValueError(f"`{name}` must be {self.what}; got shape {tuple(value.shape)}.")
        if value.dim() < self.min_ndim:
            raise ValueError(f"`{name}` must be {self.what}; got shape {tuple(value.shape)}.")
        if self.nonempty and (value.dim() == 0 or value.shape[0] == 0):
            raise ValueError(f"`{name}` must be a non-empty batch (at least one example); got shape {tuple(value.shape)}.")
        if self.finite and dt.is_floating_point and value.numel() and not math.isfinite(float(value.detach().sum())):
            # the sum (one pass, one host transfer: a GPU sync) is finite iff every entry is, unless finite
            # entries overflow it: then (and where inf is allowed) the exact check, where NaN propagates
            lo, hi = torch.stack(torch.aminmax(value.detach())).tolist()
            bad = (math.isnan(lo) or math.isnan(hi)) if self.finite == "no-nan" else \
                not (math.isfinite(lo) and math.isfinite(hi))
            if bad:
                n = int((~torch.isfinite(value) if self.finite is True else torch.isnan(value)).sum())
                what = "NaN" if self.finite == "no-nan" else "NaN or inf"
                raise ValueError(f"`{name}` must be finite (no {what}); got {n} entries that are not finite.")
        return value

    def _shape(self, base=2):
        n = self.ndim if self.ndim is not None else max(self.min_ndim, 1)
        return (base,) * n

    def bad_values(self):
        shape = self._shape()
        bad = [None, "1", 1 + 1j, np.zeros(shape, dtype=np.float32), torch.zeros(shape, dtype=torch.complex64),
               torch.zeros(shape, dtype=torch.bool), torch.zeros(shape, device="meta")]
        if self.kind == "float":
            bad.append(torch.zeros(shape, dtype=torch.int64))
        if self.kind == "int":
            bad += [torch.zeros(shape), torch.zeros(shape, dtype=torch.int32)]
        if self.ndim is not None:
            bad.append(torch.zeros((2,) * (self.ndim + 1)))
        elif self.min_ndim >= 1:
            bad.append(torch.tensor(0.0))
        if self.nonempty:
            bad.append(torch.zeros((0,) + shape[1:]))
        if self.finite and self.kind != "int":
            bad.append(torch.full(shape, math.nan))
            if self.finite is True:
                bad.append(torch.full(shape, math.inf))
        return bad

    def __repr__(self):
        return f"Tensor({self.kind!r}, ndim={self.ndim}, min_ndim={self.min_ndim})"


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class Module(Constraint):
    """A ``torch.nn.Module``; ``trainable``: with at least one trainable parameter; ``finite``:
    whose trainable parameters are finite (else :class:`Diverged`)."""

    def __init__(self, *, trainable: bool = True, finite: bool = False):
        self.trainable, self.finite = trainable, finite

    def __call__(self, name, value):
        if isinstance(value, type) or not isinstance(value, nn.Module):
            got = f"the class {value.__name__}" if isinstance(value, type) else type(value).__name__
            raise TypeError(f"`{name}` must be a torch.nn.Module; got {got}.")
        if self.trainable and not any(p.requires_grad and p.numel() for p in value.parameters()):
            raise ValueError(f"`{name}` must be a torch.nn.Module with trainable parameters; got "
                             f"{type(value).__name__} with none.")
        if self.finite:
            check_finite_params(value, name)
        return value

    def bad_values(self):
        bad = [None, "1", 1.5, nn.Linear]
        if self.trainable:
            bad.append(nn.ReLU())
        if self.finite:
            m = nn.Linear(2, 2)
            with torch.no_grad():
                m.weight[0, 0] = math.nan
            bad.append(m)
        return bad


def _device_available(dev: torch.device) -> bool:
    if dev.type == "cpu":
        return True
    if dev.type == "cuda":
        return torch.cuda.is_available() and (dev.index is None or dev.index < torch.cuda.device_count())
    if dev.type == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    backend = getattr(torch, dev.type, None)
    return bool(backend is not None and hasattr(backend, "is_available") and backend.is_available())


def float64_device(device) -> torch.device:
    """Where float64 arithmetic on tensors of ``device`` runs: ``device`` itself, or the CPU for
    Apple's ``"mps"``, which has no float64."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def to_float64(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float64, on its own device (the CPU for ``"mps"``: :func:`float64_device`); moved
    first, then converted, so no float64 tensor is ever made on a device without float64."""
    return t.to(float64_device(t.device)).double()


class Device(Constraint):
    """A torch device this build can use: ``"cpu"``, ``"cuda"`` / ``"cuda:1"`` when CUDA is
    available (and has that many GPUs), ``"mps"`` ...; a ``torch.device`` or a string.  Returns a
    ``torch.device``."""

    def __call__(self, name, value):
        if isinstance(value, bool) or not isinstance(value, (str, torch.device)):
            raise TypeError(f"`{name}` must be a torch device such as 'cpu' or 'cuda'; got {type(value).__name__}.")
        try:
            dev = torch.device(value)
        except (RuntimeError, ValueError, TypeError):
            raise ValueError(f"`{name}` must be a torch device such as 'cpu' or 'cuda'; got {value!r}.") from None
        if dev.type == "meta" or not _device_available(dev):
            why = ("this torch build has no CUDA (torch.cuda.is_available() is False)" if dev.type == "cuda"
                   and not torch.cuda.is_available() else f"it is not available here")
            raise ValueError(f"`{name}` must be a device this torch build can use (e.g. 'cpu'); got {value!r}, "
                             f"but {why}.")
        return dev

    def bad_values(self):
        bad = [None, 1.5, 1 + 1j, "gpu", "meta", f"cuda:{max(torch.cuda.device_count(), 1) + 7}"]
        if not torch.cuda.is_available():
            bad.append("cuda")
        return bad


class LossFn(Constraint):
    """A loss ``loss_fn(output, target) -> scalar tensor`` (or, for the probes' batch form,
    ``loss_fn(model, batch) -> (B,)``): a function or a module instance (not a class such as
    ``nn.CrossEntropyLoss``: an instance of it)."""

    def __call__(self, name, value):
        if isinstance(value, type):
            raise TypeError(f"`{name}` must be a callable loss(output, target), e.g. F.cross_entropy or "
                            f"nn.CrossEntropyLoss(), or loss(model, batch); got the class {value.__name__} (instantiate it).")
        if not callable(value):
            raise TypeError(f"`{name}` must be a callable loss(output, target), e.g. F.cross_entropy; got "
                            f"{type(value).__name__}.")
        return value

    def bad_values(self):
        return [None, "1", 1.5, nn.CrossEntropyLoss]


class Function(Constraint):
    """Any callable (``what`` says what it is called with)."""

    def __init__(self, what: str = "a callable"):
        self.what = what

    def __call__(self, name, value):
        if isinstance(value, type) or not callable(value):
            got = "a class" if isinstance(value, type) else type(value).__name__
            raise TypeError(f"`{name}` must be {self.what}; got {got}.")
        return value

    def bad_values(self):
        return [None, "1", 1.5]


class SequenceOf(Constraint):
    """A list, tuple or 1-D array whose entries ``inner`` accepts (a string or a scalar is not a
    sequence); between ``min_len`` and ``max_len`` entries; ``unique``: no value twice;
    ``increasing``: strictly increasing.  Returns a list of the converted entries."""

    def __init__(self, inner: Constraint, *, min_len: int = 1, max_len: int = 10**6, unique: bool = False,
                 increasing: bool = False, what: str | None = None):
        self.inner, self.min_len, self.max_len, self.unique, self.increasing = inner, min_len, max_len, unique, increasing
        self.what = what or "a sequence"

    def __call__(self, name, value):
        if isinstance(value, (str, bytes, dict, set)) or not isinstance(value, (list, tuple, np.ndarray, range, torch.Tensor)):
            raise TypeError(f"`{name}` must be {'a non-empty' if self.min_len else 'a'} list or tuple ({self.what}); "
                            f"got {type(value).__name__}.")
        if isinstance(value, (np.ndarray, torch.Tensor)):
            if value.ndim != 1:
                raise ValueError(f"`{name}` must be a 1-D sequence ({self.what}); got shape {tuple(value.shape)}.")
            value = value.tolist()
        n = len(value)
        if not self.min_len <= n <= self.max_len:
            raise ValueError(f"`{name}` must be a list of {self.min_len} to {self.max_len} entries ({self.what}); "
                             f"got {n}.")
        out = [self.inner(name, v) for v in value]
        if self.unique and len(set(out)) != n:
            dup = next(v for v in out if out.count(v) > 1)
            raise ValueError(f"`{name}` must be free of repeated values; got {dup!r} more than once.")
        if self.increasing and any(b <= a for a, b in zip(out, out[1:])):
            raise ValueError(f"`{name}` must be strictly increasing; got {out}.")
        return out

    def bad_values(self):
        bad = [None, "12", 5, {1: 2}]
        if self.min_len >= 1:
            bad.append([])
        bad += [[v] for v in self.inner.bad_values() if v is not None][:5]
        if self.unique and self.min_len <= 2:
            good = self._good()
            if good is not None:
                bad.append([good, good])
        return bad

    def _good(self):
        for v in (1, 0, 2, 0.5, 1.0):
            try:
                self.inner("x", v)
                return v
            except (TypeError, ValueError):
                pass
        return None


class DictOf(Constraint):
    """A non-empty dict ``{what}`` whose entries pass ``entry(name, key, value) -> (value, size)``;
    with ``one_size`` (how the message names it), every entry has the same size."""

    def __init__(self, what: str, entry, *, one_size: str | None = None, bad=()):
        self.what, self.entry, self.one_size, self.bad = what, entry, one_size, list(bad)

    def __call__(self, name, value):
        if not isinstance(value, dict):
            raise TypeError(f"`{name}` must be a dict {{{self.what}}}; got {type(value).__name__}.")
        if not value:
            raise ValueError(f"`{name}` must be a non-empty dict {{{self.what}}}; got an empty one.")
        out, sizes = {}, set()
        for k, v in value.items():
            out[k], size = self.entry(name, k, v)
            sizes.add(size)
        if self.one_size is not None and len(sizes) != 1:
            raise ValueError(f"`{name}` must be {self.one_size}; got sizes {sorted(sizes)}.")
        return out

    def bad_values(self):
        return [None, "1", {}] + self.bad


def batch_leaves(value, name: str = "batch") -> list:
    """The tensors of a batch: a tensor, or a tuple / list / dict of them (nested); TypeError on
    anything else, naming ``name``."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in batch_leaves(v, name)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in batch_leaves(v, name)]
    raise TypeError(f"`{name}` must be a tensor, or a tuple, list or dict of tensors (the batch of "
                    f"loss_fn(model, batch)); got {type(value).__name__}.")


def map_batch(fn, value):
    """``fn`` applied to every tensor of a batch, the structure (tuple, list, dict) kept."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_batch(fn, v) for v in value)
    return {k: map_batch(fn, v) for k, v in value.items()}


def batch_size_of(value) -> int:
    """B, the first dimension that every tensor of a (checked) batch shares."""
    return batch_leaves(value)[0].shape[0]


class Batch(Constraint):
    """A batch for a loss ``loss_fn(model, batch) -> (B,)``: a tensor ``(B, ...)``, or a tuple, list
    or dict of them (nested allowed), every tensor with the same first dimension B >= 1 and on one
    device; float tensors finite."""

    def __call__(self, name, value):
        leaves = batch_leaves(value, name)
        if not leaves:
            raise ValueError(f"`{name}` must be a non-empty batch (at least one tensor); got an empty {type(value).__name__}.")
        for t in leaves:
            if t.dtype.is_floating_point or t.dtype == torch.int64:
                Tensor("label", min_ndim=1, nonempty=True, what="a tensor of shape (B, ...)")(name, t)
            else:
                _batch_tensor(name, t)
        sizes = {t.shape[0] for t in leaves}
        if len(sizes) != 1:
            raise ValueError(f"`{name}` must be tensors sharing their first (batch) dimension; got sizes {sorted(sizes)}.")
        devices = {t.device for t in leaves}
        if len(devices) != 1:
            raise ValueError(f"`{name}` must be tensors on one device; got {sorted(map(str, devices))}.")
        return value

    def bad_values(self):
        return [None, "1", 1.5, (), {"ids": "abc"}, torch.tensor(3), torch.zeros(0, 2), torch.full((2, 2), math.nan),
                {"a": torch.zeros(2, 3), "b": torch.zeros(3)}, torch.zeros(2, device="meta"),
                torch.zeros(2, dtype=torch.complex64)]

    def __repr__(self):
        return "Batch()"


def _batch_tensor(name, t):
    """A tensor of a batch that is neither float nor int64 (bool masks, int32 ids): non-empty (B, ...)."""
    if t.dtype.is_complex:
        raise TypeError(f"`{name}` must be real or integer tensors; got {_dtype_name(t.dtype)}.")
    if t.device.type == "meta":
        raise TypeError(f"`{name}` must be tensors with data; got a tensor on the 'meta' device.")
    if t.dim() == 0 or t.shape[0] == 0:
        raise ValueError(f"`{name}` must be tensors of shape (B, ...) with B >= 1; got shape {tuple(t.shape)}.")
    return t


class TokenIds(Constraint):
    """Token ids for a next-token loss: an int64 tensor ``(B, T + 1)`` with T >= 1, or a dict with
    such an ``"input_ids"`` entry (and optionally an ``"attention_mask"`` of the same shape)."""

    def __call__(self, name, value):
        ids = value.get("input_ids") if isinstance(value, dict) else value
        if isinstance(value, dict) and ids is None:
            raise ValueError(f"`{name}` must be token ids (B, T + 1) or a dict with 'input_ids'; got keys {list(value)}.")
        what = "int64 token ids of shape (B, T + 1), T >= 1 (or a dict with 'input_ids')"
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
            got = _dtype_name(ids.dtype) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise TypeError(f"`{name}` must be {what}; got {got}.")
        if ids.dim() != 2 or ids.shape[1] < 2 or ids.shape[0] < 1:
            raise ValueError(f"`{name}` must be {what}; got shape {tuple(ids.shape)}.")
        mask = value.get("attention_mask") if isinstance(value, dict) else None
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"`{name}` must be token ids with an 'attention_mask' of the shape of 'input_ids' "
                             f"{tuple(ids.shape)}; got {got}.")
        return value

    def bad_values(self):
        return [None, "1", torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int32), torch.zeros(3, dtype=torch.int64),
                torch.zeros(2, 1, dtype=torch.int64), {"ids": torch.zeros(2, 3, dtype=torch.int64)},
                {"input_ids": torch.zeros(2, 3, dtype=torch.int64), "attention_mask": torch.ones(2, 2)}]


class OptimizerClass(Constraint):
    """A subclass of ``torch.optim.Optimizer`` (the class, built later with the model's parameters)."""

    def __call__(self, name, value):
        if isinstance(value, type) and issubclass(value, torch.optim.Optimizer):
            return value
        raise TypeError(f"`{name}` must be a torch.optim.Optimizer class; got {type(value).__name__}.")

    def bad_values(self):
        return [None, 1.5, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), nn.Linear]



# --------------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------------
def _model_device_dtype(model):
    for p in model.parameters():
        return p.device, p.dtype
    for b in model.buffers():
        if b.dtype.is_floating_point:
            return b.device, b.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def nonfinite_params(model: nn.Module, params: dict | None = None) -> str | None:
    """``None`` if every trainable parameter is finite, else the reason (which and how many).
    ``params``: ``{name: parameter}``, the model's trainable parameters where the caller has them
    (not walked again)."""
    if params is None:
        params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    params = [(k, p) for k, p in params.items() if p.device.type != "meta"]
    if not params:
        return None
    tensors = [p for _, p in params]
    with torch.no_grad():
        # the sum of all entries is NaN or inf if one is, and finite values give a finite sum unless
        # it overflows (rare; then the exact max-norm below decides).  A sum, not a norm or a max:
        # one vectorised reduction reading each entry once, the cheapest pass (every probed step
        # pays it); summed on the device and checked on the host: one transfer
        if math.isfinite(float(torch.stack([p.sum() for p in tensors]).sum())):
            return None
        ok = torch.isfinite(torch.stack(torch._foreach_norm(tensors, math.inf)))
    if bool(ok.all()):
        return None
    bad = [(k, int((~torch.isfinite(p.detach())).sum())) for (k, p), fine in zip(params, ok.tolist()) if not fine]
    where = ", ".join(f"{n} in `{k}`" for k, n in bad[:3]) + (", ..." if len(bad) > 3 else "")
    return f"non-finite parameters ({where}): the model diverged"


def check_finite_params(model: nn.Module, name: str = "model") -> None:
    """Raise :class:`Diverged` if a trainable parameter of ``model`` is NaN or inf."""
    reason = nonfinite_params(model)
    if reason is not None:
        raise Diverged(f"`{name}` must be a model with finite parameters; got {reason} (lower the learning rate, or "
                       "restore a checkpoint from before the divergence).")


from ._checks import (  # noqa: E402,F401  (re-exported; _checks uses the constraints above)
    available_bytes,
    check_batch,
    check_batch_loss,
    check_bytes,
    check_losses,
    check_data_fits,
    check_model_fn,
    check_model_input,
    check_one_target,
    model_output,
)


def describe(fn) -> str:
    """A name for a callable that is the same in every process (no memory addresses): a function's
    ``module.qualname``, an object's own repr (e.g. ``models.Factory``), else its class name.  Used in
    the settings that resume files must match."""
    if hasattr(fn, "__qualname__"):  # a function
        return f"{fn.__module__}.{fn.__qualname__}"
    if type(fn).__repr__ is not object.__repr__:
        return repr(fn)
    return f"{type(fn).__module__}.{type(fn).__qualname__}"


def state_hash(state_dict: dict) -> str:
    """A hex SHA-1 of a module's ``state_dict()`` (names and raw bytes of any dtype)."""
    import hashlib

    h = hashlib.sha1()
    for name, t in state_dict.items():
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
