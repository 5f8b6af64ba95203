"""Is the gradient covariance the Hessian?  Rayleigh quotients v^T H v against v^T C v along chosen
directions of real networks (Grosse's CSC 2541 Lecture 7, the "Noisy Quadratic Model" slide on
H = C: the scatter along K-FAC eigenvectors; the NQM assumes the noise covariance is aligned with,
and proportional to, the curvature).

For a model on the cross-entropy loss the gradient covariance C (per-example, centred) approaches
the Fisher and so the Gauss-Newton part of the Hessian near a good fit; far from it, and along
directions of negative or tiny curvature, they differ.  Measured on the digits for an MLP and a
LeNet-style CNN, at initialisation and after SGD training, along three kinds of unit directions:

* the top Hessian eigenvectors (Lanczos, :func:`deepmodels.hessian.top_eigenpairs`);
* the top eigenvectors of C (from the per-example gradients, by a thin SVD);
* random directions.

Each panel is a log-log scatter of v^T H v (x) against v^T C v (y) with the line y = x; the title
gives the correlation of the logarithms over the directions with positive curvature.

    python -m studies run hessian_vs_covariance            # 20 directions of each kind, 512 examples
    python -m studies run hessian_vs_covariance --quick    # 8 directions, 256 examples
    python -m studies run hessian_vs_covariance --full     # 50 directions, all training examples

Writes ``hessian_vs_covariance.nc`` and ``hessian_vs_covariance.png``.

References:
    R. Grosse, "CSC 2541: Neural Net Training Dynamics", Lecture 7 "Stochasticity and Parallelism",
    University of Toronto, Winter 2022.
"""

from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from deepmodels import data, hessian, models, pergrad
from deepmodels.train import train
from toymodels.schema import attach_attrs

from . import style
from ._io import command, publish

KINDS = {"hessian": ("top Hessian eigenvectors", "C3"), "covariance": ("top covariance eigenvectors", "C0"),
         "random": ("random directions", "0.5")}
SCALES = {"quick": dict(k=8, n_examples=256, n_steps=100, width=4, hidden=(32,)),
          "default": dict(k=20, n_examples=512, n_steps=300, width=8, hidden=(64,)),
          "full": dict(k=50, n_examples=None, n_steps=1000, width=16, hidden=(128, 128))}


def _networks(cfg):
    return {"mlp": (models.mlp(64, 10, cfg["hidden"], seed=0), True),
            "cnn": (models.cnn(1, 10, 8, width=cfg["width"], seed=0), False)}


def _directions(model, x, y, k: int, seed: int) -> dict:
    """``{kind: (k, P) tensor}``: top Hessian eigenvectors, top covariance eigenvectors, random."""
    _, v_h = hessian.top_eigenpairs(model, F.cross_entropy, x, y, k, seed=seed)
    G = pergrad.flatten(pergrad.per_example_grads(model, F.cross_entropy, x, y))
    _, _, vt = torch.linalg.svd(G - G.mean(0), full_matrices=False)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rand = torch.randn(k, G.shape[1], generator=gen, dtype=G.dtype).to(G.device)
    return {"hessian": v_h, "covariance": vt[:k], "random": rand}


def _measure(model, x, y, k, seed) -> xr.Dataset:
    dirs = _directions(model, x, y, k, seed)
    parts = [hessian.rayleigh_quotients(model, F.cross_entropy, x, y, v)[["curvature", "noise_variance"]]
             .drop_attrs().expand_dims(curve=[kind]) for kind, v in dirs.items()]
    return xr.concat(parts, dim="curve")


def log_correlation(curvature, noise) -> float:
    """Correlation of log v^T H v with log v^T C v over the directions with both positive."""
    c, n = np.ravel(curvature), np.ravel(noise)
    ok = (c > 0) & (n > 0)
    return float(np.corrcoef(np.log(c[ok]), np.log(n[ok]))[0, 1]) if ok.sum() > 2 else float("nan")


def run(*, scale: str = "default", out: str = "results", progress: bool = True, seed: int = 0) -> xr.Dataset:
    """Measure both networks at initialisation and after training; writes the netCDF file and the
    figure and returns a Dataset over ``(case, curve, mode)``."""
    if scale not in SCALES:
        raise ValueError(f"`scale` must be one of {tuple(SCALES)}; got {scale!r}.")
    cfg = SCALES[scale]
    cases = []
    for name, (model, flat) in _networks(cfg).items():
        d = data.digits(seed=0, flatten=flat)
        n = d.x_train.shape[0] if cfg["n_examples"] is None else cfg["n_examples"]
        x, y = d.x_train[:n].double(), d.y_train[:n]
        model = model.double()
        cases.append(_measure(model, x, y, cfg["k"], seed).expand_dims(case=[f"{name}, init"]))
        train(model, data.Dataset(d.x_train.double(), d.y_train, d.x_test.double(), d.y_test, d.n_classes, d.name),
              lr=0.1, batch_size=32, n_steps=cfg["n_steps"], probe_at=[0], progress=progress, seed=seed)
        with torch.no_grad():
            acc = float((model(d.x_train.double()).argmax(1) == d.y_train).double().mean())
        cases.append(_measure(model, x, y, cfg["k"], seed).expand_dims(case=[f"{name}, trained ({acc:.0%} train acc.)"]))
    result = xr.concat(cases, dim="case")
    attach_attrs(result, model="mlp_cnn", source="measurement", data="digits", scale=scale, k=cfg["k"],
                 n_examples=float(cfg["n_examples"] or -1), n_steps=cfg["n_steps"], lr=0.1, batch_size=32.0, seed=seed)
    return publish(result, out, "hessian_vs_covariance", plot)


def plot(result: xr.Dataset, path: str) -> None:
    """One log-log panel per case (network, before or after training): v^T C v against v^T H v for each
    kind of direction (top Hessian eigenvectors, top covariance eigenvectors, random), directions of
    non-positive curvature left out, with the line C = H and the correlation of the logarithms."""
    cases = list(result.case.values)
    fig, axes = style.figure(len(cases), width=4.2, height=4.2)
    for ax, case in zip(axes, cases):
        r = result.sel(case=case)
        pos = r.curvature.values > 0
        lo = np.nanmin(np.where(pos, np.minimum(r.curvature.values, r.noise_variance.values), np.nan))
        hi = np.nanmax(np.maximum(r.curvature.values, r.noise_variance.values))
        for kind, (label, color) in KINDS.items():
            k = r.sel(curve=kind)
            keep = k.curvature.values > 0
            style.draw(ax, k.curvature.values[keep], k.noise_variance.values[keep], source="measurement", color=color,
                       label=label)
        ax.plot([lo, hi], [lo, hi], ":", color="k", lw=1, label="C = H")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("v^T H v")
        ax.set_ylabel("v^T C v")
        rho = log_correlation(r.curvature.values, r.noise_variance.values)
        ax.set_title(f"{case}\ncorr(log) = {rho:.2f}", fontsize=9)
    axes[0].legend(fontsize=7)
    style.save(fig, path)


def summary(res) -> str:
    """Per case, the correlation of log v^T H v with log v^T C v (:func:`log_correlation`) and the median
    ratio C / H over the directions of positive curvature, one line each."""
    lines = []
    for case in res.case.values:
        r = res.sel(case=case)
        ratio = np.nanmedian(r.noise_variance.values / np.where(r.curvature.values > 0, r.curvature.values, np.nan))
        lines.append(f"{case}: corr(log H, log C) = {log_correlation(r.curvature.values, r.noise_variance.values):.2f}, "
                     f"median C/H = {ratio:.3g}")
    return "\n".join(lines)


def main(argv=None):
    """The command line ``python -m studies run hessian_vs_covariance`` (``-h`` lists the flags): run at
    the scale the flags choose, print the correlations of :func:`summary` and the files written.

    Args:
        argv: the flags (default: ``sys.argv[1:]``).

    Returns:
        the study's results, as :func:`run` returns them.
    """
    return command(__doc__, run, "hessian_vs_covariance", argv, summary=summary)


if __name__ == "__main__":
    main()
