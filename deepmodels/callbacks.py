"""The gradient noise scale of every training step, inside a plain loop, PyTorch Lightning or Hugging Face.

Three ways in, one engine (:class:`Probe`, around :class:`deepmodels.gns.GradientNoiseScale`):

* :func:`probing`, a context manager for a plain PyTorch loop::

      with probing(model, path="gns.nc", every=10) as probe:
          for x, y in batches:                     # M micro-batches per step
              for xm, ym in zip(x.chunk(M), y.chunk(M)):
                  (loss_fn(model(xm), ym) / M).backward()
              probe.step()                         # after the last backward, before the optimizer step
              optimizer.step(); optimizer.zero_grad()

* ``deepmodels.callbacks.LightningProbe(path=..., every=...)``, a ``lightning.pytorch.Callback``
  (extra ``[lightning]``): the estimate at ``on_before_optimizer_step`` (after the step's last
  backward pass and before gradient clipping), logged to every logger of the trainer
  (``trainer.loggers``, keys ``gns/<name>`` at ``step = trainer.global_step``), its state in the
  trainer's checkpoints (``state_dict`` / ``load_state_dict``).
* ``deepmodels.callbacks.HFProbe(path=..., every=...)``, a ``transformers.TrainerCallback``
  (extra ``[hf]``): the estimate at ``on_pre_optimizer_step``, appended to the trainer's
  ``state.log_history`` (keys ``gns/<name>`` and ``step``; saved in ``trainer_state.json``), its
  state saved with every checkpoint (``transformers.ExportableState``; a resumed trainer restores it
  when ``TrainingArguments(restore_callback_states_from_checkpoint=True)``; the Trainer then replaces
  the callback by a new instance built from its arguments and saved state, so read the rows from
  the file or the log history, not from the object passed in).  The Trainer clips
  ``.grad`` *before* ``on_pre_optimizer_step``, the first point where a callback sees the
  accumulated gradient, so |G_big|^2 would be the clipped one: ``HFProbe`` refuses to start unless
  ``max_grad_norm=0`` (no clipping).  Lightning's ``gradient_clip_val`` is applied after its hook and
  needs nothing.

The two classes are built on first access (``deepmodels.callbacks.LightningProbe`` imports
``lightning``, ``HFProbe`` imports ``transformers``), so ``import deepmodels`` needs neither.

What is measured.  Every optimizer step, :meth:`deepmodels.gns.GradientNoiseScale.update` forms the
unbiased two-batch-size estimates of |G|^2, tr Sigma and B_simple = tr Sigma / |G|^2 from the
squared norms of the step's M micro-batch gradients and of their mean (McCandlish, Kaplan, Amodei
et al. 2018, "An Empirical Model of Large-Batch Training", App. A.1), with standard errors and
bias-corrected exponential moving averages (the EMA advances every step).  Every ``every``-th step
(steps 0, every, 2 every, ... of the trainer's count of optimizer steps) is a *row*: logged and
written.  Under ``torch.distributed`` only the rows (and the ``stats_every`` steps) join the
processes: the steps between two rows are deferred (:meth:`deepmodels.gns.GradientNoiseScale.update`
with ``sync=False``: no all-reduce; :meth:`Probe.step` returns ``None`` for them) and joined by one
all-reduce at the next row, which replays them in order, so the EMA at every row is that of joining
every step (with ``every=1``, the default, every step joins).  The micro-batch size b is the
leading dimension of the first tensor of each training batch (Lightning: the batch of
``on_train_batch_start``; a plain loop and Hugging Face: the first tensor argument of each forward
pass of the model in training mode with gradients enabled); a step whose micro-batches differ in
size is skipped with a warning (the estimator assumes one b), and the micro-batch losses must be
means divided by M (``accumulation="mean"``, what both trainers do) or, for :func:`probing`, sums
(``accumulation="sum"``).

Output.  The rows are a Dataset over ``step`` with the variables of
:meth:`deepmodels.gns.GNSEstimate.to_dataset` (``noise_scale_unbiased`` and its ``_sem``,
``trace_cov``, ``grad_norm_sq_unbiased``, the EMAs ``noise_scale_ema`` ..., ``micro_batch_size``,
``n_micro_batches``, ``batch_size_now``), ``source="measurement"`` and attrs ``every``,
``ema_decay``, ``trainer``.  With a ``path``, the rows are written there as they come: the whole
file replaced atomically (:func:`toymodels.resume.write`: an interrupt leaves the old file or the new
one), at most every ``write_every_s`` seconds, whenever the state is saved (so the file holds every
row a checkpoint knows), and at the end; only process 0 writes under ``torch.distributed``.  With
``stats_every``, the per-example statistics are the file's group ``"per_example"`` (a Dataset over
``step`` and ``layer``, :meth:`Probe.stats_dataset`; read it with
``xarray.load_dataset(path, group="per_example")``); the noise-scale rows stay the root group.

Per-example statistics (optional, ``stats_every=N``; off by default).  Every N-th step (steps 0, N,
2N, ...), after the step's estimate and before the optimizer step, process 0 runs
:func:`deepmodels.probes.gradient_stats` on the step's last micro-batch (a plain loop passes it as
``probe.step(batch=...)``; Lightning: the batch of ``on_train_batch_start``; Hugging Face: the tensors
of the keyword arguments of the model's last training forward pass) with the per-example loss
``stats_loss_fn(model, batch) -> (B,)`` (default :func:`criterion_loss` ``()``, cross-entropy on
``(x, y)`` batches; for ``HFProbe`` :func:`deepmodels.pergrad.next_token_loss`), at the step's
parameters: |g_bar|^2 (``grad_norm_sq``), the population tr Sigma of the b examples (``trace_cov``),
``grad_var``, ``grad_nvar`` and ``noise_scale`` for the step's batch size B (the definitions of
:func:`toymodels.stats.gradient_statistics`), per layer and in total.  The trainers log the total as
``stats/<name>``.  The probe's own backward pass is discarded from the estimator (it is no micro-batch
of the step, :meth:`deepmodels.gns.GradientNoiseScale.discard`), ``.grad`` is put back for the
optimizer and the global random state is restored, so training and the noise-scale rows are the same
as without it.  Under ``torch.distributed`` the statistics are those of process 0's micro-batch (b
examples); the other processes measure nothing.

Resume.  ``state_dict()`` holds the estimator's EMA and the rows so far, per-example ones included
(lists of dicts of numbers); ``load_state_dict`` restores both, so a trainer resumed from a checkpoint continues the EMA
and rewrites the file with the checkpoint's rows followed by the new ones: the same estimates and
the same file as an uninterrupted run.  A fresh start overwrites an existing file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

from toymodels import resume
from toymodels.schema import attach_attrs

from . import _validate as V
from . import gns as _gns
from . import pergrad, probes
from ._validate import Instance, Integer, LossFn, Maybe, Module, Options, Real, validate

__all__ = ["probing", "Probe", "criterion_loss"]

_PATH = Maybe(Instance(str, os.PathLike, what="a path (str or os.PathLike)"))
_SETTINGS = dict(path=_PATH, every=Integer(1, V.MAX_STEPS), ema_decay=Real(0.0, 1.0, high_open=True),
                 write_every_s=Real(0.0, math.inf, high_open=True), stats_every=Maybe(Integer(1, V.MAX_STEPS)),
                 stats_loss_fn=Maybe(LossFn()))
STATS = ("grad_norm_sq", "trace_cov", "trace_cov_sem", "grad_var", "grad_nvar", "snr", "noise_scale",
         "grad_norm_sq_unbiased", "noise_scale_unbiased", "n_params")  # per layer, from probes.gradient_stats
LOGGED_STATS = ("grad_norm_sq", "trace_cov", "grad_var", "grad_nvar", "noise_scale")  # of the total, logged
STATS_GROUP = "per_example"  # the netCDF group of the per-example statistics
_COVERAGE = ("method", "path_hooks", "path_func", "skipped", "skipped_reasons")


def _check_settings(**kwargs) -> dict:
    """The shared settings checked with the constraints of :func:`probing` (same messages)."""
    out = {k: _SETTINGS[k](k, v) for k, v in kwargs.items()}
    if out.get("path") is not None:
        _check_path(out["path"])
        out["path"] = os.fspath(out["path"])  # a str: part of Lightning's state key and of HF's JSON state
    return out


def _check_path(path) -> None:
    if os.path.isdir(path):
        raise ValueError(f"`path` must be a file path (the netCDF rows); got {str(path)!r}, an existing folder.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"`path` must be in an existing folder; {folder!r} does not exist.")


def _leading_size(obj):
    """The first dimension of the first tensor (of at least one dimension) found in ``obj``
    (a tensor, or lists, tuples and dicts of them, searched in order), or ``None``."""
    if isinstance(obj, torch.Tensor):
        return int(obj.shape[0]) if obj.dim() >= 1 else None
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for item in items:
        size = _leading_size(item)
        if size is not None:
            return size
    return None


def _rank_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class _CriterionLoss:
    """``criterion`` on ``(x, y)`` batches in the batch form (see :func:`criterion_loss`); a class, so
    that it pickles (spawned processes) and shows its criterion."""

    def __init__(self, criterion):
        self.criterion = criterion

    def __call__(self, model, batch):
        x, y = batch[0], batch[1]
        losses = self.criterion(V.model_output(model(x)), y, reduction="none")
        return losses.reshape(losses.shape[0], -1).mean(1)

    def __repr__(self):
        return f"criterion_loss({getattr(self.criterion, '__name__', self.criterion)!r})"


@validate(criterion=LossFn())
def criterion_loss(criterion=F.cross_entropy):
    """A criterion ``criterion(output, target, reduction="none")`` (``F.cross_entropy``,
    ``F.mse_loss``, ...) in the batch form ``loss_fn(model, batch) -> (B,)`` of
    :func:`deepmodels.probes.gradient_stats`, for batches ``(x, y, ...)``: example i's loss is
    ``criterion(model(x), y, reduction="none")[i]`` averaged over all but the first dimension (a model
    returning an object with ``.logits`` gives those).  The default per-example loss of
    :func:`probing` and ``LightningProbe`` (``criterion_loss()``: cross-entropy)."""
    return _CriterionLoss(criterion)


class Probe:
    """The gradient noise scale of every optimizer step of a training loop, its rows every
    ``every`` steps logged, written to netCDF and resumable (see the module docstring).

    Made by :func:`probing` (or by the trainer callbacks); call :meth:`step` once per optimizer step,
    after the step's last backward pass and before ``optimizer.step()``.

    Args:
        model: the ``nn.Module`` (or its ``DistributedDataParallel`` wrapper) being trained.
        path: netCDF file of the rows, or ``None`` (rows kept in memory: :meth:`dataset`).
        every: a row every ``every`` steps (steps divisible by it); the estimator and its EMA
            advance every step (under ``torch.distributed`` the steps between rows are deferred
            and joined at the next row).
        ema_decay: decay of the estimator's exponential moving averages, in [0, 1).
        accumulation: ``"mean"`` (each micro-batch loss divided by M) or ``"sum"``.
        process_group: the processes of one step (default: all, when ``torch.distributed`` is
            initialized).
        write_every_s: least seconds between two writes of the file before the end.
        trainer: the name recorded in the file's ``trainer`` attribute.
        stats_every: also the per-example statistics every ``stats_every`` steps (steps divisible by
            it; ``None``, the default: never), see the module docstring.
        stats_loss_fn: the per-example loss of those statistics, in the batch form
            ``loss_fn(model, batch) -> (B,)`` (default :func:`criterion_loss` ``()``: cross-entropy on
            batches ``(x, y)``).
    """

    @validate(model=Module(), path=_PATH, every=_SETTINGS["every"], ema_decay=_SETTINGS["ema_decay"],
              accumulation=Options("mean", "sum"), write_every_s=_SETTINGS["write_every_s"],
              trainer=Instance(str), stats_every=_SETTINGS["stats_every"], stats_loss_fn=_SETTINGS["stats_loss_fn"])
    def __init__(self, model: nn.Module, *, path=None, every: int = 1, ema_decay: float = 0.95,
                 accumulation: str = "mean", process_group=None, write_every_s: float = 10.0,
                 trainer: str = "loop", stats_every: int | None = None, stats_loss_fn=None):
        if path is not None:
            _check_path(path)
        self.path = None if path is None else os.fspath(path)
        self.every, self.ema_decay, self.write_every_s, self.trainer = every, ema_decay, write_every_s, trainer
        self.stats_every = stats_every
        self.stats_loss_fn = criterion_loss() if stats_loss_fn is None else stats_loss_fn
        self.estimator = _gns.GradientNoiseScale(model, ema_decay=ema_decay, process_group=process_group,
                                                 accumulation=accumulation)
        self.rows: list = []  # GNSEstimate of the recorded steps
        self.stats_rows: list = []  # per-example statistics of the stats steps (dicts of numbers, process 0)
        self.last_stats = None  # the latest of them, for the callbacks' loggers
        self.n_steps = 0  # step() calls (the default step label)
        self._sizes: list = []  # micro-batch sizes seen since the last step
        self._last_write = -math.inf
        inner = getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model
        self._inner = inner
        self._forward_hook = inner.register_forward_pre_hook(self._record_size, with_kwargs=True)
        self._open = True

    def _record_size(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            size = _leading_size((args, kwargs))
            if size is not None:
                self._sizes.append(size)

    @validate(micro_batch_size=Maybe(Integer(1, V.MAX_WIDTH)), step=Maybe(Integer(0, V.MAX_EXACT_INT)),
              batch=Maybe(pergrad.BATCH))
    def step(self, micro_batch_size: int | None = None, *, step: int | None = None, batch=None):
        """This step's :class:`deepmodels.gns.GNSEstimate` (recorded as a row when ``step`` is a
        multiple of ``every``), or ``None`` when the step has a single micro-batch over all processes
        or micro-batches of different sizes (e.g. a trainer's last, partial step of an epoch): such a
        step is skipped with a ``RuntimeWarning`` and the EMA does not advance.  Also ``None`` under
        ``torch.distributed`` on a step that is neither a row nor a stats step: it is deferred
        (``GradientNoiseScale.update(..., sync=False)``, no communication) and enters the EMA, in
        order and exactly, when the next row step joins the processes.

        On a stats step (``stats_every`` set and ``step`` a multiple of it) process 0 then measures the
        per-example statistics on ``batch`` (:meth:`stats_dataset`; :attr:`last_stats`), at the
        parameters and before the optimizer step, leaving ``.grad``, the estimator and the global
        random state as they were; a skipped step has none.

        Args:
            micro_batch_size: examples per micro-batch; default: read from the training forward passes
                since the last step (the leading dimension of the first tensor argument).
            step: the step's label (default: the number of earlier calls, counting restored ones).
            batch: the examples of the per-example statistics, in the form of ``stats_loss_fn``
                (e.g. the step's last micro-batch ``(x, y)``); required on a stats step, else unused.
        """
        step = self.n_steps if step is None else step
        due = self._stats_due(step)
        if due and batch is None:
            raise ValueError(f"`batch` must be given at step {step}: with stats_every={self.stats_every} the "
                             "per-example statistics are measured on it (e.g. the step's last micro-batch).")
        sizes, self._sizes = self._sizes, []
        if micro_batch_size is None:
            if not sizes:
                raise ValueError("`micro_batch_size` must be given: no forward pass of the model in training mode "
                                 "with a tensor argument was seen since the last step.")
            if len(set(sizes)) > 1:
                self._skip(step, f"its micro-batches have different sizes {sizes} (the two-batch estimate needs one "
                                 "size)", max(sizes))
                return None
            micro_batch_size = sizes[0]
        if self.estimator.n_recorded == 1 and self.estimator.world_size == 1:  # (none: update() says why)
            self._skip(step, "it has a single micro-batch (the two-batch estimate needs two or more)", 1)
            return None
        est = self.estimator.update(micro_batch_size, step=step, sync=self._joins(step))
        self.n_steps = step + 1
        if est is None:  # deferred: joined at the next row
            return None
        new = step % self.every == 0
        if new:
            self.rows.append(est)
        if due and _rank_zero():
            self.last_stats = self._measure(step, batch, est.batch_size)
            self.stats_rows.append(self.last_stats)
            new = True
        if new and self.path is not None and time.monotonic() - self._last_write >= self.write_every_s:
            self.flush()
        return est

    def _measure(self, step: int, batch, batch_size: int) -> dict:
        """The per-example statistics of ``batch`` (:func:`deepmodels.probes.gradient_stats`) as a row
        of Python numbers; ``.grad`` is restored, the probe's own backward pass discarded from the
        estimator (it is no micro-batch of the next step) and the random state kept."""
        params = self.estimator.params
        grads = [p.grad for p in params]
        cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
        ddp = self.estimator._ddp  # no_sync: the probe's backward pass starts no all-reduce of the estimator
        try:
            for p in params:
                p.grad = None
            with torch.enable_grad(), torch.random.fork_rng(devices=cuda), \
                    (ddp.no_sync() if ddp is not None else contextlib.nullcontext()):
                ds = probes.gradient_stats(self._inner, self.stats_loss_fn, batch=batch, batch_size=float(batch_size),
                                           step=step)
        finally:
            for p, g in zip(params, grads):
                p.grad = g
            self.estimator.discard()
            self._sizes = []  # the probe's forward passes are no micro-batches either
        row = {"step": int(step), "micro_batch_size": int(ds.attrs["n_examples"]), "batch_size": int(batch_size),
               "layer": [str(v) for v in ds.layer.values],
               **{k: [float(v) for v in ds[k].values[0]] for k in STATS},
               "attrs": {k: str(ds.attrs[k]) for k in _COVERAGE if k in ds.attrs},
               "diverged": ds.attrs.get("diverged")}
        return row

    @validate()
    def stats_dataset(self) -> xr.Dataset:
        """The per-example statistics so far (process 0): a Dataset over ``step`` and ``layer`` (each
        module with measured parameters, then ``"total"``) with the variables of
        :func:`deepmodels.probes.gradient_stats` (``grad_norm_sq``, ``trace_cov``, ``trace_cov_sem``,
        ``grad_var``, ``grad_nvar``, ``snr``, ``noise_scale``, ``grad_norm_sq_unbiased``,
        ``noise_scale_unbiased``, ``n_params``), over ``step`` ``micro_batch_size`` (the examples
        measured) and ``batch_size_now`` (the step's batch, the B of ``grad_var`` and ``grad_nvar``);
        ``source="measurement"``, attrs ``stats_every``, the coverage of the latest measurement
        (``method``, ``path_hooks``, ...) and ``diverged`` (the steps whose measurement diverged, with
        the reasons).  Empty (no ``step``) before the first."""
        rows = self.stats_rows
        layers = rows[0]["layer"] if rows else []
        steps = np.array([r["step"] for r in rows], dtype=np.int64)
        data = {k: (("step", "layer"), np.array([r[k] for r in rows], dtype=np.float64).reshape(len(rows), len(layers)))
                for k in STATS}
        data["micro_batch_size"] = ("step", np.array([r["micro_batch_size"] for r in rows], dtype=np.float64))
        data["batch_size_now"] = ("step", np.array([r["batch_size"] for r in rows], dtype=np.float64))
        ds = xr.Dataset(data, coords={"step": steps, "layer": layers})
        attach_attrs(ds, model=self.estimator.model_name, source="measurement", stats_every=str(self.stats_every),
                     **(rows[-1]["attrs"] if rows else {}))
        div = [f"step {r['step']}: {r['diverged']}" for r in rows if r["diverged"] is not None]
        if div:
            ds.attrs["diverged"] = "; ".join(div)
        return ds

    def _stats_due(self, step: int) -> bool:
        """Whether ``step`` is a stats step (``stats_every`` set and dividing it)."""
        return self.stats_every is not None and step % self.stats_every == 0

    def _joins(self, step: int) -> bool:
        """Whether ``step`` joins the processes: a row or stats step, or any step of a single process;
        under ``torch.distributed`` the others are deferred (the same decision on every process)."""
        return self.estimator.world_size == 1 or step % self.every == 0 or self._stats_due(step)

    def _skip(self, step: int, why: str, micro_batch_size: int) -> None:
        self.estimator.skip(sync=self._joins(step))  # contributes the step's sums, as update() would
        self.n_steps = step + 1
        warnings.warn(f"step {step} skipped by the gradient-noise-scale probe: {why}.", RuntimeWarning, stacklevel=3)

    @validate()
    def dataset(self) -> xr.Dataset:
        """The rows so far: a Dataset over ``step`` (empty before the first row), ``source="measurement"``,
        attrs ``every``, ``ema_decay`` and ``trainer``."""
        if self.rows:
            ds = _gns.stack(self.rows)
        else:
            ds = xr.Dataset(coords={"step": np.zeros(0, dtype=np.int64)})
            attach_attrs(ds, model=self.estimator.model_name, source="measurement")
        ds.attrs.update(every=self.every, ema_decay=self.ema_decay, trainer=self.trainer)
        return ds

    @validate()
    def flush(self) -> None:
        """Write the rows to ``path`` now (atomically; only on process 0; nothing without a path): the
        :meth:`dataset` as the file's root group and, with ``stats_every``, the
        :meth:`stats_dataset` as its group ``"per_example"``."""
        if self.path is not None and _rank_zero():
            out = self.dataset()
            if self.stats_every is not None:
                out = {"": out, STATS_GROUP: self.stats_dataset()}
            resume.write(out, self.path)
        self._last_write = time.monotonic()

    @validate()
    def state_dict(self) -> dict:
        """The estimator's state, the step count and the rows (Python numbers, strings and ``None``:
        fit for ``torch.save`` and JSON); writes the file first, so it holds every row of the state.
        Steps deferred since the last row are joined first (under ``torch.distributed`` every process
        must then call it, as the trainers do)."""
        return self._state(join=True)

    def _state(self, join: bool) -> dict:
        if self.estimator.n_deferred and join:
            self.estimator.sync()
        elif self.estimator.n_deferred:  # a caller on one process only cannot join the others
            warnings.warn(f"the state saved at step {self.n_steps} leaves out the {self.estimator.n_deferred} "
                          "step(s) deferred since the last row (a resumed run's EMA misses them).", RuntimeWarning,
                          stacklevel=3)
        self.flush()
        return {"estimator": self.estimator._state(), "n_steps": self.n_steps, "every": self.every,
                "rows": [dataclasses.asdict(r) for r in self.rows], "stats_every": self.stats_every,
                "stats_rows": [dict(r) for r in self.stats_rows]}

    @validate(state_dict=Instance(dict, what="a dict from Probe.state_dict()"))
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` of a probe with the same ``every``, ``stats_every`` and
        ``ema_decay``: the EMA continues and the rows (and per-example rows) restart from the saved
        ones."""
        missing = sorted({"estimator", "n_steps", "every", "rows"} - set(state_dict))
        if missing:
            raise ValueError(f"`state_dict` must be a dict from Probe.state_dict(); it lacks {missing}.")
        for key in ("every", "stats_every"):
            if state_dict.get(key) != getattr(self, key) and (key == "every" or key in state_dict):
                raise ValueError(f"`state_dict` must come from a probe with {key}={getattr(self, key)}; got "
                                 f"{key}={state_dict.get(key)}.")
        self.estimator.load_state_dict(state_dict["estimator"])
        self.n_steps = V.check_int("state_dict['n_steps']", state_dict["n_steps"], low=0)
        self.rows = [_gns.GNSEstimate(**r) for r in state_dict["rows"]]
        self.stats_rows = [dict(r) for r in state_dict.get("stats_rows", [])]
        self.last_stats = None
        self._sizes = []

    @validate()
    def close(self) -> None:
        """Write the rows (with a path), join the steps deferred since the last row into the EMA (for a
        state saved later; every process calls it, as the trainers do) and remove the hooks from the
        model (idempotent)."""
        self._close(join=True)

    def _close(self, join: bool) -> None:
        if self._open:
            if join and self.estimator.n_deferred:
                self.estimator.sync()
            self.flush()
            self._forward_hook.remove()
            self.estimator.remove()
            self._open = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._close(join=exc[0] is None)  # after an error the other processes may not join: deferred steps dropped
        return False


@validate(model=Module(), path=_PATH, every=_SETTINGS["every"], ema_decay=_SETTINGS["ema_decay"],
          accumulation=Options("mean", "sum"), write_every_s=_SETTINGS["write_every_s"],
          stats_every=_SETTINGS["stats_every"], stats_loss_fn=_SETTINGS["stats_loss_fn"])
def probing(model: nn.Module, *, path=None, every: int = 1, ema_decay: float = 0.95, accumulation: str = "mean",
            process_group=None, write_every_s: float = 10.0, stats_every: int | None = None,
            stats_loss_fn=None) -> Probe:
    """A :class:`Probe` on ``model`` for a plain PyTorch loop; use it in a ``with`` block, which
    writes the file and removes the hooks at its end.

    ``probe.step()`` after the last backward pass of every optimizer step (before
    ``optimizer.step()``) returns the step's :class:`deepmodels.gns.GNSEstimate`: the unbiased
    two-batch-size noise scale B_simple = tr Sigma / |G|^2 of McCandlish et al. 2018 (App. A.1) from
    the step's micro-batches (at least two per step over all processes), its standard error and EMA.
    Rows every ``every`` steps go to ``path`` (netCDF, written as they come) and to
    ``probe.dataset()``; ``probe.state_dict()`` / ``load_state_dict`` save and resume them with the
    EMA.  With ``stats_every``, every ``stats_every`` steps also the per-example statistics of the
    batch passed as ``probe.step(batch=...)`` (``probe.stats_dataset()``; the file's group
    ``"per_example"``).  Arguments as :class:`Probe`'s (the module docstring has the details).
    """
    return Probe(model, path=path, every=every, ema_decay=ema_decay, accumulation=accumulation,
                 process_group=process_group, write_every_s=write_every_s, trainer="loop", stats_every=stats_every,
                 stats_loss_fn=stats_loss_fn)


def _stats_metrics(probe, step) -> dict:
    """The total's per-example statistics of ``step`` as logger metrics ``stats/<name>`` (``{}``
    where ``step`` measured none on this process)."""
    row = probe.last_stats
    if row is None or row["step"] != step:
        return {}
    return {f"stats/{k}": float(row[k][-1]) for k in LOGGED_STATS}


def _metrics(est) -> dict:
    """The numbers of an estimate as logger metrics ``gns/<name>`` (floats)."""
    return {f"gns/{k}": float(v) for k, v in est.as_dict().items() if k != "step"}


# --------------------------------------------------------------------------------------------------
# trainer callbacks, built on first access
# --------------------------------------------------------------------------------------------------
def _import(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"deepmodels.callbacks needs `{module}` here: pip install \"stochopt-toys[{extra}]\" "
                          f"({err}).") from err


def _lightning_probe():
    L = _import("lightning.pytorch", "lightning")

    class LightningProbe(L.Callback):
        """A Lightning ``Callback``: the gradient noise scale of every optimizer step at
        ``on_before_optimizer_step`` (after the step's last backward pass, before gradient clipping),
        every ``every`` steps logged to ``trainer.loggers`` (``gns/<name>`` at ``trainer.global_step``)
        and written to ``path`` (netCDF); its state (EMA, rows) travels in the trainer's
        checkpoints.  Arguments as :func:`deepmodels.callbacks.probing`'s; the module
        ``deepmodels.callbacks`` describes the estimate and the file.  Single optimizer, automatic
        optimization (Lightning divides each micro-batch loss by ``accumulate_grad_batches``).

        With ``stats_every``, every ``stats_every`` steps also the per-example statistics of the
        step's last micro-batch on process 0 (:func:`deepmodels.probes.gradient_stats`, after the
        estimate and before the optimizer step), logged as ``stats/<name>`` (``grad_norm_sq``,
        ``trace_cov``, ``grad_var``, ``grad_nvar``, ``noise_scale`` of all parameters) and written to
        the file's group ``"per_example"``; ``stats_loss_fn(pl_module, batch) -> (B,)`` gives the
        per-example losses (default :func:`deepmodels.callbacks.criterion_loss` ``()``: cross-entropy
        of ``pl_module(x)`` on batches ``(x, y)``).
        """

        def __init__(self, path=None, every: int = 1, ema_decay: float = 0.95, write_every_s: float = 10.0,
                     stats_every: int | None = None, stats_loss_fn=None):
            self.settings = _check_settings(path=path, every=every, ema_decay=ema_decay, write_every_s=write_every_s,
                                            stats_every=stats_every, stats_loss_fn=stats_loss_fn)
            self.probe = None
            self._batch = None  # the latest training micro-batch

        @property
        def state_key(self) -> str:
            """Lightning's key for this callback's state in a checkpoint (from ``path`` and ``every``)."""
            return self._generate_state_key(path=self.settings["path"], every=self.settings["every"])

        def setup(self, trainer, pl_module, stage):
            """At the start of a fit: check for two or more micro-batches per step and attach the probe
            (continuing the state of an earlier fit of this callback)."""
            if stage == "fit":  # a new fit continues this callback's earlier one, if any
                if trainer.accumulate_grad_batches * trainer.world_size < 2:
                    raise ValueError("`accumulate_grad_batches` must be >= 2 with LightningProbe on one process (the "
                                     "two-batch estimate needs two or more micro-batches per step); got "
                                     f"{trainer.accumulate_grad_batches} on {trainer.world_size} process(es).")
                state = self.probe.state_dict() if self.probe is not None else None
                self.probe = Probe(pl_module, **self.settings, trainer="lightning")
                self.probe._forward_hook.remove()  # the sizes come from the batches (training_step may not call forward)
                if state is not None:
                    self.probe.load_state_dict(state)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            """Record the micro-batch size (the leading dimension of the batch) and the batch."""
            size = _leading_size(batch)
            if size is not None:
                self.probe._sizes.append(size)
            self._batch = batch if self.probe.stats_every is not None else None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            """After the step's last backward pass: the step's estimate, logged every ``every`` steps, and
            the per-example statistics every ``stats_every`` steps."""
            step = trainer.global_step
            batch, self._batch = self._batch, None
            est = self.probe.step(step=step, batch=batch)
            metrics = _metrics(est) if est is not None and step % self.probe.every == 0 else {}
            metrics.update(_stats_metrics(self.probe, step))
            if metrics and trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=step)

        def on_train_end(self, trainer, pl_module):
            """Write the rows not yet in the file."""
            self.probe.flush()

        def teardown(self, trainer, pl_module, stage):
            """After a fit: remove the probe's hooks (its state stays, for a checkpoint saved later)."""
            if stage == "fit" and self.probe is not None:
                self.probe.close()  # the hooks; the state stays for a checkpoint saved after fit

        def state_dict(self):
            """The probe's state (:meth:`Probe.state_dict`) for Lightning's checkpoints; ``{}`` before a fit."""
            return self.probe.state_dict() if self.probe is not None else {}

        def load_state_dict(self, state_dict):
            """Continue from a checkpoint's state (Lightning calls it after ``setup`` when a fit resumes)."""
            self.probe.load_state_dict(state_dict)

    LightningProbe.__module__, LightningProbe.__qualname__ = __name__, "LightningProbe"
    return LightningProbe


def _hf_probe():
    T = _import("transformers", "hf")

    class HFProbe(T.TrainerCallback, T.trainer_callback.ExportableState):
        """A Hugging Face ``TrainerCallback``: the gradient noise scale of every optimizer step at
        ``on_pre_optimizer_step`` (after the step's last backward pass; needs ``max_grad_norm=0``,
        as the Trainer clips before this hook), every ``every`` steps appended to
        ``state.log_history`` (``gns/<name>`` and ``step`` = ``state.global_step``) and written to
        ``path`` (netCDF); its state (EMA, rows) is saved with every checkpoint and restored with
        ``restore_callback_states_from_checkpoint=True`` (the Trainer asks for the state on process 0
        only, so under ``torch.distributed`` the steps deferred since the last row are joined on
        every process before: at ``on_step_end`` and ``on_epoch_end`` when the Trainer is about to
        save, and at ``on_evaluate``).  Arguments as
        :func:`deepmodels.callbacks.probing`'s; the module ``deepmodels.callbacks`` describes the
        estimate and the file.  The micro-batch size is read from the model's forward passes.  A
        model whose ``forward`` takes ``**kwargs`` gets ``num_items_in_batch`` from the Trainer and
        normalizes its loss by the items of the whole step instead of being divided by M: the
        estimate is then exact when every micro-batch has the same number of loss items (no
        padding or ignored labels).

        With ``stats_every``, every ``stats_every`` steps also the per-example statistics of the
        step's last micro-batch on process 0 (the tensors of the keyword arguments of the model's
        last training forward pass, e.g. ``{"input_ids", "attention_mask", "labels"}``;
        :func:`deepmodels.probes.gradient_stats` after the estimate, before the optimizer step),
        appended to ``state.log_history`` as ``stats/<name>`` (``grad_norm_sq``, ``trace_cov``,
        ``grad_var``, ``grad_nvar``, ``noise_scale`` of all parameters) and written to the file's
        group ``"per_example"``; ``stats_loss_fn(model, batch) -> (B,)`` gives the per-example losses
        (default :func:`deepmodels.pergrad.next_token_loss`, for causal language models).  The
        Trainer rebuilds a restored callback from its JSON arguments, which cannot hold a function:
        the rebuilt callback takes the ``stats_loss_fn`` of the latest ``HFProbe`` made in this
        process with the same ``path``, ``every`` and ``stats_every``.
        """

        def __init__(self, path=None, every: int = 1, ema_decay: float = 0.95, write_every_s: float = 10.0,
                     stats_every: int | None = None, stats_loss_fn=None):
            self.settings = _check_settings(path=path, every=every, ema_decay=ema_decay, write_every_s=write_every_s,
                                            stats_every=stats_every, stats_loss_fn=stats_loss_fn)
            key = (self.settings["path"], every, stats_every)
            if stats_loss_fn is not None:
                _HF_LOSSES[key] = stats_loss_fn
            self.settings["stats_loss_fn"] = _HF_LOSSES.get(key, pergrad.next_token_loss)
            self.probe = None
            self.saved = None  # the probe's state from a checkpoint (set by the Trainer on resume)
            self._batch, self._batch_hook = None, None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            """Check ``max_grad_norm`` and the micro-batches per step, attach the probe, and restore its
            state when the Trainer handed one over."""
            if args.max_grad_norm and args.max_grad_norm > 0:
                raise ValueError(f"`max_grad_norm` must be 0 with HFProbe; got {args.max_grad_norm}: the Trainer "
                                 "clips .grad before on_pre_optimizer_step, so the accumulated gradient's norm would "
                                 "be the clipped one.")
            if args.gradient_accumulation_steps * args.world_size < 2:
                raise ValueError("`gradient_accumulation_steps` must be >= 2 with HFProbe on one process (the two-batch "
                                 "estimate needs two or more micro-batches per step); got "
                                 f"{args.gradient_accumulation_steps} on {args.world_size} process(es).")
            self.probe = Probe(model, **self.settings, trainer="transformers")
            if self.probe.stats_every is not None:
                self._batch_hook = model.register_forward_pre_hook(self._record_batch, with_kwargs=True)
            if self.saved is not None:
                self.probe.load_state_dict(self.saved)
            elif state.global_step > 0:
                warnings.warn(f"HFProbe starts afresh at step {state.global_step} (no saved state; resume with "
                              "restore_callback_states_from_checkpoint=True to continue the EMA).", RuntimeWarning,
                              stacklevel=2)

        def _record_batch(self, module, args, kwargs):
            if module.training and torch.is_grad_enabled():
                size = _leading_size((args, kwargs))
                batch = {k: v for k, v in kwargs.items()
                         if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == size}
                self._batch = batch if batch else args[0] if len(args) == 1 else args if args else None

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            """After the step's last backward pass: the step's estimate, appended to ``state.log_history``
            every ``every`` steps, and the per-example statistics every ``stats_every`` steps."""
            step = state.global_step
            batch, self._batch = self._batch, None
            est = self.probe.step(step=step, batch=batch)
            metrics = _metrics(est) if est is not None and step % self.probe.every == 0 else {}
            metrics.update(_stats_metrics(self.probe, step))
            if metrics and state.is_world_process_zero:
                state.log_history.append({**metrics, "step": step})

        def on_step_end(self, args, state, control, **kwargs):
            """Before a checkpoint (``control.should_save``), join the steps deferred since the last
            row on every process: the Trainer asks for :meth:`state` on process 0 only."""
            self._join_if(control.should_save)

        def on_epoch_end(self, args, state, control, **kwargs):
            """As :meth:`on_step_end` (a checkpoint at the end of an epoch)."""
            self._join_if(control.should_save)

        def on_evaluate(self, args, state, control, **kwargs):
            """Join the deferred steps (a checkpoint of the best model may follow an evaluation)."""
            self._join_if(True)

        def _join_if(self, saving):
            if saving and self.probe is not None and self.probe._open and self.probe.estimator.n_deferred:
                self.probe.estimator.sync()

        def on_train_end(self, args, state, control, **kwargs):
            """Write the remaining rows and remove the probe's hooks."""
            self.probe.close()
            if self._batch_hook is not None:
                self._batch_hook.remove()
                self._batch_hook, self._batch = None, None

        def state(self) -> dict:
            """The callback's arguments (JSON: ``stats_loss_fn`` left out) and the probe's state, as
            Hugging Face's ``ExportableState`` saves them."""
            saved = self.probe._state(join=False) if self.probe is not None else self.saved  # process 0 only
            return {"args": {k: v for k, v in self.settings.items() if k != "stats_loss_fn"},
                    "attributes": {"saved": saved}}

    HFProbe.__module__, HFProbe.__qualname__ = __name__, "HFProbe"
    return HFProbe


_LAZY = {"LightningProbe": _lightning_probe, "HFProbe": _hf_probe}
_HF_LOSSES: dict = {}  # (path, every, stats_every) -> the stats_loss_fn of the latest HFProbe given one


def __getattr__(name):
    if name in _LAZY:
        cls = _LAZY[name]()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
