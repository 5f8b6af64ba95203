"""Two models of stochastic optimization: O(1/k) noise floors vs exponential convergence (Grosse's
CSC 2541 Lecture 7, "Stochastic Linear Regression", "Exponential Convergence", "Two Models of
Stochastic Optimization").

Left panel, online data (loss / L0 vs step, log-log), one spectrum lambda_i = 1/i, one SGD learning
rate, batch size 1:

  * the NQM with gradient noise independent of the parameters (C = sigma^2 H: linear regression's
    label noise alone): SGD stalls at a noise floor, and no algorithm beats the information-theoretic
    O(1/k) bound (dotted);
  * online linear regression with label noise sigma: the batch noise adds to it, same kind of floor;
  * online linear regression without label noise (a teacher the student can match): the noise
    vanishes at the optimum and the risk falls exponentially.

Middle panel, a finite data set (excess loss / L0 vs step, semi-log): SGD with replacement (exact,
with Monte Carlo with and without replacement) and randomized Kaczmarz (exact and Monte Carlo), on
interpolating data and on noisy data.  Right panel: Kaczmarz's squared error with the
Strohmer-Vershynin bound, which holds for the consistent system; label noise stalls it at a floor.

    python -m studies run interpolation            # d = 500 online, 400 x 100 data, 10^6 steps
    python -m studies run interpolation --quick    # smaller
    python -m studies run interpolation --full     # d = 2000 online, 1000 x 250 data, 10^7 steps

Writes ``interpolation.nc`` (netCDF groups ``online``, ``finite`` and ``finite_mc``) and
``interpolation.png``.

References:
    R. Grosse, "CSC 2541: Neural Net Training Dynamics", Lecture 7 "Stochasticity and Parallelism",
    University of Toronto, Winter 2022.
"""

from __future__ import annotations


import numpy as np
import xarray as xr

from toymodels import NQM, SGD, GaussianLinearRegression
from toymodels.linreg import FiniteLinearRegression
from toymodels.schema import attach_attrs

from . import style
from ._io import command, publish

SIGMA = 0.5  # label noise


def _stack(curves: dict, steps) -> xr.Dataset:
    ds = xr.concat([c.drop_attrs().expand_dims(curve=[name]) for name, c in curves.items()], dim="curve")
    return ds.assign_coords(step=np.asarray(steps))


def run_online(*, dim: int, n_steps: int) -> xr.Dataset:
    """The NQM and online linear regression with and without label noise, same lr and B = 1."""
    lam = 1.0 / np.arange(1, dim + 1)
    clean = GaussianLinearRegression(lam, w_star=1.0, noise_std=0.0)
    noisy = GaussianLinearRegression(lam, w_star=1.0, noise_std=SIGMA)
    nqm = NQM(lam, SIGMA**2 * lam, init_sq=1.0)  # linear regression's label noise, no batch noise
    lr = 0.5 * clean.stable_lr(SGD(1.0), 1)
    steps = np.unique(np.concatenate([[0], np.geomspace(1, n_steps, 200).astype(np.int64)]))
    opt = SGD(lr)
    curves = {
        "nqm": nqm.gradient_stats(opt, 1, steps)[["loss", "grad_nvar"]],
        "linreg_label_noise": noisy.gradient_stats(opt, 1, steps)[["loss", "grad_nvar"]],
        "linreg_interpolating": clean.gradient_stats(opt, 1, steps)[["loss", "grad_nvar"]],
    }
    ds = _stack(curves, steps)
    ds["loss"] = ds.loss / clean.initial_loss
    ds["loss_lower_bound"] = ("step", nqm.lower_bound_loss(steps.astype(np.float64)) / clean.initial_loss)
    attach_attrs(ds, model="linreg", source="exact", optimizer="sgd", lr=lr, batch_size=1.0, dim=dim,
                 noise_std=SIGMA, normalised_by="initial loss")
    return ds


def run_finite(*, n: int, d: int, n_steps: int, n_runs: int, seed: int = 0) -> tuple[xr.Dataset, xr.Dataset]:
    """SGD (with / without replacement) and Kaczmarz on interpolating and on noisy data: the exact
    curves and their Monte Carlo counterparts (losses divided by each data set's initial loss)."""
    spectrum = np.geomspace(1.0, 0.1, d)
    data = {
        "interpolating": FiniteLinearRegression.gaussian(n, d, spectrum=spectrum, noise_std=0.0, seed=seed),
        "noisy": FiniteLinearRegression.gaussian(n, d, spectrum=spectrum, noise_std=SIGMA, seed=seed),
    }
    steps = np.arange(0, n_steps + 1, max(1, n_steps // 100))
    mc_steps = steps[:: max(1, steps.size // 20)]
    curves, mc = {}, {}
    for name, m in data.items():
        lr = 1.0 / m.row_sq.max()  # stable at B = 1 (each row's own step is at most Kaczmarz's)

        def scaled(ds, l0=m.initial_loss):
            return ds.assign({v: ds[v] / l0 for v in ("loss", "loss_sem") if v in ds})

        curves[f"sgd_{name}"] = scaled(m.loss_curve(lr, 1, steps)).assign(sv_bound=("step", np.full(steps.size, np.nan)))
        curves[f"kaczmarz_{name}"] = scaled(m.kaczmarz_curve(steps))
        mc[f"sgd_{name}"] = scaled(m.simulate(lr, 1, mc_steps, n_runs=n_runs, seed=seed + 1))
        mc[f"sgd_{name}_epochs"] = scaled(m.simulate(lr, 1, mc_steps, replacement=False, n_runs=n_runs, seed=seed + 2))
        mc[f"kaczmarz_{name}"] = scaled(m.kaczmarz_simulate(mc_steps, n_runs=n_runs, seed=seed + 3))
    exact = _stack({k: v[["loss", "sq_error", "sv_bound"]] for k, v in curves.items()}, steps)
    sims = _stack({k: v[["loss", "loss_sem", "sq_error", "sq_error_sem"]] for k, v in mc.items()}, mc_steps)
    for ds, source in ((exact, "exact"), (sims, "simulation")):
        attach_attrs(ds, model="linreg_finite", source=source, n=n, dim=d, noise_std=SIGMA, batch_size=1.0,
                     normalised_by="initial loss", seed=seed, n_runs=n_runs if source == "simulation" else 0)
    return exact, sims


SCALES = {"quick": dict(dim=100, online_steps=10**4, n=100, d=25, finite_steps=400, n_runs=100),
          "default": dict(dim=500, online_steps=10**6, n=400, d=100, finite_steps=3000, n_runs=400),
          "full": dict(dim=2000, online_steps=10**7, n=1000, d=250, finite_steps=10_000, n_runs=1000)}


def run(*, scale: str = "default", out: str = "results", progress: bool = True) -> dict:
    """Compute all panels, write the netCDF file (groups online, finite, finite_mc) and the figure;
    returns ``{group: Dataset}``."""
    if scale not in SCALES:
        raise ValueError(f"`scale` must be one of {tuple(SCALES)}; got {scale!r}.")
    cfg = SCALES[scale]
    online = run_online(dim=cfg["dim"], n_steps=cfg["online_steps"])
    finite, finite_mc = run_finite(n=cfg["n"], d=cfg["d"], n_steps=cfg["finite_steps"], n_runs=cfg["n_runs"])
    result = {"online": online, "finite": finite, "finite_mc": finite_mc}
    return publish(result, out, "interpolation", plot)


def plot(result: dict, path: str) -> None:
    """Three panels: the online curves with the NQM's O(1/k) lower bound (log-log); the finite data set's
    excess loss under SGD and Kaczmarz, exact and Monte Carlo (semi-log); Kaczmarz's squared error with
    the Strohmer-Vershynin bound."""
    online, finite, finite_mc = result["online"], result["finite"], result["finite_mc"]
    fig, (ax1, ax2, ax3) = style.figure(3, width=5.5, height=4.5)
    k = online.step.values
    keep = k > 0
    labels = {"nqm": "NQM (noise independent of θ, C = σ²H)", "linreg_label_noise": f"linear regression, label noise σ={SIGMA}",
              "linreg_interpolating": "linear regression, no label noise"}
    for (name, label), color in zip(labels.items(), ["C0", "C1", "C2"]):
        style.draw(ax1, k[keep], online.loss.sel(curve=name).values[keep], source="exact", color=color, label=label)
    style.draw(ax1, k[keep], online.loss_lower_bound.values[keep], source="exact", ls=":", color="k",
               label="NQM lower bound, any algorithm (O(1/k))")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_ylim(max(1e-12, float(online.loss.min()) * 0.5), 2)
    ax1.set_xlabel("step k (B = 1)")
    ax1.set_ylabel("expected excess loss / L0")
    ax1.set_title(f"online, d={online.attrs['dim']}, λᵢ = 1/i, SGD lr={online.attrs['lr']:.3g}")
    ax1.legend(fontsize=7, loc="lower left")

    ks, kmc = finite.step.values, finite_mc.step.values
    for name, ls in [("interpolating", "-"), ("noisy", "--")]:
        for method, color in [("sgd", "C0"), ("kaczmarz", "C3")]:
            key = f"{method}_{name}"
            style.draw(ax2, ks, finite.loss.sel(curve=key).values, source="exact", ls=ls, color=color,
                       label=f"{'SGD (with replacement)' if method == 'sgd' else 'Kaczmarz'}, {name} data")
            style.draw(ax2, kmc, finite_mc.loss.sel(curve=key).values, source="simulation", color=color)
        style.draw(ax2, kmc, finite_mc.loss.sel(curve=f"sgd_{name}_epochs").values, source="simulation", marker="x",
                   color="C0")
    style.draw(ax2, [], [], source="simulation", color="0.4", label="with replacement")
    style.draw(ax2, [], [], source="simulation", marker="x", color="C0", label="SGD without replacement (epochs)")
    ax2.set_yscale("log")
    ax2.set_xlabel("step k (one example per step)")
    ax2.set_ylabel("expected excess training loss / L0")
    ax2.set_title(f"finite data, n={finite.attrs['n']}, d={finite.attrs['dim']}")
    ax2.legend(fontsize=7, loc="lower left")

    for name, ls in [("interpolating", "-"), ("noisy", "--")]:
        key = f"kaczmarz_{name}"
        sq0 = float(finite.sq_error.sel(curve=key).values[0])
        style.draw(ax3, ks, finite.sq_error.sel(curve=key).values / sq0, source="exact", ls=ls, color="C3",
                   label=f"Kaczmarz, {name} data")
        style.draw(ax3, kmc, finite_mc.sq_error.sel(curve=key).values / sq0, source="simulation", color="C3")
    bound = finite.sv_bound.sel(curve="kaczmarz_interpolating").values
    style.draw(ax3, ks, bound / bound[0], source="exact", ls=":", color="k", label="Strohmer–Vershynin bound (1 − 1/κ²)ᵏ")
    ax3.set_yscale("log")
    ax3.set_xlabel("step k")
    ax3.set_ylabel("E|w − w_ls|² / |w₀ − w_ls|²")
    ax3.set_title("randomized Kaczmarz: squared error")
    ax3.legend(fontsize=7, loc="lower left")
    style.save(fig, path)


def summary(res) -> str:
    """The online curves' loss / L0 at the last step, one line per curve."""
    return "online, loss / L0 at the last step:\n" + res["online"].loss.isel(step=-1).to_pandas().to_string()


def main(argv=None):
    """The command line ``python -m studies run interpolation`` (``-h`` lists the flags): run at the
    scale the flags choose, print the final online losses and the files written.

    Args:
        argv: the flags (default: ``sys.argv[1:]``).

    Returns:
        the study's results, as :func:`run` returns them.
    """
    return command(__doc__, run, "interpolation", argv, summary=summary)


if __name__ == "__main__":
    main()
