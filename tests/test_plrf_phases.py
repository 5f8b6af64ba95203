"""The compute-optimal phase diagram of power-law random features (Paquette, Paquette, Xiao and
Pennington 2024, "4+3 Phases of Compute-Optimal Neural Scaling Laws", Sec. 3): the phase map, its
exponents against an independent minimisation of the four-term risk, a closed-form case recovered
from exact risks (default), and the exact frontier against the theory per reachable phase (slow)."""

import math

import numpy as np
import pytest

from toymodels import SGD
from toymodels.plrf import (PHASES, PowerLawRF, compute_optimal_frontier, frontier_exponents, phase,
                            plrf_frontier)

POINTS = {"Ia": (1.0, 0.3), "Ib": (0.4, 0.3), "Ic": (0.2, 0.8), "II": (1.5, 1.0), "III": (1.0, 1.5),
          "IVa": (0.4, 0.8), "IVb": (0.27, 0.8)}


def test_phase_map():
    assert {phase(*ab) for ab in POINTS.values()} == set(PHASES)
    for name, ab in POINTS.items():
        assert phase(*ab) == name
    assert phase(1.0, 0.7) == "II" and phase(0.6, 0.7) == "III"
    with pytest.raises(ValueError, match="`beta`"):
        phase(0.2, 0.3)  # 2 (alpha + beta) = 1: the risk diverges with v
    with pytest.raises(ValueError, match="`beta`"):
        frontier_exponents(0.2, 0.3)


def _four_term_exponents(alpha, beta, logf=(400.0, 800.0)):
    """(xi, eta) by minimising, in log space on a fine grid of log d, the risk as the sum of the four
    terms of Paquette et al. 2024 Sec. 2 with unit constants at budgets F = e^logf (B = 1):
    tau = gamma F / d with gamma = 1 (2 alpha > 1) or d^(2 alpha - 1) (v ~ d); F_pp = tau^-a;
    F_ac = d^-1 tau^(-1 + 1/(2 alpha)) (2 beta > 1; d^(-2 alpha) below the high-dimensional line);
    F_0 = d^(-2 alpha + max(0, 1 - 2 beta)); K_pp = gamma tau^(-2 + 1/(2 alpha)) (alpha > 1/4), gamma
    d^(1 - 4 alpha) (alpha < 1/4).  Independent of frontier_exponents' case analysis."""
    a = (2 * alpha + 2 * beta - 1) / (2 * alpha)
    out = []
    for lf in logf:
        x = np.linspace(0.0, lf, 400001)  # log d
        lgam = np.zeros_like(x) if 2 * alpha > 1 else (2 * alpha - 1) * x
        lt = lgam + lf - x
        terms = [-a * lt, (-2 * alpha + max(0.0, 1 - 2 * beta)) * x]
        if 2 * beta > 1:
            terms.append(-x + (-1 + 1 / (2 * alpha)) * lt if 2 * alpha > 1 else -2 * alpha * x)
        terms.append(lgam + (-2 + 1 / (2 * alpha)) * lt if 4 * alpha > 1 else lgam + (1 - 4 * alpha) * x)
        total = np.logaddexp.reduce(np.array(terms), axis=0)
        i = int(np.argmin(total))
        out.append((x[i], total[i]))
    (x0, l0), (x1, l1) = out
    return (x1 - x0) / (logf[1] - logf[0]), -(l1 - l0) / (logf[1] - logf[0])


@pytest.mark.parametrize("alpha, beta", [(1.0, 0.3), (2.0, 0.1), (0.7, 0.45), (0.4, 0.3), (0.3, 0.45), (0.2, 0.4),
                                         (0.2, 0.8), (0.1, 1.5), (1.5, 1.0), (1.0, 0.7), (3.0, 2.0), (1.0, 1.5),
                                         (0.6, 3.0), (0.4, 0.8), (0.45, 2.0), (0.27, 0.8), (0.26, 1.5)])
def test_exponents_are_the_balance_of_the_four_terms(alpha, beta):
    """The table of frontier_exponents against a brute-force minimisation of the four-term risk; the
    grid step 2e-3 in log d over a factor 2 in log F bounds the error of the slopes by ~1e-5,
    and the unit constants shift d* by O(1) factors, i.e. by O(1 / log F) = 3e-3 in the slopes."""
    xi, eta = _four_term_exponents(alpha, beta)
    xi_t, eta_t = frontier_exponents(alpha, beta)
    assert xi == pytest.approx(xi_t, abs=5e-3), phase(alpha, beta)
    assert eta == pytest.approx(eta_t, abs=5e-3), phase(alpha, beta)


def test_exponents_are_continuous_across_the_phase_lines():
    """Every boundary but alpha = 1 - 1/sqrt(2) (IVa / IVb), where only xi jumps."""
    e = 1e-7
    for (a0, b0), (a1, b1) in [((1.0, 0.5 - e), (1.0, 0.5 + e)), ((0.8, 0.8 - e), (0.8, 0.8 + e)),
                               ((0.5 + e, 0.3), (0.5 - e, 0.3)), ((0.5 + e, 0.8), (0.5 - e, 0.8)),
                               ((0.4, 0.5 - e), (0.4, 0.5 + e)), ((0.2, 0.5 - e), (0.2, 0.5 + e)),
                               ((0.25 + e, 0.8), (0.25 - e, 0.8))]:
        assert phase(a0, b0) != phase(a1, b1)
        np.testing.assert_allclose(frontier_exponents(a0, b0), frontier_exponents(a1, b1), atol=1e-5)
    a4 = 1 - 1 / math.sqrt(2)
    lo, hi = frontier_exponents(a4 - e, 0.8), frontier_exponents(a4 + e, 0.8)
    assert lo[1] == pytest.approx(hi[1], abs=1e-5) and hi[0] == 0.5 and lo[0] > 0.6


def _local_exponents(out, windows):
    """Least-squares slopes of log d* and -log L* against log F over the budgets whose d* lies in
    each window [d_lo, d_hi] (and not at a grid end)."""
    d, ok = out.d_opt.values, ~out.at_grid_end.values
    lf, ld, ll = np.log(out.flops.values), np.log(d), np.log(out.loss_opt.values)
    res = []
    for lo, hi in windows:
        m = ok & (d >= lo) & (d <= hi)
        assert m.sum() >= 4, (lo, hi, m.sum())
        res.append((np.polyfit(lf[m], ld[m], 1)[0], -np.polyfit(lf[m], ll[m], 1)[0]))
    return np.array(res)


def test_closed_form_frontier_of_exact_risks():
    """Phase Ia's exponents from exact SGD risks: features W = the first d coordinates (an orthogonal
    embedding, no seed), alpha = 1, beta = 0.3, d = 16...256, v = 2048, SGD at B = 1 and half the
    stable rate.  Then K = diag(j^(-2 alpha)), F_0 = 1/2 sum_{d < j <= v} j^(-2 alpha - 2 beta), and
    the frontier is the balance F_pp(F / d) = F_0(d) in closed form: xi = 1 / (2 alpha + 1) = 1/3,
    eta = (2 alpha + 2 beta - 1) / (2 alpha + 1) = 8/15 (the same as random features in Phase Ia).
    Tolerance: the local slopes over d* in [20, 100] and [40, 200] converge with the O(1 / d) lattice
    corrections of the sums and the SGD noise, K_pp / F_pp ~ tau^(-(alpha - beta) / alpha) <= 2% at
    the optimum tau ~ d^(2 alpha); a remaining error at most 0.01 plus twice the change between the
    two windows (corrections that at least halve per doubling of d*) is asserted."""
    alpha, beta, v = 1.0, 0.3, 2048
    ds = np.unique(np.round(np.geomspace(16, 256, 17)))
    fs = np.geomspace(1e3, 1e9, 25)
    L = np.empty((ds.size, fs.size))
    for i, d in enumerate(ds.astype(int)):
        model = PowerLawRF.from_features(alpha, beta, np.eye(v)[:, :d])
        opt = SGD(0.5 * model.stable_lr(SGD(1.0), 1))
        L[i] = model.loss_curve(opt, 1, np.floor(fs / d).astype(np.int64)).values
    out = compute_optimal_frontier(L, ds, fs)
    theory = np.array(frontier_exponents(alpha, beta))
    np.testing.assert_allclose(theory, [1 / 3, 8 / 15])
    (lo, hi) = _local_exponents(out, [(20, 100), (40, 200)])
    err, change = np.abs(hi - theory), np.abs(hi - lo)
    assert np.all(err <= 0.01 + 2 * change), (lo, hi, theory)
    assert np.all(np.abs(lo - theory) <= 0.02), (lo, theory)


def test_plrf_frontier_reports_the_phase():
    out = plrf_frontier(0.4, 0.8, np.array([8.0, 16.0]), np.array([1e3]), spectrum="exact")
    assert out.attrs["phase"] == "IVa" and out.attrs["v_per_d"] == 2.0 and out.attrs["v"] == 32
    assert (out.attrs["xi_theory"], out.attrs["eta_theory"]) == pytest.approx(frontier_exponents(0.4, 0.8))
    out = plrf_frontier(1.0, 0.7, np.array([8.0, 16.0]), np.array([1e3]), v=40)
    assert out.attrs["phase"] == "II" and out.attrs["v_per_d"] == 0.0 and out.attrs["v"] == 40
    assert out.attrs["xi_theory"] == pytest.approx(0.7 / 1.7)
