"""Theory that predicts practice: a network's critical batch size from ONE small-batch run.
Networks: a CNN and a ResNet-8 on the digits, an MLP on MNIST-1D and a GPT-style transformer on the
standard library's source; --quick runs the CNN and the MLP, the default scale adds the ResNet, --full
adds the transformer; --networks picks any of them at any scale.

For each network (a CNN on scikit-learn's digits, an MLP on MNIST-1D, a ResNet-8 without batch norm
on the digits, and at the ``full`` scale a byte-level GPT-style transformer,
:func:`deepmodels.models.transformer`, 1 layer of width 32 and context 16, learning the next byte of
the Python standard library's source, :func:`deepmodels.data.text_corpus`) and optimizer (SGD;
heavy-ball momentum 0.9):

1. **Measured** (Shallue et al. 2019, "Measuring the Effects of Data Parallelism on Neural Network
   Training", at small scale; :func:`deepmodels.steps.measure_steps`): for every batch size the best
   learning rate of a grid (median over seeds) and its steps to a training-loss target, interpolated
   between evaluations; B_crit and S_min of S = S_min (1 + B_crit / B) (McCandlish et al. 2018, "An
   Empirical Model of Large-Batch Training") with a bootstrap interval over seeds.
2. **Reference run**: one run at the smallest batch size and its tuned learning rate, with the
   gradient-noise probe on a schedule (B_simple, biased and unbiased, with bootstrap intervals) and
   parameter snapshots (:func:`deepmodels.predict.reference_run`).
3. **Predicted** from the reference run alone (:func:`deepmodels.predict.predict`): the noise-scale
   integral (McCandlish et al. 2018), NQMs fitted along the run (Zhang et al. 2019, "Which
   Algorithmic Choices Matter at Which Batch Sizes?", piecewise), and the single NQM at
   initialisation (the baseline).
4. **Along training** (Merrill et al. 2025, at small scale): from the checkpoints of the reference
   run, branch runs at several batch sizes measure the local B_crit of the next loss segment, beside
   B_simple at the checkpoint and the local NQM's prediction.
5. **Batch-size warmup**: a run whose batch size follows the measured B_simple
   (:class:`deepmodels.train.NoiseScaleBatch`), its steps and examples to the target beside the
   best constant batch size's.

    python -m studies run theory_vs_practice --quick                    # CNN and MLP, 3 batch sizes, 2 seeds
    python -m studies run theory_vs_practice --scheduler local          # CNN, MLP, ResNet, 7 batch sizes, 3 seeds
    python -m studies run theory_vs_practice --full --scheduler local   # 4 networks, 9 batch sizes, 5 seeds (hours)
    python -m studies run theory_vs_practice --quick --networks transformer   # the transformer alone, 3 batch sizes

The transformer (row "transformer, stdlib text") is trained and probed as the other networks: its
examples are windows of 16 bytes, so a batch size counts sequences, and B_simple, the NQMs' noise and
every B_crit are per sequence (16 next-byte predictions); its loss is the mean next-byte
cross-entropy in nats over all positions (ln 256 = 5.55 at initialisation, a unigram model of the
corpus 3.2), with targets below the unigram plateau (2.9 at ``--quick``, 2.7 at ``--full``) and its
own grid of effective learning rates (plain SGD's best lr is 0.125-0.25 from B = 4 to 256
sequences, lr 0.5 is already slower and lr 2 diverges, at every batch size; heavy ball's best
effective lr is 0.5-1, effective lr 2 is slower); ``OVERRIDES`` lists its settings per scale.
A batch size whose tuned runs do not reach the target is ``inf`` in ``measured`` (its note says why)
and marked "inf (not reached)" in the figure.

Writes ``theory_vs_practice.nc`` (groups ``summary``, ``measured``, ``predicted``, ``along``,
``warmup``, ``aggregations`` (:func:`aggregations`) and one ``reference_<network>_<optimizer>`` per case) and ``theory_vs_practice.png``.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from deepmodels import data, predict, steps
from deepmodels.models import Factory, Restored
from deepmodels.train import NoiseScaleBatch, train
from toymodels import resume
from toymodels.critical import piecewise_prediction
from toymodels.parallel import local_cluster
from toymodels.schema import attach_attrs
from toymodels.stats import fit_critical_batch

from . import style
from ._io import parser, publish, scale_of, settings_tag

OPTIMIZERS = {"sgd": 0.0, "momentum": 0.9}
# the effective learning rate lr / (1 - beta) spans the same grid for both optimizers
_LRS = {"quick": np.geomspace(0.05, 0.8, 3), "default": np.geomspace(0.03, 1.0, 5),
        "full": np.geomspace(0.02, 1.5, 9), "tiny": np.array([0.1, 0.3])}

CONFIG = {
    "tiny": dict(networks=("cnn",), optimizers=("sgd",), batch_sizes=[4, 32], seeds=[0, 1], max_steps=300,
                 eval_every=10, n_segments=2, branch_batch_sizes=[4, 32], branch_lrs=2, k=6, probe_size=64,
                 n_probes=20, n_boot=200, cap_factor=2.0, prune_factor=2.0),
    "quick": dict(networks=("cnn", "mlp1d"), optimizers=("sgd", "momentum"), batch_sizes=[4, 32, 256],
                  seeds=[0, 1], max_steps=800, eval_every=10, n_segments=3, branch_batch_sizes=[4, 64],
                  branch_lrs=2, k=8, probe_size=128, n_probes=30, n_boot=500, cap_factor=2.0, prune_factor=2.0),
    "default": dict(networks=("cnn", "mlp1d", "resnet"), optimizers=("sgd", "momentum"),
                    batch_sizes=[4, 8, 16, 32, 64, 128, 256], seeds=[0, 1, 2], max_steps=1500, eval_every=20,
                    n_segments=4, branch_batch_sizes=[4, 16, 64, 256], branch_lrs=3, k=20, probe_size=256,
                    n_probes=60, n_boot=1000, cap_factor=2.0, prune_factor=2.0),
    "full": dict(networks=("cnn", "mlp1d", "resnet", "transformer"), optimizers=("sgd", "momentum"),
                 batch_sizes=[2, 4, 8, 16, 32, 64, 128, 256, 512], seeds=[0, 1, 2, 3, 4], max_steps=4000,
                 eval_every=10, n_segments=6, branch_batch_sizes=[4, 16, 64, 256], branch_lrs=5, k=40,
                 probe_size=512, n_probes=100, n_boot=2000, cap_factor=2.0, prune_factor=2.0),
}

# the transformer's size per scale: context length (bytes), width, layers, heads and corpus bytes;
# tiny for the tests, a 1-layer model of 21k parameters on 2204 training windows of 16 bytes for the
# study (every evaluation of the training loss is a pass over the whole training set)
TRANSFORMER = {"tiny": dict(context=8, d_model=8, n_layers=1, n_heads=2, max_bytes=2**13),
               "quick": dict(context=16, d_model=32, n_layers=1, n_heads=2, max_bytes=2**16),
               "default": dict(context=16, d_model=32, n_layers=1, n_heads=2, max_bytes=2**16),
               "full": dict(context=16, d_model=32, n_layers=1, n_heads=2, max_bytes=2**16)}


def _text(scale):
    t = TRANSFORMER[scale]
    return data.text_corpus(context_length=t["context"], max_bytes=t["max_bytes"], seed=0)


def _gpt(scale):
    t = TRANSFORMER[scale]
    return Factory("transformer", 256, t["context"], d_model=t["d_model"], n_layers=t["n_layers"], n_heads=t["n_heads"])


# name: (data per scale, model factory per scale, label, training-loss target per scale); the
# transformer's loss is the mean next-byte loss in nats (ln 256 = 5.55 at initialisation; a unigram
# model of the corpus reaches 3.2, a bigram one 2.4)
NETWORKS = {
    "cnn": (lambda scale: data.digits(seed=0, flatten=False), lambda scale: Factory("cnn", 1, 10, 8, width=8),
            "CNN, digits", {"tiny": 1.0, "quick": 0.4, "default": 0.3, "full": 0.2}),
    "mlp1d": (lambda scale: data.mnist1d(n_samples=4000, seed=0), lambda scale: Factory("mlp", 40, 10, (64, 64)),
              "MLP, MNIST-1D", {"tiny": 2.0, "quick": 1.6, "default": 1.5, "full": 1.3}),
    "resnet": (lambda scale: data.digits(seed=0, flatten=False),
               lambda scale: Factory("resnet8", 1, 10, width=4, batch_norm=False),
               "ResNet-8 (no BN), digits", {"tiny": 1.0, "quick": 0.4, "default": 0.4, "full": 0.2}),
    "transformer": (_text, _gpt, "transformer, stdlib text", {"tiny": 3.7, "quick": 2.9, "default": 2.8, "full": 2.7}),
}
# the ResNet's steps cost 3x the CNN's (many small layers): a coarser batch-size grid at the default
# scale keeps the study under 20 minutes; the transformer has its own grid of effective learning rates
# lr / (1 - momentum) (SGD's optimum 0.125-0.25 at --quick, heavy ball's 0.5-1), more steps and fewer
# evaluations
OVERRIDES = {("resnet", "default"): dict(batch_sizes=[4, 16, 64, 256], branch_batch_sizes=[4, 32, 256]),
             ("transformer", "tiny"): dict(lrs=[0.5, 1.0], max_steps=200, fit_size=128),
             ("transformer", "quick"): dict(lrs=[0.0625, 0.125, 0.25, 0.5, 1.0, 2.0], max_steps=3000, eval_every=20),
             ("transformer", "default"): dict(lrs=[0.0625, 0.125, 0.25, 0.5, 1.0, 2.0], max_steps=4000, eval_every=20),
             ("transformer", "full"): dict(lrs=np.geomspace(0.04, 2.0, 8).tolist(), max_steps=6000, eval_every=20)}


def _case(net, opt, cfg, scale, out, scheduler, progress):
    """Measure, run the reference, predict, branch and warm up for one network and optimizer."""
    make_data, make_factory, label, targets = NETWORKS[net]
    cfg = dict(cfg, **OVERRIDES.get((net, scale), {}))
    d, factory, target, mom = make_data(scale), make_factory(scale), targets[scale], OPTIMIZERS[opt]
    lrs = [float(v) * (1 - mom) for v in cfg.get("lrs", _LRS[scale])]
    tag = settings_tag(scale, dict(cfg, target=target))
    folder = os.path.join(out, f"theory_vs_practice_{net}_{opt}_{tag}")
    os.makedirs(folder, exist_ok=True)
    run_kw = dict(target=target, max_steps=cfg["max_steps"], eval_every=cfg["eval_every"], progress=progress,
                  executor=scheduler or "serial")
    measured = _measure(factory, d, lrs, mom, cfg, folder, run_kw)
    # the reference run: the smallest batch size whose tuned runs reach the target, at its own tuned
    # learning rate (seed 0)
    finite = np.flatnonzero(np.isfinite(measured.steps_best.values))
    if finite.size == 0:
        raise RuntimeError(f"{label}, {opt}: no batch size and learning rate of the grid reaches the target {target} "
                           f"within {cfg['max_steps']} steps.")
    b_ref = float(measured.batch_size.values[finite[0]])
    lr_ref = float(measured.lr_opt.sel(batch_size=b_ref))
    ref, snaps = predict.reference_run(factory(0), d, lr=lr_ref, batch_size=int(b_ref), momentum=mom, target=target,
                                       n_steps=cfg["max_steps"], eval_every=max(1, cfg["eval_every"] // 4),
                                       probe_size=cfg["probe_size"], n_probes=cfg["n_probes"], path=os.path.join(folder, "reference.nc"),
                                       progress=progress)
    # predictions at every batch size of the scale (a network may be measured on a coarser grid)
    pred_bs = sorted(set(CONFIG[scale]["batch_sizes"]) | set(cfg["batch_sizes"]))
    pred = predict.predict(ref, snaps, factory(0), F.cross_entropy, d, batch_sizes=pred_bs, target=target,
                           momentum=mom, n_segments=cfg["n_segments"], k=cfg["k"], fit_size=cfg.get("fit_size", 512))
    along = _along(ref, snaps, pred, factory, d, mom, lrs, cfg, folder, scheduler, progress)
    warm = _warmup(factory, d, measured, b_ref, mom, target, cfg, folder, progress)
    return measured, ref, pred, along, warm


def _measure(factory, d, lrs, mom, cfg, folder, run_kw):
    """The grid of batch sizes x learning rates x seeds, without spending time on runs that cannot be
    the tuned optimum.

    1. Seed 0 at every batch size and learning rate, the smallest batch sizes first up to the first
       whose best run reaches the target (B_first); the larger ones with at most ``cap_factor`` times
       that run's steps (a larger batch at its best learning rate does not need more steps than a
       smaller one, so a run still going by then is at a learning rate that is not the best).
    2. The other seeds only at the learning rates whose seed-0 run needed at most ``prune_factor``
       times the best seed-0 steps of that batch size; the pruned settings count as ``inf`` for those
       seeds (the tuned median and the bootstrap never choose them).
    The summary (best per batch size, B_crit with its interval) comes from all the runs
    (:func:`deepmodels.steps.summarize`); attrs say what was capped and pruned.
    """
    bss, seeds = list(cfg["batch_sizes"]), list(cfg["seeds"])
    grid = os.path.join(folder, "grid")

    def measure(batch_sizes, lr_list, seed_list, max_steps):
        return steps.measure_steps(factory, d, batch_sizes=batch_sizes, lrs=lr_list, momenta=[mom], seeds=seed_list,
                                   path=grid, n_boot=2, **dict(run_kw, max_steps=max_steps)).steps_to_target

    first, cap, parts = 0, run_kw["max_steps"], []
    while True:
        parts.append(measure([bss[first]], lrs, seeds[:1], cap))
        if np.isfinite(parts[-1].values).any() or first == len(bss) - 1:
            break
        first += 1
    reached = np.isfinite(parts[-1].values).any()
    if reached and first < len(bss) - 1:
        best0 = float(np.min(parts[-1].values))
        every = run_kw["eval_every"]
        cap = int(min(run_kw["max_steps"], math.ceil(cfg["cap_factor"] * best0 / every) * every))
        parts.append(measure(bss[first + 1:], lrs, seeds[:1], cap))
    seed0 = xr.concat(parts, dim="batch_size")  # (batch_size, lr, momentum, seed=[seeds[0]])
    runs = np.full((len(bss), len(lrs), 1, len(seeds)), np.inf)
    runs[:, :, :, :1] = seed0.values
    n_pruned = 0
    for i, b in enumerate(bss):
        s0 = seed0.values[i, :, 0, 0]
        if not np.isfinite(s0).any() or len(seeds) == 1:
            continue
        keep = [j for j in range(len(lrs)) if s0[j] <= cfg["prune_factor"] * np.min(s0)]
        n_pruned += (len(lrs) - len(keep)) * (len(seeds) - 1)
        more = measure([b], [lrs[j] for j in keep], seeds[1:], cap if i > first else run_kw["max_steps"])
        runs[i, keep, :, 1:] = more.values[0]
    arr = xr.DataArray(runs, dims=("batch_size", "lr", "momentum", "seed"),
                       coords={"batch_size": np.asarray(bss, dtype=np.float64), "lr": lrs, "momentum": [mom],
                               "seed": seeds})
    out = steps.summarize(arr, target=run_kw["target"], max_steps=run_kw["max_steps"], eval_every=run_kw["eval_every"],
                          n_boot=cfg["n_boot"])
    out.attrs.update(capped_max_steps=cap, capped_from_batch_size=float(bss[min(first + 1, len(bss) - 1)]),
                     pruned_runs=n_pruned, prune_factor=cfg["prune_factor"], cap_factor=cfg["cap_factor"])
    return out


def _along(ref, snaps, pred, factory, d, mom, lrs, cfg, folder, scheduler, progress):
    """Local B_crit of each loss segment of the reference run, from branch runs at its checkpoints."""
    cps = np.asarray(pred.attrs["checkpoints"], dtype=np.float64)
    ratios = np.asarray(pred.attrs["segment_ratios"], dtype=np.float64)
    losses = np.interp(cps, ref.step.values, ref.loss.values)
    local, b_simple, b_simple_u, nqm_local = [], [], [], []
    # branch runs use the learning rates of the grid around the reference one
    j = int(np.argmin(np.abs(np.log(np.asarray(lrs) / float(ref.attrs["lr"])))))
    branch_lrs = sorted(lrs[max(0, j - cfg["branch_lrs"] // 2): j + (cfg["branch_lrs"] + 1) // 2 + 1])[: cfg["branch_lrs"]]
    for i, c in enumerate(cps):
        seg_target = float(losses[i] * ratios[i])
        fn = Restored(factory, snaps[int(c)], label=f"step {int(c)}")
        m = steps.measure_steps(fn, d, batch_sizes=cfg["branch_batch_sizes"], lrs=branch_lrs, momenta=[mom],
                                seeds=[0], target=seg_target, max_steps=cfg["max_steps"],
                                eval_every=max(1, cfg["eval_every"] // 4),  # short segments: evaluate often
                                path=os.path.join(folder, f"branch_{int(c)}"), executor=scheduler or "serial",
                                progress=progress, n_boot=2)
        local.append(float(m.b_crit))
        row = ref.sel(step=c, layer="total")
        b_simple.append(float(row.noise_scale))
        b_simple_u.append(float(row.noise_scale_unbiased))
        nqm_local.append(float(pred.attrs["local_b_crit"][i]))
    ds = xr.Dataset({"local_b_crit": ("checkpoint", local), "noise_scale": ("checkpoint", b_simple),
                     "noise_scale_unbiased": ("checkpoint", b_simple_u), "b_crit_pred": ("checkpoint", nqm_local),
                     "loss": ("checkpoint", losses)},
                    coords={"checkpoint": np.arange(cps.size), "step": ("checkpoint", cps)})
    attach_attrs(ds, model="network", source="measurement", branch_lrs=branch_lrs,
                 note="b_crit_pred: the NQM fitted at the checkpoint, for its own segment (theory)")
    return ds


def _warmup(factory, d, measured, b_ref, mom, target, cfg, folder, progress):
    """A run whose batch size follows the measured unbiased B_simple (a warmup from B_ref), at the
    grid's tuned learning rate of each batch size, vs the best constant batch size."""
    finite = np.isfinite(measured.lr_opt.values)
    lr_of = {float(b): float(v) for b, v in zip(measured.batch_size.values[finite], measured.lr_opt.values[finite])}
    rule = NoiseScaleBatch(int(b_ref), int(max(cfg["batch_sizes"])), estimate="unbiased", lr=lr_of)
    run = train(factory(0), d, batch_size=rule, n_steps=cfg["max_steps"], momentum=mom,
                probe_at=np.arange(0, cfg["max_steps"] + 1, max(cfg["eval_every"], cfg["max_steps"] // 50)),
                probe_size=cfg["probe_size"], target=target, eval_every=cfg["eval_every"],
                path=os.path.join(folder, "warmup.nc"), progress=progress)
    best = measured.steps_best.values
    bs = measured.batch_size.values
    examples = best * bs
    i_steps, i_examples = int(np.argmin(best)), int(np.argmin(examples))
    final_b = float(run.batch_size_now.values[-1]) if run.sizes.get("step", 0) else float(b_ref)
    # rows: the warmup, the constant batch size with the fewest steps, the one with the fewest examples
    return dict(steps_to_target=[float(run.attrs["steps_to_target"]), float(best[i_steps]), float(best[i_examples])],
                examples_to_target=[float(run.attrs["examples_to_target"]), float(examples[i_steps]),
                                    float(examples[i_examples])],
                batch_size_now=[final_b, float(bs[i_steps]), float(bs[i_examples])])


def _names(arg, value, known):
    names = (value,) if isinstance(value, str) else tuple(value)
    if not names or any(n not in known for n in names):
        raise ValueError(f"`{arg}` must be a non-empty sequence of {tuple(known)}; got {value!r}.")
    return tuple(dict.fromkeys(names))


WARMUP_ROWS = ["noise_scale_warmup", "constant_fewest_steps", "constant_fewest_examples"]


def run(*, scale: str = "default", out: str = "results", scheduler=None, progress: bool = True, networks=None,
        optimizers=None):
    """Every network and optimizer of the scale; writes ``theory_vs_practice.nc`` and ``.png``.

    ``networks`` / ``optimizers``: names of :data:`NETWORKS` / :data:`OPTIMIZERS` to run instead of
    the scale's own (``CONFIG[scale]["networks"]``, ``["optimizers"]``), e.g. ``networks=
    ("transformer",)`` at the ``"tiny"`` scale; each case at the scale's settings (and its
    :data:`OVERRIDES`), so it reuses (and leaves for reuse) the saved runs of the same case run with
    the scale's own lists."""
    if scale not in CONFIG:
        raise ValueError(f"`scale` must be one of {tuple(CONFIG)}; got {scale!r}.")
    cfg = CONFIG[scale]
    nets, opts = cfg["networks"], cfg["optimizers"]  # not written into cfg: the resume tags stay those of the scale
    if networks is not None:
        nets = _names("networks", networks, NETWORKS)
    if optimizers is not None:
        opts = _names("optimizers", optimizers, OPTIMIZERS)
    os.makedirs(out, exist_ok=True)
    cases, seconds = {}, {}
    with contextlib.ExitStack() as stack:
        if scheduler == "local":  # one LocalCluster for every grid of the study (not one per grid)
            scheduler = stack.enter_context(local_cluster(2))
            scheduler.run(torch.set_num_threads, 1)  # one thread per worker process: no oversubscribed cores
        for net in nets:
            for opt in opts:
                t0 = time.perf_counter()
                cases[(net, opt)] = _case(net, opt, cfg, scale, out, scheduler, progress)
                seconds[f"seconds_{net}_{opt}"] = round(time.perf_counter() - t0, 1)
                if progress:
                    print(f"{net}, {opt}: {seconds[f'seconds_{net}_{opt}']:.0f} s", flush=True)
    result = _assemble(cases, cfg, scale)
    result["aggregations"] = aggregations(result)
    result["summary"].attrs.update(seconds)  # this run's wall time per case (resumed parts cost ~0)
    return publish(result, out, "theory_vs_practice", plot)


def _assemble(cases, cfg, scale):
    nets = list(dict.fromkeys(n for n, _ in cases))
    opts = list(dict.fromkeys(o for _, o in cases))

    def grid(fn, dims=()):
        return np.array([[fn(*cases[(n, o)]) for o in opts] for n in nets])

    kept = ["steps_best", "steps_per_seed", "lr_opt", "lr_eff_opt"]  # lr_eff_opt: lr / (1 - momentum)
    measured = xr.concat([xr.concat([cases[(n, o)][0][kept].drop_attrs().expand_dims(optimizer=[o]) for o in opts],
                                    dim="optimizer", join="outer")
                          .expand_dims(network=[n]) for n in nets], dim="network", join="outer")  # NaN: not run
    summary = xr.Dataset(coords={"network": nets, "optimizer": opts})
    for v in ("b_crit", "b_crit_lo", "b_crit_hi", "s_min", "s_min_lo", "s_min_hi"):
        summary[v] = (("network", "optimizer"), grid(lambda m, *_: float(m[v]), ))
    predicted = xr.concat([xr.concat([cases[(n, o)][2][["steps_to_target", "b_crit", "s_min", "b_crit_lo", "b_crit_hi"]]
                                      .drop_attrs().expand_dims(optimizer=[o]) for o in opts], dim="optimizer")
                           .expand_dims(network=[n]) for n in nets], dim="network")
    summary["b_crit_pred"] = predicted.b_crit
    labels = [NETWORKS[n][2] for n in nets]
    common = dict(scale=scale, networks=labels, targets=[NETWORKS[n][3][scale] for n in nets],
                  batch_sizes=cfg["batch_sizes"], seeds=cfg["seeds"], ci_level=0.95)
    attach_attrs(summary, model="network", source="measurement",
                 note="b_crit*: measured (fit to the tuned steps, bootstrap over seeds); b_crit_pred: theory, from one "
                      "reference run at the smallest batch size", **common)
    attach_attrs(measured, model="network", source="measurement",
                 note="steps_best, steps_per_seed: inf where the target was not reached: no learning rate of the grid "
                      "reached it within max_steps (capped_max_steps above the first batch size that did, as "
                      "_measure says) in at least half the seeds, or the loss diverged; NaN: a batch size this "
                      "network was not run at", **common)
    attach_attrs(predicted, model="network", source="theory", **common)
    along = xr.concat([xr.concat([cases[(n, o)][3].drop_attrs().expand_dims(optimizer=[o]) for o in opts],
                                 dim="optimizer", join="outer", fill_value=np.inf, coords="different", compat="equals")
                       .expand_dims(network=[n]) for n in nets], dim="network", join="outer", fill_value=np.inf,
                      coords="different", compat="equals")  # `step` differs per case: concatenated too
    attach_attrs(along, model="network", source="measurement",
                 note="checkpoint j of each case's reference run, at the reference step `step` (inf where a case "
                      "has fewer checkpoints); local_b_crit from branch runs (measured, one seed), b_crit_pred from "
                      "the NQM fitted at the checkpoint for its own segment (theory)", **common)
    warm = xr.Dataset(coords={"network": nets, "optimizer": opts, "schedule": WARMUP_ROWS})
    for key in ("steps_to_target", "examples_to_target", "batch_size_now"):
        warm[key] = (("network", "optimizer", "schedule"), np.array([[cases[(n, o)][4][key] for o in opts] for n in nets]))
    attach_attrs(warm, model="network", source="measurement",
                 note="noise_scale_warmup: one run (seed 0) whose batch size follows the measured unbiased B_simple "
                      "(batch_size_now: its last batch size); constant_*: the grid's median over seeds at the "
                      "constant batch size with the fewest steps / examples", **common)
    result = {"summary": summary, "measured": measured, "predicted": predicted, "along": along, "warmup": warm}
    for (n, o), c in cases.items():
        ref = c[1]
        keep = [v for v in ("loss", "noise_scale", "noise_scale_unbiased", "noise_scale_ci", "noise_scale_unbiased_ci")
                if v in ref]
        r = ref[keep].sel(layer="total").drop_vars("layer")
        result[f"reference_{n}_{o}"] = r
    return result


AGGREGATIONS = ("at_init", "time_average", "median", "at_target", "ds_min_weighted")


def aggregations(result) -> xr.Dataset:
    """B_crit predicted by five ways of reducing the reference run's B_simple to one number, beside
    the measured B_crit: why the noise-scale predictor weights B_simple by dS_min.

    Over the reference run's steps up to its crossing S_ref, with B_simple read where it is finite
    and >= 0 (linearly interpolated between probes): ``at_init`` (step 0), ``time_average`` (plain
    average over [0, S_ref]), ``median`` (of the probes up to S_ref), ``at_target`` (the last probe
    up to S_ref), and ``ds_min_weighted``, the one derived from McCandlish et al. 2018's
    dS = dS_min (1 + B_noise / B) (:func:`toymodels.critical.noise_scale_prediction`). Only the last
    has a derivation; the others are the alternatives the study rejects, kept so the comparison
    reproduces: ``python -m studies run theory_vs_practice`` prints it.

    Returns:
        Dataset over ``network``, ``optimizer``, ``estimate`` ("unbiased", "biased") and
        ``aggregation``: ``b_crit_pred`` (theory) and ``b_crit`` (measured, for the ratio).
    """
    from toymodels.critical import noise_scale_prediction

    summ = result["summary"]
    nets, opts = list(summ.network.values), list(summ.optimizer.values)
    out = np.full((len(nets), len(opts), 2, len(AGGREGATIONS)), np.nan)
    for i, n in enumerate(nets):
        for j, o in enumerate(opts):
            ref = result[f"reference_{n}_{o}"]
            s_ref = float(ref.attrs["steps_to_target"])
            b_ref = float(ref.attrs["batch_size"])
            k = ref.step.values.astype(np.float64)
            for e, var in enumerate(("noise_scale_unbiased", "noise_scale")):
                raw = ref[var].values.astype(np.float64)
                ok = np.isfinite(raw) & (raw >= 0)
                inside = ok & (k <= s_ref)
                grid = np.linspace(0.0, s_ref, 2001)
                on_grid = np.interp(grid, k[ok], raw[ok])
                out[i, j, e] = [raw[ok][0], np.trapezoid(on_grid, grid) / s_ref, np.median(raw[inside]),
                                raw[inside][-1],
                                float(noise_scale_prediction(k, raw, b_ref, s_ref, [b_ref, 2 * b_ref]).b_crit)]
    ds = xr.Dataset({"b_crit_pred": (("network", "optimizer", "estimate", "aggregation"), out)},
                    coords={"network": nets, "optimizer": opts, "estimate": ["unbiased", "biased"],
                            "aggregation": list(AGGREGATIONS)})
    ds["b_crit"] = summ.b_crit
    attach_attrs(ds, model="network", source="theory",
                 note="b_crit_pred: B_simple of the reference run reduced by each aggregation (theory); b_crit: "
                      "measured")
    return ds


def aggregation_table(agg: xr.Dataset) -> str:
    """Per aggregation and estimate: cases within a factor 2 of the measured B_crit and the mean
    |log2(predicted / measured)|, as a text table."""
    r = np.abs(np.log2(agg.b_crit_pred / agg.b_crit))
    n = int(agg.sizes["network"] * agg.sizes["optimizer"])
    lines = [f"{'aggregation of B_simple':24s} {'estimate':9s} within 2x  mean |log2(pred/measured)|"]
    for a in agg.aggregation.values:
        for e in agg.estimate.values:
            v = r.sel(aggregation=a, estimate=e).values
            lines.append(f"{a:24s} {e:9s} {int((v <= 1).sum()):3d} of {n}  {float(np.mean(v)):.2f}")
    return "\n".join(lines)


_RATIO_ZERO = 1e-9  # predicted / measured B_crit at or below this: a B_crit of 0 up to rounding
_PRED_STYLE = {"noise_scale": ("C1", "-"), "noise_scale_biased": ("C1", ":"), "piecewise_nqm": ("C2", "-"),
               "nqm_at_init": ("C7", "--")}


def plot(result, path):
    """Per network: steps vs batch size per optimizer (measured markers with the seeds' range, each
    predictor a line); B_simple and the local B_crit along training; predicted / measured B_crit."""
    import matplotlib.pyplot as plt

    summ, meas, pred, along = result["summary"], result["measured"], result["predicted"], result["along"]
    nets, opts = list(summ.network.values), list(summ.optimizer.values)
    labels = dict(zip(nets, _as_list(summ.attrs["networks"])))
    fig, axes = plt.subplots(len(nets), len(opts) + 2, figsize=(5.0 * (len(opts) + 2), 4.0 * len(nets)), squeeze=False)
    for r, n in enumerate(nets):
        for c, o in enumerate(opts):
            ax = axes[r, c]
            m = meas.sel(network=n, optimizer=o)
            b = m.batch_size.values
            per_seed = m.steps_per_seed.values
            best = m.steps_best.values
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: batch sizes not run
                lo = np.nanmin(np.where(np.isfinite(per_seed), per_seed, np.nan), 1)
                hi = np.nanmax(np.where(np.isnan(per_seed), -np.inf, per_seed), 1)
            fin = np.isfinite(best)
            err = np.vstack([best - lo, np.where(np.isfinite(hi), hi, best) - best])
            style.draw(ax, b[fin], best[fin], source="measurement", err=err[:, fin], color="k",
                       label="median over seeds, bars: seed range")
            _mark_inf(ax, b[np.isinf(best)], "not reached")  # (NaN: a batch size this network was not run at)
            bc = float(summ.b_crit.sel(network=n, optimizer=o))
            ax.axvspan(float(summ.b_crit_lo.sel(network=n, optimizer=o)), float(summ.b_crit_hi.sel(network=n, optimizer=o)),
                       color="0.85", zorder=0, label=f"measured B_crit {bc:.3g} (95% bootstrap)")
            for p in pred.predictor.values:
                col, ls = _PRED_STYLE.get(str(p), ("C3", "-"))
                y = pred.steps_to_target.sel(network=n, optimizer=o, predictor=p).values
                bp = float(pred.b_crit.sel(network=n, optimizer=o, predictor=p))
                ok = np.isfinite(y)
                ax.plot(b[ok], y[ok], color=col, ls=ls, label=f"{p} (theory): B_crit {bp:.3g}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("batch size B")
            ax.set_ylabel("steps to target")
            ax.set_title(f"{labels[n]}, {o}")
            ax.legend(fontsize=6.5, loc="upper right")
        ax = axes[r, len(opts)]
        for c, o in enumerate(opts):
            ref = result[f"reference_{n}_{o}"]
            k = ref.step.values
            col = f"C{c}"
            ax.plot(k, ref.noise_scale_unbiased.values, color=col, lw=1, label=f"B_simple unbiased, {o} (measured)")
            ax.plot(k, ref.noise_scale.values, color=col, lw=1, ls=":", label=f"B_simple biased, {o} (measured)")
            a = along.sel(network=n, optimizer=o)
            cp = a.step.values
            okc = np.isfinite(cp)
            ax.plot(cp[okc], a.local_b_crit.values[okc], "o", color=col, ms=6, mfc="none",
                    label=f"local B_crit from branch runs, {o} (measured)")
            ax.plot(cp[okc], a.b_crit_pred.values[okc], "s", color=col, ms=4,
                    label=f"local NQM's B_crit, {o} (theory)")
        ax.set_yscale("log")
        ax.set_xlabel("step of the reference run")
        ax.set_ylabel("batch size")
        ax.set_title(f"{labels[n]}: noise scale along training")
        if r == 0:  # the same entries in every row: once, below the figure
            fig.legend(*ax.get_legend_handles_labels(), fontsize=7.5, ncol=4, loc="lower center")
        ax = axes[r, len(opts) + 1]
        preds = list(pred.predictor.values)
        width = 0.8 / len(preds)
        for i, p in enumerate(preds):
            ratio = (summ.b_crit_pred.sel(network=n, predictor=p) / summ.b_crit.sel(network=n)).values
            x = np.arange(len(opts)) + (i - (len(preds) - 1) / 2) * width
            col = _PRED_STYLE.get(str(p), ("C3", "-"))[0]
            # a flat predicted S(B) (an NQM whose gradient dwarfs its noise) fits B_crit = 0 up to
            # rounding (1e-16): written "0", not drawn as a bar of -50 that squeezes the others
            shown = np.where(np.isfinite(ratio) & (ratio > _RATIO_ZERO), ratio, np.nan)
            ax.bar(x, np.log2(shown), width, color=col, alpha=0.5 if "biased" in str(p) or p == "nqm_at_init" else 0.9,
                   label=str(p))
            for xi, rv in zip(x, ratio):
                if not (np.isfinite(rv) and rv > _RATIO_ZERO):
                    ax.text(xi, 0, "inf" if rv == np.inf else "0" if 0 <= rv <= _RATIO_ZERO else "n/a", ha="center",
                            fontsize=7)
        lo = np.log2((summ.b_crit_lo / summ.b_crit).sel(network=n).values)
        hi = np.log2((summ.b_crit_hi / summ.b_crit).sel(network=n).values)
        for j in range(len(opts)):
            ax.plot([j - 0.45, j + 0.45], [lo[j], lo[j]], color="0.4", lw=0.8)
            ax.plot([j - 0.45, j + 0.45], [hi[j], hi[j]], color="0.4", lw=0.8)
        ax.axhspan(-1, 1, color="C2", alpha=0.08, label="within a factor 2")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(range(len(opts)), opts)
        ax.set_ylabel("log2(predicted / measured B_crit)")
        ax.set_title(f"{labels[n]}: predicted / measured B_crit", fontsize=10)
        ax.text(0.02, 0.02, "grey lines: the measured 95% interval", transform=ax.transAxes, fontsize=7, color="0.3")
        if r == 0:
            ax.legend(fontsize=6.5, framealpha=0.6)
    fig.suptitle("Critical batch size predicted from one reference run at the smallest batch size vs measured "
                 f"(scale {summ.attrs['scale']}, targets {summ.attrs['targets']})", fontsize=10)
    style.save(fig, path, rect=(0, 0.05, 1, 1))  # room for the legend of the noise-scale panels


def _as_list(v):
    if isinstance(v, str):
        import ast

        try:
            return list(ast.literal_eval(v))
        except (ValueError, SyntaxError):
            return [v]
    return list(np.atleast_1d(v))


def _mark_inf(ax, b, text):
    for x in b:
        ax.annotate(f"inf ({text})", (x, 1), xycoords=("data", "axes fraction"), xytext=(0, -10),
                    textcoords="offset points", ha="center", fontsize=6, color="C3")


def _network_names(text: str) -> tuple:
    """The ``--networks`` flag: comma-separated names of :data:`NETWORKS`."""
    import argparse

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names or any(n not in NETWORKS for n in names):
        raise argparse.ArgumentTypeError(f"must be comma-separated names of {', '.join(NETWORKS)}; got {text!r}")
    return names


def main(argv=None):
    """The command line ``python -m studies run theory_vs_practice`` (``-h`` lists the flags): runs
    every network and optimizer of the scale and prints the measured critical batch sizes with their
    intervals, the ratio predicted / measured per predictor, and the files written.

    Args:
        argv: the flags (default: ``sys.argv[1:]``).
    """
    p = parser(__doc__, scheduler=True)
    p.add_argument("--networks", default=None, type=_network_names,
                   help=f"comma-separated networks to run instead of the scale's own, of {', '.join(NETWORKS)} "
                        "(the scales run: --quick cnn,mlp1d; default cnn,mlp1d,resnet; --full all four, the "
                        "transformer included), e.g. --quick --networks transformer")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    res = run(scale=scale_of(a), out=a.out, scheduler=a.scheduler, progress=not a.no_progress, networks=a.networks)
    s = res["summary"]
    print(s[["b_crit", "b_crit_lo", "b_crit_hi"]].to_dataframe().to_string())
    print((s.b_crit_pred / s.b_crit).to_dataframe(name="predicted / measured B_crit").unstack("predictor").to_string())
    print(aggregation_table(res["aggregations"]))
    print(f"wrote {a.out}/theory_vs_practice.nc and .png in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
