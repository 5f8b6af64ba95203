"""Training with probes on a schedule, without disturbing the training data stream.

The training batches come from their own ``torch.Generator`` (seeded), the probe batches from
another, so a run with probes follows exactly the trajectory of the same run without them (except
under :class:`NoiseScaleBatch`, whose batch sizes are set by the probes).

Batch size (``batch_size``): an integer; a :class:`toymodels.schedules.Schedule`, whose
``at(k)`` is read as the batch size of update k (the update from step k to k + 1), rounded to the
nearest integer (half to even, ``numpy.rint``) and at least 1; or :class:`NoiseScaleBatch`, a
batch-size warmup that follows the gradient noise scale B_simple = tr Sigma / |E g|^2 measured by the
probes (McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training": the
critical batch size tracks B_simple, which grows during training; Merrill et al. 2025 find that
a batch-size warmup saves steps).  Every probe row records ``batch_size_now`` and ``lr_now`` (the
batch size and learning rate of the update from that step on) and ``examples`` (training examples
drawn before that step: the sum of the batch sizes of the updates before it).

Target (``target``, an absolute training loss, or ``target_rel``, a fraction of the initial one): the
full training loss is evaluated every ``eval_every`` steps (and at ``n_steps``), besides the probes;
``target_rel`` = r stands for the absolute target r x L_0, L_0 the run's evaluation at step 0 (the
same evaluation the target is checked on, in ``eval()`` mode), so ``target_rel=r`` and
``target=r * L_0`` give the same run and the same crossing; the attrs hold the absolute ``target``
the run used (and ``target_rel`` when given).  Training stops at the first evaluation <= the target
and the result has attrs ``steps_to_target`` (:func:`toymodels.stats.crossing_step` over the evaluations,
interpolated in log loss between the last evaluation above the target and the first at or below
it) and ``examples_to_target`` (the examples drawn up to that fractional step s: those before
floor(s), plus (s - floor(s)) times the batch size of update floor(s)); both ``inf`` with a
``reason`` attr when the target is not reached in ``n_steps`` or the run diverges.  The evaluations
are in the attrs ``eval_steps``, ``eval_loss`` and ``eval_examples`` (1-D float64 arrays; attrs,
because the probe rows' ``step`` coordinate holds the probe steps only and :mod:`toymodels.schema`
has no dimension for another set of steps).

With a ``path``, a checkpoint (``path + ".pt"``: model, optimizer, both generators, the step, the
probe rows and evaluations so far, the examples drawn, the batch sizes of :class:`NoiseScaleBatch`
so far, and the run's settings) is written atomically after every probe, on reaching the target and
at the end; the netCDF results are derived from that same checkpoint and written after it, at the
end and otherwise at most every :data:`RESULTS_EVERY_S` seconds (a netCDF write costs more than a
small network's probe; the checkpoint alone decides what a rerun resumes): one consistent state,
whatever the moment of an interrupt.  A rerun resumes from the checkpoint only if it is whole and of
the same settings (model and its initial parameters, data, learning rate or schedule, batch size or
batch-size rule, momentum, optimizer, seed, probe size and schedule, loss, method, target (and
``target_rel``) and evaluation interval) and not past ``n_steps``; otherwise it warns
(:class:`toymodels.resume.ResumeWarning`, naming the file and the difference) and starts afresh,
overwriting both files.  It never returns the results of other settings.  An interrupted and
resumed run equals the uninterrupted one exactly (parameters, rows, evaluations and crossing).

A run diverges when its training loss is not finite or exceeds ``diverge_factor`` times the loss
at step 0: training stops there, the returned Dataset has a last row at that step holding ``inf``
(loss, test loss and every probe statistic; ``batch_size_now``, ``lr_now`` and ``examples`` keep
their values) and the attrs ``diverged_at`` (the step) and ``divergence`` (the reason).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from toymodels import resume
from toymodels.schedules import Schedule
from toymodels.schema import attach_attrs
from toymodels._validate import validate_init
from toymodels.stats import crossing_step, gradient_statistics

from . import _validate as V
from . import probes
from ._validate import (AnyOf, Boolean, Device, Function, Instance, Integer, LossFn, Maybe, Module, Options, Real,
                        SequenceOf, validate)
from .data import Dataset

__all__ = ["probe_steps", "train", "NoiseScaleBatch", "RESULTS_EVERY_S"]

RESULTS_EVERY_S = 10.0
"""Seconds between two writes of a run's netCDF results before its end (its checkpoint is written
after every probe)."""

_POSITIVE = dict(low=0.0, high=math.inf, low_open=True, high_open=True)


class _LrTable(V.Constraint):
    """A non-empty dict ``{batch size: learning rate}``: integer keys in [1, 2**31 - 1], float
    values in (0, inf).  Returns a new dict sorted by batch size (int keys, float values)."""

    what = "a dict {batch size (an integer >= 1): learning rate (a float in (0, inf))}"

    def __call__(self, name, value):
        if not isinstance(value, dict):
            raise TypeError(f"`{name}` must be {self.what}; got {type(value).__name__}.")
        if not value:
            raise ValueError(f"`{name}` must be {self.what}; got an empty dict.")
        out = {}
        for b, lr in value.items():
            try:
                b = V.check_int(name, b, low=1, high=V.MAX_WIDTH)
                lr = V.check_real(name, lr, **_POSITIVE)
            except (TypeError, ValueError):
                raise ValueError(f"`{name}` must be {self.what}; got the entry {b!r}: {lr!r}.") from None
            if b in out:
                raise ValueError(f"`{name}` must be {self.what}; got the batch size {b} twice.")
            out[b] = lr
        return dict(sorted(out.items()))

    def bad_values(self):
        return [None, "1", {}, {0: 0.1}, {1.5: 0.1}, {4: -0.1}, {4: math.nan}, {4: math.inf}, {4: "0.1"}]


_LR_RULE = AnyOf(Function("a callable lr(batch_size) -> float"), _LrTable(),
                 what="a callable lr(batch_size) -> float or a dict {batch size: learning rate}")



@validate_init(b_min=Integer(1, V.MAX_WIDTH), b_max=Integer(1, V.MAX_WIDTH), factor=Real(**_POSITIVE),
                 estimate=Options("unbiased", "biased"), lr=Maybe(_LR_RULE))
@dataclass(frozen=True, repr=False)
class NoiseScaleBatch:
    """A batch-size warmup that follows the measured gradient noise scale (for :func:`train`).

    McCandlish, Kaplan, Amodei et al. 2018 ("An Empirical Model of Large-Batch Training") show that
    the critical batch size, beyond which a larger batch saves few steps, tracks the simple noise
    scale B_simple = tr Sigma / |E g|^2 (Sigma the per-example gradient covariance, E g the
    full-batch gradient; a number of examples), and that B_simple grows as the loss falls; Merrill
    et al. 2025 find that a batch-size warmup saves steps.  This rule starts at ``b_min`` and, at every
    probe of :func:`train` at step k, sets the batch size of the updates from step k on to

        B_k = max(B_(k-1), clip(round(factor * B_simple(k)), b_min, b_max)),

    never decreasing (a warmup), where B_simple(k) is the probe's ``noise_scale_unbiased``
    (``estimate="unbiased"``: the two-batch-size estimate of McCandlish et al. App. A from the
    probe's per-example gradients, total over layers) or ``noise_scale`` (``"biased"``: the
    population trace over the squared mean gradient of the probe's batch of P = ``probe_size``
    examples, whose expectation |E g|^2 + tr Sigma / P makes it about B_simple / (1 + B_simple / P),
    always below P; see :mod:`deepmodels.probes`).  An estimate that is not finite
    or is negative (the unbiased |E g|^2 or tr Sigma can come out negative from noise; a zero
    gradient gives ``inf``) keeps the current batch size.  Rounding is half to even
    (``numpy.rint``).  Without probes the batch size stays ``b_min``.

    Args:
        b_min, b_max: the first and the largest batch size, integers with
            1 <= b_min <= b_max <= 2**31 - 1.
        factor: B_k targets ``factor`` x B_simple (> 0; McCandlish et al.'s B_crit ~ B_simple is 1).
        estimate: ``"unbiased"`` or ``"biased"`` (see above).
        lr: optional learning rate per batch size: a callable ``lr(batch_size) -> float`` (it must
            return a float in (0, inf)), or a dict ``{batch size: lr}`` interpolated linearly in
            (log batch size, log lr) between its keys and constant beyond the smallest and largest
            key (a key's own value is returned exactly).  With it, the learning rate of every update
            is ``lr(B)`` of its batch size and :func:`train` takes no ``lr`` of its own; without
            it, :func:`train`'s ``lr`` (a number or a schedule over updates) is used.

    The repr names the rule (a function as ``module.qualname``, a dict by its entries); it is part
    of the settings of a training checkpoint, so a resumed run with another rule is refused and
    trained afresh.  A callable ``lr`` is also recorded by its values at b_min, b_max and the powers
    of 2 between them, so two different functions of one name are told apart there.
    """

    b_min: int
    b_max: int
    _: dataclasses.KW_ONLY
    factor: float = 1.0
    estimate: str = "unbiased"
    lr: object = None

    def __post_init__(self):
        if self.b_max < self.b_min:
            raise ValueError(f"`b_max` must be >= `b_min` = {self.b_min}; got {self.b_max}.")
        if isinstance(self.lr, dict):
            object.__setattr__(self, "lr", _LrTable()("lr", self.lr))  # a sorted copy, checked

    def __repr__(self):
        lr = "" if self.lr is None else f", lr={self.lr if isinstance(self.lr, dict) else V.describe(self.lr)}"
        return (f"NoiseScaleBatch(b_min={self.b_min}, b_max={self.b_max}, factor={self.factor!r}, "
                f"estimate={self.estimate!r}{lr})")

    def __hash__(self):
        return hash(repr(self))

    def _lr_of(self, batch_size: int) -> float:
        """The learning rate of batch size ``batch_size`` (the rule's ``lr`` must be set)."""
        if isinstance(self.lr, dict):
            if batch_size in self.lr:
                return self.lr[batch_size]
            keys = np.log(np.array(list(self.lr), dtype=np.float64))
            vals = np.log(np.array(list(self.lr.values()), dtype=np.float64))
            return float(np.exp(np.interp(math.log(batch_size), keys, vals)))
        value = self.lr(batch_size)
        try:
            return V.check_real("lr", value, **_POSITIVE)
        except (TypeError, ValueError):
            raise ValueError(f"`lr` of {self!r} must return a float in (0, inf); lr({batch_size}) returned "
                             f"{value!r}.") from None

    def _lr_fingerprint(self) -> str:
        """The learning rates at b_min, the powers of 2 between, and b_max (for the checkpoint settings)."""
        bs = sorted({self.b_min, self.b_max} | {2**j for j in range(32) if self.b_min < 2**j < self.b_max})
        return " ".join(f"{b}:{self._lr_of(b)!r}" for b in bs)

    def _next(self, current: int, measured: float) -> int:
        """The batch size after a probe that measured B_simple = ``measured``."""
        if not math.isfinite(measured) or measured < 0:
            return current
        return max(current, int(np.rint(min(max(self.factor * measured, self.b_min), self.b_max))))


class _Batches:
    """The batch size of every update under an int, a Schedule or a NoiseScaleBatch, and the
    examples drawn between two steps.  For the adaptive rule ``history`` holds ``[step, size]``
    pairs: the size of the updates from that step on (changed only at probes)."""

    def __init__(self, rule):
        self.rule = rule
        self.history = [[0, rule.b_min]] if isinstance(rule, NoiseScaleBatch) else None

    def at(self, k: int) -> int:
        if isinstance(self.rule, int):
            return self.rule
        if isinstance(self.rule, Schedule):
            return int(self.sizes(k, k + 1)[0])
        i = int(np.searchsorted([h[0] for h in self.history], k, side="right")) - 1
        return int(self.history[i][1])

    def sizes(self, k0: int, k1: int) -> np.ndarray:
        """Batch sizes of updates k0..k1-1, int64 ``(k1 - k0,)`` (adaptive: updates already decided)."""
        k = np.arange(k0, k1)
        if isinstance(self.rule, int):
            return np.full(k.shape, self.rule, dtype=np.int64)
        if isinstance(self.rule, Schedule):
            return np.maximum(1, np.rint(self.rule.at(k))).astype(np.int64)
        starts = np.array([h[0] for h in self.history])
        return np.array([h[1] for h in self.history], dtype=np.int64)[np.searchsorted(starts, k, side="right") - 1]

    def examples(self, k0: int, k1: int) -> int:
        """Examples drawn by updates k0..k1-1 (in chunks of 10**6 updates)."""
        return sum(int(self.sizes(a, min(a + 10**6, k1)).sum()) for a in range(k0, k1, 10**6))


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
    n_labels = x.shape[0] if y.dtype.is_floating_point else y.numel()  # labels per position (n, T): a share of n T
    return sum(losses) / x.shape[0], correct / n_labels


def _initial_eval(model, data, loss_fn, name: str) -> float:
    """The full training loss of ``model`` now, in ``eval()`` mode (the mode restored): the evaluation
    a target is checked on, so the step-0 evaluation of a run equals it bit for bit.  Refused (naming
    ``name``) unless finite and > 0, as a fraction of it would not be a target."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        loss = _evaluate(model, data.x_train, data.y_train, loss_fn)[0]
    finally:
        for m, mode in modes:
            m.training = mode
    if not (math.isfinite(loss) and loss > 0):
        raise ValueError(f"`{name}` must be a fraction of a finite, positive initial training loss; the initial "
                         f"training loss is {loss!r} (give an absolute `target` instead).")
    return loss


_BATCH_RULE = AnyOf(Integer(1, V.MAX_WIDTH), Instance(Schedule), Instance(NoiseScaleBatch),
                    what="an integer in [1, 2147483647], a toymodels.schedules.Schedule of batch sizes or a "
                         "deepmodels.train.NoiseScaleBatch")


@validate(model=Module(), data=Instance(Dataset, what="a deepmodels.data.Dataset"),
          lr=Maybe(AnyOf(Real(**_POSITIVE), Instance(Schedule),
                         what="a float in (0, inf) or a toymodels.schedules.Schedule")),
          batch_size=_BATCH_RULE, n_steps=Integer(1, V.MAX_STEPS), momentum=Real(0.0, 1.0, high_open=True),
          optimizer=AnyOf(Options("sgd", "adam"), V.OptimizerClass(),
                          what="'sgd', 'adam' or a torch.optim.Optimizer class"),
          probe_at=Maybe(SequenceOf(Integer(0, V.MAX_STEPS), increasing=True, max_len=V.MAX_STEPS,
                                    what="increasing steps in [0, n_steps]")),
          probe_size=Integer(2, V.MAX_WIDTH), loss_fn=LossFn(), method=Options("auto", "func", "hooks"), seed=V.Seed(),
          device=Maybe(Device()), path=Maybe(Instance(str, os.PathLike, what="a path (str or os.PathLike)")),
          progress=Boolean(), diverge_factor=Real(1.0, np.inf, low_open=True, high_open=True),
          target=Maybe(Real(**_POSITIVE)), target_rel=Maybe(Real(0.0, 1.0, low_open=True, high_open=True)),
          eval_every=Maybe(Integer(1, V.MAX_STEPS)), probe_ci=Maybe(Real(0.0, 1.0, low_open=True, high_open=True)),
          on_probe=Maybe(Function("a callable on_probe(step, model)")))
def train(model, data: Dataset, *, lr=None, batch_size, n_steps: int, momentum: float = 0.0,
          optimizer="sgd", probe_at=None, probe_size: int = 256, loss_fn=F.cross_entropy, method: str = "auto",
          seed: int = 0, device=None, path: str | os.PathLike | None = None, progress: bool = True,
          diverge_factor: float = 1e3, target: float | None = None, target_rel: float | None = None,
          eval_every: int | None = None, probe_ci: float | None = None, on_probe=None) -> xr.Dataset:
    """Train ``model`` on ``data`` with the gradient-statistics probe at ``probe_at``.

    Args:
        model: the network (trained in place).
        data: a :class:`deepmodels.data.Dataset`.
        lr: a learning rate, or a schedule from :mod:`toymodels.schedules` (its ``at(k)`` is set
            on the optimizer before update k).  Required, unless ``batch_size`` is a
            :class:`NoiseScaleBatch` with its own ``lr`` (then it must be left out).
        batch_size: batches of training examples drawn with replacement from a generator seeded
            with ``seed``: an integer (every update); a :class:`toymodels.schedules.Schedule`
            over updates (update k uses ``max(1, rint(at(k)))`` examples; its largest value at most
            2**31 - 1); or a :class:`NoiseScaleBatch`, set at every probe from the measured noise
            scale (see the module docstring).
        n_steps: updates, at most 10**7.
        momentum: heavy-ball momentum of ``"sgd"``.
        optimizer: ``"sgd"``, ``"adam"``, or any ``torch.optim.Optimizer`` class (built as
            ``optimizer(model.parameters(), lr=...)``).
        probe_at: sorted steps to probe (see :func:`probe_steps`; default: 20 log-spaced).
        probe_size: examples per probe, drawn from the training set by a second generator.
        loss_fn: mean-reducing batch loss.
        method: per-example gradient method of :func:`deepmodels.probes.gradient_stats`.
        device: ``"cpu"``, ``"cuda"``, ... (default: the model's device).
        path: netCDF results file (and ``path + ".pt"`` checkpoint, written after each probe; the
            results at the end and at most every :data:`RESULTS_EVERY_S` seconds before); an
            existing one of the same settings is resumed, one of other settings (or damaged) is
            replaced with a warning (see the module docstring).
        progress: tqdm bar.
        diverge_factor: the run is declared diverged when a training batch loss exceeds this
            multiple of the full training loss at step 0 (or is not finite).
        target: an absolute training loss (> 0) to reach: training stops at the first evaluation at
            or below it, and the result gets ``steps_to_target`` and ``examples_to_target``.
        target_rel: instead of ``target``, a fraction in (0, 1) of the run's initial training loss
            (its evaluation at step 0, the one the target is checked on): the target is
            ``target_rel * L_0``.  At most one of ``target`` and ``target_rel``.
        eval_every: steps between evaluations of the full training loss (at steps 0, e, 2e, ...
            and ``n_steps``); default 10 with a target, none without (given without a target,
            the evaluations are recorded and training runs to ``n_steps``).
        probe_ci: if given (e.g. 0.95), every probe also gives percentile-bootstrap intervals of its
            statistics (``<stat>_ci`` over ``layer`` and ``bound``; 200 resamples of the probe's
            examples, seeded with the step: :func:`deepmodels.probes.gradient_stats`).
        on_probe: called as ``on_probe(step, model)`` after every probe (e.g. to keep a snapshot of
            the parameters; :func:`deepmodels.predict.reference_run`), not for the probes a resumed
            run restores from its checkpoint.

    Returns:
        Dataset over ``step`` (the probe steps) and ``layer``: ``loss``, ``accuracy``, ``test_loss``,
        the probe's statistics (``grad_var``, ``grad_nvar`` and ``snr`` for the batch size
        ``batch_size_now``), ``batch_size_now``, ``lr_now`` and ``examples``; ``source="measurement"``;
        attrs ``batch_size`` (the integer as a float, or the rule's repr), ``lr`` (of update 0);
        with evaluations, attrs ``eval_steps``, ``eval_loss``, ``eval_examples`` (float64 arrays) and
        ``eval_every``; with a target, attrs ``target`` (the absolute training loss, also with
        ``target_rel``, which is then recorded too), ``steps_to_target`` (a float step) and
        ``examples_to_target`` (a float), and ``reason`` when they are ``inf``; after a divergence,
        a last row of ``inf`` at the step it happened and attrs ``diverged_at`` and ``divergence``;
        the probes' coverage (:func:`deepmodels.probes.gradient_stats`) in attrs ``method``,
        ``path_hooks``, ``path_func``, ``skipped`` and ``skipped_reasons`` (strings, the union over
        the probes).
    """
    from toymodels.schedules import as_schedule

    if path is not None and os.path.isdir(path):
        raise ValueError(f"`path` must be a file path (the netCDF results); got {str(path)!r}, an existing folder.")
    if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ValueError(f"`path` must be in an existing folder; {os.path.dirname(os.path.abspath(path))!r} does not exist.")
    if probe_at is not None and probe_at[-1] > n_steps:
        raise ValueError(f"`probe_at` must be increasing steps in [0, n_steps={n_steps}]; got {probe_at[-1]}.")
    rule = batch_size
    rule_lr = isinstance(rule, NoiseScaleBatch) and rule.lr is not None
    if rule_lr and lr is not None:
        raise ValueError(f"`lr` must be left out when `batch_size` sets the learning rate ({rule!r}); got {lr!r}.")
    if lr is None and not rule_lr:
        raise ValueError("`lr` must be a float in (0, inf) or a toymodels.schedules.Schedule (it may be left out "
                         "only when `batch_size` is a NoiseScaleBatch with its own `lr`); got None.")
    if isinstance(rule, Schedule) and not rule.max_lr < V.MAX_WIDTH + 0.5:
        raise ValueError(f"`batch_size` must be a schedule of batch sizes at most {V.MAX_WIDTH}; got {rule!r}, "
                         f"whose largest value is {rule.max_lr:g}.")
    V.check_one_target(target, target_rel, required=False)
    if eval_every is None and (target is not None or target_rel is not None):
        eval_every = 10
    V.check_data_fits(model, data, loss_fn, device=device)
    if method == "func":
        P = V.n_trainable(model)
        V.check_bytes("probe_size", 12.0 * min(probe_size, data.x_train.shape[0]) * P,
                      f"the per-example gradients of {probe_size} examples x {P} parameters", device=device)
    schedule = None if lr is None else as_schedule(lr) if not isinstance(lr, Schedule) else lr
    batches = _Batches(rule)

    def lr_of(k):  # the learning rate of update k (its batch size decided)
        return rule._lr_of(batches.at(k)) if rule_lr else float(schedule.at(np.array([k]))[0])

    lr0 = lr_of(0)
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
    rows, evals, start, examples = [], [], 0, 0  # evals: [step, training loss, examples before the step]
    attrs = dict(data=data.name, lr=lr0, batch_size=float(rule) if isinstance(rule, int) else repr(rule),
                 momentum=momentum, seed=seed, optimizer=opt_name)
    if eval_every is not None:
        attrs["eval_every"] = eval_every
    if target_rel is not None:  # the absolute target: a fraction of the evaluation at step 0 (the initial model)
        target = target_rel * _initial_eval(model, data, loss_fn, "target_rel")
    if target is not None:
        attrs["target"] = target
    if target_rel is not None:
        attrs["target_rel"] = target_rel
    settings = dict(_model_fingerprint(model), data=f"{data.name} {tuple(data.x_train.shape)}",
                    lr=repr(schedule) if schedule is not None else "None",
                    batch_size=rule if isinstance(rule, int) else repr(rule), momentum=momentum, optimizer=opt_name,
                    seed=seed, probe_size=probe_size, method=method,
                    loss_fn=getattr(loss_fn, "__qualname__", type(loss_fn).__qualname__),
                    target=str(target), eval_every=str(eval_every), probe_ci=str(probe_ci))
    if target_rel is not None:
        settings["target_rel"] = str(target_rel)
    if rule_lr:
        settings["batch_lr"] = rule._lr_fingerprint()
    ckpt = None if path is None else str(path) + ".pt"
    state = None if path is None else _load_checkpoint(ckpt, settings, steps, n_steps, device)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen_train.set_state(state["gen_train"])
        gen_probe.set_state(state["gen_probe"])
        start = int(state["step"])
        rows = state["rows"]
        examples = int(state["examples"])
        # an evaluation at a former n_steps that is not one of this run's evaluation steps is left out
        evals = [e for e in state["evals"] if eval_every is not None and (e[0] % eval_every == 0 or e[0] == n_steps)]
        if batches.history is not None:
            batches.history = [list(h) for h in state["batch_history"]]
    initial_loss = _evaluate(model, data.x_train, data.y_train, loss_fn)[0] if start == 0 else state["initial_loss"]

    def write(to):
        return _write(rows, to, model, dict(attrs, **_eval_attrs(evals, target, batches, rows, n_steps)))

    last_write = [-math.inf]

    def save(step, final=False):
        if path is not None:
            _save_checkpoint(ckpt, model, opt, gen_train, gen_probe, step, rows, settings, initial_loss,
                             examples=examples, evals=evals, batch_history=batches.history)
            if final or time.monotonic() - last_write[0] >= RESULTS_EVERY_S:
                write(path)
                last_write[0] = time.monotonic()

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
        rows.append(_diverged_row(rows, k, reason, batch_size=batches.at(k), lr=lr_of(k), examples=examples))
        save(k, final=True)
        return True

    k = start
    while not (rows and "diverged_at" in rows[-1].attrs):  # a resumed diverged run is finished
        tl = None
        if k in todo:
            model.eval()
            tl, acc = _evaluate(model, data.x_train, data.y_train, loss_fn)
            if diverged(k, tl, "the training loss"):
                break
            pidx = torch.randint(0, n, (min(probe_size, n),), generator=gen_probe).to(device)
            st = probes.gradient_stats(model, loss_fn, data.x_train[pidx], data.y_train[pidx],
                                       batch_size=batches.at(k), method=method, step=k, ci=probe_ci, seed=k)
            if st.attrs.get("diverged"):  # the probe met non-finite gradients
                diverged(k, math.inf, "", reason=f"the probe at step {k}: {st.attrs['diverged']}")
                break
            if batches.history is not None:  # the warmup: the batch size of the updates from step k on
                name = "noise_scale_unbiased" if rule.estimate == "unbiased" else "noise_scale"
                b_old = batches.at(k)
                b_new = rule._next(b_old, float(st[name].sel(layer="total").values.reshape(-1)[0]))
                if b_new != b_old:
                    if batches.history[-1][0] == k:  # (the first batch size, replaced at a probe of step 0)
                        batches.history[-1][1] = b_new
                    else:
                        batches.history.append([k, b_new])
                    again = gradient_statistics(st.grad_norm_sq.values, np.maximum(st.trace_cov.values, 0.0),
                                                st.n_params.values, b_new)
                    for stat in ("grad_var", "grad_nvar", "snr"):
                        st[stat] = st[stat].copy(data=again[stat])
            te, _ = _evaluate(model, data.x_test, data.y_test, loss_fn)
            model.train()
            st["loss"] = ("step", [tl])
            st["accuracy"] = ("step", [acc])
            st["test_loss"] = ("step", [te])
            st["batch_size_now"] = ("step", [float(batches.at(k))])
            st["lr_now"] = ("step", [lr_of(k)])
            st["examples"] = ("step", [float(examples)])
            row = st.drop_attrs()  # the coverage stays (the written Dataset has its union over the probes)
            row.attrs.update({key: st.attrs[key] for key in probes._COVERAGE if key in st.attrs})
            rows.append(row)
            if on_probe is not None:
                on_probe(k, model)
        if eval_every is not None and (k % eval_every == 0 or k == n_steps) and not (evals and evals[-1][0] == k):
            if tl is None:
                was_training = model.training
                model.eval()
                tl = _evaluate(model, data.x_train, data.y_train, loss_fn)[0]
                model.train(was_training)
            if diverged(k, tl, "the training loss"):
                break
            evals.append([k, tl, examples])
        reached = target is not None and evals and evals[-1][0] == k and evals[-1][1] <= target
        if k in todo or reached or k == n_steps:  # after a probe (with this step's evaluation), and at the end:
            save(k, final=reached or k == n_steps)  # a finished run is returned at once by a rerun
        if reached or k == n_steps:
            break
        b = batches.at(k)
        idx = torch.randint(0, n, (b,), generator=gen_train).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_of(k)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
        if diverged(k, float(loss.detach()), "the training batch loss"):
            break
        loss.backward()
        opt.step()
        examples += b
        k += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return write(None)


def _eval_attrs(evals, target, batches, rows, n_steps) -> dict:
    """The evaluations and, with a target, ``steps_to_target`` / ``examples_to_target`` (and ``reason``)."""
    out = {}
    if not evals and target is None:
        return out
    ev = np.array(evals, dtype=np.float64).reshape(-1, 3)
    out.update(eval_steps=ev[:, 0].copy(), eval_loss=ev[:, 1].copy(), eval_examples=ev[:, 2].copy())
    if target is None:
        return out
    s = crossing_step(ev[:, 0], ev[:, 1], target) if len(ev) else math.inf
    if math.isfinite(s):
        j = int(np.flatnonzero(ev[:, 1] <= target)[0])
        k0 = int(ev[max(j - 1, 0), 0])
        f = math.floor(s)
        ex = int(ev[max(j - 1, 0), 2]) + batches.examples(k0, f)
        if s > f:
            ex += (s - f) * batches.at(f)
        out.update(steps_to_target=float(s), examples_to_target=float(ex))
        return out
    if rows and "diverged_at" in rows[-1].attrs:
        reason = f"the run diverged: {rows[-1].attrs['divergence']}"
    else:
        at = int(ev[-1, 0]) if len(ev) else 0
        low = f" (lowest evaluation {ev[:, 1].min():.6g})" if len(ev) else ""
        reason = f"the training loss did not reach the target {target:g} by step {at} of n_steps = {n_steps}{low}"
    out.update(steps_to_target=math.inf, examples_to_target=math.inf, reason=reason)
    return out


def _diverged_row(rows, k, reason, *, batch_size, lr, examples) -> xr.Dataset:
    """A probe row at step ``k`` holding ``inf`` everywhere (the layout of the earlier rows), with
    the divergence in its attrs; ``batch_size_now``, ``lr_now`` and ``examples`` keep their values."""
    if rows:
        row = rows[-1].copy(deep=True).assign_coords(step=[k])
        for name, var in row.data_vars.items():
            if var.dtype.kind == "f":
                row[name] = var.copy(data=np.full(var.shape, np.inf))
    else:
        row = xr.Dataset({v: ("step", [np.inf]) for v in ("loss", "test_loss")}, coords={"step": [k]})
    row["batch_size_now"] = ("step", [float(batch_size)])
    row["lr_now"] = ("step", [float(lr)])
    row["examples"] = ("step", [float(examples)])
    row.attrs.update(diverged_at=int(k), divergence=reason)
    return row


def _model_fingerprint(model) -> dict:
    """The model's class, parameter count and a hash of its parameters now (the initial ones)."""
    return {"model": type(model).__qualname__, "n_parameters": int(sum(p.numel() for p in model.parameters())),
            "initial_parameters": V.state_hash(model.state_dict())[:16]}


def _save_checkpoint(ckpt, model, opt, gen_train, gen_probe, step, rows, settings, initial_loss, *, examples,
                     evals, batch_history):
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "gen_train": gen_train.get_state(),
             "gen_probe": gen_probe.get_state(), "step": int(step), "rows": rows, "settings": settings,
             "initial_loss": float(initial_loss), "examples": int(examples), "evals": [list(e) for e in evals],
             "batch_history": None if batch_history is None else [list(h) for h in batch_history]}
    _save_torch(ckpt, state)


def _save_torch(path, obj) -> None:
    """``torch.save(obj)`` to ``path`` atomically (serialized first, then written under a temporary
    name and renamed: :func:`toymodels.resume.replace_atomically`)."""
    buf = io.BytesIO()
    torch.save(obj, buf)

    def to(tmp):
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())

    resume.replace_atomically(path, to)


def _load_checkpoint(ckpt, settings, steps, n_steps, device):
    """The saved state of this run, or None (no checkpoint; or, with a ResumeWarning, a damaged one
    or one of other settings, probe steps, or past ``n_steps``)."""
    if not os.path.exists(ckpt):
        return None

    def ignore(why):
        warnings.warn(f"ignoring checkpoint {ckpt}: {why}; training afresh.", resume.ResumeWarning, stacklevel=3)

    try:
        state = torch.load(ckpt, map_location=device, weights_only=False)
        keys = {"model", "opt", "gen_train", "gen_probe", "step", "rows", "settings", "initial_loss", "examples",
                "evals", "batch_history"}
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
    ds = xr.concat(rows, dim="step") if rows else xr.Dataset(coords={"step": np.zeros(0, dtype=np.int64)})
    for key in probes._COVERAGE:  # (xr.concat kept the first row's)
        ds.attrs.pop(key, None)
    attach_attrs(ds, model=type(model).__name__.lower(), source="measurement", **attrs)
    ds.attrs.update(probes._union_coverage([r.attrs for r in rows]))
    if rows and "diverged_at" in rows[-1].attrs:
        ds.attrs.update(diverged_at=rows[-1].attrs["diverged_at"], divergence=rows[-1].attrs["divergence"])
    if path is not None:
        resume.write(ds, path)
    return ds
