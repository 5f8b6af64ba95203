"""Heavy tails and Gaussianity of stochastic gradients: the tests of Xie et al. 2023.

Numpy in, numpy out (scipy only for the D'Agostino test).  Symbols: K the number of tail values
tested, T iterations, P coordinates (parameters).

* A power law has density p(lambda) ∝ lambda^-beta above lambda_min (Xie Eq. 1); its rank form,
  Zipf's law, is lambda_k = lambda_1 k^-s with s = 1 / (beta - 1) (Eq. 2).
* :func:`power_law_fit` is the MLE of beta on the top K values with the KS test (App. B.1);
  :func:`rank_fit` the straight line of the log-log rank plot (Fig. 1).
* :func:`normality_test` is the D'Agostino-Pearson K^2 test, Xie's "chi^2 test" (App. B.2).
* :func:`gradient_history_tests` gives the rows of Table 1 for a gradient-history matrix.
* :func:`eigengaps` and :func:`davis_kahan_bound` are Sec. 4, Eq. (4) and Theorem 1.

Xie et al. write G as an n x T matrix (parameters x iterations); here G has shape ``(T, P)``, one
row per iteration, so Xie's columns (dimension-wise gradients) are our rows.

References:
    Z. Xie, Q.-Y. Tang, M. Sun and P. Li, "On the Overlooked Structure of Stochastic Gradients",
    NeurIPS 2023.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._validate import (AnyOf, Array, Boolean, Integer, Maybe, Options, Real, check_int, check_real, validate)

_SEED = Integer(0, 2**63 - 1)
_ALPHA = Real(0.0, 1.0, low_open=True, high_open=True)
_COUNT = Integer(1, 2**40)

__all__ = [
    "KS_COEF",
    "HistoryTest",
    "NormalityTest",
    "PowerLawFit",
    "RankFit",
    "davis_kahan_bound",
    "eigengaps",
    "gradient_history_tests",
    "normality_test",
    "power_law_fit",
    "rank_fit",
]

KS_COEF = 1.36
"""5% critical value of the KS distance is KS_COEF / sqrt(K) (Massey 1951, large-K limit)."""

MIN_NORMAL = 20
"""Fewest values per normality test (scipy's kurtosis test is unreliable below 20)."""


@dataclass(frozen=True)
class PowerLawFit:
    """Result of :func:`power_law_fit` (Xie et al. App. B.1; Clauset, Shalizi & Newman 2009).

    Attributes:
        beta: MLE of the density exponent, p(x) ∝ x^-beta for x >= xmin (Eq. 8).
        beta_se: its standard error (beta - 1) / sqrt(K).
        s: Zipf (rank) exponent 1 / (beta - 1) (Eq. 2).
        ks: KS distance d_ks = sup |F_fit - F_emp| over the K tail values (Eq. 7).
        ks_critical: the 5% critical value d_c = 1.36 / sqrt(K).
        is_power_law: ``ks < ks_critical``, Xie's acceptance of the power-law hypothesis.
        k: K, the number of tail values.
        xmin: lambda_min, the lower end of the tail.
    """

    beta: float
    beta_se: float
    s: float
    ks: float
    ks_critical: float
    is_power_law: bool
    k: int
    xmin: float


@dataclass(frozen=True)
class RankFit:
    """Result of :func:`rank_fit`: ln lambda_i ≈ ln scale - s ln i over ranks i = 1..k."""

    s: float
    scale: float
    r2: float
    k: int


@dataclass(frozen=True)
class NormalityTest:
    """Result of :func:`normality_test`: K^2 statistics and p-values per tested set, and the rate
    of sets not rejected, ``mean(p_values > alpha)`` (a NaN p-value counts as rejected)."""

    statistic: np.ndarray
    p_values: np.ndarray
    pass_rate: float
    alpha: float


@dataclass(frozen=True)
class HistoryTest:
    """One row of Xie et al. Table 1: the tests over ``n_tests`` sets of one kind.

    Attributes:
        n_tests: number of sets tested (rows or columns of G).
        ks_mean: mean KS distance of the power-law fits (mean d_ks).
        ks_critical: d_c = 1.36 / sqrt(K).
        power_law_rate: fraction of sets with d_ks < d_c.
        beta_median: median fitted exponent beta_hat (a light tail seen far out passes the KS test
            with a steep beta_hat, e.g. ~7 for the top 5% of Gaussian magnitudes).
        p_value_mean: mean p-value of the normality tests.
        gaussian_rate: fraction of sets with p > alpha.
    """

    n_tests: int
    ks_mean: float
    ks_critical: float
    power_law_rate: float
    beta_median: float
    p_value_mean: float
    gaussian_rate: float


def _as_finite(name: str, values, ndims: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim not in ndims or arr.size == 0:
        dims = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"`{name}` must be a non-empty {dims} array; got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` must be finite; got {int(np.sum(~np.isfinite(arr)))} non-finite entries.")
    return arr


def _ks_fit(log_ratio: np.ndarray, k: np.ndarray):
    """beta_hat (Eq. 8) and d_ks (Eq. 7) of several tails at once.

    Args:
        log_ratio: ``(n_sets, m)``, ln(x_j / xmin) of each tail in descending order; row r uses its
            first ``k[r]`` entries and ignores the rest.
        k: ``(n_sets,)`` tail sizes K.

    Returns:
        ``(beta, ks)``, each ``(n_sets,)``; NaN where the fit is undefined (xmin <= 0, or all values
        equal to xmin).  The fitted CDF is F(x) = 1 - (x / xmin)^(1 - beta); the empirical CDF is
        (K - j) / K just after x_j and (K - j - 1) / K just before (as in scipy.stats.kstest).
    """
    kk = k[:, None].astype(np.float64)
    j = np.arange(log_ratio.shape[1])
    inside = j < kk
    lr = np.where(inside, log_ratio, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        beta = 1.0 + k / lr.sum(axis=1)
        cdf = -np.expm1((1.0 - beta[:, None]) * lr)
        after = (kk - j) / kk
        ks = np.where(inside, np.maximum(after - cdf, cdf - after + 1.0 / kk), -np.inf).max(axis=1)
    return np.where(np.isnan(ks), np.nan, beta), ks


def _auto_k(desc: np.ndarray, k_min: int, n_candidates: int) -> int:
    """Tail size minimising d_ks over log-spaced candidates (Clauset et al. 2009, Sec. 3.3)."""
    log_x = np.log(desc[desc > 0])
    if log_x.size < k_min:
        raise ValueError(f"`values` must hold at least `k_min`={k_min} positive values for k='auto'; got {log_x.size}.")
    cands = np.unique(np.geomspace(k_min, log_x.size, n_candidates).round().astype(np.int64))
    blocks = np.array_split(cands, -(-cands.size * log_x.size // 2**22))  # at most ~4M floats at a time
    ks = np.concatenate([_ks_fit(log_x[None, : kb[-1]] - log_x[kb - 1, None], kb)[1] for kb in blocks])
    return int(cands[np.nanargmin(ks)])


@validate(values=Array(1), k=Maybe(AnyOf(Integer(2, 2**62), Options("auto"), what="an integer >= 2, None or 'auto'")),
          xmin=Maybe(Real(0.0, math.inf, low_open=True)), k_min=Integer(2, 2**62), n_candidates=Integer(1, 10**6))
def power_law_fit(values, k=None, xmin=None, *, k_min: int = 10, n_candidates: int = 100) -> PowerLawFit:
    """Fit a power law to the largest values by maximum likelihood, with the KS test (Xie App. B.1).

    beta_hat = 1 + K / sum_i ln(lambda_i / lambda_min) over the K tail values (Eq. 8, Clauset et al.
    Eq. 3.1), standard error (beta_hat - 1) / sqrt(K); the tail is accepted as a power law when the
    KS distance to the fitted CDF 1 - (x / lambda_min)^(1 - beta_hat) is below 1.36 / sqrt(K).

    Args:
        values: ``(n,)`` finite values (eigenvalues, gradient magnitudes, ...); only the tail must be > 0.
        k: tail size K: an integer in [2, n] (the top K values, lambda_min the smallest of them, as in
            Xie), ``None`` for all values, or ``"auto"`` to choose K minimising the KS distance
            over ``n_candidates`` log-spaced sizes in [k_min, n] (Clauset et al. 2009, Sec. 3.3).
        xmin: alternatively, a fixed lower cut-off > 0: the tail is all values >= xmin, lambda_min = xmin.
        k_min: smallest candidate tail for ``k="auto"``.
        n_candidates: number of candidate tail sizes for ``k="auto"``.

    Returns:
        :class:`PowerLawFit`.

    Raises:
        ValueError: empty or non-finite ``values``, non-positive values in the tail, fewer than two
            distinct tail values, ``k`` out of range, or both ``k`` and ``xmin`` given.

    Example:
        >>> fit = power_law_fit(np.arange(1, 1001) ** -1.0, k=500)   # Zipf's law with s = 1
        >>> round(fit.s, 1), fit.is_power_law
        (1.0, True)
    """
    desc = np.sort(_as_finite("values", values, (1,)))[::-1]
    n = desc.size
    if k is not None and xmin is not None:
        raise ValueError("give at most one of `k` and `xmin`; got both.")
    if isinstance(k, str):
        if k != "auto":
            raise ValueError(f"`k` must be an integer in [2, {n}], None or 'auto'; got {k!r}.")
        k = _auto_k(desc, check_int("k_min", k_min, low=2, high=n), check_int("n_candidates", n_candidates, low=1))
    elif xmin is not None:
        xmin = check_real("xmin", xmin, low=0.0, low_open=True)
        k = int(np.sum(desc >= xmin))
        if k < 2:
            raise ValueError(f"`xmin` must leave at least 2 values in the tail; got {k} values >= {xmin:g}.")
    else:
        k = n if k is None else check_int("k", k, low=2, high=n)
    tail = desc[:k]
    lam_min = float(tail[-1]) if xmin is None else xmin
    if tail[-1] <= 0:
        raise ValueError(f"`values` must be > 0 in the fitted tail (the top k={k}); got min {tail[-1]:g}.")
    if tail[0] == lam_min:
        raise ValueError(f"`values` must hold at least two distinct values in the tail (the top k={k}); all equal {lam_min:g}.")
    beta, ks = _ks_fit(np.log(tail / lam_min)[None], np.array([k]))
    beta, ks, root_k = float(beta[0]), float(ks[0]), math.sqrt(k)
    return PowerLawFit(beta=beta, beta_se=(beta - 1.0) / root_k, s=1.0 / (beta - 1.0), ks=ks, ks_critical=KS_COEF / root_k,
                       is_power_law=ks < KS_COEF / root_k, k=k, xmin=lam_min)


@validate(values=Array(1), k=Maybe(Integer(2, 2**62)))
def rank_fit(values, k=None) -> RankFit:
    """Least-squares line through the rank plot: ln lambda_i = ln scale - s ln i, i = 1..k (Xie Eq. 2, Fig. 1).

    Args:
        values: ``(n,)`` finite values, sorted here in descending order; the top ``k`` must be > 0.
        k: number of top values fitted, an integer in [2, n]; ``None`` for all.

    Returns:
        :class:`RankFit` with the Zipf exponent ``s`` (minus the slope), ``scale`` (the fitted
        lambda_1) and the coefficient of determination ``r2`` of the log-log fit (NaN if all
        fitted values are equal).

    Raises:
        ValueError: empty or non-finite ``values``, non-positive top values, ``k`` out of range.
    """
    desc = np.sort(_as_finite("values", values, (1,)))[::-1]
    k = desc.size if k is None else check_int("k", k, low=2, high=desc.size)
    if k < 2 or desc[k - 1] <= 0:
        raise ValueError(f"`values` must hold at least 2 values, > 0 in the top k={k}; got min {desc[k - 1]:g}.")
    log_rank, log_val = np.log(np.arange(1.0, k + 1.0)), np.log(desc[:k])
    slope, intercept = np.polyfit(log_rank, log_val, 1)
    ss_res = np.sum((log_val - intercept - slope * log_rank) ** 2)
    ss_tot = np.sum((log_val - log_val.mean()) ** 2)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else np.nan
    return RankFit(s=float(-slope), scale=float(np.exp(intercept)), r2=float(r2), k=k)


@validate(samples=Array((1, 2), what="a non-empty 1-D or 2-D array"), axis=Integer(-2, 1), alpha=_ALPHA,
          whiten=Boolean())
def normality_test(samples, axis: int = 0, alpha: float = 0.05, whiten: bool = True) -> NormalityTest:
    """D'Agostino-Pearson K^2 test of Gaussianity per set (Xie's "chi^2 test", App. B.2).

    K^2 = z_S^2 + z_K^2 combines the skewness and kurtosis tests (scipy.stats.normaltest) and is
    chi^2 with 2 degrees of freedom under the Gaussian hypothesis; a set passes when p > alpha.

    Whitening.  For one set of scalars (a column here) "whitening" is standardising: subtract the
    mean, divide by the (population) standard deviation, as Xie do before the test.  Skewness and
    kurtosis are location-scale invariant, so this changes the p-values only by rounding; it keeps
    tiny gradients (~1e-8) well scaled.  For a noise *matrix* N (T x P) whitening would mean
    N Sigma^(-1/2), Sigma the P x P noise covariance: it decorrelates the coordinates of each noise
    vector and gives them unit variance.  Without it the coordinates of one Gaussian noise vector
    have different scales, so pooled they form a Gaussian scale mixture that fails the test although
    every coordinate is Gaussian (Xie Sec. 4: dimension-wise heavy tails come from the covariance
    spectrum).  This function only standardises each set.

    Args:
        samples: ``(n,)`` or 2-D finite array; the sets are its 1-D slices along ``axis``.
        axis: the axis holding each set's values (0: test each column), with >= 20 values.
        alpha: significance level in (0, 1).
        whiten: standardise each set first.

    Returns:
        :class:`NormalityTest`; ``p_values`` has the shape of ``samples`` without ``axis``.
        A constant set has NaN statistic and p-value and counts as rejected.

    Raises:
        ValueError: empty, non-finite or > 2-D ``samples``, ``axis`` out of range, fewer than 20
            values per set, ``alpha`` outside (0, 1).
    """
    x = _as_finite("samples", samples, (1, 2))
    axis = check_int("axis", axis, low=-x.ndim, high=x.ndim - 1)
    if x.shape[axis] < MIN_NORMAL:
        raise ValueError(f"`samples` must have at least {MIN_NORMAL} values along `axis`={axis}; got {x.shape[axis]}.")
    alpha = check_real("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)
    constant = np.ptp(x, axis=axis) == 0
    if whiten:
        sd = x.std(axis=axis, keepdims=True)
        x = (x - x.mean(axis=axis, keepdims=True)) / np.where(sd > 0, sd, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        from scipy import stats  # here, not at import: scipy.stats takes ~1 s to import (first contact)

        stat, p = stats.normaltest(x, axis=axis)
    stat, p = np.where(constant, np.nan, stat), np.where(constant, np.nan, p)
    return NormalityTest(statistic=stat, p_values=p, pass_rate=float(np.mean(p > alpha)), alpha=alpha)


def _random_subsets(rng: np.random.Generator, n_sets: int, size: int, m: int) -> np.ndarray:
    """``(n_sets, m)`` indices, each row a uniformly random m-subset of range(size): windows at random
    offsets of one random permutation (cheap for many sets of a long axis)."""
    start = rng.integers(0, size, n_sets)
    return rng.permutation(size)[(start[:, None] + np.arange(m)) % size]


def _nan_stat(fn, a: np.ndarray) -> float:
    """``fn`` (mean, median) of the non-NaN entries of ``a``; NaN if there are none."""
    a = a[~np.isnan(a)]
    return float(fn(a)) if a.size else math.nan


def _table_row(sets: np.ndarray, k: int, normal_idx: np.ndarray, alpha: float) -> HistoryTest:
    """Power-law test on the top-k magnitudes and normality test on the picked entries of each row of ``sets``."""
    n_sets, length = sets.shape
    top = np.sort(np.partition(np.abs(sets), length - k, axis=1)[:, length - k:], axis=1)[:, ::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        beta, ks = _ks_fit(np.log(top / top[:, -1:]), np.full(n_sets, k))
    p = normality_test(np.take_along_axis(sets, normal_idx, axis=1), axis=1, alpha=alpha).p_values
    crit = KS_COEF / math.sqrt(k)
    return HistoryTest(n_tests=n_sets, ks_mean=_nan_stat(np.mean, ks), ks_critical=crit,
                       power_law_rate=float(np.mean(ks < crit)), beta_median=_nan_stat(np.median, beta),
                       p_value_mean=_nan_stat(np.mean, p),
                       gaussian_rate=float(np.mean(p > alpha)))


@validate(G=Array(2, what="a non-empty 2-D array"), k_power=Integer(2, 2**40), n_normal=Maybe(Integer(MIN_NORMAL, 2**40)),
          alpha=_ALPHA, max_tests=Maybe(_COUNT), seed=_SEED)
def gradient_history_tests(G, *, k_power: int = 1000, n_normal: int | None = 100, alpha: float = 0.05,
                           max_tests: int | None = None, seed: int = 0) -> dict[str, HistoryTest]:
    """The power-law and Gaussian rates of Xie et al. Table 1 on a gradient-history matrix.

    G has shape ``(T, P)``: row t is the stochastic gradient g^(t) at a fixed parameter point
    (Xie Sec. 2 write the transpose).  Three kinds of sets are tested:

    * ``"dimension"``: each row g^(t), one iteration across the P coordinates (Xie's dimension-wise
      gradients, the columns of their G); rates are over iterations;
    * ``"iteration"``: each column g_i, one coordinate across the T iterations (iteration-wise
      gradients, their rows); rates are over coordinates;
    * ``"noise"``: each column of G - g_bar, the minibatch noise of one coordinate, g_bar = the mean
      of the T rows (estimating the full-batch gradient): Xie's "true SGN".  Centring does not change
      the normality test, so its Gaussian rate equals the iteration-wise one; the power-law test differs.

    For the dimension-wise noise (the "SGN" of Simsekli et al.) call this on ``G - G.mean(axis=0)``
    and read ``"dimension"``.  Power-law test: :func:`power_law_fit` on the top K = min(k_power, set
    length) magnitudes |g|, passing when d_ks < 1.36 / sqrt(K) (App. B.1; a set whose K-th largest
    magnitude is 0 fails).  Gaussian test: :func:`normality_test` on min(n_normal, set length)
    entries drawn at random without replacement, passing when p > alpha (App. B.2).  Xie use
    K = 1000, n_normal = 100, alpha = 0.05.

    Args:
        G: ``(T, P)`` finite gradient history, T, P >= 20.
        k_power: tail size K of the power-law tests, >= 2.
        n_normal: entries per normality test, >= 20, or ``None`` for all.
        alpha: significance level of the normality test, in (0, 1).
        max_tests: if given, test at most this many rows and this many columns, drawn at random
            (the same columns for ``"iteration"`` and ``"noise"``).
        seed: seed of the numpy generator drawing the tested sets and entries.

    Returns:
        dict kind -> :class:`HistoryTest`, kinds ``"dimension"``, ``"iteration"``, ``"noise"``.

    Raises:
        ValueError: G not 2-D, non-finite or smaller than 20 x 20; options out of range.
    """
    G = _as_finite("G", G, (2,))
    n_iter, n_coord = G.shape
    if min(n_iter, n_coord) < MIN_NORMAL:
        raise ValueError(f"`G` must have at least {MIN_NORMAL} rows and {MIN_NORMAL} columns; got shape {G.shape}.")
    k_power = check_int("k_power", k_power, low=2)
    n_normal = None if n_normal is None else check_int("n_normal", n_normal, low=MIN_NORMAL)
    alpha = check_real("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)
    max_tests = None if max_tests is None else check_int("max_tests", max_tests, low=1)
    rng = np.random.default_rng(check_int("seed", seed, low=0))

    def pick(size):
        return np.arange(size) if max_tests is None or max_tests >= size else np.sort(rng.choice(size, max_tests, replace=False))

    rows, cols = pick(n_iter), pick(n_coord)
    m_dim, m_iter = min(n_normal or n_coord, n_coord), min(n_normal or n_iter, n_iter)
    idx_dim = _random_subsets(rng, rows.size, n_coord, m_dim)
    idx_iter = _random_subsets(rng, cols.size, n_iter, m_iter)
    by_coord = G[:, cols].T
    return {
        "dimension": _table_row(G[rows], min(k_power, n_coord), idx_dim, alpha),
        "iteration": _table_row(by_coord, min(k_power, n_iter), idx_iter, alpha),
        "noise": _table_row(by_coord - G.mean(axis=0)[cols, None], min(k_power, n_iter), idx_iter, alpha),
    }


@validate(eigenvalues=Array(1), two_sided=Boolean())
def eigengaps(eigenvalues, *, two_sided: bool = False) -> np.ndarray:
    """Eigengaps delta_k = lambda_k - lambda_{k+1} of a spectrum in descending order (Xie Sec. 4, Eq. 4).

    For Zipf's law lambda_k = lambda_1 k^-s, delta_k = lambda_k [1 - (k / (k + 1))^s], which decays
    like k^-(s+1) (Eq. 5).

    Args:
        eigenvalues: ``(n,)`` finite eigenvalues, n >= 2, any order (sorted here, largest first).
        two_sided: return instead the gap that isolates each eigenvalue, the denominator of the
            Davis-Kahan bound: min(lambda_{k-1} - lambda_k, lambda_k - lambda_{k+1}) with
            lambda_0 = +inf and lambda_{n+1} = -inf (Yu, Wang & Samworth 2015, Theorem 1).

    Returns:
        ``(n - 1,)`` gaps delta_1..delta_{n-1}, or ``(n,)`` two-sided gaps, both >= 0, in the order of
        the descending eigenvalues.

    Raises:
        ValueError: fewer than 2 or non-finite eigenvalues.
    """
    lam = np.sort(_as_finite("eigenvalues", eigenvalues, (1,)))[::-1]
    if lam.size < 2:
        raise ValueError(f"`eigenvalues` must hold at least 2 values; got {lam.size}.")
    gaps = -np.diff(lam)
    if not two_sided:
        return gaps
    padded = np.concatenate([[np.inf], gaps, [np.inf]])
    return np.minimum(padded[:-1], padded[1:])


@validate(perturbation_norm=Array((0, 1, 2, 3)), gap=Array((0, 1, 2, 3), posinf=True))
def davis_kahan_bound(perturbation_norm, gap):
    """Davis-Kahan sin(theta) bound on the rotation of an eigenvector (Xie Sec. 4, Theorem 1).

    For symmetric C and C~ = C + E, the angle theta_k between the k-th eigenvectors satisfies
    sin theta_k <= 2 ||E||_op / min(lambda_{k-1} - lambda_k, lambda_k - lambda_{k+1}), the
    eigenvalues being those of the unperturbed C (Yu, Wang & Samworth 2015, Theorem 1; Xie write
    E = epsilon M).  The bound may exceed 1, where it says nothing.

    Args:
        perturbation_norm: ||E||_op >= 0 (the largest |eigenvalue| of E), array-like.
        gap: the two-sided eigengap >= 0 (``eigengaps(lam, two_sided=True)``), broadcastable; 0 gives inf.

    Returns:
        float64 array (broadcast shape) of bounds on sin theta.

    Raises:
        ValueError: NaN, infinite or negative ``perturbation_norm``; NaN or negative ``gap``.
    """
    e = np.asarray(perturbation_norm, dtype=np.float64)
    g = np.asarray(gap, dtype=np.float64)
    if not np.all(np.isfinite(e)) or np.any(e < 0):
        raise ValueError("`perturbation_norm` must be finite and >= 0.")
    if np.any(np.isnan(g)) or np.any(g < 0):
        raise ValueError("`gap` must be >= 0 (inf allowed); got a negative or NaN entry.")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(e == 0, 0.0, 2.0 * e / g)
