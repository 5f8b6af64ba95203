"""The gradient noise scale where training happens: under gradient accumulation and DDP.

McCandlish, Kaplan, Amodei et al., 2018, "An Empirical Model of Large-Batch Training", Appendix A.1:
the mean squared norm of a gradient averaged over B examples is E|G_B|^2 = |G|^2 + tr(Sigma) / B,
where G is the true gradient and Sigma the per-example gradient covariance.  Two batch sizes give
unbiased estimates of both,

    |G|^2   = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small),
    tr Sigma = (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big),

and the simple noise scale B_simple = tr Sigma / |G|^2.  A training step with gradient accumulation
over M micro-batches of b examples on W processes has both for free: each backward pass gives a
micro-batch gradient g_j (B_small = b; |G_small|^2 = the mean of |g_j|^2 over the n = M W
micro-batches) and the accumulated, all-reduced ``.grad`` is their mean (B_big = b M W).
:class:`GradientNoiseScale` records |g_j|^2 with a gradient hook in every backward pass and reads
|G_big|^2 from ``.grad`` after the last one (already all-reduced, the same on every process).  The
estimates need, besides |G_big|^2, only the sums over the processes of sum |g_j|^2, sum |g_j|^4, M
and M^2: one all-reduce (those four, a check that the processes hold the same steps, and room for
32 deferred steps' sums: 134 numbers) joins the processes at a step; or, with
``update(..., sync=False)``, a process keeps its step's sums without communicating and the next
synchronizing call joins them in that same all-reduce (one more per further 32), then replays them in order (per-step estimates, checks, EMA updates:
the EMA of squares is not linear in the per-step values, so each step's joined values are replayed
rather than per-process EMAs summed), so the results are those of joining every step.  The formulas
are :func:`toymodels.stats.two_batch_estimates`.

One step's estimates are noisy (n is small); the paper recommends the ratio of exponential moving
averages of tr Sigma and |G|^2 (not the average of the per-step ratios), which
:class:`NoiseScaleEMA` keeps, with Adam-style bias correction.

Standard errors
---------------
*Per step* (:func:`step_estimates`): the micro-batch gradients are means of b examples, so by the
central limit theorem g_j ~ N(G, Sigma_b) with Sigma_b = Sigma / b, independently.  Then (T2 =
tr Sigma_b^2, Q = G' Sigma_b G; tr Sigma-hat = b n / (n - 1) (A - C) with A = mean |g_j|^2, C = |G_big|^2,
and the sample variance is independent of the sample mean)

    Var(tr Sigma-hat) = 2 b^2 T2 / (n - 1),   Var(|G|^2-hat) = 2 T2 / (n (n - 1)) + 4 Q / n,
    Cov(tr Sigma-hat, |G|^2-hat) = -2 b T2 / (n (n - 1)).

The sample variance v of the n values |g_j|^2 estimates Var|g_j|^2 = 2 T2 + 4 Q without bias, but
does not separate T2 from Q; each variance above (and the delta-method variance of the ratio
B_simple) is linear in (T2, Q), so its largest value on the segment 2 T2 + 4 Q = v, T2, Q >= 0 is at
an end (T2 = v / 2 or Q = v / 4).  The per-step standard errors are these largest values: an upper
bound under the Gaussian model, itself noisy (v has n - 1 degrees of freedom).  Use them to see
that one step says little; use the EMA's for an interval.

*EMA* (:class:`NoiseScaleEMA`): the bias-corrected EMA after t steps is the weighted mean
sum_s w_s x_s with w_s = (1 - d) d^(t - s) / (1 - d^t), whose weights have
sum_s w_s^2 = (1 - d)(1 + d^t) / ((1 + d)(1 - d^t)) =: 1 / n_eff.  If the per-step estimates
(S_s, G_s) scatter independently around common values over the EMA's window, the variance of a
weighted mean is sum_s w_s^2 times the per-step variance, which the unbiased weighted variance
estimates: Var(S_bar) ~ var_w(S) / (n_eff - 1) with var_w(S) = mean_w S^2 - S_bar^2 (from the EMAs of
S^2, G^2 and S G that the class keeps beside those of S and G), likewise Var(G_bar) and
Cov(S_bar, G_bar).  The ratio R = S_bar / G_bar then has, by the delta method,

    SE(R)^2 = (Var S_bar - 2 R Cov + R^2 Var G_bar) / G_bar^2,

and, since R is biased and skewed where G_bar is noisy, also Fieller's interval (Fieller 1954, "Some
problems in interval estimation"): the R with (S_bar - R G_bar)^2 <= z^2 (Var S_bar - 2 R Cov +
R^2 Var G_bar), which inverts a test of the unbiased S_bar - R G_bar = 0 and so keeps its coverage
where the delta method's R +- z SE loses it; unbounded (reported as ``(0, inf)``) where G_bar is not
significantly positive.  This uses the observed scatter of the steps (no model of the gradients) but
assumes the steps are independent and the truth changes little over about n_eff steps; drift of the
truth widens it.  The test suite checks both against simulation (Gaussian micro-batch gradients):
the standard error matches the scatter of R over independent runs, and Fieller's 95% interval covers
the true B_simple in 95% of them where R +- 1.96 SE covers it in about 92%.

Assumptions: the loss of each micro-batch is divided by the number M of backward passes between
two :meth:`GradientNoiseScale.update` calls (``accumulation="mean"``, the usual
``(loss / M).backward()``; ``"sum"`` for losses that are not divided), every process runs the same
M and the same micro-batch size b and calls ``update`` with the same ``sync`` (it all-reduces: a
process that skips it stalls the others), ``.grad`` is zeroed after each optimizer step and not yet
clipped or unscaled when ``update`` reads it, and ``.grad`` is all-reduced (averaged) over the processes after the last
backward pass (DDP does this; a bare module in an initialized process group is assumed to be
wrapped by DDP elsewhere, as Lightning and Hugging Face do).  Norms are
computed in float32 and summed in float64, so bfloat16 autocast (or bfloat16 parameters) is fine;
with a loss scaler (float16) call ``update`` only where the scale is 1 (unsupported otherwise).
Non-finite gradients give ``inf`` estimates with the reason in ``diverged`` and leave the EMA
unchanged (as a loss scaler skips the step).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import torch
import xarray as xr
from torch import nn

from toymodels.schema import attach_attrs
from toymodels.stats import _two_batch

from . import _validate as V
from ._validate import Boolean, Instance, Integer, Maybe, Module, Options, Real, SequenceOf, validate

__all__ = ["GradientNoiseScale", "GNSEstimate", "NoiseScaleEMA", "step_estimates", "stack"]


_COUNT = Integer(1, V.MAX_EXACT_INT)
_NONNEG = Real(0.0, math.inf)


def _ratio(num: float, den: float) -> float:
    """``num / den`` where ``den > 0``, else ``inf`` (a noise scale with no signal)."""
    return num / den if den > 0 else math.inf


# --------------------------------------------------------------------------------------------------
# one step
# --------------------------------------------------------------------------------------------------
@validate(sum_sq=_NONNEG, sum_sq2=_NONNEG, n_micro=Integer(2, V.MAX_EXACT_INT), micro_batch_size=_COUNT,
          big_sq=_NONNEG)
def step_estimates(sum_sq: float, sum_sq2: float, n_micro: int, micro_batch_size: int, big_sq: float) -> dict:
    """Unbiased |G|^2 and tr Sigma of one step, B_simple and their standard errors (module docstring).

    Args:
        sum_sq: sum over the n micro-batches of |g_j|^2 (squared norm of micro-batch j's mean
            gradient), >= 0.
        sum_sq2: sum over the micro-batches of |g_j|^4 (for the standard errors), >= 0.
        n_micro: n >= 2, the number of micro-batches (accumulation steps times processes).
        micro_batch_size: b, examples per micro-batch (B_small).
        big_sq: |G_big|^2, the squared norm of the mean of the n micro-batch gradients
            (B_big = b n).

    Returns:
        dict of floats: ``grad_norm_sq_micro`` (mean |g_j|^2), ``grad_norm_sq_step`` (|G_big|^2),
        ``grad_norm_sq_unbiased``, ``trace_cov``, ``noise_scale_unbiased`` (S / |G|^2; ``inf``
        where the |G|^2 estimate is <= 0; negative where S is) and their ``*_sem`` (``trace_cov_sem``
        ...; the Gaussian-model upper bound of the module docstring).
    """
    return _step_estimates(sum_sq, sum_sq2, n_micro, micro_batch_size, big_sq)


def _step_estimates(sum_sq, sum_sq2, n_micro, micro_batch_size, big_sq) -> dict:
    """:func:`step_estimates` without the argument checks (the training loop's path)."""
    n, b = n_micro, micro_batch_size
    big_b = b * n
    a_mean = sum_sq / n
    g2, tr = _two_batch(float(a_mean), float(b), float(big_sq), float(big_b))
    ns = _ratio(tr, g2)
    v = max(sum_sq2 - sum_sq * a_mean, 0.0) / (n - 1)  # sample variance of |g_j|^2: estimates 2 T2 + 4 Q

    def variances(t2, q):  # Var S, Var G2, Cov(S, G2) under the Gaussian model
        return 2 * b * b * t2 / (n - 1), 2 * t2 / (n * (n - 1)) + 4 * q / n, -2 * b * t2 / (n * (n - 1))

    ends = [variances(v / 2, 0.0), variances(0.0, v / 4)]  # the two ends of 2 T2 + 4 Q = v
    se_s = math.sqrt(max(e[0] for e in ends))
    se_g = math.sqrt(max(e[1] for e in ends))
    if g2 > 0:  # delta method for S / G2, at the worse end
        se_ns = math.sqrt(max(max((vs - 2 * ns * c + ns * ns * vg) / (g2 * g2) for vs, vg, c in ends), 0.0))
    else:
        se_ns = math.inf
    return {"grad_norm_sq_micro": a_mean, "grad_norm_sq_step": float(big_sq), "grad_norm_sq_unbiased": g2,
            "grad_norm_sq_unbiased_sem": se_g, "trace_cov": tr, "trace_cov_sem": se_s, "noise_scale_unbiased": ns,
            "noise_scale_unbiased_sem": se_ns}


# --------------------------------------------------------------------------------------------------
# exponential moving averages
# --------------------------------------------------------------------------------------------------
_EMA_KEYS = ("s", "g", "ss", "gg", "sg")


class NoiseScaleEMA:
    """Bias-corrected exponential moving averages of tr Sigma and |G|^2 and their ratio, with a
    standard error and a Fieller interval from the per-step scatter (module docstring).

    ``update(trace_cov, grad_norm_sq)`` after each step; the EMA of x after t updates is
    m_t / (1 - d^t) with m_t = d m_(t-1) + (1 - d) x_t, m_0 = 0 (Adam-style correction).

    Args:
        decay: d in [0, 1).
        level: the coverage of the interval (``noise_scale_ema_lo``, ``noise_scale_ema_hi``).
    """

    @validate(decay=Real(0.0, 1.0, high_open=True), level=Real(0.0, 1.0, low_open=True, high_open=True))
    def __init__(self, decay: float = 0.95, *, level: float = 0.95):
        self.decay, self.level = decay, level
        self._z = NormalDist().inv_cdf(0.5 + level / 2)
        self.t = 0
        self._m = dict.fromkeys(_EMA_KEYS, 0.0)

    @validate(trace_cov=Real(), grad_norm_sq=Real())
    def update(self, trace_cov: float, grad_norm_sq: float) -> dict:
        """Add one step's unbiased estimates (finite floats, may be negative); returns :meth:`estimates`."""
        return self._update(trace_cov, grad_norm_sq)

    def _update(self, s: float, g: float) -> dict:
        d, m = self.decay, self._m
        for k, x in zip(_EMA_KEYS, (s, g, s * s, g * g, s * g)):
            m[k] = d * m[k] + (1.0 - d) * x
        self.t += 1
        return self._estimates()

    @validate()
    def estimates(self) -> dict:
        """``trace_cov_ema``, ``grad_norm_sq_ema`` (bias-corrected), ``noise_scale_ema`` (their
        ratio; ``inf`` where the |G|^2 EMA is <= 0), ``noise_scale_ema_sem`` (delta method),
        ``noise_scale_ema_lo`` / ``_hi`` (Fieller interval at ``level``, clipped at 0; ``(0, inf)``
        where the |G|^2 EMA is not significantly positive) and ``ema_n_eff``.  Before the first
        update everything is ``inf`` (``ema_n_eff`` 0); after one, the standard error is ``inf``."""
        return self._estimates()

    def _estimates(self) -> dict:
        inf = math.inf
        if self.t == 0:
            return {"trace_cov_ema": inf, "grad_norm_sq_ema": inf, "noise_scale_ema": inf, "noise_scale_ema_sem": inf,
                    "noise_scale_ema_lo": 0.0, "noise_scale_ema_hi": inf, "ema_n_eff": 0.0}
        d, t = self.decay, self.t
        corr = 1.0 - d**t
        mean = {k: v / corr for k, v in self._m.items()}
        n_eff = (1.0 + d) * corr / ((1.0 - d) * (1.0 + d**t)) if d > 0 else 1.0
        s, g = mean["s"], mean["g"]
        r = _ratio(s, g)
        se, lo, hi = inf, 0.0, inf
        if n_eff > 1.0 + 1e-9:
            k = 1.0 / (n_eff - 1.0)  # Var of a weighted mean = var_w / (n_eff - 1) (unbiased weighted variance)
            v_s = max(mean["ss"] - s * s, 0.0) * k
            v_g = max(mean["gg"] - g * g, 0.0) * k
            c_sg = (mean["sg"] - s * g) * k
            if g > 0:
                se = math.sqrt(max(v_s - 2.0 * r * c_sg + r * r * v_g, 0.0)) / g
            lo, hi = _fieller(s, g, v_s, v_g, c_sg, self._z)
        return {"trace_cov_ema": s, "grad_norm_sq_ema": g, "noise_scale_ema": r, "noise_scale_ema_sem": se,
                "noise_scale_ema_lo": lo, "noise_scale_ema_hi": hi, "ema_n_eff": n_eff}

    @validate()
    def state_dict(self) -> dict:
        """The state as a dict of Python numbers (``decay``, ``t`` and the raw EMAs)."""
        return {"decay": self.decay, "t": self.t, **{f"m_{k}": v for k, v in self._m.items()}}

    @validate(state_dict=Instance(dict, what="a dict from NoiseScaleEMA.state_dict()"))
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` (its ``decay`` must equal this EMA's)."""
        need = {"decay", "t", *(f"m_{k}" for k in _EMA_KEYS)}
        missing = sorted(need - set(state_dict))
        if missing:
            raise ValueError(f"`state_dict` must be a dict from NoiseScaleEMA.state_dict(); it lacks {missing}.")
        if float(state_dict["decay"]) != self.decay:
            raise ValueError(f"`state_dict` must come from an EMA of the same decay ({self.decay}); got "
                             f"{state_dict['decay']}.")
        self.t = V.check_int("state_dict['t']", state_dict["t"])
        self._m = {k: V.check_real(f"state_dict['m_{k}']", state_dict[f"m_{k}"]) for k in _EMA_KEYS}


def _fieller(s, g, v_s, v_g, c, z) -> tuple[float, float]:
    """Fieller's interval for the ratio s / g of two jointly normal estimates with variances v_s,
    v_g and covariance c: the R with (s - R g)^2 <= z^2 (v_s - 2 R c + R^2 v_g), clipped at 0;
    ``(0, inf)`` where g is not significantly positive (g^2 <= z^2 v_g: the set is unbounded)."""
    a = g * g - z * z * v_g
    if g <= 0 or a <= 0:
        return 0.0, math.inf
    b = s * g - z * z * c
    disc = max(b * b - a * (s * s - z * z * v_s), 0.0)
    root = math.sqrt(disc)
    return max((b - root) / a, 0.0), max((b + root) / a, 0.0)


# --------------------------------------------------------------------------------------------------
# the result of one step
# --------------------------------------------------------------------------------------------------
@dataclass
class GNSEstimate:
    """One training step's gradient noise scale (returned by :meth:`GradientNoiseScale.update`).

    Sizes: ``micro_batch_size`` b, ``n_micro_batches`` n = M x world size, ``batch_size`` B = b n.
    Per step: ``grad_norm_sq_micro`` (mean |g_j|^2), ``grad_norm_sq_step`` (|G_big|^2),
    ``grad_norm_sq_unbiased``, ``trace_cov``, ``noise_scale_unbiased`` and their ``*_sem``.
    Smoothed: ``grad_norm_sq_ema``, ``trace_cov_ema``, ``noise_scale_ema`` (ratio of the EMAs),
    ``noise_scale_ema_sem``, the interval ``noise_scale_ema_lo`` / ``_hi``, ``ema_n_eff``.  Units:
    squared gradient norms in (loss / parameter)^2; noise scales in examples.  ``diverged``: why
    this step's estimates are ``inf`` (non-finite gradients); the EMA fields then hold the previous,
    unchanged EMA.
    """

    step: int
    micro_batch_size: int
    n_micro_batches: int
    batch_size: int
    grad_norm_sq_micro: float
    grad_norm_sq_step: float
    grad_norm_sq_unbiased: float
    grad_norm_sq_unbiased_sem: float
    trace_cov: float
    trace_cov_sem: float
    noise_scale_unbiased: float
    noise_scale_unbiased_sem: float
    grad_norm_sq_ema: float
    trace_cov_ema: float
    noise_scale_ema: float
    noise_scale_ema_sem: float
    noise_scale_ema_lo: float
    noise_scale_ema_hi: float
    ema_n_eff: float
    model: str = "network"
    diverged: str | None = None

    @validate()
    def as_dict(self) -> dict:
        """The numbers as a flat dict of floats (for loggers); ``step`` and the sizes as ints,
        without ``model`` and ``diverged``."""
        return {k: v for k, v in asdict(self).items() if k not in ("model", "diverged")}

    @validate()
    def to_dataset(self) -> xr.Dataset:
        """A Dataset over ``step`` (length one) with the schema's names (``batch_size`` as
        ``batch_size_now``), ``source="measurement"``, ``model`` the network's class name, and
        ``attrs["diverged"]`` when set; :func:`stack` joins several."""
        names = {"batch_size": "batch_size_now"}
        ds = xr.Dataset({names.get(k, k): ("step", [float(v)]) for k, v in self.as_dict().items() if k != "step"},
                        coords={"step": [int(self.step)]})
        attach_attrs(ds, model=self.model, source="measurement", estimator="two-batch (McCandlish et al. 2018)")
        if self.diverged is not None:
            ds.attrs["diverged"] = f"step {self.step}: {self.diverged}"
        return ds


@validate(estimates=SequenceOf(Instance(GNSEstimate), what="GNSEstimate objects", max_len=V.MAX_STEPS))
def stack(estimates) -> xr.Dataset:
    """One Dataset over ``step`` from a list of :class:`GNSEstimate` (increasing, distinct steps);
    ``attrs["diverged"]`` joins the reasons of the steps that had one."""
    ds = xr.concat([e.to_dataset() for e in estimates], dim="step", combine_attrs="drop")
    attach_attrs(ds, model=estimates[0].model, source="measurement", estimator="two-batch (McCandlish et al. 2018)")
    reasons = [f"step {e.step}: {e.diverged}" for e in estimates if e.diverged is not None]
    if reasons:
        ds.attrs["diverged"] = "; ".join(reasons)
    return ds


# --------------------------------------------------------------------------------------------------
# the estimator in a training loop
# --------------------------------------------------------------------------------------------------
def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() else None


def _group_constraint():
    dist = _dist()
    if dist is None:
        return Maybe(Options(None))
    return Maybe(Instance(dist.ProcessGroup, what="a torch.distributed ProcessGroup"))


_JOIN_ROWS = 32  # deferred steps joined per all-reduce (with the six-number header: 134 float64)
_FLUSH_BYTES = 64 * 2**20  # gradients held at most before their norms are taken (bounds the extra memory)


def _norms(tensors, dtype) -> list:
    """The 2-norms of a list of tensors by one fused ``_foreach_norm`` in ``dtype`` (float32 for
    float32, bfloat16 or float16 tensors; float64 if any is)."""
    return torch._foreach_norm(tensors, 2, dtype=dtype)


_PER_STEP = ("grad_norm_sq_micro", "grad_norm_sq_step", "grad_norm_sq_unbiased", "grad_norm_sq_unbiased_sem",
             "trace_cov", "trace_cov_sem", "noise_scale_unbiased", "noise_scale_unbiased_sem")


@dataclass
class _Step:
    """A step as :class:`GradientNoiseScale` holds it until the processes are joined: ``sums`` =
    [sum |g_j|^2, sum |g_j|^4, M, M^2] of this process's M micro-batches (or, where an all-reduce
    launched in the backward pass covers it, those of all processes, the header's e, e^2 and the
    zeros of the join's deferred rows),
    ``big_sq`` = |G_big|^2 from the all-reduced ``.grad``, ``where`` the parameters with non-finite
    ``.grad`` (if any), ``skipped`` for :meth:`GradientNoiseScale.skip`."""

    step: int
    micro_batch_size: int
    m_local: int
    sums: list
    big_sq: float
    where: str | None
    skipped: bool


class GradientNoiseScale:
    """The gradient noise scale of every training step, from the step's own backward passes
    (McCandlish et al. 2018, App. A.1; the module docstring has the formulas and assumptions).

    Registers a gradient hook (``Tensor.register_hook``) on each trainable parameter: it sees the
    gradient of this backward pass (before accumulation into ``.grad``, before any all-reduce).  On
    the CPU it takes its norm at once (while the gradient is in cache); on an accelerator it keeps
    it and, at the end of the backward pass (an autograd engine callback), one fused
    ``_foreach_norm`` over all of them gives the squared norm of the micro-batch gradient
    (gradients are held at most 64 MiB at a time: larger models take a few fused norms per backward
    pass; a held gradient may be the storage the first backward pass of a step leaves in ``.grad``,
    so nothing may change ``.grad`` in place before that pass ends).  Every backward pass
    through the parameters between two updates counts as one micro-batch (also
    ``torch.autograd.grad`` calls that reach them).

    :meth:`update`, after the last backward pass of a step and before ``optimizer.step()``, reads
    |G_big|^2 from ``.grad``, joins the processes with one all-reduce of 134 numbers (given the DDP
    wrapper: started at the end of its synchronizing backward pass, behind DDP's own all-reduce, while
    no step is deferred; given the bare module: in ``update``), and returns a :class:`GNSEstimate`;
    :meth:`skip` in its place leaves a step out (no EMA update), :meth:`discard` forgets backward
    passes that were no micro-batches (e.g. a probe's).  ``update(b, sync=False)`` defers the step
    (no communication, returns ``None``); the next ``update`` with ``sync=True`` (or :meth:`sync`)
    joins every deferred step in its own all-reduce (one per 32 deferred steps) and replays them
    exactly (:attr:`synced`), which
    saves the per-step all-reduce where the estimates are read only every N steps.  Usable as a
    context manager (the hooks are removed on exit)::

        with GradientNoiseScale(ddp_model) as gns:
            for step in range(n):
                for m in range(M):
                    with ddp_model.no_sync() if m < M - 1 else contextlib.nullcontext():
                        (loss_fn(ddp_model(x[m]), y[m]) / M).backward()
                est = gns.update(micro_batch_size=b, sync=step % 10 == 0)  # None on the other steps
                optimizer.step(); optimizer.zero_grad()

    Args:
        model: the ``nn.Module`` or its ``DistributedDataParallel`` wrapper.
        ema_decay: d in [0, 1) of the exponential moving averages (:class:`NoiseScaleEMA`).
        level: the coverage of the EMA's interval (``noise_scale_ema_lo``, ``noise_scale_ema_hi``).
        process_group: the processes whose micro-batches form one step; default: the DDP
            wrapper's group, else the default group when ``torch.distributed`` is initialized,
            else this process alone.
        accumulation: ``"mean"``: every micro-batch loss is divided by M (the number of backward
            passes between two updates), so ``.grad`` is the mean gradient; ``"sum"``: the losses
            are not divided and ``.grad`` is the sum of the micro-batch gradients.

    Attributes:
        synced: the :class:`GNSEstimate` of the steps the latest synchronization replayed, in order
            (the deferred steps, then the step of ``update``; skipped steps have none).
        n_updates: the steps in the EMA's count so far (deferred ones once joined).
    """

    _norm_in_hook: bool | None = None  # take gradient norms in the hook (None: on the CPU); tests force it

    @validate(model=Module(), ema_decay=Real(0.0, 1.0, high_open=True), process_group=_group_constraint(),
              accumulation=Options("mean", "sum"), level=Real(0.0, 1.0, low_open=True, high_open=True))
    def __init__(self, model: nn.Module, *, ema_decay: float = 0.95, process_group=None, accumulation: str = "mean",
                 level: float = 0.95):
        self._ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        inner = model.module if self._ddp is not None else model
        self.model_name = type(inner).__name__
        self.names, self.params = zip(*[(k, p) for k, p in inner.named_parameters() if p.requires_grad])
        self.accumulation = accumulation
        self._dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        dist = _dist()
        if process_group is None and dist is not None and dist.is_initialized():
            own = getattr(model, "process_group", None)
            process_group = own if own is not None else dist.group.WORLD
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group) if process_group is not None else 1
        self.ema = NoiseScaleEMA(ema_decay, level=level)
        self.n_updates = 0
        self._micro: list[list] = []  # per backward pass: the norms of its parameter gradients
        self._pending: list[torch.Tensor] = []  # this backward's gradients whose norms are not taken yet
        self._pending_bytes, self._current, self._task = 0, [], None
        self._work = None  # an all-reduce started at the end of DDP's synchronizing backward pass
        self._queue: list[_Step] = []  # deferred steps (update(..., sync=False)), oldest first
        # update / skip calls in a row with sync=True (the same on every process; 2 at the start, so
        # that every step launches its all-reduce in the backward pass unless steps are deferred)
        self._joined_in_a_row = 2
        self.synced: list[GNSEstimate] = []  # the estimates the latest synchronization replayed
        self._handles = [p.register_hook(self._record) for p in self.params]

    def _record(self, grad: torch.Tensor) -> None:
        """Tensor hook of every parameter: the norm of this backward's gradient (before accumulation).
        On the CPU it is taken at once, while the gradient is in cache (``_foreach_norm`` is a loop of
        per-tensor norms there, with the same results); elsewhere the gradient is kept for one fused
        norm at the end of the backward pass (or once ``_FLUSH_BYTES`` are held).  The class attribute
        ``_norm_in_hook`` (private; ``None``: by ``grad.is_cpu``) forces one branch, so the tests run
        the accelerator's branch on the CPU."""
        task = torch._C._current_graph_task_id()
        if task != self._task:  # first gradient of this backward pass: close it when it ends
            self._pending, self._pending_bytes, self._current = [], 0, []  # left by a backward that failed
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
            self._task = task
        if grad.is_cpu if self._norm_in_hook is None else self._norm_in_hook:
            dtype = self._dtype
            self._current.append(torch.linalg.vector_norm(grad) if grad.dtype == dtype else
                                 torch.linalg.vector_norm(grad, dtype=dtype))
            return
        # an alias, not ``grad`` itself: holding the tensor the engine passes would make the first
        # micro-batch's accumulation (into a ``.grad`` that is None) copy it instead of taking it over
        self._pending.append(grad.detach())
        self._pending_bytes += grad.nbytes
        if self._pending_bytes > _FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._current.extend(_norms(self._pending, self._dtype))
            self._pending, self._pending_bytes = [], 0

    def _end_backward(self) -> None:
        self._flush()
        if self._current:
            self._micro.append(self._current)
        self._current, self._task = [], None
        if (self._ddp is not None and self.world_size > 1 and self._micro and self._ddp.require_backward_grad_sync
                and self._joined_in_a_row >= 2 and not self._queue):
            self._launch()

    def _local_sums(self, micro, on_device: bool | None = None) -> torch.Tensor:
        """[sum |g_j|^2, sum |g_j|^4, M, M^2] of this process's M backward passes (float64 tensor).
        On the CPU through Python floats (one copy; fewer small kernels), else on the device (no
        synchronisation inside the backward pass)."""
        if not (micro[0][0].device.type != "cpu" if on_device is None else on_device):
            return torch.tensor(self._python_sums(torch.stack([v for norms in micro for v in norms]).tolist(), micro),
                                dtype=torch.float64)
        m = len(micro)
        a = torch.stack([V.to_float64(torch.stack(norms)).square().sum() for norms in micro]) * self._scale(m)
        return torch.stack([a.sum(), a.square().sum(), a.new_tensor(float(m)), a.new_tensor(float(m * m))])

    def _scale(self, m: int) -> float:
        """|g_j|^2 / |hook gradient of pass j|^2: M^2 where each loss was divided by M."""
        return float(m) ** 2 if self.accumulation == "mean" else 1.0

    def _python_sums(self, values: list, micro, start: int = 0) -> list:
        """:meth:`_local_sums` from the norms of ``micro`` as Python floats, ``values[start:]`` (in
        the order of ``micro``), summed exactly rounded (``math.fsum``)."""
        m, scale = len(micro), self._scale(len(micro))
        a = []
        for norms in micro:
            stop = start + len(norms)
            a.append(scale * math.fsum(v * v for v in values[start:stop]))
            start = stop
        return [math.fsum(a), math.fsum(v * v for v in a), float(m), float(m * m)]

    def _launch(self) -> None:
        """Start the step's all-reduce (:meth:`_join`'s header) at the end of DDP's synchronizing
        backward pass: it queues behind DDP's gradient all-reduce, and :meth:`update` only waits for
        it (no extra round trip between the processes).  Only after two steps in a row that joined
        (none deferred since): where steps are deferred, the step after a joined one is likely
        deferred (its launched all-reduce would be wasted), and a joining one has deferred steps to
        join too, in ``update``.  Under DDP every backward pass that synchronizes launches one (with ``no_sync``
        only the last one of a step); update() uses the latest."""
        if self._work is not None:
            self._work[0].wait()
        sums = self._local_sums(self._micro)
        head = torch.cat([sums, sums.new_tensor([1.0, 1.0]), sums.new_zeros(4 * _JOIN_ROWS)])  # no deferred step: e = 1
        self._work = (_dist().all_reduce(head, group=self.process_group, async_op=True), head, len(self._micro))

    def _check_hooked(self) -> None:
        if self._handles is None:
            raise ValueError("`self` must be a GradientNoiseScale whose hook is in place; remove() was called.")

    # -- the step -------------------------------------------------------------------------------
    @validate(micro_batch_size=Integer(1, V.MAX_WIDTH), step=Maybe(Integer(0, V.MAX_EXACT_INT)), sync=Boolean())
    def update(self, micro_batch_size: int, *, step: int | None = None, sync: bool = True) -> GNSEstimate | None:
        """This step's estimates, after its last backward pass and before ``optimizer.step()``.

        With ``sync=False`` the step is *deferred*: this process keeps its own sums of the step
        (four numbers) and |G_big|^2 and returns ``None`` without communicating; the next
        synchronizing call (``update`` with ``sync=True``, :meth:`skip` with ``sync=True`` or
        :meth:`sync`) joins every deferred step (one all-reduce per 32 of them) and replays them in order (per-step
        estimates, divergence and same-M checks, EMA updates), so the EMA and the estimates are
        those of synchronizing every step; :meth:`sync` returns the deferred steps' estimates, and
        :attr:`synced` holds those of the latest synchronization.  Every process must defer the same
        steps (a different number of deferred steps is refused at the synchronization, on every
        process).  On a single process nothing is communicated either way; ``sync=False`` is then
        only a later replay.

        Args:
            micro_batch_size: b, the examples of each micro-batch (the same on every process).
            step: the label of this step in the result (default: the number of earlier updates,
                deferred ones included).
            sync: join the processes now (default) and return this step's estimate; ``False``: defer
                the step and return ``None``.

        Returns:
            The step's :class:`GNSEstimate` (``sync=True``; the deferred steps it joined are in
            :attr:`synced` before it), or ``None`` (``sync=False``).

        Raises:
            ValueError: no backward pass since the last update, a single micro-batch over all
                processes (the two-batch estimate needs n >= 2), processes with different numbers
                of micro-batches (at the synchronization, after replaying the other steps: it names
                the deferred steps concerned), processes with different numbers of deferred steps
                (all of them dropped), no ``.grad``, or the hook was removed.
        """
        self._check_hooked()
        micro, self._micro = self._micro, []
        m_local = len(micro)
        if m_local == 0:
            raise ValueError("`micro_batch_size` cannot be used yet: update() needs at least one backward pass "
                             "through the model since the last update (call it after the step's last backward).")
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            raise ValueError("`model` must have gradients in .grad at update(); none of its trainable parameters has "
                             "one (call update() before optimizer.zero_grad()).")
        if m_local < 2 and self.world_size == 1:
            self._drop_work()
            raise ValueError("`micro_batch_size` gives no two-batch estimate: a step needs at least two micro-batches "
                             "over all processes (accumulation steps x processes >= 2); got one.")
        if step is None:
            step = self.n_updates + sum(not s.skipped for s in self._queue)
        current = self._close_step(micro, grads, step=step, micro_batch_size=micro_batch_size, sync=sync)
        self._joined_in_a_row = self._joined_in_a_row + 1 if sync else 0
        if not sync:
            self._queue.append(current)
            return None
        return self._sync(current)[-1]

    def _close_step(self, micro, grads, *, step: int, micro_batch_size: int, sync: bool) -> _Step:
        """The host values of a step (this process's ``micro``; ``grads``: ``.grad``, or ``None`` for a
        skipped step): its sums, local or, where an all-reduce launched in the backward pass covers
        it and the step synchronizes now, joined (the header of :meth:`_join`), and |G_big|^2."""
        m_local = len(micro)
        big = _norms(grads, self._dtype) if grads is not None else []  # before waiting: the all-reduce runs
        work, self._work = self._work, None
        joined = None
        if work is not None:
            work[0].wait()  # every process launched it: waited for also where it is dropped
            if sync and work[2] == m_local:  # started at the end of DDP's synchronizing backward pass
                joined = work[1]
        first = big[0] if big else micro[0][0] if micro else None
        if first is None or first.device.type == "cpu":  # every norm to a Python float in one copy
            if joined is None:
                values = torch.stack([*big, *(v for norms in micro for v in norms)]).tolist() if big or micro else []
                sums = self._python_sums(values, micro, start=len(big)) if micro else [0.0] * 4
            else:
                values = torch.stack(big).tolist() if big else []
                sums = joined.tolist()
            big_sq = math.fsum(v * v for v in values[:len(big)])
        else:  # on the device, one synchronisation
            if joined is None:
                joined = self._local_sums(micro, on_device=True) if micro else \
                    torch.zeros(4, dtype=torch.float64, device=V.float64_device(first.device))
            parts = [joined]
            if big:
                parts.append(V.to_float64(torch.stack(big)).square().sum().reshape(1).to(joined.device))
            values = torch.cat(parts).tolist()
            sums, big_sq = values[:len(joined)], (values[-1] if big else 0.0)
        big_sq /= 1.0 if self.accumulation == "mean" or not m_local else m_local**2
        where = None
        if grads is not None and not all(math.isfinite(v) for v in [*sums[:2], big_sq]):
            where = self._where()
        return _Step(step=step, micro_batch_size=micro_batch_size, m_local=m_local, sums=sums, big_sq=big_sq,
                     where=where, skipped=grads is None)

    def _sync(self, current: _Step | None) -> list:
        """Join the deferred steps and ``current`` (``None``: none) over the processes and replay
        them in order: the estimates of the steps that updated the EMA (also :attr:`synced`)."""
        queue, self._queue = self._queue, []
        rows = self._join(queue, current)
        return self._replay(queue + ([current] if current is not None else []), rows)

    def _join(self, queue: list, current: _Step | None) -> list:
        """The sums over the processes of each step of ``queue`` then ``current``, by all-reduces of
        one fixed size (so that processes that disagree on the steps still meet in each): a header of
        six numbers (``current``'s four sums, or zeros, then e and e^2 with e = 2 x deferred steps +
        1 if there is a current step: every process holds the same steps iff W sum e^2 = (sum e)^2)
        and the first ``_JOIN_ROWS`` deferred steps' four sums; further deferred steps (rare: more
        than ``_JOIN_ROWS`` between two synchronizations) take one more all-reduce per
        ``_JOIN_ROWS``."""
        if self.world_size == 1:
            return [s.sums for s in queue] + ([current.sums] if current is not None else [])
        dist, device = _dist(), V.float64_device(self.params[0].device)
        k = len(queue)

        def reduce(first: list, steps: list) -> list:
            buf = torch.zeros(6 + 4 * _JOIN_ROWS, dtype=torch.float64)
            buf[:6] = torch.tensor(first, dtype=torch.float64)
            if steps:
                buf[6 : 6 + 4 * len(steps)] = torch.tensor([s.sums for s in steps], dtype=torch.float64).reshape(-1)
            buf = buf.to(device)
            dist.all_reduce(buf, group=self.process_group)
            return buf.tolist()

        if current is not None and len(current.sums) == 6 + 4 * _JOIN_ROWS:  # launched in the backward pass
            head = current.sums  # (only where nothing is deferred: k = 0)
        else:
            e = 2.0 * k + (current is not None)
            head = reduce([*(current.sums if current is not None else [0.0] * 4), e, e * e], queue[:_JOIN_ROWS])
        total, total_sq = round(head[4]), round(head[5])
        if total * total != total_sq * self.world_size:
            and_now = ", and a step to join" if current is not None else ""
            raise ValueError(f"`sync` must follow the same calls on every process: the {self.world_size} processes "
                             f"hold different numbers of deferred steps (update(..., sync=False) and "
                             f"skip(sync=False) since the last synchronization; this one: {k}{and_now}); every "
                             "process drops them, the EMA is unchanged.")
        flat = head[6 : 6 + 4 * min(k, _JOIN_ROWS)]
        for start in range(_JOIN_ROWS, k, _JOIN_ROWS):
            chunk = queue[start : start + _JOIN_ROWS]
            flat += reduce([0.0] * 6, chunk)[6 : 6 + 4 * len(chunk)]
        rows = [flat[4 * i : 4 * i + 4] for i in range(k)]
        return rows + ([head[:4]] if current is not None else [])

    def _replay(self, steps: list, rows: list) -> list:
        """The estimates of ``steps`` from their sums over the processes ``rows``, in order, with the
        EMA's updates; a step whose processes ran different numbers of micro-batches is left out and
        reported by a ValueError after the others."""
        out, errors = [], []
        for s, (sum_sq, sum_sq2, n, m_sq) in zip(steps, rows):
            if s.skipped:
                continue
            n = int(round(n))
            at = "" if len(steps) == 1 else f" (step {s.step})"
            if n * n != round(m_sq) * self.world_size:  # sum M_r^2 = n^2 / W iff every process ran the same M
                errors.append(f"`model` must run the same number of backward passes on every process between "
                              f"updates{at}; got {n} in all over {self.world_size} processes (this one: {s.m_local}).")
                continue
            if n < 2:
                errors.append(f"`micro_batch_size` gives no two-batch estimate{at}: a step needs at least two "
                              "micro-batches over all processes (accumulation steps x processes >= 2); got one.")
                continue
            b = s.micro_batch_size
            self.n_updates += 1
            if math.isfinite(sum_sq) and math.isfinite(sum_sq2) and math.isfinite(s.big_sq):
                reason = None
                per_step = _step_estimates(sum_sq, sum_sq2, n, b, s.big_sq)
                smooth = self.ema._update(per_step["trace_cov"], per_step["grad_norm_sq_unbiased"])
            else:
                reason = (f"non-finite gradient{s.where or ' (in a micro-batch gradient)'}: estimates set to inf, "
                          "EMA not updated")
                per_step = dict.fromkeys(_PER_STEP, math.inf)
                smooth = self.ema._estimates()
            out.append(GNSEstimate(step=s.step, micro_batch_size=b, n_micro_batches=n, batch_size=b * n, **per_step,
                                   **smooth, model=self.model_name, diverged=reason))
        self.synced = out
        if errors:
            raise ValueError(" ".join(errors))
        return out

    @validate()
    def sync(self) -> list:
        """Join the deferred steps (``update(..., sync=False)``, ``skip(sync=False)``) over the
        processes (one all-reduce per 32 of them) and replay them in order into the EMA; returns their
        :class:`GNSEstimate` (skipped steps have none), also kept in :attr:`synced`.

        Under ``torch.distributed`` every process of the group must call it at the same point (it
        communicates even with nothing deferred); on a single process it communicates nothing.  The
        backward passes recorded since the last update stay for the next :meth:`update`.

        Raises:
            ValueError: processes with different numbers of deferred steps (on every process; all
                are dropped and the EMA is unchanged), or steps whose processes ran different
                numbers of micro-batches (after replaying the others), or the hook was removed.
        """
        self._check_hooked()
        if self.world_size == 1 and not self._queue:
            self.synced = []
            return []
        return self._sync(None)

    @property
    def n_deferred(self) -> int:
        """The steps deferred (``sync=False``) and not yet joined, on this process."""
        return len(self._queue)

    def _where(self) -> str | None:
        """Which parameters have non-finite ``.grad`` (the first three), as `` (in .grad of ...)``."""
        bad = [k for k, p in zip(self.names, self.params)
               if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        return f" (in .grad of {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})" if bad else None

    @validate(sync=Boolean())
    def skip(self, *, sync: bool = True) -> None:
        """Leave this step out: forget the backward passes recorded since the last :meth:`update`
        without updating the EMA or the update counter, e.g. a step whose micro-batches differ in size
        or a step a loss scaler skipped.  Call it where :meth:`update` would be called; under
        ``torch.distributed`` every process of the group must call one of the two with the same
        ``sync`` (it contributes the step's sums exactly as :meth:`update` does, so a process that
        updates while another skips still gets its estimate and no process waits forever; with
        ``sync=False`` it is deferred like ``update(..., sync=False)``, and with ``sync=True`` it
        joins the deferred steps as ``update`` does).  On a single process it defers nothing (a
        ``sync=True`` skip replays the deferred steps)."""
        self._check_hooked()
        micro, self._micro = self._micro, []
        if self.world_size == 1:
            self._drop_work()
            if sync and self._queue:
                self._sync(None)
            return
        current = self._close_step(micro, None, step=-1, micro_batch_size=1, sync=sync)
        self._joined_in_a_row = self._joined_in_a_row + 1 if sync else 0
        if sync:
            self._sync(current)
        else:
            self._queue.append(current)

    @property
    def n_recorded(self) -> int:
        """The backward passes this process recorded since the last :meth:`update` (its M so far)."""
        return len(self._micro)

    @validate()
    def discard(self) -> None:
        """Forget the backward passes recorded since the last :meth:`update`, e.g. one a probe or an
        evaluation ran through the model between two steps (:func:`deepmodels.probes.gradient_stats`
        on the hook fast path backpropagates through the parameters): they are not micro-batches of
        the step.  Single process, or a backward pass the other processes did not share; a DDP
        all-reduce already started for the step is waited for and dropped.  Deferred steps stay."""
        self._drop_work()
        self._micro = []

    # -- state ----------------------------------------------------------------------------------
    @validate()
    def state_dict(self) -> dict:
        """The EMA state and the update counter (Python numbers; save with ``torch.save`` beside the
        optimizer's state).  Refused while steps are deferred (their sums are this process's own:
        call :meth:`sync` on every process first), so the state holds every step."""
        if self._queue:
            raise ValueError(f"`self` holds {len(self._queue)} deferred step(s) (update(..., sync=False)) not yet in "
                             "the EMA: call sync() on every process before state_dict().")
        return self._state()

    def _state(self) -> dict:
        """:meth:`state_dict` without the deferred steps (for a caller on one process only)."""
        return {"ema": self.ema.state_dict(), "n_updates": self.n_updates, "accumulation": self.accumulation}

    @validate(state_dict=Instance(dict, what="a dict from GradientNoiseScale.state_dict()"))
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`: the next updates give the estimates the saved run would have.
        Deferred steps and recorded backward passes are dropped."""
        missing = sorted({"ema", "n_updates", "accumulation"} - set(state_dict))
        if missing:
            raise ValueError(f"`state_dict` must be a dict from GradientNoiseScale.state_dict(); it lacks {missing}.")
        if state_dict["accumulation"] != self.accumulation:
            raise ValueError(f"`state_dict` must come from an estimator with accumulation={self.accumulation!r}; got "
                             f"{state_dict['accumulation']!r}.")
        self.ema.load_state_dict(state_dict["ema"])
        self.n_updates = V.check_int("state_dict['n_updates']", state_dict["n_updates"])
        self.discard()
        self._queue = []

    def _drop_work(self) -> None:
        if self._work is not None:  # a started all-reduce is waited for: every process started it
            self._work[0].wait()
            self._work = None

    @validate()
    def remove(self) -> None:
        """Remove the gradient hook (idempotent); :meth:`update` then refuses to run.  Deferred steps
        not yet joined are dropped (call :meth:`sync` on every process first to keep them)."""
        self.discard()
        self._queue = []
        if self._handles is not None:
            for h in self._handles:
                h.remove()
            self._handles = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False
