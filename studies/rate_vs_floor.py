"""The convergence-rate / noise-floor trade-off of SGD along high- and low-curvature directions of
the NQM (Grosse's CSC 2541 Lecture 7, the per-dimension risk of the "Noisy Quadratic Model" slides;
Zhang et al. 2019, Sec. 3).

Along an eigen-direction with curvature h and gradient-noise variance c, SGD with learning rate a and
batch size B has the expected loss, exactly,

    E l(k) = (1 - a h)^(2k) l(0) + [1 - (1 - a h)^(2k)] a c / (2 B (2 - a h)),

so a larger a converges faster, at the rate (1 - a h)^2, towards a higher floor a c / (2 B (2 - a h)).
High-curvature directions converge within a few steps and sit on their floor; low-curvature ones
are still converging, at a rate the learning rate cannot push above (1 - a h)^2 with a h <= 2.

Top: one high- (h = 1) and one low-curvature (h = 0.01) direction, c = h, over steps
for four learning rates: the exact loss (lines) and Monte Carlo runs (markers with standard errors).
Bottom: the two directions' noise floor (a loss) and relaxation time 1 / (1 - (1 - a h)^2) (in steps)
against the learning rate, in separate panels: no single rate is good for both.

    python -m studies run rate_vs_floor            # 2000 Monte Carlo runs, 10^4 steps
    python -m studies run rate_vs_floor --quick    # 200 runs
    python -m studies run rate_vs_floor --full     # 20000 runs, 10^5 steps

Writes ``rate_vs_floor.nc`` (groups ``exact``, ``simulation``, ``tradeoff``) and ``rate_vs_floor.png``.

References:
    R. Grosse, "CSC 2541: Neural Net Training Dynamics", Lecture 7 "Stochasticity and Parallelism",
    University of Toronto, Winter 2022.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from toymodels import NQM, SGD  # noqa: E402
from toymodels.schema import attach_attrs  # noqa: E402

from . import style  # noqa: E402
from ._io import command, publish  # noqa: E402

CURVATURES = {"high": 1.0, "low": 0.01}
LR_FRACTIONS = (0.05, 0.2, 0.5, 0.9)  # of the stability limit 2 / h_max
BATCH_SIZE = 1.0
SCALES = {"quick": dict(n_runs=200, n_steps=10**4), "default": dict(n_runs=2000, n_steps=10**4),
          "full": dict(n_runs=20000, n_steps=10**5)}


def _direction(h: float) -> NQM:
    return NQM(np.array([h]), np.array([h]), np.array([1.0]))


def run(*, scale: str = "default", out: str = "results", progress: bool = True, seed: int = 0) -> dict:
    """Exact per-direction curves, their Monte Carlo, and the floor / rate trade-off; writes the
    netCDF file and the figure and returns ``{group: Dataset}``."""
    if scale not in SCALES:
        raise ValueError(f"`scale` must be one of {tuple(SCALES)}; got {scale!r}.")
    cfg = SCALES[scale]
    lrs = 2.0 / max(CURVATURES.values()) * np.array(LR_FRACTIONS)
    steps = np.unique(np.r_[0, np.geomspace(1, cfg["n_steps"], 60).astype(np.int64)])
    mc_steps = np.unique(np.r_[0, np.geomspace(1, cfg["n_steps"], 12).astype(np.int64)])
    exact, sims = [], []
    for name, h in CURVATURES.items():
        nqm = _direction(h)
        per_lr, per_lr_mc = [], []
        for j, lr in enumerate(lrs):
            per_lr.append(nqm.loss_curve(SGD(lr), BATCH_SIZE, steps).rename("loss"))
            mc = nqm.simulate(SGD(lr), BATCH_SIZE, mc_steps, n_runs=cfg["n_runs"], seed=seed + 10 * j + (h < 1),
                              progress=False)
            per_lr_mc.append(mc[["loss", "loss_sem"]].drop_attrs())
        exact.append(xr.concat(per_lr, dim=xr.DataArray(lrs, dims="lr")).expand_dims(curve=[name]))
        sims.append(xr.concat(per_lr_mc, dim=xr.DataArray(lrs, dims="lr")).expand_dims(curve=[name]))
    exact = xr.concat(exact, dim="curve").to_dataset().drop_attrs()
    sims = xr.concat(sims, dim="curve")
    grid = 2.0 / max(CURVATURES.values()) * np.geomspace(1e-3, 0.999, 200)
    floors, times = [], []
    for name, h in CURVATURES.items():
        floors.append([_direction(h).noise_floor(SGD(lr), BATCH_SIZE) for lr in grid])
        times.append(1.0 / (1.0 - (1.0 - grid * h) ** 2))
    tradeoff = xr.Dataset({"loss_inf": (("curve", "lr"), np.array(floors)),
                           "relaxation_steps": (("curve", "lr"), np.array(times))},
                          coords={"curve": list(CURVATURES), "lr": grid})
    common = dict(model="nqm", curvature_high=CURVATURES["high"], curvature_low=CURVATURES["low"],
                  batch_size=BATCH_SIZE, noise="c = h", init_sq=1.0)
    attach_attrs(exact, source="exact", **common)
    attach_attrs(sims, source="simulation", n_runs=cfg["n_runs"], seed=seed, **common)
    attach_attrs(tradeoff, source="exact", **common)
    result = {"exact": exact, "simulation": sims, "tradeoff": tradeoff}
    return publish(result, out, "rate_vs_floor", plot)


def plot(result: dict, path: str) -> None:
    """Top: the expected loss over steps along each direction (one panel each, colour = learning
    rate).  Bottom: against the learning rate, the noise floor (a loss) and the relaxation time (in
    steps) in separate panels, the four learning rates of the top row marked in their colours."""
    from matplotlib.lines import Line2D

    exact, sims, trade = result["exact"], result["simulation"], result["tradeoff"]
    fig, axes = plt.subplots(2, 2, figsize=(12.5, 8.6))
    lrs = exact.lr.values
    for ax, name in zip(axes[0], CURVATURES):
        for j, lr in enumerate(lrs):
            e = exact.loss.sel(curve=name, lr=lr)
            k = e.step.values
            style.draw(ax, k[k > 0], e.values[k > 0], source="exact", color=f"C{j}")
            m = sims.sel(curve=name, lr=lr)
            km = m.step.values
            style.draw(ax, km[km > 0], m.loss.values[km > 0], err=m.loss_sem.values[km > 0], source="simulation",
                       color=f"C{j}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("step k")
        ax.set_ylabel("expected loss along the direction, E l(k)")
        ax.set_title(f"{name} curvature h = {CURVATURES[name]:g} (c = h, B = {BATCH_SIZE:g})", fontsize=10)
    # one legend for the top row, outside the axes: colour = learning rate, line = theory, markers = Monte Carlo
    handles = [Line2D([], [], color=f"C{j}", label=f"lr a = {lr:.2g}") for j, lr in enumerate(lrs)]
    handles += [Line2D([], [], color="0.3", label="exact (theory)"),
                Line2D([], [], color="0.3", ls="none", marker="o", mfc="none", ms=4,
                       label=f"mean of {sims.attrs['n_runs']} runs ± SE\n(Monte Carlo)")]
    axes[0, 1].legend(handles=handles, fontsize=8.5, loc="upper left", bbox_to_anchor=(1.03, 1.0), borderaxespad=0,
                      title="top row", title_fontsize=8.5)
    floor_ax, time_ax = axes[1]
    for name, color in zip(CURVATURES, ("0.15", "0.55")):
        h = CURVATURES[name]
        style.draw(floor_ax, trade.lr, trade.loss_inf.sel(curve=name), source="exact", color=color, label=f"h = {h:g}")
        style.draw(time_ax, trade.lr, trade.relaxation_steps.sel(curve=name), source="exact", color=color,
                   label=f"h = {h:g}")
    for ax in (floor_ax, time_ax):
        for j, lr in enumerate(lrs):  # the learning rates of the top row
            ax.axvline(lr, color=f"C{j}", ls=":", lw=1.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("learning rate a")
    floor_ax.set_ylabel("noise floor: stationary expected loss\na c / (2B (2 - a h))")
    floor_ax.set_title("the floor rises with the learning rate", fontsize=10)
    time_ax.set_ylabel("relaxation time 1 / (1 - (1 - a h)²)  [steps]")
    time_ax.set_title("the time to reach it falls (while a h < 1)", fontsize=10)
    handles = [Line2D([], [], color=c, label=f"h = {h:g} (theory)") for h, c in zip(CURVATURES.values(), ("0.15", "0.55"))]
    handles += [Line2D([], [], color="0.3", ls=":", label="the learning rates\nof the top row")]
    # outside the axes, beside the row it explains (inside, it would cover the learning-rate marks)
    time_ax.legend(handles=handles, fontsize=8.5, loc="upper left", bbox_to_anchor=(1.03, 1.0), borderaxespad=0,
                   title="bottom row", title_fontsize=8.5)
    fig.suptitle("faster convergence costs a higher noise floor, and no single learning rate suits both directions",
                 fontsize=11)
    style.save(fig, path)


def summary(res) -> str:
    """The exact expected loss at the last step, one row per direction, one column per learning rate."""
    last = res["exact"].loss.isel(step=-1).to_pandas()
    return "expected loss at the last step (rows: direction, columns: lr):\n" + last.to_string()


def main(argv=None):
    """The command line ``python -m studies run rate_vs_floor`` (``-h`` lists the flags): run at the
    scale the flags choose, print the expected loss at the last step and the files written.

    Args:
        argv: the flags (default: ``sys.argv[1:]``).

    Returns:
        the study's results, as :func:`run` returns them.
    """
    return command(__doc__, run, "rate_vs_floor", argv, summary=summary)


if __name__ == "__main__":
    main()
