"""The gradient noise scale of a small transformer along training, measured three ways on the same
examples: per example in one process, from the micro-batches of gradient accumulation in one
process, and from the micro-batches of two DDP processes with accumulation (McCandlish et al. 2018,
App. A.1).

A GPT-style byte-level transformer (:func:`deepmodels.models.transformer`) learns the next byte of
the Python standard library's own source (:func:`deepmodels.data.text_corpus`) with Adam.  Every
step draws B = b x M x W sequences (seeded) and splits them into n = M x W micro-batches of b:

* **one process, accumulation**: the n micro-batches one after the other, ``(loss / n).backward()``
  each, :class:`deepmodels.gns.GradientNoiseScale` after the last;
* **DDP, W = 2 processes x M accumulation steps**: process r takes micro-batches r M ... r M + M - 1
  (``torch.distributed`` with the gloo backend on this machine's CPUs); the all-reduced gradient is
  the same mean over the same n micro-batches, so the two runs follow the same trajectory and their
  estimates agree to rounding (what the figure shows, and ``attrs["max_rel_diff_ddp"]`` says);
* **per example** (one process, every ``probe_every`` steps): :func:`deepmodels.probes.gradient_stats`
  on the step's B sequences, the two-batch estimate with batch sizes 1 and B and its 95% bootstrap
  interval over the sequences.

All three estimate the same B_simple = tr Sigma / |G|^2 (per sequence) without bias, and on the same
step's batch the per-example and the micro-batch estimates agree closely (the summary prints both).
The micro-batch ones are noisy per step (n - 1 degrees of freedom) and are shown with the ratio of
their exponential moving averages (the paper's recommendation) and its standard error; a ratio of
averages runs below the typical per-step ratio wherever |G|^2 fluctuates, and lags a rising B_simple
by about 1 / (1 - decay) steps.  The percentile bootstrap interval of the per-example estimate can
exclude the estimate itself (a ratio whose denominator |G|^2 is near zero has a skewed resampling
distribution); the figure draws such a point above its interval.

    python -m studies run transformer_noise            # 300 steps, b = 8, M = 2, W = 2 (B = 32)
    python -m studies run transformer_noise --quick    # 40 steps, a 1-layer model
    python -m studies run transformer_noise --full     # 1500 steps, b = 16 (B = 64)

Writes ``transformer_noise.nc`` (groups ``single``, ``ddp``, ``per_example``) and
``transformer_noise.png``.  Each run is saved when it finishes and reused by a rerun with the same
settings.

References:
    S. McCandlish, J. Kaplan, D. Amodei and the OpenAI Dota Team, "An Empirical Model of
    Large-Batch Training", 2018, App. A.1.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import xarray as xr  # noqa: E402

from deepmodels import data, models, probes  # noqa: E402
from deepmodels.gns import GradientNoiseScale, stack  # noqa: E402
from toymodels import resume  # noqa: E402
from toymodels.schema import attach_attrs  # noqa: E402

from . import style  # noqa: E402
from ._io import command, publish, settings_tag  # noqa: E402

SCALES = {
    "tiny": dict(n_steps=12, micro=4, accum=2, world=2, probe_every=6, context=16, d_model=16, n_layers=1,
                 max_bytes=2**17, lr=3e-3, ema_decay=0.8),
    "quick": dict(n_steps=40, micro=4, accum=2, world=2, probe_every=10, context=32, d_model=32, n_layers=1,
                  max_bytes=2**18, lr=3e-3, ema_decay=0.9),
    "default": dict(n_steps=300, micro=8, accum=2, world=2, probe_every=30, context=64, d_model=64, n_layers=2,
                    max_bytes=2**20, lr=1e-3, ema_decay=0.95),
    "full": dict(n_steps=1500, micro=16, accum=2, world=2, probe_every=100, context=64, d_model=128, n_layers=4,
                 max_bytes=2**22, lr=6e-4, ema_decay=0.98),
}
RUNS = {"single": ("one process, accumulation", "C0", "-"), "ddp": ("DDP, 2 processes x accumulation", "C3", "--")}


def _setup(cfg, seed):
    d = data.text_corpus(context_length=cfg["context"], max_bytes=cfg["max_bytes"], seed=0)
    model = models.transformer(256, cfg["context"], d_model=cfg["d_model"], n_layers=cfg["n_layers"], seed=seed)
    return d, model


def _batches(d, cfg, seed):
    """The sequences of every step, ``(n_steps, B)`` indices into the training windows (seeded)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B = cfg["micro"] * cfg["accum"] * cfg["world"]
    return torch.randint(0, d.x_train.shape[0], (cfg["n_steps"], B), generator=gen)


def _train(cfg, seed, rank=0, world=1, progress=False):
    """Train on this process's micro-batches; returns (GNS estimates, per-example probes, losses)
    (the probes only in a single process)."""
    d, model = _setup(cfg, seed)
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    b, n = cfg["micro"], cfg["accum"] * cfg["world"]
    M = n // world
    idx = _batches(d, cfg, seed)
    ests, probed, losses = [], [], []
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg["n_steps"], desc="transformer noise" + (" (DDP)" if world > 1 else ""), unit="step")
    with GradientNoiseScale(ddp, ema_decay=cfg["ema_decay"]) as gns:
        for k in range(cfg["n_steps"]):
            x, y = d.x_train[idx[k]], d.y_train[idx[k]]
            if world == 1 and k % cfg["probe_every"] == 0:
                probed.append(probes.gradient_stats(model, F.cross_entropy, x, y, step=k, ci=0.95, n_boot=500,
                                                    seed=seed))
                gns.discard()  # the probe's own backward pass (hook fast path) is not a micro-batch of the step
            loss = 0.0
            for m in range(M):
                j = rank * M + m
                sync = ddp.no_sync() if (world > 1 and m < M - 1) else contextlib.nullcontext()
                with sync:
                    part = F.cross_entropy(ddp(x[j * b:(j + 1) * b]), y[j * b:(j + 1) * b]) / M
                    part.backward()
                loss += float(part.detach())
            ests.append(gns.update(micro_batch_size=b, step=k))
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return ests, probed, losses


def _run_ds(ests, losses):
    ds = stack(ests)
    ds["loss"] = ("step", np.asarray(losses, dtype=np.float64))  # this process's share; DDP: rank 0's
    return ds


def _ddp_worker(rank, world, port, cfg, seed, path, stamp):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ests, _, losses = _train(cfg, seed, rank=rank, world=world)
        # the step's loss over all processes (each holds the mean of its M micro-batches / M)
        t = torch.tensor(losses, dtype=torch.float64)
        dist.all_reduce(t)
        if rank == 0:
            ds = _run_ds(ests, (t / world).tolist())
            ds.attrs.update(stamp)
            resume.write(ds, path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_run(cfg, seed, path, stamp):
    """The DDP run in ``cfg["world"]`` spawned processes; process 0 writes it to ``path``."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(cfg["world"], _free_port(), cfg, seed, path, stamp), nprocs=cfg["world"], join=True)
    return xr.load_dataset(path)


def run(*, scale: str = "default", out: str = "results", progress: bool = True, seed: int = 0) -> dict:
    """Train the transformer in one process and with DDP on the same examples; writes the netCDF
    file (groups ``single``, ``ddp``, ``per_example``) and the figure and returns them as a dict."""
    if scale not in SCALES:
        raise ValueError(f"`scale` must be one of {tuple(SCALES)}; got {scale!r}.")
    cfg = SCALES[scale]
    settings = dict(cfg, seed=seed, scale=scale)
    folder = os.path.join(out, f"transformer_noise_runs_{settings_tag(scale, dict(cfg, seed=seed))}")
    os.makedirs(folder, exist_ok=True)
    files = {name: os.path.join(folder, f"{name}.nc") for name in ("single", "per_example", "ddp")}
    stamp = {f"run_{k}": v for k, v in settings.items()}
    got = {name: resume.read(path, settings=stamp) for name, path in files.items()}
    if got["single"] is None or got["per_example"] is None:
        ests, probed, losses = _train(cfg, seed, progress=progress)
        got["single"] = _run_ds(ests, losses)
        got["per_example"] = xr.concat([p.sel(layer="total") for p in probed], dim="step", combine_attrs="drop_conflicts")
        for name in ("single", "per_example"):
            got[name].attrs.update(stamp)
            resume.write(got[name], files[name])
    if got["ddp"] is None:
        got["ddp"] = _ddp_run(cfg, seed, files["ddp"], stamp)
    result = {name: got[name].drop_attrs() for name in ("single", "ddp", "per_example")}
    s, p = result["single"], result["ddp"]
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.abs(p.noise_scale_ema.values - s.noise_scale_ema.values) / np.abs(s.noise_scale_ema.values)
    B = cfg["micro"] * cfg["accum"] * cfg["world"]
    for name, ds in result.items():
        attach_attrs(ds, model="transformer", source="measurement", data=str(got["single"].attrs.get("data", "stdlib")),
                     scale=scale, seed=seed, batch_size=float(B), micro_batch_size=float(cfg["micro"]),
                     accumulation_steps=float(cfg["accum"]), world_size=float(cfg["world"] if name == "ddp" else 1),
                     lr=cfg["lr"], ema_decay=cfg["ema_decay"], optimizer="adam",
                     max_rel_diff_ddp=float(np.nanmax(rel)) if np.any(np.isfinite(rel)) else math.inf)
    return publish(result, out, "transformer_noise", plot)


def plot(result: dict, path: str) -> None:
    """Left: B_simple along training, per step (points), the EMAs' ratio with its 2-SE band for both
    runs, and the per-example estimate with its bootstrap interval.  Middle: the EMAs of tr Sigma and
    |G|^2.  Right: the training loss of both runs."""
    s, ddp, pe = result["single"], result["ddp"], result["per_example"]
    a = s.attrs
    fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(15.5, 5.6))
    k = s.step.values
    for name, ds in (("single", s), ("ddp", ddp)):
        label, color, ls = RUNS[name]
        if name == "single":
            one = ds.noise_scale_unbiased.values
            pos = np.isfinite(one) & (one > 0)
            style.draw(ax, k[pos], one[pos], source="measurement", color=color, ms=2.5, alpha=0.35,
                       label=f"{label}: one step (b = {a['micro_batch_size']:g} vs B = {a['batch_size']:g})")
            if not pos.all():  # a step's unbiased |G|^2 or tr Sigma can come out <= 0: B_simple <= 0 or inf
                below = ~pos
                low = np.nanmin(np.r_[one[pos], ds.noise_scale_ema.values]) / 1.5
                ax.plot(k[below], np.full(below.sum(), low), "v", color=color, ms=4, alpha=0.6,
                        label=f"one step: B_simple <= 0 or inf ({below.sum()} of {len(one)} steps; drawn at the bottom)")
            m, se = ds.noise_scale_ema.values, ds.noise_scale_ema_sem.values
            ok = np.isfinite(m) & np.isfinite(se)
            ax.fill_between(k[ok], m[ok] - 2 * se[ok], m[ok] + 2 * se[ok], color=color, alpha=0.15, lw=0)
        ax.plot(k, ds.noise_scale_ema.values, color=color, ls=ls, lw=1.6,
                label=f"{label}: ratio of EMAs (decay {a['ema_decay']:g})" + (", ± 2 SE" if name == "single" else ""))
    kp = pe.step.values
    mid = pe.noise_scale_unbiased.values
    lo, hi = pe.noise_scale_unbiased_ci.sel(bound="low").values, pe.noise_scale_unbiased_ci.sel(bound="high").values
    ax.errorbar(kp, mid, yerr=[np.maximum(mid - lo, 0), np.maximum(hi - mid, 0)], fmt="s", color="k", ms=4, capsize=3,
                label="one process, per example (1 vs B), 95% bootstrap interval")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("B_simple = tr Σ / |G|² (sequences), unbiased")
    ax.set_title("simple noise scale, three estimators on the same examples", fontsize=10)
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.14))  # below: the curves fill the axes
    for name, ds in (("single", s), ("ddp", ddp)):
        label, _, ls = RUNS[name]
        lw, shade = (3.0, ("C2", "C1")) if name == "single" else (1.2, ("darkgreen", "saddlebrown"))
        ax2.plot(k, ds.trace_cov_ema.values, color=shade[0], ls=ls, lw=lw, label=f"tr Σ (per sequence), {label}")
        ax2.plot(k, ds.grad_norm_sq_ema.values, color=shade[1], ls=ls, lw=lw, label=f"|G|², {label}")
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("bias-corrected EMA (squared gradient norm)")
    ax2.set_title("the two EMAs whose ratio is B_simple", fontsize=10)
    ax2.legend(fontsize=7.5)
    for name, ds in (("single", s), ("ddp", ddp)):
        label, color, ls = RUNS[name]
        ax3.plot(k, ds.loss.values, color=color, ls=ls, label=label)
    ax3.set_xlabel("step")
    ax3.set_ylabel("training loss of the step's batch (nats per byte)")
    ax3.set_title(f"training (Adam, lr {a['lr']:g}); DDP vs one process: max relative\n"
                  f"difference of the EMA B_simple {a['max_rel_diff_ddp']:.1e}", fontsize=10)
    ax3.legend(fontsize=7.5)
    fig.suptitle(f"GPT-style transformer on the Python standard library's source (bytes), B = {a['batch_size']:g} "
                 f"= b {a['micro_batch_size']:g} x M {a['accumulation_steps']:g} x W 2 (all measured)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(res) -> str:
    """B_simple (ratio of EMAs) of both runs and the per-example estimate at the probe steps."""
    s, ddp, pe = res["single"], res["ddp"], res["per_example"]
    steps = pe.step.values
    lines = ["B_simple (sequences): step, ratio of EMAs (one process, DDP), this step's micro-batch estimate, "
             "per-example estimate [95% bootstrap interval]"]
    for k in steps:
        lo, hi = pe.noise_scale_unbiased_ci.sel(step=k).values
        lines.append(f"{int(k):5d}  {float(s.noise_scale_ema.sel(step=k)):8.3g} {float(ddp.noise_scale_ema.sel(step=k)):8.3g}"
                     f"  {float(s.noise_scale_unbiased.sel(step=k)):8.3g}"
                     f"  {float(pe.noise_scale_unbiased.sel(step=k)):8.3g} [{lo:.3g}, {hi:.3g}]")
    lines.append(f"max relative difference DDP vs one process (EMA B_simple): {s.attrs['max_rel_diff_ddp']:.2e}")
    return "\n".join(lines)


def main(argv=None):
    """The command line ``python -m studies run transformer_noise`` (``-h`` lists the flags): run at the
    scale the flags choose, print the noise-scale table and the files written.

    Args:
        argv: the flags (default: ``sys.argv[1:]``).

    Returns:
        the study's results, as :func:`run` returns them.
    """
    return command(__doc__, run, "transformer_noise", argv, summary=summary)


if __name__ == "__main__":
    main()
