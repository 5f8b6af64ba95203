"""Bad input to every public function of :mod:`deepmodels`: generated from the declared constraints
(:mod:`tests.badinput`), and hand-written for the cases a stress test found (float64 input, labels
out of range, mismatched batches, an unavailable device, empty grids, sizes that cannot fit), plus
how the probes report a diverged model."""

from __future__ import annotations

import functools
import inspect
import math
import os
import pickle
import re
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import deepmodels
from deepmodels import _checks
from deepmodels import _validate as V
from deepmodels import bridge, callbacks, cluster, data, gns, hessian, models, optim, pergrad, predict, probes, spectra, steps, train
from deepmodels._validate import REGISTRY

import badinput

CE = F.cross_entropy
N, D, C = 8, 8, 3  # examples, features, classes of the tiny problem
P = D * 4 + 4 + 4 * C + C  # parameters of mlp(D, C, (4,))


def _new_tiny(seed=0):
    g = torch.Generator().manual_seed(seed)
    return models.mlp(D, C, (4,), seed=seed), torch.randn(N, D, generator=g), torch.arange(N) % C


_tiny = functools.lru_cache(maxsize=None)(_new_tiny)  # shared by the calls that do not change the model


@functools.lru_cache(maxsize=None)
def _dataset():
    _, x, y = _tiny()
    return data.Dataset(x, y, x[:4], y[:4], C, "tiny")


def _runs():
    import xarray as xr

    arr = np.array([[[[100.0, 120.0]]], [[[40.0, 50.0]]], [[[30.0, 35.0]]]])
    return xr.DataArray(arr, dims=("batch_size", "lr", "momentum", "seed"),
                        coords={"batch_size": [1.0, 4.0, 16.0], "lr": [0.1], "momentum": [0.0], "seed": [0, 1]})


@functools.lru_cache(maxsize=None)
def _reference():
    """A reference run of the tiny model that reaches its target (90% of its initial loss)."""
    model = _new_tiny()[0]
    with torch.no_grad():
        l0 = float(CE(model(_tiny()[1]), _tiny()[2]))
    return predict.reference_run(model, _dataset(), lr=0.5, batch_size=2, target=0.9 * l0, n_steps=200,
                                 n_probes=20, probe_size=8, progress=False)


@functools.lru_cache(maxsize=None)
def _fitted():
    model, x, y = _tiny()
    return bridge.fit_nqm(model, CE, x, y, k=2, dim=10)


@functools.lru_cache(maxsize=None)
def _files():
    """A tiny mnist.npz and CIFAR-10 folder (nothing is downloaded)."""
    root = tempfile.mkdtemp(prefix="dm-validate-")
    rng = np.random.default_rng(0)
    npz = os.path.join(root, "mnist.npz")
    np.savez(npz, x_train=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8), y_train=np.arange(4),
             x_test=rng.integers(0, 255, (2, 28, 28), dtype=np.uint8), y_test=np.arange(2))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (2, 3072), dtype=np.uint8), b"labels": [0, 1]}, f)
    return npz, root


@functools.lru_cache(maxsize=None)
def _captured():
    model, x, y = _tiny()
    cap, _ = pergrad.capture_backward(model, CE, x, y)
    return cap


@functools.lru_cache(maxsize=None)
def _measurement(step=0):
    model, x, y = _new_tiny()
    return probes.probed_step(model, CE, x, y, torch.optim.SGD(model.parameters(), lr=0.1), step=step)[1]


def _sgd():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)


def _rm3_closure():
    opt = _sgd()
    w = opt.param_groups[0]["params"][0]

    def closure():
        loss = (w - 1).pow(2).sum()
        loss.backward()
        return loss

    return optim.RM3(opt), closure


def _fresh(cls):
    return object.__new__(cls)


def _gram():
    g = torch.randn(N, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return g @ g.T


def _gns_ready(accumulation="mean"):
    """A GradientNoiseScale on a fresh tiny model after two backward passes (ready to update)."""
    model, x, y = _new_tiny()
    est = gns.GradientNoiseScale(model, accumulation=accumulation)
    for m in range(2):
        (CE(model(x[4 * m:4 * m + 4]), y[4 * m:4 * m + 4]) / 2).backward()
    return est


@functools.lru_cache(maxsize=None)
def _gns_estimate(step=0):
    return _gns_ready().update(4, step=step)


def _probe_ready():
    """A callbacks.Probe on a fresh tiny model after two backward passes of 4 examples (ready to step)."""
    model, x, y = _new_tiny()
    probe = callbacks.Probe(model)
    for m in range(2):
        (CE(model(x[4 * m:4 * m + 4]), y[4 * m:4 * m + 4]) / 2).backward()
    return probe


M = "deepmodels."
EXAMPLES = {
    M + "bridge.fit_linreg": lambda: ((_fitted(),), {}),
    M + "bridge.fit_nqm": lambda: ((_tiny()[0], CE, *_tiny()[1:]), {"k": 2, "dim": 10}),
    M + "bridge.predict_steps": lambda: ((_fitted(), [1, 4], 0.5 * _fitted().nqm.initial_loss), {}),
    M + "callbacks.Probe.__init__": lambda: ((_fresh(callbacks.Probe), _new_tiny()[0]), {"every": 2, "trainer": "loop"}),
    M + "callbacks.Probe.close": lambda: ((_probe_ready(),), {}),
    M + "callbacks.Probe.dataset": lambda: ((_probe_ready(),), {}),
    M + "callbacks.Probe.flush": lambda: ((_probe_ready(),), {}),
    M + "callbacks.Probe.load_state_dict": lambda: ((_probe_ready(), _probe_ready().state_dict()), {}),
    M + "callbacks.Probe.state_dict": lambda: ((_probe_ready(),), {}),
    M + "callbacks.Probe.stats_dataset": lambda: ((_probe_ready(),), {}),
    M + "callbacks.Probe.step": lambda: ((_probe_ready(),), {"micro_batch_size": 4, "step": 3}),
    M + "callbacks.criterion_loss": lambda: ((CE,), {}),
    M + "callbacks.probing": lambda: ((_new_tiny()[0],), {"every": 2, "ema_decay": 0.9}),
    M + "cluster.Rank1Clustering.__init__": lambda: ((_fresh(cluster.Rank1Clustering), _tiny()[0], 2), {}),
    M + "cluster.Rank1Clustering.fit": lambda: ((cluster.Rank1Clustering(_tiny()[0], 2), CE, *_tiny()[1:]), {"n_iter": 1}),
    M + "cluster.Rank1Clustering.variance": lambda: (
        (cluster.Rank1Clustering(_tiny()[0], 2).fit(CE, *_tiny()[1:], n_iter=1), CE, *_tiny()[1:]), {}),
    M + "data.Dataset.to": lambda: ((_dataset(), "cpu"), {}),
    M + "data.add_duplicates": lambda: ((np.zeros((10, 2)), np.arange(10), 0.5), {}),
    M + "data.corrupt_labels": lambda: ((np.arange(10) % 3, 0.2, 3), {}),
    M + "data.digits": lambda: ((), {"test_fraction": 0.2, "label_noise": 0.1, "duplicates": 0.1}),
    M + "data.mnist1d": lambda: ((), {"n_samples": 20}),
    M + "data.load_mnist_npz": lambda: ((_files()[0],), {"n_train": 2}),
    M + "data.load_cifar10": lambda: ((_files()[1],), {"n_train": 2}),
    M + "data.text_corpus": lambda: ((), {"context_length": 16, "max_bytes": 20_000, "test_fraction": 0.2}),
    M + "hessian.batch_spread": lambda: ((_tiny()[0], CE, _tiny()[1:], "grad_norm_sq"), {"n_batches": 2, "batch_size": 4}),
    M + "hessian.block_spectra": lambda: ((_tiny()[0], CE, *_tiny()[1:]), {"k": 2, "n_samples": 2}),
    M + "gns.GNSEstimate.as_dict": lambda: ((_gns_estimate(),), {}),
    M + "gns.GNSEstimate.to_dataset": lambda: ((_gns_estimate(),), {}),
    M + "gns.GradientNoiseScale.__init__": lambda: ((_fresh(gns.GradientNoiseScale), _new_tiny()[0]), dict(
        ema_decay=0.9, process_group=None, accumulation="sum")),
    M + "gns.GradientNoiseScale.load_state_dict": lambda: ((_gns_ready(), _gns_ready().state_dict()), {}),
    M + "gns.GradientNoiseScale.remove": lambda: ((_gns_ready(),), {}),
    M + "gns.GradientNoiseScale.skip": lambda: ((_gns_ready(),), {"sync": True}),
    M + "gns.GradientNoiseScale.sync": lambda: ((_gns_ready(),), {}),
    M + "gns.GradientNoiseScale.discard": lambda: ((_gns_ready(),), {}),
    M + "gns.GradientNoiseScale.state_dict": lambda: ((_gns_ready(),), {}),
    M + "gns.GradientNoiseScale.update": lambda: ((_gns_ready(),), {"micro_batch_size": 4, "step": 3, "sync": False}),
    M + "gns.NoiseScaleEMA.__init__": lambda: ((_fresh(gns.NoiseScaleEMA),), {"decay": 0.9}),
    M + "gns.NoiseScaleEMA.estimates": lambda: ((gns.NoiseScaleEMA(),), {}),
    M + "gns.NoiseScaleEMA.load_state_dict": lambda: ((gns.NoiseScaleEMA(), gns.NoiseScaleEMA().state_dict()), {}),
    M + "gns.NoiseScaleEMA.state_dict": lambda: ((gns.NoiseScaleEMA(),), {}),
    M + "gns.NoiseScaleEMA.update": lambda: ((gns.NoiseScaleEMA(), 2.0, -0.5), {}),
    M + "gns.stack": lambda: (([_gns_estimate(0), _gns_estimate(1)],), {}),
    M + "gns.step_estimates": lambda: ((10.0, 40.0, 4, 8, 1.5), {}),
    M + "hessian.flat_params": lambda: ((_tiny()[0],), {}),
    M + "hessian.hutchinson_trace": lambda: ((_tiny()[0], CE, *_tiny()[1:]), {"n_samples": 2}),
    M + "hessian.hvp": lambda: ((_tiny()[0], CE, *_tiny()[1:], torch.ones(P)), {}),
    M + "hessian.lanczos": lambda: ((lambda v: 2.0 * v, 30, 2, torch.ones(30)), {}),
    M + "hessian.rayleigh_quotients": lambda: ((_tiny()[0], CE, *_tiny()[1:], torch.ones(2, P)), {}),
    M + "hessian.samples_needed": lambda: ((np.array([1.0, 2.0, 1.5]),), {}),
    M + "hessian.top_eigenpairs": lambda: ((_tiny()[0], CE, *_tiny()[1:]), {"k": 2}),
    M + "hessian.top_eigenvalues": lambda: ((_tiny()[0], CE, *_tiny()[1:]), {"k": 2}),
    M + "models.Factory.__call__": lambda: ((models.Factory("mlp", D, C, (4,)), 1), {}),
    M + "models.Factory.__init__": lambda: ((_fresh(models.Factory), "mlp", D, C), {}),
    M + "models.Restored.__init__": lambda: ((_fresh(models.Restored), models.Factory("mlp", D, C, (4,)),
                                              _new_tiny()[0].state_dict()), {}),
    M + "models.Restored.__call__": lambda: ((models.Restored(models.Factory("mlp", D, C, (4,)),
                                                              _new_tiny(1)[0].state_dict()), 0), {}),
    M + "steps.summarize": lambda: ((_runs(),), dict(target=1.0, max_steps=100, eval_every=10, n_boot=10)),
    M + "predict.segments": lambda: (([0, 10, 20], [2.0, 1.0, 0.5], 0.4, 25.0), {"n_segments": 2}),
    M + "predict.reference_run": lambda: ((_new_tiny()[0], _dataset()), dict(
        lr=0.1, batch_size=2, target=0.01, n_steps=4, n_probes=2, probe_size=4, progress=False)),
    M + "predict.predict": lambda: (_reference() + (_new_tiny()[0], CE, _dataset()), dict(
        batch_sizes=[1, 2, 4], target=_reference()[0].attrs["target"], n_segments=1, k=2, dim=10, fit_size=8)),
    M + "models.cnn": lambda: ((1, C, 8), {"width": 2}),
    M + "models.linear": lambda: ((D, 2), {"bias": True}),
    M + "models.mlp": lambda: ((D, C, (4,)), {}),
    M + "models.random_features": lambda: ((D, 4, 2), {}),
    M + "models.resnet8": lambda: ((1, C), {"width": 2, "batch_norm": False, "image_size": 8}),
    M + "models.transformer": lambda: ((16, 8), {"d_model": 4, "n_layers": 1, "n_heads": 2, "d_mlp": 8,
                                                 "tie_weights": False}),
    M + "optim.M3.step": lambda: ((optim.M3(_sgd()),), {"grads": [[torch.ones(2)], [torch.zeros(2)], [torch.ones(2)]]}),
    M + "optim.Winsorized.__init__": lambda: ((_fresh(optim.Winsorized), _sgd(), 1), {}),
    M + "optim.Winsorized.step": lambda: ((optim.Winsorized(_sgd(), 1),), {"per_example": [torch.randn(5, 2)]}),
    M + "optim._Rolling.__init__": lambda: ((_fresh(optim.RA3), _sgd()), {}),
    M + "optim._Rolling.step": lambda: (lambda o, c: ((o, c), {}))(*_rm3_closure()),
    M + "optim._Wrapper.__init__": lambda: ((_fresh(optim.RM3), _sgd()), {}),
    M + "optim._Wrapper.zero_grad": lambda: ((optim.RA3(_sgd()),), {"set_to_none": False}),
    M + "optim.median_of_3": lambda: ((torch.zeros(2), torch.ones(2), torch.full((2,), math.inf)), {}),
    M + "optim.winsorized_mean": lambda: ((torch.randn(5, 2), 1), {}),
    M + "pergrad.LayerCapture.__init__": lambda: ((_fresh(pergrad.LayerCapture), _tiny()[0]), {}),
    M + "pergrad.LayerCapture.per_example_grads": lambda: ((_captured(), N), {}),
    M + "pergrad.LayerCapture.summaries": lambda: ((_captured(), N), {"gram": True}),
    M + "pergrad.capture_backward": lambda: ((_tiny()[0], CE, *_tiny()[1:]), {}),
    M + "pergrad.check_batch": lambda: (_tiny()[1:], {}),
    M + "pergrad.flatten": lambda: ((pergrad.per_example_grads(_tiny()[0], CE, *_tiny()[1:]),), {}),
    M + "pergrad.hook_summaries": lambda: ((_tiny()[0], CE, *_tiny()[1:]), {}),
    M + "pergrad.next_token_loss": lambda: ((torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5)),
                                             torch.arange(12).reshape(3, 4) % 5), {}),
    M + "pergrad.check": lambda: ((_tiny()[0], CE, *_tiny()[1:]), {"method": "auto", "chunk_size": 4}),
    M + "pergrad.per_example_grads": lambda: ((_tiny()[0], CE, *_tiny()[1:]), {"chunk_size": 3}),
    M + "probes.Measurement.to_dataset": lambda: ((_measurement(),), {}),
    M + "probes.Measurement.variables": lambda: ((_measurement(),), {}),
    M + "probes.bootstrap_ci": lambda: (({"a": _gram()}, {"a": 5}, 4.0), {"n_boot": 10, "level": 0.9}),
    M + "probes.estimator_stats": lambda: ((_tiny()[0], CE, *_tiny()[1:], 2), {"n_iter": 1, "snapshot": _tiny(1)[0]}),
    M + "probes.gradient_stats": lambda: ((_tiny()[0], CE, *_tiny()[1:]), {"ci": 0.9, "n_boot": 10, "step": 3}),
    M + "probes.probed_step": lambda: (
        (lambda m: ((m, CE, *_tiny()[1:], torch.optim.SGD(m.parameters(), lr=0.1)), {"step": 0}))(_new_tiny()[0])),
    M + "probes.stack": lambda: (([_measurement(0), _measurement(1)],), {}),
    M + "spectra.gradient_history": lambda: ((_tiny()[0], CE, *_tiny()[1:]), {"batch_size": 4, "n_batches": 2}),
    M + "spectra.gradient_spectra": lambda: ((_tiny()[0], CE, *_tiny()[1:]), {"batch_size": 4, "n_batches": 2}),
    M + "spectra.gram_spectra": lambda: ((torch.randn(3, 5),), {}),
    M + "steps.measure_steps": lambda: ((models.Factory("mlp", D, C, (4,)), _dataset()), dict(
        batch_sizes=[2], lrs=[0.1], momenta=[0.0], seeds=[0], target=10.0, max_steps=2, eval_every=1, progress=False,
        n_workers=1)),
    M + "steps.run_one": lambda: ((models.Factory("mlp", D, C, (4,)), _dataset()), dict(
        batch_size=2, lr=0.1, momentum=0.0, seed=0, target=10.0, metric="train_loss", max_steps=2, eval_every=1)),
    M + "train.NoiseScaleBatch.__init__": lambda: ((_fresh(train.NoiseScaleBatch), 2, 8), dict(
        factor=0.5, estimate="biased", lr={2: 0.1, 8: 0.2})),
    M + "train.probe_steps": lambda: ((10,), {"every": 5}),
    M + "train.train": lambda: ((_new_tiny()[0], _dataset()), dict(
        lr=0.1, batch_size=2, n_steps=2, momentum=0.5, probe_at=[0, 2], probe_size=4, seed=0, progress=False,
        device="cpu", method="auto", loss_fn=CE, optimizer="sgd", target=0.01, eval_every=1)),
}

assert deepmodels.__all__  # every module is imported (deepmodels/__init__) before the parameters are built


@pytest.mark.parametrize("qualname,arg,bad", badinput.bad_calls(REGISTRY, EXAMPLES, M))
def test_bad_input_is_refused(qualname, arg, bad):
    badinput.check_refused(REGISTRY, EXAMPLES, qualname, arg, bad)


@pytest.mark.parametrize("qualname", sorted(EXAMPLES))
def test_example_runs(qualname):
    badinput.check_example_runs(REGISTRY, EXAMPLES, qualname)


def _public_callables():
    """Every public function of each deepmodels module and every public method of its public classes."""
    for modname in deepmodels.__all__:
        mod = getattr(deepmodels, modname)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isclass(obj):
                if issubclass(obj, Exception):
                    continue
                for meth, fn in inspect.getmembers(obj, inspect.isfunction):
                    if meth.startswith("_") and meth not in ("__init__", "__call__"):
                        continue
                    if meth == "__init__" and getattr(obj, "__dataclass_fields__", None):
                        continue  # generated by @dataclass (Dataset checks its fields in __post_init__)
                    yield fn
            elif inspect.isfunction(obj):
                yield obj


def test_every_public_function_is_registered():
    missing = [f"{fn.__module__}.{fn.__qualname__}" for fn in _public_callables()
               if f"{fn.__module__}.{fn.__qualname__}" not in REGISTRY]
    assert not missing, f"public functions without @validate: {missing}"


# --------------------------------------------------------------------------------------------------
# the cases of the stress test
# --------------------------------------------------------------------------------------------------
def test_float64_input_is_refused_not_converted():
    model, x, y = _tiny()
    msg = r"`x` must be a float32 tensor \(the model's dtype\); got float64"
    with pytest.raises(TypeError, match=msg):
        probes.gradient_stats(model, CE, x.double(), y)
    with pytest.raises(TypeError, match=msg):
        pergrad.per_example_grads(model, CE, x.double(), y)
    with pytest.raises(TypeError, match=msg):
        hessian.hvp(model, CE, x.double(), y, torch.ones(P))
    with pytest.raises(TypeError, match=r"`y` must be int64 class labels or float32 targets \(the model's dtype\); got float64"):
        probes.gradient_stats(models.linear(D), F.mse_loss, x, torch.zeros(N, 1, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"`y` must be an int64 \(class labels\) or float \(targets\) tensor of shape "
                                        r"\(B, ...\); got int32"):
        probes.gradient_stats(model, CE, x, y.int())
    # a float64 model takes float64 input; the direction of hvp is converted (documented)
    model64 = models.mlp(D, C, (4,)).double()
    assert probes.gradient_stats(model64, CE, x.double(), y).grad_norm_sq.notnull().all()
    assert hessian.hvp(model, CE, x, y, torch.ones(P, dtype=torch.float64)).dtype == torch.float32


def test_labels_out_of_range():
    model, x, y = _tiny()
    with pytest.raises(ValueError, match=r"`y` must hold class labels in \[0, 3\) \(the model has 3 outputs\); got 3\."):
        probes.gradient_stats(model, CE, x, torch.full((N,), C))
    with pytest.raises(ValueError, match=r"`y` must hold class labels in \[0, 3\) \(the model has 3 outputs\); got -1\."):
        pergrad.per_example_grads(model, CE, x, y - 1)
    with pytest.raises(ValueError, match=r"`y_train` must hold class labels in \[0, 2\) \(`n_classes`\); got 2\."):
        data.Dataset(x, y, x, y, 2, "bad")
    with pytest.raises(ValueError, match=r"`y_test` must have 8 entries to match `x_test`; got 4\."):
        data.Dataset(x, y, x, y[:4], C, "bad")
    with pytest.raises(ValueError, match=r"`x_test` must have the example shape of `x_train` \(8,\); got \(5,\)\."):
        data.Dataset(x, y, x[:, :5], y, C, "bad")
    with pytest.raises(ValueError, match=r"`data` must have at most as many classes as `model` has outputs \(2\); got 3"):
        train.train(models.mlp(D, 2, (4,)), _dataset(), lr=0.1, batch_size=2, n_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"`y` must hold class labels in \[0, 3\) \(`n_classes`\); got 5\."):
        data.corrupt_labels([0, 5], 0.5, 3)


def test_batch_mismatch_and_wrong_feature_shape():
    model, x, y = _tiny()
    with pytest.raises(ValueError, match="`y` must have 8 entries to match `x`; got 5."):
        probes.gradient_stats(model, CE, x, y[:5])
    with pytest.raises(ValueError, match=r"`x` must be an input the model accepts; model\(x\[:1\]\) on x\[:1\] of shape "
                                         r"\(1, 5\) raised RuntimeError"):
        probes.gradient_stats(model, CE, x[:, :5], y)
    with pytest.raises(ValueError, match=r"`data` must suit `model`: `x` must be an input the model accepts"):
        train.train(models.mlp(D + 1, C, (4,)), _dataset(), lr=0.1, batch_size=2, n_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"`data` must suit `model_fn`: `x` must be an input the model accepts"):
        steps.measure_steps(models.Factory("mlp", D + 1, C, (4,)), _dataset(), batch_sizes=[2], lrs=[0.1], target=1.0,
                            progress=False)
    with pytest.raises(ValueError, match=r"`x` must hold at least 2 examples to measure a variance; got 1"):
        probes.gradient_stats(model, CE, x[:1], y[:1])
    with pytest.raises(ValueError, match=r"`loss_fn` must return a scalar tensor \(a loss reduced by the mean\); "
                                         r"got shape \(1,\)"):
        probes.gradient_stats(model, torch.nn.CrossEntropyLoss(reduction="none"), x, y)
    with pytest.raises(TypeError, match=r"`loss_fn` must be a callable loss\(output, target\).*got the class CrossEntropyLoss"):
        probes.gradient_stats(model, torch.nn.CrossEntropyLoss, x, y)
    prelu = torch.nn.Sequential(torch.nn.Linear(D, C), torch.nn.PReLU())  # PReLU's weight is outside the fast path
    with pytest.raises(pergrad.FastPathUnsupported, match=r"`method` must be 'auto' or 'func' for this model: the hook "
                                                          r"fast path covers nn.Linear, nn.Conv2d .*not covered: \['1.weight'\]"):
        probes.gradient_stats(prelu, CE, x, y, method="hooks")


def test_device_mismatch():
    model, x, y = _tiny()
    # this CPU build has one device with data; a model on the 'meta' device stands in for another one
    with pytest.raises(ValueError, match=r"`x` must be on the model's device \(meta\); got cpu\. Move one of them"):
        probes.gradient_stats(models.mlp(D, C, (4,)).to("meta"), CE, x, y)
    with pytest.raises(ValueError, match=r"`model` must be a model holding data; its parameters are on the 'meta' device"):
        train.train(models.mlp(D, C, (4,)).to("meta"), _dataset(), lr=0.1, batch_size=2, n_steps=1, progress=False)
    with pytest.raises(TypeError, match=r"`x` must be a float tensor of shape \(B, ...\) holding data; got a tensor on "
                                        r"the 'meta' device"):
        pergrad.per_example_grads(model, CE, x.to("meta"), y)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks a torch build without CUDA")
def test_cuda_on_a_cpu_build():
    msg = r"`device` must be a device this torch build can use \(e.g. 'cpu'\); got 'cuda', but this torch build has no CUDA"
    with pytest.raises(ValueError, match=msg):
        data.digits(device="cuda")
    with pytest.raises(ValueError, match=msg):
        _dataset().to("cuda")
    with pytest.raises(ValueError, match=msg):
        train.train(_tiny()[0], _dataset(), lr=0.1, batch_size=2, n_steps=1, device="cuda", progress=False)
    with pytest.raises(ValueError, match=r"`device` must be a torch device such as 'cpu' or 'cuda'; got 'gpu'"):
        data.digits(device="gpu")


def test_model_sizes():
    with pytest.raises(ValueError, match=r"`in_features` must be an integer in \[1, 2147483647\]; got 0\."):
        models.mlp(0, 10)
    with pytest.raises(ValueError, match=r"`hidden` must be an integer in \[1, 2147483647\]; got 0\."):
        models.mlp(4, 10, (8, 0))
    with pytest.raises(TypeError, match=r"`hidden` must be a list or tuple \(hidden widths, each >= 1\); got int\."):
        models.mlp(4, 10, 8)
    with pytest.raises(ValueError, match=r"`hidden` must be small enough for its arrays to fit in .* available; got an estimated 3.64 TiB \(the 1e\+12 parameters of this model"):
        models.mlp(4, 10, (10**6, 10**6))
    with pytest.raises(ValueError, match=r"`image_size` must be an integer in \[4, 65536\]; got 2\."):
        models.cnn(image_size=2)
    with pytest.raises(TypeError, match=r"`args` must fit mlp\(\): too many positional arguments"):
        models.Factory("mlp", 1, 2, (3,), 4)


def test_measure_steps_grids():
    fn, ds = models.Factory("mlp", D, C, (4,)), _dataset()
    kw = dict(batch_sizes=[2], lrs=[0.1], target=10.0, max_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"`seeds` must be a list of 1 to 1000000 entries \(seeds >= 0\); got 0\."):
        steps.measure_steps(fn, ds, **kw, seeds=[])
    with pytest.raises(ValueError, match=r"`batch_sizes` must be free of repeated values; got 2 more than once\."):
        steps.measure_steps(fn, ds, **dict(kw, batch_sizes=[2, 2]))
    with pytest.raises(ValueError, match=r"`max_steps` must be an integer in \[1, 10000000\]; got 100000000\."):
        steps.measure_steps(fn, ds, **dict(kw, max_steps=10**8))
    with pytest.raises(ValueError, match=r"`lrs` must be a float in \(0, inf\); got nan\."):
        steps.measure_steps(fn, ds, **dict(kw, lrs=[math.nan]))
    with pytest.raises(ValueError, match=r"`n_steps` must be an integer in \[1, 10000000\]; got 10000000000\."):
        train.train(_tiny()[0], ds, lr=0.1, batch_size=2, n_steps=10**10, progress=False)


def test_paths(tmp_path):
    model, ds = _tiny()[0], _dataset()
    with pytest.raises(ValueError, match=r"`path` must be a file path \(the netCDF results\); got .*, an existing folder"):
        train.train(model, ds, lr=0.1, batch_size=2, n_steps=1, path=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"`path` must be in an existing folder; .* does not exist"):
        train.train(model, ds, lr=0.1, batch_size=2, n_steps=1, path=tmp_path / "no" / "run.nc", progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"`path` must be a folder \(one file per run\); got .*, an existing file"):
        steps.measure_steps(models.Factory("mlp", D, C, (4,)), ds, batch_sizes=[2], lrs=[0.1], target=1.0,
                            path=tmp_path / "file", progress=False)
    with pytest.raises(ValueError, match=r"`executor` must be 'serial', 'dask', a dask scheduler address"):
        steps.measure_steps(models.Factory("mlp", D, C, (4,)), ds, batch_sizes=[2], lrs=[0.1], target=1.0,
                            executor="cluster", progress=False)


def test_sizes_that_cannot_fit(monkeypatch):
    model, x, y = _tiny()
    with pytest.raises(ValueError, match=r"`dim` must be an integer in \[1, 100000000\]; got 1000000000\."):
        bridge.fit_nqm(model, CE, x, y, k=2, dim=10**9)
    monkeypatch.setattr(_checks, "available_bytes", lambda device=None: 10**5)
    with pytest.raises(ValueError, match=r"`dim` must be small enough for its arrays to fit in 97.7 KiB available; got an "
                                         r"estimated 122 MiB \(the 1000000 modes of the fitted NQM\)\. Give a smaller `dim`\."):
        bridge.fit_nqm(model, CE, x, y, k=2, dim=10**6)
    with pytest.raises(ValueError, match=r"`x` must be small enough .*\(the per-example gradients of 800 examples x 51 parameters"):
        pergrad.per_example_grads(model, CE, x.repeat(100, 1), y.repeat(100))
    with pytest.raises(ValueError, match=r"`n_boot` must be small enough .*\(100000 bootstrap resamples of 8 examples"):
        probes.gradient_stats(model, CE, x, y, ci=0.9, n_boot=10**5)


def test_nan_and_inf_in_inputs():
    model, x, y = _tiny()
    bad = x.clone()
    bad[0, 0], bad[1, 1] = math.nan, math.inf
    with pytest.raises(ValueError, match=r"`x` must be finite \(no NaN or inf\); got 2 entries that are not finite\."):
        probes.gradient_stats(model, CE, bad, y)
    with pytest.raises(ValueError, match=r"`v` must be finite"):
        hessian.hvp(model, CE, x, y, torch.full((P,), math.nan))
    with pytest.raises(ValueError, match=r"`batch_size` must be a float in \[1, inf\); got nan\."):
        probes.gradient_stats(model, CE, x, y, batch_size=math.nan)
    with pytest.raises(ValueError, match=r"`lr` must be a float in \(0, inf\) or a toymodels.schedules.Schedule; got nan\."):
        train.train(model, _dataset(), lr=math.nan, batch_size=2, n_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"`a` must be finite \(no NaN\)"):
        optim.median_of_3(torch.tensor([math.nan]), torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match=r"`grads\[0\]\[0\]` must not contain NaN"):
        optim.M3(_sgd()).step(grads=[[torch.full((2,), math.nan)], [torch.zeros(2)], [torch.zeros(2)]])
    # +-inf is an outlier the median suppresses, not an error
    assert optim.median_of_3(torch.tensor([math.inf]), torch.zeros(1), torch.ones(1)).item() == 1.0


# --------------------------------------------------------------------------------------------------
# divergence
# --------------------------------------------------------------------------------------------------
STATS = ("grad_norm_sq", "grad_var", "grad_nvar", "snr", "noise_scale", "trace_cov", "trace_cov_sem",
         "grad_norm_sq_unbiased", "noise_scale_unbiased")


def _diverged(kind):
    """A model after a diverged step: NaN parameters, or finite ones so large that the loss overflows."""
    model, x, y = _new_tiny()
    if kind == "nan":
        with torch.no_grad():
            model.fc1.weight[0, 0] = math.nan
    else:  # a real SGD step with a huge learning rate
        opt = torch.optim.SGD(model.parameters(), lr=1e30)
        CE(model(x), y).backward()
        opt.step()
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return model, x, y


@pytest.mark.parametrize("kind,reason", [("nan", r"non-finite parameters \(1 in `fc1.weight`\): the model diverged"),
                                         ("step", r"(the loss is not finite|non-finite per-example gradient in "
                                                  r"`fc1.weight`).* at finite parameters")])
@pytest.mark.parametrize("method", ["auto", "func"])
def test_probe_reports_divergence(kind, reason, method):
    model, x, y = _diverged(kind)
    ds = probes.gradient_stats(model, CE, x, y, method=method, ci=0.9, n_boot=10)
    assert re.search(reason, ds.attrs["diverged"])
    for stat in STATS:
        assert np.all(np.isposinf(ds[stat].values)), stat
    assert np.all(np.isposinf(ds.grad_norm_sq_ci.values))
    assert list(ds.layer.values) == ["fc1", "out", "total"] and ds.n_params.values[-1] == P
    healthy = probes.gradient_stats(_tiny()[0], CE, x, y, method=method)
    assert "diverged" not in healthy.attrs and np.all(np.isfinite(healthy.grad_norm_sq.values))


def test_probed_step_reports_divergence_and_does_not_step():
    model, x, y = _diverged("step")
    before = [p.detach().clone() for p in model.parameters()]
    loss, m = probes.probed_step(model, CE, x, y, torch.optim.SGD(model.parameters(), lr=0.1), step=1)
    assert loss == math.inf and "at finite parameters" in m.diverged
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert np.all(np.isposinf(m.variables()["noise_scale"]))
    assert m.to_dataset().attrs["diverged"] == m.diverged
    ds = probes.stack([_measurement(0), m])
    assert ds.attrs["diverged"].startswith("step 1: the loss is not finite")
    assert np.isfinite(ds.grad_norm_sq.sel(step=0)).all() and np.isposinf(ds.grad_norm_sq.sel(step=1)).all()


def test_other_functions_raise_on_divergence():
    model, x, y = _diverged("nan")
    msg = r"`model` must be a model with finite parameters; got non-finite parameters \(1 in `fc1.weight`\): the model diverged"
    for call in (lambda: pergrad.per_example_grads(model, CE, x, y), lambda: hessian.hvp(model, CE, x, y, torch.ones(P)),
                 lambda: bridge.fit_nqm(model, CE, x, y, k=2), lambda: cluster.Rank1Clustering(model, 2).fit(CE, x, y),
                 lambda: spectra.gradient_history(model, CE, x, y, batch_size=2, n_batches=2)):
        with pytest.raises(V.Diverged, match=msg):
            call()
    big, x, y = _diverged("step")
    with pytest.raises(V.Diverged, match="the loss is not finite"):
        hessian.top_eigenvalues(big, CE, x, y, k=2)
    with pytest.raises(V.Diverged, match="non-finite per-example gradient"):
        pergrad.per_example_grads(big, CE, x, y)
