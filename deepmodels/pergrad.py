"""Per-example gradients: for any model by ``torch.func`` (chunked), and a hook fast path for
Linear and Conv2d layers that gives per-example squared norms, dot products with the mean gradient
and coordinate sums of squares without materialising the model's ``(B, P)`` array.  The
per-example weight gradient of a Linear layer is d_i a_i^T (a the layer input, d the gradient of the
summed loss at its output), so |g_i|^2 = |d_i|^2 |a_i|^2; a Conv2d layer's per-example weight
gradients come from one grouped convolution (the batch as B groups of channels), formed one layer
at a time (``(B, C_out, C_in k^2)``, small for convolutions).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.grad import conv2d_weight
from torch.func import functional_call, grad, vmap

from . import _validate as V
from ._validate import Boolean, Function, Integer, LossFn, Maybe, Module, Tensor, validate

__all__ = ["per_example_grads", "flatten", "hook_summaries", "capture_backward", "LayerCapture", "FastPathUnsupported",
           "check_batch", "Diverged"]

Diverged = V.Diverged  # raised for non-finite parameters, loss or per-example gradients (a ValueError)


X = Tensor("float", min_ndim=1, nonempty=True)  # a batch of inputs (B, ...)
Y = Tensor("label", min_ndim=1)  # int64 class labels (B, ...) or float targets


@validate(x=X, y=Y)
def check_batch(x, y):
    """Raise TypeError / ValueError unless ``x`` is a finite float batch ``(B, ...)`` and ``y`` holds
    B labels or targets on the same device."""
    V.check_batch(x, y)


def check_inputs(model, loss_fn, x, y, *, min_batch: int = 1):
    """The cross-argument checks of every probe (see :func:`deepmodels._validate.check_model_input`)."""
    return V.check_model_input(model, x, y, loss_fn, min_batch=min_batch)


def check_grad_memory(model, x, copies: float = 1.0, itemsize: int | None = None):
    """Refuse a ``(B, P)`` per-example gradient array that cannot fit in memory, naming ``x``."""
    B, P = x.shape[0], V.n_trainable(model)
    size = itemsize or x.element_size()
    V.check_bytes("x", copies * B * P * size, f"the per-example gradients of {B} examples x {P} parameters",
                  device=x.device, remedy="Measure on fewer examples.")


def _trainable(model):
    return {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}


@validate(model=Module(finite=True), loss_fn=LossFn(), x=X, y=Y, chunk_size=Integer(1, V.MAX_WIDTH))
def per_example_grads(model: nn.Module, loss_fn, x, y, *, chunk_size: int = 256) -> dict:
    """``{parameter name: (B, *shape)}`` gradients of ``loss_fn(model(x_i), y_i)`` per example.

    Args:
        model: any module without batch-coupled layers in training mode (BatchNorm in train mode mixes
            examples, so per-example gradients are undefined; use ``model.eval()``).
        loss_fn: ``loss_fn(output, target)`` for a batch, reducing by the mean (per example it
            sees a batch of one).
        x, y: a batch: ``x`` of the model's dtype and device, ``y`` int64 labels or float targets.
        chunk_size: examples per vectorised call (bounds memory).

    Raises:
        TypeError, ValueError: bad input (see :mod:`deepmodels._validate`), or a ``(B, P)`` result
            that would not fit in memory.
        deepmodels._validate.Diverged: non-finite parameters, or a non-finite per-example gradient.
    """
    check_inputs(model, loss_fn, x, y)
    check_grad_memory(model, x, copies=2.0)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()):
        raise ValueError("`model` has BatchNorm in training mode: per-example gradients are undefined; call model.eval().")
    params = _trainable(model)
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))
    parts = [g(params, x[i:i + chunk_size], y[i:i + chunk_size]) for i in range(0, x.shape[0], chunk_size)]
    out = {k: torch.cat([p[k] for p in parts]) for k in params}
    for k, v in out.items():
        if not torch.all(torch.isfinite(v)):
            raise V.Diverged(f"non-finite per-example gradient in `{k}` (NaN or inf loss?).")
    return out


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


_SMALL_WORK = 1024  # up to this many input channels x output positions, patches + batched matmul beat a grouped convolution


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


class LayerCapture:
    """Context manager that records, during one forward and backward pass of a mean-reduced loss,
    each trainable ``nn.Linear`` / ``nn.Conv2d`` layer's input and output gradient, so that
    per-example gradient summaries come out of the training step's own backward pass
    (:meth:`summaries`).

    Raises :class:`FastPathUnsupported` (a ValueError) on entry if the model has trainable
    parameters outside such layers, or a Conv2d the fast path does not cover (groups > 1, non-zero
    padding modes, string padding).
    """

    @validate(model=Module())
    def __init__(self, model: nn.Module):
        self.model = model
        self.linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        covered = {f"{n}.{p}" if n else p for n, m in self.linears.items() for p, v in m.named_parameters(recurse=False)
                   if v.requires_grad}
        other = [k for k, v in model.named_parameters() if v.requires_grad and k not in covered]
        if other:
            raise FastPathUnsupported(f"the hook fast path handles nn.Linear and nn.Conv2d parameters only; also trainable: {other}.")
        for n, m in self.linears.items():
            if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
                raise FastPathUnsupported(f"the hook fast path needs Conv2d with groups=1, zero padding given as numbers; `{n}` is not.")
        self.acts, self._handles = {}, []

    def __enter__(self):
        self.acts = {}
        for name, m in self.linears.items():
            if not any(p.requires_grad for p in m.parameters(recurse=False)):
                continue

            def capture(mod, inp, out, name=name):
                # the layer input now, the gradient at its output when the backward pass reaches it
                if name in self.acts:
                    raise FastPathUnsupported(f"layer `{name or 'model'}` ran twice in one forward pass (shared "
                                              "weights): its per-example gradient sums over the calls; use torch.func.")
                self.acts[name] = [inp[0].detach(), None]
                out.register_hook(lambda g, name=name: self.acts[name].__setitem__(1, g.detach()))

            self._handles.append(m.register_forward_hook(capture))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def _check_captured(self, batch_size):
        if not self.acts:
            raise ValueError("nothing was captured: run the forward and backward pass inside "
                             "`with LayerCapture(model):` first.")
        captured = next(iter(self.acts.values()))[0].shape[0]
        if batch_size != captured:
            raise ValueError(f"`batch_size` must be the batch size of the captured pass ({captured}); got {batch_size}.")

    @validate(batch_size=Integer(1, V.MAX_WIDTH))
    def per_example_grads(self, batch_size: int) -> dict:
        """``{parameter name: (B, *shape)}`` per-example gradients of the captured layers (of a
        mean-reduced loss, like :meth:`summaries`), materialised one layer at a time: Linear
        ``d_i a_i^T`` and ``d_i``, Conv2d by :func:`_conv_per_example`."""
        self._check_captured(batch_size)
        B, out = batch_size, {}
        for key, (a, d) in self.acts.items():
            if d is None:
                raise FastPathUnsupported(f"no gradient reached layer `{key or 'model'}`: call backward() inside the capture.")
            m, prefix = self.linears[key], f"{key}." if key else ""
            d = d * B
            if isinstance(m, nn.Conv2d):
                w, b = _conv_per_example(m, a, d), d.reshape(B, d.shape[1], -1).sum(2)
            else:
                a, d = a.reshape(B, -1, a.shape[-1]), d.reshape(B, -1, d.shape[-1])
                w, b = torch.bmm(d.transpose(1, 2), a), d.sum(1)
            if m.weight.requires_grad:
                out[prefix + "weight"] = w.reshape(B, *m.weight.shape)
            if m.bias is not None and m.bias.requires_grad:
                out[prefix + "bias"] = b
        return out

    @validate(batch_size=Integer(1, V.MAX_WIDTH), coordinate_sums=Boolean(), dots=Boolean(), sums=Boolean(),
              gram=Boolean())
    def summaries(self, batch_size: int, *, coordinate_sums: bool = True, dots: bool = True, sums: bool = True,
                  gram: bool = False) -> dict:
        """Per layer: ``{"n_params", "mean_norm_sq", "sq_norms"[, "dots", "sum", "sum_sq"]}`` (see
        :func:`hook_summaries`).

        The mean gradient is read from the parameters' ``.grad`` (the backward pass already formed
        it).  Linear layers add elementwise work only, plus one matmul for the dot products
        g_i . g_bar (``dots``) and one for the coordinate sums of squares (``coordinate_sums``);
        Conv2d layers form their per-example weight gradients, except when only squared norms are
        asked for and the layer has few output positions T: then |g_i|^2 = sum_{t,t'} (d_t . d_t')
        (a_t . a_t') from two T x T Gram matrices per example.  ``gram``: also the ``(B, B)`` Gram
        matrix g_i . g_j of the layer's per-example gradients ((d d^T) * (a a^T) for Linear).
        """
        self._check_captured(batch_size)
        B = batch_size
        out = {}
        for key, (a, d) in self.acts.items():
            name = key or "model"
            if d is None:
                raise FastPathUnsupported(f"no gradient reached layer `{name}`: call backward() inside the capture.")
            m = self.linears[key]
            d = d * B  # the mean-reduced loss scales the output gradient by 1 / B
            if isinstance(m, nn.Conv2d) or a.dim() > 2:
                conv = isinstance(m, nn.Conv2d)
                if not conv:  # Linear on (B, ..., features): the per-example gradient sums over the positions
                    a, d = a.reshape(B, -1, a.shape[-1]), d.reshape(B, -1, d.shape[-1])
                n_out, n_in = m.weight.shape[0], m.weight[0].numel()
                n_pos = d.shape[2] * d.shape[3] if conv else d.shape[1]
                if not (dots or coordinate_sums or gram) and n_pos * (n_out + n_in) < n_out * n_in:
                    # squared norms only, few positions: |sum_t d_t a_t^T|^2 = sum_{t,t'} (d_t . d_t')(a_t . a_t')
                    at = _patches(a, m).transpose(1, 2) if conv else a  # (B, T, n_in)
                    dt = d.reshape(B, n_out, -1).transpose(1, 2) if conv else d  # (B, T, n_out)
                    sq = (torch.bmm(dt, dt.transpose(1, 2)) * torch.bmm(at, at.transpose(1, 2))).sum((1, 2))
                    gw = (m.weight.grad.reshape(n_out, n_in) if m.weight.grad is not None
                          else torch.einsum("bto,bti->oi", dt, at) / B)
                    dts = ss = None
                else:
                    gi = _conv_per_example(m, a, d) if conv else torch.bmm(d.transpose(1, 2), a)
                    gw = m.weight.grad.reshape(gi.shape[1:]) if m.weight.grad is not None else gi.mean(0)
                    sq = (gi * gi).sum((1, 2))
                    dts = (gi * gw).sum((1, 2)) if dots else None
                    ss = [(gi * gi).sum(0).reshape(-1)] if coordinate_sums else None
                # per-example bias gradients (B, C_out)
                db = d.reshape(B, d.shape[1], -1).sum(2) if isinstance(m, nn.Conv2d) else d.sum(1)
            else:
                gw = m.weight.grad if m.weight.grad is not None else d.T @ a / B  # the mean gradient
                d2 = d * d
                sq = d2.sum(1) * (a * a).sum(1)
                dts = ((d @ gw) * a).sum(1) if dots else None  # g_i . mean gradient
                ss = [(d2.T @ (a * a)).reshape(-1)] if coordinate_sums else None
                db = d
            m2 = (gw * gw).sum()
            n_params = gw.numel()
            s = [gw.reshape(-1) * B] if sums else None
            if m.bias is not None and m.bias.requires_grad:
                gb = m.bias.grad if m.bias.grad is not None else db.mean(0)
                m2 = m2 + (gb * gb).sum()
                n_params += gb.numel()
                sq = sq + (db * db).sum(1)
                if sums:
                    s.append(gb * B)
                if dots:
                    dts = dts + db @ gb
                if coordinate_sums:
                    ss.append((db * db).sum(0))
            out[name] = {"n_params": n_params, "mean_norm_sq": m2, "sq_norms": sq}
            if gram:
                if isinstance(m, nn.Conv2d) or a.dim() > 2:
                    flat = gi.reshape(B, -1)
                    K = flat @ flat.T
                else:
                    K = (d @ d.T) * (a @ a.T)
                if m.bias is not None and m.bias.requires_grad:
                    K = K + db @ db.T
                out[name]["gram"] = K
            if dots:
                out[name]["dots"] = dts
            if sums:
                out[name]["sum"] = torch.cat(s)
            if coordinate_sums:
                out[name]["sum_sq"] = torch.cat(ss)
        return out


@validate(model=Module(finite=True), loss_fn=LossFn(), x=X, y=Y,
          zero_grad=Maybe(Function("a callable zero_grad(set_to_none=True), e.g. optimizer.zero_grad")))
def capture_backward(model: nn.Module, loss_fn, x, y, *, zero_grad=None):
    """One forward and backward pass of the mean loss on ``(x, y)`` inside a :class:`LayerCapture`.

    ``zero_grad`` clears the gradients first (default ``model.zero_grad``; pass an optimizer's to
    train on the same pass).  Returns ``(capture, loss)``; raises
    :class:`deepmodels._validate.Diverged` (a ValueError) for non-finite parameters or a non-finite loss.
    """
    check_inputs(model, loss_fn, x, y)
    return _capture_backward(model, loss_fn, x, y, zero_grad)


def _capture_backward(model, loss_fn, x, y, zero_grad=None):
    """:func:`capture_backward` without the checks (for callers that made them)."""
    with LayerCapture(model) as cap:
        (zero_grad or model.zero_grad)(set_to_none=True)
        loss = loss_fn(model(x), y)
        if not torch.isfinite(loss):
            raise V.Diverged("the loss is not finite (NaN or inf).")
        loss.backward()
    return cap, loss


@validate(model=Module(finite=True), loss_fn=LossFn(), x=X, y=Y, gram=Boolean())
def hook_summaries(model: nn.Module, loss_fn, x, y, *, gram: bool = False) -> dict:
    """Per-layer ``(sum over examples of g_i, sum of |g_i|^2 per example, sum of g_i^2 per coordinate)``
    for every ``nn.Linear`` and ``nn.Conv2d`` (weight and bias together) from one backward pass with hooks.

    ``loss_fn`` must reduce by the mean; the per-example gradients are those of the per-example loss.
    Linear layers (on ``(B, features)`` inputs, or ``(B, ..., features)`` whose per-example gradient
    sums over the positions) and Conv2d layers; other trainable parameters raise ValueError.

    Returns:
        ``{layer name: {"n_params", "mean_norm_sq", "sum": (P_l,), "sq_norms": (B,), "dots": (B,),
        "sum_sq": (P_l,)}}``: the layer's parameter count, |g_bar|^2, the sum of the per-example
        gradients, their squared norms, their dot products with the mean gradient and the
        per-coordinate sums of squares, parameters flattened as ``[weight.ravel(), bias]``.

    Raises:
        deepmodels._validate.Diverged: non-finite parameters, loss or per-example gradients.
    """
    check_inputs(model, loss_fn, x, y)
    return _hook_summaries(model, loss_fn, x, y, gram)


def _hook_summaries(model, loss_fn, x, y, gram=False):
    """:func:`hook_summaries` without the checks (for callers that made them)."""
    cap, _ = _capture_backward(model, loss_fn, x, y)
    out = cap.summaries(x.shape[0], gram=gram)
    model.zero_grad(set_to_none=True)
    for name, f in out.items():
        if not (bool(torch.isfinite(f["sq_norms"]).all()) and bool(torch.isfinite(f["mean_norm_sq"]))):
            raise V.Diverged(f"non-finite per-example gradient in layer `{name}` (NaN or inf loss?).")
    return out
