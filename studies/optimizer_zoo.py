"""Which algorithmic choices matter at which batch sizes, for every optimizer family of the library:
tuned steps to a target loss vs batch size on the noisy quadratic model, with the information-theoretic
lower bound and the tuned hyper-parameters (Zhang et al. 2019's question, asked of today's optimizers).

Families (:data:`toymodels.sweep.FAMILIES`): SGD, preconditioned SGD (P = H^0.5), heavy-ball momentum,
Nesterov momentum, SGD + EMA iterate averaging, the accelerated SGD of Kidambi et al. 2018 (lr and kappa
tuned), Polyak (uniform) averaging of SGD (a closed form per mode) and schedule-free SGD.  Every point is
tuned per batch size (:func:`toymodels.sweep.batch_size_sweep`) and its steps are the exact first crossing
of the expected loss at the tuned setting.  Schedule-free SGD has no closed form (its averaging weight
1/(k+1) enters the gradient point): it is propagated one update at a time and is two orders of magnitude
slower to tune, so it runs on a smaller NQM and a coarser batch-size grid (the "averaging" group, with
SGD, momentum, EMA and Polyak on the same NQM for comparison); the figure states both NQMs.

    python -m studies run optimizer_zoo            # d = 1000, B = 2^0..2^20; averaging group d = 30
    python -m studies run optimizer_zoo --quick    # d = 100, B = 2^0..2^16 step 2; averaging group d = 10
    python -m studies run optimizer_zoo --full     # d = 10^4, B = 2^0..2^24; averaging group d = 100

Writes ``optimizer_zoo.nc`` (netCDF groups ``main`` and ``averaging``) and ``optimizer_zoo.png`` into
``--out`` (default ``results``); per-family sweeps are saved as they go (``optimizer_zoo_parts``) and
resume after an interruption.

References:
    G. Zhang, L. Li, Z. Nado, J. Martens, S. Sachdeva, G. E. Dahl, C. J. Shallue and R. Grosse, "Which
    Algorithmic Choices Matter at Which Batch Sizes? Insights From a Noisy Quadratic Model", NeurIPS 2019,
    Sections 3-4.
    R. Kidambi, P. Netrapalli, P. Jain and S. M. Kakade, "On the insufficiency of existing momentum
    schemes for Stochastic Optimization", ICLR 2018.
    A. Defazio, X. Yang, H. Mehta, K. Mishchenko, A. Khaled and A. Cutkosky, "The Road Less Scheduled",
    NeurIPS 2024.
    B. T. Polyak and A. B. Juditsky, "Acceleration of Stochastic Approximation by Averaging", SIAM J.
    Control Optim. 30(4), 1992.
"""

from __future__ import annotations

import os
import time

import numpy as np
import xarray as xr

from toymodels import NQM
from toymodels.schema import attach_attrs
from toymodels.sweep import _Y_MIN, family_sweeps

from . import style
from ._io import fraction, parser, publish, scale_of

LABELS = {"sgd": "SGD", "precond": "preconditioned SGD (P = H^0.5)", "momentum": "heavy-ball momentum",
          "nesterov": "Nesterov momentum", "ema": "SGD + EMA", "asgd": "accelerated SGD (Kidambi et al.)",
          "polyak": "SGD + Polyak (uniform) averaging", "schedule_free": "schedule-free SGD"}
COLORS = {"sgd": "C0", "precond": "C1", "momentum": "C2", "ema": "C3", "nesterov": "C4", "asgd": "C5",
          "polyak": "C6", "schedule_free": "C9"}
MAIN = ("sgd", "precond", "momentum", "nesterov", "ema", "asgd", "polyak")
"""The families with a closed form, swept on the main NQM."""
AVERAGING = ("sgd", "momentum", "ema", "polyak", "schedule_free")
"""The averaging group: schedule-free SGD (update by update) and four references on a smaller NQM."""
EXTRA = {"momentum_opt": "1 - β", "decay_opt": "1 - μ", "kappa_opt": "1 / κ"}
"""The tuned extra hyper-parameter of each family, drawn as the quantity that goes to 0 (log scale)."""

SCALES = {
    "tiny": dict(dim=20, log2_batch=np.array([0, 4, 8]), avg_dim=10, avg_log2_batch=np.array([6])),
    "quick": dict(dim=100, log2_batch=np.arange(0, 17, 2), avg_dim=10, avg_log2_batch=np.arange(0, 13, 4)),
    "default": dict(dim=1000, log2_batch=np.arange(0, 21), avg_dim=30, avg_log2_batch=np.arange(0, 17, 2)),
    "full": dict(dim=10_000, log2_batch=np.arange(0, 25), avg_dim=100, avg_log2_batch=np.arange(0, 21, 2)),
}
"""Per scale: the main NQM's dimension and log2 batch sizes, and the averaging group's ("tiny" is the
tests' scale)."""


def run(*, scale: str = "default", out: str = "results", target_fraction: float = 0.01, progress: bool = True,
        scheduler=None) -> dict:
    """Run both groups' sweeps and write the netCDF file and the figure.

    Args:
        scale: ``"tiny"`` (tests), ``"quick"``, ``"default"`` or ``"full"`` (:data:`SCALES`).
        out: the output folder.
        target_fraction: the target loss as a fraction of the initial loss L0, in (0, 1).
        progress: progress bars.
        scheduler: run the families as dask tasks (see :func:`toymodels.parallel.run_tasks`).

    Returns:
        ``{"main": Dataset, "averaging": Dataset}``, each over (``optimizer``, ``batch_size``) with
        ``steps_to_target`` (``inf`` where no setting reaches the target, with ``reason``), ``lr_opt``,
        ``momentum_opt``, ``decay_opt``, ``kappa_opt`` (NaN where a family has no such parameter),
        and ``steps_lower_bound`` over ``batch_size``.
    """
    if scale not in SCALES:
        raise ValueError(f"`scale` must be one of {tuple(SCALES)}; got {scale!r}.")
    cfg = SCALES[scale]
    parts_dir = os.path.join(out, "optimizer_zoo_parts")  # per-family sweeps, for resuming
    os.makedirs(parts_dir, exist_ok=True)
    result = {}
    for group, families, dim, log2 in (("main", MAIN, cfg["dim"], cfg["log2_batch"]),
                                       ("averaging", AVERAGING, cfg["avg_dim"], cfg["avg_log2_batch"])):
        paths = {f: os.path.join(parts_dir, f"{group}_{f}_{dim}.nc") for f in families}
        result[group] = _group(NQM.power_law(dim), families, 2.0 ** log2, target_fraction, paths, progress,
                               scheduler)
    return publish(result, out, "optimizer_zoo", plot)


def _group(nqm, families, batch_sizes, target_fraction, paths, progress, scheduler):
    """The tuned sweeps of ``families`` on ``nqm`` as one Dataset over (optimizer, batch_size)."""
    target = target_fraction * nqm.initial_loss
    sweeps = family_sweeps(nqm, list(families), batch_sizes, target, precond=0.5, paths=paths, progress=progress,
                           scheduler=scheduler)
    parts = []
    for fam, ds in sweeps.items():
        for name in EXTRA:
            if name not in ds:
                ds[name] = ("batch_size", np.full(batch_sizes.size, np.nan))
        parts.append(ds[["steps_to_target", "lr_opt", *EXTRA, "reason"]].drop_attrs().expand_dims(optimizer=[fam]))
    ds = xr.concat(parts, dim="optimizer")
    ds["steps_lower_bound"] = ("batch_size", np.array([nqm.lower_bound_steps(b, target) for b in batch_sizes]))
    return attach_attrs(ds, model="nqm", source="exact", target=target, target_fraction=target_fraction,
                        dim=nqm.dim, hessian_power=1.0, noise_power=1.0, init_sq=1.0, precond=0.5)


def _steps(ax, ds, *, top):
    """Steps vs batch size of every family in ``ds`` and the lower bound; batch sizes where a family
    never reaches the target are drawn as open triangles at ``top`` (labelled "inf")."""
    bs = ds.batch_size.values
    for fam in ds.optimizer.values:
        y = ds.steps_to_target.sel(optimizer=fam).values
        style.draw(ax, bs, np.where(np.isfinite(y), y, np.nan), source="exact", color=COLORS.get(fam),
                   label=LABELS.get(fam, fam), marker="." if bs.size < 8 else None)
        never = ~np.isfinite(y)
        if never.any():
            ax.plot(bs[never], np.full(never.sum(), top), "^", mfc="none", color=COLORS.get(fam), ms=7,
                    label=f"{LABELS.get(fam, fam)}: target never reached (inf)")
    ax.plot(bs, np.maximum(ds.steps_lower_bound.values, 1), ":", color="k", lw=1.5,
            label="lower bound, any algorithm (a bound, not a run)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("tuned steps to target")
    ax.set_title(f"NQM d={ds.attrs['dim']}, target {ds.attrs['target_fraction']:g}·L0", fontsize=9)
    ax.legend(fontsize=6)


def plot(result: dict, path: str) -> None:
    """Four panels: (a) tuned steps vs batch size on the main NQM with the lower bound; (b) the tuned
    learning rates; (c) the tuned extra hyper-parameters 1 - β, 1 - μ and 1 / κ (log scale, with the
    smallest value the tuner searches: points there are limited by the search, not tuned); (d) the
    averaging group (Polyak, schedule-free and references on the smaller NQM) with its lower bound."""
    import matplotlib.pyplot as plt

    main, avg = result["main"], result["averaging"]
    fig, axes = plt.subplots(2, 2, figsize=(11.5, 9.0))
    (ax1, ax2), (ax3, ax4) = axes
    for ax, ds in ((ax1, main), (ax4, avg)):
        finite = ds.steps_to_target.values[np.isfinite(ds.steps_to_target.values)]
        _steps(ax, ds, top=2.0 * (finite.max() if finite.size else 1.0))
    ax1.set_title(f"(a) {ax1.get_title()}, families with a closed form\n(schedule-free: panel d)",
                  fontsize=9)
    ax4.set_title(f"(d) averaging group: smaller NQM d={avg.attrs['dim']}, B = 2^"
                  f"{{{', '.join(str(int(round(np.log2(b)))) for b in avg.batch_size.values)}}}\n"
                  "(schedule-free SGD is stepped update by update: slow to tune today)", fontsize=9)
    for ds, ls, where in ((main, "-", ""), (avg, "--", f", d={avg.attrs['dim']}")):
        bs = ds.batch_size.values
        for fam in ds.optimizer.values:
            if ds is avg and fam in MAIN:
                continue  # the references are drawn from the main NQM
            r = ds.sel(optimizer=fam)
            style.draw(ax2, bs, r.lr_opt.values, source="exact", color=COLORS.get(fam), ls=ls,
                       marker="." if bs.size < 8 else None, label=LABELS.get(fam, fam) + where)
            for name, what in EXTRA.items():
                v = r[name].values
                if np.any(np.isfinite(v)):
                    shown = 1.0 / v if name == "kappa_opt" else 1.0 - v
                    style.draw(ax3, bs, shown, source="exact", color=COLORS.get(fam), ls=ls,
                               marker="." if bs.size < 8 else None, label=f"{LABELS.get(fam, fam)}{where}: {what}")
    # the tuner searches 1 - beta (1 - mu, 1 / kappa) down to e^-1 * 1e-4: a point there sits on the box's edge
    ax3.axhline(np.exp(_Y_MIN - 1.0), color="0.5", lw=0.8, ls="-.", label="edge of the tuner's search box")
    ax2.set_title("(b) tuned learning rate", fontsize=9)
    ax2.set_ylabel("lr")
    ax3.set_title("(c) tuned extra hyper-parameter: momentum β, EMA decay μ, ASGD κ", fontsize=9)
    ax3.set_ylabel("1 - β,  1 - μ,  1 / κ")
    for ax in (ax2, ax3):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle("Which algorithmic choices matter at which batch sizes (Zhang et al. 2019), every family; "
                 "each point tuned, steps exact at the tuned setting", fontsize=10)
    style.save(fig, path, rect=(0, 0, 1, 0.97))


def summary(result: dict) -> str:
    """The tuned steps to target per family and batch size, both groups, as text."""
    return "\n\n".join(f"{group} (d={ds.attrs['dim']}):\n{ds.steps_to_target.to_pandas().T.to_string()}"
                       for group, ds in result.items())


def main(argv=None):
    """The command line ``python -m studies run optimizer_zoo`` (``-h`` lists the flags): the shared
    flags and ``--target-fraction``; runs both groups, prints the steps per family and batch size and
    the files written.

    Args:
        argv: the flags (default: ``sys.argv[1:]``).
    """
    p = parser(__doc__, scheduler=True)
    p.add_argument("--target-fraction", type=fraction, default=0.01, help="target loss as a fraction of L0, in (0, 1)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    res = run(scale=scale_of(a), out=a.out, target_fraction=a.target_fraction, progress=not a.no_progress,
              scheduler=a.scheduler)
    print(summary(res))
    print(f"wrote {a.out}/optimizer_zoo.nc and .png in {time.perf_counter() - t0:.1f} s")
    return res


if __name__ == "__main__":
    main()
