"""deepmodels: per-example gradients, the Linear fast path, probes, and the linear model vs toymodels.linreg."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepmodels import data, models, pergrad, probes
from toymodels import GaussianLinearRegression
from toymodels.schema import validate
from toymodels.stats import two_batch_estimates


@pytest.fixture(scope="module")
def digits():
    return data.digits(seed=0)


def _loop_grads(model, loss_fn, x, y):
    out = []
    for i in range(x.shape[0]):
        model.zero_grad()
        loss_fn(model(x[i:i + 1]), y[i:i + 1]).backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]))
    model.zero_grad()
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "rf"])
def test_per_example_grads_equal_a_loop(digits, kind):
    if kind == "cnn":
        d = data.digits(seed=0, flatten=False)
        model, x, y = models.cnn(1, 10, 8, width=4), d.x_train[:20], d.y_train[:20]
    elif kind == "rf":
        model, x, y = models.random_features(64, 30, 10), digits.x_train[:20], digits.y_train[:20]
    else:
        model, x, y = models.mlp(64, 10, (32,)), digits.x_train[:20], digits.y_train[:20]
    G = pergrad.flatten(pergrad.per_example_grads(model, F.cross_entropy, x, y, chunk_size=7))
    torch.testing.assert_close(G, _loop_grads(model, F.cross_entropy, x, y), rtol=1e-5, atol=1e-6)


def _assert_summaries_match(f, G):
    """A layer's hook summaries equal those of its per-example gradients G (B, P)."""
    torch.testing.assert_close(f["sum"], G.sum(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(f["sq_norms"], (G**2).sum(1), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(f["dots"], G @ G.mean(0), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(f["sum_sq"], (G**2).sum(0), rtol=1e-4, atol=1e-7)


def test_hook_summaries_equals_torch_func(digits, device):
    model = models.mlp(64, 10, (32, 16), seed=1).to(device)
    x, y = digits.x_train[:50].to(device), digits.y_train[:50].to(device)
    grads = pergrad.per_example_grads(model, F.cross_entropy, x, y)
    fast = pergrad.hook_summaries(model, F.cross_entropy, x, y)
    for layer, f in fast.items():
        _assert_summaries_match(f, torch.cat([grads[f"{layer}.weight"].reshape(50, -1), grads[f"{layer}.bias"]], dim=1))


def test_conv_fast_path_equals_torch_func(device):
    d = data.digits(seed=0, flatten=False).to(device)
    model = models.cnn(1, 10, 8, width=4, seed=3).to(device)
    x, y = d.x_train[:24], d.y_train[:24]
    grads = pergrad.per_example_grads(model, F.cross_entropy, x, y)
    fast = pergrad.hook_summaries(model, F.cross_entropy, x, y)
    assert set(fast) == {"conv1", "conv2", "fc1", "out"}  # two convolutions, two linear layers
    for layer, f in fast.items():
        _assert_summaries_match(f, torch.cat([grads[f"{layer}.weight"].reshape(24, -1), grads[f"{layer}.bias"]], dim=1))
    strided = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, stride=2, padding=1, dilation=1), torch.nn.Flatten(),
                                  torch.nn.Linear(48, 10)).to(device)
    grads = pergrad.per_example_grads(strided, F.cross_entropy, x, y)
    fast = pergrad.hook_summaries(strided, F.cross_entropy, x, y)
    G = torch.cat([grads["0.weight"].reshape(24, -1), grads["0.bias"]], dim=1)
    torch.testing.assert_close(fast["0"]["sq_norms"], (G**2).sum(1), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("work", [0, 10**9], ids=["grouped-conv", "patches-bmm"])
@pytest.mark.parametrize("conv", [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)),
                                  dict(kernel_size=3, stride=2, dilation=2, padding=2)])
def test_conv_per_example_branches_equal_torch_func(monkeypatch, work, conv, device):
    """Both ways of forming a Conv2d's per-example weight gradients (patches + batched matmul, grouped
    convolution) equal torch.func on strided, dilated and rectangular kernels; the patches equal F.unfold."""
    monkeypatch.setattr(pergrad, "_SMALL_WORK", work)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 2, 9, 8, generator=gen).to(device), torch.randint(0, 3, (6,), generator=gen).to(device)
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(2, 3, **conv).to(device)
    n_out = layer(x).flatten(1).shape[1]
    model = torch.nn.Sequential(layer, torch.nn.Flatten(), torch.nn.Linear(n_out, 3)).to(device)
    torch.testing.assert_close(pergrad._patches(x, layer), F.unfold(x, layer.kernel_size, dilation=layer.dilation,
                                                                     padding=layer.padding, stride=layer.stride))
    grads = pergrad.per_example_grads(model, F.cross_entropy, x, y)
    fast = pergrad.hook_summaries(model, F.cross_entropy, x, y)
    G = torch.cat([grads["0.weight"].reshape(6, -1), grads["0.bias"]], dim=1)
    torch.testing.assert_close(fast["0"]["sq_norms"], (G**2).sum(1), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fast["0"]["sum_sq"], (G**2).sum(0), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("layer, shape", [(torch.nn.Conv2d(4, 8, 3, stride=2), (4, 5, 5)),  # 4 output positions
                                          (torch.nn.Conv2d(8, 8, 2, padding=1, dilation=2), (8, 2, 2)),
                                          (torch.nn.Linear(20, 16), (3, 20))])  # 3 positions of a sequence
def test_norms_only_summaries_equal_torch_func(layer, shape, device):
    """Squared norms alone (as the every-step probe asks) through the T x T Gram matrices of layers
    with few output positions, and the mean gradient, equal torch.func."""
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(9, *shape, generator=gen).to(device), torch.randint(0, 3, (9,), generator=gen).to(device)
    torch.manual_seed(2)
    layer = copy.deepcopy(layer).to(device)  # (the parametrization's layer is shared by the devices)
    n_out = layer(x).flatten(1).shape[1]
    model = torch.nn.Sequential(layer, torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(n_out, 3)).to(device)
    n_pos = n_out // (layer.out_channels if isinstance(layer, torch.nn.Conv2d) else layer.out_features)
    w = layer.weight
    assert n_pos * (w.shape[0] + w[0].numel()) < w.shape[0] * w[0].numel()  # the Gram route is taken
    grads = pergrad.per_example_grads(model, F.cross_entropy, x, y)
    cap, _ = pergrad.capture_backward(model, F.cross_entropy, x, y)
    fast = cap.summaries(9, coordinate_sums=False, dots=False, sums=False)
    G = torch.cat([grads["0.weight"].reshape(9, -1), grads["0.bias"]], dim=1)
    torch.testing.assert_close(fast["0"]["sq_norms"], (G**2).sum(1), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fast["0"]["mean_norm_sq"], (G.mean(0) ** 2).sum(), rtol=1e-4, atol=1e-8)


def test_linear_on_sequences_fast_path_equals_torch_func(device):
    """A Linear layer on (B, L, features) inputs: its per-example gradient sums over the L positions."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 5, 4, generator=gen).to(device), torch.randint(0, 3, (7,), generator=gen).to(device)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Flatten(),
                                torch.nn.Linear(30, 3)).to(device)
    grads = pergrad.per_example_grads(model, F.cross_entropy, x, y)
    fast = pergrad.hook_summaries(model, F.cross_entropy, x, y, gram=True)
    G = torch.cat([grads["0.weight"].reshape(7, -1), grads["0.bias"]], dim=1)
    torch.testing.assert_close(fast["0"]["sq_norms"], (G**2).sum(1), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fast["0"]["dots"], G @ G.mean(0), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fast["0"]["sum_sq"], (G**2).sum(0), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fast["0"]["gram"], G @ G.T, rtol=1e-4, atol=1e-6)


def test_capture_per_example_grads_equal_torch_func(device):
    d = data.digits(seed=0, flatten=False).to(device)
    model = models.cnn(1, 10, 8, width=4, seed=3).to(device)
    x, y = d.x_train[:12], d.y_train[:12]
    cap, _ = pergrad.capture_backward(model, F.cross_entropy, x, y)
    got = cap.per_example_grads(12)
    want = pergrad.per_example_grads(model, F.cross_entropy, x, y)
    assert list(got) == list(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)


def test_probe_hooks_equal_func_and_schema(digits, device):
    model = models.mlp(64, 10, (32,), seed=2).to(device)
    x, y = digits.x_train[:64].to(device), digits.y_train[:64].to(device)
    a = probes.gradient_stats(model, F.cross_entropy, x, y, batch_size=16, method="hooks")
    b = probes.gradient_stats(model, F.cross_entropy, x, y, batch_size=16, method="func")
    validate(a)
    assert list(a.layer.values) == ["fc1", "out", "total"]
    for v in ("grad_norm_sq", "trace_cov", "grad_var", "grad_nvar", "noise_scale", "noise_scale_unbiased"):
        np.testing.assert_allclose(a[v].values, b[v].values, rtol=2e-4)
    # totals add up; grad_var is tr Sigma / (B P)
    np.testing.assert_allclose(a.trace_cov.sel(layer="total"), a.trace_cov.sel(layer=["fc1", "out"]).sum(), rtol=1e-12)
    np.testing.assert_allclose(a.grad_var, a.trace_cov / 16 / a.n_params, rtol=1e-12)
    cnn = models.cnn(1, 10, 8, width=4).to(device)
    d = data.digits(seed=0, flatten=False).to(device)
    c = probes.gradient_stats(cnn, F.cross_entropy, d.x_train[:32], d.y_train[:32])
    cf = probes.gradient_stats(cnn, F.cross_entropy, d.x_train[:32], d.y_train[:32], method="func")
    assert c.attrs["method"] == "hooks" and cf.attrs["method"] == "func"
    np.testing.assert_allclose(c.trace_cov.values, cf.trace_cov.values, rtol=2e-4)


def test_linear_model_statistics_equal_the_linreg_closed_form():
    """A torch linear model on Gaussian data with a teacher measures toymodels.linreg's gradient mean and
    covariance trace (label noise + batch noise) within 4 standard errors."""
    lam = np.array([1.0, 0.5, 0.25, 0.1])
    lr_model = GaussianLinearRegression(lam, w_star=np.array([1.0, -0.5, 0.3, 2.0]), noise_std=0.4)
    w = np.array([0.2, 0.1, -0.3, 1.0])
    rng = np.random.default_rng(0)
    n = 40_000
    x = rng.standard_normal((n, 4)) * np.sqrt(lam)
    t = x @ lr_model.w_star + 0.4 * rng.standard_normal(n)
    net = models.linear(4, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor(w[None, :], dtype=torch.float32))
    net = net.double()

    def loss_fn(out, target):
        return 0.5 * ((out.squeeze(-1) - target) ** 2).mean()

    ds = probes.gradient_stats(net, loss_fn, torch.tensor(x), torch.tensor(t), method="hooks")
    cov = lr_model.gradient_covariance(w)
    total = ds.sel(layer="total")
    assert abs(float(total.trace_cov) - np.trace(cov["label"] + cov["batch"])) < 4 * float(total.trace_cov_sem)
    g = torch.tensor(x) * (torch.tensor(x) @ torch.tensor(w) - torch.tensor(t))[:, None]
    se = g.std(0).numpy() / math.sqrt(n)
    assert np.all(np.abs(g.mean(0).numpy() - cov["mean"]) < 4 * se)
    g2_se = 2 * np.sqrt(np.sum((cov["mean"] * se) ** 2))
    assert abs(float(total.grad_norm_sq_unbiased) - np.sum(cov["mean"] ** 2)) < 4 * g2_se + 1e-12


def test_two_batch_estimates_are_unbiased():
    rng = np.random.default_rng(1)
    mu, sd, B = np.array([0.3, -0.2, 0.1]), 1.5, 8
    small, big = [], []
    for _ in range(20_000):
        g = mu + sd * rng.standard_normal((B, 3))
        small.append(np.mean(np.sum(g**2, axis=1)))
        big.append(np.sum(g.mean(0) ** 2))
    g2, tr = two_batch_estimates(np.array(small), 1.0, np.array(big), float(B))
    assert abs(g2.mean() - mu @ mu) < 4 * g2.std() / math.sqrt(g2.size)
    assert abs(tr.mean() - 3 * sd**2) < 4 * tr.std() / math.sqrt(tr.size)


def test_data_sets():
    a, b = data.digits(seed=3), data.digits(seed=3)
    assert torch.equal(a.x_train, b.x_train) and a.x_train.shape[1] == 64
    assert a.x_train.shape[0] + a.x_test.shape[0] == 1797
    noisy = data.digits(seed=3, label_noise=0.2)
    changed = (noisy.y_train != a.y_train).float().mean().item()
    assert changed == pytest.approx(0.2, abs=1 / a.y_train.numel())
    dup = data.digits(seed=3, duplicates=0.5)
    assert torch.unique(dup.x_train, dim=0).shape[0] == a.x_train.shape[0] - int(round(0.5 * a.x_train.shape[0])) + 5
    img = data.digits(flatten=False)
    assert img.x_train.shape[1:] == (1, 8, 8)


def test_bad_input(digits):
    model = models.mlp(64, 10, (8,))
    x, y = digits.x_train[:10], digits.y_train[:10]
    with pytest.raises(ValueError, match="`x` must be a non-empty batch"):
        pergrad.per_example_grads(model, F.cross_entropy, x[:0], y[:0])
    with pytest.raises(ValueError, match="`y` must have 10 entries"):
        probes.gradient_stats(model, F.cross_entropy, x, y[:5])
    with pytest.raises(ValueError, match="not finite"):
        probes.gradient_stats(model, F.cross_entropy, x * float("nan"), y)
    with pytest.raises(ValueError, match="`x` must be finite"):
        probes.gradient_stats(model, F.cross_entropy, x * float("nan"), y, method="func")
    bn = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 10))
    with pytest.raises(ValueError, match="BatchNorm in training mode"):
        pergrad.per_example_grads(bn, F.cross_entropy, x, y)
    with pytest.raises(ValueError, match="`method` must be"):
        probes.gradient_stats(model, F.cross_entropy, x, y, method="magic")
    with pytest.raises(ValueError, match="`label_noise` must be a float in \\[0, 1\\)"):
        data.digits(label_noise=1.5)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        data.load_mnist_npz("/nonexistent/mnist.npz")


def _params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_probes_do_not_disturb_training(digits):
    from deepmodels.train import probe_steps, train

    runs = []
    for at in ([0], probe_steps(30, every=5), probe_steps(30, n_log=6)):
        model = models.mlp(64, 10, (16,), seed=4)
        ds = train(model, digits, lr=0.1, batch_size=8, n_steps=30, probe_at=at, probe_size=32, progress=False)
        runs.append(_params(model))
        validate(ds)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    assert list(ds.step.values) == list(probe_steps(30, n_log=6))
    assert ds.loss.values[-1] < ds.loss.values[0]


def test_training_resumes_after_an_interruption(digits, tmp_path):
    from deepmodels.train import train

    class Stop(Exception):
        pass

    calls = {"n": 0}

    def flaky(out, target):
        if out.shape[0] == 8:  # training batches only (probes use 32 examples, evaluation all)
            calls["n"] += 1
            if calls["n"] == 13:
                raise Stop
        return F.cross_entropy(out, target)

    path = tmp_path / "run.nc"
    model = models.mlp(64, 10, (16,), seed=5)
    with pytest.raises(Stop):
        train(model, digits, lr=0.1, batch_size=8, n_steps=20, probe_at=[0, 10, 20], probe_size=32, loss_fn=flaky,
              path=path, progress=False)
    resumed_model = models.mlp(64, 10, (16,), seed=5)  # the same run: its weights come from the checkpoint
    resumed = train(resumed_model, digits, lr=0.1, batch_size=8, n_steps=20, probe_at=[0, 10, 20], probe_size=32,
                    loss_fn=flaky, path=path, progress=False)
    assert calls["n"] == 13 + 20 - 10  # resumed at the probe of step 10
    straight_model = models.mlp(64, 10, (16,), seed=5)
    straight = train(straight_model, digits, lr=0.1, batch_size=8, n_steps=20, probe_at=[0, 10, 20], probe_size=32,
                     progress=False)
    torch.testing.assert_close(_params(resumed_model), _params(straight_model))
    np.testing.assert_allclose(resumed.loss.values, straight.loss.values, rtol=1e-6)


def test_probed_step_measures_the_training_batch(digits, device):
    """The probe inside the training step equals the separate probe, and the update is plain SGD's."""
    x, y = digits.x_train[:64].to(device), digits.y_train[:64].to(device)
    a, b = models.mlp(64, 10, (32,), seed=6).to(device), models.mlp(64, 10, (32,), seed=6).to(device)
    sep = probes.gradient_stats(a, F.cross_entropy, x, y, method="func")
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_a.zero_grad()
    F.cross_entropy(a(x), y).backward()
    opt_a.step()
    loss, m = probes.probed_step(b, F.cross_entropy, x, y, torch.optim.SGD(b.parameters(), lr=0.1), step=0, sem=True)
    torch.testing.assert_close(_params(a), _params(b))
    ds = probes.stack([m])
    validate(ds)
    for v in ("grad_norm_sq", "trace_cov", "trace_cov_sem", "grad_nvar", "noise_scale"):
        np.testing.assert_allclose(ds[v].isel(step=0).values, sep[v].values, rtol=2e-4)
    # without the per-example deviations: the same trace, no standard error
    c = models.mlp(64, 10, (32,), seed=6).to(device)
    _, m2 = probes.probed_step(c, F.cross_entropy, x, y, torch.optim.SGD(c.parameters(), lr=0.1), step=0)
    np.testing.assert_allclose(m2.trace_cov, m.trace_cov, rtol=1e-3)
    assert np.all(np.isnan(m2.trace_cov_sem))


def test_mnist1d_is_generated_locally_and_leaves_the_global_rng_alone():
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    d = data.mnist1d(n_samples=400, seed=1)
    assert np.random.random() == before  # the package's global seeding was undone
    assert d.x_train.shape == (320, 40) and d.x_test.shape == (80, 40)
    assert set(torch.unique(d.y_train).tolist()) == set(range(10))
    assert torch.equal(d.x_train, data.mnist1d(n_samples=400, seed=1).x_train)
    assert data.mnist1d(n_samples=400, seed=1, channels=True).x_train.shape == (320, 1, 40)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_resnet8_probes(batch_norm):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, 16, 16, generator=g), torch.randint(0, 10, (12,), generator=g)
    net = models.resnet8(3, 10, width=4, batch_norm=batch_norm)
    if batch_norm:
        with pytest.raises(ValueError, match="BatchNorm in training mode"):
            probes.gradient_stats(net, F.cross_entropy, x, y, method="func")
        net.eval()
    ds = probes.gradient_stats(net, F.cross_entropy, x, y)
    # batch norm (eval mode) is outside the fast path: torch.func measures those parameters only
    assert ds.attrs["method"] == ("hooks+func" if batch_norm else "hooks")
    bn = [k for k, _ in net.named_parameters() if ".bn" in k or k.startswith("bn")]
    assert ds.attrs["path_func"].split(", ") == bn if batch_norm else ds.attrs["path_func"] == ""
    ref = probes.gradient_stats(net, F.cross_entropy, x, y, method="func")  # fast path = torch.func on every layer
    np.testing.assert_allclose(ds.trace_cov.values, ref.trace_cov.values, rtol=1e-3)
    G = pergrad.flatten(pergrad.per_example_grads(net, F.cross_entropy, x[:4], y[:4]))
    torch.testing.assert_close(G, _loop_grads(net, F.cross_entropy, x[:4], y[:4]), rtol=1e-4, atol=1e-6)


def test_bootstrap_intervals_from_the_gram_matrix(digits, device):
    """The Gram-matrix bootstrap equals resampling materialised per-example gradients, and the hook
    and torch.func paths give the same intervals."""
    model = models.mlp(64, 10, (16,), seed=7).to(device)
    x, y = digits.x_train[:40].to(device), digits.y_train[:40].to(device)
    a = probes.gradient_stats(model, F.cross_entropy, x, y, ci=0.9, n_boot=50, seed=3, method="hooks")
    b = probes.gradient_stats(model, F.cross_entropy, x, y, ci=0.9, n_boot=50, seed=3, method="func")
    validate(a)
    np.testing.assert_allclose(a.grad_nvar_ci.values, b.grad_nvar_ci.values, rtol=1e-4)
    # by hand: the same resamples on the flattened gradients
    G = pergrad.flatten(pergrad.per_example_grads(model, F.cross_entropy, x, y)).cpu().double()
    gen = torch.Generator(device="cpu").manual_seed(3)
    idx = torch.multinomial(torch.full((40,), 1 / 40), 40 * 50, replacement=True, generator=gen).reshape(50, 40)
    nv = []
    for r in idx:
        Gr = G[r]
        m = Gr.mean(0)
        tr = float(((Gr - m) ** 2).sum(1).mean()) / 40  # batch_size defaults to B = 40
        nv.append(tr / (float(m @ m) + tr))
    np.testing.assert_allclose(a.grad_nvar_ci.sel(layer="total").values, np.quantile(nv, [0.05, 0.95]), rtol=1e-6)


def test_bootstrap_coverage_on_the_linear_model():
    """Over independent batches the 90% interval of grad_nvar covers the population value (from
    toymodels.linreg's closed form) in roughly 90% of them."""
    lam = np.array([1.0, 0.5, 0.25])
    lr_model = GaussianLinearRegression(lam, w_star=np.array([1.0, -0.5, 0.3]), noise_std=0.5)
    w = np.array([0.6, 0.1, 0.0])
    cov = lr_model.gradient_covariance(w)
    g2, tr, bs = float(cov["mean"] @ cov["mean"]), float(np.trace(cov["label"] + cov["batch"])), 200.0
    truth = (tr / bs) / (g2 + tr / bs)
    net = models.linear(3, 1, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor(w[None, :]))

    def loss_fn(out, target):
        return 0.5 * ((out.squeeze(-1) - target) ** 2).mean()

    rng = np.random.default_rng(4)
    hits = 0
    for rep in range(60):
        x = rng.standard_normal((200, 3)) * np.sqrt(lam)
        t = x @ lr_model.w_star + 0.5 * rng.standard_normal(200)
        ds = probes.gradient_stats(net, loss_fn, torch.tensor(x), torch.tensor(t), ci=0.9, n_boot=300, seed=rep)
        lo, hi = ds.grad_nvar_ci.sel(layer="total").values
        hits += lo <= truth <= hi
    print(f"coverage of the 90% interval: {hits} / 60")
    assert 46 <= hits <= 60  # 90% of 60 = 54; binomial 4-sigma range


def test_train_with_adam_and_a_schedule(digits):
    from deepmodels.train import train
    from toymodels import StepDecay

    model = models.mlp(64, 10, (16,), seed=8)
    ds = train(model, digits, lr=StepDecay(0.01, factor=0.5, every=10), batch_size=16, n_steps=30, optimizer="adam",
               probe_at=[0, 30], probe_size=32, progress=False)
    validate(ds)
    assert ds.attrs["optimizer"] == "adam" and ds.loss.values[-1] < ds.loss.values[0]
    ds2 = train(models.mlp(64, 10, (16,), seed=8), digits, lr=0.05, batch_size=16, n_steps=5,
                optimizer=torch.optim.RMSprop, probe_at=[0, 5], probe_size=32, progress=False)
    assert ds2.attrs["optimizer"] == "rmsprop"
    with pytest.raises(ValueError, match="`optimizer` must be"):
        train(models.mlp(64, 10, (16,)), digits, lr=0.1, batch_size=4, n_steps=2, optimizer="lbfgs", progress=False)


def test_layer_run_twice_sums_its_contributions_on_the_fast_path(device):
    """A Linear layer called twice in one forward pass: its per-example gradient sums the two calls
    (they are more positions of one layer), and the hooks equal torch.func."""

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layer = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.layer(torch.tanh(self.layer(x)))

    model = Twice().to(device)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 4, generator=gen).to(device), torch.randint(0, 4, (6,), generator=gen).to(device)
    grads = pergrad.per_example_grads(model, F.cross_entropy, x, y)
    fast = pergrad.hook_summaries(model, F.cross_entropy, x, y, gram=True)["layer"]
    G = torch.cat([grads["layer.weight"].reshape(6, -1), grads["layer.bias"]], dim=1)
    _assert_summaries_match(fast, G)
    torch.testing.assert_close(fast["gram"], G @ G.T, rtol=1e-4, atol=1e-6)
    auto = probes.gradient_stats(model, F.cross_entropy, x, y)
    func = probes.gradient_stats(model, F.cross_entropy, x, y, method="func")
    assert auto.attrs["method"] == "hooks"
    np.testing.assert_allclose(auto.trace_cov.values, func.trace_cov.values, rtol=1e-4)


def test_probed_step_checks_the_model_input_once_per_signature(digits, monkeypatch):
    """The every-step probe runs the one-example forward check once per model structure, input
    signature and loss: later steps skip it, but still refuse labels out of range, and a new input
    shape, a replaced layer or another loss function is checked again (and refused when bad)."""
    from deepmodels import _checks

    model = models.mlp(64, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = digits.x_train[:8], digits.y_train[:8]
    calls = []
    forward_one = _checks._forward_one
    monkeypatch.setattr(_checks, "_forward_one", lambda m, x1: calls.append(1) or forward_one(m, x1))
    for _ in range(3):
        probes.probed_step(model, F.cross_entropy, x, y, opt)
    assert len(calls) == 1
    with pytest.raises(ValueError, match=r"`y` must hold class labels in \[0, 10\)"):
        probes.probed_step(model, F.cross_entropy, x, torch.full_like(y, 10), opt)
    with pytest.raises(ValueError, match="`x` must be an input the model accepts"):
        probes.probed_step(model, F.cross_entropy, torch.zeros(8, 63), y, opt)
    probes.probed_step(model, lambda out, t: F.cross_entropy(out, t), x, y, opt)  # another loss
    assert len(calls) == 3
    model[-1] = torch.nn.Linear(16, 4)  # a replaced layer: 4 outputs now
    with pytest.raises(ValueError, match=r"`y` must hold class labels in \[0, 4\)"):
        probes.probed_step(model, F.cross_entropy, x, torch.full_like(y, 5), torch.optim.SGD(model.parameters(), lr=0.1))
    assert len(calls) == 4


def test_nonfinite_params_is_exact_for_huge_finite_values():
    """The fused sum of the finiteness check overflows on huge finite values: the exact check
    then says the model is finite; NaN and inf are reported by name."""
    from deepmodels import _validate as V

    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(3e38)
    assert not math.isfinite(float(model.weight.detach().sum()))
    assert V.nonfinite_params(model) is None
    with torch.no_grad():
        model.bias[1] = math.nan
        model.weight[0, 0] = -math.inf
    reason = V.nonfinite_params(model)
    assert "1 in `weight`" in reason and "1 in `bias`" in reason


class _ScaledLinear(torch.nn.Module):
    """A Linear (the fast path) times a bare Parameter (torch.func)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(64, 10)
        self.scale = torch.nn.Parameter(torch.ones(10))

    def forward(self, x):
        return self.fc(x) * self.scale


def test_train_writes_the_probes_coverage(digits, tmp_path, device):
    """The written results carry the probes' coverage attrs (which parameter each path measured)."""
    import xarray as xr

    from deepmodels.train import train

    path = tmp_path / "run.nc"
    ds = train(_ScaledLinear(), digits, lr=0.1, batch_size=8, n_steps=4, probe_at=[0, 4], probe_size=16, path=path,
               progress=False, device=device)
    want = {"method": "hooks+func", "path_hooks": "fc.weight, fc.bias", "path_func": "scale", "skipped": "",
            "skipped_reasons": ""}
    with xr.open_dataset(path) as on_disk:
        for d in (ds, on_disk):
            assert {k: d.attrs[k] for k in want} == want
    # the union over the probes, in order of appearance (a later probe measured by another path)
    rows = [{"method": "hooks", "path_hooks": "a.weight", "skipped": ""},
            {"method": "func", "path_hooks": "", "path_func": "a.weight", "skipped": "b"}]
    assert probes._union_coverage(rows) == {"method": "hooks+func", "path_hooks": "a.weight", "path_func": "a.weight",
                                            "skipped": "b"}


def test_float64_runs_where_the_device_has_it():
    """Sums in float64 stay on the device, except on MPS (no float64), where they run on the CPU."""
    from deepmodels import _validate as V

    assert V.float64_device("mps") == torch.device("cpu") and V.float64_device("cuda:1") == torch.device("cuda:1")
    t = torch.arange(3, dtype=torch.float32)
    assert V.to_float64(t).dtype == torch.float64 and V.to_float64(t).device == t.device


@pytest.mark.parametrize("sem", [False, True])
def test_probes_name_the_layer_whose_per_example_gradients_overflow(sem):
    """Finite parameters and loss, but per-example squared norms beyond float32 in the first layer
    (the second layer's weights are huge): inf statistics naming that layer, and no optimizer step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    with torch.no_grad():
        model[2].weight[0].fill_(1e25)
        model[2].weight[1].fill_(-1e25)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 0, 1])
    with torch.no_grad():
        assert math.isfinite(float(F.cross_entropy(model(x), y)))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, m = probes.probed_step(model, F.cross_entropy, x, y, opt, sem=sem)
    assert loss == math.inf and "non-finite per-example gradients in layer `0`" in m.diverged
    assert np.isinf(m.variables()["noise_scale"]).all()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # the optimizer did not step
    ds = probes.gradient_stats(model, F.cross_entropy, x, y, method="hooks")
    assert "layer `0`" in ds.attrs["diverged"] and np.isinf(ds["grad_var"].values).all()
