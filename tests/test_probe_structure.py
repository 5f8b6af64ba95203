"""The every-step probe's cache of the model's structure (deepmodels.pergrad._layout): reused while the
model is unchanged, derived again when a module or a parameter is replaced, added, frozen or moved,
with the numbers of a fresh probe; no hook and no reference left on or to the model after a call."""

import copy
import gc
import math
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepmodels import _validate as V
from deepmodels import models, pergrad, probes

FIELDS = ("layer", "n_params", "grad_norm_sq", "trace_cov", "mean_sq")


def _batch(n_in=12, n_out=5, B=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, n_in, generator=gen), torch.randint(0, n_out, (B,), generator=gen)


def _probe(model, x, y, sem=False):
    """A probed step that leaves the parameters where they are (lr 0), so that two models probed
    in turn on the same batch must give the same numbers."""
    loss, m = probes.probed_step(model, F.cross_entropy, x, y, torch.optim.SGD(model.parameters(), lr=0.0), sem=sem)
    assert m.diverged is None
    return m


def _assert_same(m, ref):
    assert m.layer == ref.layer and m.coverage == ref.coverage
    for f in FIELDS[1:]:
        np.testing.assert_array_equal(getattr(m, f), getattr(ref, f), err_msg=f)


def _changes():
    """Changes between two probe calls: (name, change(model) -> None)."""

    def freeze(model):
        model.fc1.weight.requires_grad_(False)

    def unfreeze_after_freeze(model):
        model.fc1.weight.requires_grad_(False)
        _probe(model, *_batch())
        model.fc1.weight.requires_grad_(True)

    def replace_layer(model):
        torch.manual_seed(1)
        model.out = torch.nn.Linear(8, 5)

    def replace_parameter(model):
        model.fc1.bias = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 8))

    def add_layer(model):
        torch.manual_seed(2)
        model.append(torch.nn.Tanh())
        model.append(torch.nn.Linear(5, 5))

    def drop_bias(model):
        model.fc1.bias = None

    def to_float64(model):
        model.double()

    return {f.__name__: f for f in (freeze, unfreeze_after_freeze, replace_layer, replace_parameter, add_layer,
                                    drop_bias, to_float64)}


CHANGES = _changes()


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_model_gives_the_numbers_of_a_fresh_probe(change):
    """Probe, change the model, probe again: the cached structure is derived again, and the numbers
    (and coverage) are those of a copy of the changed model probed for the first time."""
    model = models.mlp(12, 5, (8,), seed=0)
    x, y = _batch()
    _probe(model, x, y)
    before = pergrad._layout(model).structure
    CHANGES[change](model)
    if change == "to_float64":
        x = x.double()
    fresh = copy.deepcopy(model)
    got, ref = _probe(model, x, y), _probe(fresh, x, y)
    assert pergrad._layout(model).structure is not before
    _assert_same(got, ref)
    # and the layers measured are those of the changed model
    trainable = {pergrad.layer_of(k) for k, p in model.named_parameters() if p.requires_grad}
    assert set(got.layer[:-1]) == trainable


def test_an_unchanged_model_reuses_its_structure_and_keeps_its_numbers():
    """The structure is derived once per model: later calls bind it to the same modules and parameters,
    and give the numbers of a fresh probe (also with the per-example deviations, ``sem``)."""
    model = models.mlp(12, 5, (8, 8), seed=0)
    x, y = _batch()
    first = _probe(model, x, y)
    st = pergrad._layout(model).structure
    for sem in (False, True, False):
        m = _probe(model, x, y, sem=sem)
        assert pergrad._layout(model).structure is st
        _assert_same(m, _probe(copy.deepcopy(model), x, y, sem=sem))
    _assert_same(_probe(model, x, y), first)
    assert st.verified  # the fast path's sums were checked against .grad once, on this structure
    model.fc1.weight.requires_grad_(False)
    model.fc1.weight.requires_grad_(True)  # back to the same structure: the same signature
    assert pergrad._layout(model).structure is st


def test_a_changed_module_attribute_that_decides_coverage_is_seen():
    """A Conv2d switched in place to circular padding (the same parameters) leaves the fast path: the
    signature holds the attributes that decide coverage; the numbers are a fresh probe's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(32, 3))
    x = torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6) % 3
    ds = probes.gradient_stats(model, F.cross_entropy, x, y)
    assert ds.attrs["path_func"] == ""
    model[0].padding_mode = "circular"
    ds = probes.gradient_stats(model, F.cross_entropy, x, y)
    assert ds.attrs["path_func"] == "0.weight, 0.bias"
    ref = probes.gradient_stats(copy.deepcopy(model), F.cross_entropy, x, y)
    np.testing.assert_array_equal(ds.trace_cov.values, ref.trace_cov.values)


def _hooks(model):
    return [(n, kind) for n, m in model.named_modules()
            for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
            if getattr(m, kind)] + [(k, "tensor") for k, p in model.named_parameters() if p._backward_hooks]


def test_no_hook_and_no_reference_is_left_on_or_to_the_model():
    """After a probed step (also one that diverges inside the capture, and a gradient_stats call),
    no hook is registered on the model, and the cache does not keep the model alive."""
    model = models.mlp(12, 5, (8,), seed=0)
    x, y = _batch()
    _probe(model, x, y)
    assert _hooks(model) == []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, m = probes.probed_step(model, lambda out, t: F.cross_entropy(out, t) * math.inf, x, y, opt)
    assert loss == math.inf and "loss is not finite" in m.diverged
    assert _hooks(model) == []
    probes.gradient_stats(model, F.cross_entropy, x, y)
    assert _hooks(model) == []
    ref = weakref.ref(model)
    del model, opt, m
    gc.collect()
    assert ref() is None


def test_the_sum_finiteness_checks_fall_back_to_the_exact_ones():
    """Finite values whose sum overflows are accepted (the exact check decides), NaN and inf refused
    by name, inf allowed where only NaN is refused."""
    huge = torch.full((4, 3), 3e38)
    assert not math.isfinite(float(huge.sum()))
    assert V.Tensor("float")("x", huge) is huge
    with pytest.raises(ValueError, match=r"`x` must be finite \(no NaN or inf\); got 1 entries"):
        V.Tensor("float")("x", torch.tensor([1.0, -math.inf]))
    assert V.Tensor("float", finite="no-nan")("x", torch.tensor([1.0, math.inf])) is not None
    with pytest.raises(ValueError, match="no NaN"):
        V.Tensor("float", finite="no-nan")("x", torch.tensor([math.inf, math.nan]))
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(-3e38)
    assert V.nonfinite_params(model, dict(model.named_parameters())) is None
