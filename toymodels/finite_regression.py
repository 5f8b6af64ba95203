"""Linear regression on a fixed data set: SGD with and without replacement, and randomized Kaczmarz.

The data are rows x_r of X ``(n, d)`` with labels y_r; the loss is L(w) = 1/(2n) sum_r (x_r.w - y_r)^2.
With the least-squares solution w_ls (minimum norm) and its residuals rho = y - X w_ls
(X^T rho = 0), the error e = w - w_ls has excess loss e^T Sigma e / 2, Sigma = X^T X / n.  The
per-example gradient is g_r = x_r (x_r.e - rho_r): its noise vanishes at e = 0 exactly when the data
are interpolated (rho = 0), the lecture's "interpolation regime" where SGD converges exponentially.

Exact expected dynamics, batches of B rows drawn uniformly with replacement (the first and second
moments m = E e, S = E e e^T close because rows are drawn independently of e):

    m' = (I - a Sigma) m,
    S' = (I - a Sigma) S (I - a Sigma) + a^2 / B [ 1/n sum_r c_r x_r x_r^T - Sigma S Sigma ],
    c_r = x_r^T S x_r - 2 rho_r x_r^T m + rho_r^2,

O(n d^2) per step.  With weight decay wd (PyTorch's coupled L2 decay: the update's gradient is
g + wd w, the reported loss stays the unregularised excess loss above) the mean step is
e' = J e + c with J = (1 - a wd) I - a Sigma and c = -a wd w_ls, the noise unchanged, so

    m' = J m + c,    S' = J S J + J m c^T + c m^T J + c c^T + a^2 / B [ ... as above ... ];

the iterates settle around the ridge solution (Sigma + wd I)^-1 Sigma w_ls, whose excess loss is a
floor above zero that targets below it never reach.  Randomized Kaczmarz (the lecture's proximal update
w <- argmin_{x_r.w = y_r} |w - w_prev|^2, i.e. w <- w + (y_r - x_r.w) x_r / |x_r|^2, row r drawn with
probability p_r, by default |x_r|^2 / |X|_F^2 as in Strohmer and Vershynin 2009) moves e to
P_r e + rho_r x_r / |x_r|^2 with the projection P_r = I - u_r u_r^T, u_r = x_r / |x_r|, so

    m' = sum_r p_r (P_r m + rho_r x_r / |x_r|^2),
    S' = sum_r p_r [P_r S P_r + rho_r / |x_r| (P_r m u_r^T + u_r m^T P_r) + rho_r^2 / |x_r|^2 u_r u_r^T].

For a consistent system (rho = 0) and w_0 in the row space, E|e_k|^2 <= (1 - 1/kappa^2)^k |e_0|^2
with kappa = |X|_F / sigma_min(X) (sigma_min the smallest non-zero singular value).

References:
    R. Grosse, "CSC 2541: Neural Net Training Dynamics", Lecture 7 "Stochasticity and Parallelism",
    University of Toronto, Winter 2022.
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from ._args import BATCH_SIZE, LR, MAYBE_LR, MC_STEPS, N_RUNS, OPTIMIZER, SEED, STEP, TARGET, WEIGHT_DECAY
from ._validate import (Array, Boolean, Integer, Maybe, Options, Real, Steps, check_bytes, check_int, check_real,
                        check_steps, validate)
from .montecarlo import mc_divergence, simulate_finite
from .nqm import check_batch_size
from .optimizers import SGD
from .schedules import Constant
from .schema import attach_attrs

__all__ = ["FiniteLinearRegression"]

MAX_CURVE_STEPS = 10**7  # exact curves step the d x d moments one update at a time
MAX_OPERATOR_DIM = 32  # steps_to_target / loss_at_step build the (d(d+1)/2 + d + 1)-state moment map
_SEARCH_DEFAULT = 10**6  # default max_steps of steps_to_target
_BLOCK = 1024  # steps_to_target evaluates the loss at this many steps per matrix product


def _check_data(X, y):
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"`X` must be a non-empty 2-D array (n examples, d features); got shape {X.shape}.")
    if y.shape != (X.shape[0],):
        raise ValueError(f"`y` must have shape ({X.shape[0]},) to match `X`; got {y.shape}.")
    if not np.all(np.isfinite(X)):
        raise ValueError("`X` must be finite.")
    if not np.all(np.isfinite(y)):
        raise ValueError("`y` must be finite.")
    if np.any(np.sum(X**2, axis=1) == 0):
        raise ValueError("`X` must not have all-zero rows (they carry no information and Kaczmarz divides by |x_r|).")
    return X.copy(), y.copy()


def _mc_dataset(loss, sq, ks):
    """Means over runs (axis 1) and their standard errors; ``inf`` from the first recorded step where
    a run has overflowed (never NaN).  Returns ``(dataset, reason)``, reason "" without divergence."""
    n = loss.shape[1]
    first, reason = mc_divergence(ks, loss, sq)
    with np.errstate(invalid="ignore", over="ignore"):
        ds = xr.Dataset(
            {"loss": ("step", loss.mean(axis=1)), "loss_sem": ("step", loss.std(axis=1, ddof=1) / math.sqrt(n)),
             "sq_error": ("step", sq.mean(axis=1)), "sq_error_sem": ("step", sq.std(axis=1, ddof=1) / math.sqrt(n))},
            coords={"step": ks},
        )
    for v in ds.data_vars.values():
        if first is not None:
            v.values[first:] = np.inf
        v.values[np.isnan(v.values)] = np.inf
    return ds, reason


class FiniteLinearRegression:
    """A fixed data set: exact expected SGD (batches with replacement), Monte Carlo with and without
    replacement, and randomized Kaczmarz.

    Args:
        X: ``(n, d)`` inputs, finite, no zero rows.
        y: ``(n,)`` labels, finite.
        w0: starting weights, scalar or ``(d,)`` (default 0, which lies in the row space).
    """

    model_name = "linreg_finite"
    families = ("sgd",)  # what :func:`toymodels.sweep.batch_size_sweep` can tune here

    @validate(X=Array(2, what="a non-empty 2-D array (n examples, d features)"), y=Array(1), w0=Array((0, 1)))
    def __init__(self, X, y, w0=0.0):
        check_bytes("X", 8.0 * np.shape(X)[1] ** 2 * 3, what=f"d x d moment matrices, d = {np.shape(X)[1]}")
        self.X, self.y = _check_data(X, y)
        n, d = self.X.shape
        w0 = np.asarray(w0, dtype=np.float64)
        if w0.ndim == 0:
            w0 = np.full(d, float(w0))
        if w0.shape != (d,) or not np.all(np.isfinite(w0)):
            raise ValueError(f"`w0` must be a finite scalar or have shape ({d},); got shape {w0.shape}.")
        self.w0 = w0
        self.w_ls = np.linalg.lstsq(self.X, self.y, rcond=None)[0]
        self.residual = self.y - self.X @ self.w_ls
        self.sigma = self.X.T @ self.X / n
        self.row_sq = np.sum(self.X**2, axis=1)

    @classmethod
    @validate(n=Integer(1, 2**40), d=Integer(1, 2**40), spectrum=Maybe(Array(1, low=0.0)),
              noise_std=Real(0.0, math.inf, high_open=True), seed=SEED)
    def gaussian(cls, n: int, d: int, *, spectrum=None, noise_std: float = 0.0, seed: int = 0):
        """Synthetic data: x ~ N(0, diag(spectrum)) (default identity), y = w*.x + noise, w* ~ N(0, I).

        n < d (or noise_std = 0) interpolates: the residuals of the least-squares fit are zero.

        Raises:
            ValueError: the n x d data or the d x d moments would exceed
                :data:`toymodels._validate.MAX_BYTES` (estimated before anything is drawn).
        """
        check_bytes("n", 8.0 * n * d * 2, what=f"the {n} x {d} data")
        check_bytes("d", 8.0 * d * d * 3, what=f"{d} x {d} moment matrices")
        if spectrum is not None and spectrum.size != d:
            raise ValueError(f"`spectrum` must be of length d={d}; got {spectrum.size}.")
        rng = np.random.default_rng(seed)
        lam = np.ones(d) if spectrum is None else spectrum
        X = rng.standard_normal((n, d)) * np.sqrt(lam)
        w_star = rng.standard_normal(d)
        return cls(X, X @ w_star + noise_std * rng.standard_normal(n))

    # ------------------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Number of data rows n (training examples)."""
        return self.X.shape[0]

    @property
    def dim(self) -> int:
        """Number of features d (columns of X)."""
        return self.X.shape[1]

    @property
    def interpolating(self) -> bool:
        """Whether some w fits every label (least-squares residuals zero to rounding)."""
        return bool(np.max(np.abs(self.residual)) <= 1e-9 * max(1.0, float(np.max(np.abs(self.y)))))

    @property
    def min_loss(self) -> float:
        """L(w_ls) = mean(rho^2) / 2, the floor of the training loss."""
        return float(0.5 * np.mean(self.residual**2))

    @property
    def initial_loss(self) -> float:
        """Excess loss at w_0: (w_0 - w_ls)^T Sigma (w_0 - w_ls) / 2 with Sigma = X^T X / n (the training
        loss at w_0 minus :attr:`min_loss`), the loss every curve of this model starts from."""
        e = self.w0 - self.w_ls
        return float(0.5 * e @ self.sigma @ e)

    @property
    def params(self) -> dict:
        """The attrs of the model's results: ``n``, ``dim``, ``min_loss`` and ``interpolating``."""
        return {"n": self.n, "dim": self.dim, "min_loss": self.min_loss, "interpolating": self.interpolating}

    @validate(optimizer=Maybe(OPTIMIZER))
    def lr_limit(self, optimizer=None) -> float:
        """2 / (lambda_max(Sigma) + wd): full-batch stability (SGD's exact limit is lower for small B);
        wd the weight decay of ``optimizer`` (optional, SGD; 0 without), accepted so that the model
        can be swept."""
        wd = 0.0
        if optimizer is not None:
            self._check_sgd(optimizer, constant=False)
            wd = optimizer.weight_decay
        return float(2.0 / (np.linalg.eigvalsh(self.sigma)[-1] + wd))

    # ------------------------------------------------------------------------------------------
    # the sweep interface (toymodels.sweep): exact loss at any step and the exact first crossing
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _check_sgd(optimizer, constant=True):
        if not isinstance(optimizer, SGD) or optimizer.precond != 0.0:
            hp = optimizer.hyperparameters
            raise ValueError(f"`optimizer` must be SGD without preconditioning (precond 0; weight_decay allowed) for "
                             f"FiniteLinearRegression; got {hp['optimizer']}" +
                             (f" with precond {hp['precond']}" if hp.get("precond") else "") + ".")
        if constant and not isinstance(optimizer.lr, Constant):
            raise ValueError("`optimizer` must have a constant learning rate here.")

    def _operator(self, lr, bs, wd=0.0):
        """The affine moment map of one SGD step (weight decay ``wd``) as a matrix on
        z = (S_ij for i <= j, m, 1), with the loss readout f (L = f.z) and z_0; built by applying
        :meth:`_sgd_step` to a basis."""
        d = self.dim
        if d > MAX_OPERATOR_DIM:
            raise ValueError(f"`X` must be at most {MAX_OPERATOR_DIM} features wide for the exact loss at any step "
                             f"and steps to target (their moment map has d(d+1)/2 + d + 1 states); got {d}.")
        iu = np.triu_indices(d)
        p = iu[0].size
        n_z = p + d + 1
        cache = self.__dict__.setdefault("_op_cache", {})
        key = (float(lr), float(bs), float(wd))
        if key in cache:
            return cache[key]
        M = np.zeros((n_z, n_z))
        m0, S0 = np.zeros(d), np.zeros((d, d))
        m_c, S_c = self._sgd_step(m0, S0, lr, bs, wd)
        M[:p, -1], M[p:p + d, -1], M[-1, -1] = S_c[iu], m_c, 1.0
        for col, (i, j) in enumerate(zip(*iu)):
            E = np.zeros((d, d))
            E[i, j] = E[j, i] = 1.0
            m1, S1 = self._sgd_step(m0, E, lr, bs, wd)
            M[:p, col], M[p:p + d, col] = S1[iu] - S_c[iu], m1 - m_c
        for l in range(d):
            m1, S1 = self._sgd_step(np.eye(d)[l], S0, lr, bs, wd)
            M[:p, p + l], M[p:p + d, p + l] = S1[iu] - S_c[iu], m1 - m_c
        f = np.zeros(n_z)
        f[:p] = np.where(iu[0] == iu[1], 0.5, 1.0) * self.sigma[iu]
        e0 = self.w0 - self.w_ls
        z0 = np.concatenate([np.outer(e0, e0)[iu], e0, [1.0]])
        if len(cache) > 64:
            cache.clear()
        cache[key] = (M, f, z0)
        return cache[key]

    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZE, lr=MAYBE_LR)
    def modal_form(self, optimizer, batch_size, lr=None):
        """No closed form of sums of exponentials here (the sweep then calls :meth:`steps_to_target`)."""
        raise NotImplementedError("FiniteLinearRegression has no modal form; loss_at_step and steps_to_target "
                                  "power its moment map instead.")

    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZE, k=STEP, lr=MAYBE_LR)
    def loss_at_step(self, optimizer, batch_size, k: int, lr: float | None = None) -> float:
        """Exact expected excess loss at step k (in [0, 10^15]) of SGD with batches drawn with
        replacement, by binary powering of the affine moment map (at most 32 features);
        ``inf`` if it overflows."""
        self._check_sgd(optimizer, constant=lr is None)
        lr = optimizer.lr.lr if lr is None else lr
        M, f, z = self._operator(lr, batch_size, optimizer.weight_decay)
        P = M.copy()
        with np.errstate(over="ignore", invalid="ignore"):
            while k:
                if k & 1:
                    z = P @ z
                k >>= 1
                if k:
                    P = P @ P
            v = float(f @ z)
        return v if math.isfinite(v) else math.inf

    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZE, target=TARGET, max_steps=Maybe(Integer(1, 10**9)),
              full_output=Boolean())
    def steps_to_target(self, optimizer, batch_size, target, *, max_steps: int | None = None,
                        full_output: bool = False):
        """The first step k <= ``max_steps`` (default 10^6, at most 10^9) with expected excess loss
        L_k <= target, exact: L_k is computed at every step, 1024 at a time from the moment map and
        its powers (plain SGD, constant learning rate, at most 32 features).

        Returns:
            ``float`` holding an integer, or ``inf`` (``full_output``: with a dict giving the
            ``reason``: the loss overflowed, or not reached by ``max_steps``).
        """
        self._check_sgd(optimizer)
        max_steps = _SEARCH_DEFAULT if max_steps is None else max_steps
        k, reason = self._first_crossing(optimizer.lr.lr, batch_size, target, max_steps, optimizer.weight_decay)
        steps = float(k) if k >= 0 else math.inf
        if full_output:
            return steps, {"reason": reason, "noise_floor": math.nan}
        return steps

    def _first_crossing(self, lr, bs, target, max_steps, wd=0.0):
        M, f, z = self._operator(lr, bs, wd)
        T = min(_BLOCK, max_steps + 1)
        rows = [f]  # rows[j] = f M^j, built by doubling
        with np.errstate(over="ignore", invalid="ignore"):
            R = f[None, :]
            Mp = M
            while R.shape[0] < T:
                R = np.vstack([R, R @ Mp])
                Mp = Mp @ Mp
            R = R[:T]
            MT = np.linalg.matrix_power(M, T)
            k0 = 0
            while k0 <= max_steps:
                L = R @ z
                n_ok = min(T, max_steps - k0 + 1)
                L = L[:n_ok]
                hit = np.flatnonzero(L <= target)
                bad = np.flatnonzero(~np.isfinite(L))
                if hit.size and (not bad.size or hit[0] < bad[0]):
                    return k0 + int(hit[0]), ""
                if bad.size:
                    return -1, f"diverges: the loss overflowed by step {k0 + int(bad[0])}"
                z = MT @ z
                k0 += T
        del rows
        return -1, f"not reached within max_steps={max_steps}"

    # ------------------------------------------------------------------------------------------
    def _sgd_step(self, m, S, lr, bs, wd=0.0):
        """One step of the moments (m, S) = (E e, E e e^T) of SGD with weight decay ``wd`` (module docstring)."""
        X, rho, sig = self.X, self.residual, self.sigma
        c = np.sum((X @ S) * X, axis=1) - 2.0 * rho * (X @ m) + rho**2  # x_r^T S x_r by BLAS (einsum: 10x slower)
        G = (X * c[:, None]).T @ X / self.n
        J = (1.0 - lr * wd) * np.eye(self.dim) - lr * sig
        S_new = J @ S @ J + lr * lr / bs * (G - sig @ S @ sig)
        m_new = J @ m
        if wd:
            drift = -lr * wd * self.w_ls  # the decay's pull of e = w - w_ls towards -w_ls
            cross = np.outer(m_new, drift)
            S_new += cross + cross.T + np.outer(drift, drift)
            m_new = m_new + drift
        return m_new, 0.5 * (S_new + S_new.T)

    def _curve(self, step, steps, lrs):
        ks = check_steps(steps)
        e0 = self.w0 - self.w_ls
        m, S = e0.copy(), np.outer(e0, e0)
        loss = np.empty(ks.size)
        sq = np.empty(ks.size)
        with np.errstate(over="ignore", invalid="ignore"):
            return ks, *self._run(step, ks, lrs, m, S, loss, sq)

    def _run(self, step, ks, lrs, m, S, loss, sq):
        j = 0
        for k in range(int(ks[-1]) + 1):
            if ks[j] == k:
                loss[j] = 0.5 * float(np.sum(self.sigma * S))
                sq[j] = float(np.trace(S))
                if not (math.isfinite(loss[j]) and math.isfinite(sq[j])):
                    loss[j:] = math.inf
                    sq[j:] = math.inf
                    break
                j += 1
                if j == ks.size:
                    break
            m, S = step(m, S, lrs[k])
        return loss, sq

    @validate(lr=LR, batch_size=BATCH_SIZE, steps=Steps(MAX_CURVE_STEPS), weight_decay=WEIGHT_DECAY)
    def loss_curve(self, lr, batch_size, steps, *, weight_decay: float = 0.0) -> xr.Dataset:
        """Exact expected excess loss of SGD with batches drawn with replacement.

        Args:
            lr: constant learning rate > 0.
            batch_size: B >= 1 (rows per step, drawn uniformly with replacement).
            steps: a count or an increasing array of step indices, at most 10^7 (every step is
                computed, O(n d^2) each).
            weight_decay: wd >= 0, PyTorch's coupled L2 decay (the update's gradient is g + wd w;
                module docstring); the loss reported stays the unregularised one.

        Returns:
            Dataset over ``step``: ``loss`` (E L(w_k) - L(w_ls)) and ``sq_error`` (E|w_k - w_ls|^2);
            ``inf`` after an overflow (divergence).
        """
        lr = check_real("lr", lr, low=0.0, high=math.inf, low_open=True, high_open=True)
        bs = check_batch_size(batch_size)
        wd = float(weight_decay)
        ks, loss, sq = self._curve(lambda m, S, a: self._sgd_step(m, S, a, bs, wd), steps,
                                   np.full(int(check_steps(steps)[-1]) + 1, lr))
        ds = xr.Dataset({"loss": ("step", loss), "sq_error": ("step", sq)}, coords={"step": ks})
        attach_attrs(ds, model=self.model_name, source="exact", optimizer="sgd", lr=lr, batch_size=bs,
                     weight_decay=wd, sampling="with replacement", **self.params)
        return ds

    @validate(lr=LR, batch_size=BATCH_SIZE, steps=MC_STEPS, replacement=Boolean(), n_runs=N_RUNS, seed=SEED,
              weight_decay=WEIGHT_DECAY)
    def simulate(self, lr, batch_size, steps, *, replacement: bool = True, n_runs: int = 200, seed: int = 0,
                 weight_decay: float = 0.0) -> xr.Dataset:
        """Monte Carlo SGD (numba kernel, explicit seed): batches of B rows drawn with replacement, or without (``replacement=False``:
        a fresh random permutation each epoch, consecutive batches of B; a batch may straddle two
        epochs when B does not divide n); ``weight_decay`` as in :meth:`loss_curve`.

        Returns:
            Dataset over ``step``: ``loss`` (mean excess loss over runs), ``loss_sem``, ``sq_error``;
            ``inf`` from the first recorded step where a run overflowed (``attrs["diverged"]``,
            ``attrs["reason"]``), never NaN.  At most 10^8 steps and 10^6 runs.
        """
        lr = check_real("lr", lr, low=0.0, high=math.inf, low_open=True, high_open=True)
        bs = check_batch_size(batch_size)
        if bs != int(bs):
            raise ValueError(f"`batch_size` must be a whole number for sampled data; got {bs:g}.")
        bs = int(bs)
        ks = check_steps(steps)
        n_runs = check_int("n_runs", n_runs, low=2)
        seed = check_int("seed", seed, low=0)
        self._check_mc_size(ks, n_runs, bs)
        rng = np.random.default_rng(seed)
        with np.errstate(over="ignore", invalid="ignore"):
            loss, sq = simulate_finite(self.X, self.y, self.w0, self.w_ls, self.sigma, np.full(int(ks[-1]), lr), ks,
                                       n_runs, rng, batch_size=bs, replacement=replacement,
                                       weight_decay=float(weight_decay))
        ds, reason = _mc_dataset(loss, sq, ks)
        attach_attrs(ds, model=self.model_name, source="simulation", optimizer="sgd", lr=lr, batch_size=bs,
                     weight_decay=float(weight_decay),
                     sampling="with replacement" if replacement else "without replacement (epochs)",
                     n_runs=n_runs, seed=seed, diverged=bool(reason), reason=reason, **self.params)
        return ds

    # ------------------------------------------------------------------------------------------
    def _row_probs(self, sampling):
        if sampling == "norm":
            return self.row_sq / np.sum(self.row_sq)
        if sampling == "uniform":
            return np.full(self.n, 1.0 / self.n)
        raise ValueError(f"`sampling` must be 'norm' or 'uniform'; got {sampling!r}.")

    def kaczmarz_rate(self) -> float:
        """Strohmer-Vershynin's contraction 1 - sigma_min^2 / |X|_F^2 (smallest non-zero singular value)."""
        sv = np.linalg.svd(self.X, compute_uv=False)
        smin = sv[sv > 1e-12 * sv[0]].min()
        return float(1.0 - smin**2 / np.sum(self.row_sq))

    def _kaczmarz_step(self, m, S, p):
        U = self.X / np.sqrt(self.row_sq)[:, None]
        coef = self.residual / np.sqrt(self.row_sq)
        Q = (U * p[:, None]).T @ U
        uSu = np.einsum("rd,de,re->r", U, S, U)
        PS = S - Q @ S - S @ Q + (U * (p * uSu)[:, None]).T @ U
        Um = U @ m
        Pm = m[None, :] - Um[:, None] * U  # rows: P_r m
        cross = (Pm * (p * coef)[:, None]).T @ U
        S_new = PS + cross + cross.T + (U * (p * coef**2)[:, None]).T @ U
        m_new = m - Q @ m + U.T @ (p * coef)
        return m_new, 0.5 * (S_new + S_new.T)

    def _check_mc_size(self, ks, n_runs, bs):
        check_bytes("n_runs", 8.0 * n_runs * (2 * ks.size + self.dim + 2 * bs + self.n),
                    what=f"{n_runs} runs x ({ks.size} records, {self.dim} weights, {bs} rows per step)")
        check_bytes("steps", 8.0 * (int(ks[-1]) + 1), what=f"{int(ks[-1])} learning rates")

    @validate(steps=Steps(MAX_CURVE_STEPS), sampling=Options("norm", "uniform"))
    def kaczmarz_curve(self, steps, *, sampling: str = "norm") -> xr.Dataset:
        """Exact expected excess loss and squared error of randomized Kaczmarz, with the
        Strohmer-Vershynin bound (1 - 1/kappa^2)^k |e_0|^2 beside them (``sv_bound``; a bound for
        consistent systems with norm sampling and w_0 in the row space)."""
        p = self._row_probs(sampling)
        ks, loss, sq = self._curve(lambda m, S, _: self._kaczmarz_step(m, S, p), steps,
                                   np.zeros(int(check_steps(steps)[-1]) + 1))
        e0 = self.w0 - self.w_ls
        bound = self.kaczmarz_rate() ** ks.astype(np.float64) * float(e0 @ e0)
        ds = xr.Dataset({"loss": ("step", loss), "sq_error": ("step", sq), "sv_bound": ("step", bound)},
                        coords={"step": ks})
        attach_attrs(ds, model=self.model_name, source="exact", optimizer="kaczmarz", sampling=sampling, **self.params)
        return ds

    @validate(steps=MC_STEPS, sampling=Options("norm", "uniform"), n_runs=N_RUNS, seed=SEED)
    def kaczmarz_simulate(self, steps, *, sampling: str = "norm", n_runs: int = 200, seed: int = 0) -> xr.Dataset:
        """Monte Carlo randomized Kaczmarz (same outputs as :meth:`simulate`)."""
        p = self._row_probs(sampling)
        ks = check_steps(steps)
        n_runs = check_int("n_runs", n_runs, low=2)
        seed = check_int("seed", seed, low=0)
        self._check_mc_size(ks, n_runs, 1)
        rng = np.random.default_rng(seed)
        loss, sq = simulate_finite(self.X, self.y, self.w0, self.w_ls, self.sigma, np.zeros(int(ks[-1])), ks, n_runs,
                                   rng, probs=p, kaczmarz=True)
        ds, _ = _mc_dataset(loss, sq, ks)
        attach_attrs(ds, model=self.model_name, source="simulation", optimizer="kaczmarz", sampling=sampling,
                     n_runs=n_runs, seed=seed, **self.params)
        return ds
