"""Gradient variance of random-features models vs overparametrization (Faghri et al. 2020,
Sec. 4.2 Fig. 4/5 and Sec. 4.3 Fig. 8).

For each duplicate share (none, and 5 points repeated to make up part of the set), learning rate and
training-set size N (student hidden h_s fixed, overparametrization h_s / N), a student is trained by
mini-batch SGD (B = 10) and the average variance of four gradient-mean estimators is measured along
the way: SG-B, SG-2B, SVRG and gradient clustering (GC, B clusters), with SVRG's snapshot and GC's
clustering refreshed every ``U`` steps.  Plotted: the maximum over the last 70% of training of the
variance (top) and of SG-B's normalized variance (bottom), as in the paper.

    python -m studies run rf_variance            # reduced scale: h_s = 100, N = 10..1000, 3 seeds, ~4 min
    python -m studies run rf_variance --quick    # smaller still
    python -m studies run rf_variance --full     # the paper's scale: h_s = 1000, N = 100..10000 (hours)

``--scheduler`` spreads the points over a dask cluster.  Every finished point is saved under
``<out>/rf_variance_points/`` and skipped on a rerun, so an interrupted run resumes.  Writes
``rf_variance.nc`` and ``rf_variance.png``.

References:
    F. Faghri, D. Duvenaud, D. J. Fleet and J. Ba, "A Study of Gradient Variance in Deep Learning",
    2020.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from toymodels.features import RandomFeatures  # noqa: E402
from toymodels.parallel import run_tasks  # noqa: E402
from toymodels import resume  # noqa: E402
from toymodels.schema import attach_attrs  # noqa: E402

from ._io import command, publish, settings_tag  # noqa: E402

ESTIMATORS = {"sg_b": ("SG-B", "C0"), "sg_2b": ("SG-2B", "C1"), "svrg": ("SVRG", "C2"), "gc": ("GC", "C3")}

SCALES = {
    "quick": dict(student_hidden=40, n_train=[10, 40, 160], lrs=[0.1, 1.0], duplicates=[0.0, 0.5],
                  n_steps=300, log_every=25, update_every=100, input_dim=10, teacher_hidden=4, seeds=[0]),
    "default": dict(student_hidden=100, n_train=[10, 20, 50, 100, 200, 500, 1000], lrs=[0.01, 0.1, 1.0],
                    duplicates=[0.0, 0.1, 0.5, 0.9], n_steps=3000, log_every=50, update_every=500, input_dim=10,
                    teacher_hidden=10, seeds=[0, 1, 2]),
    "full": dict(student_hidden=1000, n_train=[100, 200, 500, 1000, 2000, 5000, 10000], lrs=[0.01, 0.1, 1.0],
                  duplicates=[0.0, 0.1, 0.5, 0.9], n_steps=20000, log_every=200, update_every=2000, input_dim=100,
                  teacher_hidden=100, seeds=[0, 1, 2]),
}


def _point(cfg, n, lr, dup, seed, batch_size=10):
    rf = RandomFeatures(n, cfg["input_dim"], cfg["teacher_hidden"], cfg["student_hidden"], duplicates=dup, seed=seed)
    ds = rf.train(lr, min(batch_size, n), cfg["n_steps"], log_every=cfg["log_every"],
                  update_every=cfg["update_every"], seed=seed)
    late = ds.isel(step=slice(int(0.3 * ds.step.size), None))  # the last 70% of training
    return xr.Dataset({
        "grad_var": late.grad_var.mean("step"), "grad_var_max": late.grad_var.max("step"),
        "grad_nvar": late.grad_nvar.mean("step"), "grad_nvar_max": late.grad_nvar.max("step"),
        "loss": late.loss.isel(step=-1, drop=True), "accuracy": late.accuracy.isel(step=-1, drop=True),
    })


def _point_task(args):
    cfg, key, path = args
    dup, lr, n, seed = key
    pt = _point(cfg, n, lr, dup, seed)
    return key, path, pt


def run(*, scale: str = "default", out: str = "results", progress: bool = True, scheduler=None) -> xr.Dataset:
    """Train every point (resuming from saved ones), write the netCDF file and the figure.

    ``scheduler``: train the points as dask tasks (``"local"``, an address or a Client; see
    :func:`toymodels.parallel.run_tasks`); each finished point is saved at once either way.
    """
    if scale not in SCALES:
        raise ValueError(f"`scale` must be one of {tuple(SCALES)}; got {scale!r}.")
    cfg = SCALES[scale]
    cache = os.path.join(out, "rf_variance_points")
    os.makedirs(cache, exist_ok=True)
    grid = [(d, lr, n, s) for d in cfg["duplicates"] for lr in cfg["lrs"] for n in cfg["n_train"] for s in cfg["seeds"]
            # duplicates need room for the 5 repeated points
            if d == 0.0 or round(d * n) >= 5]
    points, todo = {}, []
    for dup, lr, n, seed in grid:
        path = os.path.join(cache, f"{settings_tag(scale, cfg)}_n{n}_lr{lr:g}_dup{dup:g}_s{seed}.nc")
        saved = resume.read(path, variables=("grad_var",))
        if saved is not None:
            points[(dup, lr, n, seed)] = saved
        else:
            todo.append((cfg, (dup, lr, n, seed), path))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(grid), initial=len(points), desc="rf variance", unit="model")

    def record(result):
        key, path, pt = result
        resume.write(pt, path)
        points[key] = pt
        if bar is not None:
            bar.update(1)

    run_tasks(_point_task, todo, scheduler=scheduler, on_result=record)
    if bar is not None:
        bar.close()
    rows = []
    for dup in cfg["duplicates"]:
        per_lr = []
        for lr in cfg["lrs"]:
            per_n = []
            for n in cfg["n_train"]:
                got = [points[(dup, lr, n, s)] for s in cfg["seeds"] if (dup, lr, n, s) in points]
                if got:
                    per_n.append(xr.concat(got, dim="seed").mean("seed").expand_dims(n_train=[n]))
                else:  # too few examples for this duplicate share: inf, with the reason in attrs
                    per_n.append(xr.full_like(points[(0.0, lr, n, cfg["seeds"][0])], np.inf).expand_dims(n_train=[n]))
            per_lr.append(xr.concat(per_n, dim="n_train").expand_dims(lr=[lr]))
        rows.append(xr.concat(per_lr, dim="lr").expand_dims(duplicates=[dup]))
    result = xr.concat(rows, dim="duplicates")
    result = result.assign_coords(overparametrization=("n_train", cfg["student_hidden"] / np.array(cfg["n_train"])))
    attach_attrs(result, model="rf", source="exact", scale=scale, batch_size=10.0,
                 student_hidden=cfg["student_hidden"], input_dim=cfg["input_dim"],
                 teacher_hidden=cfg["teacher_hidden"], n_steps=cfg["n_steps"], update_every=cfg["update_every"],
                 n_seeds=len(cfg["seeds"]),
                 note="statistics over the last 70% of training; inf where the duplicate share leaves fewer than 5 copies")
    return publish(result, out, "rf_variance", plot)


def plot(result: xr.Dataset, path: str) -> None:
    """Top: max variance per estimator (colour) and learning rate (line style); bottom: SG-B's
    max normalized variance.  One column per duplicate share; where a share leaves fewer than 5
    duplicated examples (no point computed) the panel says so."""
    from matplotlib.lines import Line2D

    dups = result.duplicates.values
    fig, axes = plt.subplots(2, dups.size, figsize=(4.2 * dups.size + 2.0, 7.6), squeeze=False, sharex=True)
    x = result.overparametrization.values
    n_train = result.n_train.values
    styles = ["-", "--", ":", "-."]
    positive = result.grad_var_max.values[np.isfinite(result.grad_var_max.values) & (result.grad_var_max.values > 0)]
    # GC with as many clusters as examples (or clusters of exact duplicates) is the full gradient:
    # variance 0 up to rounding; such points are drawn at a floor 10^-8 below the largest value
    floor = max(positive.min(), 1e-8 * positive.max()) * 0.3 if positive.size else 1e-12
    n_dup = 5  # RandomFeatures' n_duplicated: the repeated points
    for c, dup in enumerate(dups):
        top, bottom = axes[0, c], axes[1, c]
        for j, lr in enumerate(result.lr.values):
            r = result.sel(duplicates=dup, lr=lr)
            for name, (label, color) in ESTIMATORS.items():
                v = r.grad_var_max.sel(estimator=name).values
                top.loglog(x, np.maximum(v, floor), styles[j % 4], color=color, marker="o", ms=3)
            bottom.semilogx(x, r.grad_nvar_max.sel(estimator="sg_b").values, styles[j % 4], color="C0", marker="o",
                            ms=3)
        top.axhline(floor, color="0.5", ls=(0, (1, 3)), lw=0.8)
        top.set_title("no duplicates" if dup == 0 else f"5 points repeated: {dup:.0%} of the data", fontsize=10)
        top.set_ylim(bottom=floor * 0.6)
        bottom.axhline(1.0, color="0.6", lw=0.8)
        bottom.set_xlabel("overparametrization h_s / N")
        # points not computed: the share makes fewer than 5 copies (round(share x N) < 5), the model's
        # minimum, so 5 repeated points cannot be that share of so few examples
        v = result.grad_var_max.sel(duplicates=dup)
        missing = ~np.isfinite(v).any([d for d in v.dims if d != "n_train"]).transpose("n_train").values
        if missing.any():
            n_min = int(n_train[~missing].min())
            edge = np.sqrt(x[missing].min() * x[~missing].max())  # halfway (in log) to the first missing point
            for ax in (top, bottom):
                ax.axvspan(edge, x.max() * 1.6, color="0.92", zorder=0)
            last = x[~missing].max()  # the largest overparametrization computed
            for ax, text in ((top, f"not computed: h_s / N > {last:g} (N < {n_min})"),
                             (bottom, f"{dup:.0%} of N < {n_min} is fewer than {n_dup} copies\nof the {n_dup} repeated points")):
                ax.text(np.sqrt(edge * x.max() * 1.6), 0.5, text, transform=ax.get_xaxis_transform(), rotation=90,
                        ha="center", va="center", fontsize=8, color="0.25")
    axes[0, 0].set_ylabel("variance of the gradient-mean estimate\n(tr Cov / P, max over the last 70% of training)")
    axes[1, 0].set_ylabel("normalized variance of SG-B, V / E|ĝ|²\n(max over the last 70% of training)")
    est_handles = [Line2D([], [], color=color, label=label) for label, color in ESTIMATORS.values()]
    lr_handles = [Line2D([], [], color="0.3", ls=styles[j % 4], label=f"lr = {lr:g}") for j, lr in enumerate(result.lr.values)]
    extra = [Line2D([], [], color="0.5", ls=(0, (1, 3)), lw=0.8, label="variance 0 (GC: one\nexample per cluster)\ndrawn at this floor")]
    axes[0, -1].legend(handles=est_handles + lr_handles + extra, fontsize=8.5, loc="upper left",
                       bbox_to_anchor=(1.04, 1.0), borderaxespad=0)
    bottom_handles = lr_handles + [Line2D([], [], color="0.6", lw=0.8, label="1: noise dominates")]
    axes[1, -1].legend(handles=bottom_handles, fontsize=8.5, loc="upper left", bbox_to_anchor=(1.04, 1.0),
                       borderaxespad=0, title="SG-B", title_fontsize=8.5)
    fig.suptitle(f"random features, h_s = {result.attrs['student_hidden']}, B = 10 (Faghri et al. Fig. 4, 5, 8): "
                 f"exact estimator variances along simulated SGD training, mean of {result.attrs['n_seeds']} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(res) -> str:
    """The maximal average variance of each estimator (columns) at the largest learning rate, one row per
    duplicate share and training-set size."""
    table = res.grad_var_max.sel(lr=res.lr.values[-1]).reset_coords(drop=True).to_dataframe().unstack("estimator")
    return f"max average variance at lr={res.lr.values[-1]:g}:\n" + table.to_string()


def main(argv=None):
    """The command line ``python -m studies run rf_variance`` (``-h`` lists the flags): run at the scale
    the flags choose, print the variance table and the files written.

    Args:
        argv: the flags (default: ``sys.argv[1:]``).

    Returns:
        the study's results, as :func:`run` returns them.
    """
    return command(__doc__, run, "rf_variance", argv, summary=summary, scheduler=True)


if __name__ == "__main__":
    main()
