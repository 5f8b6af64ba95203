"""Estimators of the mean gradient from per-example gradients, with their exact variances
(Faghri et al. 2020, Sec. 3 and 4).  Framework-agnostic numpy: the deep-net probe passes
its per-example gradients here too.

Input: ``G`` ``(N, P)``, the gradients g_i of the N training examples at the current parameters;
their mean g is what every estimator below estimates without bias.  "Variance" is the trace of the
estimator's covariance (Prop. 3.1's V); ``grad_var`` divides it by P (the paper's "average
variance"), and ``grad_nvar`` = V / E|g_hat|^2 = V / (|g|^2 + V) (its "normalized variance",
:mod:`toymodels.stats`).

* SG-B: the mean of B examples drawn uniformly with replacement, V = tr Sigma / B with
  Sigma = 1/N sum_i (g_i - g)(g_i - g)^T; SG-2B halves it.
* SVRG (Johnson and Zhang 2013): with gradients G~ at a snapshot and their mean g~,
  g_hat = 1/B sum_b (g_{i_b} - g~_{i_b}) + g~, V = tr Cov(g_i - g~_i) / B.
* Gradient clustering, GC (Sec. 3): a partition of the examples into K clusters of sizes N_k, one
  example drawn uniformly from each, g_hat = 1/N sum_k N_k g_{j,k}.  Prop. 3.1: unbiased with
  V = N^-2 sum_k N_k^2 V_k, V_k the within-cluster variance.  The partition minimising V is a
  weighted clustering (Eq. 2), found by Alg. 1-3: A step a_i = argmin_k N_k |C_k - g_i|^2 at fixed
  N_k, N_k update, U step C_k = mean of cluster k.

References:
    F. Faghri, D. Duvenaud, D. J. Fleet and J. Ba, "A Study of Gradient Variance in Deep Learning",
    2020.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ._validate import Array, Instance, Integer, Maybe, check_bytes, check_int, validate
from .schema import attach_attrs
from .stats import gradient_statistics

__all__ = [
    "sg_variance",
    "svrg_variance",
    "gc_variance",
    "gradient_clustering",
    "sample_sg",
    "sample_svrg",
    "sample_gc",
    "estimator_stats",
]


_GRADS = Array(2, what="a non-empty 2-D array (examples, parameters)")
_BATCH = Integer(1, 2**40)
_SEED = Integer(0, 2**63 - 1)
_LABELS = Instance(np.ndarray, list, tuple, what="integer cluster labels (an array)")
_RNG = Instance(np.random.Generator, what="a numpy.random.Generator")
_MAX_SAMPLES = 10**7


def _check_draws(n_samples, batch_size, n_params):
    check_bytes("n_samples", 8.0 * n_samples * (batch_size + 1) * n_params,
                what=f"{n_samples} draws x {batch_size} examples x {n_params} parameters")


def _check_grads(G, name="G"):
    G = np.asarray(G, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] == 0 or G.shape[1] == 0:
        raise ValueError(f"`{name}` must be a non-empty 2-D array (examples, parameters); got shape {G.shape}.")
    if not np.all(np.isfinite(G)):
        raise ValueError(f"`{name}` must be finite.")
    return G


def _check_assign(assign, n):
    a = np.asarray(assign)
    if a.shape != (n,) or a.dtype.kind not in "iu" or np.any(a < 0):
        raise ValueError(f"`assign` must be non-negative integer cluster labels of shape ({n},); got {a.shape}, {a.dtype}.")
    return a.astype(np.int64)


def _trace_cov(G):
    """tr of the population covariance of the rows of G."""
    return float(np.sum((G - G.mean(axis=0)) ** 2) / G.shape[0])


@validate(G=_GRADS, batch_size=_BATCH)
def sg_variance(G, batch_size: int) -> float:
    """V of SG-B: tr Sigma / B (B examples drawn uniformly with replacement)."""
    G = _check_grads(G)
    bs = check_int("batch_size", batch_size, low=1)
    return _trace_cov(G) / bs


@validate(G=_GRADS, G_snapshot=_GRADS, batch_size=_BATCH)
def svrg_variance(G, G_snapshot, batch_size: int) -> float:
    """V of SVRG with the control variate of ``G_snapshot`` (same shape as G): tr Cov(g_i - g~_i) / B."""
    G = _check_grads(G)
    S = _check_grads(G_snapshot, "G_snapshot")
    if S.shape != G.shape:
        raise ValueError(f"`G_snapshot` must have the shape of `G` {G.shape}; got {S.shape}.")
    return _trace_cov(G - S) / check_int("batch_size", batch_size, low=1)


@validate(G=_GRADS, assign=_LABELS)
def gc_variance(G, assign) -> float:
    """Prop. 3.1: V = N^-2 sum_k N_k^2 V_k for one example drawn from each cluster."""
    G = _check_grads(G)
    a = _check_assign(assign, G.shape[0])
    total = 0.0
    for k in np.unique(a):
        Gk = G[a == k]
        total += Gk.shape[0] ** 2 * _trace_cov(Gk)
    return total / G.shape[0] ** 2


def _objective(G, a, K):
    """Eq. (2): sum_k N_k sum_{i in k} |C_k - g_i|^2 (= N^2 times GC's variance)."""
    obj = 0.0
    for k in range(K):
        Gk = G[a == k]
        if Gk.shape[0]:
            obj += Gk.shape[0] * float(np.sum((Gk - Gk.mean(axis=0)) ** 2))
    return obj


@validate(G=_GRADS, n_clusters=Integer(1, 2**40), n_iter=Integer(1, 10**5), seed=_SEED)
def gradient_clustering(G, n_clusters: int, *, n_iter: int = 10, seed: int = 0):
    """Weighted clustering of the gradients (Alg. 1-3 of Faghri et al.).

    Starts from K distinct examples chosen at random as centres with N_k = N / K, then alternates
    the A step (at fixed N_k), the N_k update and the U step ``n_iter`` times.  An emptied cluster is
    re-seeded with the example farthest from its centre.  A-U updates need not decrease the objective
    (Sec. 3), so the best partition seen is returned.  ``n_iter`` is at most 10^5.

    Returns:
        ``(assign, objective)``: ``(N,)`` int labels in [0, K) and Eq. (2)'s value for them.
    """
    G = _check_grads(G)
    n = G.shape[0]
    K = check_int("n_clusters", n_clusters, low=1, high=n)
    check_bytes("n_clusters", 8.0 * n * K * 2, what=f"{n} examples x {K} cluster distances")
    n_iter = check_int("n_iter", n_iter, low=1)
    rng = np.random.default_rng(check_int("seed", seed, low=0))
    C = G[rng.choice(n, size=K, replace=False)].copy()
    Nk = np.full(K, n / K)
    sq = np.sum(G**2, axis=1)
    best_a, best_obj = None, np.inf
    for _ in range(n_iter):
        D = sq[:, None] - 2.0 * G @ C.T + np.sum(C**2, axis=1)[None, :]  # |C_k - g_i|^2
        a = np.argmin(np.maximum(D, 0.0) * Nk[None, :], axis=1)  # A step
        Nk = np.bincount(a, minlength=K).astype(np.float64)  # N_k update
        empty = np.flatnonzero(Nk == 0)
        if empty.size:  # re-seed each empty cluster with the farthest example of a cluster of >= 2
            order = np.argsort(-np.sum((G - C[a]) ** 2, axis=1))
            j = 0
            for k in empty:
                while Nk[a[order[j]]] < 2:
                    j += 1
                i = order[j]
                Nk[a[i]] -= 1
                a[i] = k
                Nk[k] = 1
                j += 1
        C = np.stack([G[a == k].mean(axis=0) for k in range(K)])  # U step
        obj = _objective(G, a, K)
        if obj < best_obj:
            best_a, best_obj = a.copy(), obj
    return best_a, best_obj


# --------------------------------------------------------------------------------------------------
# sampling (as the paper measures): draws of each estimator
# --------------------------------------------------------------------------------------------------
@validate(G=_GRADS, batch_size=_BATCH, n_samples=Integer(1, _MAX_SAMPLES), rng=_RNG)
def sample_sg(G, batch_size: int, n_samples: int, rng) -> np.ndarray:
    """``(n_samples, P)`` draws of SG-B (with replacement)."""
    G = _check_grads(G)
    bs = check_int("batch_size", batch_size, low=1)
    _check_draws(n_samples, bs, G.shape[1])
    idx = rng.integers(0, G.shape[0], size=(check_int("n_samples", n_samples, low=1), bs))
    return G[idx].mean(axis=1)


@validate(G=_GRADS, G_snapshot=_GRADS, batch_size=_BATCH, n_samples=Integer(1, _MAX_SAMPLES), rng=_RNG)
def sample_svrg(G, G_snapshot, batch_size: int, n_samples: int, rng) -> np.ndarray:
    """``(n_samples, P)`` draws of SVRG."""
    _check_draws(n_samples, batch_size, np.shape(G)[1])
    G = _check_grads(G)
    S = _check_grads(G_snapshot, "G_snapshot")
    if S.shape != G.shape:
        raise ValueError(f"`G_snapshot` must have the shape of `G` {G.shape}; got {S.shape}.")
    bs = check_int("batch_size", batch_size, low=1)
    idx = rng.integers(0, G.shape[0], size=(check_int("n_samples", n_samples, low=1), bs))
    return (G[idx] - S[idx]).mean(axis=1) + S.mean(axis=0)


@validate(G=_GRADS, assign=_LABELS, n_samples=Integer(1, _MAX_SAMPLES), rng=_RNG)
def sample_gc(G, assign, n_samples: int, rng) -> np.ndarray:
    """``(n_samples, P)`` draws of the stratified estimator, Eq. (1)."""
    _check_draws(n_samples, 1, np.shape(G)[1])
    G = _check_grads(G)
    a = _check_assign(assign, G.shape[0])
    n_samples = check_int("n_samples", n_samples, low=1)
    out = np.zeros((n_samples, G.shape[1]))
    for k in np.unique(a):
        members = np.flatnonzero(a == k)
        pick = members[rng.integers(0, members.size, size=n_samples)]
        out += members.size * G[pick]
    return out / G.shape[0]


@validate(G=_GRADS, batch_size=_BATCH, assign=Maybe(_LABELS), G_snapshot=Maybe(_GRADS), n_samples=Integer(0, _MAX_SAMPLES),
          seed=_SEED)
def estimator_stats(G, batch_size: int, *, assign=None, G_snapshot=None, n_samples: int = 0,
                    seed: int = 0) -> xr.Dataset:
    """Average variance and normalized variance of SG-B, SG-2B, SVRG and GC at one snapshot.

    Args:
        G: ``(N, P)`` per-example gradients.
        batch_size: B (GC should use B clusters to be comparable, as in the paper).
        assign: GC's cluster labels (e.g. from :func:`gradient_clustering`); GC left out if None.
        G_snapshot: per-example gradients at SVRG's snapshot; SVRG left out if None.
        n_samples: if > 0, also the empirical variance from that many draws of each estimator
            (``grad_var_sampled``), as the paper measures it.
        seed: seed of the draws.

    Returns:
        Dataset over ``estimator`` with ``grad_var``, ``grad_nvar``, ``snr`` (exact) and, if
        sampled, ``grad_var_sampled``; attr ``grad_norm_sq`` = |g|^2.
    """
    G = _check_grads(G)
    bs = check_int("batch_size", batch_size, low=1)
    rng = np.random.default_rng(check_int("seed", seed, low=0))
    est = {"sg_b": (sg_variance(G, bs), lambda m: sample_sg(G, bs, m, rng)),
           "sg_2b": (sg_variance(G, 2 * bs), lambda m: sample_sg(G, 2 * bs, m, rng))}
    if G_snapshot is not None:
        est["svrg"] = (svrg_variance(G, G_snapshot, bs), lambda m: sample_svrg(G, G_snapshot, bs, m, rng))
    if assign is not None:
        est["gc"] = (gc_variance(G, assign), lambda m: sample_gc(G, assign, m, rng))
    names = list(est)
    V = np.array([est[k][0] for k in names])
    g2 = float(np.sum(G.mean(axis=0) ** 2))
    st = gradient_statistics(g2, V, G.shape[1], 1.0)
    data = {k: ("estimator", np.asarray(st[k], dtype=np.float64)) for k in ("grad_var", "grad_nvar", "snr")}
    if n_samples:
        n_samples = check_int("n_samples", n_samples, low=2)
        _check_draws(n_samples, 2 * bs, G.shape[1])
        sampled = []
        for k in names:
            draws = est[k][1](n_samples)
            sampled.append(float(np.sum(draws.var(axis=0, ddof=1))) / G.shape[1])
        data["grad_var_sampled"] = ("estimator", np.array(sampled))
    ds = xr.Dataset(data, coords={"estimator": names})
    attach_attrs(ds, model="estimators", source="exact", batch_size=float(bs), grad_norm_sq=g2,
                 n_examples=G.shape[0], n_params=G.shape[1])
    return ds
