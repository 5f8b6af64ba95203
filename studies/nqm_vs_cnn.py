"""Theory meets practice: a CNN's measured steps to target per batch size beside the prediction of
an NQM fitted to the same CNN, and the measured gradient statistics beside the NQM's (Grosse's
CSC 2541 Lecture 7, "Noisy Quadratic Model: Empirical Results"; Zhang et al. 2019; Shallue et
al. 2019; McCandlish et al. 2018).

1. Measured: a LeNet-style CNN on scikit-learn's digits, SGD and heavy-ball momentum (0.9), for each
   batch size the best learning rate of a grid (median over seeds) to reach a training loss target
   (``deepmodels.steps.measure_steps``; runs resume from per-run files, ``--scheduler`` runs them on
   dask).
2. Predicted: an NQM fitted to the CNN at initialisation (``deepmodels.bridge.fit_nqm``: top Hessian
   eigenpairs by Lanczos, gradient noise along them, power-law tails), its tuned steps per batch size
   for SGD and momentum, calibrated by the measured SGD point at the smallest batch size that reached
   the target.
3. Critical batch sizes: S = S_min (1 + B_crit / B) fitted to every curve, beside the measured noise
   scale B_simple at initialisation.
4. Gradient statistics along training at one batch size (normalized variance and noise scale),
   measured by the probe, beside the fitted NQM's and a fitted linear regression's (same curvature
   and distance, label noise fitted to the measured noise) along their own trajectories: does the
   variance rise or fall during training?

    python -m studies run nqm_vs_cnn --quick                  # the CNN on digits, about a minute on CPU
    python -m studies run nqm_vs_cnn --quick --network mlp1d  # an MLP on MNIST-1D
    python -m studies run nqm_vs_cnn                          # batch sizes 1..128, 6 learning rates
    python -m studies run nqm_vs_cnn --full --scheduler local # 1..256, 7 learning rates, 3 seeds (hours on CPU)

Writes ``nqm_vs_<network>.nc`` (groups measured, predicted, probe, nqm_stats, linreg_stats) and
``nqm_vs_<network>.png``.

References:
    R. Grosse, "CSC 2541: Neural Net Training Dynamics", Lecture 7 "Stochasticity and Parallelism",
    University of Toronto, Winter 2022.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from deepmodels import bridge, data, probes, steps
from deepmodels.models import Factory
from deepmodels.train import probe_steps, train
from toymodels import SGD
from toymodels.schema import attach_attrs
from toymodels.stats import fit_critical_batch

from . import style
from ._io import parser, publish, scale_of

CONFIG = {
    "tiny": dict(batch_sizes=[4, 32], lrs=[0.05, 0.2, 0.5], seeds=[0], target=0.8, max_steps=400, eval_every=10,
                 width=4, probe_batch=32, probe_steps=60, k=8),  # for the tests
    "quick": dict(batch_sizes=[2, 8, 32, 128], lrs=list(np.geomspace(0.01, 0.5, 5)), seeds=[0], target=0.3,
                  max_steps=1500, eval_every=10, width=8, probe_batch=32, probe_steps=600, k=20),
    "default": dict(batch_sizes=[1, 2, 4, 8, 16, 32, 64, 128], lrs=list(np.geomspace(0.01, 1.0, 6)), seeds=[0],
                    target=0.2, max_steps=2000, eval_every=10, width=8, probe_batch=32, probe_steps=1000, k=20),
    "full": dict(batch_sizes=[1, 2, 4, 8, 16, 32, 64, 128, 256], lrs=list(np.geomspace(0.003, 1.0, 7)),
                 seeds=[0, 1, 2], target=0.1, max_steps=4000, eval_every=10, width=16, probe_batch=32,
                 probe_steps=3000, k=40),
}


NETWORKS = {
    # name: (data, model factory given the width, label)
    "cnn": (lambda: data.digits(seed=0, flatten=False), lambda w: Factory("cnn", 1, 10, 8, width=w), "CNN on digits"),
    "mlp1d": (lambda: data.mnist1d(n_samples=4000, seed=0), lambda w: Factory("mlp", 40, 10, (8 * w, 8 * w)),
              "MLP on MNIST-1D"),
}


def run(*, scale: str = "default", out: str = "results", scheduler=None, progress: bool = True,
        network: str = "cnn"):
    """Measure, fit, predict; write the netCDF file and the figure (``nqm_vs_<network>.*``).

    ``scale``: "tiny" (tests), "quick", "default" or "full"; ``network``: "cnn" (LeNet-style CNN on
    the digits) or "mlp1d" (MLP on MNIST-1D); ``scheduler``: run the training runs as dask tasks
    (``"local"``, an address or a Client; see :func:`toymodels.parallel.run_tasks`).
    """
    if scale not in CONFIG:
        raise ValueError(f"`scale` must be one of {tuple(CONFIG)}; got {scale!r}.")
    if network not in NETWORKS:
        raise ValueError(f"`network` must be one of {tuple(NETWORKS)}; got {network!r}.")
    cfg = dict(CONFIG[scale])
    if network == "mlp1d":  # MNIST-1D is harder: training-loss targets the MLP reaches in the step budget
        cfg["target"] = {"tiny": 1.8, "quick": 1.4, "default": 1.2, "full": 1.0}[scale]
    quick = scale
    os.makedirs(out, exist_ok=True)
    make_data, make_factory, label = NETWORKS[network]
    d = make_data()
    factory = make_factory(cfg["width"])
    measured = {}
    for name, mom in (("sgd", 0.0), ("momentum", 0.9)):
        measured[name] = steps.measure_steps(
            factory, d, batch_sizes=cfg["batch_sizes"], lrs=cfg["lrs"], momenta=[mom], seeds=cfg["seeds"],
            target=cfg["target"], max_steps=cfg["max_steps"], eval_every=cfg["eval_every"],
            path=os.path.join(out, f"nqm_vs_{network}_runs_{scale}_{name}"), executor=scheduler or "serial",
            progress=progress)
    # the NQM fitted at initialisation, on a fixed batch of the training set
    model = factory(0).double()
    xb, yb = d.x_train[:512].double(), d.y_train[:512]
    fit = bridge.fit_nqm(model, F.cross_entropy, xb, yb, k=cfg["k"])
    with torch.no_grad():
        l0 = float(F.cross_entropy(model(d.x_train.double()), d.y_train))
    fraction = cfg["target"] / l0  # the same relative target for the NQM
    nqm_target = fraction * fit.nqm.initial_loss
    # calibrate at the smallest batch size whose measured SGD steps are finite
    finite = np.flatnonzero(np.isfinite(measured["sgd"].steps_best.values))
    j0 = int(finite[0]) if finite.size else 0
    b0 = cfg["batch_sizes"][j0]
    s0 = float(measured["sgd"].steps_best.values[j0])
    predicted = {}
    for name in ("sgd", "momentum"):
        predicted[name] = bridge.predict_steps(fit, cfg["batch_sizes"], nqm_target, family=name,
                                               calibrate=(b0, s0) if np.isfinite(s0) else None)
    # measured noise scale at initialisation
    init_stats = probes.gradient_stats(factory(0), F.cross_entropy, d.x_train[:512], d.y_train[:512])
    b_simple = float(init_stats.noise_scale.sel(layer="total"))
    # gradient statistics along training at one batch size vs the NQM's along its trajectory
    bs = cfg["probe_batch"]
    best_lr = float(measured["sgd"].lr_opt.sel(batch_size=float(bs), method="nearest"))
    probe = train(factory(0), d, lr=best_lr if np.isfinite(best_lr) else 0.1, batch_size=bs,
                  n_steps=cfg["probe_steps"], probe_at=probe_steps(cfg["probe_steps"], n_log=15), probe_size=256,
                  progress=progress)
    nqm_lr = float(predicted["sgd"].lr_opt.sel(batch_size=float(bs), method="nearest"))
    nqm_stats = fit.nqm.gradient_stats(SGD(nqm_lr), bs, probe.step.values)
    # linear regression with the same curvature and distance, its label noise fitted to the measured
    # noise: its gradient noise falls with the risk (the NQM's does not)
    lin, _ = bridge.fit_linreg(fit)
    lin_lr = min(nqm_lr, 0.5 * lin.stable_lr(SGD(1.0), bs))
    lin_stats = lin.gradient_stats(SGD(lin_lr), bs, probe.step.values)
    result = _assemble(measured, predicted, probe, nqm_stats, fit, b_simple, cfg, quick, network, label)
    lin_stats = lin_stats[["loss", "grad_norm_sq", "grad_var", "grad_nvar", "snr", "noise_scale"]].drop_attrs()
    attach_attrs(lin_stats, model="linreg", source="exact", lr=lin_lr, noise_std=fit.report["linreg_noise_std"])
    result["linreg_stats"] = lin_stats
    return publish(result, out, f"nqm_vs_{network}", plot)


def _assemble(measured, predicted, probe, nqm_stats, fit, b_simple, cfg, quick, network, label):
    # lr_eff_opt: the effective learning rate lr / (1 - beta) (the learning rate itself for SGD)
    meas = xr.concat([m[["steps_best", "lr_opt", "lr_eff_opt"]].expand_dims(optimizer=[n])
                      for n, m in measured.items()], dim="optimizer")
    pred = xr.concat([p[["steps_to_target", "lr_opt"]].assign(lr_eff_opt=p.get("lr_eff_opt", p.lr_opt))
                      .expand_dims(optimizer=[n]) for n, p in predicted.items()], dim="optimizer")
    crit = {}
    for tag, ds, var in (("measured", meas, "steps_best"), ("predicted", pred, "steps_to_target")):
        for n in ds.optimizer.values:
            try:
                crit[f"{tag}_{n}_critical_batch_size"] = fit_critical_batch(ds.batch_size.values, ds[var].sel(optimizer=n).values)[
                    "critical_batch_size"]
            except ValueError:
                crit[f"{tag}_{n}_critical_batch_size"] = float("nan")
    common = dict(target=cfg["target"], scale=quick, noise_scale_at_init=b_simple, network=label, **crit)
    attach_attrs(meas, model=network, source="measurement", **common)
    attach_attrs(pred, model="nqm", source="exact", calibration=predicted["sgd"].attrs.get("calibration", 1.0),
                 **{k: v for k, v in fit.report.items()}, **common)
    probe = probe.drop_vars([v for v in probe.data_vars if v.endswith("_ci")])
    nqm_stats = nqm_stats.drop_attrs()
    attach_attrs(nqm_stats, model="nqm", source="exact", lr=float(predicted["sgd"].lr_opt.values[0]))
    return {"measured": meas, "predicted": pred, "probe": probe, "nqm_stats": nqm_stats}


def plot(result, path):
    """Steps vs batch size (measured markers, fitted NQM lines); normalized variance and noise scale
    along training (measured markers, NQM and linear-regression lines)."""
    meas, pred, probe, nq = result["measured"], result["predicted"], result["probe"], result["nqm_stats"]
    lin = result.get("linreg_stats")
    fig, (ax1, ax2, ax3) = style.figure(3)
    colors = {"sgd": "C0", "momentum": "C2"}
    for n in meas.optimizer.values:
        y = meas.steps_best.sel(optimizer=n).values
        b = meas.batch_size.values
        m_crit = meas.attrs.get(f"measured_{n}_critical_batch_size", np.nan)
        style.draw(ax1, b[np.isfinite(y)], y[np.isfinite(y)], source="measurement", color=colors[n],
                   label=f"{meas.attrs['network']}, {n} (B_crit {m_crit:.3g})")
        for x in b[~np.isfinite(y)]:  # not reached: inf, drawn at the top edge
            ax1.annotate("inf", (x, 1), xycoords=("data", "axes fraction"), xytext=(0, -10), textcoords="offset points",
                         ha="center", fontsize=7, color=colors[n])
        crit = pred.attrs.get(f"predicted_{n}_critical_batch_size", np.nan)
        style.draw(ax1, pred.batch_size, pred.steps_to_target.sel(optimizer=n), source="exact", color=colors[n],
                   label=f"fitted NQM, {n} (B_crit {crit:.3g})")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.axvline(meas.attrs["noise_scale_at_init"], color="0.5", ls=":",
                label=f"measured B_simple at step 0 (biased) = {meas.attrs['noise_scale_at_init']:.3g}")
    ax1.set_xlabel("batch size")
    ax1.set_ylabel("steps to target")
    ax1.set_title(f"{meas.attrs['network']} vs NQM fitted to it (calibration x{pred.attrs['calibration']:.3g})")
    ax1.legend(fontsize=7)
    k = probe.step.values
    keep = k > 0
    for ax, var, what in ((ax2, "grad_nvar", "normalized variance"), (ax3, "noise_scale", "noise scale B_simple")):
        est = ", biased estimate" if var == "noise_scale" else ""
        style.draw(ax, k[keep], probe[var].sel(layer="total").values[keep], source="measurement", connect=True,
                   label=f"{meas.attrs['network']}{est}")
        if var == "noise_scale" and "noise_scale_unbiased" in probe:
            style.draw(ax, k[keep], probe["noise_scale_unbiased"].sel(layer="total").values[keep], source="measurement",
                       connect=True, marker="s", mfc="none", label=f"{meas.attrs['network']}, unbiased estimate")
        style.draw(ax, k[keep], nq[var].values[keep], source="exact", label="fitted NQM, its own")
        if lin is not None:
            style.draw(ax, k[keep], lin[var].values[keep], source="exact", ls="--",
                       label="fitted linear regression, its own")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(what)
        ax.legend(fontsize=8)
    ax2.set_title(f"gradient statistics along training, B = {probe.attrs['batch_size']:g}")
    style.save(fig, path)


def main(argv=None):
    """The command line ``python -m studies run nqm_vs_cnn`` (``-h`` lists the flags): the shared flags
    and ``--network``; prints the measured steps per batch size, the predicted and measured critical
    batch sizes with the calibration factor, and the files written.

    Args:
        argv: the flags (default: ``sys.argv[1:]``).
    """
    p = parser(__doc__, scheduler=True)
    p.add_argument("--network", default="cnn", choices=tuple(NETWORKS), help="cnn (digits) or mlp1d (MNIST-1D)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    res = run(scale=scale_of(a), out=a.out, scheduler=a.scheduler, progress=not a.no_progress, network=a.network)
    print(res["measured"].steps_best.to_pandas().T.to_string())
    print({k: v for k, v in res["predicted"].attrs.items() if "critical" in k or k == "calibration"})
    print(f"wrote {a.out}/nqm_vs_{a.network}.nc and .png in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
