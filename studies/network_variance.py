"""Gradient variance along training of real networks for four gradient-mean estimators (Faghri et al.
2020, Sec. 4.1, Fig. 2-3): does the variance rise or fall as a network learns, and how much do
SG-2B, SVRG and gradient clustering remove?

An MLP and a LeNet-style CNN are trained on scikit-learn's digits by SGD (B = 32).  At log-spaced
steps the per-example gradients of a fixed set of training examples (the "data set" the estimators
sample from) give, exactly (:func:`toymodels.estimators.estimator_stats`, Prop. 3.1), the average
variance and the normalized variance of:

* SG-B, the mini-batch mean of B examples, and SG-2B (half SG-B's variance);
* SVRG with its snapshot refreshed every ``update_every`` steps (a copy of the network);
* GC, gradient clustering with B clusters on the flattened per-example gradients (Alg. 1-3),
  re-clustered at every measurement, and GC with rank-1 per-layer centres (App. B.1,
  :class:`deepmodels.cluster.Rank1Clustering`).

    python -m studies run network_variance            # 1500 steps, 512 examples
    python -m studies run network_variance --quick    # 300 steps, 256 examples
    python -m studies run network_variance --full     # 5000 steps, every training example

Writes ``network_variance.nc`` and ``network_variance.png``.

References:
    F. Faghri, D. Duvenaud, D. J. Fleet and J. Ba, "A Study of Gradient Variance in Deep Learning",
    2020.
"""

from __future__ import annotations

import copy

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import xarray as xr  # noqa: E402

from deepmodels import data, models, probes  # noqa: E402
from deepmodels.cluster import Rank1Clustering  # noqa: E402
from deepmodels.train import probe_steps  # noqa: E402
from toymodels.schema import attach_attrs  # noqa: E402
from toymodels.stats import gradient_statistics  # noqa: E402

from . import style  # noqa: E402
from ._io import command, publish  # noqa: E402

ESTIMATORS = {"sg_b": ("SG-B", "C0"), "sg_2b": ("SG-2B", "C1"), "svrg": ("SVRG", "C2"), "gc": ("GC", "C3"),
              "gc_rank1": ("GC, rank-1 centres", "C4")}
SCALES = {"quick": dict(n_steps=300, n_examples=256, n_probes=6, update_every=100, width=4, hidden=(32,)),
          "default": dict(n_steps=1500, n_examples=512, n_probes=10, update_every=500, width=8, hidden=(64, 64)),
          "full": dict(n_steps=5000, n_examples=None, n_probes=15, update_every=1000, width=16, hidden=(128, 128))}
BATCH_SIZE, LR = 32, 0.05


def _measure(model, snapshot, x, y, seed) -> xr.Dataset:
    ds = probes.estimator_stats(model, F.cross_entropy, x, y, BATCH_SIZE, snapshot=snapshot, seed=seed)
    g2 = ds.attrs["grad_norm_sq"]
    ds = ds[["grad_var", "grad_nvar"]].drop_attrs()
    gc1 = Rank1Clustering(model, BATCH_SIZE, seed=seed).fit(F.cross_entropy, x, y)
    trace = gc1.variance(F.cross_entropy, x, y)  # tr Cov of the GC estimator (Prop. 3.1)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    st = gradient_statistics(g2, trace, n_params, 1)  # the estimator's own variance: no 1 / B
    row = xr.Dataset({v: ("estimator", [float(st[v])]) for v in ("grad_var", "grad_nvar")},
                     coords={"estimator": ["gc_rank1"]})
    return xr.concat([ds, row], dim="estimator")


def _train(name, model, d, cfg, seed):
    n = d.x_train.shape[0] if cfg["n_examples"] is None else cfg["n_examples"]
    x, y = d.x_train[:n], d.y_train[:n]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    at = set(probe_steps(cfg["n_steps"], n_log=cfg["n_probes"]).tolist())
    rows, steps, losses, snapshot = [], [], [], copy.deepcopy(model)
    for k in range(cfg["n_steps"] + 1):
        if k in at:  # measured before a refresh: SVRG's variance with the snapshot it has been using
            rows.append(_measure(model, snapshot, x, y, seed))
            steps.append(k)
            with torch.no_grad():
                losses.append(float(F.cross_entropy(model(d.x_train), d.y_train)))
        if k % cfg["update_every"] == 0:
            snapshot = copy.deepcopy(model)
        if k == cfg["n_steps"]:
            break
        idx = torch.randint(0, d.x_train.shape[0], (BATCH_SIZE,), generator=gen)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(d.x_train[idx]), d.y_train[idx]).backward()
        opt.step()
    ds = xr.concat(rows, dim=xr.DataArray(np.array(steps), dims="step"))
    ds["loss"] = ("step", np.array(losses))
    return ds.expand_dims(case=[name])


def run(*, scale: str = "default", out: str = "results", progress: bool = True, seed: int = 0) -> xr.Dataset:
    """Train both networks with the estimators measured along the way; writes the netCDF file and
    the figure and returns a Dataset over ``(case, estimator, step)``."""
    if scale not in SCALES:
        raise ValueError(f"`scale` must be one of {tuple(SCALES)}; got {scale!r}.")
    cfg = SCALES[scale]
    nets = {"MLP": (models.mlp(64, 10, cfg["hidden"], seed=seed), data.digits(seed=0)),
            "CNN": (models.cnn(1, 10, 8, width=cfg["width"], seed=seed), data.digits(seed=0, flatten=False))}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(nets), desc="network variance", unit="network")
    parts = []
    for name, (model, d) in nets.items():
        parts.append(_train(name, model, d, cfg, seed))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    result = xr.concat(parts, dim="case")
    attach_attrs(result, model="mlp_cnn", source="measurement", data="digits", scale=scale, batch_size=float(BATCH_SIZE),
                 lr=LR, update_every=cfg["update_every"], n_examples=float(cfg["n_examples"] or -1), seed=seed,
                 n_clusters=float(BATCH_SIZE))
    return publish(result, out, "network_variance", plot)


def plot(result: xr.Dataset, path: str) -> None:
    """One row per network: the estimators' average variance, their normalized variance and the
    training loss along training, the probe interval with the loss's largest drop shaded in all three."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    cases = list(result.case.values)
    fig, axes = plt.subplots(len(cases), 3, figsize=(14.0, 3.9 * len(cases) + 0.7), squeeze=False)
    b = result.attrs["batch_size"]
    for c, case in enumerate(cases):
        r = result.sel(case=case)
        k = r.step.values
        keep = k > 0
        loss = r.loss.values
        i = int(np.argmax(-np.diff(loss[keep])))  # probes are log-spaced: the steepest stretch on a log axis
        fast = k[keep][i], k[keep][i + 1]
        var_ax, nvar_ax, loss_ax = axes[c]
        for var, ax in (("grad_var", var_ax), ("grad_nvar", nvar_ax)):
            for est, (label, color) in ESTIMATORS.items():
                style.draw(ax, k[keep], r[var].sel(estimator=est).values[keep], source="measurement", connect=True,
                           color=color, label=label)
            ax.set_yscale("log")
        style.draw(loss_ax, k[keep], loss[keep], source="measurement", connect=True, color="k", label="training loss")
        for ax in axes[c]:
            ax.axvspan(*fast, color="0.88", zorder=0)
            ax.set_xscale("log")
            ax.set_xlabel("step")
        var_ax.set_ylabel("average variance per parameter,\ntr Cov(ĝ) / P")
        nvar_ax.set_ylabel("normalized variance, tr Cov(ĝ) / E|ĝ|²")
        loss_ax.set_ylabel("training loss (cross-entropy, nats)")
        var_ax.set_title(f"{case}: variance of the gradient-mean estimate ĝ", fontsize=10)
        nvar_ax.set_title(f"{case}: normalized variance of ĝ", fontsize=10)
        loss_ax.set_title(f"{case}: training loss on all training examples", fontsize=10)
        loss_ax.set_ylim(bottom=0)
    handles = [Line2D([], [], color=color, marker="o", ms=4, lw=0.8, label=label) for label, color in ESTIMATORS.values()]
    handles += [Patch(color="0.88", label="largest loss drop between probes")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False,
               title=f"estimators of the mean gradient, B = {b:g} (all measured)", title_fontsize=9)
    fig.suptitle(f"gradient-mean estimators along SGD training on the digits (B = {b:g}, lr {result.attrs['lr']:g}; "
                 "Faghri et al. Fig. 2-3)", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(res) -> str:
    """The average variance per estimator (rows) and probe step (columns), one table per network."""
    lines = ["average variance (rows: estimator, columns: step):"]
    for case in res.case.values:
        lines += [case, res.grad_var.sel(case=case).to_pandas().to_string(float_format="%.3g")]
    return "\n".join(lines)


def main(argv=None):
    """The command line ``python -m studies run network_variance`` (``-h`` lists the flags): run at the
    scale the flags choose, print the variance tables and the files written.

    Args:
        argv: the flags (default: ``sys.argv[1:]``).

    Returns:
        the study's results, as :func:`run` returns them.
    """
    return command(__doc__, run, "network_variance", argv, summary=summary)


if __name__ == "__main__":
    main()
