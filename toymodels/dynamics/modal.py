""":class:`ModalForm`, the Python face of the closed form: builds it once per system and gives its
loss at any steps, interval lower bounds and the exact first crossing.
"""

from __future__ import annotations

import math

import numpy as np

from .bound import _lower_bound, _lower_bound_serial
from .closed_form import _modal_setup_kernel, _modal_values_kernel
from .crossing import _first_crossing_parallel, _first_crossing_serial, _WORK_LIMIT
from .threads import _PARALLEL_MIN_MODES

__all__ = ["ModalForm"]


class ModalForm:
    """Closed-form loss curve of a constant-learning-rate linear system started from ``S0``.

    Args:
        A: ``(d, s, s)`` per-mode transition (s <= 3; the 3x3 case block lower-triangular).
        b: ``(d, s)`` noise loadings.
        q: ``(d,)`` noise variance per step.
        h: ``(d,)`` curvature (the loss is sum_i h_i/2 E[x_i[readout]^2]).
        readout: index of the state entry read by the loss.
        S0: ``(d, s, s)`` second moments at step 0.

    Attributes:
        stable: every mode has spectral radius < 1.
        loss_inf: the stationary loss (noise floor), ``inf`` if unstable.
        n_flagged: modes evaluated by exact powering instead of the closed form.
    """

    def __init__(self, A, b, q, h, readout, S0):
        self.A = np.ascontiguousarray(A, dtype=np.float64)
        self.b = np.ascontiguousarray(b, dtype=np.float64)
        self.q = np.ascontiguousarray(q, dtype=np.float64)
        self.h = np.ascontiguousarray(h, dtype=np.float64)
        self.S0 = np.ascontiguousarray(S0, dtype=np.float64)
        self.readout = int(readout)
        d, s = self.b.shape
        self.lam = np.zeros((d, s), dtype=np.complex128)
        self.C = np.zeros((d, s, s), dtype=np.complex128)
        self.linf = np.zeros(d)
        self.flag = np.zeros(d, dtype=np.bool_)
        self.rho = np.zeros(d)
        self.nu = np.zeros(d)
        self.dnorm = np.zeros(d)
        self.gsq = np.zeros((d, 6))
        _modal_setup_kernel(
            self.A, self.b, self.q, self.h, self.readout, self.S0,
            self.lam, self.C, self.linf, self.flag, self.rho, self.nu, self.dnorm, self.gsq,
        )
        self.stable = bool(np.all(self.rho < 1.0))
        self.loss_inf = float(np.sum(self.linf)) if self.stable else math.inf
        self.n_flagged = int(np.sum(self.flag))

    def loss(self, ks) -> np.ndarray:
        """Exact expected loss at the sorted int64 steps ``ks``, shape ``(len(ks),)``."""
        ks = np.ascontiguousarray(ks, dtype=np.int64)
        out = np.empty(ks.size)
        _modal_values_kernel(
            self.lam, self.C, self.linf, self.flag, self.gsq, self.A, self.b, self.q, self.h,
            self.readout, self.S0, ks, out,
        )
        return out

    def lower_bound(self, a: int, b: int | None = None) -> float:
        """A lower bound on L_k for all k in [a, b] (b None: infinity)."""
        bound = _lower_bound if self.h.size >= _PARALLEL_MIN_MODES else _lower_bound_serial
        return float(
            bound(self.lam, self.C, self.linf, self.flag, self.rho, self.nu, self.dnorm, self.gsq,
                  self.h, int(a), -1 if b is None else int(b))
        )

    def first_crossing(self, target: float, k_max: int, *, leaf: int = 32, guess: int | None = None) -> int:
        """The first k in [0, k_max] with L_k <= target, or -1 if there is none.

        ``guess`` (optional) is where the crossing is expected: the search first tries to rule out
        all of [0, guess - 1] with one bound, which saves most of the work when the guess is a little
        early.  The answer does not depend on it.

        Exact for non-monotone curves: the loss is a finite sum of exponentials with known rates, so
        for any interval of steps [a, b] :meth:`lower_bound` gives a rigorous lower bound (monotone
        terms at the end that minimises them, oscillating ones at minus their envelope). A
        depth-first branch and bound discards every interval whose bound exceeds ``target`` and
        evaluates the exact loss at every step of the surviving intervals of at most ``leaf`` steps,
        left to right, so the first crossing cannot be skipped, whatever the shape of the curve.
        Requires a stable system (every mode with spectral radius < 1).

        Raises:
            RuntimeError: the search exceeded its budget (about 2e8 mode-bound evaluations), which
                only flagged 3-state modes with their loose Henrici bounds can cause; never a wrong
                answer.
        """
        if not self.stable:
            raise ValueError("first_crossing needs a stable system (spectral radius < 1).")
        kernel = _first_crossing_parallel if self.h.size >= _PARALLEL_MIN_MODES else _first_crossing_serial
        k = int(
            kernel(
                self.lam, self.C, self.linf, self.flag, self.rho, self.nu, self.dnorm, self.gsq,
                self.A, self.b, self.q, self.h, self.readout, self.S0,
                float(target), 0, int(k_max), int(leaf),
                max(10_000, int(_WORK_LIMIT // self.h.size)), -1 if guess is None else int(guess),
            )
        )
        if k == -2:
            raise RuntimeError(
                "first_crossing gave up: the interval bounds of flagged 3-state modes (momentum with "
                "iterate averaging whose decay nearly equals an eigenvalue of the base optimizer) are "
                "too loose to prune; try a decay a little further from the momentum."
            )
        return k
