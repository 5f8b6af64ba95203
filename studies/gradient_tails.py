"""Heavy tails, Gaussianity and power-law covariance of stochastic gradients (Xie et al. 2023).

A gradient history G ``(T, P)`` holds T mini-batch gradients at fixed parameters (one row per
iteration).  On each history this study runs the tests of Xie et al. Table 1 / Table 4 -- power-law
(KS) and Gaussian (D'Agostino) pass rates of the dimension-wise gradients (rows), the iteration-wise
gradients (columns), the noise (columns of G - mean) and the dimension-wise noise (rows of
G - mean) -- and fits a power law to the covariance spectrum (Zipf exponent s, KS test, Sec. 4-5),
from the Gram matrix of the first ``n_spectrum`` rows.  Histories:

* toy models (:mod:`toymodels.history`): NQM, Gaussian linear regression and random features, at
  init, after SGD ("trained") and along the SGD trajectory itself;
* networks on the digits data (:mod:`deepmodels`): a LeNet-style CNN and a 2-hidden-layer FCN of
  width 70 (Xie's FCN without BatchNorm), and the FCN on MNIST-1D, at init and trained.

Xie's experiments: Table 1 at B = 100 (init / trained); Table 4 and the top eigenvalue ~ 1/B over a
batch-size grid (init); covariance spectra at B = 1 for trained models with label noise, with SGD,
momentum (lr 0.01, beta 0.9: SGD's effective step) or Adam (lr 1e-3), and for 2- or 5-class subsets
of the digits (10 logits kept) to count the outliers (c - 1 expected).

    python -m studies run gradient_tails            # reduced scale: T = 2000, K = 400 (spectra: 1000, 200), ~8 min
    python -m studies run gradient_tails --quick    # T = 300 (tests), ~15 s
    python -m studies run gradient_tails --full     # Xie's T = 5000, K = 1000, wider CNN, B up to 1000 (hours)

Every case is saved under ``<out>/gradient_tails_points/`` and skipped on a rerun (the file names
hold the scale and the case, not the settings of ``SCALES``: clear the folder after editing them).  Writes
``gradient_tails.nc`` (groups ``toy``, source simulation, and ``deep``, source measurement, both
over ``case`` x ``kind`` / ``rank``), ``gradient_tails.png`` (spectra) and
``gradient_tails_tests.png`` (pass rates), and prints the tables.

References:
    Z. Xie, Q.-Y. Tang, M. Sun and P. Li, "On the Overlooked Structure of Stochastic Gradients",
    NeurIPS 2023.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import xarray as xr  # noqa: E402

from deepmodels import data, models, spectra  # noqa: E402
from deepmodels.train import train  # noqa: E402
from toymodels import NQM, GaussianLinearRegression, RandomFeatures  # noqa: E402
from toymodels.history import gradient_history  # noqa: E402
from toymodels import resume  # noqa: E402
from toymodels.schema import attach_attrs  # noqa: E402
from toymodels.tails import gradient_history_tests, power_law_fit  # noqa: E402

from ._io import command, publish, settings_tag  # noqa: E402

KINDS = ("dimension", "iteration", "noise", "dimension_noise", "spectrum")
TOYS = ("nqm", "linreg", "rf")
NETS = (("cnn", "digits"), ("fcn", "digits"), ("fcn", "mnist1d"))
OPTIMIZERS = {"sgd": dict(optimizer="sgd", lr=0.1), "momentum": dict(optimizer="sgd", lr=0.01, momentum=0.9),
              "adam": dict(optimizer="adam", lr=1e-3)}
TOY_LR = {"nqm": 0.5, "linreg": 0.5, "rf": 0.05}

SCALES = {
    "quick": dict(n_iter=300, n_spectrum=300, k_power=60, k_spectrum=60, max_tests=200, table_batch=100,
                  batch_sizes=[1, 10, 100], toy_dim=400, width=8, hidden=(70, 70), n_steps=50, train_batch=128,
                  mnist1d_samples=600, label_noises=[0.8], class_subsets=[2]),
    "default": dict(n_iter=2000, n_spectrum=1000, k_power=400, k_spectrum=200, max_tests=1000, table_batch=100,
                    batch_sizes=[1, 3, 10, 30, 100, 300], toy_dim=4000, width=8, hidden=(70, 70), n_steps=150,
                    train_batch=128, mnist1d_samples=4000, label_noises=[0.4, 0.8], class_subsets=[2, 5]),
    "full": dict(n_iter=5000, n_spectrum=5000, k_power=1000, k_spectrum=1000, max_tests=None, table_batch=100,
                 batch_sizes=[1, 3, 10, 30, 100, 300, 1000], toy_dim=8000, width=16, hidden=(70, 70), n_steps=600,
                 train_batch=128, mnist1d_samples=5000, label_noises=[0.4, 0.8], class_subsets=[2, 5]),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One gradient history: a model on its data, in a state, at a batch size."""

    model: str  # nqm, linreg, rf, cnn, fcn
    data: str  # toy, digits, mnist1d
    state: str  # init, trained (by `optimizer`), trajectory (toys: along SGD from init)
    batch_size: int
    optimizer: str = "sgd"
    label_noise: float = 0.0
    n_classes: int = 10

    @property
    def name(self) -> str:
        """The case's identifier, e.g. ``"cnn-digits-init-sgd-noise0-c10-B1"``: its coordinate in the
        results and the name of its resume file."""
        return (f"{self.model}-{self.data}-{self.state}-{self.optimizer}-noise{self.label_noise:g}-c{self.n_classes}"
                f"-B{self.batch_size}")


FIELDS = [f.name for f in dataclasses.fields(Case)]


def _cases(cfg) -> tuple[list[Case], list[Case]]:
    """(toy cases, network cases), without duplicates."""
    b, grid = cfg["table_batch"], cfg["batch_sizes"]
    toy = [Case(m, "toy", s, b) for m in TOYS for s in ("init", "trained", "trajectory")]
    toy += [Case(m, "toy", "init", g) for m in TOYS for g in grid]
    deep = [Case(m, d, s, g) for m, d in NETS for s in ("init", "trained") for g in (b, 1)]
    deep += [Case("cnn", "digits", "init", g) for g in grid]
    deep += [Case("cnn", "digits", "trained", 1, optimizer=o) for o in ("momentum", "adam")]
    deep += [Case("cnn", "digits", "trained", 1, label_noise=x) for x in cfg["label_noises"]]
    deep += [Case("cnn", "digits", s, 1, n_classes=c) for c in cfg["class_subsets"] for s in ("init", "trained")]
    return list(dict.fromkeys(toy)), list(dict.fromkeys(deep))


# ------------------------------------------------------------------------------------- toy models
def _toy(name: str, dim: int):
    """(model, theta_0) with P = dim: power-law spectra h_i = c_i = lambda_i = i^-1 (NQM from
    theta_0 ~ N(0, I), regression from w = 0 with label noise 0.5); random features with 1000
    examples of 20 inputs and dim features, from theta_2 = 0."""
    if name == "nqm":
        return NQM.power_law(dim), np.random.default_rng(0).standard_normal(dim)
    if name == "linreg":
        return GaussianLinearRegression.power_law(dim, noise_std=0.5), np.zeros(dim)
    return RandomFeatures(1000, 20, 10, dim, seed=0), np.zeros(dim)


def _toy_history(case: Case, cfg):
    """(G, training accuracy or NaN)."""
    model, theta = _toy(case.model, cfg["toy_dim"])
    lr, n = TOY_LR[case.model], cfg["n_iter"]
    if case.state != "init":  # the SGD trajectory from theta_0, B = table batch, as long as the history
        traj = gradient_history(model, theta, batch_size=cfg["table_batch"], n_iter=n, lr=lr, seed=2)
        if case.state == "trajectory":
            return traj, math.nan
        theta = theta - lr * traj.sum(axis=0)
    G = gradient_history(model, theta, batch_size=case.batch_size, n_iter=n, seed=1)
    return G, model.accuracy(theta) if isinstance(model, RandomFeatures) else math.nan


# ---------------------------------------------------------------------------------------- networks
def _subset(d: data.Dataset, n_classes: int) -> data.Dataset:
    """The examples of the first ``n_classes`` classes (the network keeps its 10 logits)."""
    tr, te = d.y_train < n_classes, d.y_test < n_classes
    return data.Dataset(d.x_train[tr], d.y_train[tr], d.x_test[te], d.y_test[te], n_classes, d.name)


@functools.lru_cache(maxsize=None)
def _network(case: Case, scale: str):
    """(network, its training data, training accuracy or NaN) for ``case`` (its batch size ignored)."""
    cfg = SCALES[scale]
    if case.data == "mnist1d":
        d = data.mnist1d(n_samples=cfg["mnist1d_samples"], seed=0, label_noise=case.label_noise)
    else:
        d = data.digits(seed=0, flatten=case.model == "fcn", label_noise=case.label_noise)
    d = _subset(d, case.n_classes) if case.n_classes < d.n_classes else d
    if case.model == "cnn":
        net = models.cnn(1, 10, 8, width=cfg["width"], seed=0)
    else:
        net = models.mlp(d.x_train.shape[1], 10, cfg["hidden"], seed=0)
    if case.state == "init":
        return net, d, math.nan
    res = train(net, d, batch_size=cfg["train_batch"], n_steps=cfg["n_steps"], probe_at=[cfg["n_steps"]],
                progress=False, seed=0, **OPTIMIZERS[case.optimizer])
    return net, d, float(res.accuracy[-1])


def _deep_history(case: Case, scale: str):
    net, d, acc = _network(dataclasses.replace(case, batch_size=0), scale)
    G = spectra.gradient_history(net, F.cross_entropy, d.x_train, d.y_train, batch_size=case.batch_size,
                                 n_batches=SCALES[scale]["n_iter"], seed=1)
    return G.cpu().double().numpy(), acc


# ------------------------------------------------------------------------------------- statistics
def count_outliers(eigenvalues, *, k_max: int = 20, min_ratio: float = 3.0) -> int:
    """Top eigenvalues set apart from the bulk (Xie Sec. 5.5: c - 1 of them for c classes): the rank
    k <= k_max with the largest ratio lambda_k / lambda_(k+1), when that ratio is >= min_ratio; else 0.

    Args:
        eigenvalues: descending eigenvalues, more than ``k_max``.
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)[: k_max + 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = lam[:-1] / lam[1:]
    k = int(np.nanargmax(ratio))
    return k + 1 if ratio[k] >= min_ratio else 0


def _measure(G: np.ndarray, cfg) -> xr.Dataset:
    """Table-1 rows of every kind and the covariance spectrum's power-law fit of one history."""
    kw = dict(k_power=cfg["k_power"], max_tests=cfg["max_tests"], seed=0)
    with warnings.catch_warnings():  # scipy warns on near-constant columns (parameters behind dead ReLUs)
        warnings.simplefilter("ignore", RuntimeWarning)
        tests = gradient_history_tests(G, **kw)
        tests["dimension_noise"] = gradient_history_tests(G - G.mean(axis=0), **kw)["dimension"]
    cov = spectra.gram_spectra(torch.from_numpy(G[: cfg["n_spectrum"]]))[1]
    fit = power_law_fit(cov, k=cfg["k_spectrum"])
    rows = [tests[k] for k in KINDS[:-1]]

    def per_kind(attr, spectrum_value):
        return "kind", [float(getattr(r, attr)) for r in rows] + [float(spectrum_value)]

    return xr.Dataset({
        "ks_distance": per_kind("ks_mean", fit.ks), "ks_critical": per_kind("ks_critical", fit.ks_critical),
        "power_law_rate": per_kind("power_law_rate", fit.is_power_law), "power_law_beta": per_kind("beta_median", fit.beta),
        "p_value_mean": per_kind("p_value_mean", math.nan), "gaussian_rate": per_kind("gaussian_rate", math.nan),
        "zipf_exponent": fit.s, "zipf_exponent_se": fit.s / math.sqrt(fit.k),  # delta method: se(beta) / (beta - 1)^2
        "n_outliers": float(count_outliers(cov)), "n_params": float(G.shape[1]), "covariance_eigenvalue": ("rank", cov),
    }, coords={"kind": list(KINDS), "rank": np.arange(cov.size)})


def _point(case: Case, scale: str) -> xr.Dataset:
    cfg = SCALES[scale]
    G, acc = _toy_history(case, cfg) if case.data == "toy" else _deep_history(case, scale)
    return _measure(G, cfg).assign(accuracy=acc)


def _select(ds: xr.Dataset, **fields) -> xr.Dataset:
    """The cases whose coordinates equal ``fields``."""
    mask = np.all([ds[k].values == v for k, v in fields.items()], axis=0)
    return ds.isel(case=np.flatnonzero(mask))


def _batch_sweep(ds: xr.Dataset, model: str) -> xr.Dataset:
    """The init cases of ``model`` on its main data (sgd, clean, 10 classes), by batch size."""
    sub = _select(ds, model=model, state="init", optimizer="sgd", label_noise=0.0, n_classes=10)
    sub = sub.isel(case=np.flatnonzero(sub.data.values != "mnist1d"))
    return sub.sortby("batch_size")


def _batch_slopes(ds: xr.Dataset, names) -> xr.DataArray:
    """Least-squares slope of ln lambda_1 vs ln B per model (Xie Eq. 3: -1)."""
    slopes = []
    for m in names:
        sub = _batch_sweep(ds, m)
        top = sub.covariance_eigenvalue.isel(rank=0).values
        slopes.append(np.polyfit(np.log(sub.batch_size.values), np.log(top), 1)[0])
    return xr.DataArray(slopes, dims="curve", coords={"curve": list(names)})


# ------------------------------------------------------------------------------------------- run
def _collect(cases, scale, out, bar) -> xr.Dataset:
    cache = os.path.join(out, "gradient_tails_points")
    points = []
    for case in cases:
        path = os.path.join(cache, f"{settings_tag(scale, SCALES[scale])}_{case.name}.nc")
        pt = resume.read(path)
        if pt is None:
            pt = _point(case, scale)
            resume.write(pt, path)
        points.append(pt)
        if bar is not None:
            bar.update(1)
    ds = xr.concat(points, dim="case")
    coords = {f: ("case", [float(getattr(c, f)) if f == "batch_size" else getattr(c, f) for c in cases]) for f in FIELDS}
    return ds.assign_coords(case=[c.name for c in cases], **coords)


def run(*, scale: str = "default", out: str = "results", progress: bool = True) -> dict:
    """Measure every case (resuming from saved ones), write the netCDF groups and the figures.

    Returns:
        ``{"toy": Dataset, "deep": Dataset}`` over ``case`` (coordinates: the :class:`Case` fields),
        ``kind`` (:data:`KINDS`) and ``rank``.
    """
    if scale not in SCALES:
        raise ValueError(f"`scale` must be one of {tuple(SCALES)}; got {scale!r}.")
    cfg = SCALES[scale]
    os.makedirs(os.path.join(out, "gradient_tails_points"), exist_ok=True)
    toy_cases, deep_cases = _cases(cfg)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(toy_cases) + len(deep_cases), desc="gradient tails", unit="history")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: intra-op threads only contend (100x slower on a busy 2-core machine)
    try:
        toy = _collect(toy_cases, scale, out, bar)
        deep = _collect(deep_cases, scale, out, bar)
    finally:
        torch.set_num_threads(threads)
    if bar is not None:
        bar.close()
    toy["eigenvalue_batch_slope"] = _batch_slopes(toy, TOYS)
    deep["eigenvalue_batch_slope"] = _batch_slopes(deep, ["cnn"])
    common = dict(scale=scale, n_iter=cfg["n_iter"], n_spectrum=cfg["n_spectrum"], k_power=cfg["k_power"],
                  k_spectrum=cfg["k_spectrum"], n_normal=100, alpha=0.05, table_batch=cfg["table_batch"])
    attach_attrs(toy, model="toy", source="simulation", toy_dim=cfg["toy_dim"], toy_lr=TOY_LR, **common)
    attach_attrs(deep, model="cnn_fcn", source="measurement", cnn_width=cfg["width"], fcn_hidden=cfg["hidden"],
                 n_steps=cfg["n_steps"], train_batch=cfg["train_batch"], optimizers=OPTIMIZERS, **common)
    result = {"toy": toy, "deep": deep}
    return publish(result, out, "gradient_tails", plot)


def plot(result: dict, path: str) -> None:
    """The spectra figure at ``path`` and the test pass rates beside it (``<path>_tests.png``)."""
    plot_spectra(result["toy"], result["deep"], path)
    plot_tests(result["toy"], result["deep"], os.path.splitext(path)[0] + "_tests.png")


# ----------------------------------------------------------------------------------------- tables
SHORT = {"ks_distance": "d_ks", "ks_critical": "d_c", "p_value_mean": "mean_p"}


def _label(ds: xr.Dataset, fields=("model", "data", "state")) -> list[str]:
    return ["/".join(str(ds[f].values[i]) for f in fields) for i in range(ds.case.size)]


def table1(ds: xr.Dataset, batch_size: float) -> pd.DataFrame:
    """Xie Table 1: d_ks, d_c, power-law rate, mean p and Gaussian rate per history and kind."""
    sub = _select(ds, batch_size=float(batch_size), optimizer="sgd", label_noise=0.0, n_classes=10)
    sub = sub.sel(kind=list(KINDS[:-1])).assign_coords(case=_label(sub))
    df = sub[["ks_distance", "ks_critical", "power_law_rate", "p_value_mean", "gaussian_rate"]].reset_coords(drop=True)
    return df.to_dataframe().rename(columns=SHORT)


def table4(ds: xr.Dataset, model: str) -> pd.DataFrame:
    """Xie Table 4: rates of the iteration- and dimension-wise gradients vs batch size (init)."""
    sub = _batch_sweep(ds, model).sel(kind=["iteration", "dimension"])
    sub = sub.assign_coords(case=[f"{model} B={b:g}" for b in sub.batch_size.values])
    return sub[["ks_distance", "power_law_rate", "p_value_mean", "gaussian_rate"]].reset_coords(drop=True).to_dataframe().rename(
        columns=SHORT)


def spectrum_table(ds: xr.Dataset) -> pd.DataFrame:
    """Power-law fit of each covariance spectrum (Xie Tables 2, 6-11), its outlier count and the
    training accuracy, indexed by the case fields."""
    cols = ["zipf_exponent", "zipf_exponent_se", "ks_distance", "ks_critical", "power_law_rate", "n_outliers", "accuracy"]
    df = ds.sel(kind="spectrum")[cols].reset_coords("kind", drop=True).to_dataframe()
    return df.set_index(FIELDS).rename(columns={**SHORT, "zipf_exponent": "s", "zipf_exponent_se": "s_se",
                                                "power_law_rate": "power_law"})


# ---------------------------------------------------------------------------------------- figures
def _rank_plot(ax, ds: xr.Dataset, label: str, color, *, normalise=False):
    """Covariance spectrum on log-log axes with its fitted power law lambda_K (k / K)^-s on ranks 1..K."""
    lam = ds.covariance_eigenvalue.values
    lam = lam[lam > 1e-9 * lam[0]]  # drop the numerical null space (rank < T)
    scale = lam[0] if normalise else 1.0
    k_fit = int(ds.attrs.get("k_spectrum", 0)) or None
    ranks = np.arange(1, lam.size + 1)
    s, n_out = float(ds.zipf_exponent), int(ds.n_outliers)
    passed = "pass" if float(ds.power_law_rate.sel(kind="spectrum")) else "fail"
    outliers = f"{n_out} outlier{'' if n_out == 1 else 's'}"
    ax.loglog(ranks, lam / scale, color=color, lw=1.3, label=f"{label}: s = {s:.2f}, KS {passed}, {outliers}")
    if k_fit:
        k = np.arange(1, k_fit + 1)
        ax.loglog(k, lam[k_fit - 1] * (k / k_fit) ** -s / scale, "--", color=color, lw=0.9)


def _panel(ax, ds: xr.Dataset, picks, title, **kw):
    for i, (fields, label) in enumerate(picks):
        sub = _select(ds, **fields)
        if sub.case.size:
            _rank_plot(ax, sub.isel(case=0), label, f"C{i}", **kw)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("rank k")
    # below the axes: the spectra fill the panels from corner to corner
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.14), borderaxespad=0, frameon=False)


def plot_spectra(toy: xr.Dataset, deep: xr.Dataset, path: str) -> None:
    """Rank plots of covariance spectra (dashed: fitted power laws) and the top eigenvalue vs B."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 12.5))
    one = dict(batch_size=1.0, optimizer="sgd", label_noise=0.0, n_classes=10)
    _panel(axes[0, 0], deep, [(dict(model=m, data=d, state=s, **one), f"{m}/{d} {s}") for m, d in NETS
                              for s in ("init", "trained")], "networks, B = 1")
    b = float(toy.attrs["table_batch"])
    _panel(axes[0, 1], toy, [(dict(model=m, state="init", batch_size=b), f"{m} init") for m in TOYS],
           f"toy models at init, B = {b:g} (exact: s = 1 for nqm, linreg)")
    classes = sorted(set(deep.n_classes.values.tolist()))
    _panel(axes[0, 2], deep, [(dict(model="cnn", data="digits", state="init", batch_size=1.0, n_classes=c), f"{c} classes")
                              for c in classes], "CNN at init: outliers vs classes", normalise=True)
    noises = sorted(set(deep.label_noise.values.tolist()))
    _panel(axes[1, 0], deep, [(dict(model="cnn", data="digits", state="trained", batch_size=1.0, optimizer="sgd",
                                    n_classes=10, label_noise=x), f"label noise {x:g}") for x in noises],
           "trained CNN: label noise")
    _panel(axes[1, 1], deep, [(dict(model="cnn", data="digits", state="trained", batch_size=1.0, optimizer=o,
                                    label_noise=0.0, n_classes=10), o) for o in OPTIMIZERS], "trained CNN: optimizer")
    ax = axes[1, 2]
    for i, (ds, m) in enumerate([(deep, "cnn")] + [(toy, t) for t in TOYS]):
        sub = _batch_sweep(ds, m)
        top = sub.covariance_eigenvalue.isel(rank=0).values
        slope = float(ds.eigenvalue_batch_slope.sel(curve=m))
        ax.loglog(sub.batch_size.values, top / top[0], "o-", color=f"C{i}", label=f"{m}: slope {slope:.2f}")
    bs = np.array(sorted(set(deep.batch_size.values.tolist())))
    ax.loglog(bs, 1.0 / bs, "k--", lw=1, label="1 / B")
    ax.set_title("top covariance eigenvalue vs batch size (init)", fontsize=10)
    ax.set(xlabel="batch size B", ylabel="top eigenvalue relative to B = 1, λ₁(B) / λ₁(1)")
    ax.legend(fontsize=9, loc="upper right")  # the curves fall from the upper left: that corner is empty
    for a in axes.flat[:-1]:
        a.set_ylabel("covariance eigenvalue λ_k")
    axes[0, 2].set_ylabel("covariance eigenvalue relative to the top one, λ_k / λ₁")
    a = deep.attrs
    fig.suptitle(f"gradient covariance spectra (Xie et al. Fig. 4, 6, 7, 11, 13) of the first {a['n_spectrum']} of "
                 f"T = {a['n_iter']} mini-batch gradients per history;\npower law λ_k ∝ k^-s fitted to the top "
                 f"K = {a['k_spectrum']} eigenvalues (dashed), KS test at 5%; networks measured, toy models simulated",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_tests(toy: xr.Dataset, deep: xr.Dataset, path: str) -> None:
    """Left: Table 1 as a heat map of pass rates; right: Table 4, rates vs batch size."""
    b = toy.attrs["table_batch"]
    t1 = pd.concat([table1(toy, b), table1(deep, b)])
    grid = pd.concat([t1.power_law_rate.unstack("kind").add_prefix("power law: "),
                      t1.gaussian_rate.unstack("kind")[["dimension", "iteration", "dimension_noise"]].add_prefix("Gaussian: ")],
                     axis=1)
    order = list(dict.fromkeys(t1.index.get_level_values("case")))
    grid = grid.loc[order, [f"power law: {k}" for k in KINDS[:-1]] + [c for c in grid.columns if c.startswith("Gauss")]]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(16, 0.34 * len(order) + 2.5), gridspec_kw=dict(width_ratios=[1.5, 1]))
    ax.imshow(grid.values, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for (i, j), v in np.ndenumerate(grid.values):
        ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=8, color="w" if v < 0.6 else "k")
    ax.set_xticks(range(grid.shape[1]), [c.replace(": ", ":\n") for c in grid.columns], fontsize=8)
    ax.set_yticks(range(len(order)), order, fontsize=8)
    a = toy.attrs
    ax.set_title(f"pass rates (%) at B = {b:g} (Xie Table 1): power-law KS test on the top K = {a['k_power']} values, "
                 f"D'Agostino test;\nT = {a['n_iter']} mini-batch gradients per history", fontsize=10)
    for i, (ds, m) in enumerate([(deep, "cnn")] + [(toy, t) for t in TOYS]):
        sub = _batch_sweep(ds, m)
        bs = sub.batch_size.values
        bx.semilogx(bs, sub.gaussian_rate.sel(kind="iteration"), "o-", color=f"C{i}")
        bx.semilogx(bs, sub.power_law_rate.sel(kind="dimension"), "s--", color=f"C{i}")
    bx.set_title("pass rates vs batch size at init (Xie Table 4)", fontsize=10)
    bx.set(xlabel="batch size B", ylabel="pass rate (fraction of tested sets not rejected)", ylim=(-0.03, 1.03))
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=f"C{i}", label=m) for i, m in enumerate(("cnn",) + TOYS)]
    handles += [Line2D([], [], color="0.3", marker="o", ls="-", label="Gaussian, iteration-wise"),
                Line2D([], [], color="0.3", marker="s", ls="--", label="power law, dimension-wise")]
    bx.legend(handles=handles, fontsize=9, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(res) -> str:
    """Xie et al.'s Table 1 (pass rates at the table's batch size) for the toy models and the networks,
    Table 4 (at initialisation), the covariance-spectrum fits, and the slope of the top covariance
    eigenvalue against the batch size, as text."""
    toy, deep = res["toy"], res["deep"]
    b = toy.attrs["table_batch"]
    options = ("display.width", 200, "display.max_rows", 500, "display.max_columns", 20, "display.float_format", "{:.4g}".format)
    with pd.option_context(*options):
        slopes = {**toy.eigenvalue_batch_slope.to_series().to_dict(), **deep.eigenvalue_batch_slope.to_series().to_dict()}
        return "\n".join([
            f"\nTable 1 (B = {b:g}), toy models:\n{table1(toy, b)}\n\nTable 1 (B = {b:g}), networks:\n{table1(deep, b)}",
            "\nTable 4 (init):\n" + pd.concat([table4(deep, "cnn")] + [table4(toy, m) for m in TOYS]).to_string(),
            "\ncovariance spectra, toy models:\n" + spectrum_table(toy).to_string(),
            "\ncovariance spectra, networks:\n" + spectrum_table(deep).to_string(),
            "\nslope of ln lambda_1 vs ln B: " + ", ".join(f"{k} {v:.3f}" for k, v in slopes.items())])


def main(argv=None):
    """The command line ``python -m studies run gradient_tails`` (``-h`` lists the flags): run at the
    scale the flags choose, print the tables of :func:`summary` and the files written.

    Args:
        argv: the flags (default: ``sys.argv[1:]``).

    Returns:
        the study's results, as :func:`run` returns them.
    """
    return command(__doc__, run, "gradient_tails", argv, summary=summary)


if __name__ == "__main__":
    main()
