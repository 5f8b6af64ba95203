"""Gradient-mean estimators: exact variances vs draws and vs brute-force enumeration (Faghri et al.)."""

import itertools

import numpy as np
import pytest

from toymodels import estimators as est
from toymodels.schema import validate


def _grads(n=120, p=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, p)) * np.linspace(1.0, 0.2, p) + 0.3


def _sampled_trace(draws):
    """The trace of the sample covariance and its standard error."""
    dev = np.sum((draws - draws.mean(axis=0)) ** 2, axis=1)
    return dev.mean() * draws.shape[0] / (draws.shape[0] - 1), dev.std() / np.sqrt(draws.shape[0])


def test_sg_2b_is_half_of_sg_b_and_draws_agree():
    G = _grads()
    assert est.sg_variance(G, 16) == pytest.approx(est.sg_variance(G, 8) / 2, rel=1e-14)
    rng = np.random.default_rng(1)
    for bs in (8, 16):
        v, se = _sampled_trace(est.sample_sg(G, bs, 20_000, rng))
        assert abs(v - est.sg_variance(G, bs)) < 4 * se


def test_gc_is_unbiased_and_its_variance_is_prop_3_1():
    G = _grads(n=10, p=3, seed=2)
    assign = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    # brute force: every combination of one example per cluster is equally likely
    clusters = [np.flatnonzero(assign == k) for k in range(4)]
    combos = np.array([sum(len(c) * G[j] for c, j in zip(clusters, pick)) / 10
                       for pick in itertools.product(*clusters)])
    np.testing.assert_allclose(combos.mean(axis=0), G.mean(axis=0), rtol=1e-12)  # unbiased
    exact_trace = np.sum(combos.var(axis=0))
    assert est.gc_variance(G, assign) == pytest.approx(exact_trace, rel=1e-12)
    # and the sampler draws from that distribution
    draws = est.sample_gc(G, assign, 40_000, np.random.default_rng(3))
    v, se = _sampled_trace(draws)
    assert abs(v - exact_trace) < 4 * se
    sem = draws.std(axis=0) / np.sqrt(draws.shape[0])
    assert np.all(np.abs(draws.mean(axis=0) - G.mean(axis=0)) < 4 * sem)


def test_clustering_objective_and_quality():
    G = _grads(n=200, p=5, seed=4)
    assign, obj = est.gradient_clustering(G, 10, n_iter=15, seed=0)
    assert assign.shape == (200,) and set(np.unique(assign)) == set(range(10))
    assert obj == pytest.approx(200**2 * est.gc_variance(G, assign), rel=1e-10)
    random = np.random.default_rng(0).integers(0, 10, size=200)
    assert est.gc_variance(G, assign) < est.gc_variance(G, random)
    assert est.gc_variance(G, assign) < est.sg_variance(G, 10)  # it exploits structure in the gradients


def test_gc_gains_with_duplicates():
    """5 points repeated to make up a growing share of the data: GC's variance relative to SG-B falls."""
    rng = np.random.default_rng(5)
    ratios = []
    for share in (0.1, 0.5, 0.9):
        n = 200
        n_dup = int(share * n)
        base = rng.normal(size=(5, 8))
        G = np.concatenate([base[np.arange(n_dup) % 5], rng.normal(size=(n - n_dup, 8))])
        assign, _ = est.gradient_clustering(G, 10, n_iter=20, seed=1)
        ratios.append(est.gc_variance(G, assign) / est.sg_variance(G, 10))
    assert ratios[0] > ratios[1] > ratios[2]


def test_svrg_variance():
    G = _grads(seed=6)
    assert est.svrg_variance(G, G, 4) == 0.0  # at the snapshot the control variate is exact
    snap = G + 0.1 * np.random.default_rng(7).normal(size=G.shape)
    v, se = _sampled_trace(est.sample_svrg(G, snap, 4, 20_000, np.random.default_rng(8)))
    assert abs(v - est.svrg_variance(G, snap, 4)) < 4 * se
    assert est.svrg_variance(G, snap, 4) < est.sg_variance(G, 4)


def test_estimator_stats_dataset():
    G = _grads(seed=9)
    assign, _ = est.gradient_clustering(G, 8, seed=0)
    ds = est.estimator_stats(G, 8, assign=assign, G_snapshot=G * 0.9, n_samples=5000, seed=0)
    validate(ds)
    assert list(ds.estimator.values) == ["sg_b", "sg_2b", "svrg", "gc"]
    assert ds.grad_var.sel(estimator="sg_2b") == pytest.approx(ds.grad_var.sel(estimator="sg_b") / 2)
    np.testing.assert_allclose(ds.grad_var_sampled, ds.grad_var, rtol=0.1)
    v = ds.grad_var.values * G.shape[1]
    np.testing.assert_allclose(ds.grad_nvar, v / (ds.attrs["grad_norm_sq"] + v))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: est.sg_variance(np.ones(3), 2), "`G` must be a non-empty 2-D array"),
        (lambda: est.sg_variance(np.array([[np.nan]]), 1), "`G` must be finite"),
        (lambda: est.sg_variance(np.ones((3, 2)), 0), "`batch_size` must be"),
        (lambda: est.gc_variance(np.ones((3, 2)), [0, 1]), "`assign` must be non-negative integer cluster labels of shape \\(3,\\)"),
        (lambda: est.svrg_variance(np.ones((3, 2)), np.ones((2, 2)), 1), "`G_snapshot` must have the shape"),
        (lambda: est.gradient_clustering(np.ones((3, 2)), 4), "`n_clusters` must be"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
