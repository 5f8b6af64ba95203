"""deepmodels.models.transformer and deepmodels.data.text_corpus: causality, tied weights, shapes
and input checks, per-example gradients against a loop, training on the corpus, and the corpus'
determinism and file split."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from deepmodels import data, models, pergrad, probes
from deepmodels.train import train

V, T = 32, 16  # a small vocabulary and context for the model tests (the corpus uses 256 bytes)


def tiny(**kw):
    return models.transformer(**{"vocab_size": V, "context_length": T, "d_model": 16, "n_layers": 2, "n_heads": 2,
                                 "seed": 0, **kw})


def ids(B, t=T, seed=0, vocab=V):
    return torch.randint(0, vocab, (B, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def corpus():
    return data.text_corpus(context_length=32, max_bytes=100_000, seed=0)


def test_shapes_names_and_repr():
    m = tiny()
    x = ids(3)
    out = m(x)
    assert out.shape == (3, V, T) and out.dtype == torch.float32
    torch.testing.assert_close(m(x.float()), out, rtol=0, atol=0)  # float ids give the same logits
    assert m(x[:, :5]).shape == (3, V, 5)  # shorter sequences than the context
    assert [k for k, _ in m.named_children()] == ["tok", "pos", "block1", "block2", "ln_f", "head"]
    assert "block2.attn.qkv.weight" in m.state_dict() and "block1.mlp.proj.bias" in m.state_dict()
    kinds = {type(mod) for mod in m.modules() if list(mod.parameters(recurse=False))}
    assert kinds == {torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.Linear}
    assert "vocab_size=32, context_length=16, n_layers=2, tie_weights=True" in repr(m)
    assert models.Factory("transformer", V, T, d_model=8, n_heads=2)(3).tok.weight.shape == (V, 8)
    # seeded: the same seed gives the same parameters, another seed others
    assert torch.equal(tiny().tok.weight, m.tok.weight) and not torch.equal(tiny(seed=1).tok.weight, m.tok.weight)


def test_causal():
    """Changing the token at position t changes no logit at an earlier position, and does change later ones."""
    m = tiny()
    x = ids(4)
    t0 = 9
    x2 = x.clone()
    x2[:, t0] = (x2[:, t0] + 1) % V
    a, b = m(x), m(x2)
    assert torch.equal(b[:, :, :t0], a[:, :, :t0])  # masked scores are -inf: their weights are exactly 0
    assert (b[:, :, t0:] - a[:, :, t0:]).abs().amax(dim=(0, 1)).min() > 1e-6  # float32 rounding is ~1e-7 here


def test_tied_weights_are_one_parameter():
    tied, untied = tiny(), tiny(tie_weights=False)
    assert tied.head.weight is tied.tok.weight
    assert len(list(tied.parameters())) == len(list(untied.parameters())) - 1
    assert "head.weight" not in dict(tied.named_parameters()) and "head.weight" in dict(untied.named_parameters())
    assert untied.head.weight is not untied.tok.weight
    # the tied gradient is the sum of the two uses: an untied copy with equal weights, gradients added
    cut = copy.deepcopy(tied)
    cut.head.weight = torch.nn.Parameter(tied.tok.weight.detach().clone())
    x, y = ids(4, seed=1), ids(4, seed=2)
    for m in (tied, cut):
        F.cross_entropy(m(x), y).backward()
    torch.testing.assert_close(tied.tok.weight.grad, cut.tok.weight.grad + cut.head.weight.grad)


@pytest.mark.parametrize("x, err, match", [
    ([[1, 2]], TypeError, "`x` must be a tensor of token ids"),
    (torch.zeros(2, 3, dtype=torch.int32), TypeError, "int32"),
    (torch.zeros(2, T + 1, dtype=torch.int64), ValueError, r"T <= 16 \(the context length\)"),
    (torch.zeros(6, dtype=torch.int64), ValueError, r"shape \(B, T\)"),
    (torch.zeros(2, 0, dtype=torch.int64), ValueError, r"shape \(B, T\)"),
    (torch.full((2, 3), V), ValueError, r"token ids in \[0, 32\).*got 32"),
    (torch.full((2, 3), -1), ValueError, "got -1"),
    (torch.full((2, 3), 1.5), ValueError, "whole-number"),
    (torch.full((2, 3), float("nan")), ValueError, "whole-number"),
])
def test_input_errors_name_x(x, err, match):
    with pytest.raises(err, match=match):
        tiny()(x)


def test_builder_errors():
    with pytest.raises(ValueError, match="`n_heads` must divide `d_model`"):
        models.transformer(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="`vocab_size`"):
        models.transformer(vocab_size=1)


def test_per_example_gradients_against_a_loop():
    """torch.func per-example gradients (the probes' fallback) equal single-example backward passes."""
    m = tiny()
    x, y = ids(5, seed=3).float(), ids(5, seed=4)
    g = pergrad.per_example_grads(m, F.cross_entropy, x, y)
    assert set(g) == {k for k, _ in m.named_parameters()}
    for i in range(5):
        m.zero_grad()
        F.cross_entropy(m(x[i:i + 1]), y[i:i + 1]).backward()
        for k, p in m.named_parameters():
            torch.testing.assert_close(g[k][i], p.grad, rtol=1e-4, atol=1e-6)
    ds = probes.gradient_stats(m, F.cross_entropy, x, y)  # "auto": the layers outside Linear fall back to func
    assert ds.attrs["method"] in ("func", "hooks") and float(ds.noise_scale.sel(layer="total")) > 0


def test_corpus_deterministic_and_split_by_file(corpus):
    again = data.text_corpus(context_length=32, max_bytes=100_000, seed=0)
    other = data.text_corpus(context_length=32, max_bytes=100_000, seed=1)
    for k in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(corpus, k), getattr(again, k))
    a = corpus.attrs
    assert a["sha256"] == again.attrs["sha256"] == other.attrs["sha256"]  # the files do not depend on the seed
    assert other.attrs["files_test"] != a["files_test"]  # the split does
    train_files, test_files = set(a["files_train"]), set(a["files_test"])
    assert train_files and test_files and not train_files & test_files
    assert a["files_train"] == sorted(a["files_train"]) and all(f.endswith(".py") for f in train_files)
    assert sum(len(open(f"{a['stdlib']}/{f}", "rb").read()) for f in train_files | test_files) == a["n_bytes"] <= 100_000
    assert corpus.name == f"stdlib-py{'.'.join(a['python_version'].split('.')[:2])}-{a['sha256'][:8]}"
    # next-token windows: y is x shifted by one; token ids are whole numbers in [0, 256)
    x, y = corpus.x_train, corpus.y_train
    assert x.shape[1:] == y.shape[1:] == (32,) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 1:].long(), y[:, :-1]) and torch.equal(x[1:, 0].long(), y[:-1, -1])
    assert torch.equal(x, x.round()) and 0 <= x.min() and x.max() < 256 and corpus.n_classes == 256
    head = open(f"{a['stdlib']}/{a['files_train'][0]}", "rb").read(32)
    assert bytes(x[0].long().tolist()) == head


def test_corpus_errors_and_repr(corpus):
    with pytest.raises(ValueError, match="`max_bytes` must admit at least two files"):
        data.text_corpus(max_bytes=10)
    with pytest.raises(ValueError, match="`context_length` must leave at least one window"):
        data.text_corpus(context_length=60_000, max_bytes=5_000)
    text = repr(corpus)
    assert len(text.splitlines()) <= 12 and max(map(len, text.splitlines())) <= 140 and "tensor(" not in text
    assert corpus.name in text and "Python" in text and "labels per position" in text


def test_trains_on_the_corpus(corpus):
    """Adam on seeded batches of the corpus: the held-out loss falls well below log(256) = 5.55 in 40 steps."""
    torch.manual_seed(0)
    m = models.transformer(context_length=32, d_model=32, n_layers=1, n_heads=2, seed=0)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    xt, yt = corpus.x_test[:64], corpus.y_test[:64]
    with torch.no_grad():
        before = F.cross_entropy(m(xt), yt).item()
    for _ in range(40):
        idx = torch.randint(0, corpus.x_train.shape[0], (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(m(corpus.x_train[idx]), corpus.y_train[idx]).backward()
        opt.step()
    with torch.no_grad():
        after = F.cross_entropy(m(xt), yt).item()
    assert before == pytest.approx(5.55, abs=0.05)  # uniform over 256 bytes at initialisation
    assert after < 3.8, (before, after)


def test_train_loop_and_probes(corpus):
    """deepmodels.train.train with its default F.cross_entropy: losses, accuracy in [0, 1], probes."""
    small = data.text_corpus(context_length=16, max_bytes=20_000, seed=0)
    m = models.transformer(context_length=16, d_model=16, n_layers=1, n_heads=2, seed=0)
    r = train(m, small, lr=3e-3, optimizer="adam", batch_size=8, n_steps=6, probe_at=[0, 6], probe_size=8,
              progress=False)
    assert r.loss.values[-1] < r.loss.values[0]
    with torch.no_grad():  # accuracy: the share of all n T next-byte labels predicted, here by the trained model
        acc = (m(small.x_train).argmax(1) == small.y_train).double().mean().item()
    assert r.accuracy.values[-1] == pytest.approx(acc, rel=1e-12) and 0 < acc < 1
    assert (r.noise_scale.sel(layer="total").values > 0).all()
