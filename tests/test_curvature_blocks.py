"""deepmodels.hessian: per-block spectra and traces against the dense Hessian's diagonal blocks, the
torch Lanczos against eigvalsh and ARPACK, and the spread over batches with the sample-size formula
against statistics of known distribution."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from deepmodels import hessian, models
from toymodels.schema import validate


@pytest.fixture(scope="module")
def small():
    """mlp(10, 3, (5,)) in float64 (73 parameters) on 60 random examples, with its dense Hessian."""
    g = torch.Generator().manual_seed(0)
    model = models.mlp(10, 3, (5,), seed=1).double()
    x = torch.randn(60, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (60,), generator=g)
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def loss(flat):
        parts = torch.split(flat, sizes)
        return F.cross_entropy(functional_call(model, {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}, (x,)), y)

    H = torch.autograd.functional.hessian(loss, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    offsets = dict(zip(names, np.split(np.arange(sum(sizes)), np.cumsum(sizes)[:-1])))
    return model, x, y, H, offsets


def _dense_top(H, idx, k):
    return np.sort(np.linalg.eigvalsh(H[np.ix_(idx, idx)].numpy()))[::-1][:k]


def test_lanczos_matches_eigvalsh_and_arpack(small):
    model, x, y, H, _ = small
    dense = np.sort(np.linalg.eigvalsh(H.numpy()))[::-1]
    vals, vecs = hessian.top_eigenpairs(model, F.cross_entropy, x, y, k=5, tol=1e-12)
    np.testing.assert_allclose(vals, dense[:5], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(vecs @ H, vecs * torch.as_tensor(vals)[:, None], rtol=0, atol=1e-8)  # eigenvectors
    arpack = hessian.top_eigenvalues(model, F.cross_entropy, x, y, k=5, tol=1e-12, method="arpack")
    np.testing.assert_allclose(vals, arpack, rtol=1e-9, atol=1e-12)


def test_lanczos_restarts_and_repeated_eigenvalues():
    """A basis of 12 on n = 300 restarts many times; multiplicities 2 and 3 at the top are found; the
    float32 operator gives float32 accuracy."""
    n = 300
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    spectrum = torch.cat([torch.tensor([10.0, 10.0, 9.0, 5.0, 5.0, 5.0], dtype=torch.float64),
                          torch.linspace(-3.0, 4.0, n - 6, dtype=torch.float64)])
    A = U @ torch.diag(spectrum) @ U.T
    v0 = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    vals, vecs, info = hessian.lanczos(lambda v: A @ v, n, 7, v0, tol=1e-12, ncv=16)
    np.testing.assert_allclose(vals, [10, 10, 9, 5, 5, 5, 4], rtol=1e-10)
    assert info["converged"] and info["n_restarts"] > 3
    torch.testing.assert_close(vecs @ vecs.T, torch.eye(7, dtype=torch.float64), rtol=0, atol=1e-10)
    A32 = A.float()
    vals32, _, info32 = hessian.lanczos(lambda v: A32 @ v, n, 3, v0.float(), tol=1e-6)
    np.testing.assert_allclose(vals32, [10, 10, 9], rtol=1e-5)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        hessian.lanczos(lambda v: A @ v, n, 7, v0, tol=1e-12, ncv=16, max_restarts=1)


def test_block_spectra_against_the_dense_diagonal_blocks(small):
    model, x, y, H, off = small
    ds = hessian.block_spectra(model, F.cross_entropy, x, y, k=5, n_samples=100, tol=1e-12, seed=2)
    validate(ds)
    assert list(ds.layer.values) == ["fc1", "out", "total"]
    blocks = {"fc1": np.concatenate([off["fc1.weight"], off["fc1.bias"]]),
              "out": np.concatenate([off["out.weight"], off["out.bias"]]), "total": np.arange(H.shape[0])}
    for name, idx in blocks.items():
        row = ds.sel(layer=name)
        np.testing.assert_allclose(row.eigenvalue.values, _dense_top(H, idx, 5), rtol=1e-9, atol=1e-12)
        exact = float(H[np.ix_(idx, idx)].trace())
        assert abs(float(row.hessian_trace) - exact) < 4 * float(row.hessian_trace_sem), name
        assert float(row.hessian_trace_sem) < 0.25 * abs(exact)  # informative
        assert float(row.n_params) == len(idx)
    # a user grouping (weights vs biases), one block smaller than k (NaN beyond its size)
    groups = {"weights": ["fc1.weight", "out.weight"], "biases": ["out.bias"]}
    ds = hessian.block_spectra(model, F.cross_entropy, x, y, k=5, blocks=groups, n_samples=0, tol=1e-12)
    validate(ds)
    assert "hessian_trace" not in ds
    w = np.concatenate([off["fc1.weight"], off["out.weight"]])
    np.testing.assert_allclose(ds.eigenvalue.sel(layer="weights"), _dense_top(H, w, 5), rtol=1e-9, atol=1e-12)
    b = ds.eigenvalue.sel(layer="biases").values
    np.testing.assert_allclose(b[:3], _dense_top(H, off["out.bias"], 3), rtol=1e-9, atol=1e-12)
    assert np.isnan(b[3:]).all()
    only_total = hessian.block_spectra(model, F.cross_entropy, x, y, k=2, blocks=None, n_samples=0)
    assert list(only_total.layer.values) == ["total"]


def test_samples_needed_formula_and_coverage():
    """n = ceil((sd / (rel_se |mean|))^2) exactly; over 1000 normal samples of size K = 8 the 90%
    interval covers the true n in 90% of them (binomial standard error 0.95%)."""
    rng = np.random.default_rng(0)
    v = rng.normal(3.0, 1.5, 40)
    r = hessian.samples_needed(v, 0.05)
    assert r["n"] == math.ceil((v.std(ddof=1) / (0.05 * v.mean())) ** 2)
    assert r["sem"] == pytest.approx(v.std(ddof=1) / math.sqrt(40)) and r["n_low"] <= r["n"] <= r["n_high"]
    mu, sigma, rel = 2.0, 1.0, 0.05
    truth = (sigma / (rel * mu)) ** 2  # 100
    R, K = 1000, 8
    covered = 0
    for draws in rng.normal(mu, sigma, (R, K)):
        res = hessian.samples_needed(draws, rel, level=0.9)
        covered += res["n_low"] <= truth <= res["n_high"]
    assert abs(covered / R - 0.9) < 4 * math.sqrt(0.9 * 0.1 / R)
    # a mean of zero needs infinitely many samples; an unresolved sign gives no upper end
    assert hessian.samples_needed(np.array([-1.0, 1.0]), 0.1)["n"] == math.inf
    assert hessian.samples_needed(np.array([0.1, -0.3, 0.5, -0.2]), 0.1)["n_high"] == math.inf


def test_batch_spread_of_a_statistic_with_known_distribution():
    """The statistic is the batch mean of a N(2, 3^2) feature: over 60 calls of 10 batches each, the
    mean lies within 4 standard errors and the 90% interval of the batches needed covers the truth
    (sd / sqrt(B) / (rel_se mu))^2 about 90% of the time."""
    N, B, rel = 5000, 9, 0.05
    g = torch.Generator().manual_seed(5)
    x = 2.0 + 3.0 * torch.randn(N, 1, generator=g)
    y = torch.zeros(N, dtype=torch.int64)
    model = models.mlp(1, 2, (), seed=0)
    pop_mean, pop_sd = float(x.mean()), float(x.std(correction=0))
    sd_batch = pop_sd / math.sqrt(B) * math.sqrt((N - B) / (N - 1))  # finite-population correction
    truth = (sd_batch / (rel * pop_mean)) ** 2  # 25

    def batch_mean(model, loss_fn, x, y):
        return float(x[:, 0].mean())

    R, covered, z = 60, 0, []
    for seed in range(R):
        ds = hessian.batch_spread(model, F.cross_entropy, (x, y), batch_mean, n_batches=10, batch_size=B, seed=seed,
                                  rel_se=rel, level=0.9)
        row = ds.sel(layer="total")
        z.append((float(row.spread_mean) - pop_mean) / float(row.spread_sem))
        covered += float(row.samples_needed_low) <= truth <= float(row.samples_needed_high)
    validate(ds)
    assert ds.spread_draws.shape == (10, 1) and ds.attrs["statistic"] == "batch_mean"
    assert np.all(np.abs(z) < 5)
    assert abs(np.mean(np.square(z)) - 1.29) < 0.6  # E t_9^2 = 9/7
    assert abs(covered / R - 0.9) < 4 * math.sqrt(0.9 * 0.1 / R)
    again = hessian.batch_spread(model, F.cross_entropy, (x, y), batch_mean, n_batches=10, batch_size=B, seed=R - 1,
                                 rel_se=rel)
    np.testing.assert_array_equal(again.spread_draws, ds.spread_draws)  # seeded


def test_batch_spread_curvature_and_gradient_statistics(small):
    model, x, y, _, _ = small
    top = hessian.batch_spread(model, F.cross_entropy, (x, y), "top_eigenvalue", n_batches=3, batch_size=20,
                               blocks="layers", tol=1e-8)
    validate(top)
    assert list(top.layer.values) == ["fc1", "out", "total"]
    idx = torch.randperm(60, generator=torch.Generator().manual_seed(0))[:20]  # the first batch of seed 0
    first = hessian.block_spectra(model, F.cross_entropy, x[idx], y[idx], 1, n_samples=0, tol=1e-8)
    np.testing.assert_allclose(top.spread_draws.isel(draw=0), first.eigenvalue.isel(mode=0), rtol=1e-6)
    tr = hessian.batch_spread(model, F.cross_entropy, (x, y), "hessian_trace", n_batches=3, batch_size=20,
                              n_samples=5)
    validate(tr)
    assert np.all(tr.probes_needed.values >= 1) and np.all(tr.probe_sd.values > 0)
    gn = hessian.batch_spread(model, F.cross_entropy, (x, y), "noise_scale", n_batches=3, batch_size=20)
    validate(gn)
    assert list(gn.layer.values) == ["fc1", "out", "total"] and np.all(gn.spread_sd.values > 0)


def test_bad_input_is_named(small):
    model, x, y, _, _ = small
    CE = F.cross_entropy
    with pytest.raises(ValueError, match="`blocks` must be a dict of trainable parameter names"):
        hessian.block_spectra(model, CE, x, y, blocks={"a": ["fc9.weight"]})
    with pytest.raises(ValueError, match="`blocks` must be a dict of disjoint blocks"):
        hessian.block_spectra(model, CE, x, y, blocks={"a": ["out.bias"], "b": ["out.bias", "out.weight"]})
    with pytest.raises(ValueError, match="`n_samples` must be 0"):
        hessian.block_spectra(model, CE, x, y, n_samples=1)
    with pytest.raises(ValueError, match="`k` must be an integer in"):
        hessian.block_spectra(model, CE, x, y, k=73)
    with pytest.raises(ValueError, match="`method` must be one of"):
        hessian.top_eigenvalues(model, CE, x, y, method="power")
    with pytest.raises(ValueError, match="`batch_size` must be at most"):
        hessian.batch_spread(model, CE, (x, y), "top_eigenvalue", batch_size=61)
    with pytest.raises(ValueError, match="`statistic` must be one of"):
        hessian.batch_spread(model, CE, (x, y), "largest_eigenvalue")
    with pytest.raises(ValueError, match="`ncv` must be an integer"):
        hessian.lanczos(lambda v: v, 50, 5, torch.ones(50), ncv=5)
    with pytest.raises(ValueError, match="`v0` must be a non-zero vector"):
        hessian.lanczos(lambda v: v, 50, 5, torch.zeros(50))
    with pytest.raises(ValueError, match="`values` must be a at least 2-entry"):
        hessian.samples_needed(np.array([1.0]))
