"""Scaling laws of power-law random features, exactly: risk curves, the compute-optimal frontier,
and how the critical batch size scales with data and with model size.

The model is Paquette, Paquette, Xiao and Pennington 2024 ("4+3 Phases of Compute-Optimal Neural
Scaling Laws", Sec. 1): x_j ~ N(0, j^(-2 alpha)), target b_j = j^(-beta), d random features; SGD's
expected risk is exact (:class:`toymodels.PowerLawRF`).  Panels: (a) the risk over steps for several
d (SGD, B = 1, half the stable learning rate): each levels off at its d's irreducible risk; (b) the
iso-FLOP curves L(d; F), F = d x B x steps, with their minima; (c) the compute-optimal size d*(F)
with the exponent FITTED to it beside the theory's exponent for the phase of (alpha, beta) = (1, 0.7),
Phase II, d* ~ F^(beta / (alpha + beta)) (Paquette et al. 2024, their table of compute-optimal curves;
:func:`toymodels.plrf.frontier_exponents`); (d)-(f) the critical batch size B_crit of
S(B) = S_min (1 + B_crit / B) fitted to the exact tuned steps (Zhang et al. 2024, "How Does Critical
Batch Size Scale in Pre-training?", who measured that B_crit grows with the data, not the model
size): against the target loss and against the data E_min = S_min B_crit for several d, and against
d at fixed targets, with the fit interval.

    python -m studies run scaling_laws            # 8 sizes up to d = 1024, 6 targets (~10 minutes)
    python -m studies run scaling_laws --quick    # 5 sizes up to d = 512, 4 targets
    python -m studies run scaling_laws --full     # 8 sizes up to d = 2048, 8 targets

Writes ``scaling_laws.nc`` (groups ``curves``, ``frontier``, ``critical``) and ``scaling_laws.png``;
the critical-batch grid is saved one model size at a time in ``<out>/scaling_laws-<scale>-<hash>/``,
and a rerun reuses the sizes already there.

References:
    E. Paquette, C. Paquette, L. Xiao and J. Pennington, "4+3 Phases of Compute-Optimal Neural
    Scaling Laws", NeurIPS 2024.
    H. Zhang et al., "How Does Critical Batch Size Scale in Pre-training?", 2024.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import matplotlib
import matplotlib.ticker
import matplotlib.transforms

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from toymodels import SGD, PowerLawRF, resume  # noqa: E402
from toymodels.critical import critical_batch_scaling  # noqa: E402
from toymodels.plrf import plrf_frontier  # noqa: E402
from toymodels.schema import attach_attrs  # noqa: E402

from . import style  # noqa: E402
from ._io import command, publish, settings_tag  # noqa: E402

ALPHA, BETA = 1.0, 0.7
SCALES = {
    "tiny": dict(floor_factor=3.0, sizes=[16, 32], v=64, n_targets=2, n_batch=6, n_steps=10**3, n_flops=8),
    "quick": dict(floor_factor=3.0, sizes=[32, 64, 128, 256, 512], v=1024, n_targets=4, n_batch=12, n_steps=10**5, n_flops=16),
    "default": dict(floor_factor=3.0, sizes=[32, 52, 84, 137, 223, 362, 588, 1024], v=2048, n_targets=6, n_batch=20, n_steps=10**5,
                    n_flops=24),
    "full": dict(floor_factor=3.0, sizes=[64, 111, 194, 338, 588, 1024, 1783, 2048], v=4096, n_targets=8, n_batch=24, n_steps=10**6,
                 n_flops=32),
}


def _model(v):
    def make(d):
        return PowerLawRF(ALPHA, BETA, v, int(d), seed=0)
    return make


def run(*, scale: str = "default", out: str = "results", progress: bool = True) -> dict:
    """Risk curves, the compute-optimal frontier and the critical-batch grid; writes the netCDF file
    and the figure and returns ``{group: Dataset}``."""
    if scale not in SCALES:
        raise ValueError(f"`scale` must be one of {tuple(SCALES)}; got {scale!r}.")
    cfg = SCALES[scale]
    make = _model(cfg["v"])
    sizes = np.asarray(cfg["sizes"], dtype=np.float64)
    # (a) risk curves
    steps = np.unique(np.r_[0, np.geomspace(1, cfg["n_steps"], 80).astype(np.int64)])
    curves = []
    for d in sizes:
        m = make(d)
        curves.append(m.loss_curve(SGD(0.5 * m.stable_lr(SGD(1.0), 1.0)), 1.0, steps).drop_attrs())
    curves = xr.concat(curves, dim=xr.DataArray(sizes, dims="n_features")).to_dataset(name="loss")
    attach_attrs(curves, model="plrf", source="exact", alpha=ALPHA, beta=BETA, v=cfg["v"], batch_size=1.0,
                 lr_fraction=0.5)
    # (b, c) the frontier
    flops = np.geomspace(30 * sizes[0], 3 * sizes[-1] * cfg["n_steps"], cfg["n_flops"])
    frontier = plrf_frontier(ALPHA, BETA, sizes, flops, v=cfg["v"])
    # (d-f) the critical batch size, one size at a time, saved as it goes
    # from 1e-2 down to floor_factor x the largest model's irreducible risk: smaller models cannot
    # reach the lower targets (inf, with a reason), which is the trade-off of model size and data
    targets = np.geomspace(1e-2, cfg["floor_factor"] * make(sizes[-1]).irreducible_risk, cfg["n_targets"])
    batch_sizes = np.geomspace(1, 2**12, cfg["n_batch"])
    folder = os.path.join(out, f"scaling_laws-{settings_tag(scale, cfg)}")
    os.makedirs(folder, exist_ok=True)

    def one_size(d):
        path = os.path.join(folder, f"critical-d{int(d)}.nc")
        ds = resume.read(path)
        if ds is None:
            ds = critical_batch_scaling(make, [d], targets, batch_sizes)
            resume.write(ds, path)
        if progress:
            print(f"scaling_laws: B_crit at d = {int(d)}: {np.round(ds.b_crit.values[0], 1)}")
        return ds

    with ThreadPoolExecutor(2) as pool:  # two sizes at a time (the kernel releases the GIL)
        parts = list(pool.map(one_size, sizes[::-1]))[::-1]  # the slowest (largest) first
    critical = xr.concat(parts, dim="n_features", combine_attrs="override")
    result = {"curves": curves, "frontier": frontier, "critical": critical}
    return publish(result, out, "scaling_laws", plot)


def _error_bars(c, ok) -> np.ndarray:
    """(2, n) distances from B_crit to its fit interval's ends, for the reached targets ``ok``."""
    b = c.b_crit.values[ok]
    return np.abs(np.stack([b - c.b_crit_fit_lo.values[ok], c.b_crit_fit_hi.values[ok] - b]))


def plot(result: dict, path: str) -> None:
    """Two rows of three panels (module docstring): risk curves, iso-FLOP curves, d*(F); B_crit
    against the target, against the data E_min, and against d."""
    curves, front, crit = result["curves"], result["frontier"], result["critical"]
    fig, ax = plt.subplots(2, 3, figsize=(16, 9.5))
    sizes = curves.n_features.values
    colors = plt.cm.viridis(np.linspace(0, 0.9, sizes.size))
    a = ax[0, 0]
    for d, col in zip(sizes, colors):
        c = curves.loss.sel(n_features=d)
        k = c.step.values
        style.draw(a, k[k > 0], c.values[k > 0], source="exact", color=col, label=f"d = {int(d)}")
    a.set(xscale="log", yscale="log", xlabel="step k (B = 1)", ylabel="expected risk P(θ_k)",
          title="(a) PLRF risk, SGD at half the stable rate")
    a.legend(fontsize=7, ncol=2)
    a = ax[0, 1]
    fl = front.flops.values
    fcol = plt.cm.plasma(np.linspace(0, 0.9, fl.size))
    for j, f in enumerate(fl):
        L = front.loss.isel(flops=j).values
        ok = np.isfinite(L)
        a.plot(front.n_features.values[ok], L[ok], color=fcol[j], lw=1)
    good = ~front.at_grid_end.values
    a.plot(front.d_opt.values[good], front.loss_opt.values[good], "k*", ms=7, label="iso-FLOP minimum d*(F)")
    a.set(xscale="log", yscale="log", xlabel="model size d", ylabel="risk at budget F = d·B·steps",
          title="(b) iso-FLOP curves (colour: F, low to high)")
    a.legend(fontsize=8)
    a = ax[0, 2]
    a.plot(fl[good], front.d_opt.values[good], "ko", ms=4, label="d*(F), exact risks")
    a.plot(fl[~good], front.d_opt.values[~good], "o", mfc="none", mec="0.6", ms=4, label="at the grid end (not fitted)")
    xi, xt = front.attrs["xi"], front.attrs["xi_theory"]
    if np.isfinite(xi) and good.sum() >= 2:
        f0, d0 = fl[good][0], front.d_opt.values[good][0]
        a.plot(fl[good], d0 * (fl[good] / f0) ** xi, "k-", lw=1, label=f"FITTED: d* ∝ F^{xi:.3f}")
        a.plot(fl[good], d0 * (fl[good] / f0) ** xt, "r--", lw=1,
               label=f"theory (Phase {front.attrs.get('phase', '?')}): F^{xt:.3f}")
    a.set(xscale="log", yscale="log", xlabel="FLOP budget F", ylabel="compute-optimal d*",
          title=f"(c) d*(F), α = {front.attrs['alpha']:g}, β = {front.attrs['beta']:g}")
    a.legend(fontsize=8)
    tg = crit.target.values
    top = matplotlib.transforms.blended_transform_factory  # inf drawn at the top edge: (x in data, y in axes)
    for i, (d, col) in enumerate(zip(crit.n_features.values, colors)):
        c = crit.sel(n_features=d)
        ok = np.isfinite(c.b_crit.values)
        ax[1, 0].errorbar(tg[ok], c.b_crit.values[ok], yerr=_error_bars(c, ok), color=col, marker="o", ms=3, lw=1,
                          capsize=2, label=f"d = {int(d)}")
        ax[1, 0].plot(tg[~ok], np.full((~ok).sum(), 0.97 - 0.035 * i), "^", color=col, ms=5,
                      transform=top(ax[1, 0].transData, ax[1, 0].transAxes))
        unreached = f" ({(~ok).sum()} not reached)" if (~ok).any() else ""
        ax[1, 1].plot(c.e_min.values[ok], c.b_crit.values[ok], "o-", color=col, ms=3, lw=1,
                      label=f"d = {int(d)}{unreached}")
    ax[1, 0].set(xscale="log", yscale="log", xlabel="target loss (lower: more data)", ylabel="B_crit (fit ± interval)",
                 title="(d) B_crit vs target")
    ax[1, 0].invert_xaxis()
    ax[1, 0].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax[1, 1].set(xscale="log", yscale="log", xlabel="data: E_min = S_min·B_crit examples",
                 ylabel="B_crit", title="(e) B_crit vs data (Zhang et al. 2024's axis)")
    ax[1, 0].plot([], [], "^", color="0.4", ms=5, label="target not reached: B_crit = inf")
    ax[1, 0].legend(fontsize=7, ncol=2)
    ax[1, 1].legend(fontsize=7)
    a = ax[1, 2]
    tcol = plt.cm.cividis(np.linspace(0, 0.9, tg.size))
    for i, (t, col) in enumerate(zip(tg, tcol)):
        c = crit.sel(target=t)
        ok = np.isfinite(c.b_crit.values)
        a.errorbar(crit.n_features.values[ok], c.b_crit.values[ok], yerr=_error_bars(c, ok), color=col, marker="s",
                   ms=3, lw=1, capsize=2, label=f"target {t:.2g}")
        a.plot(crit.n_features.values[~ok], np.full((~ok).sum(), 0.97 - 0.035 * i), "^", color=col, ms=5,
               transform=top(a.transData, a.transAxes))
    a.plot([], [], "^", color="0.4", ms=5, label="not reached at this d: inf")
    a.set(xscale="log", yscale="log", xlabel="model size d", ylabel="B_crit", title="(f) B_crit vs d at fixed target")
    a.legend(fontsize=7)
    for a in (ax[0, 1], ax[1, 2]):  # minor tick labels of a short log axis overlap
        a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.suptitle("power-law random features, exact: risk curves, compute-optimal frontier, and the critical batch "
                 "size against data and model size (SGD tuned per batch size)", fontsize=11)
    style.save(fig, path)


def summary(res) -> str:
    """B_crit per (model size, target) and the fitted frontier exponent."""
    f = res["frontier"].attrs
    b = res["critical"].b_crit.to_pandas()
    return (f"d*(F) ~ F^{f['xi']:.3f}, loss ~ F^-{f['eta']:.3f} (fitted); theory (Phase {f.get('phase', '?')}, "
            f"Paquette et al. 2024) F^{f['xi_theory']:.3f}, F^-{f['eta_theory']:.3f}\n"
            f"B_crit (rows d, columns target):\n{b.round(1).to_string()}")


def main(argv=None):
    """The command line ``python -m studies run scaling_laws`` (``-h`` lists the flags).

    Args:
        argv: the flags (default: ``sys.argv[1:]``).

    Returns:
        the study's results, as :func:`run` returns them.
    """
    return command(__doc__, run, "scaling_laws", argv, summary=summary)


if __name__ == "__main__":
    main()
