"""Benchmark: cost of the gradient-statistics probe at every training step, as a ratio to a plain
step, beside its peers (BackPACK, torch.func) on the same models, batches and machine in one run.

    python benchmarks/probe_overhead.py [--device cuda] [--repeat 30] [--models mlp,cnn,transformer]

Models: on scikit-learn's digits, batch 128, an MLP (64-512-512-10) and a LeNet-style CNN (1x8x8
images); the CNN (width 32) on MNIST-sized 1x28x28 inputs and ResNet-8 without batch norm on
CIFAR-sized 3x32x32 inputs (random, for timing only); the byte-level transformer
(``models.transformer()``: 2 layers, d_model 64, context 64) on ``data.text_corpus()`` windows,
batch 64.  Each is timed as:

* ``plain``: forward + backward + SGD update (the reference of every ratio);
* ``ours``: the same step with the variance / normalized variance / noise-scale probe.  Where the
  hook fast path covers the model (``pergrad.LayerCapture(model)`` accepts it) the probe rides on
  the step's own backward pass (``probes.probed_step``: no B x P array); otherwise it is a separate
  ``probes.gradient_stats`` call (torch.func per-example gradients for the layers the fast path
  does not cover) followed by the plain step.  As the fast path grows, this benchmark follows it;
* ``backpack`` (if ``backpack-for-pytorch`` is installed): the step's backward pass inside
  ``backpack(BatchL2Grad(), Variance())`` on an ``extend()``-ed copy of the model, then the same
  statistics from ``batch_l2`` and ``variance`` and the SGD update; skipped, saying why, where
  BackPACK has no extension for a layer of the model;
* ``torch.func``: per-example gradients by ``vmap(grad(...))`` of a per-example loss, the same
  statistics from them, their mean as the gradient of the SGD update (no second backward pass).

Every variant forms the same numbers (per layer: the squared norm of the mean gradient, the trace of
the per-example gradient covariance and the per-example squared norms; the noise scale
tr(Sigma) / |g|^2 of the total) and brings them to the host.  The variants of one model are timed
in turn within each repetition, so a change in machine load hits all of them; medians are printed,
with each ratio to ``plain``.  Targets (issue 15): ours <= 1.3x on the MLP, the 28x28 CNN and the
transformer, and at most half of BackPACK's cost where BackPACK runs the model.

Two GPU-sized models are not in the default list (name them in ``--models``): ``mlp_big``, an MLP
1024-4096-4096-10 on random inputs at batch ``--batch-size``, and ``transformer_big``, the
transformer with d_model 512, 4 layers, 8 heads and context 256 at batch ``--lm-batch-size`` / 2.
On a GPU the small models' steps are bound by kernel launches and Python, not arithmetic; these show
the probe's cost where the GPU has work to do.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

sys.path.insert(0, ".")
from deepmodels import data, models, pergrad, probes  # noqa: E402

# BackPACK's hooks on a first layer whose input needs no gradient, and its warning for every container
# module (a residual block): expected; a layer it cannot handle is reported by _backpack instead
warnings.filterwarnings("ignore", message="Full backward hook is firing")
warnings.filterwarnings("ignore", message="Extension saving to .* does not have an extension for Module")

ALL_MODELS = ("mlp", "cnn", "cnn28", "rn8", "transformer", "mlp_big", "transformer_big")
DEFAULT_MODELS = ALL_MODELS[:5]


def _time_all(fns: dict, repeat: int, device) -> dict:
    """Median seconds of each function, the functions timed in turn within each repetition so that a
    change in machine load hits all of them."""
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _layer_stats(mean_sq: torch.Tensor, trace_cov: torch.Tensor, sq_norms: torch.Tensor):
    """The numbers every variant brings to the host: per layer |g|^2, tr(Sigma), the mean per-example
    squared norm, and the total noise scale tr(Sigma) / |g|^2."""
    rows = torch.stack([mean_sq, trace_cov, sq_norms.mean(1)]).cpu().double()
    return rows, float(rows[1].sum() / rows[0].sum())


def _layer_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _ours(model, x, y, opt):
    """Our every-step probe: on the step's backward pass where the hook fast path covers the model,
    else ``gradient_stats`` (torch.func where the fast path does not reach) and the plain step."""
    try:
        pergrad.LayerCapture(model)
        how = "probes.probed_step (hooks in the step's backward)"

        def step():
            probes.probed_step(model, F.cross_entropy, x, y, opt)
    except pergrad.FastPathUnsupported as err:
        how = f"probes.gradient_stats + plain step (fast path: {str(err)[:70]}...)"

        def step():
            probes.gradient_stats(model, F.cross_entropy, x, y)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return step, how


def _torch_func(model, x, y, opt):
    """A torch.func user's step: per-example gradients by vmap(grad), the statistics, the mean as the
    step's gradient."""
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def loss_one(p, xi, yi):
        return F.cross_entropy(functional_call(model, (p, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def step():
        g = per_example({k: params[k].detach() for k in names}, x, y)
        layers = {}
        for k in names:
            layers.setdefault(_layer_of(k), []).append(g[k].reshape(x.shape[0], -1))
        mean_sq, trace, sq = [], [], []
        for parts in layers.values():
            G = torch.cat(parts, 1)
            mean = G.mean(0)
            mean_sq.append(mean @ mean)
            sq.append((G * G).sum(1))
            trace.append(sq[-1].mean() - mean_sq[-1])
        _layer_stats(torch.stack(mean_sq), torch.stack(trace), torch.stack(sq))
        for k in names:
            params[k].grad = g[k].mean(0)
        opt.step()
    return step


def _backpack(model, x, y, lr):
    """BackPACK's step on an extended copy of the model: BatchL2Grad + Variance in the backward pass,
    the same statistics, the SGD update.  Returns ``(step, None)``, or ``(None, why)`` when BackPACK is
    not installed or has no extension for a layer of the model (tried once before timing)."""
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchL2Grad, Variance
    except ImportError:
        return None, "backpack-for-pytorch is not installed"
    bp_model = extend(copy.deepcopy(model))
    bp_opt = torch.optim.SGD(bp_model.parameters(), lr=lr)
    B = x.shape[0]
    layers = {}
    for k, p in bp_model.named_parameters():
        layers.setdefault(_layer_of(k), []).append(p)

    def step():
        bp_opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(bp_model(x), y)
        with backpack(BatchL2Grad(), Variance()):
            loss.backward()
        # of the mean-reduced loss BackPACK sees g_i / B: batch_l2 holds |g_i / B|^2, variance the
        # coordinate variances of g_i / B (checked against probes.gradient_stats on the MLP)
        mean_sq = torch.stack([sum((p.grad * p.grad).sum() for p in ps) for ps in layers.values()])
        trace = torch.stack([sum(p.variance.sum() for p in ps) for ps in layers.values()]) * B * B
        sq = torch.stack([sum(p.batch_l2 for p in ps) for ps in layers.values()]) * B * B
        _layer_stats(mean_sq, trace, sq)
        bp_opt.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            step()
            missing = [k for k, p in bp_model.named_parameters() if not hasattr(p, "variance")]
            error = f"no batch_l2 / variance for {missing[:3]}{' ...' if len(missing) > 3 else ''}" if missing else ""
        except Exception as err:  # noqa: BLE001  (BackPACK's own error)
            error = f"{type(err).__name__}: {str(err).splitlines()[0][:90]}"
    if error:  # the layers whose parameters got no statistics (BackPACK only warns, for every module type)
        modules = sorted({type(m).__name__ for m in bp_model.modules()
                          for p in m.parameters(recurse=False) if not hasattr(p, "variance")})
        return None, f"BackPACK has no extension for {', '.join(modules) or 'a layer'} of this model ({error})"
    return step, None


def bench(name, model, x, y, repeat, device, peers=True):
    """Time plain, ours and the peers on one model and batch; print and return the ratios to plain."""
    model = model.to(device)
    lr = 0.01
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def plain():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    ours, how = _ours(model, x, y, opt)
    fns = {"plain": plain, "ours": ours}
    skipped = {}
    if peers:
        bp, why = _backpack(model, x, y, lr)
        if bp is None:
            skipped["backpack"] = why
        else:
            fns["backpack"] = bp
        func_model = copy.deepcopy(model)
        fns["torch.func"] = _torch_func(func_model, x, y, torch.optim.SGD(func_model.parameters(), lr=lr))
    for fn in fns.values():  # warm-up
        for _ in range(2):
            fn()
    t = _time_all(fns, repeat, device)
    ratios = {k: t[k] / t["plain"] for k in fns}
    cols = "   ".join(f"{k} {1e3 * t[k]:8.2f} ms ({ratios[k]:5.2f}x)" for k in fns)
    print(f"  {name:11s} {cols}")
    print(f"  {'':11s} ours: {how}")
    for k, why in skipped.items():
        print(f"  {'':11s} {k} skipped: {why}")
    return ratios


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128, help="batch of the MLP and CNNs")
    p.add_argument("--lm-batch-size", type=int, default=64, help="batch of the transformer")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated subset of {','.join(ALL_MODELS)}")
    p.add_argument("--no-peers", action="store_true", help="time plain and ours only")
    a = p.parse_args(argv)
    chosen = a.models.split(",")
    unknown = sorted(set(chosen) - set(ALL_MODELS))
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {','.join(ALL_MODELS)}")
    device = torch.device(a.device)
    peers = not a.no_peers
    try:
        import backpack  # noqa: F401
        have_backpack = "installed"
    except ImportError:
        have_backpack = "not installed (pip install backpack-for-pytorch)"
    gpu = f" ({torch.cuda.get_device_name(device)}, TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, " \
        f"cuDNN {torch.backends.cudnn.allow_tf32})" if device.type == "cuda" else ""
    print(f"device {device}{gpu}, batch {a.batch_size} (transformer {a.lm_batch_size}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, BackPACK {have_backpack}")
    idx = torch.arange(a.batch_size, device=device)
    g = torch.Generator(device="cpu").manual_seed(0)
    x28 = torch.randn(a.batch_size, 1, 28, 28, generator=g).to(device)
    y28 = torch.randint(0, 10, (a.batch_size,), generator=g).to(device)
    if "mlp" in chosen:
        flat = data.digits(seed=0).to(device)
        bench("mlp", models.mlp(64, 10, (512, 512)), flat.x_train[idx], flat.y_train[idx], a.repeat, device, peers)
    if "cnn" in chosen:
        img = data.digits(seed=0, flatten=False).to(device)
        bench("cnn", models.cnn(1, 10, 8, width=16), img.x_train[idx], img.y_train[idx], a.repeat, device, peers)
    if "cnn28" in chosen:  # MNIST-sized inputs (timing only: random images, as no data set is downloaded)
        bench("cnn28", models.cnn(1, 10, 28, width=32), x28, y28, a.repeat, device, peers)
    if "rn8" in chosen:
        x32 = torch.randn(a.batch_size, 3, 32, 32, generator=g).to(device)
        bench("rn8", models.resnet8(3, 10, batch_norm=False), x32, y28, max(5, a.repeat // 3), device, peers)
    if "transformer" in chosen:
        text = data.text_corpus(context_length=64, seed=0).to(device)
        tidx = torch.randint(0, text.x_train.shape[0], (a.lm_batch_size,), generator=g).to(device)
        print(f"  (transformer on {text.name}: {text.source})")
        bench("transformer", models.transformer(), text.x_train[tidx], text.y_train[tidx], max(5, a.repeat // 3),
              device, peers)
    if "mlp_big" in chosen:  # GPU-sized (timing only: random inputs)
        xb = torch.randn(a.batch_size, 1024, generator=g).to(device)
        bench("mlp_big", models.mlp(1024, 10, (4096, 4096)), xb, y28, a.repeat, device, peers)
    if "transformer_big" in chosen:
        text = data.text_corpus(context_length=256, seed=0).to(device)
        tidx = torch.randint(0, text.x_train.shape[0], (max(2, a.lm_batch_size // 2),), generator=g).to(device)
        bench("transformer_big", models.transformer(context_length=256, d_model=512, n_layers=4, n_heads=8),
              text.x_train[tidx], text.y_train[tidx], max(5, a.repeat // 3), device, peers)


if __name__ == "__main__":
    main()
