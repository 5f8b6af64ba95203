"""Memorization under suppressed weak gradient directions (coherent gradients, Zielinski et
al. 2020, Sec. 2, 3.3 and 4.3) at small scale on scikit-learn's digits.

An MLP is trained from the same initialisation and batch order with 0 / 50 / 100% label noise by
plain SGD and by the wrappers of :mod:`deepmodels.optim` around the same SGD: RA3 (control), RM3, M3
(3 micro-batches of B/3) and per-example winsorization (parameter s); no momentum, a constant
learning rate.  Tracked over steps: training accuracy on the *pristine* examples (label unchanged)
and on the *corrupt* ones (measured against their noisy label: memorization), test accuracy.

Label noise as in the paper: a share of the training labels is *randomized* (redrawn uniformly
from the 10 classes), so some keep their label by chance and stay pristine (about 10% at 100%).

Easy and hard examples (Sec. 4.2-4.3): reference SGD runs on the clean labels from other seeds are
stopped when their training accuracy first reaches ``easy_at`` (the paper's 50%); an example is
*easy* if every reference run classifies it correctly then, *hard* if none does.  Their training
accuracy is tracked in the clean-label runs: does RM3 impair the hard examples more than SGD?

    python -m studies run coherent_gradients            # reduced scale, 15 min on 2 busy CPU cores
    python -m studies run coherent_gradients --quick    # smaller (~30 s)
    python -m studies run coherent_gradients --full     # 5 noise levels, 256-256 MLP, 20000 steps, 8 reference runs

Every finished run is saved under ``<out>/coherent_gradients_runs/`` and skipped on a rerun.
Writes ``coherent_gradients.nc`` and ``coherent_gradients.png``.

References:
    Zielinski et al., "Weak and Strong Gradient Directions: Explaining Memorization, Generalization,
    and Hardness of Examples at Scale", 2020.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import xarray as xr  # noqa: E402

from deepmodels import data, models, pergrad  # noqa: E402
from deepmodels.optim import M3, RA3, RM3, Winsorized  # noqa: E402
from deepmodels.train import probe_steps  # noqa: E402
from toymodels import resume  # noqa: E402
from toymodels.schema import attach_attrs  # noqa: E402

from ._io import command, publish, settings_tag  # noqa: E402

OPTIMIZERS = {"sgd": ("SGD", "C0"), "ra3": ("RA3", "C1"), "rm3": ("RM3", "C3"), "m3": ("M3", "C2"),
              "winsorized": ("winsorized", "C4")}
SUBSETS = ("train", "pristine", "corrupt", "test", "easy", "hard")

SCALES = {
    "tiny": dict(noise=[0.0, 1.0], n_steps=60, every=20, hidden=(32,), batch_size=12, s=1, lr=0.1, n_ref=1,
                 easy_at=0.5),  # for the tests
    "quick": dict(noise=[0.0, 0.5, 1.0], n_steps=2000, every=50, hidden=(128, 128), batch_size=12, s=1, lr=0.1,
                  n_ref=2, easy_at=0.5),
    "default": dict(noise=[0.0, 0.5, 1.0], n_steps=6000, every=100, hidden=(128, 128), batch_size=12, s=1, lr=0.1,
                    n_ref=3, easy_at=0.5),
    "full": dict(noise=[0.0, 0.25, 0.5, 0.75, 1.0], n_steps=20000, every=200, hidden=(256, 256), batch_size=12, s=1,
                 lr=0.1, n_ref=8, easy_at=0.5),
}


def _train(cfg, d, y_train, name, seed, *, subsets=None, stop_at=None):
    """One run; returns ``(steps, {subset: accuracy per eval}, loss, test_loss, correct)`` where
    ``correct`` is the last evaluation's per-example correctness; ``stop_at``: stop once the training
    accuracy reaches it."""
    B, lr = cfg["batch_size"], cfg["lr"]
    model = models.mlp(d.x_train.shape[1], d.n_classes, cfg["hidden"], seed=seed)
    inner = torch.optim.SGD(model.parameters(), lr=lr)
    wrap = {"sgd": lambda o: o, "ra3": RA3, "rm3": RM3, "m3": M3, "winsorized": lambda o: Winsorized(o, cfg["s"])}
    opt = wrap[name](inner)
    gen = torch.Generator().manual_seed(seed)
    y = torch.as_tensor(y_train)
    subsets = subsets or {}
    linear = np.arange(0, cfg["n_steps"] + 1, cfg["every"])
    evals = set(np.union1d(linear, probe_steps(cfg["n_steps"], n_log=15)).tolist())  # early steps too
    steps, acc, losses, test_losses = [], {k: [] for k in SUBSETS}, [], []
    for k in range(cfg["n_steps"] + 1):
        if k in evals or stop_at is not None:
            with torch.no_grad():
                out, out_te = model(d.x_train), model(d.x_test)
            correct = (out.argmax(1) == y).cpu().numpy()
            steps.append(k)
            losses.append(F.cross_entropy(out, y).item())
            test_losses.append(F.cross_entropy(out_te, d.y_test).item())
            acc["train"].append(correct.mean())
            acc["test"].append((out_te.argmax(1) == d.y_test).float().mean().item())
            for key in ("pristine", "corrupt", "easy", "hard"):
                mask = subsets.get(key)
                acc[key].append(correct[mask].mean() if mask is not None and mask.any() else np.nan)
            if stop_at is not None and correct.mean() >= stop_at:
                break
        if k == cfg["n_steps"]:
            break
        idx = torch.randint(0, y.shape[0], (B,), generator=gen)
        xb, yb = d.x_train[idx], y[idx]
        if name == "m3":
            b = B // 3

            def closure(i):
                loss = F.cross_entropy(model(xb[i * b:(i + 1) * b]), yb[i * b:(i + 1) * b])
                loss.backward()
                return loss

            opt.step(closure)
        elif name == "winsorized":
            cap, _ = pergrad.capture_backward(model, F.cross_entropy, xb, yb, zero_grad=opt.zero_grad)
            per_example = cap.per_example_grads(B)
            opt.step([per_example[n] for n, _ in model.named_parameters()])
        else:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise FloatingPointError(f"{name} diverged at step {k}; lower `lr`.")
    return np.array(steps), {k: np.array(v, dtype=np.float64) for k, v in acc.items()}, losses, test_losses, correct


def _difficulty(cfg, d, cache, scale, progress_bar):
    """Per training example, the number of reference SGD runs (clean labels, seeds 1..n_ref) that had
    not learned it when their training accuracy first reached ``easy_at``."""
    hard = np.zeros(d.y_train.shape[0], dtype=np.int64)
    for r in range(1, cfg["n_ref"] + 1):
        path = os.path.join(cache, f"{settings_tag(scale, cfg)}_reference_seed{r}.npy")
        learned = resume.read_array(path, shape=hard.shape, dtype=bool)
        if learned is None:
            learned = np.asarray(_train(cfg, d, d.y_train.cpu().numpy(), "sgd", r, stop_at=cfg["easy_at"])[-1], dtype=bool)
            resume.write_array(learned, path)
        hard += ~learned
        if progress_bar is not None:
            progress_bar.update(1)
    return hard


def run(*, scale: str = "default", out: str = "results", progress: bool = True) -> xr.Dataset:
    """Train every (label noise, optimizer) run (resuming from saved ones), write the netCDF file and
    the figure.  Returns a Dataset over ``(label_noise, optimizer, subset, step)``."""
    if scale not in SCALES:
        raise ValueError(f"`scale` must be one of {tuple(SCALES)}; got {scale!r}.")
    cfg = SCALES[scale]
    cache = os.path.join(out, "coherent_gradients_runs")
    os.makedirs(cache, exist_ok=True)
    d = data.digits(seed=0)
    y_clean = d.y_train.cpu().numpy()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg["n_ref"] + len(cfg["noise"]) * len(OPTIMIZERS), desc="coherent gradients", unit="run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is fastest and leaves the other cores free
    try:
        difficulty = _difficulty(cfg, d, cache, scale, bar)
        easy, hard = difficulty == 0, difficulty == cfg["n_ref"]
        rows = []
        for noise in cfg["noise"]:
            y_train, corrupt = data.corrupt_labels(y_clean, noise, d.n_classes, seed=1, redraw=True)
            subsets = {"pristine": ~corrupt, "corrupt": corrupt}
            if noise == 0:
                subsets.update(easy=easy, hard=hard)
            per_opt = []
            for name in OPTIMIZERS:
                path = os.path.join(cache, f"{settings_tag(scale, cfg)}_{name}_noise{noise:g}.nc")
                saved = resume.read(path, variables=("accuracy", "loss", "test_loss"))
                if saved is None:
                    steps, acc, loss, test_loss, _ = _train(cfg, d, y_train, name, 0, subsets=subsets)
                    saved = xr.Dataset({"accuracy": (("subset", "step"), np.stack([acc[k] for k in SUBSETS])),
                                        "loss": ("step", np.array(loss)), "test_loss": ("step", np.array(test_loss))},
                                       coords={"subset": list(SUBSETS), "step": steps})
                    resume.write(saved, path)
                per_opt.append(saved.expand_dims(optimizer=[name]))
                if bar is not None:
                    bar.update(1)
            counts = [y_clean.size, (~corrupt).sum(), corrupt.sum(), d.y_test.shape[0]]
            counts += [easy.sum(), hard.sum()] if noise == 0 else [np.nan, np.nan]  # tracked on clean labels only
            ds = xr.concat(per_opt, dim="optimizer")
            ds["n_examples"] = ("subset", np.array(counts, dtype=np.float64))
            rows.append(ds.expand_dims(label_noise=[noise]))
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
    result = xr.concat(rows, dim="label_noise")
    attach_attrs(result, model="mlp", source="measurement", data="digits", scale=scale, lr=cfg["lr"],
                 batch_size=float(cfg["batch_size"]), momentum=0.0, hidden=list(cfg["hidden"]),
                 winsorization_s=cfg["s"], m3_micro_batch=cfg["batch_size"] // 3, n_reference_runs=cfg["n_ref"],
                 easy_at=cfg["easy_at"], seed=0,
                 note="corrupt accuracy is measured against the noisy label (memorization); NaN where a subset is "
                      "empty or undefined (easy/hard: clean labels only)")
    return publish(result, out, "coherent_gradients", plot)


def plot(result: xr.Dataset, path: str) -> None:
    """Top row, one panel per label-noise level: training accuracy on pristine (solid) and corrupt
    (dashed) examples per optimizer (colour).  Bottom row: test accuracy.  Right column: the
    clean-label runs' training accuracy on easy (solid) and hard (dashed) examples."""
    from matplotlib.lines import Line2D

    noises = result.label_noise.values
    fig, axes = plt.subplots(2, noises.size + 1, figsize=(3.9 * (noises.size + 1) + 1.0, 6.8), squeeze=False,
                             gridspec_kw=dict(width_ratios=[1.0] * noises.size + [1.25]))
    x = result.step.values
    for c, noise in enumerate(noises):
        top, bottom = axes[0, c], axes[1, c]
        for name, (label, color) in OPTIMIZERS.items():
            r = result.accuracy.sel(label_noise=noise, optimizer=name)
            top.plot(x, r.sel(subset="pristine"), "-", color=color, lw=1.2)
            top.plot(x, r.sel(subset="corrupt"), "--", color=color, lw=1.2)
            bottom.plot(x, r.sel(subset="test"), "-", color=color, lw=1.2)
        n = result.n_examples.sel(label_noise=noise)
        top.set_title(f"{noise:.0%} label noise ({int(n.sel(subset='corrupt'))} corrupt, "
                      f"{int(n.sel(subset='pristine'))} pristine)", fontsize=9)
        bottom.set_xlabel("step")
        for ax in (top, bottom):
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
    for ax, noise in zip(axes[0, :-1], noises):  # corrupt examples are scored against their noisy label
        ax.set_ylabel("training accuracy (fraction correct)" if noise == 0 else
                      "training accuracy (fraction correct;\ncorrupt: against the noisy label)")
    for ax in axes[1, :-1]:
        ax.set_ylabel("test accuracy (fraction correct)")
    ez, bars = axes[0, -1], axes[1, -1]
    if 0.0 in noises:
        clean = result.sel(label_noise=0.0)
        for name, (label, color) in OPTIMIZERS.items():  # learning happens early: log steps
            ez.semilogx(x[1:], clean.accuracy.sel(optimizer=name, subset="easy")[1:], "-", color=color, lw=1.2)
            ez.semilogx(x[1:], clean.accuracy.sel(optimizer=name, subset="hard")[1:], "--", color=color, lw=1.2)
        n = clean.n_examples
        ez.set_title(f"0% noise: easy ({int(n.sel(subset='easy'))}) vs hard ({int(n.sel(subset='hard'))})", fontsize=9)
        ez.set_xlabel("step")
        ez.set_ylabel("training accuracy on easy / hard\nexamples (fraction correct)")
        ez.set_ylim(-0.02, 1.02)
        ez.grid(alpha=0.3)
        final = clean.accuracy.isel(step=-1).sel(optimizer=list(OPTIMIZERS))
        pos = np.arange(len(OPTIMIZERS))
        for shift, sub, color in ((-0.2, "easy", "0.75"), (0.2, "hard", "0.35")):
            v = final.sel(subset=sub).values
            bars.bar(pos + shift, v, 0.4, color=color)
            for xi, vi in zip(pos + shift, v):
                bars.text(xi, vi + 0.003, f"{vi:.2f}", ha="center", va="bottom", fontsize=6.5)
        bars.set_xticks(pos, [v[0] for v in OPTIMIZERS.values()], fontsize=8)
        low = float(np.nanmin(final.sel(subset=["easy", "hard"]).values))
        bars.set_ylim(min(0.8, low - 0.05), 1.04)
        bars.set_title(f"0% noise, last step ({int(x[-1])}): light easy, dark hard", fontsize=9)
        bars.set_ylabel("final training accuracy on easy / hard\nexamples (fraction correct)")
        bars.set_xlabel("optimizer")
    handles = [Line2D([], [], color=color, label=label) for label, color in OPTIMIZERS.values()]
    handles += [Line2D([], [], color="0.3", ls="-", label="pristine / easy"),
                Line2D([], [], color="0.3", ls="--", label="corrupt / hard")]
    axes[0, 0].legend(handles=handles, fontsize=8, loc="center right")  # 0% noise: every curve is near 1 from step ~200
    a = result.attrs
    fig.suptitle(f"memorization on digits: MLP {a['hidden']}, SGD lr {a['lr']:g}, B = {a['batch_size']:g}, "
                 f"winsorization s = {a['winsorization_s']} (Zielinski et al., Fig. 2, 3, 5a); all curves measured", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(res) -> str:
    """The final accuracies as a table: one row per (label noise, optimizer), one column per subset
    (pristine, corrupt against the noisy label, test, easy, hard)."""
    final = res.accuracy.isel(step=-1).sel(subset=["pristine", "corrupt", "test", "easy", "hard"])
    table = final.reset_coords(drop=True).to_dataframe().unstack("subset")
    return f"final accuracy (corrupt: against the noisy label):\n{table.to_string(float_format='%.3f')}"


def main(argv=None):
    """The command line ``python -m studies run coherent_gradients`` (``-h`` lists the flags): run at
    the scale the flags choose, print the final accuracies and the files written.

    Args:
        argv: the flags (default: ``sys.argv[1:]``).

    Returns:
        the study's results, as :func:`run` returns them.
    """
    return command(__doc__, run, "coherent_gradients", argv, summary=summary)


if __name__ == "__main__":
    main()
