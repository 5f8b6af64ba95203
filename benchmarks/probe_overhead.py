"""Benchmark: cost of the gradient-statistics probe at every training step, as a ratio to a plain step.

    python benchmarks/probe_overhead.py [--device cuda] [--repeat 30]

Models on scikit-learn's digits, batch 128: an MLP (64-512-512-10) and a LeNet-style CNN (1x8x8
images); the CNN (width 32) on MNIST-sized 1x28x28 inputs and ResNet-8 without batch norm on
CIFAR-sized 3x32x32 inputs (random, for timing only).  "plain" is forward + backward + SGD update; "probed" is the same step with the variance /
normalized variance / noise-scale probe.  For models made of Linear and Conv2d layers the probe
rides on the step's own backward pass (``probes.probed_step``: hooks, no B x P array); for other
models it is a separate ``probes.gradient_stats`` call with torch.func per-example gradients.  Prints medians and the
ratio probed / plain per model, the two timed alternately (target: <= 1.5 for MLP and CNN; Cockpit's cheapest setting is 1.5).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
from deepmodels import data, models, probes  # noqa: E402


def _time_pair(plain, probed, repeat, device):
    """Median seconds of each function, timed alternately so that a change in machine load hits both."""
    times = ([], [])
    for _ in range(repeat):
        for fn, out in zip((plain, probed), times):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            out.append(time.perf_counter() - t)
    return statistics.median(times[0]), statistics.median(times[1])


def bench(name, model, x, y, repeat, device):
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def plain():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    linear_only = all(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in model.modules()
                      if list(m.parameters(recurse=False)))

    def probed():
        if linear_only:
            probes.probed_step(model, F.cross_entropy, x, y, opt)
        else:
            probes.gradient_stats(model, F.cross_entropy, x, y, method="func")
            plain()

    for fn in (plain, probed):  # warm-up
        for _ in range(3):
            fn()
    t_plain, t_probed = _time_pair(plain, probed, repeat, device)
    how = "hooks in the step's backward" if linear_only else "torch.func per-example gradients"
    print(f"  {name:5s} plain {1e3 * t_plain:7.2f} ms   probed {1e3 * t_probed:7.2f} ms   ratio {t_probed / t_plain:5.2f}x"
          f"   ({how})   [target <= 1.5x]")
    return t_probed / t_plain


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    flat = data.digits(seed=0).to(device)
    img = data.digits(seed=0, flatten=False).to(device)
    idx = torch.arange(a.batch_size, device=device)
    print(f"device {device}, batch {a.batch_size}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    bench("mlp", models.mlp(64, 10, (512, 512)), flat.x_train[idx], flat.y_train[idx], a.repeat, device)
    bench("cnn", models.cnn(1, 10, 8, width=16), img.x_train[idx], img.y_train[idx], a.repeat, device)
    # MNIST-sized inputs (timing only: random images, as no data set is downloaded)
    g = torch.Generator(device="cpu").manual_seed(0)
    x28 = torch.randn(a.batch_size, 1, 28, 28, generator=g).to(device)
    y28 = torch.randint(0, 10, (a.batch_size,), generator=g).to(device)
    bench("cnn28", models.cnn(1, 10, 28, width=32), x28, y28, a.repeat, device)
    x32 = torch.randn(a.batch_size, 3, 32, 32, generator=g).to(device)
    bench("rn8", models.resnet8(3, 10, batch_norm=False), x32, y28, max(5, a.repeat // 3), device)


if __name__ == "__main__":
    main()
