"""Tests of toymodels.tails: power-law MLE and KS test, normality rates, Table 1 rates, Davis-Kahan.

Tolerances come from standard errors: (beta - 1) / sqrt(K) for the MLE, sqrt(q (1 - q) / n) for a
pass rate q over n independent sets, and a 4-sigma band throughout.
"""

import math

import numpy as np
import pytest
from scipy import special, stats

from toymodels.tails import (
    KS_COEF,
    davis_kahan_bound,
    eigengaps,
    gradient_history_tests,
    normality_test,
    power_law_fit,
    rank_fit,
)

ALPHA = 0.05


def pareto(rng, n, beta, xmin=1.0):
    """Continuous power law p(x) ∝ x^-beta on [xmin, inf), by inversion."""
    return xmin * (1.0 - rng.random(n)) ** (-1.0 / (beta - 1.0))


def rate_band(q, n):
    """4 binomial standard errors of a pass rate q over n independent sets."""
    return 4.0 * math.sqrt(q * (1.0 - q) / n)


# ---------------------------------------------------------------- power_law_fit


@pytest.mark.parametrize("beta, k", [(2.5, None), (2.5, 1000), (1.8, 2000)])
def test_mle_recovers_exponent_within_standard_error(beta, k):
    x = pareto(np.random.default_rng(11), 20_000, beta)
    fit = power_law_fit(x, k=k)
    assert abs(fit.beta - beta) < 4 * fit.beta_se
    assert fit.beta_se == pytest.approx((fit.beta - 1) / math.sqrt(fit.k))
    assert fit.s == pytest.approx(1 / (fit.beta - 1))
    assert fit.is_power_law


def test_mle_standard_error_is_calibrated():
    """Over replicates the z-scores (beta_hat - beta) / se have mean ~0 and sd ~1."""
    rng = np.random.default_rng(12)
    n_rep = 300
    z = np.array([(f.beta - 2.5) / f.beta_se for f in (power_law_fit(pareto(rng, 5000, 2.5), k=500) for _ in range(n_rep))])
    assert abs(z.mean()) < 4 / math.sqrt(n_rep)
    assert abs(z.std() - 1) < 4 / math.sqrt(2 * n_rep)


@pytest.mark.parametrize("s", [0.86, 1.3])
def test_zipf_sequence_recovers_s(s):
    """lambda_i = i^-s (Xie Eq. 2): sum ln(lambda_i / lambda_K) = s (K ln K - ln K!), so the MLE is closed form."""
    k = 1000
    fit = power_law_fit(np.arange(1, 5001) ** -s, k=k)
    assert fit.s == pytest.approx(s * (k * math.log(k) - special.gammaln(k + 1)) / k, rel=1e-10)
    assert abs(fit.s - s) < 4 * s / math.sqrt(k)  # se of s = 1/(beta-1) is s / sqrt(K)
    assert fit.is_power_law


def test_ks_distance_matches_scipy_kstest():
    x = pareto(np.random.default_rng(13), 3000, 2.2, xmin=0.5)
    for fit in (power_law_fit(x, k=800), power_law_fit(x, xmin=1.0)):
        tail = np.sort(x)[::-1][: fit.k]
        ref = stats.kstest(tail, stats.pareto(b=fit.beta - 1, scale=fit.xmin).cdf)
        assert fit.ks == pytest.approx(ref.statistic, rel=1e-10)
        assert fit.ks_critical == pytest.approx(KS_COEF / math.sqrt(fit.k))


def test_ks_accepts_power_law_and_rejects_exponential():
    """A true power-law tail passes at >= 1 - alpha; exponential samples (the whole sample from
    1 + Exp(1), or the top 1000 of Exp(1)) fail."""
    rng = np.random.default_rng(14)
    n_rep = 200
    accept_pl = np.mean([power_law_fit(pareto(rng, 5000, 2.5), k=1000).is_power_law for _ in range(n_rep)])
    accept_exp = np.mean([power_law_fit(1 + rng.exponential(size=5000)).is_power_law for _ in range(n_rep)])
    accept_exp_top = np.mean([power_law_fit(rng.exponential(size=5000), k=1000).is_power_law for _ in range(n_rep)])
    assert accept_pl >= 1 - ALPHA - rate_band(ALPHA, n_rep)
    assert accept_exp <= ALPHA and accept_exp_top <= ALPHA  # power >= 1 - alpha against the exponential


def test_auto_tail_recovers_cutoff():
    """Exponential body below x0 = 1, power law (beta = 2.5) above it.  Clauset's xmin has no
    closed-form SE: in 300 seeded replicates of this design xmin_hat / x0 ranged over [0.976, 2.97]
    (99.5% quantile 2.6), beta_hat stayed within 3.2 se.  The fit on all values is rejected."""
    rng = np.random.default_rng(15)
    n_body, n_tail, beta = 7000, 3000, 2.5
    body = stats.truncexpon.rvs(2.0, scale=0.5, size=n_body, random_state=rng)  # Exp(scale 0.5) cut at 1
    x = np.concatenate([body, pareto(rng, n_tail, beta)])
    fit = power_law_fit(x, k="auto")
    assert 0.9 < fit.xmin < 3.0
    assert abs(fit.beta - beta) < 4 * fit.beta_se
    assert fit.is_power_law
    assert np.sum(body >= fit.xmin) <= fit.ks_critical * fit.k  # body contamination below KS resolution
    assert not power_law_fit(x).is_power_law


def test_auto_tail_is_the_ks_argmin_over_candidates():
    """The vectorised search equals a plain loop over the same candidate tail sizes."""
    x = pareto(np.random.default_rng(16), 2000, 2.0) + np.random.default_rng(17).random(2000)
    cands = np.unique(np.geomspace(10, x.size, 40).round().astype(int))
    best = cands[np.argmin([power_law_fit(x, k=int(c)).ks for c in cands])]
    assert power_law_fit(x, k="auto", n_candidates=40).k == best


def test_only_the_tail_must_be_positive():
    x = np.concatenate([pareto(np.random.default_rng(18), 500, 2.0), [0.0, -1e-9]])  # numerically negative eigenvalues
    assert power_law_fit(x, k=500).k == 500
    assert power_law_fit(x, k="auto").xmin > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"values": []}, "`values` must be a non-empty 1-D"),
        ({"values": [[1.0, 2.0]]}, "`values` must be a non-empty 1-D"),
        ({"values": [1.0, np.nan, 2.0]}, "`values` must be finite"),
        ({"values": [3.0, 2.0, 0.0]}, r"`values` must be > 0 in the fitted tail \(the top k=3\)"),
        ({"values": [3.0, 2.0, -1.0], "k": 3}, "`values` must be > 0 in the fitted tail"),
        ({"values": [2.0, 2.0, 2.0]}, "`values` must hold at least two distinct values"),
        ({"values": [3.0, 2.0, 1.0], "k": 1}, r"`k` must be an integer >= 2, None or 'auto'; got 1"),
        ({"values": [3.0, 2.0, 1.0], "k": 4}, r"`k` must be an integer in \[2, 3\]; got 4"),
        ({"values": [3.0, 2.0, 1.0], "k": "best"}, "`k` must be an integer >= 2, None or 'auto'; got 'best'"),
        ({"values": [3.0, 2.0, 1.0], "k": 2, "xmin": 1.0}, "at most one of `k` and `xmin`"),
        ({"values": [3.0, 2.0, 1.0], "xmin": 2.5}, "`xmin` must leave at least 2 values"),
        ({"values": [3.0, 2.0, 1.0], "xmin": 0.0}, r"`xmin` must be a float in \(0, inf\]"),
        ({"values": [3.0, 2.0, 1.0], "k": "auto"}, "`k_min` must be an integer in \\[2, 3\\]"),
        ({"values": [3.0, 2.0, 1.0, 0.0], "k": "auto", "k_min": 3, "n_candidates": 0}, "`n_candidates` must be an integer"),
    ],
)
def test_power_law_fit_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        power_law_fit(**kwargs)


def test_auto_needs_k_min_positive_values():
    with pytest.raises(ValueError, match="`values` must hold at least `k_min`=3 positive values"):
        power_law_fit([3.0, 2.0, 0.0, 0.0], k="auto", k_min=3)


# ---------------------------------------------------------------- rank_fit


def test_rank_fit_exact_on_zipf_and_matches_linregress():
    fit = rank_fit(3.0 * np.arange(1, 2001) ** -1.3, k=1000)
    assert (fit.s, fit.scale, fit.r2) == pytest.approx((1.3, 3.0, 1.0), rel=1e-12)
    noisy = np.arange(1, 501) ** -0.9 * np.exp(0.2 * np.random.default_rng(19).normal(size=500))
    fit = rank_fit(noisy)
    ref = stats.linregress(np.log(np.arange(1, 501)), np.log(np.sort(noisy)[::-1]))
    assert (fit.s, fit.scale, fit.r2) == pytest.approx((-ref.slope, math.exp(ref.intercept), ref.rvalue**2), rel=1e-10)
    assert fit.r2 < 0.999


@pytest.mark.parametrize(
    "values, k, match",
    [([], None, "`values` must be a non-empty"), ([1.0], None, "`values` must hold at least 2 values"),
     ([2.0, 1.0, 0.0], None, r"> 0 in the top k=3"), ([2.0, 1.0], 3, r"`k` must be an integer in \[2, 2\]")],
)
def test_rank_fit_bad_input(values, k, match):
    with pytest.raises(ValueError, match=match):
        rank_fit(values, k=k)


# ---------------------------------------------------------------- normality_test


def test_normality_pass_rate_on_gaussian_columns():
    n_cols = 2000
    res = normality_test(np.random.default_rng(20).normal(3.0, 1e-6, size=(500, n_cols)))
    assert res.p_values.shape == (n_cols,)
    assert abs(res.pass_rate - (1 - ALPHA)) < rate_band(ALPHA, n_cols)


@pytest.mark.parametrize("df", [2, 3])
def test_normality_rejects_student_t(df):
    """K^2 has power > 0.999 against t_2 and t_3 at n = 2000 (20000-replicate check), so the pass
    rate over 500 columns is below 0.001 + 4 sqrt(0.001 / 500) < 0.01."""
    res = normality_test(np.random.default_rng(21).standard_t(df, size=(500, 2000)), axis=1)
    assert res.p_values.shape == (500,)
    assert res.pass_rate < 0.01


def test_whitening_is_location_scale_invariant():
    x = np.random.default_rng(22).standard_t(5, size=(200, 30))
    ref = stats.normaltest(x, axis=0).pvalue
    np.testing.assert_allclose(normality_test(1e-3 * x + 4.0).p_values, ref, rtol=1e-8)
    np.testing.assert_allclose(normality_test(x, whiten=False).p_values, ref, rtol=1e-12)
    np.testing.assert_allclose(normality_test(x.T, axis=-1).p_values, ref, rtol=1e-8)


def test_constant_set_counts_as_rejected():
    x = np.random.default_rng(23).normal(size=(50, 3))
    x[:, 1] = 2.0
    res = normality_test(x)
    assert np.isnan(res.p_values[1]) and np.all(np.isfinite(res.p_values[[0, 2]]))
    assert res.pass_rate <= 2 / 3


@pytest.mark.parametrize(
    "samples, kwargs, match",
    [
        (np.zeros((0,)), {}, "`samples` must be a non-empty 1-D or 2-D"),
        (np.zeros((20, 2, 2)), {}, "`samples` must be a non-empty 1-D or 2-D"),
        (np.full(30, np.nan), {}, "`samples` must be finite"),
        (np.ones((10, 5)), {}, "`samples` must have at least 20 values along `axis`=0; got 10"),
        (np.ones((30, 5)), {"axis": 2}, r"`axis` must be an integer in \[-2, 1\]"),
        (np.ones((30, 5)), {"alpha": 1.5}, r"`alpha` must be a float in \(0, 1\)"),
    ],
)
def test_normality_bad_input(samples, kwargs, match):
    with pytest.raises(ValueError, match=match):
        normality_test(samples, **kwargs)


# ---------------------------------------------------------------- gradient_history_tests

T_ITER, P_COORD = 400, 4000
# Per-coordinate noise scales at exact Pareto quantiles (tail exponent 1.5): each coordinate is
# Gaussian over iterations, while one iteration's gradient is a Gaussian scale mixture whose
# magnitudes have an exact Pareto tail above ~5 (P(sigma |Z| > x) = E|Z|^1.5 x^-1.5 there).
SIGMA = (1.0 - (np.arange(P_COORD) + 0.5) / P_COORD) ** (-1.0 / 1.5)


@pytest.fixture(scope="module")
def history():
    return np.random.default_rng(24).normal(size=(T_ITER, P_COORD)) * SIGMA


@pytest.fixture(scope="module")
def table(history):
    return gradient_history_tests(history, k_power=200, n_normal=None, seed=0)


def test_table_dimension_wise_is_power_law(table):
    """Rows: the top 200 of 4000 magnitudes lie in the exact Pareto tail, so the KS test accepts at
    >= 1 - alpha; K^2 on 4000 values of a Pareto scale mixture rejects (power ~1)."""
    row = table["dimension"]
    assert row.n_tests == T_ITER
    assert row.ks_critical == pytest.approx(KS_COEF / math.sqrt(200))
    assert row.power_law_rate >= 1 - ALPHA - rate_band(ALPHA, T_ITER)
    assert row.gaussian_rate <= ALPHA + rate_band(ALPHA, T_ITER)
    assert row.ks_mean < row.ks_critical
    assert abs(row.beta_median - 2.5) < 4 * 1.5 / math.sqrt(200)  # one row's se; the tail exponent is 1 + 1.5


def test_table_normality_uses_random_entries(history):
    """Xie's setting, 100 random entries per row: the smallest 100 scales are nearly equal (so the first
    100 coordinates alone would look Gaussian), but a random 100 mix scales and the rows fail."""
    row = gradient_history_tests(history, k_power=200, max_tests=100, seed=2)["dimension"]
    assert normality_test(history[:, :100], axis=1).pass_rate > 1 - ALPHA - rate_band(ALPHA, T_ITER)
    assert row.gaussian_rate <= ALPHA + rate_band(ALPHA, 100)


def test_table_iteration_wise_is_gaussian(table):
    """Columns are exactly Gaussian: pass rate 1 - alpha within the binomial band; the top half of
    400 half-normal magnitudes is not a power law."""
    for kind in ("iteration", "noise"):
        row = table[kind]
        assert row.n_tests == P_COORD
        assert abs(row.gaussian_rate - (1 - ALPHA)) < rate_band(ALPHA, P_COORD)
        assert row.power_law_rate <= ALPHA
        assert row.ks_mean > row.ks_critical
    # centring is invisible to the (standardised) normality test
    assert table["noise"].gaussian_rate == table["iteration"].gaussian_rate
    assert table["noise"].p_value_mean == pytest.approx(table["iteration"].p_value_mean, rel=1e-9)


def test_diagonal_whitening_makes_rows_gaussian(history):
    """Dividing by the per-coordinate scale whitens the (diagonal) noise covariance: the rows become
    iid Gaussian and pass at 1 - alpha (the docstring's point about whitening a noise matrix)."""
    row = gradient_history_tests(history / SIGMA, k_power=200, n_normal=None, max_tests=10, seed=1)["dimension"]
    full = gradient_history_tests(history / SIGMA, k_power=200, n_normal=None, seed=1)["dimension"]
    assert row.n_tests == 10
    assert abs(full.gaussian_rate - (1 - ALPHA)) < rate_band(ALPHA, T_ITER)
    # Its power-law rate is not ~0: the top 5% of Gaussian magnitudes pass the KS test against a
    # steep power law in ~75% of rows; the fitted exponent tells them apart (local slope x^2 + 1 ~ 5-9).
    assert full.beta_median > 4.0


def test_noise_removes_the_mean_gradient(history):
    shift = 50.0 * np.random.default_rng(25).normal(size=P_COORD)
    a = gradient_history_tests(history[:, :500], k_power=200, max_tests=200, seed=3)
    b = gradient_history_tests(history[:, :500] + shift[:500], k_power=200, max_tests=200, seed=3)
    assert b["noise"].ks_mean == pytest.approx(a["noise"].ks_mean, rel=1e-9)
    assert b["noise"].power_law_rate == a["noise"].power_law_rate
    assert b["iteration"].ks_mean != pytest.approx(a["iteration"].ks_mean, rel=1e-3)


def test_subsampling_is_seeded(history):
    g = history[:100, :300]
    a = gradient_history_tests(g, k_power=50, max_tests=40, seed=5)
    assert a == gradient_history_tests(g, k_power=50, max_tests=40, seed=5)
    assert a != gradient_history_tests(g, k_power=50, max_tests=40, seed=6)
    assert {row.n_tests for row in a.values()} == {40}


@pytest.mark.parametrize(
    "G, kwargs, match",
    [
        (np.ones(50), {}, "`G` must be a non-empty 2-D"),
        (np.full((30, 30), np.inf), {}, "`G` must be finite"),
        (np.ones((10, 30)), {}, "`G` must have at least 20 rows and 20 columns"),
        (np.ones((30, 30)), {"k_power": 1}, "`k_power` must be an integer"),
        (np.ones((30, 30)), {"n_normal": 5}, r"`n_normal` must be an integer in \[20, 1099511627776\]"),
        (np.ones((30, 30)), {"max_tests": 0}, "`max_tests` must be an integer"),
        (np.ones((30, 30)), {"alpha": 0.0}, "`alpha` must be a float"),
    ],
)
def test_gradient_history_bad_input(G, kwargs, match):
    with pytest.raises(ValueError, match=match):
        gradient_history_tests(G, **kwargs)


def test_zero_gradients_fail_both_tests():
    g = np.zeros((30, 40))
    g[:, :20] = np.random.default_rng(26).normal(size=(30, 20))
    res = gradient_history_tests(g, k_power=10)
    assert res["iteration"].power_law_rate <= 0.5 and res["iteration"].gaussian_rate <= 0.5  # 20 dead coordinates


# ---------------------------------------------------------------- eigengaps and Davis-Kahan


def test_eigengaps_of_zipf_follow_eq4():
    k = np.arange(1, 301)
    lam = 2.0 * k**-1.2
    gaps = eigengaps(np.random.default_rng(27).permutation(lam))
    np.testing.assert_allclose(gaps, lam[:-1] * (1 - (k[:-1] / k[1:]) ** 1.2), rtol=1e-12)
    two = eigengaps(lam, two_sided=True)
    assert two.shape == (300,) and two[0] == gaps[0] and two[-1] == gaps[-1]
    np.testing.assert_allclose(two[1:-1], np.minimum(gaps[:-1], gaps[1:]))


def _angle_sines(A, B):
    """sin of the angle between matching eigenvectors (descending eigenvalues) of symmetric A and B."""
    u, v = np.linalg.eigh(A)[1][:, ::-1], np.linalg.eigh(B)[1][:, ::-1]
    return np.sqrt(np.clip(1 - np.sum(u * v, axis=0) ** 2, 0, None))


def test_davis_kahan_bound_holds():
    rng = np.random.default_rng(28)
    n = 8
    lam = np.arange(1, n + 1) ** -1.0
    q = np.linalg.qr(rng.normal(size=(n, n)))[0]
    C = (q * lam) @ q.T
    gap = eigengaps(lam, two_sided=True)
    informative = 0
    for eps in (1e-3, 1e-2, 3e-2):
        for _ in range(20):
            M = rng.normal(size=(n, n))
            E = eps * (M + M.T) / 2
            bound = davis_kahan_bound(np.linalg.norm(E, 2), gap)
            assert np.all(_angle_sines(C, C + E) <= bound)
            informative += np.sum(bound < 1)
    assert informative > 0


def test_davis_kahan_factor_two_is_nearly_attained():
    """C = diag(1, 0), E = eps [[0, 1], [1, 0]]: sin theta = sin(atan(2 eps) / 2) ≈ eps, bound 2 eps / 1."""
    eps = 1e-3
    sin = _angle_sines(np.diag([1.0, 0.0]), np.array([[1.0, eps], [eps, 0.0]]))
    bound = davis_kahan_bound(eps, eigengaps([1.0, 0.0], two_sided=True))
    np.testing.assert_allclose(sin, np.sin(np.arctan(2 * eps) / 2), rtol=1e-6)
    assert np.all(2 * sin <= bound) and np.all(bound < 2.001 * sin)


def test_davis_kahan_values_and_bad_input():
    assert davis_kahan_bound(0.1, 0.5) == pytest.approx(0.4)
    np.testing.assert_array_equal(davis_kahan_bound([0.0, 1.0, 1.0], [0.0, 0.0, np.inf]), [0.0, np.inf, 0.0])
    with pytest.raises(ValueError, match="`perturbation_norm` must be finite and >= 0"):
        davis_kahan_bound(-1.0, 1.0)
    with pytest.raises(ValueError, match="`gap` must be finite or \\+inf; got 1 NaN or -inf entries"):
        davis_kahan_bound(1.0, np.nan)
    with pytest.raises(ValueError, match="`eigenvalues` must hold at least 2 values"):
        eigengaps([1.0])
    with pytest.raises(ValueError, match="`eigenvalues` must be finite"):
        eigengaps([1.0, np.inf])
