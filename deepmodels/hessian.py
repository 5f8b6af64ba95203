"""Curvature of a network's loss: Hessian-vector products, top eigenvalues, trace, and the
lecture's comparison of curvature H with gradient noise C along chosen directions.

* :func:`hvp`: H v by double backpropagation (exact, one extra backward pass).
* :func:`top_eigenvalues`: the k largest (algebraic) eigenvalues by Lanczos (ARPACK's implicitly
  restarted Lanczos, ``scipy.sparse.linalg.eigsh``, on the HVP operator).
* :func:`hutchinson_trace`: tr H = E[v^T H v] with Rademacher v, with its standard error.
* :func:`rayleigh_quotients`: v^T H v and v^T C v for directions v (C the per-example gradient
  covariance), the scatter that justifies H = C in the NQM (lecture seed 004).

Parameters are the model's trainable ones, flattened in ``named_parameters`` order; the loss is
``loss_fn(model(x), y)`` on one fixed batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import xarray as xr
from scipy.sparse.linalg import LinearOperator, eigsh

from toymodels.schema import attach_attrs

from . import pergrad

__all__ = ["flat_params", "hvp", "top_eigenpairs", "top_eigenvalues", "hutchinson_trace", "rayleigh_quotients"]


def flat_params(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def _loss_and_grad(model, loss_fn, x, y):
    pergrad.check_batch(x, y)
    params = flat_params(model)
    loss = loss_fn(model(x), y)
    if not torch.isfinite(loss):
        raise ValueError("the loss is not finite (NaN or inf).")
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return params, torch.cat([g.reshape(-1) for g in grads])


def hvp(model, loss_fn, x, y, v: torch.Tensor) -> torch.Tensor:
    """H v for the loss on ``(x, y)``; ``v`` a flat vector of the trainable parameters' size."""
    params, g = _loss_and_grad(model, loss_fn, x, y)
    if v.shape != g.shape:
        raise ValueError(f"`v` must have shape {tuple(g.shape)} (the trainable parameters); got {tuple(v.shape)}.")
    hv = torch.autograd.grad(g, params, grad_outputs=v.to(g.dtype), retain_graph=False)
    return torch.cat([h.reshape(-1) for h in hv]).detach()


class _HVPOperator:
    """Repeated H v products on one graph (the gradient is built once)."""

    def __init__(self, model, loss_fn, x, y):
        self.params, self.g = _loss_and_grad(model, loss_fn, x, y)
        self.n = self.g.numel()
        self.count = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.count += 1
        hv = torch.autograd.grad(self.g, self.params, grad_outputs=v.to(self.g.dtype), retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).detach()


def top_eigenpairs(model, loss_fn, x, y, k: int = 5, *, tol: float = 1e-6, seed: int = 0):
    """The ``k`` largest eigenvalues (descending) of the Hessian on ``(x, y)`` and their unit
    eigenvectors ``(k, P)`` (torch, the parameters' dtype), by Lanczos (ARPACK's ``eigsh``)."""
    op = _HVPOperator(model, loss_fn, x, y)
    if not (isinstance(k, int) and 1 <= k < op.n):
        raise ValueError(f"`k` must be an int in [1, {op.n - 1}] (fewer than the {op.n} parameters); got {k!r}.")
    device, dtype = op.g.device, op.g.dtype

    def mv(v):
        return op(torch.as_tensor(np.ravel(v), dtype=dtype, device=device)).double().cpu().numpy()

    v0 = np.random.default_rng(seed).standard_normal(op.n)
    vals, vecs = eigsh(LinearOperator((op.n, op.n), matvec=mv, dtype=np.float64), k=k, which="LA", tol=tol, v0=v0)
    order = np.argsort(vals)[::-1]
    return vals[order], torch.as_tensor(vecs[:, order].T.copy(), dtype=dtype, device=device)


def top_eigenvalues(model, loss_fn, x, y, k: int = 5, *, tol: float = 1e-6, seed: int = 0) -> np.ndarray:
    """The ``k`` largest eigenvalues of the Hessian on ``(x, y)``, descending, by Lanczos.

    ``tol`` is ARPACK's relative accuracy; the start vector is drawn from ``seed``.
    """
    return top_eigenpairs(model, loss_fn, x, y, k, tol=tol, seed=seed)[0]


def hutchinson_trace(model, loss_fn, x, y, n_samples: int = 100, *, seed: int = 0) -> tuple[float, float]:
    """tr H estimated by the mean of v^T H v over ``n_samples`` Rademacher vectors; returns
    ``(estimate, standard error)``."""
    if not (isinstance(n_samples, int) and n_samples >= 2):
        raise ValueError(f"`n_samples` must be an int >= 2; got {n_samples!r}.")
    op = _HVPOperator(model, loss_fn, x, y)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    vals = []
    for _ in range(n_samples):
        v = (torch.randint(0, 2, (op.n,), generator=gen) * 2 - 1).to(device=op.g.device, dtype=op.g.dtype)
        vals.append(float(v @ op(v)))
    vals = np.array(vals)
    return float(vals.mean()), float(vals.std(ddof=1) / math.sqrt(n_samples))


def rayleigh_quotients(model, loss_fn, x, y, directions: torch.Tensor) -> xr.Dataset:
    """v^T H v and v^T C v along each row of ``directions`` ``(m, P)`` (normalised here), with C the
    population covariance of the per-example gradients on ``(x, y)``.

    Returns:
        Dataset over ``mode`` with ``curvature`` (v^T H v) and ``noise_variance`` (v^T C v);
        ``source="measurement"``.
    """
    op = _HVPOperator(model, loss_fn, x, y)
    V = torch.as_tensor(directions, dtype=op.g.dtype, device=op.g.device)
    if V.dim() != 2 or V.shape[1] != op.n:
        raise ValueError(f"`directions` must have shape (m, {op.n}); got {tuple(V.shape)}.")
    V = V / V.norm(dim=1, keepdim=True)
    curv = np.array([float(v @ op(v)) for v in V])
    G = pergrad.flatten(pergrad.per_example_grads(model, loss_fn, x, y)).to(V.dtype)
    proj = (G - G.mean(0)) @ V.T  # (B, m)
    noise = (proj**2).mean(0).double().cpu().numpy()
    ds = xr.Dataset({"curvature": ("mode", curv), "noise_variance": ("mode", noise)},
                    coords={"mode": np.arange(V.shape[0])})
    attach_attrs(ds, model=type(model).__name__.lower(), source="measurement", n_examples=int(x.shape[0]))
    return ds
