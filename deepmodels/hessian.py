"""Curvature of a network's loss: Hessian-vector products, top eigenvalues, trace, per parameter
block, their spread over batches, and the lecture's comparison of curvature H with gradient noise C
along chosen directions.

* :func:`hvp`: H v by double backpropagation (exact, one extra backward pass).
* :func:`lanczos`: the top eigenpairs of any symmetric operator by thick-restart Lanczos with full
  reorthogonalisation, in torch on the operator's device, so that its cost is its products.
* :func:`top_eigenvalues`, :func:`top_eigenpairs`: the k largest (algebraic) eigenvalues of the
  Hessian by :func:`lanczos` (or ``method="arpack"``: scipy's ``eigsh``, the former default).
* :func:`hutchinson_trace`: tr H = E[v^T H v] with Rademacher v, with its standard error.
* :func:`block_spectra`: top eigenvalues and traces of the diagonal blocks H_bb (per layer, or per
  given group of parameters) and of H, as a Dataset over ``layer``.
* :func:`batch_spread`, :func:`samples_needed`: a curvature or gradient statistic on K independent
  batches, its mean, standard deviation and standard error, and the number of batches (or
  Hutchinson vectors) whose mean reaches a requested relative standard error.
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
import warnings

import numpy as np
import torch
import xarray as xr
from scipy.sparse.linalg import LinearOperator, eigsh

from toymodels._validate import Array
from toymodels.schema import attach_attrs

from . import _validate as V
from . import pergrad, probes
from ._validate import Function, Integer, LossFn, Maybe, Module, Options, Real, Tensor, validate
from .pergrad import X, Y

__all__ = ["flat_params", "hvp", "lanczos", "top_eigenpairs", "top_eigenvalues", "hutchinson_trace", "rayleigh_quotients",
           "block_spectra", "samples_needed", "batch_spread", "STATISTICS"]


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
    """Repeated H v products on one graph (the gradient is built once).

    ``op(v)`` is H v for a flat ``v`` of all P trainable parameters; ``op.block(names)`` the operator
    of the diagonal block H_bb of the parameters ``names`` (a product with a direction that is zero
    outside the block, restricted to the block: ``v_b -> (H [v_b; 0])_b``).
    """

    def __init__(self, model, loss_fn, x, y):
        self.names = [k for k, p in model.named_parameters() if p.requires_grad]
        self.params, self.g = _loss_and_grad(model, loss_fn, x, y)
        self.sizes = [p.numel() for p in self.params]
        self.n = self.g.numel()
        self.count = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.count += 1
        hv = torch.autograd.grad(self.g, self.params, grad_outputs=v.to(self.g.dtype), retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).detach()

    def block(self, names):
        """``(matvec, size)`` of the diagonal block of the parameters ``names``."""
        where = [self.names.index(n) for n in names]
        offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        g_b = torch.cat([self.g[offsets[i]:offsets[i + 1]] for i in where])
        params = [self.params[i] for i in where]

        def matvec(v):
            self.count += 1
            hv = torch.autograd.grad(g_b, params, grad_outputs=v.to(g_b.dtype), retain_graph=True,
                                     allow_unused=True, materialize_grads=True)
            return torch.cat([h.reshape(-1) for h in hv]).detach()

        return matvec, g_b.numel()


def _check_k(model, k):
    P = V.n_trainable(model)
    if k >= P:
        raise ValueError(f"`k` must be an integer in [1, {P - 1}] (fewer than the {P} parameters); got {k}.")
    ncv = _n_lanczos(k, P)
    V.check_bytes("k", 8.0 * P * (ncv + k + 2), f"Lanczos vectors ({ncv + k} of {P} parameters)")


def _n_lanczos(k, n):
    """Lanczos basis size (ARPACK's default for eigsh): max(2k + 1, 20), at most n."""
    return min(n, max(2 * k + 1, 20))


MAX_RESTARTS = 500  # thick restarts of the Lanczos iteration before it gives up (with a warning)


@validate(matvec=Function("a callable v -> A v (A symmetric)"), n=Integer(1, V.MAX_EXACT_INT), k=Integer(1, V.MAX_WIDTH),
          v0=Tensor("float", ndim=1), tol=Real(0, 1), ncv=Maybe(Integer(1, V.MAX_WIDTH)), max_restarts=Integer(0, V.MAX_ITER))
def lanczos(matvec, n: int, k: int, v0: torch.Tensor, *, tol: float = 1e-6, ncv: int | None = None,
            max_restarts: int = MAX_RESTARTS):
    """The ``k`` largest (algebraic) eigenpairs of a symmetric operator by thick-restart Lanczos with
    full reorthogonalisation, all in torch on ``v0``'s device.

    Each step costs one ``matvec``, the three-term recurrence (two vector updates) and one pass of
    classical Gram-Schmidt against the basis (two (j, n) matrix-vector products), with a second
    pass where the first one cancelled much of the vector (Daniel, Gragg, Kaufman and Stewart's
    criterion, |w| < 0.7 |w before|: "twice is enough"); the Rayleigh-Ritz matrix T = Q^T A Q
    (at most ``ncv`` x ``ncv``) is kept and diagonalised in float64.  When the basis is full, the
    ``(ncv + k) // 2`` leading Ritz vectors and the residual direction are kept and the iteration
    continues from them (Wu & Simon's thick restart, which in exact arithmetic equals ARPACK's
    implicit restart with exact shifts).  A Ritz pair (theta, u) of a basis of j vectors has
    residual |A u - theta u| = |beta_j s_j| (beta_j the last Lanczos coefficient, s_j the last entry
    of its eigenvector of T); after every step the iteration stops when each of the top ``k``
    satisfies |beta_j s_j| <= tol * max(|theta|, eps^(2/3) max|theta|) (ARPACK's test; ``tol`` is
    raised to the basis dtype's epsilon).  An invariant subspace (beta = 0) is continued with a fresh random
    direction orthogonal to the basis, so repeated eigenvalues are found.  When the basis holds the
    whole space (n <= ncv) the matrix is formed column by column (n products) and diagonalised.

    Args:
        matvec: ``v -> A v`` for a flat tensor of ``n`` entries (A symmetric).
        n: the operator's size; ``k`` in [1, n] the number of eigenpairs.
        v0: start vector ``(n,)``, not zero; its dtype and device are the basis'.
        tol: relative accuracy of the Ritz residuals; ``ncv``: the basis size (default
            max(2k + 1, 20), in [k + 1, n]); ``max_restarts``: restarts before giving up.

    Returns:
        ``(values, vectors, info)``: float64 numpy ``(k,)`` descending, unit eigenvectors ``(k, n)``
        in ``v0``'s dtype, and ``{"n_matvec", "n_restarts", "residuals", "converged"}``.  Not
        converged after ``max_restarts``: a ``RuntimeWarning`` and the current Ritz pairs.

    References:
        C. Lanczos, "An iteration method for the solution of the eigenvalue problem of linear
        differential and integral operators", J. Res. Nat. Bur. Standards 45, 1950.
        K. Wu and H. Simon, "Thick-restart Lanczos method for large symmetric eigenvalue problems",
        SIAM J. Matrix Anal. Appl. 22(2), 2000, Sections 2-3.
        J. W. Daniel, W. B. Gragg, L. Kaufman, G. W. Stewart, "Reorthogonalization and stable
        algorithms for updating the Gram-Schmidt QR factorization", Math. Comp. 30(136), 1976.
        L. Giraud, J. Langou, M. Rozloznik, "The loss of orthogonality in the Gram-Schmidt
        orthogonalization process", Comput. Math. Appl. 50, 2005 (classical Gram-Schmidt twice).
    """
    if k > n:
        raise ValueError(f"`k` must be an integer in [1, {n}] (at most `n`); got {k}.")
    if tuple(v0.shape) != (n,) or not bool(v0.abs().max() > 0):
        raise ValueError(f"`v0` must be a non-zero vector of shape ({n},); got shape {tuple(v0.shape)}.")
    dtype, device = v0.dtype, v0.device
    m = _n_lanczos(k, n) if ncv is None else ncv
    if not k + 1 <= m <= n and not (m == n == k):
        raise ValueError(f"`ncv` must be an integer in [{k + 1}, {n}] (more than k, at most n); got {m}.")
    eps = torch.finfo(dtype).eps
    tol = max(float(tol), eps)
    if n <= m:  # the basis would hold the whole space: the matrix itself
        A = torch.empty(n, n, dtype=torch.float64, device=V.float64_device(device))
        for i in range(n):
            e = torch.zeros(n, dtype=dtype, device=device)
            e[i] = 1.0
            A[i] = matvec(e)
        theta, S = torch.linalg.eigh(0.5 * (A + A.T).cpu())
        top = torch.arange(n - 1, n - 1 - k, -1)
        info = {"n_matvec": n, "n_restarts": 0, "residuals": np.zeros(k), "converged": True}
        return theta[top].numpy(), S[:, top].T.to(dtype=dtype, device=device).contiguous(), info
    gen = torch.Generator(device="cpu").manual_seed(0)  # fresh directions after an invariant subspace

    Q = torch.empty(m + 1, n, dtype=dtype, device=device)
    Q[0] = v0 / v0.norm()
    T = torch.zeros(m, m, dtype=torch.float64)
    keep = min(m - 1, (m + k) // 2)
    start, n_matvec, beta, converged = 0, 0, None, False
    for restart in range(max_restarts + 1):
        for j in range(start, m):
            w = matvec(Q[j])
            n_matvec += 1
            size = float(w.norm())
            basis = Q[: j + 1]
            local = torch.zeros(j + 1, dtype=dtype, device=device)  # the three-term recurrence first
            local[j] = Q[j] @ w
            w = w - local[j] * Q[j]  # a new tensor (matvec may return its argument): updated in place below
            if j > start:  # (after a restart the kept Ritz vectors couple to Q[start]: left to the full pass)
                local[j - 1] = beta
                w.sub_(beta * Q[j - 1])
            before = w.norm()
            h = basis @ w  # then one pass of classical Gram-Schmidt against the whole basis
            w.addmv_(basis.T, h, alpha=-1)
            h = h + local
            if float(w.norm()) < 0.7 * float(before):  # and a second one where cancellation was large
                h2 = basis @ w
                w.addmv_(basis.T, h2, alpha=-1)
                h = h + h2
            col = h.cpu().double()
            T[: j + 1, j] = col
            T[j, : j + 1] = col
            beta = w.norm()
            if float(beta) <= 10 * eps * size:  # an invariant subspace (or A q = 0)
                beta = torch.zeros((), dtype=dtype, device=device)
                w = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype).to(device)
                for _ in range(2):
                    w = w - (basis @ w) @ basis
                w = w / w.norm()
            else:
                w = w / beta
            Q[j + 1] = w
            size = j + 1
            if size >= k:  # the Ritz pairs of the basis so far (a small float64 eigh per step)
                theta, S = torch.linalg.eigh(T[:size, :size])
                theta, S = theta.flip(0), S.flip(1)  # descending
                residuals = (float(beta) * S[size - 1].abs()).numpy()
                scale = np.maximum(np.abs(theta[:k].numpy()), eps ** (2 / 3) * float(theta.abs().max()))
                converged = bool(np.all(residuals[:k] <= tol * scale))
                if converged:
                    break
        if converged or restart == max_restarts:
            break
        # thick restart: the leading Ritz vectors, then the residual direction
        S_keep = S[:, :keep].to(dtype=dtype, device=device)
        Q[:keep] = S_keep.T @ Q[:m]
        Q[keep] = Q[m]
        T.zero_()
        T[torch.arange(keep), torch.arange(keep)] = theta[:keep]
        start = keep
    if not converged:
        warnings.warn(f"Lanczos did not converge in {max_restarts} restarts ({n_matvec} products): Ritz residuals "
                      f"{residuals[:k]} against tol {tol} x |theta|; returning the current Ritz pairs.",
                      RuntimeWarning, stacklevel=2)
    vectors = S[:, :k].to(dtype=dtype, device=device).T @ Q[:size]
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    info = {"n_matvec": n_matvec, "n_restarts": restart, "residuals": residuals[:k], "converged": converged}
    return theta[:k].numpy(), vectors, info


def _start_vector(n, seed, dtype, device):
    return torch.as_tensor(np.random.default_rng(seed).standard_normal(n), dtype=dtype, device=device)


_METHODS = ("lanczos", "arpack")
_TOP = dict(model=_MODEL, loss_fn=LossFn(), x=X, y=Y, k=Integer(1, V.MAX_WIDTH), tol=Real(0, 1), seed=V.Seed(),
            method=Options(*_METHODS))


@validate(**_TOP)
def top_eigenpairs(model, loss_fn, x, y, k: int = 5, *, tol: float = 1e-6, seed: int = 0, method: str = "lanczos"):
    """The ``k`` largest eigenvalues (descending, float64 numpy) of the Hessian on ``(x, y)`` and their
    unit eigenvectors ``(k, P)`` (torch, the parameters' dtype and device).

    Args:
        k: the number of eigenpairs, in [1, P - 1].
        tol: relative accuracy of the Ritz residuals in [0, 1] (0: machine precision of the
            parameters' dtype for ``"lanczos"``, of float64 for ``"arpack"``).
        seed: the start vector (standard normal, numpy's ``default_rng(seed)``; the same for both
            methods).
        method: ``"lanczos"`` (default: :func:`lanczos`, thick-restart Lanczos in torch on the
            parameters' device, whose cost is its Hessian-vector products) or ``"arpack"``
            (scipy's ``eigsh``, ARPACK's implicitly restarted Lanczos in float64 on the CPU, with a
            transfer per product; the implementation before the torch one).
    """
    pergrad.check_inputs(model, loss_fn, x, y)
    _check_k(model, k)
    op = _HVPOperator(model, loss_fn, x, y)
    device, dtype = op.g.device, op.g.dtype
    if method == "lanczos":
        vals, vecs, _ = lanczos(op, op.n, k, _start_vector(op.n, seed, dtype, device), tol=tol)
        return vals, vecs

    def mv(v):
        return op(torch.as_tensor(np.ravel(v), dtype=dtype, device=device)).cpu().double().numpy()

    v0 = np.random.default_rng(seed).standard_normal(op.n)
    vals, vecs = eigsh(LinearOperator((op.n, op.n), matvec=mv, dtype=np.float64), k=k, which="LA", tol=tol, v0=v0)
    order = np.argsort(vals)[::-1]
    return vals[order], torch.as_tensor(vecs[:, order].T.copy(), dtype=dtype, device=device)


@validate(**_TOP)
def top_eigenvalues(model, loss_fn, x, y, k: int = 5, *, tol: float = 1e-6, seed: int = 0,
                    method: str = "lanczos") -> np.ndarray:
    """The ``k`` largest eigenvalues of the Hessian on ``(x, y)``, descending, by Lanczos
    (:func:`top_eigenpairs`: ``tol`` the relative accuracy, the start vector drawn from ``seed``,
    ``method`` ``"lanczos"`` or ``"arpack"``)."""
    return top_eigenpairs(model, loss_fn, x, y, k, tol=tol, seed=seed, method=method)[0]


def _rademacher(n, gen, dtype, device):
    return (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(device=device, dtype=dtype)


def _hutchinson(matvec, n, n_samples, gen, dtype, device) -> np.ndarray:
    """v^T A v for ``n_samples`` Rademacher vectors v (float64 numpy)."""
    out = torch.empty(n_samples, dtype=torch.float64)
    for i in range(n_samples):
        v = _rademacher(n, gen, dtype, device)
        out[i] = float(V.to_float64(v) @ V.to_float64(matvec(v)))
    return out.numpy()


@validate(model=_MODEL, loss_fn=LossFn(), x=X, y=Y, n_samples=Integer(2, V.MAX_DRAWS), seed=V.Seed())
def hutchinson_trace(model, loss_fn, x, y, n_samples: int = 100, *, seed: int = 0) -> tuple[float, float]:
    """tr H estimated by the mean of v^T H v over ``n_samples`` Rademacher vectors (at most 10**6);
    returns ``(estimate, standard error)``.

    Reference: M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines", Commun. Stat. Simul. Comput. 19(2), 1990.
    """
    pergrad.check_inputs(model, loss_fn, x, y)
    op = _HVPOperator(model, loss_fn, x, y)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    vals = _hutchinson(op, op.n, n_samples, gen, op.g.dtype, op.g.device)
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
    noise = (proj**2).mean(0).cpu().double().numpy()
    ds = xr.Dataset({"curvature": ("mode", curv), "noise_variance": ("mode", noise)},
                    coords={"mode": np.arange(D.shape[0])})
    attach_attrs(ds, model=type(model).__name__.lower(), source="measurement", n_examples=int(x.shape[0]))
    return ds


# --------------------------------------------------------------------------------------------------
# per-block curvature
# --------------------------------------------------------------------------------------------------
class _Blocks(V.Constraint):
    """``"layers"`` (one block per module with trainable parameters), ``None`` (the whole model only)
    or a dict ``{block name: list of parameter names}``."""

    what = "'layers', None or a dict {block name: list of parameter names}"

    def __call__(self, name, value):
        if value is None or (isinstance(value, str) and value == "layers"):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"`{name}` must be {self.what}; got {type(value).__name__}.")
        if not value:
            raise ValueError(f"`{name}` must be {self.what}; got an empty dict.")
        out = {}
        for key, names in value.items():
            if not isinstance(key, str) or key == "total":
                raise ValueError(f"`{name}` must be a dict with string block names other than 'total'; got {key!r}.")
            if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names \
                    or not all(isinstance(n, str) for n in names):
                raise ValueError(f"`{name}` must be a dict of non-empty lists of parameter names; block {key!r} "
                                 f"has {names!r}.")
            out[key] = list(names)
        return out

    def bad_values(self):
        return ["1", 1.5, {}, {"a": []}, {"a": "fc1.weight"}, {"total": ["out.bias"]}, {1: ["out.bias"]},
                {"a": ["no.such.parameter"]}, {"a": ["out.bias"], "b": ["out.bias"]}]


def _resolve_blocks(model, blocks) -> dict:
    """``{block name: [parameter names]}`` (trainable parameters, ``named_parameters`` order)."""
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    if blocks is None:
        return {}
    if blocks == "layers":
        out = {}
        for k in names:
            out.setdefault(k.rsplit(".", 1)[0] if "." in k else "model", []).append(k)
        return out
    seen = {}
    for block, params in blocks.items():
        for p in params:
            if p not in names:
                raise ValueError(f"`blocks` must be a dict of trainable parameter names of the model; block {block!r} "
                                 f"has {p!r} (known: {names}).")
            if p in seen:
                raise ValueError(f"`blocks` must be a dict of disjoint blocks; {p!r} is in blocks {seen[p]!r} and {block!r}.")
            seen[p] = block
    return {block: [n for n in names if n in set(params)] for block, params in blocks.items()}


@validate(model=_MODEL, loss_fn=LossFn(), x=X, y=Y, k=Integer(0, V.MAX_WIDTH), blocks=_Blocks(),
          n_samples=Integer(0, V.MAX_DRAWS), tol=Real(0, 1), seed=V.Seed())
def block_spectra(model, loss_fn, x, y, k: int = 5, *, blocks="layers", n_samples: int = 100, tol: float = 1e-6,
                  seed: int = 0) -> xr.Dataset:
    """Top eigenvalues and trace of the Hessian's diagonal blocks H_bb (per layer, or per given group
    of parameters) and of the whole Hessian, on the batch ``(x, y)``.

    H_bb is the Hessian of the loss in the block's parameters with the others held fixed; its
    products are those of H with a direction that is zero outside the block, restricted to the
    block (one double-backward pass each).  Eigenvalues by :func:`lanczos` (the exact matrix for a
    block of at most max(2k + 1, 20) parameters), traces by Hutchinson's estimator with
    ``n_samples`` Rademacher vectors per block (restricted to the block) and for the whole model.
    The blocks' traces sum to tr H when the blocks cover every parameter (in expectation; the
    estimates are independent draws).

    Args:
        k: eigenvalues per block (0: none); a block with fewer than ``k`` parameters has NaN for the
            eigenvalues it does not have; the total needs ``k`` < P.
        blocks: ``"layers"`` (one block per module with trainable parameters, named as in
            :func:`deepmodels.probes.gradient_stats`), a dict ``{block name: [parameter names]}``
            (disjoint; parameters left out belong to no block) or ``None`` (the total only).
        n_samples: Hutchinson vectors per block (0: no trace; else at least 2, at most 10**6).
        tol: Lanczos' relative accuracy; ``seed``: the start vectors and the Rademacher vectors.

    Returns:
        Dataset over ``layer`` (the blocks, then ``"total"``) and ``mode`` (0..k-1, descending):
        ``eigenvalue`` (layer, mode), ``hessian_trace`` and ``hessian_trace_sem`` (layer; with
        ``n_samples`` > 0), ``n_params`` (layer); ``source="measurement"``.

    References:
        Z. Yao, A. Gholami, K. Keutzer, M. Mahoney, "PyHessian: Neural Networks Through the Lens of
        the Hessian", IEEE BigData 2020, Sections 3.1-3.2 (top eigenvalues and trace, per block).
    """
    pergrad.check_inputs(model, loss_fn, x, y)
    if n_samples == 1:
        raise ValueError("`n_samples` must be 0 (no trace) or an integer in [2, 1000000]; got 1.")
    if k > 0:
        _check_k(model, k)
    groups = _resolve_blocks(model, blocks)
    op = _HVPOperator(model, loss_fn, x, y)
    dtype, device = op.g.dtype, op.g.device
    rows = [(name, *op.block(params)) for name, params in groups.items()] + [("total", op, op.n)]
    eig = np.full((len(rows), k), np.nan)
    trace, sem = np.empty(len(rows)), np.empty(len(rows))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for i, (_, matvec, n) in enumerate(rows):
        if k > 0:
            kk = min(k, n)
            eig[i, :kk] = lanczos(matvec, n, kk, _start_vector(n, seed + i, dtype, device), tol=tol)[0]
        if n_samples:
            vals = _hutchinson(matvec, n, n_samples, gen, dtype, device)
            trace[i], sem[i] = vals.mean(), vals.std(ddof=1) / math.sqrt(n_samples)
    layer = [r[0] for r in rows]
    ds = xr.Dataset({"eigenvalue": (("layer", "mode"), eig), "n_params": ("layer", np.array([float(r[2]) for r in rows]))},
                    coords={"layer": layer, "mode": np.arange(k)})
    if n_samples:
        ds["hessian_trace"] = ("layer", trace)
        ds["hessian_trace_sem"] = ("layer", sem)
    attach_attrs(ds, model=type(model).__name__.lower(), source="measurement", n_examples=int(x.shape[0]),
                 n_samples=n_samples, tol=tol, seed=seed)
    return ds


# --------------------------------------------------------------------------------------------------
# spread over batches, and the number of samples a relative standard error needs
# --------------------------------------------------------------------------------------------------
def _noncentrality(t, df, p):
    """The delta with P(T <= t) = p for T noncentral t(df, delta) (the cdf falls as delta grows)."""
    from scipy import optimize, special

    delta = float(special.nctdtrinc(df, p, t))
    if math.isfinite(delta):
        return delta
    f = lambda d: special.nctdtr(df, d, t) - p  # noqa: E731  (bisection where the inverse fails)
    lo, hi, width = t - 1.0, t + 1.0, 1.0 + abs(t)
    while f(lo) < 0:
        lo, width = lo - width, 2 * width
    width = 1.0 + abs(t)
    while f(hi) > 0:
        hi, width = hi + width, 2 * width
    return optimize.brentq(f, lo, hi, xtol=1e-9 * max(1.0, abs(t)))


@validate(values=Array(ndim=1, min_size=2, what="a 1-D array of at least 2 finite reals"),
          rel_se=Real(0, math.inf, low_open=True, high_open=True), level=Real(0, 1, low_open=True, high_open=True))
def samples_needed(values, rel_se: float = 0.1, *, level: float = 0.9) -> dict:
    """Mean, spread and the number of independent samples whose mean has a relative standard error
    ``rel_se``, from K >= 2 samples ``values`` of a statistic (one per batch, or per probe vector).

    With the sample mean m and standard deviation s (ddof 1), the mean of n samples has standard
    error s / sqrt(n), so n = ceil((s / (rel_se |m|))^2) (at least 1; inf if m = 0).  n is itself
    estimated from the K samples; its interval at ``level`` inverts the noncentral t distribution
    of sqrt(K) m / s (exact for normally distributed samples, approximate otherwise): with
    delta_lo, delta_hi the noncentrality parameters that put sqrt(K)|m|/s at the upper and lower
    (1 - level)/2 tails, n lies in [K / (rel_se delta_hi)^2, K / (rel_se delta_lo)^2] (inf when
    delta_lo <= 0: the sign of the mean is not resolved).

    Returns:
        ``{"mean", "sd", "sem", "n", "n_low", "n_high", "k"}`` (floats; ``k`` = K).

    Reference: N. L. Johnson and B. L. Welch, "Applications of the non-central t-distribution",
    Biometrika 31(3/4), 1940 (confidence limits of the coefficient of variation).
    """
    K = values.size
    mean, sd = float(values.mean()), float(values.std(ddof=1))
    out = {"mean": mean, "sd": sd, "sem": sd / math.sqrt(K), "k": float(K)}
    if sd == 0.0 and mean != 0.0:
        return {**out, "n": 1.0, "n_low": 1.0, "n_high": 1.0}
    if mean == 0.0:
        return {**out, "n": math.inf, "n_low": math.inf if sd == 0.0 else 1.0, "n_high": math.inf}
    t = math.sqrt(K) * abs(mean) / sd
    d_lo = _noncentrality(t, K - 1, 1 - (1 - level) / 2)
    d_hi = _noncentrality(t, K - 1, (1 - level) / 2)

    def count(delta):
        return math.inf if delta <= 0 else float(max(1, math.ceil(K / (rel_se * delta) ** 2)))

    return {**out, "n": float(max(1, math.ceil((sd / (rel_se * abs(mean))) ** 2))), "n_low": count(d_hi),
            "n_high": count(d_lo)}


_GRADIENT_STATS = ("grad_norm_sq", "trace_cov", "grad_var", "grad_nvar", "snr", "noise_scale")
STATISTICS = ("top_eigenvalue", "hessian_trace") + _GRADIENT_STATS


class _Examples(V.Constraint):
    """A :class:`deepmodels.data.Dataset` (its training split) or a pair ``(x, y)`` of tensors."""

    what = "a deepmodels.data.Dataset or a pair (x, y) of tensors"

    def __call__(self, name, value):
        from .data import Dataset

        if isinstance(value, Dataset):
            return value.x_train, value.y_train
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise TypeError(f"`{name}` must be {self.what}; got {type(value).__name__}.")
        x, y = X(name, value[0]), Y(name, value[1])
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"`{name}` must be a pair (x, y) with as many targets as examples; got {x.shape[0]} "
                             f"examples and {y.shape[0]} targets.")
        return x, y

    def bad_values(self):
        return [None, "1", torch.zeros(4, 8), (torch.zeros(4, 8),), (torch.zeros(4, 8), torch.zeros(3, dtype=torch.int64))]


def _per_layer(value, name) -> dict:
    """A statistic's value on one batch as ``{layer: float}`` (a number is the ``"total"``)."""
    if isinstance(value, xr.DataArray):
        if value.dims != ("layer",):
            raise ValueError(f"`statistic` must return a number, a dict or a DataArray over `layer`; got dims "
                             f"{value.dims} from {name}.")
        return {str(k): float(v) for k, v in zip(value.layer.values, value.values)}
    if isinstance(value, dict):
        return {str(k): float(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        value = value.item()
    return {"total": float(value)}


@validate(model=_MODEL, loss_fn=LossFn(), data=_Examples(),
          statistic=V.AnyOf(Options(*STATISTICS), Function("statistic(model, loss_fn, x, y) -> float or dict"),
                            what=f"one of {STATISTICS} or a callable statistic(model, loss_fn, x, y)"),
          n_batches=Integer(2, V.MAX_DRAWS), batch_size=Integer(1, V.MAX_WIDTH), seed=V.Seed(),
          rel_se=Real(0, math.inf, low_open=True, high_open=True), level=Real(0, 1, low_open=True, high_open=True),
          blocks=_Blocks(), n_samples=Integer(2, V.MAX_DRAWS), tol=Real(0, 1))
def batch_spread(model, loss_fn, data, statistic, *, n_batches: int = 10, batch_size: int = 128, seed: int = 0,
                 rel_se: float = 0.1, level: float = 0.9, blocks=None, n_samples: int = 20,
                 tol: float = 1e-4) -> xr.Dataset:
    """How much a curvature or gradient statistic varies from batch to batch, and how many batches
    (or Hutchinson vectors) its mean needs for a relative standard error ``rel_se``.

    The statistic is evaluated on ``n_batches`` (K) independent batches of ``batch_size`` examples,
    each drawn uniformly without replacement from ``data`` with a generator seeded by ``seed``
    (batches may share examples; they are independent draws).  Per layer: the mean over batches,
    the standard deviation sd (ddof 1), the standard error sd / sqrt(K), and the number of batches
    n = ceil((sd / (rel_se |mean|))^2) whose mean has relative standard error ``rel_se``, with its
    interval at ``level`` (:func:`samples_needed`: estimated from the K batches, exact for normal
    per-batch values).

    Args:
        data: a :class:`deepmodels.data.Dataset` (its training split) or a pair ``(x, y)``.
        statistic: ``"top_eigenvalue"`` (:func:`block_spectra` with k = 1), ``"hessian_trace"``
            (:func:`block_spectra`, Hutchinson with ``n_samples`` vectors per batch), one of
            :func:`deepmodels.probes.gradient_stats`' ``"grad_norm_sq"``, ``"trace_cov"``,
            ``"grad_var"``, ``"grad_nvar"``, ``"snr"``, ``"noise_scale"`` (per layer and total), or
            a callable ``statistic(model, loss_fn, x, y)`` returning a number (the ``"total"``), a
            dict ``{layer: number}`` or a DataArray over ``layer``.
        blocks: for the curvature statistics: ``None`` (the whole model), ``"layers"`` or a dict of
            parameter groups (:func:`block_spectra`).
        n_samples: Hutchinson vectors per batch for ``"hessian_trace"``; ``tol``: Lanczos' accuracy.

    Returns:
        Dataset over ``layer`` (and ``draw``, the K batches): ``spread_draws`` (draw, layer) the
        values per batch, ``spread_mean``, ``spread_sd``, ``spread_sem``, ``samples_needed``,
        ``samples_needed_low``, ``samples_needed_high``; for ``"hessian_trace"`` also
        ``probe_sd`` (the standard deviation of one probe's v^T H v, pooled over the batches) and
        ``probes_needed`` (Hutchinson vectors for ``rel_se`` on one batch).  Attributes name the
        statistic, K, the batch size, ``rel_se``, ``level`` and the seed.  A batch on which the
        statistic is not finite makes that layer's results ``inf``, with the reason in
        ``attrs["diverged"]``.

    Example (PyHessian issue 5 saw the top eigenvalue range from 159 to 1587 across batches)::

        ds = batch_spread(model, F.cross_entropy, data, "top_eigenvalue", n_batches=10, batch_size=128)
        ds.samples_needed.sel(layer="total")  # batches for a 10% standard error of the mean
    """
    x_all, y_all = data
    N = x_all.shape[0]
    if batch_size > N:
        raise ValueError(f"`batch_size` must be at most the number of examples {N}; got {batch_size}.")
    pergrad.check_inputs(model, loss_fn, x_all[:batch_size], y_all[:batch_size],
                         min_batch=2 if statistic in _GRADIENT_STATS else 1)
    _resolve_blocks(model, blocks)  # unknown or shared parameter names are refused before any work
    gen = torch.Generator(device="cpu").manual_seed(seed)
    draws, probe_var = [], []
    for b in range(n_batches):
        idx = torch.randperm(N, generator=gen)[:batch_size].to(x_all.device)
        x, y = x_all[idx], y_all[idx]
        if statistic == "top_eigenvalue":
            ds = block_spectra(model, loss_fn, x, y, 1, blocks=blocks, n_samples=0, tol=tol, seed=seed + b)
            draws.append(_per_layer(ds.eigenvalue.isel(mode=0), statistic))
        elif statistic == "hessian_trace":
            ds = block_spectra(model, loss_fn, x, y, 0, blocks=blocks, n_samples=n_samples, seed=seed + b)
            draws.append(_per_layer(ds.hessian_trace, statistic))
            probe_var.append(ds.hessian_trace_sem.values ** 2 * n_samples)
        elif statistic in _GRADIENT_STATS:
            draws.append(_per_layer(probes.gradient_stats(model, loss_fn, x, y)[statistic], statistic))
        else:
            draws.append(_per_layer(statistic(model, loss_fn, x, y), getattr(statistic, "__name__", "statistic")))
        if list(draws[-1]) != list(draws[0]):
            raise ValueError(f"`statistic` must return the same layers on every batch; got {list(draws[0])} and "
                             f"{list(draws[-1])}.")
    layers = list(draws[0])
    values = np.array([[d[name] for name in layers] for d in draws])  # (K, L)
    keys = ("mean", "sd", "sem", "n", "n_low", "n_high")
    out = {key: np.full(len(layers), np.inf) for key in keys}
    bad = []
    for j, name in enumerate(layers):
        if not np.all(np.isfinite(values[:, j])):
            bad.append(name)
            continue
        res = samples_needed(values[:, j], rel_se, level=level)
        for key in keys:
            out[key][j] = res[key]
    names = dict(mean="spread_mean", sd="spread_sd", sem="spread_sem", n="samples_needed", n_low="samples_needed_low",
                 n_high="samples_needed_high")
    ds = xr.Dataset({names[key]: ("layer", out[key]) for key in keys}, coords={"layer": layers, "draw": np.arange(n_batches)})
    ds["spread_draws"] = (("draw", "layer"), np.where(np.isfinite(values), values, np.inf))
    if probe_var:
        sd = np.sqrt(np.mean(probe_var, axis=0))
        with np.errstate(divide="ignore", invalid="ignore"):
            need = np.where(out["mean"] != 0, np.ceil((sd / (rel_se * np.abs(out["mean"]))) ** 2), np.inf)
        ds["probe_sd"] = ("layer", sd)
        ds["probes_needed"] = ("layer", np.maximum(need, 1.0))
    name = statistic if isinstance(statistic, str) else getattr(statistic, "__name__", "callable")
    attach_attrs(ds, model=type(model).__name__.lower(), source="measurement", statistic=name, n_batches=n_batches,
                 batch_size=batch_size, seed=seed, rel_se=rel_se, level=level,
                 samples_needed_note=f"estimated from {n_batches} batches; interval exact for normal per-batch values")
    if bad:
        ds.attrs["diverged"] = f"the statistic is not finite on some batch for layers {bad}"
    return ds
