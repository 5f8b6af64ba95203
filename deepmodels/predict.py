"""A network's steps to target and critical batch size predicted from ONE reference run.

The reference run trains at a small batch size B_ref (its own tuned learning rate) with the
gradient-statistics probe on a schedule and a snapshot of the parameters at every probe
(:func:`reference_run`).  From it alone (never from measured steps at other batch sizes) three
predictors give S(B) and B_crit (:func:`predict`; the formulas in :mod:`toymodels.critical`):

* ``"noise_scale"``: McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training"): the
  measured B_simple along the run, averaged with weights dS_min = dk / (1 + B_simple(k) / B_ref)
  over the stretch the target needs; from the unbiased B_simple (``"noise_scale"``) and from the
  biased one (``"noise_scale_biased"``), each with the interval of the probe's bootstrap.
* ``"piecewise_nqm"``: noisy quadratic models (Zhang et al. 2019, "Which Algorithmic Choices
  Matter at Which Batch Sizes?") fitted at checkpoints of the run
  (:func:`deepmodels.bridge.fit_nqm`), each predicting its loss segment, summed; one learning rate
  per run and batch size, as the measurement tunes it.
* ``"nqm_at_init"``: the single NQM fitted at step 0 (the piecewise NQM with one segment), the
  baseline.
"""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from toymodels import SGD, Momentum, resume
from toymodels.critical import noise_scale_prediction, piecewise_prediction
from toymodels.schema import attach_attrs

from . import _validate as V
from . import bridge
from toymodels._validate import Array

from ._validate import Instance, Integer, LossFn, Maybe, Module, Options, Real, SequenceOf, validate
from .data import Dataset

__all__ = ["PREDICTORS", "reference_run", "segments", "predict"]

PREDICTORS = ("noise_scale", "noise_scale_biased", "piecewise_nqm", "nqm_at_init")


@validate(steps=Array(1, low=0.0), loss=Array(1, low=0.0, posinf=True), target=Real(0, math.inf, low_open=True, high_open=True),
          steps_to_target=Real(0, math.inf, low_open=True, high_open=True), n_segments=Integer(1, 100))
def segments(steps, loss, target: float, steps_to_target: float, n_segments: int = 4):
    """Checkpoints that cut the reference run into ``n_segments`` stretches of equal log-loss drop.

    Checkpoint j is the first probe step whose loss is <= L_0 (target / L_0)^(j / n_segments), below
    the previous checkpoint's loss and above the target, before ``steps_to_target``; a level no probe
    satisfies is skipped (fewer segments then).

    Returns:
        ``(checkpoints, segment_steps, segment_ratios)``: probe steps (starting at 0), the steps from
        each to the next (the last one to ``steps_to_target``) and the loss ratio of each segment
        (the last one target / L(checkpoint)).
    """
    k = np.asarray(steps, dtype=np.float64)
    L = np.asarray(loss, dtype=np.float64)
    if k[0] != 0:
        raise ValueError(f"`steps` must start at 0 (the reference run's first probe); got {k[0]}.")
    L0 = L[0]
    if not (0 < target < L0):
        raise ValueError(f"`target` must lie in (0, L_0 = {L0:.4g}); got {target}.")
    cps, last = [0.0], L0
    for j in range(1, n_segments):
        level = L0 * (target / L0) ** (j / n_segments)
        # below the level, below the previous checkpoint's loss (losses are not monotone), above the
        # target, and before the crossing
        hit = np.flatnonzero((L <= level) & (L < last) & (L > target) & (k < steps_to_target) & (k >= cps[-1] + 1))
        if hit.size:
            cps.append(float(k[hit[0]]))
            last = float(L[hit[0]])
    cps = np.unique(cps)
    ends = np.append(cps[1:], steps_to_target)
    at = {float(s): float(v) for s, v in zip(k, L)}
    starts = np.array([at[c] for c in cps])
    finals = np.append(starts[1:], target)
    return cps, ends - cps, finals / starts


@validate(model=Module(), data=Instance(Dataset, what="a deepmodels.data.Dataset"),
          lr=Real(0, math.inf, low_open=True, high_open=True), batch_size=Integer(1, V.MAX_WIDTH),
          target=Maybe(Real(0, math.inf, low_open=True, high_open=True)),
          target_rel=Maybe(Real(0, 1, low_open=True, high_open=True)), n_steps=Integer(1, V.MAX_STEPS),
          momentum=Real(0.0, 1.0, high_open=True), eval_every=Integer(1, V.MAX_STEPS), n_probes=Integer(2, 10**4),
          probe_size=Integer(2, V.MAX_WIDTH), ci=Real(0, 1, low_open=True, high_open=True), loss_fn=LossFn(),
          seed=V.Seed(), path=Maybe(Instance(str, os.PathLike, what="a path (str or os.PathLike)")),
          progress=V.Boolean())
def reference_run(model, data, *, lr: float, batch_size: int, target: float | None = None,
                  target_rel: float | None = None, n_steps: int, momentum: float = 0.0, eval_every: int = 10,
                  n_probes: int = 60, probe_size: int = 256, ci: float = 0.95, loss_fn=F.cross_entropy, seed: int = 0,
                  path=None, progress: bool = True):
    """The reference run: :func:`deepmodels.train.train` to ``target`` with the probe (and its
    bootstrap interval, level ``ci``) at ``n_probes`` steps, half log-spaced (B_simple changes fastest
    early), half evenly spaced up to ``n_steps``, and a snapshot of the parameters at every probe.

    The target is exactly one of ``target`` (an absolute training loss) and ``target_rel`` (a
    fraction in (0, 1) of the run's initial training loss, its evaluation at step 0: see
    :func:`deepmodels.train.train`); the result's attrs hold the absolute ``target`` either way (pass
    it on to :func:`predict`) and ``target_rel`` when given.

    With ``path`` the run resumes from its checkpoint (see :func:`deepmodels.train.train`) and the
    snapshots are kept in ``path + ".snapshots.pt"`` (written atomically after every probe, with the
    run's settings; snapshots of other settings are ignored).

    Returns:
        ``(result, snapshots)``: the training Dataset (attrs ``steps_to_target`` ...) and
        ``{step: state_dict}`` (CPU tensors) at every probe step of the run.
    """
    from .train import _model_fingerprint, probe_steps, _save_torch, train

    V.check_one_target(target, target_rel)
    half = max(2, n_probes // 2)
    probe_at = np.union1d(probe_steps(n_steps, n_log=half), np.linspace(0, n_steps, half).round().astype(np.int64))
    goal = dict(target=target) if target_rel is None else dict(target_rel=target_rel)
    settings = dict(_model_fingerprint(model), lr=lr, batch_size=batch_size, **goal, n_steps=n_steps,
                    momentum=momentum, eval_every=eval_every, probes=len(probe_at), seed=seed)
    snaps, snap_file = {}, None if path is None else str(path) + ".snapshots.pt"
    if snap_file is not None and os.path.exists(snap_file):
        try:
            saved = torch.load(snap_file, weights_only=False)
            if resume.same_settings(saved["settings"], settings)[0]:
                snaps = saved["snapshots"]
        except Exception:  # damaged: the run's checkpoint decides what is recomputed
            snaps = {}

    def keep(step, net):
        snaps[int(step)] = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        if snap_file is not None:
            _save_torch(snap_file, {"settings": settings, "snapshots": snaps})

    result = train(model, data, lr=lr, batch_size=batch_size, n_steps=n_steps, momentum=momentum, probe_at=probe_at,
                   probe_size=probe_size, loss_fn=loss_fn, seed=seed, path=path, progress=progress, target=target,
                   target_rel=target_rel, eval_every=eval_every, probe_ci=ci, on_probe=keep)
    missing = [int(k) for k in result.step.values if int(k) not in snaps and "diverged_at" not in result.attrs]
    if missing:
        raise RuntimeError(f"the snapshots of steps {missing[:5]} are missing (was {snap_file} removed while the run's "
                           "checkpoint was kept?); delete the run's files or run without `path`.")
    return result, snaps


def _family(momentum):
    return (lambda lr: SGD(lr)) if momentum == 0 else (lambda lr: Momentum(lr, momentum))


@validate(reference=Instance(xr.Dataset, what="the Dataset of deepmodels.train (the reference run)"),
          model=Module(), loss_fn=LossFn(), data=Instance(Dataset, what="a deepmodels.data.Dataset"),
          batch_sizes=SequenceOf(Real(1, 2.0**53), increasing=True, what="increasing batch sizes >= 1"),
          target=Maybe(Real(0, math.inf, low_open=True, high_open=True)),
          target_rel=Maybe(Real(0, 1, low_open=True, high_open=True)), momentum=Real(0.0, 1.0, high_open=True),
          n_segments=Integer(1, 100), k=Integer(1, V.MAX_WIDTH), fit_size=Integer(2, V.MAX_WIDTH),
          lr_protocol=Options("per_run", "per_segment"), dim=Integer(1, bridge.MAX_DIM), seed=V.Seed(),
          snapshots=Instance(dict, what="a dict {step: state_dict}"),
          dtype=Options(torch.float32, torch.float64))
def predict(reference: xr.Dataset, snapshots: dict, model, loss_fn, data, *, batch_sizes,
            target: float | None = None, target_rel: float | None = None, momentum: float = 0.0, n_segments: int = 4,
            k: int = 20, fit_size: int = 512, lr_protocol: str = "per_run", dim: int = 4096,
            seed: int = 0, dtype: torch.dtype = torch.float32) -> xr.Dataset:
    """Every predictor's S(B) and B_crit from one reference run.

    Args:
        reference: the reference run (:func:`deepmodels.train.train` with probes and a ``target``:
            attrs ``steps_to_target`` and ``batch_size``; rows ``loss``, ``noise_scale``,
            ``noise_scale_unbiased`` and, when probed with an interval, ``noise_scale_ci``).
        snapshots: ``{step: state_dict}`` of the run's parameters at (at least) the checkpoints.
        model: a network of the same architecture (its parameters are not used; a copy is made).
        loss_fn, data: the run's loss and data; the NQMs are fitted on the first ``fit_size``
            training examples.
        batch_sizes: where to predict.
        target: the training-loss target of the reference run (absolute: its attrs' ``target``).
        target_rel: instead of ``target``, a fraction in (0, 1) of the reference run's initial
            training loss (its loss at step 0): the target is ``target_rel`` x ``reference.loss`` at
            step 0, the absolute target of a reference run trained with this ``target_rel``.
            Exactly one of ``target`` and ``target_rel``.
        momentum: the run's heavy-ball momentum (0: SGD); the NQMs use the same.
        n_segments: segments of the piecewise NQM (:func:`segments`).
        k, dim, seed: Hessian eigenpairs, modes and Lanczos seed of each fit (:func:`bridge.fit_nqm`).
        lr_protocol: see :func:`toymodels.critical.piecewise_prediction`.
        dtype: precision of the fits: ``torch.float32`` (Lanczos to relative accuracy 1e-5) or
            ``torch.float64`` (1e-8). On the study's ResNet-8 float32 is 3x faster on a CPU and its
            top 20 Hessian eigenvalues agree with float64's to 1e-7 (``tests/test_predict.py``
            checks the two give the same predictions).

    Returns:
        Dataset over ``predictor`` (:data:`PREDICTORS`) and ``batch_size``: ``steps_to_target``,
        ``b_crit``, ``s_min`` (and ``b_crit_lo``/``b_crit_hi`` where an interval exists, else inf
        bounds are not invented: NaN), ``source="theory"``.
    """
    V.check_one_target(target, target_rel)
    if target_rel is not None:
        target = target_rel * float(reference.loss.values[0])
    s_ref = float(reference.attrs.get("steps_to_target", math.nan))
    if not (math.isfinite(s_ref) and s_ref > 0):
        raise ValueError("`reference` must have reached its target (attrs['steps_to_target'] finite and > 0); got "
                         f"{reference.attrs.get('steps_to_target')!r}: {reference.attrs.get('reason', '')}")
    b_ref = float(reference.attrs["batch_size"])
    steps = reference.step.values.astype(np.float64)
    tot = reference.sel(layer="total")
    out = []
    for name, var in (("noise_scale", "noise_scale_unbiased"), ("noise_scale_biased", "noise_scale")):
        kw = {}
        ci = f"{var}_ci"
        if ci in tot:
            kw = dict(noise_scale_lo=tot[ci].sel(bound="low").values, noise_scale_hi=tot[ci].sel(bound="high").values)
        ds = noise_scale_prediction(steps, tot[var].values, b_ref, s_ref, list(batch_sizes), estimate=var, **kw)
        out.append(ds.assign_attrs(predictor=name))
    # the quadratic models along the run
    cps, seg_steps, ratios = segments(steps, reference.loss.values, target, s_ref, n_segments)
    missing = [int(c) for c in cps if int(c) not in snapshots]
    if missing:
        raise ValueError(f"`snapshots` must hold the parameters at the checkpoints {missing}.")
    net = copy.deepcopy(model).to(dtype)
    xb = data.x_train[:fit_size].to(dtype)
    yb = data.y_train[:fit_size]
    if yb.is_floating_point():
        yb = yb.to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-8
    nqms = []
    for c in cps:
        net.load_state_dict({n: t.to(dtype) if t.is_floating_point() else t for n, t in snapshots[int(c)].items()})
        fit = bridge.fit_nqm(net, loss_fn, xb, yb, k=min(k, V.n_trainable(net) - 1), dim=min(dim, V.n_trainable(net)),
                             seed=seed, tol=tol)
        nqms.append(fit.nqm)
    make = _family(momentum)
    pw = piecewise_prediction(nqms, seg_steps, ratios, make, b_ref, list(batch_sizes), lr=lr_protocol)
    out.append(pw.drop_vars("lr_opt").assign_attrs(predictor="piecewise_nqm"))
    # the baseline: one NQM at initialisation, one segment to the target
    init = piecewise_prediction(nqms[:1], [s_ref], [target / float(reference.loss.values[0])], make, b_ref,
                                list(batch_sizes), lr=lr_protocol, predictor="nqm_at_init")
    out.append(init.drop_vars("lr_opt"))
    # each checkpoint's NQM on its own segment: the local B_crit the quadratic predicts there
    local = [float(piecewise_prediction([q], [n], [r], make, b_ref, list(batch_sizes), lr=lr_protocol).b_crit)
             for q, n, r in zip(nqms, seg_steps, ratios)]
    ds = _stack(out, b_ref, s_ref, momentum)
    ds.attrs.update(checkpoints=np.asarray(cps, dtype=np.float64), segment_steps=np.asarray(seg_steps, np.float64),
                    segment_ratios=np.asarray(ratios, np.float64), local_b_crit=np.asarray(local, np.float64))
    return ds


def _stack(parts, b_ref, s_ref, momentum) -> xr.Dataset:
    names = [p.attrs["predictor"] for p in parts]
    for p in parts:
        for v in ("b_crit_lo", "b_crit_hi", "s_min_lo", "s_min_hi"):
            if v not in p:
                p[v] = math.nan  # no interval for this predictor
    reasons = [p.attrs.get("reason", "") for p in parts]
    ds = xr.concat([p.drop_attrs() for p in parts], dim="predictor", coords="minimal", compat="override")
    ds = ds.assign_coords(predictor=names)
    attach_attrs(ds, model="network", source="theory", reference_batch_size=b_ref, reference_steps=s_ref,
                 momentum=momentum, reasons=" | ".join(f"{n}: {r}" for n, r in zip(names, reasons) if r))
    return ds
