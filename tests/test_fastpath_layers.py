"""The per-example gradient fast path on transformer layers (Embedding, LayerNorm, RMSNorm, Linear on
sequences, tied weights), its per-parameter torch.func fallback and coverage report, the batch form
of the loss, and pergrad.check, against torch.func per-example gradients in float64."""

import math
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepmodels import models, pergrad, probes

VOCAB, DIM, T, B = 17, 8, 6, 7
RTOL, ATOL = 1e-10, 1e-12  # float64: only rounding separates the two computations


class TinyGPT(nn.Module):
    """Token embedding (with a padding row) + learned position Parameter + LayerNorm + causal mixing
    + Linear on (B, T, F) + a LayerNorm without affine parameters + RMSNorm + unembedding, tied to
    the token embedding (``tie``) or a separate parameter with the same values."""

    def __init__(self, tie=True, dim=DIM, seed=0, padding_idx=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.tok = nn.Embedding(VOCAB, dim, padding_idx=padding_idx)
        self.pos = nn.Parameter(0.3 * torch.randn(T, dim, generator=gen))
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.plain = nn.LayerNorm(dim, elementwise_affine=False)
        self.rms = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        with torch.no_grad():
            for p in (self.tok.weight, self.ln.weight, self.ln.bias, self.fc.weight, self.fc.bias, self.rms.weight):
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() > 1 else 0.2) + (p.dim() == 1) * 1.0)
            self.tok.weight[padding_idx].zero_() if padding_idx is not None else None
        if tie:
            self.head.weight = self.tok.weight
        else:
            self.head.weight = nn.Parameter(self.tok.weight.detach().clone())
        self.double()

    def forward(self, ids):
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        n = torch.arange(1, ids.shape[1] + 1, dtype=h.dtype, device=h.device).reshape(1, -1, 1)
        h = h + torch.cumsum(self.ln(h), 1) / n  # causal mixing: the mean of the positions so far
        h = h + torch.tanh(self.fc(self.plain(h)))
        return self.head(self.rms(h))


def _ids(seed=0, batch=B):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, T + 1), generator=gen)
    ids[:, 2] = ids[:, 1]  # a token twice in every example (two positions scatter into one row)
    ids[:3, 4] = 0  # the padding token, whose row gets no gradient
    return ids


def _func(model, ids):
    """Per-example gradients by torch.func, ``{name: (B, P)}``."""
    g = pergrad.per_example_grads(model, pergrad.next_token_loss, batch=ids)
    return {k: v.reshape(v.shape[0], -1) for k, v in g.items()}


def _assert_stats(f, G, gram=True):
    """A layer's summaries equal those of its per-example gradients G (B, P)."""
    mean = G.mean(0)
    close = dict(rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(f["sum"], G.sum(0), **close)
    torch.testing.assert_close(f["sq_norms"], (G**2).sum(1), **close)
    torch.testing.assert_close(f["dots"], G @ mean, **close)
    torch.testing.assert_close(f["sum_sq"], (G**2).sum(0), **close)
    torch.testing.assert_close(torch.as_tensor(f["mean_norm_sq"]), mean @ mean, **close)
    if gram:
        torch.testing.assert_close(f["gram"], G @ G.T, **close)


def _summaries(model, ids, **kw):
    cap, _ = pergrad.capture_backward(model, pergrad.next_token_loss, batch=ids, partial=True)
    out = cap.summaries(ids.shape[0], **kw)
    model.zero_grad(set_to_none=True)
    return cap, out


def test_every_new_handler_equals_torch_func(device):
    """Embedding (repeated and padding tokens), LayerNorm, Linear on (B, T, F), RMSNorm and the
    unembedding: every statistic of every handler equals torch.func's per-example gradients."""
    model, ids = TinyGPT(tie=False).to(device), _ids().to(device)
    G = _func(model, ids)
    assert G["tok.weight"].reshape(B, VOCAB, DIM)[:, 0].abs().max() == 0  # torch gives the padding row no gradient
    cap, fast = _summaries(model, ids, gram=True)
    assert set(fast) == {"tok", "ln", "fc", "rms", "head"} and set(cap.uncovered) == {"pos"}
    for layer, f in fast.items():
        names = [k for k in G if pergrad.layer_of(k) == layer]
        _assert_stats(f, torch.cat([G[k] for k in names], 1))
    got = cap.per_example_grads(B)  # materialised, one parameter at a time
    assert list(got) == [k for k in G if k != "pos"]
    for k, v in got.items():
        torch.testing.assert_close(v.reshape(B, -1), G[k], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dim", [8, 24], ids=["materialised", "gram-route"])
def test_norms_only_equal_torch_func(dim, device):
    """Squared norms alone (the every-step probe): for dim 24 the Linear on (B, T, F) takes the
    T x T Gram route (T (O + I) < O I)."""
    model, ids = TinyGPT(tie=False, dim=dim, seed=1).to(device), _ids(1).to(device)
    assert (T * 2 * dim < dim * dim) == (dim == 24)
    G = _func(model, ids)
    _, fast = _summaries(model, ids, coordinate_sums=False, dots=False, sums=False)
    for layer, f in fast.items():
        Gl = torch.cat([G[k] for k in G if pergrad.layer_of(k) == layer], 1)
        torch.testing.assert_close(f["sq_norms"], (Gl**2).sum(1), rtol=RTOL, atol=ATOL)
        assert set(f) == {"n_params", "mean_norm_sq", "sq_norms"}


def test_tied_weights_equal_the_cut_model_with_gradients_summed(device):
    """The token embedding tied to the unembedding: its per-example gradient is the sum of both uses,
    as the same model with the tie cut (two parameters, equal values) and their gradients summed."""
    tied, cut, ids = TinyGPT(tie=True).to(device), TinyGPT(tie=False).to(device), _ids(2).to(device)
    assert "head.weight" not in dict(tied.named_parameters())
    Gc = _func(cut, ids)
    G_tok = Gc["tok.weight"] + Gc["head.weight"]
    torch.testing.assert_close(_func(tied, ids)["tok.weight"], G_tok, rtol=RTOL, atol=ATOL)  # torch.func agrees
    cap, fast = _summaries(tied, ids, gram=True)
    assert "head" not in fast  # the unembedding has no parameter of its own
    _assert_stats(fast["tok"], G_tok)
    torch.testing.assert_close(cap.per_example_grads(B)["tok.weight"].reshape(B, -1), G_tok, rtol=RTOL, atol=ATOL)


def _no_materialising(monkeypatch):
    def refuse(*args):
        raise AssertionError("a shared parameter was materialised (B, P)")
    monkeypatch.setattr(pergrad, "_shared_block", refuse)


@pytest.mark.parametrize("dots", [False, True], ids=["norms", "norms+dots"])
def test_tied_norms_need_no_materialised_gradients(monkeypatch, dots, device):
    """The every-step probe on tied weights: |E_i + U_i|^2 = |E_i|^2 + |U_i|^2 + 2 <E_i, U_i> with the
    cross term from a T x T product per example, and the dots with the mean, equal torch.func on the
    model with the tie cut and the gradients summed, without a (B, V, D) array; so does probed_step."""
    tied, cut, ids = TinyGPT(tie=True).to(device), TinyGPT(tie=False).to(device), _ids(4).to(device)
    Gc = _func(cut, ids)
    G_tok = Gc["tok.weight"] + Gc["head.weight"]
    _no_materialising(monkeypatch)
    _, fast = _summaries(tied, ids, coordinate_sums=False, dots=dots, sums=False)
    torch.testing.assert_close(fast["tok"]["sq_norms"], (G_tok**2).sum(1), rtol=RTOL, atol=ATOL)
    if dots:
        torch.testing.assert_close(fast["tok"]["dots"], G_tok @ G_tok.mean(0), rtol=RTOL, atol=ATOL)
    opt = torch.optim.SGD(tied.parameters(), lr=0.0)
    _, m = probes.probed_step(tied, pergrad.next_token_loss, optimizer=opt, batch=ids, sem=dots)
    want = ((G_tok - G_tok.mean(0)) ** 2).sum(1).mean()
    np.testing.assert_allclose(m.trace_cov[m.layer.index("tok")], float(want), rtol=1e-9)
    if dots:  # the deviations' spread comes from the dots
        np.testing.assert_allclose(m.trace_cov_sem[m.layer.index("tok")] * math.sqrt(B),
                                   float(((G_tok - G_tok.mean(0)) ** 2).sum(1).std(unbiased=False)), rtol=1e-9)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_fused_linear_norms_and_gradient_equal_torch_func(tie, device):
    """The every-step probe (squared norms only): a Linear on sequences forms its per-example weight
    gradients once in the backward pass and its weight gradient as their sum (tied: the unembedding's
    share, autograd adds the embedding's); the norms equal torch.func, the gradients the plain
    backward pass, and probed_step's statistics method="func"."""
    model, ids = TinyGPT(tie=tie).to(device), _ids(6).to(device)
    assert T * (DIM + DIM) >= DIM * DIM  # fc takes the fused route
    G = _func(model, ids)
    prob = pergrad._problem(model, pergrad.next_token_loss, None, None, ids)
    cap, _ = pergrad._capture(prob, partial=True, fuse=True)
    assert set(cap.fused) == {"fc", "head"}  # the Linears on sequences
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    blocks, _ = cap._param_blocks(B)
    model.zero_grad(set_to_none=True)
    pergrad.next_token_loss(model, ids).mean().backward()  # the plain backward pass
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=RTOL, atol=ATOL)
        if k in blocks:
            torch.testing.assert_close(blocks[k]["sq"], (G[k] ** 2).sum(1), rtol=RTOL, atol=ATOL)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    _, m = probes.probed_step(model, pergrad.next_token_loss, optimizer=opt, batch=ids)
    func = probes.gradient_stats(model, pergrad.next_token_loss, batch=ids, method="func")
    np.testing.assert_allclose(m.trace_cov, func.trace_cov.values, rtol=1e-9)
    np.testing.assert_allclose(m.grad_norm_sq, func.grad_norm_sq.values, rtol=1e-9)


def test_fused_linear_output_modified_in_place(device):
    """A fused Linear's output changed in place downstream (x *= 2, ReLU(inplace=True)): gradients
    and squared norms still equal the plain backward pass and torch.func."""
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3, bias=False)

        def forward(self, x):
            h = self.a(x)
            h.mul_(2.0)
            return self.b(torch.relu_(h)).mean(1)

    torch.manual_seed(0)
    model = InPlace().double().to(device)
    x, y = torch.randn(4, 7, 5, dtype=torch.float64).to(device), torch.tensor([0, 2, 1, 2], device=device)
    F.cross_entropy(model(x), y).backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters()}
    cap, _ = pergrad._capture(pergrad._Problem(model, F.cross_entropy, x, y, None), fuse=True)
    assert set(cap.fused) == {"a", "b"}
    blocks, unusable = cap._param_blocks(4)
    G = pergrad.per_example_grads(model, F.cross_entropy, x, y)
    assert not unusable
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[k], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(blocks[k]["sq"], (G[k].reshape(4, -1) ** 2).sum(1), rtol=RTOL, atol=ATOL)


class SharedTwice(nn.Module):
    """One Linear weight used by two Linear modules and one embedding table used by two Embeddings
    (on the tokens and on the tokens shifted), on sequences: the cross terms of two Linears and of
    two Embeddings."""

    def __init__(self, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.emb1, self.emb2 = nn.Embedding(VOCAB, DIM), nn.Embedding(VOCAB, DIM)
        self.lin1, self.lin2 = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        self.emb2.weight, self.lin2.weight = self.emb1.weight, self.lin1.weight
        self.double()

    def forward(self, ids):
        h = self.emb1(ids) + self.emb2((ids + 3) % VOCAB)
        h = torch.tanh(self.lin1(h))
        return self.head(torch.tanh(self.lin2(h)))


def test_cross_terms_of_two_linears_and_two_embeddings(monkeypatch, device):
    model, ids = SharedTwice().to(device), _ids(5).to(device)
    G = _func(model, ids)
    _no_materialising(monkeypatch)
    _, fast = _summaries(model, ids, coordinate_sums=False, dots=True, sums=False)
    for layer, names in (("emb1", ["emb1.weight"]), ("lin1", ["lin1.weight", "lin1.bias"])):
        Gl = torch.cat([G[k] for k in names], 1)
        torch.testing.assert_close(fast[layer]["sq_norms"], (Gl**2).sum(1), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(fast[layer]["dots"], Gl @ Gl.mean(0), rtol=RTOL, atol=ATOL)


def test_gradient_stats_coverage_and_fallback_equal_func(device):
    """method="auto": hooks where covered, torch.func for the position Parameter only; the
    statistics equal method="func", and the attrs list exactly which parameter took which path."""
    model, ids = TinyGPT().to(device), _ids(3).to(device)
    auto = probes.gradient_stats(model, pergrad.next_token_loss, batch=ids, ci=0.9, n_boot=20)
    func = probes.gradient_stats(model, pergrad.next_token_loss, batch=ids, method="func", ci=0.9, n_boot=20)
    assert auto.attrs["method"] == "hooks+func" and func.attrs["method"] == "func"
    assert auto.attrs["path_func"] == "pos" and auto.attrs["skipped"] == ""
    assert auto.attrs["path_hooks"].split(", ") == ["tok.weight", "ln.weight", "ln.bias", "fc.weight", "fc.bias",
                                                    "rms.weight"]
    assert list(auto.layer.values) == ["model", "tok", "ln", "fc", "rms", "total"]  # the model's parameter order
    for v in ("grad_norm_sq", "trace_cov", "trace_cov_sem", "noise_scale", "noise_scale_unbiased", "noise_scale_ci"):
        np.testing.assert_allclose(auto[v].values, func[v].values, rtol=1e-9)
    with pytest.raises(pergrad.FastPathUnsupported, match=r"`method` must be 'auto' or 'func' for this model: .*\['pos'\]"):
        probes.gradient_stats(model, pergrad.next_token_loss, batch=ids, method="hooks")
    # the every-step probe: the same numbers, the coverage in the Measurement and in stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss, m = probes.probed_step(model, pergrad.next_token_loss, optimizer=opt, batch=ids, step=0, sem=True)
    np.testing.assert_allclose(m.trace_cov, func.trace_cov.values, rtol=1e-9)
    assert m.coverage["path_func"] == "pos"
    assert probes.stack([m]).attrs["path_func"] == "pos"


class _Odd(nn.Module):
    """A module whose boolean-mask indexing (a data-dependent shape) torch.func's vmap refuses."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(DIM, dtype=torch.float64))

    def forward(self, h):
        return h * self.scale + 0.0 * h[h > 1e9].sum()


def test_parameters_neither_path_measures_are_skipped_loudly(device):
    model, ids = TinyGPT().to(device), _ids(4).to(device)
    model.rms = nn.Sequential(model.rms, _Odd().to(device))
    with pytest.warns(RuntimeWarning, match=r"skip the parameters \['pos', 'rms.1.scale'\]"):
        ds = probes.gradient_stats(model, pergrad.next_token_loss, batch=ids)
    assert ds.attrs["skipped"] == "pos, rms.1.scale" and ds.attrs["path_func"] == ""
    assert "rms.1.scale" in ds.attrs["skipped_reasons"] and "torch.func could not" in ds.attrs["skipped_reasons"]
    assert list(ds.layer.values) == ["tok", "ln", "fc", "rms.0", "total"]
    assert bool(np.isfinite(ds.trace_cov.values).all())


class _Outside(nn.Module):
    """A Linear whose weight is also used outside its forward call, and one never called at all."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.proj, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x)) + 0.5 * x @ self.fc.weight.T
        h = torch.tanh(F.linear(h, self.proj.weight, self.proj.bias))  # like nn.MultiheadAttention's out_proj
        return self.out(h)


def test_uses_outside_the_module_move_to_torch_func(device):
    """The fast path notices a weight used outside its module (its per-example gradients do not add
    up to its gradient) and a module never called: those parameters go to torch.func."""
    gen = torch.Generator().manual_seed(0)
    model = _Outside().double().to(device)
    x, y = torch.randn(9, 4, generator=gen, dtype=torch.float64).to(device), torch.arange(9, device=device) % 3
    auto = probes.gradient_stats(model, F.cross_entropy, x, y)
    func = probes.gradient_stats(model, F.cross_entropy, x, y, method="func")
    assert auto.attrs["path_func"] == "fc.weight, proj.weight, proj.bias"
    assert auto.attrs["path_hooks"] == "fc.bias, out.weight, out.bias"
    np.testing.assert_allclose(auto.trace_cov.values, func.trace_cov.values, rtol=1e-9)
    with pytest.raises(pergrad.FastPathUnsupported, match=r"cannot measure \['fc.weight', 'proj.weight', 'proj.bias'\]"):
        pergrad.hook_summaries(model, F.cross_entropy, x, y)


def _ce_per_example(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def test_batch_form_equals_the_xy_form(device):
    """loss_fn(model, batch) -> (B,) gives the statistics of loss_fn(output, target) by the mean,
    on both paths; a dict batch and a model returning a Hugging Face style object work too."""
    model = models.mlp(5, 3, (6,), seed=3).double().to(device)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(10, 5, generator=gen, dtype=torch.float64).to(device), torch.arange(10, device=device) % 3
    for method in ("hooks", "func"):
        a = probes.gradient_stats(model, F.cross_entropy, x, y, method=method, ci=0.9, n_boot=20)
        b = probes.gradient_stats(model, _ce_per_example, batch=(x, y), method=method, ci=0.9, n_boot=20)
        for v in a.data_vars:
            np.testing.assert_allclose(a[v].values, b[v].values, rtol=1e-12, err_msg=v)
    c = probes.gradient_stats(model, lambda m, d: F.cross_entropy(m(d["x"]), d["y"], reduction="none"),
                              batch={"x": x, "y": y})
    np.testing.assert_allclose(c.trace_cov.values, a.trace_cov.values, rtol=1e-12)

    class HF(nn.Module):  # returns an output object with .logits
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return types.SimpleNamespace(logits=self.inner(x), loss=None)

    d = probes.gradient_stats(HF(model), F.cross_entropy, x, y)
    np.testing.assert_allclose(d.trace_cov.values[-1], a.trace_cov.values[-1], rtol=1e-12)


def test_next_token_loss_matches_its_definition():
    model, ids = TinyGPT(), _ids(6)
    losses = pergrad.next_token_loss(model, ids)
    logp = torch.log_softmax(model(ids[:, :-1]), -1)
    want = -logp.gather(2, ids[:, 1:, None])[..., 0].mean(1)
    torch.testing.assert_close(losses, want, rtol=RTOL, atol=ATOL)
    mask = torch.ones_like(ids)
    mask[0, -1] = 0  # the last target of example 0 is padding: left out of its mean

    class Masked(nn.Module):  # an HF-style model that takes the mask and returns .logits
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids, attention_mask=None):
            return types.SimpleNamespace(logits=self.inner(ids))

    got = pergrad.next_token_loss(Masked(model), {"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(got[1:], want[1:], rtol=RTOL, atol=ATOL)
    nll0 = -logp[0].gather(1, ids[0, 1:, None])[:, 0]
    torch.testing.assert_close(got[0], nll0[:-1].mean(), rtol=RTOL, atol=ATOL)


def test_batch_form_refuses_a_reduced_loss_and_mixed_forms():
    model, ids = TinyGPT(), _ids()
    with pytest.raises(ValueError, match=r"`loss_fn` must return per-example losses of shape \(B,\) = \(2,\) in the "
                                         r"batch form .*got a scalar"):
        probes.gradient_stats(model, lambda m, b: pergrad.next_token_loss(m, b).mean(), batch=ids)
    with pytest.raises(ValueError, match=r"`batch` must be given alone"):
        probes.gradient_stats(model, pergrad.next_token_loss, ids.double(), batch=ids)
    with pytest.raises(TypeError, match=r"`x` and `y` must be given .* or `batch` alone .*got neither"):
        probes.gradient_stats(model, pergrad.next_token_loss)
    with pytest.raises(ValueError, match=r"`batch` must have at least 2 examples"):
        probes.gradient_stats(model, pergrad.next_token_loss, batch=ids[:1])
    with pytest.raises(ValueError, match=r"`batch` must be tensors sharing their first"):
        probes.gradient_stats(model, _ce_per_example, batch=(torch.zeros(3, 2), torch.zeros(4)))


def test_check_reports_small_errors_and_finds_a_broken_handler(monkeypatch, device):
    model, ids = TinyGPT().to(device), _ids(7).to(device)
    ok = pergrad.check(model, pergrad.next_token_loss, batch=ids)
    assert list(ok.parameter.values) == [k for k, _ in model.named_parameters()]
    assert dict(zip(ok.parameter.values, ok.path.values)) == {
        "tok.weight": "hooks", "pos": "func", "ln.weight": "hooks", "ln.bias": "hooks", "fc.weight": "hooks",
        "fc.bias": "hooks", "rms.weight": "hooks"}
    assert float(ok.max_rel_error.max()) < 1e-10 and ok.attrs["max_rel_error"] < 1e-10
    norm_blocks = pergrad._BLOCKS["layernorm"]

    def broken(m, data, attrs, means, need, B, scale=1.0):  # a LayerNorm handler with a wrong squared norm
        out = norm_blocks(m, data, attrs, means, need, B, scale)
        out["weight"]["sq"] = out["weight"]["sq"] * 1.1
        return out

    monkeypatch.setitem(pergrad._BLOCKS, "layernorm", broken)
    bad = pergrad.check(model, pergrad.next_token_loss, batch=ids)
    errors = dict(zip(bad.parameter.values, bad.max_rel_error.values))
    assert errors["ln.weight"] > 0.05 and max(v for k, v in errors.items() if k != "ln.weight") < 1e-10


def test_check_on_the_xy_form_in_float32(device):
    model = models.cnn(1, 3, 8, width=2, seed=0).to(device)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 1, 8, 8, generator=gen).to(device), torch.arange(5, device=device) % 3
    ds = pergrad.check(model, F.cross_entropy, x, y)
    assert set(ds.path.values) == {"hooks"} and float(ds.max_rel_error.max()) < 1e-4


def test_bfloat16_autocast_stays_on_the_fast_path():
    """Under bfloat16 autocast the captured gradients are bfloat16: the completeness check allows
    for their rounding (no parameter leaves the fast path), and the statistics stay within a few
    bfloat16 roundings (2**-8 relative each) of float32."""
    model, ids = TinyGPT().float(), _ids(8)
    ref = probes.gradient_stats(model, pergrad.next_token_loss, batch=ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf = probes.gradient_stats(model, pergrad.next_token_loss, batch=ids)
    assert bf.attrs["path_func"] == "pos" and bf.attrs["skipped"] == ""
    np.testing.assert_allclose(bf.trace_cov.values, ref.trace_cov.values, rtol=0.05)


def test_fused_conv2d_norms_and_gradient_equal_torch_func():
    """The every-step probe on a CNN whose convolutions have many positions (T (O + I) >= O I): each
    Conv2d forms its per-example weight gradients once in the backward pass and its weight gradient
    as their sum; the gradients equal the plain backward pass (strided, dilated and padded
    convolutions, first layer without an input gradient), the squared norms torch.func, and
    probed_step's statistics those of method="func"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),
                          nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 1)), nn.Tanh(),
                          nn.Conv2d(4, 2, 1, bias=False), nn.Flatten(), nn.LazyLinear(3)).double()
    x, y = torch.randn(5, 2, 9, 8, dtype=torch.float64), torch.tensor([0, 2, 1, 2, 0])
    model(x)  # the LazyLinear's shape
    F.cross_entropy(model(x), y).backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    cap, _ = pergrad._capture(pergrad._Problem(model, F.cross_entropy, x, y, None), fuse=True)
    assert set(cap.fused) == {"0", "2", "4"}
    blocks, unusable = cap._param_blocks(5)
    G = pergrad.per_example_grads(model, F.cross_entropy, x, y)
    assert not unusable
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[k], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(blocks[k]["sq"], (G[k].reshape(5, -1) ** 2).sum(1), rtol=RTOL, atol=ATOL)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    _, m = probes.probed_step(model, F.cross_entropy, x, y, opt)
    func = probes.gradient_stats(model, F.cross_entropy, x, y, method="func")
    np.testing.assert_allclose(m.trace_cov, func.trace_cov.values, rtol=1e-9)
    np.testing.assert_allclose(m.grad_norm_sq, func.grad_norm_sq.values, rtol=1e-9)


def test_conv2d_with_few_positions_keeps_the_gram_route():
    """A Conv2d whose per-example weight gradients are larger than its captured data (few output
    positions, many channels) is not fused: its input patches would cost more than the Gram route."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(32 * 16, 3)).double()
    x, y = torch.randn(4, 16, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    cap, _ = pergrad._capture(pergrad._Problem(model, F.cross_entropy, x, y, None), fuse=True)
    assert "0" not in cap.fused
    blocks, _ = cap._param_blocks(4)
    G = pergrad.per_example_grads(model, F.cross_entropy, x, y)
    torch.testing.assert_close(blocks["0.weight"]["sq"], (G["0.weight"].reshape(4, -1) ** 2).sum(1),
                               rtol=RTOL, atol=ATOL)
