"""Gradient statistics of a real network at one parameter point, per layer and in total.

From the B per-example gradients g_i of a batch (:mod:`deepmodels.pergrad`): the mean gradient g_bar,
|g_bar|^2 (``grad_norm_sq``), the population trace of the per-example covariance
tr Sigma = mean |g_i - g_bar|^2 (``trace_cov``, with its standard error), and from these the
statistics of :func:`toymodels.stats.gradient_statistics` for the optimizer's mini-batch size
(``grad_var``, ``grad_nvar``, ``snr``, ``noise_scale``), so the toy models and the network share
one definition.  ``grad_norm_sq_unbiased`` and ``noise_scale_unbiased`` come from
:func:`toymodels.stats.two_batch_estimates` with batch sizes 1 and B (McCandlish et al. 2018).

Divergence: on a model whose trainable parameters are not finite (a diverged training step), or
whose loss or per-example gradients are not finite on the batch, no statistic is formed: every
statistic is ``inf`` (never NaN, never a finite-looking number) and the reason is in
``attrs["diverged"]`` (:class:`Measurement`: its ``diverged`` field), as the toy models report
``inf`` with a reason.  :func:`probed_step` then does not step the optimizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr
from torch import nn

from toymodels.schema import attach_attrs
from toymodels.stats import gradient_statistics, two_batch_estimates

from . import _validate as V
from . import optim, pergrad
from ._validate import Boolean, Instance, Integer, LossFn, Maybe, Module, Options, Real, SequenceOf, Tensor, validate
from .pergrad import X, Y

__all__ = ["gradient_stats", "probed_step", "Measurement", "stack", "estimator_stats", "bootstrap_ci"]


_layer_of = pergrad.layer_of


def _own_name(model, k):
    """A parameter's name in the model the user trains: without a DDP wrapper's ``module.`` prefix."""
    return k.removeprefix("module.") if pergrad._ddp_group(model) is not None else k


def _summaries(blocks, B, gram=False, model=None):
    """Per layer: (P_l, |g_bar|^2, |g_i|^2 (B,), |g_i - g_bar|^2 (B,) or None, Gram (B, B) or None)
    from the per-parameter statistics of :func:`deepmodels.pergrad._measure_params` (layers named
    as in the wrapped module of a DDP ``model``)."""
    if model is not None and pergrad._ddp_group(model) is not None:
        blocks = {_own_name(model, k): b for k, b in blocks.items()}
    out = {}
    for name, f in pergrad.layer_summaries(blocks, B, sums=False).items():
        out[name] = (f["n_params"], f["mean_norm_sq"], f["sq_norms"], f.get("dev"), f.get("gram") if gram else None)
    return out


STAT_CI = ("grad_norm_sq", "grad_var", "grad_nvar", "snr", "noise_scale", "noise_scale_unbiased")


def _gram_entry(name, key, K):
    K = Tensor("float", ndim=2, what="a dict of finite float (B, B) tensors")(name, K)
    if K.shape[0] != K.shape[1] or K.shape[0] < 2:
        raise ValueError(f"`{name}` must be square (B, B) matrices with B >= 2; `{key}` has shape {tuple(K.shape)}.")
    return K, K.shape[0]


# finite float (B, B) Gram matrices, B >= 2 and the same for every layer; parameters per layer
_GRAMS = V.DictOf("layer: (B, B) tensor", _gram_entry, one_size="matrices of one size B",
                  bad=[{"a": torch.zeros(2, 3)}, {"a": torch.full((2, 2), math.nan)},
                       {"a": torch.zeros(2, 2), "b": torch.zeros(3, 3)}])
_COUNTS = V.DictOf("layer: number of parameters", lambda name, key, v: (V.check_int(name, v, low=1), None),
                   bad=[{"a": 0}, {"a": 1.5}])


@validate(grams=_GRAMS, n_params=_COUNTS, batch_size=Real(1, math.inf, high_open=True),
          level=Real(0, 1, low_open=True, high_open=True), n_boot=Integer(2, V.MAX_DRAWS), seed=V.Seed())
def bootstrap_ci(grams: dict, n_params: dict, batch_size: float, *, level: float = 0.95, n_boot: int = 200,
                 seed: int = 0) -> dict:
    """Percentile-bootstrap intervals of the statistics, resampling the B examples with replacement.

    With the Gram matrix K_ij = g_i . g_j a resample with counts w has |g_bar|^2 = w^T K w / B^2 and
    tr Sigma = w . diag(K) / B - |g_bar|^2, so no gradient is recomputed.

    Args:
        grams: ``{layer: (B, B) tensor}`` (the total is the sum over layers, added here).
        n_params: ``{layer: P_l}``.

    Returns:
        ``{stat: (n_layers + 1, 2) array}`` of (low, high) per layer and for the total.
    """
    names = list(grams)
    if set(n_params) != set(names):
        raise ValueError(f"`n_params` must have the layers of `grams` ({names}); got {list(n_params)}.")
    K0 = grams[names[0]]
    B = K0.shape[0]
    V.check_bytes("n_boot", 24.0 * n_boot * B, f"{n_boot} bootstrap resamples of {B} examples", device=K0.device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.multinomial(torch.full((B,), 1.0 / B), B * n_boot, replacement=True, generator=gen).reshape(n_boot, B)
    W = torch.zeros(n_boot, B, dtype=torch.float64).scatter_add_(1, idx, torch.ones(n_boot, B, dtype=torch.float64))
    W = W.to(V.float64_device(K0.device))
    total = sum(V.to_float64(grams[n]) for n in names)
    out = {s: np.empty((len(names) + 1, 2)) for s in STAT_CI}
    qs = [(1 - level) / 2, 1 - (1 - level) / 2]
    for j, (name, K) in enumerate([(n, V.to_float64(grams[n])) for n in names] + [("total", total)]):
        g2 = torch.einsum("nb,bc,nc->n", W, K, W) / B**2
        tr = (W @ torch.diagonal(K)) / B - g2
        P = sum(n_params.values()) if name == "total" else n_params[name]
        st = gradient_statistics(g2.cpu().numpy(), np.maximum(tr.cpu().numpy(), 0.0), P, batch_size)
        # the unbiased B_simple of the resample (two batch sizes, 1 and B; inf where |G|^2 <= 0)
        g2u, tru = two_batch_estimates((W @ torch.diagonal(K)).cpu().numpy() / B, 1.0, g2.cpu().numpy(), float(B))
        with np.errstate(divide="ignore", invalid="ignore"):
            st["noise_scale_unbiased"] = np.where(g2u > 0, np.maximum(tru, 0.0) / np.where(g2u > 0, g2u, 1.0), np.inf)
        for s in STAT_CI:  # order statistics where a resample is inf (interpolating inf - inf is NaN)
            v = st[s]
            out[s][j] = np.quantile(v, qs, method="linear" if np.all(np.isfinite(v)) else "inverted_cdf")
    return out


def _layers(model):
    """Layer names and trainable parameter counts, in the order the probes report them."""
    counts = {}
    for k, p in model.named_parameters():
        if p.requires_grad:
            layer = _layer_of(_own_name(model, k))
            counts[layer] = counts.get(layer, 0) + p.numel()
    return list(counts), np.array(list(counts.values()), dtype=np.float64)


def _diverged_measurement(model, B, bs, step, reason):
    names, P = _layers(model)
    nan = np.full(len(names) + 1, np.nan)
    return Measurement(names + ["total"], np.append(P, P.sum()), nan, nan, nan, nan, B, bs, step, diverged=reason)


_METHODS = ("auto", "func", "hooks")


def _coverage(paths, model=None) -> dict:
    """The attributes of a measurement's coverage, and its method ("hooks", "func" or "hooks+func")
    (the same paths at every step of a run: formed once, copied)."""
    key = (tuple(paths["hooks"]), tuple(paths["func"]), tuple(paths["skipped"].items()),
           model is not None and pergrad._ddp_group(model) is not None)
    got = _COVERAGE_SEEN.get(key)
    if got is None:
        if len(_COVERAGE_SEEN) >= 64:
            _COVERAGE_SEEN.clear()
        got = _COVERAGE_SEEN[key] = _coverage_attrs(paths, model)
    return dict(got)


_COVERAGE_SEEN = {}  # paths -> the coverage attributes (strings only: nothing of a model is kept)


def _coverage_attrs(paths, model=None) -> dict:
    if model is not None:
        paths = {"hooks": [_own_name(model, k) for k in paths["hooks"]],
                 "func": [_own_name(model, k) for k in paths["func"]],
                 "skipped": {_own_name(model, k): why for k, why in paths["skipped"].items()}}
    used = [m for m in ("hooks", "func") if paths[m]]
    return {**pergrad.coverage_attrs(paths), "method": "+".join(used) or "none"}


@validate(model=Module(), loss_fn=LossFn(), x=Maybe(X), y=Maybe(Y), batch=Maybe(pergrad.BATCH),
          batch_size=Maybe(Real(1, math.inf, high_open=True)),
          method=Options(*_METHODS), chunk_size=Integer(1, V.MAX_WIDTH), step=Maybe(Integer(0, V.MAX_STEPS)),
          ci=Maybe(Real(0, 1, low_open=True, high_open=True)), n_boot=Integer(2, V.MAX_DRAWS), seed=V.Seed())
def gradient_stats(model: nn.Module, loss_fn, x=None, y=None, *, batch=None, batch_size: float | None = None,
                   method: str = "auto", chunk_size: int = 256, step: int | None = None, ci: float | None = None,
                   n_boot: int = 200, seed: int = 0) -> xr.Dataset:
    """Measure the gradient statistics on the batch ``(x, y)`` (or ``batch``).

    Args:
        model: the network (its parameters are not changed; gradients are cleared).
        loss_fn: batch loss reducing by the mean, e.g. ``torch.nn.functional.cross_entropy``, called
            ``loss_fn(model(x), y)`` (a model returning an object with ``.logits`` gives those); or,
            with ``batch``, the batch form ``loss_fn(model, batch) -> (B,)`` per-example losses, e.g.
            :func:`deepmodels.pergrad.next_token_loss` (a loss reduced to a scalar is refused).
        x, y: the examples to measure on (B >= 2): ``x`` of the model's dtype and device (float64
            input to a float32 model is refused, not converted), ``y`` int64 labels in
            ``[0, n_outputs)`` or float targets.
        batch: instead of ``x`` and ``y``: a tensor, or a tuple / list / dict of tensors (e.g.
            ``{"input_ids": ...}``) sharing the first dimension B >= 2.
        batch_size: the optimizer's mini-batch size the statistics refer to (default B).
        method: ``"func"`` (torch.func per-example gradients, any model), ``"hooks"`` (the fast path
            of :mod:`deepmodels.pergrad`, no (B, P) array: Linear, Conv2d, Embedding, LayerNorm,
            RMSNorm and tied weights; FastPathUnsupported for other parameters) or ``"auto"``
            (the fast path where covered, torch.func for the other parameters only; parameters
            that neither can measure are skipped, with a warning and in ``attrs["skipped"]``).
        chunk_size: examples per vectorised torch.func call.
        step: training step to record as a coordinate (optional).
        ci: if given (e.g. 0.95), percentile-bootstrap intervals over the examples of the five
            statistics (``<stat>_ci`` over ``layer`` and ``bound``; :func:`bootstrap_ci`), from
            ``n_boot`` resamples (at most 10**6) drawn with ``seed``.

    Returns:
        Dataset over ``layer`` (each module with measured parameters, then ``"total"``):
        ``grad_norm_sq``, ``grad_var``, ``grad_nvar``, ``snr``, ``noise_scale``, ``trace_cov``,
        ``trace_cov_sem``, ``grad_norm_sq_unbiased``, ``noise_scale_unbiased``, ``n_params`` (and the
        ``*_ci`` intervals); ``source="measurement"``; the coverage in attrs: ``method``
        ("hooks", "func" or "hooks+func"), ``path_hooks``, ``path_func``, ``skipped`` (the
        parameter names measured by each path, comma-separated, "" for none) and
        ``skipped_reasons``.  On a diverged model (non-finite parameters, loss or per-example
        gradients) every statistic is ``inf`` and ``attrs["diverged"]`` says why.

    A ``DistributedDataParallel`` ``model``: every process of its group calls this on its own B
    examples and all get the statistics of the global batch of W B examples, as
    :func:`probed_step` (``method`` "auto" or "hooks", ``ci`` None; refused inside ``no_sync()``).

    Raises:
        TypeError, ValueError: bad input, named (see :mod:`deepmodels._validate`); an array that
            would not fit in memory.
    """
    prob = pergrad._problem(model, loss_fn, x, y, batch, min_batch=2)
    B, arg = prob.B, "x" if batch is None else "batch"
    ddp = pergrad._ddp_group(model) is not None
    if ddp:
        pergrad._check_syncs(model)
        if method == "func":
            raise ValueError("`method` must be 'auto' or 'hooks' for a DistributedDataParallel `model` (their backward "
                             "pass gives the mean gradient over all processes); got 'func'. Pass `model.module` to "
                             "measure this process's examples alone.")
        if ci is not None:
            raise ValueError("`ci` must be None for a DistributedDataParallel `model`: the bootstrap needs the Gram "
                             "matrix of all processes' examples; pass `model.module` for this process's examples alone.")
    bs = None if batch_size is None else float(batch_size)
    itemsize = torch.empty((), dtype=prob.dtype).element_size()
    if method == "func":
        pergrad._check_memory(prob, V.n_trainable(model), copies=2.0 + 8.0 / itemsize)
    if ci is not None:
        V.check_bytes(arg, 8.0 * B * B * len(_layers(model)[0]), f"the per-layer Gram matrices of {B} examples",
                      device=prob.device)
        V.check_bytes("n_boot", 24.0 * n_boot * B, f"{n_boot} bootstrap resamples of {B} examples", device=prob.device)
    reason = V.nonfinite_params(model)
    summ, paths = None, {"hooks": [], "func": [], "skipped": {}}
    if reason is None:
        need = frozenset({"dots", "gram"} if ci is not None else {"dots"})
        try:
            blocks, paths, _ = pergrad._measure_params(prob, method, need, chunk_size=chunk_size)
            summ = _summaries(blocks, B, ci is not None, model)
            reason = None if summ else "no parameter could be measured (see attrs['skipped'])"
        except pergrad.FastPathUnsupported as err:
            if method != "hooks":
                raise
            raise pergrad.FastPathUnsupported(f"`method` must be 'auto' or 'func' for this model: {err}") from None
        except V.Diverged as err:
            reason = f"{err} at finite parameters".replace(". at", " at")
    model.zero_grad(set_to_none=True)
    # under DDP every process joins the all-reduce, also one whose measurement diverged
    m = _measure(summ if reason is None else None, B, bs, step, model, reason)
    reason, B, bs = m.diverged, m.n_examples, m.batch_size
    ds = m.to_dataset()
    bs = float(B if bs is None else bs)
    if ci is not None:
        if reason is None:
            bounds = bootstrap_ci({n: s[4] for n, s in summ.items()}, {n: s[0] for n, s in summ.items()}, bs,
                                  level=ci, n_boot=n_boot, seed=seed)
        else:
            bounds = {stat: np.full((ds.sizes["layer"], 2), np.inf) for stat in STAT_CI}
        dims = ("layer", "bound") if step is None else ("step", "layer", "bound")
        for stat, arr in bounds.items():
            ds[f"{stat}_ci"] = (dims, arr if step is None else arr[None])
        ds = ds.assign_coords(bound=["low", "high"])
    attach_attrs(ds, model=type(model.module if ddp else model).__name__.lower(), source="measurement", batch_size=bs,
                 n_examples=B, device=str(prob.device), **_coverage(paths, model))
    return ds


@dataclass
class Measurement:
    """One probe's numbers per layer (last entry: the total), before they become xarray.

    ``trace_cov_sem`` is NaN where the per-example deviations were not formed.  ``diverged``: why
    no statistic could be formed (non-finite parameters, loss or gradients); then every statistic
    is ``inf`` (and ``to_dataset`` puts the reason in ``attrs["diverged"]``).  ``coverage``: the
    attributes saying which parameters each path measured (``method``, ``path_hooks``,
    ``path_func``, ``skipped``, ``skipped_reasons``), put in the Dataset's attrs.
    """

    layer: list
    n_params: np.ndarray
    grad_norm_sq: np.ndarray
    trace_cov: np.ndarray
    trace_cov_sem: np.ndarray
    mean_sq: np.ndarray
    n_examples: int
    batch_size: float
    step: int | None = None
    diverged: str | None = None
    coverage: dict | None = None

    @validate()
    def variables(self) -> dict:
        """The statistics (numpy, per layer); all ``inf`` (``n_params`` aside) if ``diverged``."""
        if self.diverged is not None:
            inf = np.full(len(self.layer), np.inf)
            names = STAT_CI + ("trace_cov", "trace_cov_sem", "grad_norm_sq_unbiased")
            return {**{k: inf.copy() for k in names}, "n_params": np.asarray(self.n_params, dtype=np.float64)}
        st = gradient_statistics(self.grad_norm_sq, np.maximum(self.trace_cov, 0.0), self.n_params, self.batch_size)
        g2u, tru = two_batch_estimates(self.mean_sq, 1.0, self.grad_norm_sq, float(self.n_examples))
        with np.errstate(divide="ignore", invalid="ignore"):
            nsu = np.where(g2u > 0, tru / np.where(g2u > 0, g2u, 1.0), np.inf)
        out = {k: np.asarray(v, dtype=np.float64) for k, v in st.items()}
        out.update(trace_cov=self.trace_cov, trace_cov_sem=self.trace_cov_sem, grad_norm_sq_unbiased=g2u,
                   noise_scale_unbiased=nsu, n_params=self.n_params)
        return out

    @validate()
    def to_dataset(self) -> xr.Dataset:
        """The statistics of :meth:`variables` as a Dataset over ``layer`` (the last entry the total), with
        a ``step`` dimension of length one when :attr:`step` is set; a diverged measurement keeps its
        reason in ``attrs["diverged"]``."""
        ds = xr.Dataset({k: ("layer", v) for k, v in self.variables().items()}, coords={"layer": self.layer})
        if self.diverged is not None:
            ds.attrs["diverged"] = self.diverged
        ds.attrs.update(self.coverage or {})
        return ds if self.step is None else ds.expand_dims(step=[int(self.step)])


@validate(measurements=SequenceOf(Instance(Measurement), what="Measurement objects", max_len=V.MAX_STEPS))
def stack(measurements, **attrs) -> xr.Dataset:
    """One Dataset over ``step`` and ``layer`` from a list of :class:`Measurement` (same layers);
    ``attrs["diverged"]`` lists the steps whose measurement diverged, with the reasons."""
    if any(m.layer != measurements[0].layer for m in measurements):
        raise ValueError("`measurements` must share their layers; got different layer lists.")
    steps = [m.step for m in measurements]
    if any(s is None for s in steps):
        raise ValueError("every measurement needs a `step` to be stacked.")
    rows = [m.variables() for m in measurements]
    ds = xr.Dataset({k: (("step", "layer"), np.stack([r[k] for r in rows])) for k in rows[0]},
                    coords={"step": np.asarray(steps, dtype=np.int64), "layer": measurements[0].layer})
    attach_attrs(ds, source="measurement", **{"model": "network", **attrs})
    ds.attrs.update(_union_coverage([m.coverage for m in measurements if m.coverage]))
    div = [f"step {m.step}: {m.diverged}" for m in measurements if m.diverged is not None]
    if div:
        ds.attrs["diverged"] = "; ".join(div)
    return ds


_COVERAGE = ("method", "path_hooks", "path_func", "skipped", "skipped_reasons")  # the coverage attrs of a measurement


def _union_coverage(covered) -> dict:
    """The coverage attrs (``_COVERAGE``) of several measurements (dicts; a key missing in some is
    left out of those): per key the union of the parts, in order of appearance (netCDF-safe strings)."""
    out = {}
    for key in _COVERAGE:
        have = [c[key] for c in covered if key in c]
        if have:
            sep = "; " if key == "skipped_reasons" else "+" if key == "method" else ", "
            out[key] = sep.join(dict.fromkeys(part for v in have for part in str(v).split(sep) if part))
    return out


def _local_sums(summ, present, with_dev):
    """This process's sums over its examples, in float64 on the host: ``[sum_i |g_i|^2 (L)[, sum_i
    dev_i (L), sum_i dev_i^2 (L), sum_i tot_i, sum_i tot_i^2], |g_bar|^2 (L)]`` (``tot_i`` the
    total deviation over the layers).  One concatenation and one transfer from the device (converted
    to float64 on the way); the sums over the examples are then formed on the host (a few L x B
    numbers)."""
    first = summ[present[0]][2]
    L, B = len(present), first.shape[0]
    rows = [summ[n][2] for n in present] + ([summ[n][3] for n in present] if with_dev else [])
    rows.append(torch.stack([torch.as_tensor(summ[n][1], dtype=first.dtype, device=first.device) for n in present]))
    host = torch.cat(rows).to("cpu", torch.float64).numpy()
    per_example = host[:-L].reshape(-1, B)  # |g_i|^2 per layer[, then dev_i per layer]
    parts = [per_example[:L].sum(1)]
    if with_dev:
        dev = per_example[L:]
        tot = dev.sum(0)
        parts += [dev.sum(1), (dev * dev).sum(1), np.array([tot.sum(), (tot * tot).sum()])]
    return np.concatenate(parts + [host[-L:]])


def _nonfinite_sums(local, present, with_dev):
    """Why this process's sums (:func:`_local_sums`) cannot give statistics, or None.  Sums in
    float64 of float32 (or narrower) terms do not overflow, so a sum is finite iff its terms are."""
    if np.isfinite(local).all():
        return None
    L = len(present)
    rows = [local[:L], local[-L:]] + ([local[L:2 * L], local[2 * L:3 * L]] if with_dev else [])
    bad = ~np.isfinite(np.stack(rows)).all(0)
    name = present[int(np.argmax(bad))] if bad.any() else present[0]
    return f"non-finite per-example gradients in layer `{name}` at finite parameters (the loss overflows?)"


def _measure(summ, B, bs, step, model, reason=None):
    """Per layer and total, from sums over the examples (in float64), with one transfer from the device.

    The statistics are functions of per-layer sums over the examples: sum_i |g_i|^2 and, with the
    deviations dev_i = |g_i - g_bar|^2, sum_i dev_i and sum_i dev_i^2 (and the same two of the
    total deviation), with |g_bar|^2 from ``.grad``.  A non-finite sum (a non-finite per-example
    statistic) makes the measurement diverged, naming the layer.  Given a DDP wrapper (``model``),
    each process formed them on its own examples against the global mean gradient (DDP's
    all-reduced ``.grad``), and ONE all-reduce of 3 L + 5 numbers (the sums in the layout of every
    trainable layer; B, B^2 and a divergence flag) adds them up, so that the statistics are those
    of the global batch.  Every process joins it, also one whose own measurement diverged
    (``reason``; ``summ`` None): then every process reports the divergence.  ``bs`` None: the
    number of examples (over all processes).
    """
    group = pergrad._ddp_group(model)
    present = list(summ) if summ else []
    with_dev = bool(present) and all(summ[n][3] is not None for n in present)
    L, local = len(present), None
    if present and reason is None:
        local = _local_sums(summ, present, with_dev)
        reason = _nonfinite_sums(local, present, with_dev)
        if reason is not None:
            local = None
    if group is None:
        if reason is not None:
            return _diverged_measurement(model, B, float(B if bs is None else bs), step, reason)
        vals, B_tot = local, B
    else:
        vals, B_tot = _all_reduce_sums(model, group, present, with_dev, local, B)
        if vals is None:
            bs = float(B_tot if bs is None else bs)
            return _diverged_measurement(model, B_tot, bs, step, reason or "a statistic is not finite on another "
                                         "process of the DDP group")
    bs = float(B_tot if bs is None else bs)
    msq, g2 = vals[:L] / B_tot, vals[-L:]
    if with_dev:
        tr = vals[L:2 * L] / B_tot
        sd = np.sqrt(np.maximum(vals[2 * L:3 * L] / B_tot - tr**2, 0.0))
        t1, t2 = vals[3 * L:3 * L + 2] / B_tot
        sd_total = math.sqrt(max(t2 - t1**2, 0.0))
    else:
        tr, sd, sd_total = msq - g2, np.full(L, np.nan), math.nan
    P = np.array([summ[n][0] for n in present], dtype=np.float64)
    return Measurement(present + ["total"], np.append(P, P.sum()), np.append(g2, g2.sum()), np.append(tr, tr.sum()),
                       np.append(sd, sd_total) / math.sqrt(B_tot), np.append(msq, msq.sum()), B_tot, bs, step)


def _all_reduce_sums(model, group, present, with_dev, local, B):
    """:func:`_measure`'s one all-reduce: ``(vals, B_total)`` with ``vals`` laid out as ``local`` (the
    sums of every process, |g_bar|^2 this process's), or ``(None, B_total)`` if a process diverged
    (``local`` None on a process whose own measurement diverged)."""
    import torch.distributed as dist

    names = _layers(model)[0]  # the same on every process, also on one that diverged
    n, L = len(names), len(present)
    vec = np.zeros(3 * n + 5)
    vec[3 * n:] = [0.0, 0.0, B, B * B, float(local is None)]
    if local is not None:
        table = vec[:3 * n].reshape(n, 3)
        at = [names.index(k) for k in present]
        table[at, 0] = local[:L]
        if with_dev:
            table[at, 1], table[at, 2] = local[L:2 * L], local[2 * L:3 * L]
            vec[3 * n:3 * n + 2] = local[3 * L:3 * L + 2]
    device = V.float64_device(next(p.device for p in model.parameters()))
    summed = torch.from_numpy(vec).to(device)
    dist.all_reduce(summed, group=group)
    world = dist.get_world_size(group)
    out = summed.cpu().numpy()
    n_tot, n_sq, flag = out[3 * n + 2:]
    B_tot = int(round(n_tot))
    if flag > 0:
        return None, B_tot
    if round(n_sq) * world != B_tot * B_tot:  # sum B_r^2 = B^2 / W iff every B_r = B / W
        raise ValueError(f"every process of the DDP group must measure the same number of examples (DDP averages "
                         f"the processes' mean gradients); got {B_tot} in all over {world} processes (this one: {B}).")
    rows = [names.index(k) for k in present]
    table = out[:3 * n].reshape(n, 3)[rows]
    sums = [table[:, 0]] + ([table[:, 1], table[:, 2], out[3 * n:3 * n + 2]] if with_dev else [])
    return np.concatenate(sums + [local[-L:]]), B_tot


@validate(model=Module(), loss_fn=LossFn(), x=Maybe(X), y=Maybe(Y),
          optimizer=Maybe(Instance(torch.optim.Optimizer, optim._Wrapper,
                                   what="a torch.optim.Optimizer (or a deepmodels.optim wrapper)")),
          batch=Maybe(pergrad.BATCH), step=Maybe(Integer(0, V.MAX_STEPS)), sem=Boolean())
def probed_step(model: nn.Module, loss_fn, x=None, y=None, optimizer=None, *, batch=None, step: int | None = None,
                sem: bool = False):
    """One training step whose own backward pass also yields the gradient statistics: forward,
    backward with :class:`deepmodels.pergrad.LayerCapture`, ``optimizer.step()``.

    Parameters the fast path covers (Linear, Conv2d, Embedding, LayerNorm, RMSNorm, tied weights)
    are measured on the step's own backward pass; the others by torch.func for those parameters
    only, before the update (a second, vectorised pass: slower), or skipped with a warning (see
    :func:`gradient_stats`).  On the first call per model structure (modules, parameters, which are
    trainable), the fast path's per-example gradients are checked to add up to the step's gradient (:class:`deepmodels.pergrad.LayerCapture`); the
    model's forward pass on the first example (does it take ``x``, how many outputs, does the loss
    give a scalar) is checked once per model structure, input shape and loss function, while the
    inputs, the labels' range and the parameters' finiteness are checked at every call.  Without
    ``sem``, a Linear layer on sequences and a Conv2d with many output positions form their
    per-example weight gradients in the backward pass and their weight gradient (the one the
    optimizer uses) as their sum, equal to the plain backward pass's up to rounding; tied weights
    get their squared norms from each use plus cross terms, without a ``(B, P)`` array
    (:mod:`deepmodels.pergrad`).

    Args:
        loss_fn, x, y, batch: the loss in one of its two forms (:func:`gradient_stats`).
        optimizer: the optimizer to step (required).
        sem: also form each example's deviation |g_i - g_bar|^2 for the standard error of
            ``trace_cov`` (one more matmul per layer).

    Several processes: given a ``torch.nn.parallel.DistributedDataParallel`` wrapper, every process
    of its group calls ``probed_step`` on its own B examples (the same B on each); each measures its
    own examples against DDP's all-reduced mean gradient, and one all-reduce of 3 L + 5 numbers
    (L layers) adds up their sums, so that the statistics are those of one process on the global
    batch of W B examples (``n_examples`` = ``batch_size`` = W B), on every process; layers are named
    as in the wrapped module.  The fast path's check (first call) adds up every process's sums
    too (one more all-reduce, on that call only).  Refused inside ``model.no_sync()`` (a step
    whose gradients are not all-reduced would leave the processes' parameters apart; for gradient
    accumulation use :class:`deepmodels.gns.GradientNoiseScale`).

    Returns:
        ``(loss, Measurement)``: the batch loss (under DDP: this process's) and the statistics of
        this batch (``batch_size`` = B) at the parameters before the update, with its coverage;
        :func:`stack` turns a list of them into a Dataset.  Diverged (non-finite parameters, loss or per-example gradients):
        ``(inf, Measurement)`` with ``diverged`` set and every statistic ``inf``; the optimizer does not step.
    """
    if optimizer is None:
        raise TypeError("`optimizer` must be a torch.optim.Optimizer (or a deepmodels.optim wrapper); got None.")
    prob = pergrad._problem(model, loss_fn, x, y, batch, min_batch=2, once=True)
    B = prob.B
    ddp = pergrad._ddp_group(model) is not None
    if ddp:
        pergrad._check_syncs(model)
    reason, summ = V.nonfinite_params(model, prob.layout.trainable()), None
    if reason is None:
        try:
            blocks, paths, loss = pergrad._measure_params(prob, "auto", frozenset({"dots"} if sem else ()),
                                                          zero_grad=optimizer.zero_grad, verify="once")
            summ = _summaries(blocks, B, model=model)
            reason = None if summ else "no parameter could be measured"
        except V.Diverged as err:
            reason = f"{err} at finite parameters".replace(". at", " at")
    # under DDP every process joins the all-reduce, also one whose measurement diverged
    m = _measure(summ if reason is None else None, B, None, step, model, reason)
    if m.diverged is not None:
        optimizer.zero_grad(set_to_none=True)
        return math.inf, m
    m.coverage = _coverage(paths, model)
    optimizer.step()
    return float(loss.detach()), m


@validate(model=Module(finite=True), loss_fn=LossFn(), x=X, y=Y, batch_size=Integer(1, V.MAX_WIDTH),
          snapshot=Maybe(Module(finite=True)), n_clusters=Maybe(Integer(0, V.MAX_WIDTH)), n_iter=Integer(1, V.MAX_ITER),
          n_samples=Integer(0, V.MAX_DRAWS), seed=V.Seed(), chunk_size=Integer(1, V.MAX_WIDTH))
def estimator_stats(model, loss_fn, x, y, batch_size: int, *, snapshot=None, n_clusters: int | None = None,
                    n_iter: int = 10, n_samples: int = 0, seed: int = 0, chunk_size: int = 256) -> xr.Dataset:
    """Variance of the gradient-mean estimators SG-B, SG-2B, SVRG and gradient clustering over the
    examples ``(x, y)``, by :func:`toymodels.estimators.estimator_stats` on the network's per-example
    gradients (one definition for toy models and networks).

    Args:
        batch_size: B of SG-B (SG-2B uses 2B, SVRG B).
        snapshot: a copy of the model at SVRG's snapshot (its per-example gradients are the control
            variate); SVRG is left out if None.
        n_clusters: clusters of GC (default B, the paper's choice); 0 leaves GC out.  The clustering
            is the full-rank weighted clustering of Alg. 1-3 on the flattened gradients.
        n_samples: draws of each estimator for the sampled variance (0: exact only; at most 10**6).
        n_iter: clustering iterations, at most 10**4.
    """
    from toymodels import estimators

    pergrad.check_inputs(model, loss_fn, x, y, min_batch=2)
    N = x.shape[0]
    if batch_size > N:
        raise ValueError(f"`batch_size` must be at most the number of examples {N}; got {batch_size}.")
    K = batch_size if n_clusters is None else n_clusters
    if K > N:
        raise ValueError(f"`n_clusters` must be at most the number of examples {N} (default: `batch_size`); got {K}.")
    if snapshot is not None:
        shapes = [(k, tuple(p.shape)) for k, p in model.named_parameters() if p.requires_grad]
        if [(k, tuple(p.shape)) for k, p in snapshot.named_parameters() if p.requires_grad] != shapes:
            raise ValueError("`snapshot` must be a copy of `model` (the same trainable parameters); got other ones.")
        pergrad.check_inputs(snapshot, loss_fn, x, y)
    pergrad.check_grad_memory(model, x, copies=(2.0 if snapshot is not None else 1.0) * (2.0 + 8.0 / x.element_size()))
    G = pergrad.flatten(pergrad.per_example_grads(model, loss_fn, x, y, chunk_size=chunk_size)).cpu().double().numpy()
    S = None
    if snapshot is not None:
        S = pergrad.flatten(pergrad.per_example_grads(snapshot, loss_fn, x, y, chunk_size=chunk_size)).cpu().double().numpy()
    assign = estimators.gradient_clustering(G, K, n_iter=n_iter, seed=seed)[0] if K else None
    ds = estimators.estimator_stats(G, batch_size, assign=assign, G_snapshot=S, n_samples=n_samples, seed=seed)
    ds.attrs["model"] = type(model).__name__.lower()
    ds.attrs["source"] = "measurement"
    return ds
