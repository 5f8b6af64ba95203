"""Benchmark: the top-k Hessian eigenvalues of a ~0.3M-parameter MLP, by four methods, in one process.

    python benchmarks/hessian_speed.py [--k 5] [--batch 512] [--repeat 5] [--device cpu] [--no-pyhessian]
    python benchmarks/hessian_speed.py --spread 10 [--batch 128]    # spread over batches instead

The model is ``models.mlp(64, 10, (512, 512))`` (301,066 parameters, float32) after 200 SGD steps on
scikit-learn's digits (``deepmodels.data.digits``, seed 0); the Hessian is that of the mean
cross-entropy on the first ``--batch`` training examples.  Methods, timed alternately per repeat so
that a change in machine load hits all of them:

* ``lanczos``: :func:`deepmodels.hessian.top_eigenpairs` (thick-restart Lanczos in torch, tol 1e-6);
* ``arpack``: the same with ``method="arpack"`` (scipy's ``eigsh``, tol 1e-6), the former default;
* ``power``: power iteration with deflation, PyHessian's method (Yao et al. 2020, Section 3.1),
  written here on the same Hessian-vector products: one eigenvalue after the other, each iteration
  orthogonal to the ones found, stopped when the eigenvalue changes by less than ``1e-3`` relative
  or after 100 iterations (PyHessian's defaults);
* ``pyhessian``: PyHessian itself (``pyhessian.hessian(...).eigenvalues(top_n=k)``) when installed.

Prints per method the median seconds, the ratio to ``lanczos``, the number of Hessian-vector
products (of the last repeat), the fraction of the time spent in them and in building the graph
they differentiate (one forward pass and a backward pass with ``create_graph``; PyHessian's is not
timed), and the largest relative error of the k eigenvalues against a float64 reference (the
float64 copy of the model, Lanczos with tol 1e-10).

With ``--spread K`` it times nothing and prints instead, for the same model, the top eigenvalue
and the Hutchinson trace (20 vectors) per layer on K independent batches of ``--batch`` examples
(:func:`deepmodels.hessian.batch_spread`, seed 0): mean, standard deviation, and the batches
(and Hutchinson vectors) a 10% relative standard error needs, with their 90% intervals.

Reference: Z. Yao, A. Gholami, K. Keutzer, M. Mahoney, "PyHessian: Neural Networks Through the
Lens of the Hessian", IEEE BigData 2020.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
from deepmodels import data, hessian, models  # noqa: E402


class _Clock:
    """Counts and times the Hessian-vector products of ``hessian._HVPOperator`` (and PyHessian's)."""

    def __init__(self, device):
        self.device, self.count, self.seconds, self.graph = device, 0, 0.0, 0.0

    def wrap(self, fn, graph=False):
        def timed(*args, **kwargs):
            self._sync()
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            self._sync()
            if graph:
                self.graph += time.perf_counter() - t
            else:
                self.seconds += time.perf_counter() - t
                self.count += 1
            return out

        return timed

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def power_deflation(model, x, y, k, *, tol=1e-3, max_iter=100, seed=0):
    """Top-k eigenvalues by power iteration with deflation (PyHessian's method, written here)."""
    op = hessian._HVPOperator(model, F.cross_entropy, x, y)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    found, values = [], []
    for _ in range(k):
        v = torch.randn(op.n, generator=gen).to(device=op.g.device, dtype=op.g.dtype)
        lam = None
        for _ in range(max_iter):
            for u in found:
                v = v - (u @ v) * u
            v = v / v.norm()
            hv = op(v)
            new = float(v @ hv)
            v = hv
            if lam is not None and abs(new - lam) / (abs(lam) + 1e-6) < tol:
                lam = new
                break
            lam = new
        values.append(lam)
        for u in found:
            v = v - (u @ v) * u
        found.append(v / v.norm())
    return np.array(values)


def pyhessian_top(model, x, y, k):
    from pyhessian import hessian as pyh

    return np.array(pyh(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=x.is_cuda).eigenvalues(top_n=k)[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-pyhessian", action="store_true")
    ap.add_argument("--spread", type=int, default=0, help="K batches: print the spread over batches instead")
    args = ap.parse_args(argv)
    device = torch.device(args.device)

    d = data.digits(seed=0).to(device)
    model = models.mlp(64, 10, (512, 512), seed=0).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, d.x_train.shape[0], (128,), generator=gen).to(device)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(d.x_train[idx]), d.y_train[idx]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    x, y = d.x_train[: args.batch], d.y_train[: args.batch]
    P = sum(p.numel() for p in model.parameters())
    if args.spread:
        return spread(model, d, args.spread, args.batch)

    ref = hessian.top_eigenvalues(copy.deepcopy(model).double(), F.cross_entropy, x.double(), y, args.k, tol=1e-10)

    methods = {
        "lanczos": lambda: hessian.top_eigenvalues(model, F.cross_entropy, x, y, args.k, method="lanczos"),
        "arpack": lambda: hessian.top_eigenvalues(model, F.cross_entropy, x, y, args.k, method="arpack"),
        "power": lambda: power_deflation(model, x, y, args.k),
    }
    pyh_utils = None
    if not args.no_pyhessian:
        try:
            import importlib

            pyh_utils = importlib.import_module("pyhessian.hessian")  # the module (the package exports a class of that name)

            methods["pyhessian"] = lambda: pyhessian_top(model, x, y, args.k)
        except ImportError:
            print("pyhessian not installed: left out")

    times = {m: [] for m in methods}
    stats = {}
    original, original_graph = hessian._HVPOperator.__call__, hessian._loss_and_grad
    for _ in range(args.repeat):
        for name, fn in methods.items():
            clock = _Clock(device)
            hessian._HVPOperator.__call__ = clock.wrap(original)
            hessian._loss_and_grad = clock.wrap(original_graph, graph=True)
            if pyh_utils is not None:
                original_pyh = pyh_utils.hessian_vector_product
                pyh_utils.hessian_vector_product = clock.wrap(original_pyh)
            clock._sync()
            t = time.perf_counter()
            vals = fn()
            clock._sync()
            times[name].append(time.perf_counter() - t)
            hessian._HVPOperator.__call__, hessian._loss_and_grad = original, original_graph
            if pyh_utils is not None:
                pyh_utils.hessian_vector_product = original_pyh
            stats[name] = (clock.count, clock.seconds / times[name][-1], clock.graph / times[name][-1],
                           np.max(np.abs(np.sort(vals)[::-1] - ref) / ref))

    print(f"top-{args.k} Hessian eigenvalues, mlp 64-512-512-10 ({P} parameters, float32) on digits, batch {args.batch}, "
          f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeat}")
    print(f"reference (float64, tol 1e-10): {np.array2string(ref, precision=5)}")
    base = statistics.median(times["lanczos"])
    print(f"{'method':<10} {'median s':>9} {'/ lanczos':>10} {'HVPs':>6} {'HVP share':>10} {'graph share':>12} "
          f"{'max rel err':>12}")
    for name in methods:
        med = statistics.median(times[name])
        n, share, graph, err = stats[name]
        graph_share = f"{graph:12.2f}" if name != "pyhessian" else f"{'-':>12}"
        print(f"{name:<10} {med:9.3f} {med / base:10.2f} {n:6d} {share:10.2f} {graph_share} {err:12.1e}")


def spread(model, d, K, batch):
    """Print the spread of the top eigenvalue and the trace over K batches (no timing)."""
    print(f"mlp 64-512-512-10 after 200 SGD steps on digits ({d.x_train.shape[0]} training examples); "
          f"{K} batches of {batch}, seed 0; samples for a 10% relative standard error (90% interval)")
    for stat in ("top_eigenvalue", "hessian_trace"):
        ds = hessian.batch_spread(model, F.cross_entropy, d, stat, n_batches=K, batch_size=batch, blocks="layers",
                                  rel_se=0.1, n_samples=20)
        for layer in ds.layer.values:
            r = ds.sel(layer=layer)
            line = (f"{stat:<15} {layer:<6} mean {float(r.spread_mean):9.4g}  sd {float(r.spread_sd):9.4g}  "
                    f"min {float(r.spread_draws.min()):9.4g}  max {float(r.spread_draws.max()):9.4g}  batches "
                    f"{float(r.samples_needed):4.0f} [{float(r.samples_needed_low):.0f}, {float(r.samples_needed_high):.0f}]")
            if "probes_needed" in ds:
                line += f"  probes {float(r.probes_needed):5.0f}"
            print(line)


if __name__ == "__main__":
    main()
