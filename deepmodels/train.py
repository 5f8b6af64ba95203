"""Training with probes on a schedule, without disturbing the training data stream.

The training batches come from their own ``torch.Generator`` (seeded), the probe batches from
another, so a run with probes follows exactly the trajectory of the same run without them.  The
results are written to a netCDF file after every probe (if ``path`` is given) together with a
checkpoint of the model and optimizer, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from toymodels._validate import check_int, check_real
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
          progress=Boolean())
def train(model, data: Dataset, *, lr, batch_size: int, n_steps: int, momentum: float = 0.0,
          optimizer="sgd", probe_at=None, probe_size: int = 256, loss_fn=F.cross_entropy, method: str = "auto",
          seed: int = 0, device=None, path: str | os.PathLike | None = None, progress: bool = True) -> xr.Dataset:
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
            existing one is resumed.
        progress: tqdm bar.

    Returns:
        Dataset over ``step`` (and ``layer``): ``loss``, ``accuracy``, ``test_loss`` and the probe's
        statistics; ``source="measurement"``.
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
    momentum = check_real("momentum", momentum, low=0.0, high=1.0, high_open=True)
    batch_size = check_int("batch_size", batch_size, low=1)
    n_steps = check_int("n_steps", n_steps, low=1)
    probe_size = check_int("probe_size", probe_size, low=2)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    data = data.to(device)
    steps = probe_steps(n_steps, n_log=20) if probe_at is None else np.asarray(probe_at, dtype=np.int64)
    if steps.ndim != 1 or np.any(np.diff(steps) <= 0) or steps[0] < 0 or steps[-1] > n_steps:
        raise ValueError("`probe_at` must be increasing steps in [0, n_steps].")
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr0, momentum=momentum)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr0)
    elif isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        opt = optimizer(model.parameters(), lr=lr0)
    else:
        raise ValueError(f"`optimizer` must be 'sgd', 'adam' or a torch.optim.Optimizer class; got {optimizer!r}.")
    opt_name = optimizer if isinstance(optimizer, str) else optimizer.__name__.lower()
    gen_train = torch.Generator(device="cpu").manual_seed(seed)
    gen_probe = torch.Generator(device="cpu").manual_seed(seed + 1_000_003)
    n = data.x_train.shape[0]
    rows, start = [], 0
    ckpt = None if path is None else str(path) + ".pt"
    if path is not None and os.path.exists(path) and os.path.exists(ckpt):
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen_train.set_state(state["gen_train"])
        gen_probe.set_state(state["gen_probe"])
        start = int(state["step"])
        old = xr.load_dataset(path)
        rows = [old.sel(step=[s]) for s in old.step.values]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_steps, initial=start, desc="train", unit="step")
    todo = set(int(s) for s in steps if s >= start and not any(int(s) == int(r.step[0]) for r in rows))
    for k in range(start, n_steps + 1):
        if k in todo:
            pidx = torch.randint(0, n, (min(probe_size, n),), generator=gen_probe).to(device)
            model.eval()
            st = probes.gradient_stats(model, loss_fn, data.x_train[pidx], data.y_train[pidx],
                                       batch_size=batch_size, method=method, step=k)
            tl, acc = _evaluate(model, data.x_train, data.y_train, loss_fn)
            te, _ = _evaluate(model, data.x_test, data.y_test, loss_fn)
            model.train()
            st["loss"] = ("step", [tl])
            st["accuracy"] = ("step", [acc])
            st["test_loss"] = ("step", [te])
            rows.append(st.drop_attrs())
            if path is not None:
                _write(rows, path, model, data, lr0, batch_size, momentum, seed, opt_name)
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen_train": gen_train.get_state(),
                            "gen_probe": gen_probe.get_state(), "step": k}, ckpt)
        if k == n_steps:
            break
        idx = torch.randint(0, n, (batch_size,), generator=gen_train).to(device)
        for group in opt.param_groups:
            group["lr"] = float(schedule.at(np.array([k]))[0])
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
        if not torch.isfinite(loss):
            if bar is not None:
                bar.close()
            raise FloatingPointError(f"the training loss diverged (non-finite) at step {k}; lower `lr`.")
        loss.backward()
        opt.step()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return _write(rows, None, model, data, lr0, batch_size, momentum, seed, opt_name)


def _write(rows, path, model, data, lr, batch_size, momentum, seed, optimizer):
    ds = xr.concat(rows, dim="step")
    attach_attrs(ds, model=type(model).__name__.lower(), source="measurement", data=data.name, lr=lr,
                 batch_size=float(batch_size), momentum=momentum, seed=seed, optimizer=optimizer)
    if path is not None:
        tmp = str(path) + ".tmp"
        ds.to_netcdf(tmp)
        os.replace(tmp, path)
    return ds
