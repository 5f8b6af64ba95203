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
written.  The micro-batch size b is the leading dimension of the first tensor of each training
batch (Lightning: the batch of ``on_train_batch_start``; a plain loop and Hugging Face: the first
tensor argument of each forward pass of the model in training mode with gradients enabled); a step
whose micro-batches differ in size is skipped with a warning (the estimator assumes one b), and the
micro-batch losses must be means divided by M (``accumulation="mean"``, what both trainers do) or,
for :func:`probing`, sums (``accumulation="sum"``).

Output.  The rows are a Dataset over ``step`` with the variables of
:meth:`deepmodels.gns.GNSEstimate.to_dataset` (``noise_scale_unbiased`` and its ``_sem``,
``trace_cov``, ``grad_norm_sq_unbiased``, the EMAs ``noise_scale_ema`` ..., ``micro_batch_size``,
``n_micro_batches``, ``batch_size_now``), ``source="measurement"`` and attrs ``every``,
``ema_decay``, ``trainer``.  With a ``path``, the rows are written there as they come: the whole
file replaced atomically (:func:`toymodels.resume.write`: an interrupt leaves the old file or the new
one), at most every ``write_every_s`` seconds, whenever the state is saved (so the file holds every
row a checkpoint knows), and at the end; only process 0 writes under ``torch.distributed``.

Resume.  ``state_dict()`` holds the estimator's EMA and the rows so far (a list of dicts of
numbers); ``load_state_dict`` restores both, so a trainer resumed from a checkpoint continues the EMA
and rewrites the file with the checkpoint's rows followed by the new ones: the same estimates and
the same file as an uninterrupted run.  A fresh start overwrites an existing file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings

import numpy as np
import torch
import xarray as xr
from torch import nn

from toymodels import resume
from toymodels.schema import attach_attrs

from . import _validate as V
from . import gns as _gns
from ._validate import Instance, Integer, Maybe, Module, Options, Real, validate

__all__ = ["probing", "Probe"]

_PATH = Maybe(Instance(str, os.PathLike, what="a path (str or os.PathLike)"))
_SETTINGS = dict(path=_PATH, every=Integer(1, V.MAX_STEPS), ema_decay=Real(0.0, 1.0, high_open=True),
                 write_every_s=Real(0.0, math.inf, high_open=True))


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


class Probe:
    """The gradient noise scale of every optimizer step of a training loop, its rows every
    ``every`` steps logged, written to netCDF and resumable (see the module docstring).

    Made by :func:`probing` (or by the trainer callbacks); call :meth:`step` once per optimizer step,
    after the step's last backward pass and before ``optimizer.step()``.

    Args:
        model: the ``nn.Module`` (or its ``DistributedDataParallel`` wrapper) being trained.
        path: netCDF file of the rows, or ``None`` (rows kept in memory: :meth:`dataset`).
        every: a row every ``every`` steps (steps divisible by it); the estimator and its EMA
            advance every step.
        ema_decay: decay of the estimator's exponential moving averages, in [0, 1).
        accumulation: ``"mean"`` (each micro-batch loss divided by M) or ``"sum"``.
        process_group: the processes of one step (default: all, when ``torch.distributed`` is
            initialized).
        write_every_s: least seconds between two writes of the file before the end.
        trainer: the name recorded in the file's ``trainer`` attribute.
    """

    @validate(model=Module(), path=_PATH, every=_SETTINGS["every"], ema_decay=_SETTINGS["ema_decay"],
              accumulation=Options("mean", "sum"), write_every_s=_SETTINGS["write_every_s"],
              trainer=Instance(str))
    def __init__(self, model: nn.Module, *, path=None, every: int = 1, ema_decay: float = 0.95,
                 accumulation: str = "mean", process_group=None, write_every_s: float = 10.0,
                 trainer: str = "loop"):
        if path is not None:
            _check_path(path)
        self.path = None if path is None else os.fspath(path)
        self.every, self.ema_decay, self.write_every_s, self.trainer = every, ema_decay, write_every_s, trainer
        self.estimator = _gns.GradientNoiseScale(model, ema_decay=ema_decay, process_group=process_group,
                                                 accumulation=accumulation)
        self.rows: list = []  # GNSEstimate of the recorded steps
        self.n_steps = 0  # step() calls (the default step label)
        self._sizes: list = []  # micro-batch sizes seen since the last step
        self._last_write = -math.inf
        inner = getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model
        self._forward_hook = inner.register_forward_pre_hook(self._record_size, with_kwargs=True)
        self._open = True

    def _record_size(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            size = _leading_size((args, kwargs))
            if size is not None:
                self._sizes.append(size)

    @validate(micro_batch_size=Maybe(Integer(1, V.MAX_WIDTH)), step=Maybe(Integer(0, V.MAX_EXACT_INT)))
    def step(self, micro_batch_size: int | None = None, *, step: int | None = None):
        """This step's :class:`deepmodels.gns.GNSEstimate` (recorded as a row when ``step`` is a
        multiple of ``every``), or ``None`` when the step has a single micro-batch over all processes
        or micro-batches of different sizes (e.g. a trainer's last, partial step of an epoch): such a
        step is skipped with a ``RuntimeWarning`` and the EMA does not advance.

        Args:
            micro_batch_size: examples per micro-batch; default: read from the training forward passes
                since the last step (the leading dimension of the first tensor argument).
            step: the step's label (default: the number of earlier calls, counting restored ones).
        """
        sizes, self._sizes = self._sizes, []
        step = self.n_steps if step is None else step
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
        est = self.estimator.update(micro_batch_size, step=step)
        self.n_steps = step + 1
        if step % self.every == 0:
            self.rows.append(est)
            if self.path is not None and time.monotonic() - self._last_write >= self.write_every_s:
                self.flush()
        return est

    def _skip(self, step: int, why: str, micro_batch_size: int) -> None:
        if self.estimator.world_size > 1:  # every process joins the step's all-reduce: update, then forget it
            saved = self.estimator.state_dict()
            self.estimator.update(micro_batch_size, step=step)
            self.estimator.load_state_dict(saved)
        else:
            self.estimator.discard()  # the step's micro-batch records, dropped with it
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
        """Write the rows to ``path`` now (atomically; only on process 0; nothing without a path)."""
        if self.path is not None and _rank_zero():
            resume.write(self.dataset(), self.path)
        self._last_write = time.monotonic()

    @validate()
    def state_dict(self) -> dict:
        """The estimator's state, the step count and the rows (Python numbers, strings and ``None``:
        fit for ``torch.save`` and JSON); writes the file first, so it holds every row of the state."""
        self.flush()
        return {"estimator": self.estimator.state_dict(), "n_steps": self.n_steps, "every": self.every,
                "rows": [dataclasses.asdict(r) for r in self.rows]}

    @validate(state_dict=Instance(dict, what="a dict from Probe.state_dict()"))
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` of a probe with the same ``every`` and ``ema_decay``: the EMA
        continues and the rows restart from the saved ones."""
        missing = sorted({"estimator", "n_steps", "every", "rows"} - set(state_dict))
        if missing:
            raise ValueError(f"`state_dict` must be a dict from Probe.state_dict(); it lacks {missing}.")
        if state_dict["every"] != self.every:
            raise ValueError(f"`state_dict` must come from a probe with every={self.every}; got "
                             f"every={state_dict['every']}.")
        self.estimator.load_state_dict(state_dict["estimator"])
        self.n_steps = V.check_int("state_dict['n_steps']", state_dict["n_steps"], low=0)
        self.rows = [_gns.GNSEstimate(**r) for r in state_dict["rows"]]
        self._sizes = []

    @validate()
    def close(self) -> None:
        """Write the rows (with a path) and remove the hooks from the model (idempotent)."""
        if self._open:
            self.flush()
            self._forward_hook.remove()
            self.estimator.remove()
            self._open = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


@validate(model=Module(), path=_PATH, every=_SETTINGS["every"], ema_decay=_SETTINGS["ema_decay"],
          accumulation=Options("mean", "sum"), write_every_s=_SETTINGS["write_every_s"])
def probing(model: nn.Module, *, path=None, every: int = 1, ema_decay: float = 0.95, accumulation: str = "mean",
            process_group=None, write_every_s: float = 10.0) -> Probe:
    """A :class:`Probe` on ``model`` for a plain PyTorch loop; use it in a ``with`` block, which
    writes the file and removes the hooks at its end.

    ``probe.step()`` after the last backward pass of every optimizer step (before
    ``optimizer.step()``) returns the step's :class:`deepmodels.gns.GNSEstimate`: the unbiased
    two-batch-size noise scale B_simple = tr Sigma / |G|^2 of McCandlish et al. 2018 (App. A.1) from
    the step's micro-batches (at least two per step over all processes), its standard error and EMA.
    Rows every ``every`` steps go to ``path`` (netCDF, written as they come) and to
    ``probe.dataset()``; ``probe.state_dict()`` / ``load_state_dict`` save and resume them with the
    EMA.  Arguments as :class:`Probe`'s (the module docstring has the details).
    """
    return Probe(model, path=path, every=every, ema_decay=ema_decay, accumulation=accumulation,
                 process_group=process_group, write_every_s=write_every_s, trainer="loop")


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
        """

        def __init__(self, path=None, every: int = 1, ema_decay: float = 0.95, write_every_s: float = 10.0):
            self.settings = _check_settings(path=path, every=every, ema_decay=ema_decay, write_every_s=write_every_s)
            self.probe = None

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
            """Record the micro-batch size (the leading dimension of the batch)."""
            size = _leading_size(batch)
            if size is not None:
                self.probe._sizes.append(size)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            """After the step's last backward pass: the step's estimate, logged every ``every`` steps."""
            step = trainer.global_step
            est = self.probe.step(step=step)
            if est is not None and step % self.probe.every == 0 and trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(_metrics(est), step=step)

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
        ``restore_callback_states_from_checkpoint=True``.  Arguments as
        :func:`deepmodels.callbacks.probing`'s; the module ``deepmodels.callbacks`` describes the
        estimate and the file.  The micro-batch size is read from the model's forward passes.  A
        model whose ``forward`` takes ``**kwargs`` gets ``num_items_in_batch`` from the Trainer and
        normalizes its loss by the items of the whole step instead of being divided by M: the
        estimate is then exact when every micro-batch has the same number of loss items (no
        padding or ignored labels).
        """

        def __init__(self, path=None, every: int = 1, ema_decay: float = 0.95, write_every_s: float = 10.0):
            self.settings = _check_settings(path=path, every=every, ema_decay=ema_decay, write_every_s=write_every_s)
            self.probe = None
            self.saved = None  # the probe's state from a checkpoint (set by the Trainer on resume)

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
            if self.saved is not None:
                self.probe.load_state_dict(self.saved)
            elif state.global_step > 0:
                warnings.warn(f"HFProbe starts afresh at step {state.global_step} (no saved state; resume with "
                              "restore_callback_states_from_checkpoint=True to continue the EMA).", RuntimeWarning,
                              stacklevel=2)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            """After the step's last backward pass: the step's estimate, appended to ``state.log_history``
            every ``every`` steps."""
            step = state.global_step
            est = self.probe.step(step=step)
            if est is not None and step % self.probe.every == 0 and state.is_world_process_zero:
                state.log_history.append({**_metrics(est), "step": step})

        def on_train_end(self, args, state, control, **kwargs):
            """Write the remaining rows and remove the probe's hooks."""
            self.probe.close()

        def state(self) -> dict:
            """The callback's arguments and the probe's state, as Hugging Face's ``ExportableState`` saves them."""
            saved = self.probe.state_dict() if self.probe is not None else self.saved
            return {"args": dict(self.settings), "attributes": {"saved": saved}}

    HFProbe.__module__, HFProbe.__qualname__ = __name__, "HFProbe"
    return HFProbe


_LAZY = {"LightningProbe": _lightning_probe, "HFProbe": _hf_probe}


def __getattr__(name):
    if name in _LAZY:
        cls = _LAZY[name]()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
