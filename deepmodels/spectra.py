"""Gradient-history matrices and their spectra (Xie et al. 2023, App. A), by the Gram trick.

At fixed parameters, T mini-batch gradients g_1..g_T (rows of M, ``(T, P)``) give the second-moment
matrix M^T M / T and the covariance (M - mean)^T (M - mean) / T, both P x P.  Their non-zero
eigenvalues are those of the T x T Gram matrices M M^T / T and (centred) Mc Mc^T / T, so the
spectra cost O(T^2 P + T^3) and never form a P x P matrix.

References:
    Z. Xie, Q.-Y. Tang, M. Sun and P. Li, "On the Overlooked Structure of Stochastic Gradients",
    NeurIPS 2023.
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from toymodels.schema import attach_attrs

from . import _validate as V
from . import pergrad
from ._validate import Integer, LossFn, Module, Tensor, validate
from .pergrad import X, Y

_HISTORY = dict(model=Module(finite=True), loss_fn=LossFn(), x=X, y=Y, batch_size=Integer(1, V.MAX_WIDTH),
                n_batches=Integer(2, V.MAX_DRAWS), seed=V.Seed())


def _check_history(model, loss_fn, x, y, batch_size, n_batches):
    pergrad.check_inputs(model, loss_fn, x, y)
    P = V.n_trainable(model)
    V.check_bytes("n_batches", float(n_batches) * P * x.element_size(), f"{n_batches} gradients of {P} parameters",
                  device=x.device)
    V.check_bytes("batch_size", float(batch_size) * x[:1].numel() * x.element_size() * 4,
                  f"batches of {batch_size} inputs (and their activations, at least)", device=x.device)

__all__ = ["gradient_history", "gram_spectra", "gradient_spectra"]


@validate(**_HISTORY)
def gradient_history(model, loss_fn, x, y, *, batch_size: int, n_batches: int, seed: int = 0) -> torch.Tensor:
    """``(n_batches, P)`` mini-batch gradients at the current parameters, batches of ``batch_size``
    drawn with replacement from ``(x, y)`` by a generator seeded with ``seed`` (parameters unchanged).
    ``n_batches`` in [2, 10**6]; raises :class:`deepmodels._validate.Diverged` for a non-finite loss."""
    _check_history(model, loss_fn, x, y, batch_size, n_batches)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows = []
    for _ in range(n_batches):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen).to(x.device)
        loss = loss_fn(model(x[idx]), y[idx])
        if not torch.isfinite(loss):
            raise V.Diverged("the loss is not finite (NaN or inf).")
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).detach())
    return torch.stack(rows)


@validate(M=Tensor("float", ndim=2))
def gram_spectra(M: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Descending non-zero-capable eigenvalues (length T) of M^T M / T and of the covariance of
    the rows of M, from the T x T Gram matrices (float64)."""
    if M.shape[0] < 2:
        raise ValueError(f"`M` must be a (T >= 2, P) matrix; got shape {tuple(M.shape)}.")
    M = V.to_float64(M)
    T = M.shape[0]
    second = torch.linalg.eigvalsh(M @ M.T / T).cpu().numpy()[::-1]
    Mc = M - M.mean(0)
    cov = torch.linalg.eigvalsh(Mc @ Mc.T / T).cpu().numpy()[::-1]
    return np.maximum(second, 0.0).copy(), np.maximum(cov, 0.0).copy()


@validate(**_HISTORY)
def gradient_spectra(model, loss_fn, x, y, *, batch_size: int, n_batches: int = 100, seed: int = 0) -> xr.Dataset:
    """Spectra of the mini-batch gradient's second moment and covariance at the current parameters.

    Returns:
        Dataset over ``rank`` (0 = largest): ``second_moment_eigenvalue`` and
        ``covariance_eigenvalue``; ``source="measurement"``.
    """
    M = gradient_history(model, loss_fn, x, y, batch_size=batch_size, n_batches=n_batches, seed=seed)
    second, cov = gram_spectra(M)
    ds = xr.Dataset({"second_moment_eigenvalue": ("rank", second), "covariance_eigenvalue": ("rank", cov)},
                    coords={"rank": np.arange(second.size)})
    attach_attrs(ds, model=type(model).__name__.lower(), source="measurement", batch_size=float(batch_size),
                 n_batches=n_batches, n_params=int(M.shape[1]), seed=seed)
    return ds
