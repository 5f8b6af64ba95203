"""Robust gradient aggregation that suppresses weak gradient directions (coherent gradients,
Zielinski et al. 2020, "Weak and Strong Gradient Directions", Sec. 3 and App. B), as wrappers
around any ``torch.optim.Optimizer``.

Each wrapper forms an aggregated gradient, writes it into ``p.grad`` and calls the inner
optimizer's ``step()``, so it works with SGD, momentum, Adam, ... unchanged:

* :class:`M3`: coordinate-wise median of the mean gradients of 3 micro-batches, computed serially
  within one step (Sec. 3.2, "The M3 technique").
* :class:`RM3`: coordinate-wise median of the current mini-batch gradient and those of the 2
  previous steps (Sec. 3.2, "The RM3 technique").
* :class:`RA3`: their mean instead (the paper's control, "rolling average of 3 mini-batches").
* :class:`Winsorized`: per coordinate, each example's gradient clipped to the (s+1)-th smallest and
  (s+1)-th largest of the batch, then averaged (App. B).

The median of three is the paper's ``a + b + c - min(a, b, c) - max(a, b, c)`` computed exactly, by
comparisons (:func:`median_of_3`).  RM3 and RA3 keep a ring buffer of fixed size ``(3, *p.shape)`` per parameter, so memory
stays bounded however long one trains.

    >>> import torch
    >>> from deepmodels.optim import RM3
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> opt = RM3(torch.optim.SGD([w], lr=0.1))
    >>> def closure():
    ...     loss = (w - 1).pow(2).sum()
    ...     loss.backward()
    ...     return loss
    >>> for _ in range(100):
    ...     loss = opt.step(closure)

References:
    Zielinski et al., "Weak and Strong Gradient Directions: Explaining Memorization, Generalization,
    and Hardness of Examples at Scale", 2020.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ._validate import Boolean, Constraint, Function, Instance, Maybe, Tensor, validate

__all__ = ["median_of_3", "winsorized_mean", "M3", "RM3", "RA3", "Winsorized"]

N_MICRO = 3  # micro-batches of M3, mini-batches remembered by RM3 / RA3
_SORT_FROM = 8


_GRAD = Tensor("float", finite="no-nan", what="a float tensor")  # +-inf allowed: the outliers a median suppresses


@validate(a=_GRAD, b=_GRAD, c=_GRAD)
def median_of_3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median of three same-shape tensors.

    The paper writes it as ``a + b + c - min - max`` (Sec. 3.2); that equals the median in exact
    arithmetic but in floating point loses the common value when one entry dwarfs the others
    (float32: ``(1e8, 1, 2)`` gives 0) and turns an infinite entry into NaN, which is exactly the
    outlier M3 is meant to suppress.  So it is computed by comparisons, max(min(a, b), min(max(a, b), c)),
    which returns one of the three values exactly.  The three tensors share shape, dtype and device;
    +-inf entries are allowed (and suppressed when the other two are finite), NaN is refused.
    """
    for name, t in (("b", b), ("c", c)):
        if t.shape != a.shape or t.dtype != a.dtype or t.device != a.device:
            raise ValueError(f"`{name}` must be of the shape, dtype and device of `a` ({tuple(a.shape)}, "
                             f"{str(a.dtype).replace('torch.', '')}, {a.device}); got ({tuple(t.shape)}, "
                             f"{str(t.dtype).replace('torch.', '')}, {t.device}).")
    return _median_of_3(a, b, c)


def _median_of_3(a, b, c):
    return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))


def _check_s(s, batch_size=None):
    if isinstance(s, bool) or not isinstance(s, int):
        raise TypeError(f"`s` must be an integer; got {type(s).__name__}.")
    if s < 0:
        raise ValueError(f"`s` must be an integer in [0, inf); got {s}.")
    if batch_size is not None and 2 * s + 1 > batch_size:
        raise ValueError(f"`s` must be <= (batch size - 1) // 2 = {(batch_size - 1) // 2} for a batch of "
                         f"{batch_size} examples; got {s}. Use a larger batch or a smaller `s`.")
    return s


class _S(Constraint):
    """The winsorization parameter: an integer >= 0 (checked against the batch size at the step)."""

    def __call__(self, name, value):
        return _check_s(value)

    def bad_values(self):
        return [None, "1", 1 + 1j, 1.5, True, -1]


@validate(per_example=Tensor("float", min_ndim=1, nonempty=True, finite="no-nan", what="a float tensor of shape (B, *shape)"),
          s=_S())
def winsorized_mean(per_example: torch.Tensor, s: int) -> torch.Tensor:
    """Coordinate-wise winsorized mean over the first axis (App. B).

    Every entry ``g[i, j]`` is clipped to ``[g_(s+1)[j], g_(B-s)[j]]``, the (s+1)-th smallest and
    (s+1)-th largest of ``g[:, j]``, and the clipped values are averaged over ``i``.  ``s = 0`` clips
    nothing (the plain mean); ``s = (B - 1) // 2`` gives the coordinate-wise median for odd ``B``.
    The paper sums; the mean keeps the scale of a mean-reduced loss, so ``s = 0`` is plain SGD.

    Args:
        per_example: ``(B, *shape)``.
        s: number of extreme values clipped at each end, ``0 <= s <= (B - 1) // 2``.

    Returns:
        ``(*shape)``.

    NaN entries are refused (+-inf are clipped like any outlier).
    """
    return _winsorized_mean(per_example, s)


def _winsorized_mean(per_example, s):
    B = per_example.shape[0]
    s = _check_s(s, B)
    if s < _SORT_FROM:  # below this s, compare-exchanges beat a sort along the batch axis (~10x on CPU at s = 2)
        lo, hi = _order_bounds(per_example, s)
    else:
        srt = per_example.sort(dim=0).values
        lo, hi = srt[s], srt[B - 1 - s]
    return per_example.clamp(lo, hi).mean(0)


def _order_bounds(g, s):
    """The (s+1)-th smallest and (s+1)-th largest of ``g`` along axis 0, by inserting each row into
    running sorted lists of the s+1 smallest and largest (O(B s) elementwise min/max; exact, ties included)."""
    lo = [torch.full_like(g[0], torch.inf)] * (s + 1)
    hi = [torch.full_like(g[0], -torch.inf)] * (s + 1)
    for row in g:
        v, w = row, row
        for j in range(s + 1):
            lo[j], v = torch.minimum(lo[j], v), torch.maximum(lo[j], v)
            hi[j], w = torch.maximum(hi[j], w), torch.minimum(hi[j], w)
    return lo[s], hi[s]


class _Wrapper:
    """Holds the inner optimizer and its parameters; subclasses form ``p.grad`` and call :meth:`_apply`."""

    @validate(optimizer=Instance(torch.optim.Optimizer, what="a torch.optim.Optimizer"))
    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    @property
    def param_groups(self):
        """The inner optimizer's groups (set ``lr`` here for a schedule)."""
        return self.optimizer.param_groups

    @validate(set_to_none=Boolean())
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _backward(self, closure):
        self.zero_grad()
        with torch.enable_grad():
            return closure()

    def _check_grads(self, grads, what, batch_axis=False):
        if len(grads) != len(self.params):
            raise ValueError(f"`{what}` must hold one tensor per parameter ({len(self.params)}); got {len(grads)}.")
        for j, (g, p) in enumerate(zip(grads, self.params)):
            if g is None:
                continue
            if not isinstance(g, torch.Tensor) or not g.dtype.is_floating_point:
                got = str(g.dtype).replace("torch.", "") if isinstance(g, torch.Tensor) else type(g).__name__
                raise TypeError(f"`{what}[{j}]` must be a float tensor or None; got {got}.")
            if bool(torch.isnan(g).any()):
                raise ValueError(f"`{what}[{j}]` must not contain NaN; got {int(torch.isnan(g).sum())} NaN entries.")
            shape = tuple(g.shape[1:]) if batch_axis else tuple(g.shape)
            if shape != tuple(p.shape):
                lead = "(B, *p.shape)" if batch_axis else "p.shape"
                raise ValueError(f"`{what}[{j}]` must have shape {lead} with p.shape = {tuple(p.shape)}; got {tuple(g.shape)}.")

    def _apply(self, agg):
        for p, g in zip(self.params, agg):
            p.grad = None if g is None else g.to(p.dtype)
        self.optimizer.step()


class M3(_Wrapper):
    """Median of 3 micro-batches (Sec. 3.2): one update per 3 serial gradient evaluations.

    The paper splits a mini-batch of ``3 b`` examples into 3 micro-batches of ``b``, evaluates their
    mean gradients ``g_0, g_1, g_2`` one after the other and updates with ``median_of_3(g_0, g_1, g_2)``
    per coordinate.  Parameters without a gradient in some micro-batch are left alone.

    Example (the paper's): gradients ``g_i = u_i + c`` with idiosyncratic parts on disjoint coordinates;
    a coordinate of ``u_i`` is non-zero in at most one micro-batch mean, so its median is 0 and the
    update is exactly ``c`` (SGD's expectation is ``c + mean_i u_i``).
    """

    @validate(closure=Maybe(Function("a callable closure(i) computing micro-batch i's loss and gradients")),
              grads=Maybe(Instance(list, tuple, what="a list of 3 lists of tensors")))
    def step(self, closure: Callable[[int], torch.Tensor] | None = None, *, grads: Sequence[Sequence] | None = None):
        """One update from 3 micro-batch gradients.

        Args:
            closure: ``closure(i)`` for ``i = 0, 1, 2`` computes the mean loss on micro-batch ``i``,
                calls ``backward()`` and returns the loss (gradients are zeroed before each call).
            grads: instead of ``closure``, 3 lists of tensors (``p.shape`` each, ``None`` for no
                gradient) in the inner optimizer's parameter order.

        Returns:
            The 3 micro-batch losses (``None`` when ``grads`` are given).

        Raises:
            ValueError: both or neither of ``closure`` and ``grads``; not 3 micro-batches; a list
                of the wrong length or a tensor of the wrong shape.
        """
        if (closure is None) == (grads is None):
            raise ValueError("give exactly one of `closure` and `grads`.")
        losses = None
        if closure is not None:
            grads, losses = [], []
            for i in range(N_MICRO):
                losses.append(self._backward(lambda: closure(i)))
                grads.append([None if p.grad is None else p.grad.detach().clone() for p in self.params])
        if len(grads) != N_MICRO:
            raise ValueError(f"`grads` must hold {N_MICRO} micro-batch gradients; got {len(grads)}.")
        for i, g in enumerate(grads):
            if not isinstance(g, (list, tuple)):
                raise TypeError(f"`grads[{i}]` must be a list of tensors (one per parameter); got {type(g).__name__}.")
            self._check_grads(g, f"grads[{i}]")
        agg = [None if any(t is None for t in ts) else _median_of_3(*ts) for ts in zip(*grads)]
        self._apply(agg)
        return losses


class _Rolling(_Wrapper):
    """Aggregate the last 3 mini-batch gradients per parameter, kept in a ring buffer.

    ``step(closure=None)``: if given, ``closure()`` computes the mini-batch loss, calls ``backward()``
    and returns it (gradients are zeroed first); without it, ``p.grad`` must already be set.  The
    current ``p.grad`` (shape ``p.shape``) is written into slot ``t % 3`` of the parameter's buffer
    ``state[p]["buffer"]`` of shape ``(3, *p.shape)`` (``t = state[p]["count"]``, that parameter's
    steps so far) and replaced by the aggregate of the filled slots before the inner optimizer steps.
    The buffer never grows: a ring of the last 3 gradients, however long one trains.

    Before the buffer is full: step 1 uses ``g_1`` (plain SGD), step 2 uses ``(g_1 + g_2) / 2`` (the
    median of two values is their mean).  Parameters whose ``grad`` is ``None`` are skipped and their
    buffer does not advance.
    """

    @validate(optimizer=Instance(torch.optim.Optimizer, what="a torch.optim.Optimizer"))
    def __init__(self, optimizer: torch.optim.Optimizer):
        super().__init__(optimizer)
        self.state = {p: {"buffer": None, "count": 0} for p in self.params}

    def _aggregate(self, buf):
        raise NotImplementedError

    @validate(closure=Maybe(Function("a callable closure() computing the loss and gradients")))
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Returns the closure's loss (or ``None``)."""
        loss = self._backward(closure) if closure is not None else None
        agg = []
        for p in self.params:
            if p.grad is None:
                agg.append(None)
                continue
            st = self.state[p]
            if st["buffer"] is None:
                st["buffer"] = torch.zeros((N_MICRO, *p.shape), dtype=p.grad.dtype, device=p.grad.device)
            st["buffer"][st["count"] % N_MICRO].copy_(p.grad)
            st["count"] += 1
            filled = st["buffer"][:min(st["count"], N_MICRO)]
            agg.append(filled.mean(0) if filled.shape[0] < N_MICRO else self._aggregate(filled))
        self._apply(agg)
        return loss


class RM3(_Rolling):
    """Rolling median of 3 mini-batches (Sec. 3.2): ``median_of_3(g_t, g_{t-1}, g_{t-2})`` per coordinate."""

    def _aggregate(self, buf):
        return _median_of_3(buf[0], buf[1], buf[2])


class RA3(_Rolling):
    """Rolling average of 3 mini-batches (the paper's control): ``(g_t + g_{t-1} + g_{t-2}) / 3``."""

    def _aggregate(self, buf):
        return buf.mean(0)


class Winsorized(_Wrapper):
    """Per-example winsorized mean gradient (App. B; Chatterjee 2020) with parameter ``s``.

    ``step(per_example)``: one tensor ``(B, *p.shape)`` per parameter, in the inner optimizer's order
    (e.g. ``list(deepmodels.pergrad.per_example_grads(model, loss_fn, x, y).values())`` when the
    optimizer holds ``model.parameters()``); ``p.grad`` becomes :func:`winsorized_mean` of it.
    ``s = 0`` is plain SGD on the mean loss.  Raises ValueError if ``2 s + 1 > B``.
    """

    @validate(optimizer=Instance(torch.optim.Optimizer, what="a torch.optim.Optimizer"), s=_S())
    def __init__(self, optimizer: torch.optim.Optimizer, s: int):
        super().__init__(optimizer)
        self.s = s

    @validate(per_example=Instance(list, tuple, what="a list of (B, *p.shape) tensors, one per parameter"))
    def step(self, per_example: Sequence[torch.Tensor]) -> None:
        """Raises ValueError for a wrong number of tensors, wrong shapes, unequal batch sizes, or
        ``2 s + 1 > B``."""
        if any(g is None for g in per_example):
            raise ValueError("`per_example` must hold a tensor for every parameter; got None.")
        self._check_grads(per_example, "per_example", batch_axis=True)
        sizes = {g.shape[0] for g in per_example}
        if len(sizes) != 1:
            raise ValueError(f"`per_example` tensors must share the batch size; got {sorted(sizes)}.")
        _check_s(self.s, sizes.pop())
        self._apply([_winsorized_mean(g, self.s) for g in per_example])
