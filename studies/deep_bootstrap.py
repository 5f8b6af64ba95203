"""The deep bootstrap (Nakkiran, Neyshabur and Sedghi 2021): the test error of training on a fixed set
of n examples tracks that of training on fresh examples at every step, until the training set is fit.

Left panel, exact (linear regression, :func:`toymodels.bootstrap.deep_bootstrap`): the population
(test) excess risk of online SGD with fresh samples, and of SGD reusing one fixed training set of n
rows (batches drawn with replacement, expectation over the batches given the set, averaged over the
scale's number of sets) for several n, with the offline training loss beside each.  The curves
leave the online one when the training loss nears its floor (n < d: zero, the set is interpolated),
earlier for smaller n.

Right panel, measured (an MLP on MNIST-1D, Greydanus 2020, generated here from a seed): test error
of "online" training, each step a fresh batch from the generator (one pass through a pool of
steps x B generated examples, none seen twice), and of "offline" training on the first n examples
of that pool reused (reshuffled every epoch), same initialisation, learning rate, batch size and
steps; train error of each offline run beside it; one shared held-out test set.

    python -m studies run deep_bootstrap            # d = 50, 2 sets; MLP 128-128, 2000 steps of 16
    python -m studies run deep_bootstrap --quick    # smaller (MNIST-1D generation dominates)
    python -m studies run deep_bootstrap --full     # d = 100, 4 sets; MLP 6000 steps

Writes ``deep_bootstrap.nc`` (netCDF groups ``linear`` and ``mlp``) and ``deep_bootstrap.png``;
the generated MNIST-1D pool and every finished MLP run are kept under ``<out>/deep_bootstrap_points/``
and reused by a rerun of the same settings (an interrupted run resumes).

References:
    P. Nakkiran, B. Neyshabur and H. Sedghi, "The Deep Bootstrap Framework: Good Online Learners are
    Good Offline Generalizers", ICLR 2021, Section 2.
    S. Greydanus, "Scaling Down Deep Learning", 2020 (MNIST-1D).
    R. Grosse, "CSC 2541: Neural Net Training Dynamics", Lecture 7 "Stochasticity and Parallelism"
    ("Deep Bootstrap"), University of Toronto, Winter 2022.
"""

from __future__ import annotations

import math
import os

import numpy as np
import xarray as xr

from toymodels import SGD, GaussianLinearRegression, resume
from toymodels.bootstrap import deep_bootstrap
from toymodels.schema import attach_attrs

from . import style
from ._io import command, publish, settings_tag

SCALES = {
    # tiny: the test scale (tests/test_studies.py), not a command-line flag
    "tiny": dict(dim=20, n_lin=(10, 40, 160), lin_steps=300, n_sets=1, lin_lr=1.0, lin_batch=2, noise=0.2,
                 hidden=(32,), n_mlp=(32, 128), mlp_steps=40, mlp_batch=8, mlp_lr=0.1, n_test=200, n_evals=6),
    "quick": dict(dim=40, n_lin=(20, 80, 320), lin_steps=2000, n_sets=1, lin_lr=1.0, lin_batch=2, noise=0.2,
                  hidden=(64, 64), n_mlp=(64, 512), mlp_steps=400, mlp_batch=16, mlp_lr=0.1, n_test=1000, n_evals=16),
    "default": dict(dim=50, n_lin=(25, 100, 400, 1600), lin_steps=4000, n_sets=2, lin_lr=1.0, lin_batch=2, noise=0.2,
                    hidden=(128, 128), n_mlp=(128, 512, 2048), mlp_steps=2000, mlp_batch=16, mlp_lr=0.1, n_test=2000,
                    n_evals=25),
    "full": dict(dim=100, n_lin=(50, 200, 800, 3200), lin_steps=10000, n_sets=4, lin_lr=1.0, lin_batch=2, noise=0.2,
                 hidden=(128, 128), n_mlp=(256, 1024, 4096), mlp_steps=6000, mlp_batch=16, mlp_lr=0.1, n_test=4000,
                 n_evals=40),
}
SEED = 0


def _steps(n_steps: int, n_points: int) -> np.ndarray:
    return np.unique(np.concatenate([[0], np.geomspace(1, n_steps, n_points).astype(np.int64)]))


# ------------------------------------------------------------------------------------------ exact
def run_linear(*, dim: int, n_lin, lin_steps: int, n_sets: int, lin_lr: float, lin_batch: int, noise: float,
               **_) -> xr.Dataset:
    """Exact online and offline curves over ``n_train`` (population lambda_i = 1/i, w* = 1, label
    noise ``noise``; learning rate ``lin_lr`` / tr Sigma, stable at the batch size)."""
    pop = GaussianLinearRegression.power_law(dim, 1.0, w_star=1.0, noise_std=noise)
    lr = lin_lr / float(np.sum(pop.h))
    steps = _steps(lin_steps, 120)
    curves = [deep_bootstrap(pop, n, SGD(lr), lin_batch, steps, n_sets=n_sets, seed=SEED) for n in n_lin]
    ds = xr.concat([c.drop_vars("online_risk").drop_attrs() for c in curves], dim="n_train")
    ds = ds.assign_coords(n_train=list(n_lin))
    ds["online_risk"] = curves[0].online_risk.drop_attrs()
    attach_attrs(ds, model="linreg_bootstrap", source="exact", optimizer="sgd", lr=lr, batch_size=float(lin_batch),
                 n_sets=n_sets, seed=SEED, noise_floor=0.5 * noise**2, spectrum="1/i", **pop.params)
    return ds


# --------------------------------------------------------------------------------------- measured
def _pool(cfg, cache):
    """MNIST-1D: ``(x_pool, y_pool, x_test, y_test)`` numpy arrays, the pool of mlp_steps x B
    training examples and the test set, generated from ``SEED`` (saved under ``cache``)."""
    from deepmodels.data import mnist1d

    n_pool, n_test = cfg["mlp_steps"] * cfg["mlp_batch"], cfg["n_test"]
    n_pool = max(n_pool, max(cfg["n_mlp"]))
    path = os.path.join(cache, f"mnist1d_{n_pool}_{n_test}_seed{SEED}.npy")
    arr = resume.read_array(path, shape=(n_pool + n_test, 41))
    if arr is None:
        d = mnist1d(n_samples=n_pool + n_test, test_fraction=n_test / (n_pool + n_test), seed=SEED)
        x = np.concatenate([d.x_train.numpy(), d.x_test.numpy()]).astype(np.float64)
        y = np.concatenate([d.y_train.numpy(), d.y_test.numpy()]).astype(np.float64)
        arr = np.concatenate([x, y[:, None]], axis=1)
        resume.write_array(arr, path)
    x, y = arr[:, :40].astype(np.float32), arr[:, 40].astype(np.int64)
    return x[:n_pool], y[:n_pool], x[n_pool:], y[n_pool:]


def _train(x, y, x_test, y_test, *, n_train, cfg, steps):
    """One run: ``n_train`` None is online (batch k is rows kB..(k+1)B-1 of the pool), else the first
    ``n_train`` rows reused, reshuffled each epoch.  Returns (test error, train error or None) at ``steps``."""
    import torch

    from deepmodels.models import mlp

    torch.manual_seed(SEED + 1)
    model = mlp(40, 10, cfg["hidden"], seed=SEED)
    params, lr = list(model.parameters()), cfg["mlp_lr"]
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    xte, yte = torch.as_tensor(x_test), torch.as_tensor(y_test)
    bs = cfg["mlp_batch"]
    gen = torch.Generator().manual_seed(SEED + 2)
    order = torch.empty(0, dtype=torch.int64)

    def error(xs, ys):
        with torch.no_grad():
            out = model(xs)
            if not torch.all(torch.isfinite(out)):
                return math.inf
            return float((out.argmax(1) != ys).double().mean())

    test_err, train_err = [], []
    for k in range(int(steps[-1]) + 1):
        if k in steps:
            test_err.append(error(xte, yte))
            if n_train is not None:
                train_err.append(error(xt[:n_train], yt[:n_train]))
        if k == steps[-1]:
            break
        if n_train is None:
            idx = torch.arange(k * bs, (k + 1) * bs)
        else:
            if order.numel() < bs:
                order = torch.cat([order, torch.randperm(n_train, generator=gen)])
            idx, order = order[:bs], order[bs:]
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]), params)
        with torch.no_grad():  # plain SGD (torch.optim would import its compiler: seconds for nothing here)
            for p, g in zip(params, grads):
                p.sub_(lr * g)
    return np.array(test_err), (np.array(train_err) if n_train is not None else None)


def run_mlp(cfg: dict, scale: str, out: str, progress: bool = False) -> xr.Dataset:
    """Online and offline MLP runs on MNIST-1D (each saved as it finishes and reused on a rerun)."""
    import torch

    cache = os.path.join(out, "deep_bootstrap_points")
    os.makedirs(cache, exist_ok=True)
    tag = settings_tag(scale, cfg)
    steps = _steps(cfg["mlp_steps"], cfg["n_evals"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is fastest and leaves the other cores free
    try:
        data = None
        runs = {}
        for n in [None, *cfg["n_mlp"]]:
            name = "online" if n is None else f"offline_{n}"
            path = os.path.join(cache, f"{tag}_{name}.nc")
            saved = resume.read(path)
            if saved is None:
                if data is None:
                    data = _pool(cfg, cache)
                test, train = _train(*data, n_train=n, cfg=cfg, steps=steps)
                fields = {"offline_test_error" if n else "online_test_error": ("step", test)}
                if n is not None:
                    fields["offline_train_error"] = ("step", train)
                saved = xr.Dataset(fields, coords={"step": steps})
                attach_attrs(saved, model="mlp", source="measurement", run=name)
                resume.write(saved, path)
            runs[name] = saved
            if progress:
                print(f"deep_bootstrap: MLP run {name} done", flush=True)
    finally:
        torch.set_num_threads(threads)
    off = xr.concat([runs[f"offline_{n}"].drop_attrs() for n in cfg["n_mlp"]], dim="n_train")
    ds = off.assign_coords(n_train=list(cfg["n_mlp"]))
    ds["online_test_error"] = runs["online"].online_test_error.drop_attrs()
    ds["bootstrap_error"] = ds.offline_test_error - ds.online_test_error
    attach_attrs(ds, model="mlp", source="measurement", data="mnist1d", hidden=str(tuple(cfg["hidden"])),
                 lr=cfg["mlp_lr"], batch_size=float(cfg["mlp_batch"]), n_test=cfg["n_test"], seed=SEED,
                 optimizer="sgd", sampling="online: fresh pool rows; offline: epochs, reshuffled")
    return ds


def run(*, scale: str = "default", out: str = "results", progress: bool = True) -> dict:
    """Compute both panels, write the netCDF file (groups linear, mlp) and the figure; returns
    ``{group: Dataset}``."""
    if scale not in SCALES:
        raise ValueError(f"`scale` must be one of {tuple(SCALES)}; got {scale!r}.")
    cfg = SCALES[scale]
    result = {"linear": run_linear(**cfg), "mlp": run_mlp(cfg, scale, out, progress)}
    return publish(result, out, "deep_bootstrap", plot)


def plot(result: dict, path: str) -> None:
    """Two panels: exact linear-regression risks (online, offline per n, offline training loss;
    log-log) and the MLP's measured test and train errors (semi-log in steps)."""
    lin, net = result["linear"], result["mlp"]
    fig, (ax1, ax2) = style.figure(2, width=6.0, height=4.8)
    k = lin.step.values
    keep = k > 0
    floor = float(lin.attrs["noise_floor"])
    style.draw(ax1, k[keep], lin.online_risk.values[keep] + floor, source="exact", color="k", lw=2,
               label="online (fresh samples)")
    for i, n in enumerate(lin.n_train.values):
        c = f"C{i}"
        style.draw(ax1, k[keep], lin.offline_risk.sel(n_train=n).values[keep] + floor, source="exact", color=c,
                   label=f"offline n={n}: test risk")
        style.draw(ax1, k[keep], lin.offline_train_loss.sel(n_train=n).values[keep], source="exact", color=c, ls=":")
    style.draw(ax1, [], [], source="exact", color="0.4", ls=":", label="offline: training loss")
    ax1.axhline(floor, color="0.6", lw=0.8, ls="--")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    if floor > 0:  # an interpolated set's training loss falls to 0: show it leave, not its whole fall
        ax1.set_ylim(bottom=floor / 30)
    ax1.set_xlabel(f"step k (B = {lin.attrs['batch_size']:g})")
    ax1.set_ylabel("expected loss (test risk includes the label noise σ²/2, dashed)")
    sets = int(lin.attrs["n_sets"])
    ax1.set_title(f"linear regression, d={lin.attrs['dim']}, λᵢ = 1/i, exact"
                  + (f" (mean of {sets} sets)" if sets > 1 else " (one set)"), fontsize=9)
    ax1.legend(fontsize=7, loc="lower left")

    s = net.step.values
    keep = s > 0
    style.draw(ax2, s[keep], net.online_test_error.values[keep], source="measurement", color="k", connect=True,
               label="online (fresh MNIST-1D): test error")
    for i, n in enumerate(net.n_train.values):
        c = f"C{i}"
        style.draw(ax2, s[keep], net.offline_test_error.sel(n_train=n).values[keep], source="measurement", color=c,
                   connect=True, label=f"offline n={n}: test error")
        style.draw(ax2, s[keep], net.offline_train_error.sel(n_train=n).values[keep], source="measurement", color=c,
                   connect=True, marker="x", ls=":")
    style.draw(ax2, [], [], source="measurement", color="0.4", marker="x", ls=":", label="offline: train error")
    ax2.set_xscale("log")
    ax2.set_ylim(0, 1)
    ax2.set_xlabel(f"step k (B = {net.attrs['batch_size']:g})")
    ax2.set_ylabel("classification error")
    ax2.set_title(f"MLP {net.attrs['hidden']} on MNIST-1D, SGD lr={net.attrs['lr']:g}, "
                  f"{net.attrs['n_test']} test examples", fontsize=9)
    ax2.legend(fontsize=7, loc="lower left")
    style.save(fig, path)


def summary(res) -> str:
    """The bootstrap error (offline - online test risk / error) at the last step, per n."""
    lin = res["linear"].bootstrap_error.isel(step=-1).to_pandas().to_string()
    net = res["mlp"].bootstrap_error.isel(step=-1).to_pandas().to_string()
    return f"bootstrap error at the last step, linear regression (exact):\n{lin}\nMLP on MNIST-1D (measured):\n{net}"


def main(argv=None):
    """The command line ``python -m studies run deep_bootstrap`` (``-h`` lists the flags): run at the
    scale the flags choose, print the final bootstrap errors and the files written.

    Args:
        argv: the flags (default: ``sys.argv[1:]``).

    Returns:
        the study's results, as :func:`run` returns them.
    """
    return command(__doc__, run, "deep_bootstrap", argv, summary=summary)


if __name__ == "__main__":
    main()
