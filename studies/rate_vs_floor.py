"""The convergence-rate / noise-floor trade-off of SGD along high- and low-curvature directions of
the NQM (Grosse's CSC 2541 Lecture 7, the per-dimension risk of the "Noisy Quadratic Model" slides;
Zhang et al. 2019, Sec. 3).

Along an eigen-direction with curvature h and gradient-noise variance c, SGD with learning rate a and
batch size B has the expected loss, exactly,

    E l(k) = (1 - a h)^(2k) l(0) + [1 - (1 - a h)^(2k)] a c / (2 B (2 - a h)),

so a larger a converges faster, at the rate (1 - a h)^2, towards a higher floor a c / (2 B (2 - a h)).
High-curvature directions converge within a few steps and sit on their floor; low-curvature ones
are still converging, at a rate the learning rate cannot push above (1 - a h)^2 with a h <= 2.

Left and middle: one high- (h = 1) and one low-curvature (h = 0.01) direction, c = h, over steps
for four learning rates: the exact loss (lines) and Monte Carlo runs (markers with standard errors).
Right: the two directions' floor and convergence time 1 / (1 - (1 - a h)^2) against the learning
rate: no single rate is good for both.

    python -m studies run rate_vs_floor            # 2000 Monte Carlo runs, 10^4 steps
    python -m studies run rate_vs_floor --quick    # 200 runs
    python -m studies run rate_vs_floor --full     # 20000 runs, 10^5 steps

Writes ``rate_vs_floor.nc`` (groups ``exact``, ``simulation``, ``tradeoff``) and ``rate_vs_floor.png``.

References:
    R. Grosse, "CSC 2541: Neural Net Training Dynamics", Lecture 7 "Stochasticity and Parallelism",
    University of Toronto, Winter 2022.
"""

from __future__ import annotations


import numpy as np
import xarray as xr

from toymodels import NQM, SGD
from toymodels.schema import attach_attrs

from . import style
from ._io import command, publish

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
    """Three panels: the high- and the low-curvature direction's expected loss over steps for each
    learning rate (exact lines, Monte Carlo markers with standard errors), and both directions' noise
    floor and convergence time against the learning rate."""
    exact, sims, trade = result["exact"], result["simulation"], result["tradeoff"]
    fig, axes = style.figure(3, width=5.0)
    for ax, name in zip(axes[:2], CURVATURES):
        for j, lr in enumerate(exact.lr.values):
            e = exact.loss.sel(curve=name, lr=lr)
            k = e.step.values
            style.draw(ax, k[k > 0], e.values[k > 0], source="exact", color=f"C{j}", label=f"lr = {lr:.2g}")
            m = sims.sel(curve=name, lr=lr)
            km = m.step.values
            style.draw(ax, km[km > 0], m.loss.values[km > 0], err=m.loss_sem.values[km > 0], source="simulation",
                       color=f"C{j}")
        style.draw(ax, [], [], source="simulation", color="0.4", label=f"mean of {sims.attrs['n_runs']} runs ± SE")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("expected loss along the direction")
        ax.set_title(f"{name} curvature h = {CURVATURES[name]:g} (c = h, B = {BATCH_SIZE:g})")
        ax.legend(fontsize=7, loc="lower left")
    ax = axes[2]
    for name, color in zip(CURVATURES, ("C3", "C0")):
        style.draw(ax, trade.lr, trade.loss_inf.sel(curve=name), source="exact", color=color,
                   label=f"noise floor, h = {CURVATURES[name]:g}")
        style.draw(ax, trade.lr, trade.relaxation_steps.sel(curve=name), source="exact", color=color, ls="--",
                   label=f"steps to converge 1/(1-(1-ah)²), h = {CURVATURES[name]:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate a")
    ax.set_title("faster convergence costs a higher floor")
    ax.legend(fontsize=7)
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
