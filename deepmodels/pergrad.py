"""Per-example gradients: for any model by ``torch.func`` (chunked), and a hook fast path for
Linear layers that gives per-example squared norms and coordinate sums of squares without
materialising the ``(B, P)`` array (per-example weight gradient = d a^T with a the layer input and
d the gradient of the summed loss at its output, so |g_i|^2 = |d_i|^2 |a_i|^2).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

__all__ = ["per_example_grads", "flatten", "linear_fast_path", "check_batch"]


def check_batch(x, y):
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("`x` and `y` must be torch tensors.")
    if x.shape[0] == 0:
        raise ValueError("`x` must hold at least one example; got an empty batch.")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"`y` must have {x.shape[0]} entries to match `x`; got {y.shape[0]}.")


def _trainable(model):
    return {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}


def per_example_grads(model: nn.Module, loss_fn, x, y, *, chunk_size: int = 256) -> dict:
    """``{parameter name: (B, *shape)}`` gradients of ``loss_fn(model(x_i), y_i)`` per example.

    Args:
        model: any module without batch-coupled layers in training mode (BatchNorm in train mode mixes
            examples, so per-example gradients are undefined; use ``model.eval()``).
        loss_fn: ``loss_fn(output, target)`` for a batch, reducing by the mean (per example it
            sees a batch of one).
        x, y: a batch.
        chunk_size: examples per vectorised call (bounds memory).

    Raises:
        ValueError: empty or mismatched batch, or a non-finite loss.
    """
    check_batch(x, y)
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
            raise ValueError(f"non-finite per-example gradient in `{k}` (NaN or inf loss?).")
    return out


def flatten(grads: dict) -> torch.Tensor:
    """``(B, P)`` from :func:`per_example_grads`."""
    return torch.cat([v.reshape(v.shape[0], -1) for v in grads.values()], dim=1)


def linear_fast_path(model: nn.Module, loss_fn, x, y) -> dict:
    """Per-layer ``(sum over examples of g_i, sum of |g_i|^2 per example, sum of g_i^2 per coordinate)``
    for every ``nn.Linear`` (weight and bias together) from one backward pass with hooks.

    ``loss_fn`` must reduce by the mean; the per-example gradients are those of the per-example loss.
    Only Linear layers on ``(B, features)`` inputs; other trainable parameters raise ValueError.

    Returns:
        ``{layer name: {"sum": (P_l,), "sq_norms": (B,), "dots": (B,), "sum_sq": (P_l,)}}``: the sum of
        the per-example gradients, their squared norms, their dot products with the mean gradient and
        the per-coordinate sums of squares, parameters flattened as ``[weight.ravel(), bias]``.
    """
    check_batch(x, y)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    covered = {f"{n}.{p}" if n else p for n, m in linears.items() for p, v in m.named_parameters(recurse=False)
               if v.requires_grad}
    other = [k for k, v in model.named_parameters() if v.requires_grad and k not in covered]
    if other:
        raise ValueError(f"linear_fast_path handles nn.Linear parameters only; also trainable: {other}.")
    acts, handles = {}, []
    for name, m in linears.items():
        if not any(p.requires_grad for p in m.parameters(recurse=False)):
            continue

        def capture(mod, inp, out, name=name):
            # the layer input now, the gradient at its output when the backward pass reaches it
            acts[name] = [inp[0].detach(), None]
            out.register_hook(lambda g, name=name: acts[name].__setitem__(1, g.detach()))

        handles.append(m.register_forward_hook(capture))
    try:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        if not torch.isfinite(loss):
            raise ValueError("the loss is not finite (NaN or inf).")
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    B = x.shape[0]
    out = {}
    for key, (a, d) in acts.items():
        name = key or "model"
        if a.dim() != 2:
            raise ValueError(f"linear_fast_path needs (B, features) inputs; layer `{name}` got {tuple(a.shape)}.")
        d = d * B  # the mean-reduced loss scales the output gradient by 1 / B
        m = linears[key]
        gw = d.T @ a
        s = [gw.reshape(-1)]
        sq = (d**2).sum(1) * (a**2).sum(1)
        dots = ((d @ gw) * a).sum(1) / B  # g_i . mean gradient
        ss = [((d**2).T @ (a**2)).reshape(-1)]
        if m.bias is not None and m.bias.requires_grad:
            gb = d.sum(0)
            s.append(gb)
            sq = sq + (d**2).sum(1)
            dots = dots + d @ gb / B
            ss.append((d**2).sum(0))
        out[name] = {"sum": torch.cat(s), "sq_norms": sq, "dots": dots, "sum_sq": torch.cat(ss)}
    model.zero_grad(set_to_none=True)
    return out
