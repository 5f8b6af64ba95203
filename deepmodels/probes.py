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


def _summaries(blocks, B, gram=False):
    """Per layer: (P_l, |g_bar|^2, |g_i|^2 (B,), |g_i - g_bar|^2 (B,) or None, Gram (B, B) or None)
    from the per-parameter statistics of :func:`deepmodels.pergrad._measure_params`."""
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
    W = W.to(K0.device)
    total = sum(grams[n].double() for n in names)
    out = {s: np.empty((len(names) + 1, 2)) for s in STAT_CI}
    qs = [(1 - level) / 2, 1 - (1 - level) / 2]
    for j, (name, K) in enumerate([(n, grams[n].double()) for n in names] + [("total", total)]):
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
            counts[_layer_of(k)] = counts.get(_layer_of(k), 0) + p.numel()
    return list(counts), np.array(list(counts.values()), dtype=np.float64)


def _diverged_measurement(model, B, bs, step, reason):
    names, P = _layers(model)
    nan = np.full(len(names) + 1, np.nan)
    return Measurement(names + ["total"], np.append(P, P.sum()), nan, nan, nan, nan, B, bs, step, diverged=reason)


_METHODS = ("auto", "func", "hooks")


def _coverage(paths) -> dict:
    """The attributes of a measurement's coverage, and its method ("hooks", "func" or "hooks+func")."""
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

    Raises:
        TypeError, ValueError: bad input, named (see :mod:`deepmodels._validate`); an array that
            would not fit in memory.
    """
    prob = pergrad._problem(model, loss_fn, x, y, batch, min_batch=2)
    B, arg = prob.B, "x" if batch is None else "batch"
    bs = float(B if batch_size is None else batch_size)
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
            summ = _summaries(blocks, B, ci is not None)
            m, reason = _measure(summ, B, bs, step) if summ else (None, "no parameter could be measured (see "
                                                                        "attrs['skipped'])")
        except pergrad.FastPathUnsupported as err:
            if method != "hooks":
                raise
            raise pergrad.FastPathUnsupported(f"`method` must be 'auto' or 'func' for this model: {err}") from None
        except V.Diverged as err:
            reason = f"{err} at finite parameters".replace(". at", " at")
    model.zero_grad(set_to_none=True)
    if reason is not None:
        ds = _diverged_measurement(model, B, bs, step, reason).to_dataset()
    else:
        ds = m.to_dataset()
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
    attach_attrs(ds, model=type(model).__name__.lower(), source="measurement", batch_size=bs, n_examples=B,
                 device=str(prob.device), **_coverage(paths))
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
    covered = [m.coverage for m in measurements if m.coverage]
    for key in covered[0] if covered else ():  # the union over the steps, in order of appearance
        sep = "; " if key == "skipped_reasons" else "+" if key == "method" else ", "
        seen = dict.fromkeys(part for c in covered for part in c[key].split(sep) if part)
        ds.attrs[key] = sep.join(seen)
    div = [f"step {m.step}: {m.diverged}" for m in measurements if m.diverged is not None]
    if div:
        ds.attrs["diverged"] = "; ".join(div)
    return ds


def _measure(summ, B, bs, step):
    """Per layer and total, with one transfer from the device for all layers: ``(Measurement,
    None)``, or ``(None, reason)`` naming the first layer whose |g_bar|^2, per-example squared norms
    or deviations are not finite (the flags travel in the same transfer as the statistics)."""
    names = list(summ)
    first = summ[names[0]][2]
    g2 = torch.stack([torch.as_tensor(summ[n][1], dtype=first.dtype, device=first.device) for n in names])
    sq = torch.stack([summ[n][2] for n in names])  # (L, B)
    msq = sq.mean(1)
    finite = torch.isfinite(sq).all(1) & torch.isfinite(g2)
    has_dev = [summ[n][3] is not None for n in names]
    if any(has_dev):  # the layers measured with deviations (torch.func, or ``sem``)
        dev = torch.stack([summ[n][3] for n, h in zip(names, has_dev) if h])
        dev_ok = torch.isfinite(dev).all(1)
        finite = finite & (dev_ok if all(has_dev) else
                           torch.ones_like(finite).index_put_((torch.tensor(has_dev, device=finite.device),), dev_ok))
    if all(has_dev):
        rows = torch.stack([g2, dev.mean(1), dev.std(1, unbiased=False), msq])
        sd_total = dev.sum(0).std(unbiased=False)
    else:
        rows = torch.stack([g2, msq - g2, torch.full_like(g2, float("nan")), msq])
        sd_total = torch.full_like(g2[0], float("nan"))
    vals = torch.cat([rows.double().reshape(-1), sd_total.double().reshape(1), finite.double()]).cpu().numpy()
    L = len(names)
    g2, tr, sd, msq = vals[:4 * L].reshape(4, L)
    sd_total, ok = vals[4 * L], vals[4 * L + 1:]
    if not ok.all():
        bad = names[int(np.argmin(ok))]
        return None, f"non-finite per-example gradients in layer `{bad}` at finite parameters (the loss overflows?)"
    P = np.array([summ[n][0] for n in names], dtype=np.float64)
    return Measurement(names + ["total"], np.append(P, P.sum()), np.append(g2, g2.sum()), np.append(tr, tr.sum()),
                       np.append(sd, sd_total) / math.sqrt(B), np.append(msq, msq.sum()), B, bs, step), None


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
    :func:`gradient_stats`).  On the first call per model, the fast path's per-example gradients
    are checked to add up to the step's gradient (:class:`deepmodels.pergrad.LayerCapture`); the
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

    Returns:
        ``(loss, Measurement)``: the batch loss and the statistics of this batch (``batch_size`` = B)
        at the parameters before the update, with its coverage; :func:`stack` turns a list of them
        into a Dataset.  Diverged (non-finite parameters, loss or per-example gradients):
        ``(inf, Measurement)`` with ``diverged`` set and every statistic ``inf``; the optimizer does not step.
    """
    if optimizer is None:
        raise TypeError("`optimizer` must be a torch.optim.Optimizer (or a deepmodels.optim wrapper); got None.")
    prob = pergrad._problem(model, loss_fn, x, y, batch, min_batch=2, once=True)
    B = prob.B
    reason = V.nonfinite_params(model)
    if reason is None:
        try:
            blocks, paths, loss = pergrad._measure_params(prob, "auto", frozenset({"dots"} if sem else ()),
                                                          zero_grad=optimizer.zero_grad, verify="once")
            summ = _summaries(blocks, B)
            m, reason = _measure(summ, B, float(B), step) if summ else (None, "no parameter could be measured")
        except V.Diverged as err:
            reason = f"{err} at finite parameters".replace(". at", " at")
    if reason is not None:
        optimizer.zero_grad(set_to_none=True)
        return math.inf, _diverged_measurement(model, B, float(B), step, reason)
    m.coverage = _coverage(paths)
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
    G = pergrad.flatten(pergrad.per_example_grads(model, loss_fn, x, y, chunk_size=chunk_size)).double().cpu().numpy()
    S = None
    if snapshot is not None:
        S = pergrad.flatten(pergrad.per_example_grads(snapshot, loss_fn, x, y, chunk_size=chunk_size)).double().cpu().numpy()
    assign = estimators.gradient_clustering(G, K, n_iter=n_iter, seed=seed)[0] if K else None
    ds = estimators.estimator_stats(G, batch_size, assign=assign, G_snapshot=S, n_samples=n_samples, seed=seed)
    ds.attrs["model"] = type(model).__name__.lower()
    ds.attrs["source"] = "measurement"
    return ds
