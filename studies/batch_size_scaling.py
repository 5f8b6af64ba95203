"""Steps to a target loss vs batch size on the NQM, each point tuned (Grosse's CSC 2541 Lecture 7,
"Noisy Quadratic Model" slides).

Families: SGD, preconditioned SGD (P = H^0.5), heavy-ball momentum (lr and beta tuned), iterate
averaging (SGD + EMA, lr and decay tuned) and SGD with a tuned 3-piece learning-rate schedule, with the
information-theoretic lower bound, and the tuned learning rate per batch size (linear scaling in the
noise-dominated regime; for momentum the effective rate lr / (1 - β), ``lr_eff_opt``, which is smooth
where the tuned pair (lr, β) jumps).

    python -m studies run batch_size_scaling            # dimension 10^4, batch sizes 2^0..2^20
    python -m studies run batch_size_scaling --quick    # dimension 10^3, batch sizes 2^0..2^16 step 4
    python -m studies run batch_size_scaling --full     # dimension 10^5, batch sizes 2^0..2^24

Writes ``batch_size_scaling.nc`` and ``batch_size_scaling.png`` into ``--out`` (default ``results``);
per-family sweeps are saved as they go and resume after an interruption.

References:
    R. Grosse, "CSC 2541: Neural Net Training Dynamics", Lecture 7 "Stochasticity and Parallelism",
    University of Toronto, Winter 2022.
"""

from __future__ import annotations

import os
import time

import numpy as np
import xarray as xr

from toymodels import NQM, resume
from toymodels.schema import attach_attrs
from toymodels.sweep import family_sweeps, tune_schedule

from . import style
from ._io import fraction, parser, positive_int, publish, scale_of

FAMILIES = {"sgd": "SGD", "precond": "preconditioned SGD (γ=0.5)", "momentum": "heavy-ball momentum", "ema": "SGD + EMA"}
COLORS = {"sgd": "C0", "precond": "C1", "momentum": "C2", "ema": "C3", "sgd_schedule": "C4"}
SCHEDULE_LABEL = "SGD, tuned 3-piece schedule"


SCALES = {"quick": dict(dim=1000, log2_batch=np.arange(0, 17, 4)),
          "default": dict(dim=10_000, log2_batch=np.arange(0, 21)),
          "full": dict(dim=100_000, log2_batch=np.arange(0, 25))}


def run(*, scale: str = "default", out: str = "results", dim: int | None = None, target_fraction: float = 0.01,
        progress: bool = True, scheduler=None) -> xr.Dataset:
    """Run the sweeps and write the netCDF file and the figure; returns the dataset.

    ``scheduler``: run the four families as dask tasks (``"local"``, an address or a Client; see
    :func:`toymodels.parallel.run_tasks`) instead of side by side in this process.
    """
    if scale not in SCALES:
        raise ValueError(f"`scale` must be one of {tuple(SCALES)}; got {scale!r}.")
    os.makedirs(out, exist_ok=True)
    dim = dim or SCALES[scale]["dim"]
    batch_sizes = 2.0 ** SCALES[scale]["log2_batch"]
    nqm = NQM.power_law(dim)
    target = target_fraction * nqm.initial_loss
    parts = []
    parts_dir = os.path.join(out, "batch_size_scaling_parts")  # per-family sweeps, for resuming
    os.makedirs(parts_dir, exist_ok=True)
    paths = {fam: os.path.join(parts_dir, f"{fam}_{dim}.nc") for fam in FAMILIES}
    sweeps = family_sweeps(nqm, list(FAMILIES), batch_sizes, target, precond=0.5, paths=paths, progress=progress,
                           scheduler=scheduler)
    for fam, ds in sweeps.items():
        for name in ("momentum_opt", "decay_opt"):
            if name not in ds:
                ds[name] = ("batch_size", np.full(batch_sizes.size, np.nan))
        if "lr_eff_opt" not in ds:  # no momentum (beta = 0): the effective learning rate is the learning rate
            ds["lr_eff_opt"] = ds.lr_opt
        parts.append(ds.drop_attrs().expand_dims(optimizer=[fam]))
    parts.append(_schedule_sweep(nqm, batch_sizes, target, os.path.join(parts_dir, f"schedule_{dim}.nc"),
                                 progress))
    result = xr.concat(parts, dim="optimizer")
    result["steps_lower_bound"] = ("batch_size", np.array([nqm.lower_bound_steps(b, target) for b in batch_sizes]))
    attach_attrs(result, model="nqm", source="exact", target=target, target_fraction=target_fraction, dim=dim,
                 hessian_power=1.0, noise_power=1.0, init_sq=1.0, precond=0.5)
    return publish(result, out, "batch_size_scaling", plot)


N_PIECES = 3


def _schedule_sweep(nqm, batch_sizes, target, path, progress):
    """SGD with a tuned 3-piece piecewise-constant schedule per batch size (the lecture's "fitting
    optimal learning rate schedules"), with the fitted learning rates and piece fractions; resumes
    from ``path``."""
    def same_pieces(ds):
        if ds.piece.size != N_PIECES:
            raise ValueError(f"it was written for another grid of pieces ({ds.piece.size}, not {N_PIECES})")

    done = resume.read(path, settings={"target": target, "dim": nqm.dim}, prefix={"batch_size": batch_sizes},
                       check=same_pieces,
                       variables=("steps_to_target", "lr_schedule_opt", "piece_fraction_opt"))
    steps, lrs, fracs = [], [], []
    if done is not None:  # the same grid: reuse its first n
        n = min(done.batch_size.size, batch_sizes.size)
        steps, lrs, fracs = (list(done.steps_to_target.values[:n]), list(done.lr_schedule_opt.values[:n]),
                             list(done.piece_fraction_opt.values[:n]))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=batch_sizes.size, initial=len(steps), desc="sweep schedule", unit="B")
    for b in batch_sizes[len(steps):]:
        res = tune_schedule(nqm, b, target, n_pieces=N_PIECES)
        steps.append(res["steps"])
        ok = res["schedule"] is not None
        lrs.append(np.asarray(res["lrs"], dtype=np.float64) if ok else np.full(N_PIECES, np.nan))
        fracs.append(np.asarray(res["fractions"], dtype=np.float64) if ok else np.full(N_PIECES, np.nan))
        part = xr.Dataset({"steps_to_target": ("batch_size", np.array(steps)),
                           "lr_schedule_opt": (("batch_size", "piece"), np.array(lrs)),
                           "piece_fraction_opt": (("batch_size", "piece"), np.array(fracs))},
                          coords={"batch_size": batch_sizes[: len(steps)], "piece": np.arange(N_PIECES)},
                          attrs={"target": target, "dim": nqm.dim})
        resume.write(part, path)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    lrs, fracs = np.array(lrs, dtype=np.float64), np.array(fracs, dtype=np.float64)
    ds = xr.Dataset({"steps_to_target": ("batch_size", np.array(steps, dtype=np.float64)),
                     "lr_opt": ("batch_size", lrs[:, 0]),
                     "lr_eff_opt": ("batch_size", lrs[:, 0]),
                     "lr_schedule_opt": (("batch_size", "piece"), lrs),
                     "piece_fraction_opt": (("batch_size", "piece"), fracs),
                     "momentum_opt": ("batch_size", np.full(batch_sizes.size, np.nan)),
                     "decay_opt": ("batch_size", np.full(batch_sizes.size, np.nan)),
                     "reason": ("batch_size", np.full(batch_sizes.size, "", dtype=object).astype(str))},
                    coords={"batch_size": batch_sizes, "piece": np.arange(N_PIECES)})
    return ds.expand_dims(optimizer=["sgd_schedule"])


def plot(result: xr.Dataset, path: str) -> None:
    """Three panels: steps vs batch size with the lower bound; tuned effective learning rate
    lr / (1 - β) vs batch size (the learning rate itself without momentum); the fitted schedules."""
    fig, (ax1, ax2, ax3) = style.figure(3, width=5.2, height=4.2)
    bs = result.batch_size.values
    for fam, label in FAMILIES.items():
        if fam not in result.optimizer.values:
            continue
        r = result.sel(optimizer=fam)
        style.draw(ax1, bs, r.steps_to_target.values, source="exact", color=COLORS[fam], label=label)
        # the effective learning rate lr / (1 - beta): comparable with SGD's, and smooth where momentum's
        # tuned (lr, beta) jump; files written before lr_eff_opt existed have lr_opt and momentum_opt
        lr = (r.lr_eff_opt.values if "lr_eff_opt" in r
              else r.lr_opt.values / (1.0 - np.nan_to_num(r.momentum_opt.values)))
        if fam == "momentum":
            label = label + ": effective rate lr / (1 - β)"
        style.draw(ax2, bs, lr, source="exact", color=COLORS[fam], label=label)
    if "sgd_schedule" in result.optimizer.values:
        style.draw(ax1, bs, result.sel(optimizer="sgd_schedule").steps_to_target.values, source="exact", ls="--",
                   color=COLORS["sgd_schedule"], label=SCHEDULE_LABEL)
    style.draw(ax1, bs, np.maximum(result.steps_lower_bound.values, 1), source="exact", ls=":", color="k",
               label="lower bound, any algorithm")
    ax1.set_xlabel("batch size")
    ax1.set_ylabel("steps to target")
    ax1.set_title(f"NQM, d={result.attrs['dim']}, target={result.attrs['target_fraction']:g}·L0")
    ax1.legend(fontsize=7)
    ref = bs * result.sel(optimizer="sgd").lr_opt.values[0]  # SGD: effective rate = lr
    ax2.plot(bs, ref, "--", color="0.6", lw=1, label="linear scaling")
    ax2.set_xlabel("batch size")
    ax2.set_ylabel("tuned effective learning rate lr / (1 - β)")
    ax2.set_title("effective learning rate lr / (1 - β) (β = 0 without momentum)", fontsize=9)
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_yscale("log")
    if "lr_schedule_opt" in result:
        sched = result.sel(optimizer="sgd_schedule")
        shown = bs[:: max(1, bs.size // 5)]
        for j, b in enumerate(shown):
            lrs = sched.lr_schedule_opt.sel(batch_size=b).values
            edges = np.concatenate([[0.0], np.cumsum(sched.piece_fraction_opt.sel(batch_size=b).values)])
            if np.all(np.isfinite(lrs)):
                ax3.step(edges, np.r_[lrs, lrs[-1]], where="post", color=f"C{j}", label=f"B = {b:.0f}")
        ax3.set_yscale("log")
        ax3.set_xlabel("fraction of the steps to target")
        ax3.set_ylabel("learning rate")
        ax3.set_title("fitted 3-piece schedules (theory)")
        ax3.legend(fontsize=7)
    style.save(fig, path)


def main(argv=None):
    """The command line ``python -m studies run batch_size_scaling`` (``-h`` lists the flags): the
    shared flags, ``--dim`` and ``--target-fraction``; runs the sweeps and prints the steps to target
    per family and batch size and the files written.

    Args:
        argv: the flags (default: ``sys.argv[1:]``).
    """
    p = parser(__doc__, scheduler=True)
    p.add_argument("--dim", type=positive_int, default=None,
                   help="NQM dimension (default: 10^4; 10^3 quick, 10^5 full)")
    p.add_argument("--target-fraction", type=fraction, default=0.01, help="target loss as a fraction of L0, in (0, 1)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    res = run(scale=scale_of(a), out=a.out, dim=a.dim, target_fraction=a.target_fraction, progress=not a.no_progress,
              scheduler=a.scheduler)
    print(res.steps_to_target.to_pandas().T.to_string())
    print(f"wrote {a.out}/batch_size_scaling.nc and .png in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
