"""Training with probes on a schedule, without disturbing the training data stream.

The training batches come from their own ``torch.Generator`` (seeded), the probe batches from
another, so a run with probes follows exactly the trajectory of the same run without them.

With a ``path``, a checkpoint (``path + ".pt"``: model, optimizer, both generators, the step, the
probe rows so far and the run's settings) is written atomically after every probe and at the end,
then the netCDF results derived from that same checkpoint: one consistent state, whatever the
moment of an interrupt.  A rerun resumes from the checkpoint only if it is whole and of the same
settings (model and its initial parameters, data, learning rate or schedule, batch size, momentum,
optimizer, seed, probe size and schedule, loss, method) and not past ``n_steps``; otherwise it warns
(:class:`toymodels.resume.ResumeWarning`, naming the file and the difference) and starts afresh,
overwriting both files.  It never returns the results of other settings.

A run diverges when its training loss is not finite or exceeds ``diverge_factor`` times the loss
at step 0: training stops there, the returned Dataset has a last row at that step holding ``inf``
(loss, test loss and every probe statistic) and the attrs ``diverged_at`` (the step) and
``divergence`` (the reason).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from toymodels import resume
from toymodels.schedules import Schedule
from toymodels.schema import attach_attrs

from . import _validate as V
from . import probes
from ._validate import AnyOf, Boolean, Device, Instance, Integer, LossFn, Maybe, Module, Options, Real, SequenceOf, validate
from .data import Dataset

__all__ = ["probe_steps", "train"]


@validate(n_steps=Integer(1, V.MAX_STEPS), every=Maybe(Integer(1, V.MAX_STEPS)), n_log=Maybe(Integer(2, 10**4)))
def probe_steps(n_steps: int, *, every: int | None = None, n_log: int | None = None) -> np.ndarray:
    """Steps at which to probe: every ``every`` steps, or ``n_log`` log-spaced steps (0 and the end
    included)."""
    if (every is None) == (n_log is None):
        raise ValueError("give exactly one of `every` and `n_log`.")
    if every is not None:
        if every < 1:
            raise ValueError(f"`every` must be >= 1; got {every}.")
        return np.unique(np.append(np.arange(0, n_steps + 1, every), n_steps))
    if n_log < 2:
        raise ValueError(f"`n_log` must be >= 2; got {n_log}.")
    return np.unique(np.concatenate([[0], np.geomspace(1, n_steps, n_log - 1).round().astype(np.int64)]))


def _evaluate(model, x, y, loss_fn, chunk=2048):
    with torch.no_grad():
        losses, correct = [], 0
        for i in range(0, x.shape[0], chunk):
            out = model(x[i:i + chunk])
            losses.append(loss_fn(out, y[i:i + chunk]).item() * out.shape[0])
            correct += (out.argmax(1) == y[i:i + chunk]).sum().item()
    return sum(losses) / x.shape[0], correct / x.shape[0]


@validate(model=Module(), data=Instance(Dataset, what="a deepmodels.data.Dataset"),
          lr=AnyOf(Real(0.0, np.inf, low_open=True, high_open=True), Instance(Schedule),
                   what="a float in (0, inf) or a toymodels.schedules.Schedule"),
          batch_size=Integer(1, V.MAX_WIDTH), n_steps=Integer(1, V.MAX_STEPS), momentum=Real(0.0, 1.0, high_open=True),
          optimizer=AnyOf(Options("sgd", "adam"), V.OptimizerClass(),
                          what="'sgd', 'adam' or a torch.optim.Optimizer class"),
          probe_at=Maybe(SequenceOf(Integer(0, V.MAX_STEPS), increasing=True, max_len=V.MAX_STEPS,
                                    what="increasing steps in [0, n_steps]")),
          probe_size=Integer(2, V.MAX_WIDTH), loss_fn=LossFn(), method=Options("auto", "func", "hooks"), seed=V.Seed(),
          device=Maybe(Device()), path=Maybe(Instance(str, os.PathLike, what="a path (str or os.PathLike)")),
          progress=Boolean(), diverge_factor=Real(1.0, np.inf, low_open=True, high_open=True))
def train(model, data: Dataset, *, lr, batch_size: int, n_steps: int, momentum: float = 0.0,
          optimizer="sgd", probe_at=None, probe_size: int = 256, loss_fn=F.cross_entropy, method: str = "auto",
          seed: int = 0, device=None, path: str | os.PathLike | None = None, progress: bool = True,
          diverge_factor: float = 1e3) -> xr.Dataset:
    """Train ``model`` on ``data`` with the gradient-statistics probe at ``probe_at``.

    Args:
        model: the network (trained in place).
        data: a :class:`deepmodels.data.Dataset`.
        lr: a learning rate, or a schedule from :mod:`toymodels.schedules` (its ``at(step)`` is set
            on the optimizer before every step).
        batch_size, n_steps: batches drawn with replacement from a generator seeded with ``seed``;
            ``n_steps`` at most 10**7.
        momentum: heavy-ball momentum of ``"sgd"``.
        optimizer: ``"sgd"``, ``"adam"``, or any ``torch.optim.Optimizer`` class (built as
            ``optimizer(model.parameters(), lr=...)``).
        probe_at: sorted steps to probe (see :func:`probe_steps`; default: 20 log-spaced).
        probe_size: examples per probe, drawn from the training set by a second generator.
        loss_fn: mean-reducing batch loss.
        method: per-example gradient method of :func:`deepmodels.probes.gradient_stats`.
        device: ``"cpu"``, ``"cuda"``, ... (default: the model's device).
        path: netCDF results file (and ``path + ".pt"`` checkpoint) written after each probe; an
            existing one of the same settings is resumed, one of other settings (or damaged) is
            replaced with a warning (see the module docstring).
        progress: tqdm bar.
        diverge_factor: the run is declared diverged when a training batch loss exceeds this
            multiple of the full training loss at step 0 (or is not finite).

    Returns:
        Dataset over ``step`` (and ``layer``): ``loss``, ``accuracy``, ``test_loss`` and the probe's
        statistics; ``source="measurement"``; after a divergence, a last row of ``inf`` at the step
        it happened and attrs ``diverged_at`` and ``divergence``.
    """
    from toymodels.schedules import as_schedule

    if path is not None and os.path.isdir(path):
        raise ValueError(f"`path` must be a file path (the netCDF results); got {str(path)!r}, an existing folder.")
    if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ValueError(f"`path` must be in an existing folder; {os.path.dirname(os.path.abspath(path))!r} does not exist.")
    if probe_at is not None and probe_at[-1] > n_steps:
        raise ValueError(f"`probe_at` must be increasing steps in [0, n_steps={n_steps}]; got {probe_at[-1]}.")
    V.check_data_fits(model, data, loss_fn, device=device)
    if method == "func":
        P = V.n_trainable(model)
        V.check_bytes("probe_size", 12.0 * min(probe_size, data.x_train.shape[0]) * P,
                      f"the per-example gradients of {probe_size} examples x {P} parameters", device=device)
    schedule = as_schedule(lr) if not isinstance(lr, Schedule) else lr
    lr0 = float(schedule.at(np.array([0]))[0])
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    data = data.to(device)
    # the arguments are checked by @validate above; probe_at is increasing and within [0, n_steps]
    steps = probe_steps(n_steps, n_log=20) if probe_at is None else np.asarray(probe_at, dtype=np.int64)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr0, momentum=momentum)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr0)
    else:  # a torch.optim.Optimizer class
        opt = optimizer(model.parameters(), lr=lr0)
    opt_name = optimizer if isinstance(optimizer, str) else optimizer.__name__.lower()
    gen_train = torch.Generator(device="cpu").manual_seed(seed)
    gen_probe = torch.Generator(device="cpu").manual_seed(seed + 1_000_003)
    n = data.x_train.shape[0]
    rows, start = [], 0
    attrs = dict(data=data.name, lr=lr0, batch_size=float(batch_size), momentum=momentum, seed=seed,
                 optimizer=opt_name)
    settings = dict(_model_fingerprint(model), data=f"{data.name} {tuple(data.x_train.shape)}", lr=repr(schedule),
                    batch_size=batch_size, momentum=momentum, optimizer=opt_name, seed=seed, probe_size=probe_size,
                    method=method, loss_fn=getattr(loss_fn, "__qualname__", type(loss_fn).__qualname__))
    ckpt = None if path is None else str(path) + ".pt"
    state = None if path is None else _load_checkpoint(ckpt, settings, steps, n_steps, device)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen_train.set_state(state["gen_train"])
        gen_probe.set_state(state["gen_probe"])
        start = int(state["step"])
        rows = state["rows"]
    initial_loss = _evaluate(model, data.x_train, data.y_train, loss_fn)[0] if start == 0 else state["initial_loss"]

    def save(step):
        if path is not None:
            _save_checkpoint(ckpt, model, opt, gen_train, gen_probe, step, rows, settings, initial_loss)
            _write(rows, path, model, attrs)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_steps, initial=start, desc="train", unit="step")
    todo = set(int(s) for s in steps if s >= start and not any(int(s) == int(r.step[0]) for r in rows))

    def diverged(k, value, what, reason=None):
        if reason is None and math.isfinite(value) and value <= diverge_factor * initial_loss:
            return False
        if reason is None:
            reason = f"{what} at step {k} is {value:g}"
            if math.isfinite(value):
                reason += f", above {diverge_factor:g} x the initial training loss {initial_loss:.4g}"
        if rows and int(rows[-1].step[0]) == k:  # the probe of this step measured a diverging model
            rows.pop()
        rows.append(_diverged_row(rows, k, reason))
        save(k)
        return True

    k = start
    while not (rows and "diverged_at" in rows[-1].attrs):  # a resumed diverged run is finished
        if k in todo:
            model.eval()
            tl, acc = _evaluate(model, data.x_train, data.y_train, loss_fn)
            if diverged(k, tl, "the training loss"):
                break
            pidx = torch.randint(0, n, (min(probe_size, n),), generator=gen_probe).to(device)
            st = probes.gradient_stats(model, loss_fn, data.x_train[pidx], data.y_train[pidx],
                                       batch_size=batch_size, method=method, step=k)
            if st.attrs.get("diverged"):  # the probe met non-finite gradients
                diverged(k, math.inf, "", reason=f"the probe at step {k}: {st.attrs['diverged']}")
                break
            te, _ = _evaluate(model, data.x_test, data.y_test, loss_fn)
            model.train()
            st["loss"] = ("step", [tl])
            st["accuracy"] = ("step", [acc])
            st["test_loss"] = ("step", [te])
            rows.append(st.drop_attrs())
            save(k)
        if k == n_steps:
            if k not in todo:  # (a probe at the last step has just saved it)
                save(k)  # the finished run: a rerun returns it at once
            break
        idx = torch.randint(0, n, (batch_size,), generator=gen_train).to(device)
        for group in opt.param_groups:
            group["lr"] = float(schedule.at(np.array([k]))[0])
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
        if diverged(k, float(loss.detach()), "the training batch loss"):
            break
        loss.backward()
        opt.step()
        k += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return _write(rows, None, model, attrs)


def _diverged_row(rows, k, reason) -> xr.Dataset:
    """A probe row at step ``k`` holding ``inf`` everywhere (the layout of the earlier rows), with
    the divergence in its attrs."""
    if rows:
        row = rows[-1].copy(deep=True).assign_coords(step=[k])
        for name, var in row.data_vars.items():
            if var.dtype.kind == "f":
                row[name] = var.copy(data=np.full(var.shape, np.inf))
    else:
        row = xr.Dataset({v: ("step", [np.inf]) for v in ("loss", "test_loss")}, coords={"step": [k]})
    row.attrs.update(diverged_at=int(k), divergence=reason)
    return row


def _model_fingerprint(model) -> dict:
    """The model's class, parameter count and a hash of its parameters now (the initial ones)."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())  # any dtype
    return {"model": type(model).__qualname__, "n_parameters": int(sum(p.numel() for p in model.parameters())),
            "initial_parameters": h.hexdigest()[:16]}


def _save_checkpoint(ckpt, model, opt, gen_train, gen_probe, step, rows, settings, initial_loss):
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "gen_train": gen_train.get_state(),
             "gen_probe": gen_probe.get_state(), "step": int(step), "rows": rows, "settings": settings,
             "initial_loss": float(initial_loss)}
    buf = io.BytesIO()
    torch.save(state, buf)

    def to(tmp):
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())

    resume.replace_atomically(ckpt, to)


def _load_checkpoint(ckpt, settings, steps, n_steps, device):
    """The saved state of this run, or None (no checkpoint; or, with a ResumeWarning, a damaged one
    or one of other settings, probe steps, or past ``n_steps``)."""
    if not os.path.exists(ckpt):
        return None

    def ignore(why):
        warnings.warn(f"ignoring checkpoint {ckpt}: {why}; training afresh.", resume.ResumeWarning, stacklevel=3)

    try:
        state = torch.load(ckpt, map_location=device, weights_only=False)
        keys = {"model", "opt", "gen_train", "gen_probe", "step", "rows", "settings", "initial_loss"}
        if not isinstance(state, dict) or not keys <= set(state):
            raise ValueError("it lacks " + ", ".join(sorted(keys - set(state if isinstance(state, dict) else ()))))
    except Exception as err:
        return ignore(f"it cannot be read ({type(err).__name__}: {err})")
    same, why = resume.same_settings(state["settings"], settings)
    if not same:
        return ignore(f"it was written for other settings ({why})")
    step = int(state["step"])
    if step > n_steps:
        return ignore(f"it is at step {step}, past this run's n_steps = {n_steps}")
    rows = state["rows"]
    if rows and "diverged_at" in rows[-1].attrs:  # a finished, diverged run: its probes before the end
        done, want = [int(r.step.values[0]) for r in rows[:-1]], [int(s) for s in steps if s < step]
    else:
        done, want = [int(r.step.values[0]) for r in rows], [int(s) for s in steps if s <= step]
    if done != want:
        return ignore(f"its probes were at steps {done}, this run probes at {want}")
    return state


def _write(rows, path, model, attrs):
    ds = xr.concat(rows, dim="step")
    attach_attrs(ds, model=type(model).__name__.lower(), source="measurement", **attrs)
    if rows and "diverged_at" in rows[-1].attrs:
        ds.attrs.update(diverged_at=rows[-1].attrs["diverged_at"], divergence=rows[-1].attrs["divergence"])
    if path is not None:
        resume.write(ds, path)
    return ds
