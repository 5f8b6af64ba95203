"""deepmodels.gns: the two-batch noise scale of a training step against an independent slow
computation (one backward pass per micro-batch, gradients flattened in float64), its unbiasedness on
a model whose true |G|^2 and tr Sigma are known, the EMA's bias correction and the coverage of its
standard error, resume, bfloat16 autocast, bad input and non-finite gradients."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepmodels import gns as G
from toymodels import schema
from toymodels.stats import two_batch_estimates


def _mlp(seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).to(dtype).to(device)


def _batches(M, b, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(M, b, 6, generator=g, dtype=dtype).to(device),
            torch.randint(0, 3, (M, b), generator=g).to(device))


def _accumulate(model, x, y, *, accumulation="mean"):
    M = x.shape[0]
    for m in range(M):
        loss = F.cross_entropy(model(x[m]), y[m])
        (loss / M if accumulation == "mean" else loss).backward()


def _reference(model, x, y):
    """Slow, independent: each micro-batch's gradient by its own backward pass, in float64."""
    gs = []
    for m in range(x.shape[0]):
        model.zero_grad()
        F.cross_entropy(model(x[m]), y[m]).backward()
        gs.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).double())
    model.zero_grad()
    gs = torch.stack(gs).cpu().numpy()
    n, b = x.shape[0], x.shape[1]
    a = (gs**2).sum(1)
    big = (gs.mean(0) ** 2).sum()
    tr = (a.mean() - big) / (1 / b - 1 / (b * n))
    g2 = (b * n * big - b * a.mean()) / (b * n - b)
    return {"grad_norm_sq_micro": a.mean(), "grad_norm_sq_step": big, "trace_cov": tr, "grad_norm_sq_unbiased": g2,
            "noise_scale_unbiased": tr / g2 if g2 > 0 else math.inf}


@pytest.mark.parametrize("accumulation", ["mean", "sum"])
def test_step_matches_slow_reference(accumulation, device):
    x, y = _batches(4, 8, device=device)
    model = _mlp(device=device)
    ref = _reference(model, x, y)
    with G.GradientNoiseScale(model, accumulation=accumulation) as gns:
        _accumulate(model, x, y, accumulation=accumulation)
        est = gns.update(micro_batch_size=8)
    assert (est.micro_batch_size, est.n_micro_batches, est.batch_size, est.step) == (8, 4, 32, 0)
    for k, v in ref.items():
        assert getattr(est, k) == pytest.approx(v, rel=2e-5), k
    assert est.diverged is None
    schema.validate(est.to_dataset())


class _Tied(nn.Module):
    """One square Linear used twice (tied weights): its hook sees the summed gradient."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.shared, self.out = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.shared(torch.tanh(self.shared(self.inp(x))))))


def test_tied_weights_and_unused_parameters_match_slow_reference(device):
    x, y = _batches(3, 5, seed=2, device=device)
    model = _Tied().to(device)
    model.unused = nn.Linear(2, 2).to(device)  # trainable but never in the graph: no gradient, no contribution
    ref = _reference(model, x, y)
    with G.GradientNoiseScale(model) as gns:
        _accumulate(model, x, y)
        est = gns.update(micro_batch_size=5)
    for k, v in ref.items():
        assert getattr(est, k) == pytest.approx(v, rel=2e-5), k


# --------------------------------------------------------------------------------------------------
# unbiasedness on a model with known |G|^2 and tr Sigma
# --------------------------------------------------------------------------------------------------
def test_unbiased_on_linear_regression():
    """Linear regression y = eps, eps ~ N(0, s^2), x ~ N(0, I_d), loss (w'x - y)^2 / 2 at a fixed w:
    per-example gradient g = x (x'w - eps), so G = w, E|g|^2 = |w|^2 (d + 2) + s^2 d and
    tr Sigma = |w|^2 (d + 1) + s^2 d.  The means over many steps of the per-step estimates lie
    within 4 standard errors of the truth (and the means of |g_j|^2 and |G_big|^2 too)."""
    d, s, b, M, n_steps = 5, 0.7, 8, 4, 300
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linspace(0.2, 0.6, d, dtype=torch.float64))
    w2 = float(model.weight.detach().square().sum())
    true_g2, true_tr = w2, w2 * (d + 1) + s * s * d
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n_steps, M, b, d, generator=gen, dtype=torch.float64)
    y = s * torch.randn(n_steps, M, b, 1, generator=gen, dtype=torch.float64)
    rows = []
    with G.GradientNoiseScale(model) as gns:
        for t in range(n_steps):
            for m in range(M):
                (0.5 * (model(x[t, m]) - y[t, m]).square().mean() / M).backward()
            rows.append(gns.update(micro_batch_size=b).as_dict())
            model.zero_grad()
    tab = {k: np.array([r[k] for r in rows]) for k in rows[0]}

    def within(values, truth):
        se = values.std(ddof=1) / math.sqrt(len(values))
        assert abs(values.mean() - truth) < 4 * se, (values.mean(), truth, se)

    within(tab["trace_cov"], true_tr)
    within(tab["grad_norm_sq_unbiased"], true_g2)
    within(tab["grad_norm_sq_micro"], true_g2 + true_tr / b)
    within(tab["grad_norm_sq_step"], true_g2 + true_tr / (b * M))


# --------------------------------------------------------------------------------------------------
# standard errors against simulation (Gaussian micro-batch gradients)
# --------------------------------------------------------------------------------------------------
P, B_MICRO = 40, 8
_SD = np.linspace(0.5, 1.5, P)  # per-coordinate sd of a micro-batch gradient: Sigma_b = diag(_SD^2)
_G = np.full(P, 0.25)
TRUE_TR, TRUE_G2 = B_MICRO * float(np.sum(_SD**2)), float(_G @ _G)


def _gaussian_steps(shape, n, seed):
    """sum |g_j|^2, sum |g_j|^4 and |mean g_j|^2 of n micro-batch gradients g_j ~ N(G, Sigma_b), per entry of shape."""
    rng = np.random.default_rng(seed)
    g = _G + _SD * rng.standard_normal((*shape, n, P))
    a = np.sum(g * g, axis=-1)
    return a.sum(-1), (a * a).sum(-1), np.sum(g.mean(-2) ** 2, axis=-1)


def test_step_standard_errors_bound_the_scatter():
    """The per-step standard errors of tr Sigma and |G|^2 are the Gaussian-model bounds: their mean
    square equals b^2 (2 T2 + 4 Q) / (n - 1) and (2 T2 + 4 Q) / n, each at least the exact variance
    (2 b^2 T2 / (n - 1) and 2 T2 / (n (n - 1)) + 4 Q / n), which the scatter over 4000 steps matches."""
    n, reps = 4, 4000
    sums = _gaussian_steps((reps,), n, seed=5)
    rows = [G.step_estimates(float(s1), float(s2), n, B_MICRO, float(c)) for s1, s2, c in zip(*sums)]
    tr = np.array([r["trace_cov"] for r in rows])
    g2 = np.array([r["grad_norm_sq_unbiased"] for r in rows])
    se_tr = np.array([r["trace_cov_sem"] for r in rows])
    se_g2 = np.array([r["grad_norm_sq_unbiased_sem"] for r in rows])
    sig_b2 = _SD**2
    t2, q = float(np.sum(sig_b2**2)), float(_G @ (sig_b2 * _G))
    var_tr, var_g2 = 2 * B_MICRO**2 * t2 / (n - 1), 2 * t2 / (n * (n - 1)) + 4 * q / n
    rel = 4 * math.sqrt(2 / (reps - 1))  # 4 standard errors of a variance estimated from reps draws (Gaussian-like)
    assert tr.var(ddof=1) == pytest.approx(var_tr, rel=rel)
    assert g2.var(ddof=1) == pytest.approx(var_g2, rel=rel)
    assert np.mean(se_tr**2) == pytest.approx(B_MICRO**2 * (2 * t2 + 4 * q) / (n - 1), rel=rel)
    assert np.mean(se_g2**2) == pytest.approx((2 * t2 + 4 * q) / n, rel=rel)
    assert np.mean(se_tr**2) >= var_tr and np.mean(se_g2**2) >= var_g2


def _ema_reference(S, Gs, d, z=1.959963984540054):
    """Vectorised over runs (axis 0), written from the weights w_s = (1 - d) d^(t - s) / (1 - d^t):
    the bias-corrected EMAs, their ratio, its delta-method standard error and Fieller interval."""
    t = S.shape[1]
    w = (1 - d) * d ** np.arange(t - 1, -1, -1) / (1 - d**t)
    s_bar, g_bar = S @ w, Gs @ w
    k = 1 / (1 / np.sum(w * w) - 1)  # 1 / (n_eff - 1)
    v_s = ((S - s_bar[:, None]) ** 2) @ w * k
    v_g = ((Gs - g_bar[:, None]) ** 2) @ w * k
    c = ((S - s_bar[:, None]) * (Gs - g_bar[:, None])) @ w * k
    r = s_bar / g_bar
    se = np.sqrt(v_s - 2 * r * c + r * r * v_g) / g_bar
    a, b = g_bar**2 - z * z * v_g, s_bar * g_bar - z * z * c
    root = np.sqrt(np.maximum(b * b - a * (s_bar**2 - z * z * v_s), 0))
    ok = (a > 0) & (g_bar > 0)
    lo = np.where(ok, np.maximum((b - root) / np.where(ok, a, 1), 0), 0.0)
    hi = np.where(ok, (b + root) / np.where(ok, a, 1), np.inf)
    return s_bar, g_bar, r, se, lo, hi


def test_ema_matches_weights_and_bias_correction():
    rng = np.random.default_rng(0)
    S, Gs = rng.normal(10, 3, (1, 30)), rng.normal(1, 0.3, (1, 30))
    ema = G.NoiseScaleEMA(0.9)
    for s, g in zip(S[0], Gs[0]):
        out = ema.update(float(s), float(g))
    s_bar, g_bar, r, se, lo, hi = (float(v[0]) for v in _ema_reference(S, Gs, 0.9))
    assert out["trace_cov_ema"] == pytest.approx(s_bar, rel=1e-12)
    assert out["grad_norm_sq_ema"] == pytest.approx(g_bar, rel=1e-12)
    assert out["noise_scale_ema"] == pytest.approx(r, rel=1e-12)
    assert out["noise_scale_ema_sem"] == pytest.approx(se, rel=1e-9)
    assert (out["noise_scale_ema_lo"], out["noise_scale_ema_hi"]) == pytest.approx((lo, hi), rel=1e-9)
    assert lo < r < hi
    w = 0.1 * 0.9 ** np.arange(29, -1, -1) / (1 - 0.9**30)
    assert out["ema_n_eff"] == pytest.approx(1 / np.sum(w * w), rel=1e-12)
    # bias correction: a constant input is returned exactly from the first step on
    const = G.NoiseScaleEMA(0.99)
    for _ in range(3):
        out = const.update(5.0, 2.0)
        assert (out["trace_cov_ema"], out["grad_norm_sq_ema"], out["noise_scale_ema"]) == pytest.approx((5.0, 2.0, 2.5))
    assert G.NoiseScaleEMA(0.9).estimates()["noise_scale_ema"] == math.inf  # nothing yet: inf, not NaN
    first = G.NoiseScaleEMA(0.9).update(5.0, 2.0)
    assert first["noise_scale_ema_sem"] == math.inf and first["ema_n_eff"] == 1.0


def test_ema_interval_coverage():
    """600 independent runs of 120 steps (n = 4 micro-batches of 8, d = 0.95, n_eff ~ 39) where one
    step's |G|^2 estimate has a relative sd of 1.4 (the EMA's 0.23): Fieller's 95% interval covers
    the true B_simple in 95% of the runs (within 4 binomial standard errors); the delta method's
    standard error matches the scatter of the EMA ratio over the runs within 20%."""
    runs, steps, n, d = 600, 120, 4, 0.95
    s1, _, c = _gaussian_steps((runs, steps), n, seed=7)
    g2, tr = (np.asarray(v) for v in two_batch_estimates(s1 / n, B_MICRO, c, B_MICRO * n))
    _, _, r, se, lo, hi = _ema_reference(tr, g2, d)
    truth = TRUE_TR / TRUE_G2
    cover = np.mean((lo <= truth) & (truth <= hi))
    assert abs(cover - 0.95) < 4 * math.sqrt(0.95 * 0.05 / runs), cover
    assert np.mean(se) == pytest.approx(np.std(r, ddof=1), rel=0.2)


# --------------------------------------------------------------------------------------------------
# resume, mixed precision, bad input, divergence
# --------------------------------------------------------------------------------------------------
def _sgd_step(model, lr):
    """Plain SGD by hand (torch.optim's first step imports torch._dynamo: seconds on a cold start)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=-lr)
    model.zero_grad()


def _train(model, gns, x, y, steps):
    rows = []
    for t in steps:
        _accumulate(model, x[t], y[t])
        rows.append(gns.update(micro_batch_size=x.shape[2]).as_dict())
        _sgd_step(model, 0.3)
    return rows


def test_resume_gives_identical_estimates(device):
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(8, 3, 6, 6, generator=g).to(device), torch.randint(0, 3, (8, 3, 6), generator=g).to(device)
    model = _mlp(device=device)
    with G.GradientNoiseScale(model, ema_decay=0.8) as gns:
        first = _train(model, gns, x, y, range(4))
        saved = ({k: v.clone() for k, v in model.state_dict().items()}, gns.state_dict())
        rest = _train(model, gns, x, y, range(4, 8))
    model2 = _mlp(seed=9, device=device)
    model2.load_state_dict(saved[0])
    with G.GradientNoiseScale(model2, ema_decay=0.8) as gns2:
        gns2.load_state_dict(saved[1])
        resumed = _train(model2, gns2, x, y, range(4, 8))
    assert resumed == rest  # exactly: the same floats, steps 4..7 and EMA included
    assert [r["step"] for r in resumed] == [4, 5, 6, 7] and first[-1]["step"] == 3
    with pytest.raises(ValueError, match="`state_dict` must come from an EMA of the same decay"):
        G.GradientNoiseScale(_mlp(), ema_decay=0.9).load_state_dict(saved[1])


def test_bfloat16_autocast_close_to_float32():
    """Under torch.autocast(cpu, bfloat16) the matmuls round to 8 bits of mantissa (relative 2^-8 per
    product) but the parameters, .grad and the norms stay float32/float64: the squared norms agree
    with the float32 run within 1% and the unbiased tr Sigma and |G|^2 within 1% of |G_small|^2
    (the scale of the norms they are differences of; in units of tr Sigma's scale b n / (n - 1) for
    tr Sigma).  Measured on six seeds: at most 0.21% and 0.11%."""
    x, y = _batches(4, 16, seed=6)
    ests = []
    for autocast in (False, True):
        model = _mlp()
        with G.GradientNoiseScale(model) as gns:
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=autocast):
                _accumulate(model, x, y)
            ests.append(gns.update(micro_batch_size=16))
    f32, bf16 = ests
    scale = f32.grad_norm_sq_micro
    for k in ("grad_norm_sq_micro", "grad_norm_sq_step"):
        assert getattr(bf16, k) == pytest.approx(getattr(f32, k), rel=0.01), k
    for k in ("trace_cov", "grad_norm_sq_unbiased"):
        factor = 16 * 4 / 3 if k == "trace_cov" else 1.0  # tr Sigma = (A - C) b n / (n - 1)
        assert abs(getattr(bf16, k) - getattr(f32, k)) <= 0.01 * scale * factor, k
    # bfloat16 parameters (and gradients): the norms are still taken in float32
    model = _mlp(dtype=torch.bfloat16)
    xb = x.to(torch.bfloat16)
    with G.GradientNoiseScale(model) as gns:
        _accumulate(model, xb, y)
        est = gns.update(micro_batch_size=16)
    assert math.isfinite(est.trace_cov) and est.grad_norm_sq_micro == pytest.approx(f32.grad_norm_sq_micro, rel=0.05)


def test_bad_use_is_refused_by_name():
    model = _mlp()
    x, y = _batches(2, 4)
    gns = G.GradientNoiseScale(model)
    with pytest.raises(ValueError, match="needs at least one backward pass"):
        gns.update(micro_batch_size=4)
    F.cross_entropy(model(x[0]), y[0]).backward()
    with pytest.raises(ValueError, match="at least two micro-batches"):
        gns.update(micro_batch_size=4)  # one micro-batch on one process: no second batch size
    model.zero_grad(set_to_none=True)
    _accumulate(model, x, y)
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="`model` must have gradients in .grad"):
        gns.update(micro_batch_size=4)
    with pytest.raises(ValueError, match="`micro_batch_size` must be"):
        gns.update(micro_batch_size=0)
    with pytest.raises(ValueError, match="`state_dict` must be a dict from GradientNoiseScale.state_dict"):
        gns.load_state_dict({"ema": {}})
    with pytest.raises(ValueError, match="`state_dict` must come from an estimator with accumulation='mean'"):
        gns.load_state_dict(G.GradientNoiseScale(_mlp(), accumulation="sum").state_dict())
    with pytest.raises(ValueError, match="`accumulation` must be one of"):
        G.GradientNoiseScale(model, accumulation="avg")
    with pytest.raises(ValueError, match="`model` must be a torch.nn.Module with trainable parameters"):
        G.GradientNoiseScale(nn.ReLU())
    gns.remove()
    gns.remove()  # idempotent
    _accumulate(model, x, y)
    with pytest.raises(ValueError, match="remove\\(\\) was called"):
        gns.update(micro_batch_size=4)


def test_nonfinite_gradients_reported_as_inf_with_reason():
    model = _mlp()
    x, y = _batches(2, 4)
    with G.GradientNoiseScale(model) as gns:
        _accumulate(model, x, y)
        good = gns.update(micro_batch_size=4)
        model.zero_grad()
        for m in range(2):
            loss = F.cross_entropy(model(x[m]), y[m]) / 2
            (loss * (math.inf if m == 1 else 1.0)).backward()
        bad = gns.update(micro_batch_size=4)
    for k in ("grad_norm_sq_micro", "grad_norm_sq_step", "trace_cov", "grad_norm_sq_unbiased", "noise_scale_unbiased",
              "trace_cov_sem", "noise_scale_unbiased_sem"):
        assert getattr(bad, k) == math.inf, k
    assert "non-finite gradient" in bad.diverged and "0.weight" in bad.diverged
    assert (bad.trace_cov_ema, bad.grad_norm_sq_ema) == (good.trace_cov_ema, good.grad_norm_sq_ema)  # EMA untouched
    ds = G.stack([good, bad])
    schema.validate(ds)
    assert not any(np.isnan(ds[v].values).any() for v in ds.data_vars)
    assert "step 1: non-finite gradient" in ds.attrs["diverged"]


def test_failed_backward_and_autograd_grad():
    """A backward pass that raises leaves nothing behind (the next steps are exact); each
    ``torch.autograd.grad`` through the parameters counts as one micro-batch, like ``backward``."""
    x, y = _batches(2, 4, seed=3)
    model = _mlp()
    ref = _reference(model, x, y)

    def fails(grad):
        raise RuntimeError("boom")

    with G.GradientNoiseScale(model) as gns:
        handle = model[0].weight.register_hook(fails)
        with pytest.raises(RuntimeError, match="boom"):
            F.cross_entropy(model(x[0]), y[0]).backward()
        handle.remove()
        model.zero_grad(set_to_none=True)
        _accumulate(model, x, y)
        est = gns.update(micro_batch_size=4)
        params = list(model.parameters())
        for m in range(2):
            grads = torch.autograd.grad(F.cross_entropy(model(x[m]), y[m]) / 2, params)
            for p, g in zip(params, grads):
                p.grad = g if m == 0 else p.grad + g
        est2 = gns.update(micro_batch_size=4)
    for k, v in ref.items():
        assert getattr(est, k) == pytest.approx(v, rel=2e-5), k
        assert getattr(est2, k) == pytest.approx(v, rel=2e-5), k


def test_local_sums_on_device_equal_python_path(device):
    """The two ways to form a process's sums (Python floats on the CPU, tensors on a GPU) agree."""
    x, y = _batches(3, 4, seed=8, device=device)
    model = _Tied().to(device)
    with G.GradientNoiseScale(model) as gns:
        _accumulate(model, x, y)
        py, dev = gns._local_sums(gns._micro, on_device=False), gns._local_sums(gns._micro, on_device=True)
    torch.testing.assert_close(py.cpu(), dev.cpu(), rtol=1e-12, atol=0)
    assert py.tolist()[2:] == [3.0, 9.0]


def test_a_probe_backward_between_steps_is_discarded(device):
    """A per-example probe on the hook fast path backpropagates through the parameters: its pass is
    recorded as one more micro-batch unless discarded, and discarded it leaves the step exact."""
    from deepmodels import probes

    x, y = _batches(3, 5, seed=6, device=device)
    model = _mlp(device=device)
    ref = _reference(model, x, y)
    with G.GradientNoiseScale(model) as gns:
        probes.gradient_stats(model, F.cross_entropy, x[0], y[0], method="hooks")
        assert gns.n_recorded == 1  # the probe's backward pass
        gns.discard()
        assert gns.n_recorded == 0
        _accumulate(model, x, y)
        assert gns.n_recorded == 3
        est = gns.update(micro_batch_size=5)
    assert est.n_micro_batches == 3
    for k in ("grad_norm_sq_micro", "grad_norm_sq_step", "trace_cov", "noise_scale_unbiased"):
        assert getattr(est, k) == pytest.approx(ref[k], rel=1e-5), k


def test_skip_forgets_the_step_and_leaves_the_ema():
    """skip() drops the step's recorded passes without an update: the estimator then gives, step for
    step, what one that never saw the skipped step gives (the EMA, its counter and the next step's
    micro-batches all untouched); after remove() it is refused."""
    x, y = _batches(3, 5, seed=8)
    x2, y2 = _batches(3, 5, seed=9)
    model = _mlp()
    with G.GradientNoiseScale(model, ema_decay=0.7) as gns, G.GradientNoiseScale(model, ema_decay=0.7) as clean:
        _accumulate(model, x, y)
        first, first_clean = gns.update(5), clean.update(5)
        model.zero_grad()
        _accumulate(model, x2[:2], y2[:2])  # a step to leave out: only `gns` sees it
        state = gns.state_dict()
        gns.skip()
        clean.discard()
        assert gns.n_recorded == 0 and gns.state_dict() == state  # EMA and n_updates unchanged
        model.zero_grad()
        _accumulate(model, x2, y2)
        second, second_clean = gns.update(5), clean.update(5)
    assert first == first_clean and second == second_clean and second.step == 1
    d = 0.7  # two updates, not three: 1 / n_eff = (1 - d)(1 + d^2) / ((1 + d)(1 - d^2))
    assert second.n_micro_batches == 3
    assert second.ema_n_eff == pytest.approx((1 + d) * (1 - d**2) / ((1 - d) * (1 + d**2)))
    with pytest.raises(ValueError, match="remove\\(\\) was called"):
        gns.skip()


def test_deferred_steps_replay_exactly():
    """update(sync=False) defers a step; the next synchronization replays the deferred steps in order:
    every step's estimates and the EMA after it equal those of updating every step, bit for bit (the
    same sums, the same operations), a divergence among them included; state_dict is refused while
    steps are deferred, and a run resumed from the state after sync() continues identically;
    remove() drops deferred steps, load_state_dict too."""
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(7, 3, 5, 6, generator=g), torch.randint(0, 3, (7, 3, 5), generator=g)
    model = _mlp()
    with G.GradientNoiseScale(model, ema_decay=0.6) as every, G.GradientNoiseScale(model, ema_decay=0.6) as deferred:
        ref, got = [], []
        for t in range(7):
            if t == 2:  # a step with an infinite micro-batch loss
                for m in range(3):
                    (F.cross_entropy(model(x[t, m]), y[t, m]) / 3 * (math.inf if m == 1 else 1.0)).backward()
            else:
                _accumulate(model, x[t], y[t])
            ref.append(every.update(5))
            if t in (3, 6):
                if t == 3:  # the deferred steps 0-2 and this one
                    assert deferred.update(5) is deferred.synced[-1] and len(deferred.synced) == 4
                    got += deferred.synced
                else:  # the deferred steps 4-6, by sync()
                    assert deferred.update(5, sync=False) is None
                    got += deferred.sync()
                assert deferred.n_deferred == 0
            else:
                assert deferred.update(5, sync=False) is None
            if t == 5:
                assert deferred.n_deferred == 2
                with pytest.raises(ValueError, match="2 deferred step\\(s\\).*call sync\\(\\) on every process"):
                    deferred.state_dict()
            model.zero_grad() if t == 2 else _sgd_step(model, 0.3)  # no step with the infinite gradient
        assert got == ref and [e.step for e in got] == list(range(7))  # exactly, steps labelled as updated
        assert got[2].diverged is not None and "0.weight" in got[2].diverged
        assert deferred.state_dict() == every.state_dict()
        # resume: the state after sync(), then deferred steps on a fresh estimator equal the every-step run
        saved = deferred.state_dict()
        _accumulate(model, x[0], y[0])
        deferred.update(5, sync=False)
        deferred.load_state_dict(saved)  # drops the deferred step
        assert deferred.n_deferred == 0 and deferred.sync() == []
        _accumulate(model, x[0], y[0])
        deferred.update(5, sync=False)
        deferred.remove()
        assert deferred.n_deferred == 0
    model.zero_grad()
    model2 = _mlp()
    model2.load_state_dict(model.state_dict())
    with G.GradientNoiseScale(model, ema_decay=0.6) as a, G.GradientNoiseScale(model2, ema_decay=0.6) as b:
        a.load_state_dict(saved)
        b.load_state_dict(saved)
        want = []
        for t in range(2):
            _accumulate(model, x[t], y[t])
            _accumulate(model2, x[t], y[t])
            want.append(a.update(5))
            assert b.update(5, sync=t == 1) == (None if t == 0 else want[1])
            model.zero_grad()
            model2.zero_grad()
    assert b.synced == want and [e.step for e in want] == [7, 8]


@pytest.mark.parametrize("flush_bytes", [None, 100])
def test_norm_branches_agree(monkeypatch, flush_bytes):
    """The accelerator's branch of the hook (gradients held, one fused norm at the end of the backward
    pass, or every ``_FLUSH_BYTES``: 100 bytes forces a flush inside each backward pass), forced on
    the CPU, gives the estimates of the CPU branch (a norm per gradient in the hook) to float32
    rounding of the norms (seen: equal)."""
    if flush_bytes is not None:
        monkeypatch.setattr(G, "_FLUSH_BYTES", flush_bytes)
    calls, norms = [], G._norms
    monkeypatch.setattr(G, "_norms", lambda tensors, dtype: calls.append(len(tensors)) or norms(tensors, dtype))
    x, y = _batches(3, 5, seed=12)
    model = _Tied()
    with G.GradientNoiseScale(model) as cpu, G.GradientNoiseScale(model) as held:
        held._norm_in_hook = False
        _accumulate(model, x, y)
        assert held._pending == [] and len(held._micro) == 3
        # one fused norm of the 6 gradients per backward pass, or several (after 4 gradients > 100 bytes)
        assert sum(calls) == 18 and calls == ([6] * 3 if flush_bytes is None else [4, 2] * 3)
        assert [len(v) for v in held._micro] == [len(v) for v in cpu._micro]
        a, b = cpu.update(5).as_dict(), held.update(5).as_dict()
    for k, v in a.items():
        assert b[k] == pytest.approx(v, rel=1e-6), k
