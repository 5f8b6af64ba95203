"""Gradient statistics of a real network at one parameter point, per layer and in total.

From the B per-example gradients g_i of a batch (:mod:`deepmodels.pergrad`): the mean gradient g_bar,
|g_bar|^2 (``grad_norm_sq``), the population trace of the per-example covariance
tr Sigma = mean |g_i - g_bar|^2 (``trace_cov``, with its standard error), and from these the
statistics of :func:`toymodels.stats.gradient_statistics` for the optimizer's mini-batch size
(``grad_var``, ``grad_nvar``, ``snr``, ``noise_scale``), so the toy models and the network share
one definition.  ``grad_norm_sq_unbiased`` and ``noise_scale_unbiased`` come from
:func:`toymodels.stats.two_batch_estimates` with batch sizes 1 and B (McCandlish et al. 2018).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import xarray as xr
from torch import nn

from toymodels.schema import attach_attrs
from toymodels.stats import gradient_statistics, two_batch_estimates

from . import pergrad

__all__ = ["gradient_stats"]


def _layer_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else "model"  # parameters of the root module


def _summaries_func(model, loss_fn, x, y, chunk_size):
    """Per layer: (P_l, mean gradient, |g_i|^2 (B,), |g_i - g_bar|^2 (B,)) from torch.func."""
    grads = pergrad.per_example_grads(model, loss_fn, x, y, chunk_size=chunk_size)
    layers = {}
    for k, v in grads.items():
        layers.setdefault(_layer_of(k), []).append(v.reshape(v.shape[0], -1))
    out = {}
    for name, parts in layers.items():
        G = torch.cat(parts, dim=1).double()
        mean = G.mean(0)
        out[name] = (G.shape[1], mean, (G**2).sum(1), ((G - mean) ** 2).sum(1))
    return out


def _summaries_hooks(model, loss_fn, x, y):
    fast = pergrad.linear_fast_path(model, loss_fn, x, y)
    B = x.shape[0]
    out = {}
    for name, f in fast.items():
        mean = f["sum"].double() / B
        m2 = float(mean @ mean)
        sq = f["sq_norms"].double()
        out[name] = (mean.numel(), mean, sq, sq - 2.0 * f["dots"].double() + m2)
    return out


def gradient_stats(model: nn.Module, loss_fn, x, y, *, batch_size: float | None = None, method: str = "auto",
                   chunk_size: int = 256, step: int | None = None) -> xr.Dataset:
    """Measure the gradient statistics on the batch ``(x, y)``.

    Args:
        model: the network (its parameters are not changed; gradients are cleared).
        loss_fn: batch loss reducing by the mean, e.g. ``torch.nn.functional.cross_entropy``.
        x, y: the examples to measure on (B >= 2).
        batch_size: the optimizer's mini-batch size the statistics refer to (default B).
        method: ``"func"`` (torch.func per-example gradients, any model), ``"hooks"`` (Linear-layer
            fast path, no (B, P) array) or ``"auto"`` (hooks when every trainable parameter belongs
            to an nn.Linear on 2-D inputs).
        chunk_size: examples per vectorised call for ``"func"``.
        step: training step to record as a coordinate (optional).

    Returns:
        Dataset over ``layer`` (each module with trainable parameters, then ``"total"``):
        ``grad_norm_sq``, ``grad_var``, ``grad_nvar``, ``snr``, ``noise_scale``, ``trace_cov``,
        ``trace_cov_sem``, ``grad_norm_sq_unbiased``, ``noise_scale_unbiased``, ``n_params``;
        ``source="measurement"``.
    """
    pergrad.check_batch(x, y)
    B = x.shape[0]
    if B < 2:
        raise ValueError("`x` must hold at least 2 examples to measure a variance.")
    bs = float(B if batch_size is None else batch_size)
    if not bs >= 1:
        raise ValueError(f"`batch_size` must be >= 1; got {batch_size!r}.")
    if method not in ("auto", "func", "hooks"):
        raise ValueError(f"`method` must be 'auto', 'func' or 'hooks'; got {method!r}.")
    if method == "auto":
        try:
            summ = _summaries_hooks(model, loss_fn, x, y)
            method = "hooks"
        except ValueError as err:
            if "not finite" in str(err):
                raise
            summ = _summaries_func(model, loss_fn, x, y, chunk_size)
            method = "func"
    elif method == "hooks":
        summ = _summaries_hooks(model, loss_fn, x, y)
    else:
        summ = _summaries_func(model, loss_fn, x, y, chunk_size)
    names = list(summ) + ["total"]
    P = np.array([summ[n][0] for n in summ] + [sum(s[0] for s in summ.values())], dtype=np.float64)
    g2 = [float(summ[n][1] @ summ[n][1]) for n in summ]
    sq = [summ[n][2] for n in summ]
    dev = [summ[n][3] for n in summ]
    g2.append(sum(g2))
    sq.append(sum(sq))
    dev.append(sum(dev))
    g2 = np.array(g2)
    tr = np.array([float(d.mean()) for d in dev])
    tr_sem = np.array([float(d.std()) / math.sqrt(B) for d in dev])
    mean_sq = np.array([float(s.mean()) for s in sq])
    st = gradient_statistics(g2, tr, P, bs)
    g2u, tru = two_batch_estimates(mean_sq, 1.0, g2, float(B))
    with np.errstate(divide="ignore", invalid="ignore"):
        nsu = np.where(g2u > 0, tru / np.where(g2u > 0, g2u, 1.0), np.inf)
    data = {k: ("layer", np.asarray(v, dtype=np.float64)) for k, v in st.items()}
    data.update(trace_cov=("layer", tr), trace_cov_sem=("layer", tr_sem), grad_norm_sq_unbiased=("layer", g2u),
                noise_scale_unbiased=("layer", nsu), n_params=("layer", P))
    ds = xr.Dataset(data, coords={"layer": names})
    if step is not None:
        ds = ds.expand_dims(step=[int(step)])
    attach_attrs(ds, model=type(model).__name__.lower(), source="measurement", batch_size=bs, n_examples=B,
                 method=method, device=str(x.device))
    model.zero_grad(set_to_none=True)
    return ds
