"""Which algorithmic choices matter at which batch sizes, for every optimizer family of the library:
tuned steps to a target loss vs batch size on the noisy quadratic model, with the information-theoretic
lower bound and the tuned hyper-parameters (Zhang et al. 2019's question, asked of today's optimizers).

Families (:data:`toymodels.sweep.FAMILIES`): SGD, preconditioned SGD (P = H^0.5), heavy-ball momentum,
Nesterov momentum, SGD + EMA iterate averaging, the accelerated SGD of Kidambi et al. 2018 (lr and kappa
tuned), Polyak (uniform) averaging of SGD (a closed form per mode) and schedule-free SGD.  Every point is
tuned per batch size (:func:`toymodels.sweep.batch_size_sweep`) and its steps are the exact first crossing
of the expected loss at the tuned setting.  Schedule-free SGD has no closed form (its averaging weight
1/(k+1) enters the gradient point): it is propagated one update at a time, tuned on a coarsened NQM and
its steps computed exactly on the full one (:mod:`toymodels.sweep`), so it runs beside the others.

    python -m studies run optimizer_zoo            # d = 1000, B = 2^0..2^20
    python -m studies run optimizer_zoo --quick    # d = 100, B = 2^0..2^16 step 2
    python -m studies run optimizer_zoo --full     # d = 10^4, B = 2^0..2^24

Writes ``optimizer_zoo.nc`` (netCDF group ``main``) and ``optimizer_zoo.png`` into
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
from toymodels.sweep import _Y_MIN, _asgd_kappa, family_sweeps

from . import style
from ._io import fraction, parser, publish, scale_of

LABELS = {"sgd": "SGD", "precond": "preconditioned SGD (P = H^0.5)", "momentum": "heavy-ball momentum",
          "nesterov": "Nesterov momentum", "ema": "SGD + EMA", "asgd": "accelerated SGD (Kidambi et al.)",
          "polyak": "SGD + Polyak (uniform) averaging", "schedule_free": "schedule-free SGD"}
COLORS = {"sgd": "C0", "precond": "C1", "momentum": "C2", "ema": "C3", "nesterov": "C4", "asgd": "C5",
          "polyak": "C6", "schedule_free": "C9"}
MAIN = ("sgd", "precond", "momentum", "nesterov", "ema", "asgd", "polyak", "schedule_free")
"""The families swept on the NQM."""
EXTRA = {"momentum_opt": "1 - β", "decay_opt": "1 - μ", "kappa_opt": "1 / κ"}
"""The tuned extra hyper-parameter of each family, drawn as the quantity that goes to 0 (log scale)."""

SCALES = {
    "tiny": dict(dim=20, log2_batch=np.array([0, 4, 8])),
    "quick": dict(dim=100, log2_batch=np.arange(0, 17, 2)),
    "default": dict(dim=1000, log2_batch=np.arange(0, 21)),
    "full": dict(dim=10_000, log2_batch=np.arange(0, 25)),
}
"""Per scale: the NQM's dimension and log2 batch sizes ("tiny" is the tests' scale)."""


def run(*, scale: str = "default", out: str = "results", target_fraction: float = 0.01, progress: bool = True,
        scheduler=None) -> dict:
    """Run every family's sweep and write the netCDF file and the figure.

    Args:
        scale: ``"tiny"`` (tests), ``"quick"``, ``"default"`` or ``"full"`` (:data:`SCALES`).
        out: the output folder.
        target_fraction: the target loss as a fraction of the initial loss L0, in (0, 1).
        progress: progress bars.
        scheduler: run the families as dask tasks (see :func:`toymodels.parallel.run_tasks`).

    Returns:
        ``{"main": Dataset}`` over (``optimizer``, ``batch_size``) with
        ``steps_to_target`` (``inf`` where no setting reaches the target, with ``reason``), ``lr_opt``,
        ``momentum_opt``, ``decay_opt``, ``kappa_opt`` (NaN where a family has no such parameter),
        and ``steps_lower_bound`` over ``batch_size``.
    """
    if scale not in SCALES:
        raise ValueError(f"`scale` must be one of {tuple(SCALES)}; got {scale!r}.")
    cfg = SCALES[scale]
    parts_dir = os.path.join(out, "optimizer_zoo_parts")  # per-family sweeps, for resuming
    os.makedirs(parts_dir, exist_ok=True)
    dim = cfg["dim"]
    paths = {f: os.path.join(parts_dir, f"main_{f}_{dim}.nc") for f in MAIN}
    result = {"main": _group(NQM.power_law(dim), MAIN, 2.0 ** cfg["log2_batch"], target_fraction, paths, progress,
                             scheduler)}
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
    """Four panels: (a) tuned steps vs batch size with the lower bound; (b) the tuned learning rates;
    (c) the tuned extra hyper-parameters 1 - β, 1 - μ and 1 / κ (log scale, with the smallest value the
    tuner searches: points there are limited by the search, not tuned); (d) each family's steps over
    the lower bound of any algorithm (1: no algorithm could do better at that batch size)."""
    import matplotlib.pyplot as plt

    main = result["main"]
    fig, axes = plt.subplots(2, 2, figsize=(11.5, 9.0))
    (ax1, ax2), (ax3, ax4) = axes
    steps = main.steps_to_target.values
    finite = steps[np.isfinite(steps)]
    top = 2.0 * (finite.max() if finite.size else 1.0)
    _steps(ax1, main, top=top)
    ax1.set_title(f"(a) {ax1.get_title()}", fontsize=9)
    bs = main.batch_size.values
    bound = np.maximum(main.steps_lower_bound.values, 1)
    for fam in main.optimizer.values:
        r = main.sel(optimizer=fam)
        mark = "." if bs.size < 8 else None
        style.draw(ax2, bs, r.lr_opt.values, source="exact", color=COLORS.get(fam), marker=mark,
                   label=LABELS.get(fam, fam))
        for name, what in EXTRA.items():
            v = r[name].values
            if np.any(np.isfinite(v)):
                shown = 1.0 / v if name == "kappa_opt" else 1.0 - v
                style.draw(ax3, bs, shown, source="exact", color=COLORS.get(fam), marker=mark,
                           label=f"{LABELS.get(fam, fam)}: {what}")
        y = r.steps_to_target.values
        style.draw(ax4, bs, np.where(np.isfinite(y), y / bound, np.nan), source="exact", color=COLORS.get(fam),
                   marker=mark, label=LABELS.get(fam, fam))
    # the tuner searches 1 - beta (1 - mu) down to e^-1 * 1e-4, and ASGD's coordinate down to the same value,
    # which is kappa = 4.6e5: a point on either line sits on the box's edge
    ax3.axhline(np.exp(_Y_MIN - 1.0), color="0.5", lw=0.8, ls="-.", label="edge of the tuner's search box: 1 - β, 1 - μ")
    if "asgd" in main.optimizer.values:
        ax3.axhline(1.0 / _asgd_kappa(1.0 - np.exp(_Y_MIN - 1.0)), color=COLORS.get("asgd"), lw=0.8, ls="-.",
                    label="edge of the tuner's search box: 1 / κ")
    ax4.axhline(1.0, color="k", ls=":", lw=1.5, label="the lower bound (a bound, not a run)")
    ax2.set_title("(b) tuned learning rate", fontsize=9)
    ax2.set_ylabel("lr")
    ax3.set_title("(c) tuned extra hyper-parameter: β (momentum, schedule-free), μ (EMA), κ (ASGD)", fontsize=9)
    ax3.set_ylabel("1 - β,  1 - μ,  1 / κ")
    ax4.set_title("(d) tuned steps / lower bound of any algorithm\n(targets never reached: in (a) only)",
                  fontsize=9)
    ax4.set_ylabel("steps / lower bound")
    for ax in (ax2, ax3, ax4):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle("Which algorithmic choices matter at which batch sizes (Zhang et al. 2019), every family; "
                 "each point tuned, steps exact at the tuned setting", fontsize=10)
    style.save(fig, path, rect=(0, 0, 1, 0.97))


def summary(result: dict) -> str:
    """The tuned steps to target per family and batch size, as text."""
    return "\n\n".join(f"{group} (d={ds.attrs['dim']}):\n{ds.steps_to_target.to_pandas().T.to_string()}"
                       for group, ds in result.items())


def main(argv=None):
    """The command line ``python -m studies run optimizer_zoo`` (``-h`` lists the flags): the shared
    flags and ``--target-fraction``; runs every family, prints the steps per family and batch size and
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
