"""Curvature of a network's loss: Hessian-vector products, top eigenvalues, trace, and the
lecture's comparison of curvature H with gradient noise C along chosen directions.

* :func:`hvp`: H v by double backpropagation (exact, one extra backward pass).
* :func:`top_eigenvalues`: the k largest (algebraic) eigenvalues by Lanczos (ARPACK's implicitly
  restarted Lanczos, ``scipy.sparse.linalg.eigsh``, on the HVP operator).
* :func:`hutchinson_trace`: tr H = E[v^T H v] with Rademacher v, with its standard error.
* :func:`rayleigh_quotients`: v^T H v and v^T C v for directions v (C the per-example gradient
  covariance), the scatter that justifies H = C in the NQM (Grosse's CSC 2541 Lecture 7, the
  "Noisy Quadratic Model" slide on H = C).

Parameters are the model's trainable ones, flattened in ``named_parameters`` order; the loss is
``loss_fn(model(x), y)`` on one fixed batch.  ``x`` must have the model's dtype and device (see
:mod:`deepmodels._validate`); direction vectors (``v``, ``directions``) are converted to the
parameters' dtype and device.  A model with non-finite parameters, or a non-finite loss, raises
:class:`deepmodels._validate.Diverged` (a ValueError).

References:
    R. Grosse, "CSC 2541: Neural Net Training Dynamics", Lecture 7 "Stochasticity and Parallelism",
    University of Toronto, Winter 2022.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import xarray as xr
from scipy.sparse.linalg import LinearOperator, eigsh

from toymodels.schema import attach_attrs

from . import _validate as V
from . import pergrad
from ._validate import Integer, LossFn, Module, Real, Tensor, validate
from .pergrad import X, Y

__all__ = ["flat_params", "hvp", "top_eigenpairs", "top_eigenvalues", "hutchinson_trace", "rayleigh_quotients"]


@validate(model=Module(trainable=False))
def flat_params(model) -> list:
    """The trainable parameters, in ``named_parameters`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def _loss_and_grad(model, loss_fn, x, y):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model(x), y)
    if not torch.isfinite(loss):
        raise V.Diverged("the loss is not finite (NaN or inf).")
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return params, torch.cat([g.reshape(-1) for g in grads])


_MODEL = Module(finite=True)


@validate(model=_MODEL, loss_fn=LossFn(), x=X, y=Y, v=Tensor("float", ndim=1))
def hvp(model, loss_fn, x, y, v: torch.Tensor) -> torch.Tensor:
    """H v for the loss on ``(x, y)``; ``v`` a flat vector of the trainable parameters' size (any
    float dtype: converted to the parameters' dtype and device)."""
    pergrad.check_inputs(model, loss_fn, x, y)
    P = V.n_trainable(model)
    if tuple(v.shape) != (P,):
        raise ValueError(f"`v` must have shape {(P,)} (the trainable parameters); got {tuple(v.shape)}.")
    params, g = _loss_and_grad(model, loss_fn, x, y)
    hv = torch.autograd.grad(g, params, grad_outputs=v.to(g.dtype).to(g.device), retain_graph=False)
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


def _check_k(model, k):
    P = V.n_trainable(model)
    if k >= P:
        raise ValueError(f"`k` must be an integer in [1, {P - 1}] (fewer than the {P} parameters); got {k}.")
    ncv = min(P, max(2 * k + 1, 20))
    V.check_bytes("k", 8.0 * P * (ncv + k + 2), f"Lanczos vectors ({ncv + k} of {P} parameters)")


_TOP = dict(model=_MODEL, loss_fn=LossFn(), x=X, y=Y, k=Integer(1, V.MAX_WIDTH), tol=Real(0, 1), seed=V.Seed())


@validate(**_TOP)
def top_eigenpairs(model, loss_fn, x, y, k: int = 5, *, tol: float = 1e-6, seed: int = 0):
    """The ``k`` largest eigenvalues (descending) of the Hessian on ``(x, y)`` and their unit
    eigenvectors ``(k, P)`` (torch, the parameters' dtype), by Lanczos (ARPACK's ``eigsh``).
    ``tol`` is ARPACK's relative accuracy in [0, 1] (0: machine precision); ``k`` < P."""
    pergrad.check_inputs(model, loss_fn, x, y)
    _check_k(model, k)
    op = _HVPOperator(model, loss_fn, x, y)
    device, dtype = op.g.device, op.g.dtype

    def mv(v):
        return op(torch.as_tensor(np.ravel(v), dtype=dtype, device=device)).double().cpu().numpy()

    v0 = np.random.default_rng(seed).standard_normal(op.n)
    vals, vecs = eigsh(LinearOperator((op.n, op.n), matvec=mv, dtype=np.float64), k=k, which="LA", tol=tol, v0=v0)
    order = np.argsort(vals)[::-1]
    return vals[order], torch.as_tensor(vecs[:, order].T.copy(), dtype=dtype, device=device)


@validate(**_TOP)
def top_eigenvalues(model, loss_fn, x, y, k: int = 5, *, tol: float = 1e-6, seed: int = 0) -> np.ndarray:
    """The ``k`` largest eigenvalues of the Hessian on ``(x, y)``, descending, by Lanczos.

    ``tol`` is ARPACK's relative accuracy; the start vector is drawn from ``seed``.
    """
    return top_eigenpairs(model, loss_fn, x, y, k, tol=tol, seed=seed)[0]


@validate(model=_MODEL, loss_fn=LossFn(), x=X, y=Y, n_samples=Integer(2, V.MAX_DRAWS), seed=V.Seed())
def hutchinson_trace(model, loss_fn, x, y, n_samples: int = 100, *, seed: int = 0) -> tuple[float, float]:
    """tr H estimated by the mean of v^T H v over ``n_samples`` Rademacher vectors (at most 10**6);
    returns ``(estimate, standard error)``."""
    pergrad.check_inputs(model, loss_fn, x, y)
    op = _HVPOperator(model, loss_fn, x, y)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    vals = []
    for _ in range(n_samples):
        v = (torch.randint(0, 2, (op.n,), generator=gen) * 2 - 1).to(device=op.g.device, dtype=op.g.dtype)
        vals.append(float(v @ op(v)))
    vals = np.array(vals)
    return float(vals.mean()), float(vals.std(ddof=1) / math.sqrt(n_samples))


class _Directions(V.Constraint):
    """A 2-D real tensor or array ``(m, P)`` of finite, non-zero rows (converted later)."""

    def __call__(self, name, value):
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "fiu":
                raise TypeError(f"`{name}` must be a real (m, P) tensor or array; got dtype {value.dtype}.")
            value = torch.as_tensor(value)
        if not isinstance(value, torch.Tensor) or value.dtype.is_complex or value.dtype == torch.bool:
            got = type(value).__name__ if not isinstance(value, torch.Tensor) else str(value.dtype).replace("torch.", "")
            raise TypeError(f"`{name}` must be a real (m, P) tensor or array; got {got}.")
        value = value if value.dtype.is_floating_point else value.double()
        Tensor("float", ndim=2)(name, value)
        if value.shape[0] == 0 or not bool((value.norm(dim=1) > 0).all()):
            raise ValueError(f"`{name}` must be an (m, P) matrix with m >= 1 and no zero row (each row is "
                             f"normalised); got shape {tuple(value.shape)}.")
        return value

    def bad_values(self):
        return [None, "1", 1 + 1j, np.zeros((2, 3), dtype=complex), torch.zeros(3), torch.zeros(2, 3),
                torch.full((2, 3), math.nan), torch.zeros(0, 3)]


@validate(model=_MODEL, loss_fn=LossFn(), x=X, y=Y, directions=_Directions())
def rayleigh_quotients(model, loss_fn, x, y, directions: torch.Tensor) -> xr.Dataset:
    """v^T H v and v^T C v along each row of ``directions`` ``(m, P)`` (normalised here), with C the
    population covariance of the per-example gradients on ``(x, y)``.

    Returns:
        Dataset over ``mode`` with ``curvature`` (v^T H v) and ``noise_variance`` (v^T C v);
        ``source="measurement"``.
    """
    pergrad.check_inputs(model, loss_fn, x, y)
    P = V.n_trainable(model)
    if directions.shape[1] != P:
        raise ValueError(f"`directions` must have shape (m, {P}); got {tuple(directions.shape)}.")
    pergrad.check_grad_memory(model, x, copies=3.0)
    op = _HVPOperator(model, loss_fn, x, y)
    D = torch.as_tensor(directions, dtype=op.g.dtype, device=op.g.device)
    D = D / D.norm(dim=1, keepdim=True)
    curv = np.array([float(v @ op(v)) for v in D])
    G = pergrad.flatten(pergrad.per_example_grads(model, loss_fn, x, y)).to(D.dtype)
    proj = (G - G.mean(0)) @ D.T  # (B, m)
    noise = (proj**2).mean(0).double().cpu().numpy()
    ds = xr.Dataset({"curvature": ("mode", curv), "noise_variance": ("mode", noise)},
                    coords={"mode": np.arange(D.shape[0])})
    attach_attrs(ds, model=type(model).__name__.lower(), source="measurement", n_examples=int(x.shape[0]))
    return ds
