"""Checks across arguments (a batch against the model, data against a model factory) and of
memory, for :mod:`deepmodels._validate` (which re-exports them): see its policy."""

from __future__ import annotations

import os
import weakref

import torch
from torch import nn

from toymodels._validate import check_bytes as _check_bytes

from ._validate import Module, _dtype_name, _model_device_dtype

# --------------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------------
def available_bytes(device=None) -> int:
    """Free memory of ``device``: the GPU's free memory for CUDA, else the host's available memory
    (``MemAvailable``; 16 GiB if it cannot be read)."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def check_bytes(name: str, n_bytes: float, what: str, *, device=None, remedy: str = "") -> None:
    """:func:`toymodels._validate.check_bytes` against the memory available on ``device`` (the
    same message: the argument, the limit and the estimate), before the allocation is attempted."""
    where = "" if device is None else f" available on {device}"
    _check_bytes(name, n_bytes, what=what, limit=available_bytes(device), where=where or " available",
                 remedy=remedy)


# --------------------------------------------------------------------------------------------------
# cross-argument checks
# --------------------------------------------------------------------------------------------------
def check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    """``x`` and ``y`` hold the same number of examples, on the same device."""
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError("`x` must hold at least one example; got an empty batch.")
    if y.dim() == 0 or y.shape[0] != x.shape[0]:
        got = "a scalar" if y.dim() == 0 else y.shape[0]
        raise ValueError(f"`y` must have {x.shape[0]} entries to match `x`; got {got}.")
    if y.device != x.device:
        raise ValueError(f"`y` must be on the device of `x` ({x.device}); got {y.device}.")


def _forward_one(model, x1):
    """``model(x1)`` in eval mode without gradients (no running statistics change), modes restored."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            return model(x1)
    finally:
        for m, t in modes:
            m.training = t


# --------------------------------------------------------------------------------------------------
# forward passes checked once per model structure and input signature (the every-step probe)
# --------------------------------------------------------------------------------------------------
_ACCEPTED = weakref.WeakKeyDictionary()  # model -> {signature: what the checked forward pass gave}
_MAX_SIGNATURES = 16  # per model (inputs whose shapes vary from batch to batch would otherwise pile up)
_MISSING = object()


# attributes of a module that decide whether the fast path covers it (deepmodels.pergrad._kind), by type
_KIND_ATTRS = {}


def _kind_attrs(cls) -> tuple:
    """The attributes of a module of type ``cls`` on which the fast path's coverage depends besides
    its type (Conv2d: groups and padding; Embedding: sparse and frequency-scaled gradients)."""
    attrs = _KIND_ATTRS.get(cls)
    if attrs is None:
        attrs = _KIND_ATTRS[cls] = (("groups", "padding_mode", "padding") if issubclass(cls, nn.Conv2d) else
                                    ("sparse", "scale_grad_by_freq") if issubclass(cls, nn.Embedding) else ())
    return attrs


def _model_walk(model: nn.Module) -> tuple:
    """``(signature, modules, parameters)``: the model's modules, each once, and their own
    parameters (a shared one at each of its modules), in a fixed order, and a hashable signature of
    the structure they form.

    The signature holds, per module, its parent, its name there, its identity and type (and the
    attributes of :func:`_kind_attrs`), and per parameter its name, identity, shape, dtype, device
    and whether it is trainable: replacing, adding or removing a module or a parameter, freezing
    one, or moving the model to another dtype or device changes it.  Whatever is derived from these
    alone (a function of the signature: the parameters' full names, which modules the fast path
    covers, which parameters are tied) may be cached under it and bound to the objects of a later
    walk with the same signature by their positions, even where an object's identity was taken
    over by a new one of the same type and shape.  One loop over the modules' ``_modules`` and
    ``_parameters`` (no generators: the every-step probe pays it at every call)."""
    sig, mods, params, index = [], [model], [], {id(model): 0}
    i = 0
    while i < len(mods):
        m = mods[i]
        t = type(m)
        attrs = _kind_attrs(t)
        sig.append((t, tuple(getattr(m, a) for a in attrs)) if attrs else t)
        for k, p in m._parameters.items():
            if p is not None:
                params.append(p)
                sig.append((k, id(p), p.shape, p.dtype, p.device, p.requires_grad))
        for k, c in m._modules.items():
            if c is None:
                continue
            j = index.get(id(c))
            if j is None:  # a module met again (shared) is named, not walked, again
                j = index[id(c)] = len(mods)
                mods.append(c)
            sig.append((i, k, j, id(c)))
        i += 1
    return tuple(sig), mods, params


def _model_signature(model: nn.Module) -> tuple:
    """The model's structure as a one-example forward pass sees it (:func:`_model_walk`)."""
    return _model_walk(model)[0]


def _batch_signature(value):
    """The structure, per-example shapes, dtypes and devices of a batch (a tensor, or a tuple / list /
    dict of them), with the number of examples a check runs on (at most 2)."""
    if isinstance(value, torch.Tensor):
        return (value.shape[1:], min(value.shape[0], 2) if value.dim() else 0, value.dtype, value.device)
    if isinstance(value, (tuple, list)):
        return (type(value),) + tuple(_batch_signature(v) for v in value)
    return (dict,) + tuple((k, _batch_signature(v)) for k, v in value.items())


def _signature(model, loss_fn, *parts, model_signature=None):
    """A hashable key of the model's structure (``model_signature``, if the caller has it from
    :func:`_model_walk`), the loss function (by identity) and the rest of a check's inputs."""
    return (_model_signature(model) if model_signature is None else model_signature, id(loss_fn)) + parts


def _recall(model, key, loss_fn):
    """What the check with this key gave, or ``_MISSING``; the loss function is held weakly (a loss
    that refers to the model must not keep it alive) and must be the same object."""
    if key is None:
        return _MISSING
    ref, value = _ACCEPTED.get(model, {}).get(key, (None, _MISSING))
    return value if ref is not None and ref() is loss_fn else _MISSING


def _remember(model, key, loss_fn, value):
    if key is None:
        return
    try:
        ref = weakref.ref(loss_fn)
        seen = _ACCEPTED.setdefault(model, {})
    except TypeError:  # an object that cannot be weakly referenced: checked on every call
        return
    if len(seen) >= _MAX_SIGNATURES:
        seen.clear()
    seen[key] = (ref, value)


def check_model_input(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, loss_fn=None, *,
                      min_batch: int = 1, once: bool = False, model_signature=None) -> torch.Tensor | None:
    """Check a batch against the model before any work: same device and floating dtype as the
    parameters, ``y`` the same length, the model runs on ``x[:1]``, integer labels in
    ``[0, n_outputs)``, float targets of the model's dtype, and ``loss_fn`` gives a finite-or-not
    scalar on the first example.  Returns the model's output on ``x[:1]``.

    ``once`` (the every-step probe): the forward pass on ``x[:1]`` and the loss on it run once per
    model structure (:func:`_model_signature`), per-example shape, dtype and device of ``x`` and
    ``y``, and loss function; later calls with the same signature make the other checks (the labels
    against the number of outputs found then) and return None.  ``model_signature``: the model's
    signature (:func:`_model_walk`) where the caller has it (not walked again).
    """
    if y is not None:
        check_batch(x, y)
    if x.shape[0] < min_batch:
        raise ValueError(f"`x` must hold at least {min_batch} examples to measure a variance; got {x.shape[0]}.")
    device, dtype = _model_device_dtype(model)
    if x.device != device:
        raise ValueError(f"`x` must be on the model's device ({device}); got {x.device}. Move one of them with "
                         f".to(device).")
    if x.dtype != dtype:
        raise TypeError(f"`x` must be a {_dtype_name(dtype)} tensor (the model's dtype); got {_dtype_name(x.dtype)}. "
                        f"Convert with x.to({dtype}) or the model with model.to({dtype}).")
    if y is not None and y.dtype.is_floating_point and y.dtype != dtype:
        raise TypeError(f"`y` must be int64 class labels or {_dtype_name(dtype)} targets (the model's dtype); got "
                        f"{_dtype_name(y.dtype)}.")
    key = _signature(model, loss_fn, x.shape[1:], None if y is None else (y.shape[1:], y.dtype),
                     model_signature=model_signature) if once else None
    n_out = _recall(model, key, loss_fn)
    out = None
    if n_out is _MISSING:
        try:
            out = _forward_one(model, x[:1])
        except Exception as err:  # the model's own error names no argument: say which input it could not take
            raise ValueError(f"`x` must be an input the model accepts; model(x[:1]) on x[:1] of shape "
                             f"{tuple(x[:1].shape)} raised {type(err).__name__}: {err}") from None
        out = model_output(out)
        n_out = out.shape[1] if out.dim() >= 2 else None
    if y is not None and not y.dtype.is_floating_point:
        if y.numel() and n_out is not None:
            lo, hi = torch.stack(torch.aminmax(y)).tolist()  # one host transfer (a GPU sync)
            if lo < 0 or hi >= n_out:
                bad = lo if lo < 0 else hi
                raise ValueError(f"`y` must hold class labels in [0, {n_out}) (the model has {n_out} outputs); got {bad}.")
    if out is None:  # checked before, with this signature
        return None
    if loss_fn is not None and y is not None:
        try:
            loss = loss_fn(out, y[:1])
        except Exception as err:
            raise ValueError(f"`loss_fn` must accept (model output, y); loss_fn(model(x[:1]), y[:1]) raised "
                             f"{type(err).__name__}: {err}") from None
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"`loss_fn` must return a scalar tensor (a loss reduced by the mean); got {got}. A loss "
                             "giving per-example losses takes the batch form loss_fn(model, batch) with `batch=`.")
    _remember(model, key, loss_fn, n_out)
    return out


def model_output(out):
    """The tensor of a model's output: the tensor itself, or the ``.logits`` of a Hugging Face style
    output object; TypeError naming ``model`` otherwise."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    extra = (" (its `.loss` is a batch mean, which has no per-example gradients: give per-example losses from "
             "`.logits` instead)" if getattr(out, "loss", None) is not None else "")
    raise TypeError(f"`model` must return a tensor or an object with a `.logits` tensor; got {type(out).__name__}{extra}.")


def check_batch_loss(model: nn.Module, loss_fn, batch, *, min_batch: int = 1, once: bool = False,
                     model_signature=None) -> int:
    """Check the batch form ``loss_fn(model, batch) -> (B,)`` per-example losses before any work:
    at least ``min_batch`` examples, the batch on the model's device, and ``loss_fn`` on the first
    (up to) two examples, in eval mode without gradients, returns a tensor of shape (n,).  Returns B.

    ``once``: the loss on the first examples runs once per model structure, batch signature (its
    structure, per-example shapes, dtypes, devices) and loss function (as in :func:`check_model_input`,
    ``model_signature`` too)."""
    from ._validate import batch_leaves, map_batch

    leaves = batch_leaves(batch)
    B = leaves[0].shape[0]
    if B < min_batch:
        raise ValueError(f"`batch` must have at least {min_batch} examples to measure a variance; got {B}.")
    device = _model_device_dtype(model)[0]
    if leaves[0].device != device:
        raise ValueError(f"`batch` must be on the model's device ({device}); got {leaves[0].device}. Move one of them "
                         f"with .to(device).")
    n = min(B, 2)
    key = _signature(model, loss_fn, _batch_signature(batch), model_signature=model_signature) if once else None
    if _recall(model, key, loss_fn) is not _MISSING:
        return B
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            losses = loss_fn(model, map_batch(lambda t: t[:n], batch))
    except Exception as err:  # the loss's own error names no argument
        raise ValueError(f"`loss_fn` must accept (model, batch) in the batch form; loss_fn(model, batch[:{n}]) raised "
                         f"{type(err).__name__}: {err}") from None
    finally:
        for m, t in modes:
            m.training = t
    check_losses(losses, n)
    _remember(model, key, loss_fn, True)
    return B


def check_losses(losses, n: int) -> None:
    """``losses`` must be per-example losses of shape (n,) (the batch form of a loss)."""
    if not isinstance(losses, torch.Tensor) or losses.shape != (n,):
        got = (("a scalar (a loss reduced over the batch)" if losses.dim() == 0 else f"shape {tuple(losses.shape)}")
               if isinstance(losses, torch.Tensor) else type(losses).__name__)
        raise ValueError(f"`loss_fn` must return per-example losses of shape (B,) = ({n},) in the batch form "
                         f"loss_fn(model, batch) (use reduction='none' and average over all but the batch "
                         f"dimension); got {got}.")


def check_one_target(target, target_rel, *, what: str = "training loss", required: bool = True) -> None:
    """``target`` (an absolute ``what``) and ``target_rel`` (a fraction of the initial one): exactly
    one of them (``required``), or at most one."""
    both = target is not None and target_rel is not None
    if both or (required and target is None and target_rel is None):
        got = f"both (target={target!r}, target_rel={target_rel!r})" if both else "neither"
        raise ValueError(f"{'exactly' if required else 'at most'} one of `target` (an absolute {what}) and "
                         f"`target_rel` (a fraction in (0, 1) of the initial {what}) must be given; got {got}.")


def check_model_fn(model_fn, data, seed: int, loss_fn=None) -> nn.Module:
    """Build ``model_fn(seed)`` (the global RNG state is kept) and check it against ``data``'s
    first training examples and number of classes; return the model."""
    with torch.random.fork_rng(devices=[]):
        try:
            model = model_fn(seed)
        except Exception as err:
            raise ValueError(f"`model_fn` must build a model from a seed; model_fn({seed}) raised "
                             f"{type(err).__name__}: {err}") from None
    Module()("model_fn(seed)", model)
    check_data_fits(model, data, loss_fn, name="model_fn")
    return model


def check_data_fits(model, data, loss_fn=None, *, name: str = "model", device=None) -> None:
    """``data`` (a :class:`deepmodels.data.Dataset`) suits ``model``: dtype, example shape, and at
    most as many classes as outputs (checked on two examples, on the model's current device)."""
    dev = _model_device_dtype(model)[0]
    if dev.type == "meta":
        raise ValueError(f"`{name}` must be a model holding data; its parameters are on the 'meta' device.")
    x2, y2 = data.x_train[:2].to(dev), data.y_train[:2].to(dev)
    try:
        out = check_model_input(model, x2, y2, loss_fn)
    except (TypeError, ValueError) as err:
        raise type(err)(f"`data` must suit `{name}`: {err}") from None
    if out.dim() >= 2 and data.n_classes > out.shape[1]:
        raise ValueError(f"`data` must have at most as many classes as `{name}` has outputs ({out.shape[1]}); got "
                         f"{data.n_classes} classes.")
