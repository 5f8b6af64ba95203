"""deepmodels: Hessian tools against a dense Hessian, Gram-trick spectra against dense matrices, and the
gradient-mean estimators on a network."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from deepmodels import data, hessian, models, pergrad, probes, spectra
from toymodels.schema import validate


@pytest.fixture(scope="module")
def tiny():
    d = data.digits(seed=0)
    model = models.mlp(64, 4, (6,), seed=1).double()
    mask = d.y_train < 4
    return model, d.x_train[mask][:80].double(), d.y_train[mask][:80]


def _dense_hessian(model, x, y):
    names = [k for k, p in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat):
        parts = torch.split(flat, sizes)
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat0)


def test_hvp_and_lanczos_match_the_dense_hessian(tiny):
    model, x, y = tiny
    H = _dense_hessian(model, x, y)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hessian.hvp(model, F.cross_entropy, x, y, v), H @ v, rtol=1e-8, atol=1e-10)
    dense = np.sort(np.linalg.eigvalsh(H.numpy()))[::-1]
    top = hessian.top_eigenvalues(model, F.cross_entropy, x, y, k=4, tol=1e-10)
    np.testing.assert_allclose(top, dense[:4], rtol=1e-6, atol=1e-9)


def test_hutchinson_trace_within_its_error(tiny):
    model, x, y = tiny
    exact = float(torch.trace(_dense_hessian(model, x, y)))
    est, se = hessian.hutchinson_trace(model, F.cross_entropy, x, y, n_samples=400, seed=1)
    assert abs(est - exact) < 4 * se
    assert se < 0.5 * abs(exact)  # informative


def test_rayleigh_quotients(tiny):
    model, x, y = tiny
    H = _dense_hessian(model, x, y)
    G = pergrad.flatten(pergrad.per_example_grads(model, F.cross_entropy, x, y))
    C = torch.cov(G.T, correction=0)
    V = torch.randn(3, H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ds = hessian.rayleigh_quotients(model, F.cross_entropy, x, y, V)
    validate(ds)
    Vn = V / V.norm(dim=1, keepdim=True)
    np.testing.assert_allclose(ds.curvature.values, torch.einsum("mp,pq,mq->m", Vn, H, Vn).numpy(), rtol=1e-8)
    np.testing.assert_allclose(ds.noise_variance.values, torch.einsum("mp,pq,mq->m", Vn, C, Vn).numpy(), rtol=1e-8)


def test_gram_spectra_equal_the_dense_matrices(tiny):
    model, x, y = tiny
    M = spectra.gradient_history(model, F.cross_entropy, x, y, batch_size=8, n_batches=12, seed=0)
    second, cov = spectra.gram_spectra(M)
    T = M.shape[0]
    dense2 = np.sort(np.linalg.eigvalsh((M.T @ M / T).numpy()))[::-1][:T]
    Mc = M - M.mean(0)
    densec = np.sort(np.linalg.eigvalsh((Mc.T @ Mc / T).numpy()))[::-1][:T]
    np.testing.assert_allclose(second, dense2, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(cov[:-1], densec[:-1], rtol=1e-8, atol=1e-12)  # centring removes one direction
    assert cov[-1] < 1e-12
    ds = spectra.gradient_spectra(model, F.cross_entropy, x, y, batch_size=8, n_batches=12)
    validate(ds)


def test_network_estimators(tiny):
    """On a network's per-example gradients: SG-2B has half SG-B's variance (exactly and within the
    sampling error of draws), SVRG at its own snapshot is exact, all estimators are unbiased."""
    model, x, y = tiny
    ds = probes.estimator_stats(model, F.cross_entropy, x, y, 8, snapshot=copy.deepcopy(model), n_samples=4000,
                                seed=0)
    validate(ds)
    v = ds.grad_var
    assert float(v.sel(estimator="sg_2b")) == pytest.approx(float(v.sel(estimator="sg_b")) / 2, rel=1e-12)
    assert float(v.sel(estimator="svrg")) < 1e-20
    # sampled variances agree with the exact ones (4000 draws: ~2-3% relative error)
    for name in ("sg_b", "sg_2b", "gc"):
        assert float(ds.grad_var_sampled.sel(estimator=name)) == pytest.approx(float(v.sel(estimator=name)), rel=0.12)
    from toymodels import estimators

    G = pergrad.flatten(pergrad.per_example_grads(model, F.cross_entropy, x, y)).numpy()
    rng = np.random.default_rng(3)
    for draws in (estimators.sample_sg(G, 8, 20000, rng), estimators.sample_gc(G, estimators.gradient_clustering(G, 8)[0], 20000, rng)):
        se = draws.std(0) / np.sqrt(draws.shape[0])
        assert np.all(np.abs(draws.mean(0) - G.mean(0)) < 4.5 * se + 1e-15)


def test_bad_input(tiny):
    model, x, y = tiny
    with pytest.raises(ValueError, match="`v` must have shape"):
        hessian.hvp(model, F.cross_entropy, x, y, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="`k` must be an int"):
        hessian.top_eigenvalues(model, F.cross_entropy, x, y, k=0)
    with pytest.raises(ValueError, match=r"`n_batches` must be an integer in \[2, "):
        spectra.gradient_history(model, F.cross_entropy, x, y, batch_size=4, n_batches=1)
    with pytest.raises(ValueError, match="not finite"):
        hessian.hvp(model, F.cross_entropy, x * float("nan"), y, torch.zeros(1))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_rank1_clustering_variance_and_distances(kind):
    """Prop. 3.1's variance from per-cluster sums equals toymodels' on materialised gradients, and the
    rank-1 A-step distances equal |C_k - g_i|^2 computed densely."""
    from deepmodels.cluster import Rank1Clustering, _layer_data
    from toymodels import estimators

    if kind == "mlp":
        d = data.digits(seed=0, duplicates=0.5)
        model, x, y = models.mlp(64, 10, (16,), seed=2).double(), d.x_train[:120].double(), d.y_train[:120]
    else:
        d = data.digits(seed=0, flatten=False, duplicates=0.5)
        model, x, y = models.cnn(1, 10, 8, width=4, seed=2).double(), d.x_train[:120].double(), d.y_train[:120]
    gc = Rank1Clustering(model, 8, seed=0).fit(F.cross_entropy, x, y, n_iter=4)
    G = pergrad.flatten(pergrad.per_example_grads(model, F.cross_entropy, x, y)).numpy()
    assert gc.variance(F.cross_entropy, x, y) == pytest.approx(estimators.gc_variance(G, gc.assign), rel=1e-9)
    assert gc.variance(F.cross_entropy, x, y) < estimators.sg_variance(G, 8)  # duplicates are exploited
    # distances: rank-1 centres made dense
    layers = _layer_data(model, F.cross_entropy, x, y)
    centres = gc._centres(layers, torch.as_tensor(gc.assign))
    dist = gc._distances(layers, centres).numpy()
    grads = pergrad.per_example_grads(model, F.cross_entropy, x, y)
    dense = np.zeros_like(dist)
    for name, (c, e, cb) in centres.items():
        gw = grads[f"{name}.weight"].reshape(x.shape[0], c.shape[1], -1)
        C = torch.einsum("ko,kp->kop", c, e)
        dense += ((gw[:, None] - C[None]) ** 2).sum((2, 3)).numpy()
        dense += ((grads[f"{name}.bias"][:, None] - cb[None]) ** 2).sum(2).numpy()
    np.testing.assert_allclose(dist, dense, rtol=1e-8, atol=1e-10)
