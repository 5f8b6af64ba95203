"""Gradient clustering on a network with rank-1 per-layer centres (Faghri et al. Sec. 3.2, App. B.1).

The per-example gradient of a Linear layer is g_i = d_i a_i^T (output gradient times input), and a
Conv2d layer's is a (C_out, C_in k^2) matrix.  Each cluster k keeps, per layer, a rank-1 centre
C_k = c_k e_k^T (and a full centre for the bias), so the A step's distances

    |C_k - g_i|^2 = |c_k|^2 |e_k|^2 - 2 <C_k, g_i> + |g_i|^2,   <C_k, g_i> = (c_k . d_i)(e_k . a_i) (Linear)

cost O(N K (in + out)) per Linear layer, summed over layers; the A step assigns
a_i = argmin_k N_k |C_k - g_i|^2 (Eq. 3) at fixed N_k, then N_k is updated and the U step sets
c_k, e_k to the cluster means of d and a (Eq. 6, exact when activations and output gradients are
uncorrelated) for Linear layers and to the top singular pair of the cluster's mean gradient (the
min-Frobenius rank-1 fit) for Conv2d layers.  The variance of the stratified estimator for the
resulting partition is Prop. 3.1's N^-2 sum_k N_k^2 V_k, computed exactly from per-cluster sums
(no (N, P) array for Linear layers).

References:
    F. Faghri, D. Duvenaud, D. J. Fleet and J. Ba, "A Study of Gradient Variance in Deep Learning",
    2020.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import _validate as V
from . import pergrad
from ._validate import Integer, LossFn, Module, validate
from .pergrad import X, Y

__all__ = ["Rank1Clustering"]


def _layer_data(model, loss_fn, x, y):
    """Per trainable Linear / Conv2d layer: ("linear", a, d, bias_grads) or ("conv", g, None, bias_grads),
    with per-example gradients of the per-example loss (d scaled by N)."""
    n = x.shape[0]
    cap, _ = pergrad._capture_backward(model, loss_fn, x, y)
    model.zero_grad(set_to_none=True)
    out = {}
    for key, (a, d) in cap.acts.items():
        m = cap.linears[key]
        d = d * n
        has_bias = m.bias is not None and m.bias.requires_grad
        if isinstance(m, nn.Conv2d):
            g = pergrad._conv_per_example(m, a, d)
            out[key or "model"] = ("conv", g.double(), None, d.reshape(n, d.shape[1], -1).sum(2).double() if has_bias else None)
        else:
            if a.dim() != 2:
                raise ValueError(f"rank-1 clustering needs (N, features) inputs to Linear; got {tuple(a.shape)}.")
            out[key or "model"] = ("linear", a.double(), d.double(), d.double() if has_bias else None)
    return out


def _weight_sq_norms(layer):
    kind, p, q, _ = layer
    return (p * p).sum((1, 2)) if kind == "conv" else (p * p).sum(1) * (q * q).sum(1)


def _sq_norms(layer):
    b = layer[3]
    sq = _weight_sq_norms(layer)
    return sq if b is None else sq + (b * b).sum(1)


class Rank1Clustering:
    """Weighted gradient clustering with rank-1 per-layer centres.

    Args:
        model: a network whose trainable layers are nn.Linear (on 2-D inputs) and nn.Conv2d.
        n_clusters: K (the paper uses the mini-batch size).
        seed: seed of the initial centres.
    """

    @validate(model=Module(), n_clusters=Integer(1, V.MAX_WIDTH), seed=V.Seed())
    def __init__(self, model: nn.Module, n_clusters: int, *, seed: int = 0):
        self.model, self.K, self.seed = model, n_clusters, seed
        self.assign = None

    # -----------------------------------------------------------------------------------------
    def _distances(self, layers, centres):
        """(N, K) sum over layers of |C_k - g_i|^2."""
        total = None
        for name, layer in layers.items():
            kind, p, q, b = layer
            c, e, cb = centres[name]
            if kind == "linear":
                inner = (q @ c.T) * (p @ e.T)
            else:
                inner = torch.einsum("nop,ko,kp->nk", p, c, e)
            dist = (c * c).sum(1)[None, :] * (e * e).sum(1)[None, :] - 2.0 * inner + _weight_sq_norms(layer)[:, None]
            if b is not None:
                dist = dist + ((b[:, None, :] - cb[None, :, :]) ** 2).sum(2)
            total = dist if total is None else total + dist
        return total

    @staticmethod
    def _centre(layer, members):
        kind, p, q, b = layer
        cb = b[members].mean(0) if b is not None else None
        if kind == "linear":
            return q[members].mean(0), p[members].mean(0), cb  # Eq. (6): c = mean d, e = mean a
        U, S, Vh = torch.linalg.svd(p[members].mean(0), full_matrices=False)
        return U[:, 0] * S[0], Vh[0], cb

    def _centres(self, layers, assign):
        out = {}
        for name, layer in layers.items():
            cs = [self._centre(layer, torch.nonzero(assign == k).flatten()) for k in range(self.K)]
            out[name] = (torch.stack([c[0] for c in cs]), torch.stack([c[1] for c in cs]),
                         torch.stack([c[2] for c in cs]) if cs[0][2] is not None else None)
        return out

    @staticmethod
    def _variance(layers, assign, K):
        """Prop. 3.1: N^-2 sum_k N_k^2 V_k with V_k = mean_{i in k} |g_i|^2 - |g_bar_k|^2."""
        n = assign.shape[0]
        sq = sum(_sq_norms(layer) for layer in layers.values())
        total = 0.0
        for k in range(K):
            idx = torch.nonzero(assign == k).flatten()
            nk = idx.numel()
            if nk == 0:
                continue
            mean_norm = 0.0
            for kind, p, q, b in layers.values():
                gk = (q[idx].T @ p[idx]) / nk if kind == "linear" else p[idx].mean(0)
                mean_norm += float((gk * gk).sum())
                if b is not None:
                    mean_norm += float((b[idx].mean(0) ** 2).sum())
            vk = float(sq[idx].mean()) - mean_norm
            total += nk * nk * max(vk, 0.0)
        return total / n**2

    # -----------------------------------------------------------------------------------------
    def _check(self, loss_fn, x, y):
        V.check_finite_params(self.model)
        pergrad.check_inputs(self.model, loss_fn, x, y)

    @validate(loss_fn=LossFn(), x=X, y=Y, n_iter=Integer(1, V.MAX_ITER))
    def fit(self, loss_fn, x, y, *, n_iter: int = 3) -> "Rank1Clustering":
        """Alg. 1-3 with rank-1 centres on the examples ``(x, y)``; keeps the partition with the
        lowest Prop. 3.1 variance seen.  Returns self (``assign``: ``(N,)`` int64 numpy labels).
        ``n_iter`` in [1, 10**4]; a model with non-finite parameters raises
        :class:`deepmodels._validate.Diverged`."""
        self._check(loss_fn, x, y)
        n = x.shape[0]
        if self.K > n:
            raise ValueError(f"`n_clusters` must be at most the number of examples {n}; got {self.K}.")
        V.check_bytes("x", 16.0 * n * self.K, f"the distances of {n} examples to {self.K} centres", device=x.device)
        layers = _layer_data(self.model, loss_fn, x, y)
        rng = np.random.default_rng(self.seed)
        seeds = torch.as_tensor(rng.choice(n, size=self.K, replace=False), device=x.device)
        assign = torch.full((n,), -1, dtype=torch.int64, device=x.device)
        assign[seeds] = torch.arange(self.K, device=x.device)
        centres = {}
        for name, layer in layers.items():
            cs = [self._centre(layer, s.reshape(1)) for s in seeds]
            centres[name] = (torch.stack([c[0] for c in cs]), torch.stack([c[1] for c in cs]),
                             torch.stack([c[2] for c in cs]) if cs[0][2] is not None else None)
        nk = torch.full((self.K,), n / self.K, dtype=torch.float64, device=x.device)
        best, best_var = None, np.inf
        for _ in range(n_iter):
            dist = self._distances(layers, centres).clamp_min(0.0)
            assign = torch.argmin(dist * nk[None, :], dim=1)  # A step at fixed N_k
            counts = torch.bincount(assign, minlength=self.K)
            for k in torch.nonzero(counts == 0).flatten().tolist():  # re-seed empty clusters
                spare = torch.nonzero(counts[assign] >= 2).flatten()
                far = spare[torch.argmax(dist[spare, assign[spare]])]
                counts[assign[far]] -= 1
                assign[far] = k
                counts[k] = 1
            nk = counts.double()  # N_k update
            centres = self._centres(layers, assign)  # U step
            var = self._variance(layers, assign, self.K)
            if var < best_var:
                best, best_var = assign.clone(), var
        self.assign = best.cpu().numpy()
        self.variance_at_fit = best_var
        return self

    @validate(loss_fn=LossFn(), x=X, y=Y)
    def variance(self, loss_fn, x, y) -> float:
        """Prop. 3.1's variance (trace) of the stratified estimator for the fitted partition at the
        model's current parameters (the paper measures it between refreshes, with the partition fixed)."""
        if self.assign is None:
            raise ValueError("call fit() first.")
        if x.shape[0] != self.assign.size:
            raise ValueError(f"`x` must hold the {self.assign.size} examples the clustering was fitted on; got {x.shape[0]}.")
        self._check(loss_fn, x, y)
        layers = _layer_data(self.model, loss_fn, x, y)
        return self._variance(layers, torch.as_tensor(self.assign, device=x.device), self.K)
