"""Per-example gradients: for any model by ``torch.func`` (chunked), and a hook fast path that gives
per-example squared norms, dot products with the mean gradient, coordinate sums of squares and Gram
entries without materialising the model's ``(B, P)`` array.

The fast path reads, during the training step's own forward and backward pass, each covered module's
input and the gradient at its output (d, per example: the mean loss's output gradient times B):

* ``nn.Linear`` on ``(B, F)`` or ``(B, ..., F)`` inputs: g_i = sum_t d_it a_it^T, so with one
  position |g_i|^2 = |d_i|^2 |a_i|^2, and with several a ``T x T`` Gram identity or a batched matmul;
  for squared norms alone (the every-step probe) a Linear on sequences whose weight is its own forms
  g_i in the backward pass itself and returns their sum as the weight gradient, so the batched
  matmul replaces the batch weight gradient's product instead of adding to it;
* ``nn.Conv2d`` (groups 1, zero padding): per-example weight gradients by input patches or one
  grouped convolution, one layer at a time; for squared norms alone a convolution with many output
  positions (T (O + I) >= O I) forms them in the backward pass itself and returns their sum as the
  weight gradient, as the Linear on sequences does;
* ``nn.Embedding``: g_i is the scatter of d_it into the rows of the example's tokens (no row for
  ``padding_idx``); norms, dot products and coordinate sums come from the (example, token) pairs,
  never from a ``(B, V, D)`` array;
* ``nn.LayerNorm`` and ``nn.RMSNorm``: weight g_i = sum_t d_it * x_hat_it, bias g_i = sum_t d_it
  (small ``(B, D)`` arrays).

A module called several times in one forward pass adds its calls as more positions; a parameter
shared by several modules (tied token embedding and unembedding) has per-example gradients
g_i = sum_u G_iu over its uses u: for squared norms and dot products with the mean (the every-step
probe) |g_i|^2 = sum_u |G_iu|^2 + 2 sum_{u<w} <G_iu, G_iw>, each use by its own handler and the cross
terms by a ``T x S`` product per example (Embedding with Linear, two Linears, two Embeddings); for
coordinate sums and Gram entries (or other pairs) the sum is materialised in chunks of examples,
for that parameter only.
Parameters outside these modules (a bare ``nn.Parameter`` such as a learned position embedding, an
unknown module) are measured by ``torch.func`` for those parameters only.
References: Goodfellow, 2015, "Efficient per-example gradient computations" (the Linear identity);
Rochette, Manoel and Tramel, 2019, "Efficient per-example gradient computations in convolutional
neural networks" (convolutions); Li et al., 2022, "Large language models can be strong
differentially private learners", Sec. 4 (the T x T Gram identity for sequences).

Two forms of the loss: ``loss_fn(output, target)`` reducing by the mean over ``(x, y)``, or the
batch form ``loss_fn(model, batch) -> (B,)`` per-example losses (``batch=``), e.g.
:func:`next_token_loss`; see :func:`check`.
"""

from __future__ import annotations

import math
import warnings
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.grad import conv2d_weight

from . import _validate as V
from ._checks import _model_walk
from ._validate import Batch, Boolean, Function, Integer, LossFn, Maybe, Module, Options, Tensor, TokenIds, validate

__all__ = ["per_example_grads", "flatten", "hook_summaries", "capture_backward", "LayerCapture", "FastPathUnsupported",
           "check_batch", "Diverged", "next_token_loss", "check"]

Diverged = V.Diverged  # raised for non-finite parameters, loss or per-example gradients (a ValueError)


X = Tensor("float", min_ndim=1, nonempty=True)  # a batch of inputs (B, ...)
Y = Tensor("label", min_ndim=1)  # int64 class labels (B, ...) or float targets
BATCH = Batch()  # the batch of the batch form loss_fn(model, batch)
METHODS = ("auto", "func", "hooks")


@validate(x=X, y=Y)
def check_batch(x, y):
    """Raise TypeError / ValueError unless ``x`` is a finite float batch ``(B, ...)`` and ``y`` holds
    B labels or targets on the same device."""
    V.check_batch(x, y)


def check_inputs(model, loss_fn, x, y, *, min_batch: int = 1):
    """The cross-argument checks of every probe (see :func:`deepmodels._validate.check_model_input`)."""
    return V.check_model_input(model, x, y, loss_fn, min_batch=min_batch)


def check_grad_memory(model, x, copies: float = 1.0, itemsize: int | None = None, n_params: int | None = None):
    """Refuse a ``(B, P)`` per-example gradient array that cannot fit in memory, naming ``x``
    (``n_params``: P, default every trainable parameter)."""
    B, P = x.shape[0], V.n_trainable(model) if n_params is None else n_params
    size = itemsize or x.element_size()
    V.check_bytes("x", copies * B * P * size, f"the per-example gradients of {B} examples x {P} parameters",
                  device=x.device, remedy="Measure on fewer examples.")


# --------------------------------------------------------------------------------------------------
# the loss, in either form
# --------------------------------------------------------------------------------------------------
class _Problem:
    """A batch and its loss: ``loss_fn(model(x), y)`` reducing by the mean, or the batch form
    ``loss_fn(model, batch) -> (B,)`` per-example losses (averaged here, so that ``.grad`` holds the
    mean gradient in both forms and the per-example output gradients are B times those seen)."""

    def __init__(self, model, loss_fn, x, y, batch):
        self.model, self.loss_fn, self.x, self.y, self.batch = model, loss_fn, x, y, batch
        self.layout = None  # the model's _layout, where the caller has it
        first = x if batch is None else V.batch_leaves(batch)[0]
        self.B, self.device = first.shape[0], first.device

    @property
    def dtype(self):
        """The model's floating dtype."""
        return next((p.dtype for p in self.model.parameters()), torch.get_default_dtype())

    def mean_loss(self):
        """The batch's mean loss (forward pass, with gradients)."""
        if self.batch is None:
            return self.loss_fn(V.model_output(self.model(self.x)), self.y)
        losses = self.loss_fn(self.model, self.batch)
        V.check_losses(losses, self.B)
        return losses.mean()

    def inputs(self):
        """What is split into examples: ``(x, y)`` or ``(batch,)``."""
        return (self.x, self.y) if self.batch is None else (self.batch,)

    def rows(self, i, j):
        """The examples ``i:j`` of :meth:`inputs`."""
        return tuple(V.map_batch(lambda t: t[i:j], v) for v in self.inputs())

    def example_loss(self, i):
        """The loss of example i alone (plain autograd)."""
        if self.batch is None:
            return self.loss_fn(V.model_output(self.model(self.x[i:i + 1])), self.y[i:i + 1])
        return self.loss_fn(self.model, self.rows(i, i + 1)[0])[0]


def _problem(model, loss_fn, x, y, batch, *, min_batch: int = 1, once: bool = False) -> _Problem:
    """One of the two forms, checked against the model before any work (``once``: the forward pass
    on the first examples once per model structure and input signature, for the every-step probe;
    see :func:`deepmodels._validate.check_model_input`; the model's :func:`_layout`, from the same
    walk, is kept on the problem for the capture)."""
    layout = _layout(model) if once else None
    sig = None if layout is None else layout.signature
    if batch is None:
        if x is None or y is None:
            raise TypeError("`x` and `y` must be given (the form loss_fn(model(x), y)), or `batch` alone (the form "
                            "loss_fn(model, batch) -> (B,) per-example losses); got "
                            f"{'neither' if x is None and y is None else 'only one of x and y'}.")
        V.check_model_input(model, x, y, loss_fn, min_batch=min_batch, once=once, model_signature=sig)
    else:
        if x is not None or y is not None:
            raise ValueError("`batch` must be given alone (the form loss_fn(model, batch)); got also `x` or `y`.")
        V.check_batch_loss(model, loss_fn, batch, min_batch=min_batch, once=once, model_signature=sig)
    prob = _Problem(model, loss_fn, x, y, batch)
    prob.layout = layout
    return prob


@validate(model=Module(), batch=TokenIds())
def next_token_loss(model: nn.Module, batch) -> torch.Tensor:
    """Per-example next-token cross-entropy, the batch form ``loss_fn(model, batch) -> (B,)``.

    Args:
        model: a language model mapping token ids ``(B, T)`` to logits ``(B, T, V)``, or to an
            object with ``.logits`` (Hugging Face style); called as ``model(ids)``, or
            ``model(ids, attention_mask=mask)`` when the batch has a mask.
        batch: int64 token ids ``(B, T + 1)``, or a dict with ``"input_ids"`` (and optionally an
            ``"attention_mask"`` of 0/1 entries, 1 for real tokens).

    Returns:
        ``(B,)`` per example, the mean over its positions t = 1..T of -log p(token_t | tokens < t)
        (nats), counting only positions whose target is a real token when there is a mask.
    """
    ids = batch["input_ids"] if isinstance(batch, dict) else batch
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    inputs, targets = ids[:, :-1], ids[:, 1:]
    out = model(inputs) if mask is None else model(inputs, attention_mask=mask[:, :-1])
    logits = V.model_output(out)
    B, T = targets.shape
    ce = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1), reduction="none").reshape(B, T)
    if mask is None:
        return ce.mean(1)
    w = mask[:, 1:].to(ce.dtype)
    return (ce * w).sum(1) / w.sum(1).clamp_min(1.0)


class _BatchLoss(nn.Module):
    """``loss_fn(model, batch)`` as a module, so that ``functional_call`` swaps the model's parameters."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


# --------------------------------------------------------------------------------------------------
# torch.func, for the whole model or a subset of its parameters
# --------------------------------------------------------------------------------------------------
def _trainable(model):
    return {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}


def _check_no_batchnorm(model):
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()):
        raise ValueError("`model` has BatchNorm in training mode: per-example gradients are undefined; call model.eval().")


def _func_grads(prob: _Problem, names, chunk_size: int) -> dict:
    """``{name: (B, *shape)}`` per-example gradients of the parameters ``names`` only (the others
    held fixed), by ``vmap(grad)`` in chunks of examples."""
    model, names = prob.model, list(names)
    if _ddp_group(model) is not None:  # the wrapped module (DDP's forward is not for vmap), under its own names
        inner = _func_grads(_Problem(model.module, prob.loss_fn, prob.x, prob.y, prob.batch),
                            [k.removeprefix("module.") for k in names], chunk_size)
        return {k: inner[k.removeprefix("module.")] for k in names}
    _check_no_batchnorm(model)
    named = dict(model.named_parameters())
    params = {k: named[k].detach() for k in names}
    rest = {k: v.detach() for k, v in named.items() if k not in params}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    if prob.batch is None:
        def loss_one(p, xi, yi):
            out = functional_call(model, (p, rest, buffers), (xi.unsqueeze(0),))
            return prob.loss_fn(V.model_output(out), yi.unsqueeze(0))
    else:
        wrapper = _BatchLoss(model, prob.loss_fn)
        rest = {"model." + k: v for k, v in rest.items()}
        buffers = {"model." + k: v for k, v in buffers.items()}

        def loss_one(p, bi):
            one = V.map_batch(lambda t: t.unsqueeze(0), bi)
            return functional_call(wrapper, ({"model." + k: v for k, v in p.items()}, rest, buffers), (one,))[0]

    g = vmap(grad(loss_one), in_dims=(None,) + (0,) * len(prob.inputs()))
    parts = [g(params, *prob.rows(i, i + chunk_size)) for i in range(0, prob.B, chunk_size)]
    out = {k: torch.cat([p[k] for p in parts]) for k in params}
    for k, v in out.items():
        if not torch.all(torch.isfinite(v)):
            raise V.Diverged(f"non-finite per-example gradient in `{k}` (NaN or inf loss?).")
    return out


@validate(model=Module(finite=True), loss_fn=LossFn(), x=Maybe(X), y=Maybe(Y), batch=Maybe(BATCH),
          chunk_size=Integer(1, V.MAX_WIDTH))
def per_example_grads(model: nn.Module, loss_fn, x=None, y=None, *, batch=None, chunk_size: int = 256) -> dict:
    """``{parameter name: (B, *shape)}`` per-example gradients, by ``torch.func`` (any model).

    Args:
        model: any module without batch-coupled layers in training mode (BatchNorm in train mode mixes
            examples, so per-example gradients are undefined; use ``model.eval()``).
        loss_fn: ``loss_fn(output, target)`` for a batch ``(x, y)``, reducing by the mean (per
            example it sees a batch of one); or, with ``batch``, ``loss_fn(model, batch) -> (B,)``
            per-example losses (:func:`next_token_loss`).
        x, y: a batch: ``x`` of the model's dtype and device, ``y`` int64 labels or float targets.
        batch: instead of ``x`` and ``y``, a tensor or a tuple / list / dict of tensors sharing B.
        chunk_size: examples per vectorised call (bounds memory).

    Raises:
        TypeError, ValueError: bad input (see :mod:`deepmodels._validate`), or a ``(B, P)`` result
            that would not fit in memory.
        deepmodels._validate.Diverged: non-finite parameters, or a non-finite per-example gradient.
    """
    prob = _problem(model, loss_fn, x, y, batch)
    _check_memory(prob, V.n_trainable(model), copies=2.0)
    return _func_grads(prob, list(_trainable(model)), chunk_size)


def _check_memory(prob: _Problem, n_params: int, copies: float = 1.0, itemsize: int | None = None):
    size = itemsize or torch.empty((), dtype=prob.dtype).element_size()
    arg = "x" if prob.batch is None else "batch"
    V.check_bytes(arg, copies * prob.B * n_params * size,
                  f"the per-example gradients of {prob.B} examples x {n_params} parameters", device=prob.device,
                  remedy="Measure on fewer examples.")


def _grad_entry(name, key, v):
    if not isinstance(v, torch.Tensor) or v.dim() < 1:
        raise TypeError(f"`{name}` must be a dict of (B, ...) tensors; `{key}` is {type(v).__name__}.")
    return v, v.shape[0]


# what per_example_grads returns: (B, ...) tensors sharing B
_GRADS = V.DictOf("name: (B, ...) tensor", _grad_entry, one_size="tensors sharing one batch size",
                  bad=[{"w": 1.0}, {"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)}])


@validate(grads=_GRADS)
def flatten(grads: dict) -> torch.Tensor:
    """``(B, P)`` from :func:`per_example_grads`."""
    return torch.cat([v.reshape(v.shape[0], -1) for v in grads.values()], dim=1)


# --------------------------------------------------------------------------------------------------
# the fast path: per module kind
# --------------------------------------------------------------------------------------------------
_SMALL_WORK = 1024  # up to this many input channels x output positions, patches + batched matmul beat a grouped convolution
_CHUNK_ELEMENTS = 2**24  # elements of one chunk of materialised per-example gradients (shared parameters)


def _patches(a, m: nn.Conv2d):
    """Input patches ``(B, C_in k_h k_w, T)`` of a Conv2d (zero padding), as ``F.unfold`` gives them,
    but from strided views of the padded input: one copy, no per-image loop."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation
    v = torch.nn.functional.pad(a, (pw, pw, ph, ph))
    v = v.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]  # (B, C, H', W', kh, kw)
    B, C, H, W = v.shape[:4]
    return v.permute(0, 1, 4, 5, 2, 3).reshape(B, C * kh * kw, H * W)


def _conv_per_example(m: nn.Conv2d, a, d):
    """Per-example weight gradients ``(B, C_out, C_in k^2)`` of a Conv2d from its input ``a`` and the
    per-example output gradients ``d``.  Few input channels or small feature maps: input patches and a
    batched matmul; otherwise one grouped-convolution call (the batch as B groups of channels), which
    is faster there on CPU (``benchmarks/probe_overhead.py``)."""
    B, cin, cout = a.shape[0], a.shape[1], d.shape[1]
    if cin * d.shape[2] * d.shape[3] <= _SMALL_WORK:
        return torch.bmm(d.reshape(B, cout, -1), _patches(a, m).transpose(1, 2))
    return conv2d_weight(a.reshape(1, B * cin, *a.shape[2:]), (B * cout, cin, *m.kernel_size),
                         d.reshape(1, B * cout, *d.shape[2:]), stride=m.stride, padding=m.padding,
                         dilation=m.dilation, groups=B).reshape(B, cout, -1)


class FastPathUnsupported(ValueError):
    """The model (or this batch) is outside what the hook fast path covers; torch.func still works."""


class _Unsuitable(Exception):
    """A captured call that the fast path cannot use (the reason is the message)."""


def _kind(m: nn.Module):
    """The fast-path handler of a module, or None (subclasses with their own ``forward`` are not covered)."""
    for cls, kind in ((nn.Linear, "linear"), (nn.Conv2d, "conv"), (nn.Embedding, "embedding"),
                      (nn.LayerNorm, "layernorm"), (nn.RMSNorm, "rmsnorm")):
        if isinstance(m, cls) and type(m).forward is cls.forward:
            if kind == "conv" and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
                return None
            if kind == "embedding" and (m.sparse or m.scale_grad_by_freq):
                return None
            return kind
    return None


def _why_not(n: str, m: nn.Module) -> str:
    what = f"{type(m).__name__} `{n or 'model'}`"
    if isinstance(m, nn.Conv2d):
        return f"{what} (the fast path needs Conv2d with groups=1, zero padding given as numbers)"
    if isinstance(m, nn.Embedding):
        return f"{what} (sparse or scale_grad_by_freq embeddings are not covered)"
    return what


def _merge(kind, m, calls, B):
    """A module's captured calls as one set of positions, with the output gradients of the mean loss
    as captured (1 / B of the per-example ones: :func:`_rescale` scales the statistics, not these arrays):
    linear ``(a (B, T, I), d (B, T, O))``, embedding ``(tokens (B, T), d (B, T, D))``, layernorm /
    rmsnorm ``(x_hat (B, T, P), d (B, T, P))``, conv a list of ``(a, d)``; None if no gradient came."""
    got = [(a, g) for a, g in calls if g is not None]
    if not got:
        return None
    for a, g in got:
        if not isinstance(a, torch.Tensor) or a.dim() == 0 or a.shape[0] != B or g.shape[0] != B:
            shape = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            raise _Unsuitable(f"its module ran on an input of shape {shape}, not a batch of {B} examples")
    dtype = m.weight.dtype  # under autocast, inputs and gradients may have another dtype
    if any(g.dtype != dtype or (a.is_floating_point() and a.dtype != dtype) for a, g in got):
        got = [(a.to(dtype) if a.is_floating_point() else a, g.to(dtype)) for a, g in got]
    if kind == "conv":
        if any(a.dim() != 4 for a, _ in got):
            raise _Unsuitable("its Conv2d ran on an input that is not (B, C, H, W)")
        return got
    if kind == "embedding":
        tok = _cat([a.reshape(B, -1) for a, _ in got])
        d = _cat([g.reshape(B, -1, g.shape[-1]) for _, g in got])
        if m.padding_idx is not None:  # the padding row gets no gradient
            d = d * (tok != m.padding_idx).unsqueeze(-1).to(d.dtype)
        return tok, d
    if kind == "linear":
        if any(a.dim() < 2 for a, _ in got):
            raise _Unsuitable("its Linear ran on an unbatched (features,) input")
        a = _cat([a.reshape(B, -1, a.shape[-1]) for a, _ in got])
        return a, _cat([g.reshape(B, -1, g.shape[-1]) for _, g in got])
    shape = tuple(m.normalized_shape)
    n = int(np.prod(shape))
    xs, ds = [], []
    for a, g in got:
        if a.dim() <= len(shape):
            raise _Unsuitable(f"its {type(m).__name__} ran on an unbatched input")
        xh = (F.layer_norm(a, shape, None, None, m.eps) if kind == "layernorm" else F.rms_norm(a, shape, None, m.eps))
        xs.append(xh.reshape(B, -1, n))
        ds.append(g.reshape(B, -1, n))
    return _cat(xs), _cat(ds)


def _total(parts):
    """The sum of tensors (no copy for one)."""
    parts = iter(parts)
    out = next(parts)
    for t in parts:
        out = out + t
    return out


def _cat(parts):
    """The calls of a module joined along the positions (no copy for one call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _dense(kind, m, data, attr, rows):
    """Per-example gradients ``(b, *shape)`` of the parameter ``attr`` of a module, for the examples
    ``rows`` (a slice), from its merged data (:func:`_merge`)."""
    p = getattr(m, attr)
    if kind == "conv":
        if attr == "weight":
            return _total(_conv_per_example(m, a[rows], d[rows]) for a, d in data).reshape(-1, *p.shape)
        return _total(d[rows].reshape(d[rows].shape[0], d.shape[1], -1).sum(2) for _, d in data)
    a, d = data[0][rows], data[1][rows]
    if kind == "linear":
        return torch.bmm(d.transpose(1, 2), a) if attr == "weight" else d.sum(1)
    if kind == "embedding":
        b, T = a.shape
        out = torch.zeros(b, *p.shape, dtype=d.dtype, device=d.device)
        ex = torch.arange(b, device=a.device).unsqueeze(1).expand(b, T)
        return out.index_put_((ex, a), d, accumulate=True)
    g = (d * a).sum(1) if attr == "weight" else d.sum(1)  # layer norms: weight multiplies x_hat
    return g.reshape(-1, *p.shape)


def _sq_norms(G):
    """The squared norms ``(B,)`` of the examples of ``G (B, ...)`` (over every dimension but the
    first), without a temporary of G's size."""
    n = torch.linalg.vector_norm(G, dim=tuple(range(1, G.dim())))
    return n * n


def _dense_block(G, mean, need):
    """The statistics of one parameter from its per-example gradients ``G (B, P)`` and mean ``(P,)``."""
    blk = {"mean": mean, "sq": _sq_norms(G)}
    if "dots" in need:
        blk["dots"] = G @ mean
    if "sum_sq" in need:
        blk["sum_sq"] = (G * G).sum(0)
    if "gram" in need:
        blk["gram"] = G @ G.T
    return blk


def _probe_vectors(p, seed=0):
    """Random u (first dimension of p) and v (the others, flattened; None for a vector)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n, m = p.shape[0], p[0].numel() if p.dim() > 1 else 0
    u = torch.randn(n, generator=gen, dtype=torch.float64).to(p.dtype).to(p.device)  # (converted on the CPU)
    v = torch.randn(m, generator=gen, dtype=torch.float64).to(p.dtype).to(p.device) if m else None
    return u, v


def _terms(kind, m, data, attr, u, v):
    """The terms, one per example and position, whose sum is the projection sum_i u^T g_i v of a
    parameter's per-example gradients through one module (u . g_i for a vector parameter)."""
    if kind == "conv":
        if attr == "bias":
            return torch.cat([torch.einsum("bchw,c->bhw", d, u).reshape(-1) for _, d in data])
        return torch.cat([(torch.einsum("bchw,c->bhw", d, u).reshape(d.shape[0], -1)
                           * torch.einsum("bkt,k->bt", _patches(a, m), v)).reshape(-1) for a, d in data])
    a, d = data
    if kind == "linear":
        return (d @ u) * (a @ v) if attr == "weight" else d @ u
    if kind == "embedding":
        return u[a] * (d @ v)
    return (d * a) @ u if attr == "weight" else d @ u  # layer norms: a is x_hat


def _linear_blocks(m, data, attrs, means, need, B, scale=1.0):
    a, d = data
    out = {}
    if "weight" in attrs and a.shape[1] == 1 and not need:
        # the every-step probe, one position: |g_i|^2 = |d_i|^2 |a_i|^2 (no temporary of d's size), scaled here
        dd_sum = _sq_norms(d) * (scale * scale)
        out["weight"] = {"mean": means["weight"], "sq": dd_sum * _sq_norms(a)}
        if "bias" in attrs:  # |d_i|^2 is already formed
            out["bias"] = {"mean": means["bias"], "sq": dd_sum}
        return out
    if "weight" in attrs:
        gw = means["weight"].reshape(m.weight.shape)
        n_out, n_in, T = gw.shape[0], gw.shape[1], a.shape[1]
        if T == 1:  # one position: g_i = d_i a_i^T
            a2, d2 = a[:, 0], d[:, 0]
            dd, aa = d2 * d2, a2 * a2
            dd_sum = dd.sum(1)
            blk = {"mean": gw.reshape(-1), "sq": dd_sum * aa.sum(1)}
            if "dots" in need:
                blk["dots"] = ((d2 @ gw) * a2).sum(1)
            if "sum_sq" in need:
                blk["sum_sq"] = (dd.T @ aa).reshape(-1)
            if "gram" in need:
                blk["gram"] = (d2 @ d2.T) * (a2 @ a2.T)
        elif not need and T * (n_out + n_in) < n_out * n_in:
            # squared norms only, few positions: |sum_t d_t a_t^T|^2 = sum_{t,t'} (d_t . d_t')(a_t . a_t')
            sq = (torch.bmm(d, d.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum((1, 2))
            blk = {"mean": gw.reshape(-1), "sq": sq}
        else:
            gi = torch.bmm(d.transpose(1, 2), a)
            blk = _dense_block(gi.reshape(B, -1), gw.reshape(-1), need)
        out["weight"] = blk
    if "bias" in attrs:
        out["bias"] = _dense_block(d.sum(1), means["bias"], need)
    return {attr: _rescale(blk, scale) for attr, blk in out.items()}


def _conv_blocks(m, data, attrs, means, need, B, scale=1.0):
    out = {}
    if "weight" in attrs:
        gw = means["weight"]
        n_out, n_in = m.weight.shape[0], m.weight[0].numel()
        n_pos = sum(d.shape[2] * d.shape[3] for _, d in data)
        if not need and n_pos * (n_out + n_in) < n_out * n_in:
            # squared norms only, few positions: two T x T Gram matrices per example
            at = _cat([_patches(a, m).transpose(1, 2) for a, _ in data])  # (B, T, n_in)
            dt = _cat([d.reshape(B, n_out, -1).transpose(1, 2) for _, d in data])  # (B, T, n_out)
            sq = (torch.bmm(dt, dt.transpose(1, 2)) * torch.bmm(at, at.transpose(1, 2))).sum((1, 2))
            out["weight"] = {"mean": gw, "sq": sq}
        else:
            gi = _dense("conv", m, data, "weight", slice(None))
            out["weight"] = _dense_block(gi.reshape(B, -1), gw, need)
    if "bias" in attrs:
        out["bias"] = _dense_block(_dense("conv", m, data, "bias", slice(None)), means["bias"], need)
    return {attr: _rescale(blk, scale) for attr, blk in out.items()}


def _embedding_blocks(m, data, attrs, means, need, B, scale=1.0):
    """The statistics of an embedding's weight from its (example, token) pairs: h_u = sum of d over
    the positions of pair u is row tok_u of example ex_u's gradient, so |g_i|^2 = sum_{u in i} |h_u|^2,
    g_i . G = sum_t d_t . G[tok_t], and sum_i g_i^2 is the scatter of h_u^2 into row tok_u."""
    tok, d = data
    V_, D = m.weight.shape
    gw = means["weight"].reshape(V_, D)
    key = (torch.arange(B, device=tok.device).unsqueeze(1) * V_ + tok).reshape(-1)
    pairs, inv = torch.unique(key, return_inverse=True)
    h = torch.zeros(pairs.shape[0], D, dtype=d.dtype, device=d.device).index_add_(0, inv, d.reshape(-1, D))
    ex, tk = pairs // V_, pairs % V_
    hh = h * h
    blk = {"mean": gw.reshape(-1), "sq": torch.zeros(B, dtype=d.dtype, device=d.device).index_add_(0, ex, hh.sum(1))}
    if "dots" in need:
        blk["dots"] = (d * gw[tok]).sum((1, 2))
    if "sum_sq" in need:
        blk["sum_sq"] = torch.zeros(V_, D, dtype=d.dtype, device=d.device).index_add_(0, tk, hh).reshape(-1)
    if "gram" in need:  # the gradients restricted to the rows of the tokens present
        rows, tinv = torch.unique(tk, return_inverse=True)
        H = torch.zeros(B, rows.shape[0], D, dtype=d.dtype, device=d.device)
        H[ex, tinv] = h
        H = H.reshape(B, -1)
        blk["gram"] = H @ H.T
    return {"weight": _rescale(blk, scale)}


def _norm_blocks(m, data, attrs, means, need, B, scale=1.0):
    kind = "layernorm" if isinstance(m, nn.LayerNorm) else "rmsnorm"
    return {attr: _rescale(_dense_block(_dense(kind, m, data, attr, slice(None)).reshape(B, -1), means[attr], need),
                           scale) for attr in attrs}


# per module kind: (module, merged data, attributes, {attribute: mean gradient}, need, B, scale) -> {attribute:
# statistics} of ``scale`` times the captured terms (scale B: of the per-example gradients; see _rescale)
_BLOCKS = {"linear": _linear_blocks, "conv": _conv_blocks, "embedding": _embedding_blocks,
           "layernorm": _norm_blocks, "rmsnorm": _norm_blocks}


def _cross(u, w):
    """sum over the examples' entries of <G_i, G'_i> ``(B,)``, the inner products of one parameter's
    per-example gradients through two of its uses ``u`` and ``w``, without materialising them (the
    mean loss's terms, as captured); None where no formula is cheaper than materialising.

    Embedding (tokens tok_t, output gradients d_t) with Linear (inputs a_s, output gradients d'_s):
    G_i has row tok_t += d_t, G'_i = sum_s d'_s a_s^T, so <G_i, G'_i> = sum_t d_t . G'_i[tok_t] =
    sum_{t,s} d'_s[tok_t] (a_s . d_t), a ``T x S`` product per example (tied token embedding and
    unembedding: Press and Wolf, 2017, "Using the Output Embedding to Improve Language Models").
    Two Linears: sum_{t,s} (d_t . d'_s)(a_t . a'_s); two Embeddings: sum_{t,s} [tok_t = tok'_s] d_t . d'_s.
    """
    (ku, _, du, au), (kw, _, dw, aw) = u, w
    if au != "weight" or aw != "weight":
        return None
    if ku == "linear" and kw == "embedding":
        u, w, ku, kw, du, dw = w, u, kw, ku, dw, du
    if ku == "embedding" and kw == "linear":
        (tok, d), (a, dl) = du, dw
        at_d = torch.bmm(a, d.transpose(1, 2))  # (B, S, T): a_s . d_t
        picked = torch.gather(dl, 2, tok.unsqueeze(1).expand(-1, dl.shape[1], -1))  # (B, S, T): d'_s[tok_t]
        return (at_d * picked).sum((1, 2))
    if ku == "embedding" and kw == "embedding":
        (tok, d), (tok2, d2) = du, dw
        same = (tok.unsqueeze(2) == tok2.unsqueeze(1)).to(d.dtype)
        return (torch.bmm(d, d2.transpose(1, 2)) * same).sum((1, 2))
    if ku == "linear" and kw == "linear":
        (a, d), (a2, d2) = du, dw
        T, S, n_out, n_in = a.shape[1], a2.shape[1], d.shape[2], a.shape[2]
        if T * S * (n_out + n_in) > n_out * n_in * (T + S):
            return None
        return (torch.bmm(d, d2.transpose(1, 2)) * torch.bmm(a, a2.transpose(1, 2))).sum((1, 2))
    return None


def _shared_norms(uses, mean, need, B, fused=None):
    """A parameter used by several modules (tied weights), squared norms (and dot products with the
    mean) only: |sum_u G_u|^2 = sum_u |G_u|^2 + 2 sum_{u < w} <G_u, G_w>, each use's own statistics
    by its handler and the cross terms by :func:`_cross`, nothing of size ``(B, P)``; None where a
    cross term has no formula (then :func:`_shared_block` materialises).  ``fused``: ``{id(module):
    (B,) squared norms}`` of the uses whose norms the backward pass formed (:class:`_FusedLinear`)."""
    if not need <= {"dots"}:
        return None
    crosses = []
    for j, u in enumerate(uses):
        for w in uses[j + 1:]:
            c = _cross(u, w)
            if c is None:
                return None
            crosses.append(c)
    fused = fused or {}
    own = [{"sq": fused[id(m)]} if id(m) in fused and attr == "weight" and not need
           else _BLOCKS[kind](m, data, [attr], {attr: mean}, need, B)[attr] for kind, m, data, attr in uses]
    blk = {"mean": mean, "sq": _total(b["sq"] for b in own) + 2.0 * _total(crosses)}
    if "dots" in need:
        blk["dots"] = _total(b["dots"] for b in own)
    return blk


def _shared_block(uses, mean, need, B):
    """A parameter used by several modules (tied weights): the per-example gradients summed over its
    uses, materialised for this parameter only, in chunks of examples."""
    P = mean.numel()
    step = max(1, _CHUNK_ELEMENTS // max(P, 1))
    parts = {"sq": [], "dots": [], "gram": []}
    sum_sq = None
    for i in range(0, B, step):
        rows = slice(i, i + step)
        G = _total(_dense(kind, m, data, attr, rows).reshape(-1, P) for kind, m, data, attr in uses)
        GG = G * G
        parts["sq"].append(GG.sum(1))
        if "dots" in need:
            parts["dots"].append(G @ mean)
        if "gram" in need:
            parts["gram"].append(G)
        if "sum_sq" in need:
            sum_sq = GG.sum(0) if sum_sq is None else sum_sq + GG.sum(0)
    blk = {"mean": mean, "sq": torch.cat(parts["sq"])}
    if "dots" in need:
        blk["dots"] = torch.cat(parts["dots"])
    if "sum_sq" in need:
        blk["sum_sq"] = sum_sq
    if "gram" in need:
        G = torch.cat(parts["gram"])
        blk["gram"] = G @ G.T
    return blk


def _rescale(blk, s):
    """The statistics of ``s g_i`` in place of those of g_i (the mean loss's per-example terms, as
    captured, times ``s = B``): squared norms, Gram entries and coordinate sums of squares times s^2,
    dot products with the mean gradient (read from ``.grad``, not rescaled) times s."""
    if s != 1.0:
        for key, power in (("sq", 2), ("dots", 1), ("sum_sq", 2), ("gram", 2)):
            if key in blk:
                blk[key] = blk[key] * s**power
    return blk


_CHECK_RTOL = 1e-3  # relative to the sum of |terms| over examples and positions: far above rounding, far below a missing use


def _adds_up(uses, p, mean, B):
    """Whether a parameter's per-example gradients through its modules add up to B times its mean
    gradient, on one random projection u^T (.) v, up to rounding (relative to the sum of the
    absolute values of the terms, per example and position).  Three scalars, compared later."""
    if uses[0][0] in ("layernorm", "rmsnorm") or uses[0][3] == "bias":  # a vector, whatever its shape
        p = p.reshape(-1)
    u, v = _probe_vectors(p)
    terms = [_terms(kind, m, data, attr, u, v).reshape(-1) for kind, m, data, attr in uses]
    mean = mean.reshape(p.shape[0], -1)
    want = u @ mean @ v if v is not None else u @ mean[:, 0]  # the terms are of the mean loss: they add up to the mean
    return torch.stack([sum(t.sum() for t in terms), want, sum(t.abs().sum() for t in terms)])


def _fusable_call(m: nn.Module, x, out) -> bool:
    """Whether a Linear or Conv2d call on ``x`` may form its weight gradient from the per-example
    ones (:class:`_FusedLinear`, :class:`_FusedConv2d`): a float batch of the weight's dtype, no
    autocast; a Linear on sequences ``(B, T, ..., F)`` with ``(B, O, I)`` not much larger than the
    captured data (T (O + I) >= O I) or small (at most ``_CHUNK_ELEMENTS``): it replaces the batch
    weight gradient's product (as many multiply-adds), so it beats the ``T x T`` Gram route wherever
    it fits; a Conv2d on ``(B, C, H, W)`` with ``(B, O, I = C k_h k_w)`` small and not larger than
    the captured data (T (O + I) >= O I for T output positions; else its input patches cost more
    than the Gram route, ``benchmarks/probe_overhead.py``)."""
    conv = isinstance(m, nn.Conv2d)
    if not (isinstance(x, torch.Tensor) and (x.dim() == 4 if conv else x.dim() >= 3)
            and x.dtype == m.weight.dtype == out.dtype and m.weight.requires_grad and torch.is_grad_enabled()
            and type(out) is torch.Tensor):
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    n_out, n_in = m.weight.shape[0], m.weight[0].numel()
    if conv:
        T = out[0, 0].numel()
        return T * (n_out + n_in) >= n_out * n_in and x.shape[0] * n_out * n_in <= _CHUNK_ELEMENTS
    T = x[0].numel() // x.shape[-1]
    return T * (n_out + n_in) >= n_out * n_in or x.shape[0] * n_out * n_in <= _CHUNK_ELEMENTS


class _FusedLinear(torch.autograd.Function):
    """``out = x W^T + b`` (already computed by the module's own forward call, passed in ``held``)
    whose backward pass forms the per-example weight gradients g_i = sum_t d_it x_it^T ``(B, O, I)``
    once, keeps their squared norms (``fused``; of the mean loss's terms, like the captured
    gradients) and returns their sum as the weight gradient: the batch weight gradient, which the
    plain backward pass forms with as many multiply-adds, costs no second product.  The output
    gradient d is recorded in ``rec[1]``, as the capture's hooks do."""

    @staticmethod
    def forward(ctx, x, weight, bias, held, rec, fused):
        ctx.save_for_backward(x, weight)
        ctx.rec, ctx.fused, ctx.has_bias = rec, fused, bias is not None
        return held.pop()

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        ctx.rec[1] = g.detach()
        B, n_out, n_in = x.shape[0], weight.shape[0], weight.shape[1]
        d, a = g.reshape(B, -1, n_out), x.reshape(B, -1, n_in)
        gi = torch.bmm(d.transpose(1, 2), a)
        ctx.fused.append(_sq_norms(gi.reshape(B, -1)))
        gx = g @ weight if ctx.needs_input_grad[0] else None
        gb = d.sum((0, 1)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gi.sum(0), gb, None, None, None


class _FusedConv2d(torch.autograd.Function):
    """A Conv2d call (groups 1, zero padding; output already computed by the module's own forward
    call, passed in ``held``) whose backward pass forms the per-example weight gradients ``(B, O,
    C k_h k_w)`` once (:func:`_conv_per_example`), keeps their squared norms (``fused``) and returns
    their sum as the weight gradient, as :class:`_FusedLinear` does; the input gradient is the
    convolution's own (``aten.convolution_backward`` without its weight gradient), the bias
    gradient the output gradient summed over examples and positions."""

    @staticmethod
    def forward(ctx, x, weight, bias, held, rec, fused, module):
        ctx.save_for_backward(x, weight)
        ctx.rec, ctx.fused, ctx.has_bias, ctx.module = rec, fused, bias is not None, module
        return held.pop()

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        m = ctx.module
        ctx.rec[1] = g.detach()
        gi = _conv_per_example(m, x, g)
        ctx.fused.append(_sq_norms(gi.reshape(x.shape[0], -1)))
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(g, x, weight, None, m.stride, m.padding, m.dilation, False,
                                                     [0, 0], 1, [True, False, False])[0]
        gb = g.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gi.sum(0).reshape(weight.shape), gb, None, None, None, None


class _Structure:
    """What the fast path derives from a model's structure alone (its modules, their types and
    parameters, which are trainable, which are tied), cached per model and signature
    (:func:`_layout`) so that the every-step probe does not walk the model again at every step.

    Modules and parameters are held by their positions in the walk of
    :func:`deepmodels._checks._model_walk`, not by reference: a cached structure keeps no part of
    the model alive, and a later walk with the same signature binds it to that walk's objects.

    Attributes:
        signature: the walk's signature this structure was derived from.
        modules: ``{name: (position, kind)}`` of the modules the fast path covers (see :func:`_kind`)
            that have trainable parameters.
        params: ``{name: position}`` of the trainable parameters, in ``named_parameters`` order.
        uses: ``{parameter name: [(module name, attribute), ...]}`` of the covered parameters.
        uncovered: ``{parameter name: reason}`` of those outside the covered modules.
        linears: the names of the covered Linear and Conv2d modules.
        verified: whether the fast path's sums were checked against ``.grad`` on this structure
            (``verify="once"`` of :func:`_measure_params`).
    """

    def __init__(self, model: nn.Module, signature, modules, params):
        at_module = {id(m): i for i, m in enumerate(modules)}
        at_param = {}
        for i, p in enumerate(params):
            at_param.setdefault(id(p), i)
        self.signature, self.modules, owners, outside = signature, {}, {}, {}
        for n, m in model.named_modules():
            own = [(attr, p) for attr, p in m._parameters.items() if p is not None and p.requires_grad]
            if not own:
                continue
            kind = _kind(m)
            if kind is not None:
                self.modules[n] = (at_module[id(m)], kind)
            for attr, p in own:
                if kind is None:
                    outside.setdefault(id(p), _why_not(n, m))
                else:
                    owners.setdefault(id(p), []).append((n, attr))
        self.uses, self.uncovered, self.params = {}, {}, {}
        for k, p in model.named_parameters():
            if not p.requires_grad:
                continue
            self.params[k] = at_param[id(p)]
            if id(p) in outside:
                self.uncovered[k] = f"a parameter of {outside[id(p)]}, which the fast path does not cover"
            else:
                self.uses[k] = owners[id(p)]
        self.linears = frozenset(n for n, (_, kind) in self.modules.items() if kind in ("linear", "conv"))
        self.verified = False


class _Layout:
    """A model's :class:`_Structure` bound to the modules and parameters of one walk."""

    __slots__ = ("signature", "structure", "modules", "params")

    def __init__(self, structure, modules, params):
        self.signature, self.structure, self.modules, self.params = structure.signature, structure, modules, params

    def trainable(self) -> dict:
        """``{name: parameter}`` of the trainable parameters, in ``named_parameters`` order."""
        return {k: self.params[i] for k, i in self.structure.params.items()}


_STRUCTURES = weakref.WeakKeyDictionary()  # model -> its _Structure (the last one seen)


def _layout(model: nn.Module) -> _Layout:
    """The model's :class:`_Structure`, derived again only when its signature changed (a module or a
    parameter replaced, added or removed, one frozen or unfrozen, a dtype or device change: see
    :func:`deepmodels._checks._model_walk`), bound to the model's current modules and parameters.
    One walk of the model's modules per call; no hook or reference is left on or to the model."""
    signature, modules, params = _model_walk(model)
    try:
        st = _STRUCTURES.get(model)
    except TypeError:  # a module that cannot be weakly referenced or hashed: derived at every call
        st = None
    if st is None or st.signature != signature:
        st = _Structure(model, signature, modules, params)
        try:
            _STRUCTURES[model] = st
        except TypeError:
            pass
    return _Layout(st, modules, params)


class LayerCapture:
    """Context manager that records, during one forward and backward pass, the input and the output
    gradient of every module the fast path covers (``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``,
    ``nn.LayerNorm``, ``nn.RMSNorm`` with trainable parameters), so that per-example gradient
    summaries come out of the training step's own backward pass (:meth:`summaries`).

    The loss must be a mean over the B examples (both forms of :func:`capture_backward` are: the
    batch form is averaged), so that each parameter's ``.grad`` is the mean gradient.

    Args:
        model: the network.
        partial: False: raise :class:`FastPathUnsupported` (a ValueError) on entry if a trainable
            parameter is outside the covered modules (a bare ``nn.Parameter``, an unknown module,
            a Conv2d with groups > 1 or string padding, a sparse embedding), and in
            :meth:`summaries` if a covered parameter turns out unusable in the captured pass.
            True: measure what is covered and list the rest in :attr:`uncovered` (name -> reason).

    A parameter whose module's calls do not account for its whole gradient (used outside the
    module's forward call, e.g. ``x @ layer.weight.T``; a module run on ``(B*T, F)`` inputs) is found
    by checking that its per-example gradients add up to B times its ``.grad`` (on a random
    projection for matrices), and moves to :attr:`uncovered`.
    """

    @validate(model=Module(), partial=Boolean())
    def __init__(self, model: nn.Module, *, partial: bool = False):
        self._bind(model, _layout(model), partial)

    @classmethod
    def _of(cls, model: nn.Module, layout: _Layout, partial: bool = False) -> LayerCapture:
        """A capture of ``model`` from its :func:`_layout` (no checks: for callers that made them)."""
        cap = cls.__new__(cls)
        cap._bind(model, layout, partial)
        return cap

    def _bind(self, model, layout, partial):
        st = layout.structure
        self.model, self.partial, self.structure = model, partial, st
        self.modules = {n: (layout.modules[i], kind) for n, (i, kind) in st.modules.items()}
        self._params = {k: layout.params[i] for k, i in st.params.items()}
        self.uses, self.uncovered = st.uses, dict(st.uncovered)
        if self.uncovered and not partial:
            raise FastPathUnsupported(
                "the hook fast path covers nn.Linear, nn.Conv2d (groups=1), nn.Embedding, nn.LayerNorm and nn.RMSNorm "
                f"parameters; not covered: {list(self.uncovered)} ({'; '.join(self.uncovered.values())}). Use "
                "method='auto' (torch.func for these parameters only) or method='func'.")
        self.linears = {n: self.modules[n][0] for n in st.linears}
        self.calls, self._handles = {}, []
        # Linears on sequences and Conv2d: with squared norms alone asked for, those come from the backward pass
        self._fusable = st.linears
        self._fuse, self.fused = False, {}

    def __enter__(self):
        self.calls, self.fused = {}, {}
        for name, (m, _) in self.modules.items():

            def capture(mod, inp, out, name=name):
                # the module input now, the gradient at its output when the backward pass reaches it
                rec = [inp[0].detach() if inp and isinstance(inp[0], torch.Tensor) else None, None]
                self.calls.setdefault(name, []).append(rec)
                if isinstance(out, torch.Tensor) and out.requires_grad:
                    if self._fuse and name in self._fusable and _fusable_call(mod, inp[0], out):
                        fused = self.fused.setdefault(name, [])
                        if isinstance(mod, nn.Conv2d):
                            return _FusedConv2d.apply(inp[0], mod.weight, mod.bias, [out.detach()], rec, fused, mod)
                        return _FusedLinear.apply(inp[0], mod.weight, mod.bias, [out.detach()], rec, fused)
                    out.register_hook(lambda g, rec=rec: rec.__setitem__(1, g.detach()))

            self._handles.append(m.register_forward_hook(capture))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    @property
    def acts(self) -> dict:
        """``{layer: [input, output gradient]}`` of the Linear and Conv2d layers (one call each)."""
        out = {}
        for n, calls in self.calls.items():
            if n in self.linears:
                if len(calls) > 1:
                    raise FastPathUnsupported(f"layer `{n or 'model'}` ran twice in one forward pass: read `calls`.")
                out[n] = calls[0]
        return out

    def _check_captured(self, batch_size):
        inputs = [c[0] for calls in self.calls.values() for c in calls if c[0] is not None and c[0].dim()]
        first = next((a for a in inputs if a.shape[0] == batch_size), inputs[0] if inputs else None)
        if first is None:
            if not self.uses:  # nothing to capture: every parameter is outside the fast path
                return
            raise ValueError("nothing was captured: run the forward and backward pass inside "
                             "`with LayerCapture(model):` first.")
        if not any(c[1] is not None for calls in self.calls.values() for c in calls):
            raise FastPathUnsupported("no gradient reached the captured layers: call backward() inside the capture.")
        if batch_size != first.shape[0]:
            raise ValueError(f"`batch_size` must be the batch size of the captured pass ({first.shape[0]}); got {batch_size}.")

    def _prepare(self, B):
        """Per covered parameter its uses ``(kind, module, merged data, attr)``, or why it is not usable."""
        params = self._params
        merged, bad = {}, {}
        for n, (m, kind) in self.modules.items():
            try:
                merged[n] = _merge(kind, m, self.calls.get(n, []), B)
            except _Unsuitable as err:
                bad[n] = str(err)
        ready, unusable, modules = {}, {}, self.modules
        for k, uses in self.uses.items():
            why = next((bad[n] for n, _ in uses if n in bad), None) if bad else None
            if why is None:
                got = [(modules[n][1], modules[n][0], merged[n], attr) for n, attr in uses if merged[n] is not None]
                if not got and params[k].grad is not None:
                    why = "no gradient came through its module's output (is it used outside its module's forward call?)"
            if why is not None:
                unusable[k] = why
            else:
                ready[k] = got
        return params, ready, unusable

    def _param_blocks(self, B, need=frozenset(), verify=True):
        """``({parameter: statistics}, {parameter: why not measured})`` of the captured pass."""
        self._check_captured(B)
        params, ready, unusable = self._prepare(B)
        blocks, by_module, checks = {}, {}, {}
        fused = {id(self.modules[n][0]): sq[0] for n, sq in self.fused.items()
                 if len(sq) == 1 and len(self.calls.get(n, ())) == 1} if not need else {}
        for k, uses in ready.items():
            p = params[k]
            g = p.grad
            if g is not None:
                mean = (g.detach() if g.requires_grad else g).reshape(-1)
            elif uses:  # gradients cleared since the pass: the mean of the per-example gradients
                mean = _total(_dense(kind, m, data, attr, slice(None)).reshape(B, -1).sum(0)
                              for kind, m, data, attr in uses)
            else:
                mean = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            if not uses:  # no gradient reached it: every per-example gradient is zero
                z = torch.zeros(B, dtype=mean.dtype, device=mean.device)
                blocks[k] = _dense_block(torch.zeros(B, mean.numel(), dtype=mean.dtype, device=mean.device), mean,
                                         need) | {"sq": z}
            else:
                if verify and g is not None:
                    checks[k] = _adds_up(uses, p, mean, B)
                if len(uses) == 1:
                    kind, m, data, attr = uses[0]
                    by_module.setdefault(id(m), (kind, m, data, {}))[3][attr] = (k, mean)
                else:
                    fast = _shared_norms(uses, mean, need, B, fused)
                    blocks[k] = _rescale(fast if fast is not None else _shared_block(uses, mean, need, B), float(B))
        for kind, m, data, attrs in by_module.values():
            if id(m) in fused and "weight" in attrs:  # squared norms formed in the backward pass (_FusedLinear)
                k, mean = attrs.pop("weight")
                blocks[k] = _rescale({"mean": mean, "sq": fused[id(m)]}, float(B))
                if not attrs:
                    continue
            # the captured output gradients are those of the mean loss: B g_i is per example
            got = _BLOCKS[kind](m, data, list(attrs), {a: mean for a, (_, mean) in attrs.items()}, need, B, float(B))
            for attr, blk in got.items():
                blocks[attrs[attr][0]] = blk
        if checks:  # one transfer for all parameters; bfloat16 gradients (autocast) round more
            eps = max((torch.finfo(c[1].dtype).eps for calls in self.calls.values() for c in calls if c[1] is not None),
                      default=0.0)
            sums = V.to_float64(torch.stack(list(checks.values())))
            group = _ddp_group(self.model)
            if group is not None:
                # DDP averaged .grad over the W processes: the sums of every process's terms (of its
                # mean loss) add up to W times the projection of .grad, which each process adds once
                import torch.distributed as dist

                dist.all_reduce(sums, group=group)
            got, want, scale = sums.T
            bad = ((got - want).abs() > max(_CHECK_RTOL, 8.0 * eps) * scale + 1e-300).tolist()
            for k, b in zip(checks, bad):
                if b:
                    unusable[k] = ("its per-example gradients from its modules do not add up to its gradient (is it "
                                   "used outside its modules' forward calls, or on inputs whose first dimension "
                                   "is not the batch?)")
                    del blocks[k]
        order = [k for k in params if k in blocks]
        return {k: blocks[k] for k in order}, {k: unusable[k] for k in params if k in unusable}

    @validate(batch_size=Integer(1, V.MAX_WIDTH))
    def per_example_grads(self, batch_size: int) -> dict:
        """``{parameter name: (B, *shape)}`` per-example gradients of the covered parameters (of a
        mean loss, like :meth:`summaries`), materialised one parameter at a time and summed over the
        uses of shared ones; with ``partial=True`` the parameters in :attr:`uncovered` are left out."""
        self._check_captured(batch_size)
        params, ready, unusable = self._prepare(batch_size)
        self._unusable(unusable)
        out = {}
        for k, uses in ready.items():
            p = params[k]
            if not uses:
                out[k] = torch.zeros(batch_size, *p.shape, dtype=p.dtype, device=p.device)
                continue
            out[k] = _total(_dense(kind, m, data, attr, slice(None)).reshape(batch_size, *p.shape)
                            for kind, m, data, attr in uses) * batch_size
        return out

    def _unusable(self, unusable):
        if unusable and not self.partial:
            raise FastPathUnsupported(f"the hook fast path cannot measure {list(unusable)}: "
                                      + "; ".join(f"`{k}`: {why}" for k, why in unusable.items()))
        self.uncovered.update(unusable)

    @validate(batch_size=Integer(1, V.MAX_WIDTH), coordinate_sums=Boolean(), dots=Boolean(), sums=Boolean(),
              gram=Boolean())
    def summaries(self, batch_size: int, *, coordinate_sums: bool = True, dots: bool = True, sums: bool = True,
                  gram: bool = False) -> dict:
        """Per layer (module with covered parameters): ``{"n_params", "mean_norm_sq", "sq_norms"[,
        "dots", "sum", "sum_sq", "gram"]}`` (see :func:`hook_summaries`).

        The mean gradient is read from the parameters' ``.grad`` (the backward pass already formed
        it).  A Linear layer on ``(B, F)`` inputs adds elementwise work only, plus one matmul for the
        dot products g_i . g_bar (``dots``) and one for the coordinate sums of squares
        (``coordinate_sums``); layers with several positions (sequences, convolutions) form their
        per-example weight gradients one layer at a time, except when only squared norms are asked
        for and the layer has few positions T: then |g_i|^2 = sum_{t,t'} (d_t . d_t') (a_t . a_t')
        from two T x T Gram matrices per example.  ``gram``: also the ``(B, B)`` Gram matrix
        g_i . g_j of the layer's per-example gradients.
        """
        need = {s for s, on in (("dots", dots), ("sum_sq", coordinate_sums), ("gram", gram)) if on}
        blocks, unusable = self._param_blocks(batch_size, frozenset(need))
        self._unusable(unusable)
        return layer_summaries(blocks, batch_size, sums=sums)


def layer_of(param_name: str) -> str:
    """The layer (module) name of a parameter name: ``"blocks.0.ln.weight"`` -> ``"blocks.0.ln"``;
    ``"model"`` for the root module's own parameters."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else "model"


def layer_summaries(blocks: dict, B: int, *, sums: bool = True) -> dict:
    """Per-parameter statistics (``{"mean", "sq"[, "dots", "sum_sq", "gram", "dev"]}``) added up per
    layer into ``{"n_params", "mean_norm_sq", "sq_norms"[, "dots", "sum", "sum_sq", "gram", "dev"]}``,
    parameters flattened in the model's order (``[weight.ravel(), bias]``)."""
    out = {}
    for k, blk in blocks.items():
        layer = out.setdefault(layer_of(k), {"n_params": 0, "parts": []})
        layer["n_params"] += blk["mean"].numel()
        layer["parts"].append(blk)
    for name, layer in out.items():
        parts = layer.pop("parts")
        layer["mean_norm_sq"] = _total(torch.dot(b["mean"], b["mean"]) for b in parts)
        layer["sq_norms"] = _total(b["sq"] for b in parts)
        for key in ("dots", "gram"):
            if all(key in b for b in parts):
                layer[key] = _total(b[key] for b in parts)
        if all("dev" in b or "dots" in b for b in parts):
            layer["dev"] = _total(b["dev"] if "dev" in b else b["sq"] - 2.0 * b["dots"] + b["mean"] @ b["mean"]
                                  for b in parts)
        if sums:
            layer["sum"] = torch.cat([b["mean"] * B for b in parts])
        if all("sum_sq" in b for b in parts):
            layer["sum_sq"] = torch.cat([b["sum_sq"] for b in parts])
    return out


# --------------------------------------------------------------------------------------------------
# one backward pass with the capture; the measurement of every parameter by its path
# --------------------------------------------------------------------------------------------------
@validate(model=Module(finite=True), loss_fn=LossFn(), x=Maybe(X), y=Maybe(Y), batch=Maybe(BATCH),
          zero_grad=Maybe(Function("a callable zero_grad(set_to_none=True), e.g. optimizer.zero_grad")),
          partial=Boolean())
def capture_backward(model: nn.Module, loss_fn, x=None, y=None, *, batch=None, zero_grad=None, partial: bool = False):
    """One forward and backward pass of the mean loss on ``(x, y)`` (or of the mean of the batch
    form's per-example losses on ``batch``) inside a :class:`LayerCapture` (``partial`` as there).

    ``zero_grad`` clears the gradients first (default ``model.zero_grad``; pass an optimizer's to
    train on the same pass).  Returns ``(capture, loss)``; raises
    :class:`deepmodels._validate.Diverged` (a ValueError) for non-finite parameters or a non-finite loss.
    """
    cap, loss = _capture(_problem(model, loss_fn, x, y, batch), zero_grad, partial=partial)
    if not torch.isfinite(loss):  # a DDP wrapper's backward pass ran (a collective) before this
        raise V.Diverged("the loss is not finite (NaN or inf).")
    return cap, loss


def _ddp_group(model: nn.Module):
    """The process group over which ``model``'s gradients are all-reduced: a
    ``DistributedDataParallel`` wrapper's group, None for any other module (this process alone).
    (Its class hierarchy is read, not ``isinstance``: DDP is an ABC, whose instance check costs more
    than the rest of this function, which every probed step calls several times.)"""
    return model.process_group if nn.parallel.DistributedDataParallel in type(model).__mro__ else None


def _check_syncs(model):
    """Refuse a DDP wrapper inside ``no_sync()``: its backward pass would leave each process's own
    (accumulated) gradient in ``.grad``, not the mean over the processes the statistics need."""
    if _ddp_group(model) is not None and not model.require_backward_grad_sync:
        raise ValueError("`model` is a DistributedDataParallel wrapper inside `no_sync()`: its gradients would not be "
                         "all-reduced. Measure outside `no_sync()` (on the synchronizing backward pass), pass "
                         "`model.module` to measure this process's examples alone, or use "
                         "deepmodels.gns.GradientNoiseScale for gradient accumulation.")


def _capture(prob: _Problem, zero_grad=None, *, partial: bool = False, fuse: bool = False):
    """:func:`capture_backward` without the checks (for callers that made them); ``fuse``: Linear
    layers on sequences form their per-example squared norms in the backward pass and their weight
    gradient from them (:class:`_FusedLinear`; for squared norms only).

    A DDP wrapper's backward pass is a collective: on a non-finite loss it still runs (so that the
    other processes' all-reduce completes, and every process gets non-finite gradients), and the
    caller sees the loss (:func:`_measure_params` reports the divergence after its own collectives)."""
    _check_syncs(prob.model)
    cap = LayerCapture._of(prob.model, prob.layout or _layout(prob.model), partial)
    cap._fuse = fuse
    with cap:
        (zero_grad or prob.model.zero_grad)(set_to_none=True)
        loss = prob.mean_loss()
        if _ddp_group(prob.model) is None and not math.isfinite(float(loss.detach())):  # on the host: no kernels
            raise V.Diverged("the loss is not finite (NaN or inf).")
        loss.backward()
    return cap, loss


def _capture_backward(model, loss_fn, x, y, zero_grad=None):
    """:func:`capture_backward` of ``(x, y)`` without the checks (for callers that made them)."""
    return _capture(_Problem(model, loss_fn, x, y, None), zero_grad)


@validate(model=Module(finite=True), loss_fn=LossFn(), x=Maybe(X), y=Maybe(Y), batch=Maybe(BATCH), gram=Boolean())
def hook_summaries(model: nn.Module, loss_fn, x=None, y=None, *, batch=None, gram: bool = False) -> dict:
    """Per-layer summaries of the per-example gradients from one backward pass with hooks
    (every trainable parameter must be covered; see :class:`LayerCapture`).

    Args:
        loss_fn, x, y, batch: the loss in one of its two forms (:func:`per_example_grads`).
        gram: also the ``(B, B)`` Gram matrices.

    Returns:
        ``{layer name: {"n_params", "mean_norm_sq", "sum": (P_l,), "sq_norms": (B,), "dots": (B,),
        "sum_sq": (P_l,)[, "gram": (B, B)]}}``: the layer's parameter count, |g_bar|^2, the sum of
        the per-example gradients, their squared norms, their dot products with the mean gradient
        and the per-coordinate sums of squares, parameters flattened as ``[weight.ravel(), bias]``.

    Raises:
        FastPathUnsupported: a trainable parameter outside the fast path.
        deepmodels._validate.Diverged: non-finite parameters, loss or per-example gradients.
    """
    prob = _problem(model, loss_fn, x, y, batch)
    cap, _ = _capture(prob)
    out = cap.summaries(prob.B, gram=gram)
    model.zero_grad(set_to_none=True)
    for name, f in out.items():
        out[name].pop("dev", None)
        if not (bool(torch.isfinite(f["sq_norms"]).all()) and bool(torch.isfinite(f["mean_norm_sq"]))):
            raise V.Diverged(f"non-finite per-example gradient in layer `{name}` (NaN or inf loss?).")
    return out


def _measure_params(prob: _Problem, method: str, need=frozenset(), *, chunk_size: int = 256, zero_grad=None,
                   verify: bool | str = True, double_func: bool = True):
    """Every trainable parameter's per-example statistics by its path.

    ``method``: ``"func"``: torch.func for all; ``"hooks"``: the fast path for all (else
    :class:`FastPathUnsupported`); ``"auto"``: the fast path where covered, torch.func for the other
    parameters only (``vmap(grad)`` with respect to that subset), and where that fails too, the
    parameters are skipped with a warning.  ``verify``: check the fast path's sums against ``.grad``
    (``"once"``: on the first call per model structure, :class:`_Structure`).  One backward pass of
    the mean loss runs (its ``.grad`` is left in place for an optimizer step), except for ``"func"``.

    Given a ``DistributedDataParallel`` wrapper (:func:`_ddp_group`), the blocks are this process's
    examples' against the mean gradient over every process's examples (DDP's all-reduced ``.grad``,
    for the torch.func parameters too), and the fast path's check adds up the sums of all processes
    (one all-reduce of three numbers per parameter, when it runs); :mod:`deepmodels.probes` combines
    the blocks' sums over the processes.

    Returns:
        ``(blocks, paths, loss)``: ``{parameter: {"mean", "sq"[, "dots", "sum_sq", "gram",
        "dev"]}}`` in the model's order (see :func:`layer_summaries`), ``{"hooks": [...], "func":
        [...], "skipped": {name: reason}}``, and the batch's mean loss (None for ``"func"``).
    """
    paths = {"hooks": [], "func": [], "skipped": {}}
    blocks, loss = {}, None
    if method == "func":
        names = todo = [k for k, p in prob.model.named_parameters() if p.requires_grad]
    else:
        cap, loss = _capture(prob, zero_grad, partial=method == "auto", fuse=not need)
        names = list(cap._params)
        once = verify == "once"
        do_verify = bool(verify) and not (once and cap.structure.verified)
        blocks, unusable = cap._param_blocks(prob.B, frozenset(need), verify=do_verify)
        if once and not unusable:
            cap.structure.verified = True
        if _ddp_group(prob.model) is not None and not math.isfinite(float(loss.detach())):  # a DDP wrapper's (_capture): reported after the collectives above
            raise V.Diverged("the loss is not finite (NaN or inf).")
        if method == "hooks":
            cap._unusable(unusable)
        paths["hooks"] = list(blocks)
        todo = [k for k in names if k not in blocks]
        reasons = {**cap.uncovered, **unusable}
    if todo:
        _check_no_batchnorm(prob.model)
        _check_memory(prob, sum(prob.model.get_parameter(k).numel() for k in todo),
                      copies=2.0 + 8.0 / torch.empty((), dtype=prob.dtype).element_size())
        try:
            G = _func_grads(prob, todo, chunk_size)
        except V.Diverged:
            raise
        except Exception as err:  # noqa: BLE001  (vmap cannot run this model: report, never silently)
            if method == "func":
                raise
            why = f"torch.func could not measure them either ({type(err).__name__}: {err})"
            skipped = {k: f"{reasons.get(k, 'not covered')}; {why}" for k in todo}
            warnings.warn(f"gradient statistics skip the parameters {todo}: " + "; ".join(
                f"`{k}`: {r}" for k, r in skipped.items()), RuntimeWarning, stacklevel=3)
            paths["skipped"] = skipped
        else:
            paths["func"] = todo
            for k in todo:
                g = G[k].reshape(prob.B, -1)
                g = g.double() if double_func and g.device.type != "mps" else g  # (MPS has no float64)
                mean = g.mean(0)
                grad_k = prob.model.get_parameter(k).grad
                if _ddp_group(prob.model) is not None and grad_k is not None:
                    mean = grad_k.detach().reshape(-1).to(g.dtype)  # DDP's all-reduced mean over every process's examples
                blk = _dense_block(g, mean, need)
                blk["dev"] = ((g - mean) ** 2).sum(1)
                blocks[k] = blk
    order = [k for k in names if k in blocks]
    return {k: blocks[k] for k in order}, paths, loss


def coverage_attrs(paths: dict) -> dict:
    """netCDF-ready attributes of a measurement's coverage: ``path_hooks``, ``path_func`` and
    ``skipped`` (comma-separated parameter names, "" for none) and ``skipped_reasons``."""
    return {"path_hooks": ", ".join(paths["hooks"]), "path_func": ", ".join(paths["func"]),
            "skipped": ", ".join(paths["skipped"]),
            "skipped_reasons": "; ".join(f"{k}: {why}" for k, why in paths["skipped"].items())}


# --------------------------------------------------------------------------------------------------
# users check the fast path on their own model
# --------------------------------------------------------------------------------------------------
def _loop_grads(prob: _Problem, names) -> dict:
    """``{name: (B, *shape)}`` one example at a time, plain autograd (the reference of :func:`check`)."""
    model = prob.model
    params = dict(model.named_parameters())
    out = {k: [] for k in names}
    for i in range(prob.B):
        model.zero_grad(set_to_none=True)
        prob.example_loss(i).backward()
        for k in names:
            g = params[k].grad
            out[k].append(torch.zeros_like(params[k]) if g is None else g.detach().clone())
    model.zero_grad(set_to_none=True)
    return {k: torch.stack(v) for k, v in out.items()}


@validate(model=Module(finite=True), loss_fn=LossFn(), x=Maybe(X), y=Maybe(Y), batch=Maybe(BATCH),
          method=Options(*METHODS), chunk_size=Integer(1, V.MAX_WIDTH))
def check(model: nn.Module, loss_fn, x=None, y=None, *, batch=None, method: str = "auto", chunk_size: int = 256):
    """Verify the per-example gradient statistics on your own model against a per-example loop.

    The probe's statistics of every trainable parameter (squared norms |g_i|^2, dot products with the
    mean gradient g_i . g_bar, coordinate sums of squares sum_i g_i^2, the Gram matrix g_i . g_j and
    the mean g_bar), measured by ``method`` as :func:`deepmodels.probes.gradient_stats` would, are
    compared with those of gradients formed one example at a time by plain autograd (B backward
    passes; for a few examples).  An error far above the rounding of the model's dtype (about 1e-6
    relative in float32) means the fast path does not suit the model; please report it.

    Args:
        loss_fn, x, y, batch: the loss in one of its two forms (:func:`per_example_grads`).
        method: ``"auto"``, ``"hooks"`` or ``"func"`` (:func:`_measure_params`).

    Returns:
        Dataset over ``parameter``: ``layer`` (its layer name), ``path`` ("hooks", "func" or
        "skipped"), ``max_abs_error`` (largest absolute difference over the statistics and
        entries), ``max_rel_error`` (per statistic, the largest absolute difference over the largest
        absolute reference value, then the largest over the statistics; NaN where skipped),
        ``n_params``; attrs ``max_rel_error`` (over all parameters) and the coverage
        (:func:`coverage_attrs`).
    """
    import xarray as xr

    prob = _problem(model, loss_fn, x, y, batch)
    need = frozenset({"dots", "sum_sq", "gram"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # skipped parameters are reported in the result
        blocks, paths, _ = _measure_params(prob, method, need, chunk_size=chunk_size, double_func=False)
    model.zero_grad(set_to_none=True)
    names = list(_trainable(model))
    ref = _loop_grads(prob, names)
    abs_err, rel_err, path = [], [], []
    for k in names:
        if k not in blocks:
            abs_err.append(np.nan)
            rel_err.append(np.nan)
            path.append("skipped")
            continue
        G = V.to_float64(ref[k].reshape(prob.B, -1))
        mean = G.mean(0)
        want = {"mean": mean, "sq": (G * G).sum(1), "dots": G @ mean, "sum_sq": (G * G).sum(0), "gram": G @ G.T}
        a, r = 0.0, 0.0
        for s, w in want.items():
            diff = float((V.to_float64(blocks[k][s]) - w).abs().max())
            a, r = max(a, diff), max(r, diff / max(float(w.abs().max()), 1e-300))
        abs_err.append(a)
        rel_err.append(r)
        path.append("hooks" if k in paths["hooks"] else "func")
    ds = xr.Dataset({"max_abs_error": ("parameter", np.array(abs_err)), "max_rel_error": ("parameter", np.array(rel_err)),
                     "path": ("parameter", np.array(path)),
                     "layer": ("parameter", np.array([layer_of(k) for k in names])),
                     "n_params": ("parameter", np.array([float(dict(model.named_parameters())[k].numel()) for k in names]))},
                    coords={"parameter": names})
    ds.attrs.update(coverage_attrs(paths), model=type(model).__name__.lower(), n_examples=prob.B,
                    max_rel_error=float(np.nanmax(rel_err)) if not np.all(np.isnan(rel_err)) else float("nan"))
    return ds
