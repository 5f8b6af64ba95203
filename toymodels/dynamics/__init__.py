"""Exact second-moment dynamics of per-mode linear systems, and an exact first-crossing search.

Every optimizer in :mod:`toymodels.optimizers` is, per eigen-direction i, a linear system
``x' = A_i x + b_i eps`` with ``Var(eps) = q_i`` (q_i = c_i / B for the NQM).  Its second moment
S = E[x x^T] (an ``s x s`` matrix, s <= 3) obeys

    S' = A S A^T + q b b^T,

and the loss is ``L = sum_i h_i / 2 * S_i[r, r]`` with r the readout entry.  This module provides

* :func:`propagate` -- step by step, for any learning-rate sequence (schedules);
* :func:`propagate_varying` -- step by step for systems that change at every update through a weight
  c_k besides the learning rate (uniform iterate averaging, schedule-free SGD):
  A_k = P0 + c_k P1 + lr_k (Q0 + c_k Q1), b_k = lr_k (R0 + c_k R1);
* :func:`jump` -- k steps at once by binary powering of the pair (A^m, Q_m), exact and stable for
  any small A;
* :class:`ModalForm` -- the closed form for a constant learning rate.  With A = V diag(lam) V^-1,

      L_k = L_inf + Re sum_i sum_{j<=l} C_ijl (lam_ij lam_il)^k,

  a sum of (possibly complex) exponentials, so L_k costs O(d s^2) for any k.  Modes whose
  eigenvectors are ill-conditioned (near-repeated eigenvalues, e.g. critically damped momentum)
  are *flagged* and evaluated by :func:`jump` instead, so no accuracy is lost there.
* :meth:`ModalForm.first_crossing` -- the first k with L_k <= target, exact for non-monotone
  curves (see its docstring for the guarantee).

Shapes: d modes, s state entries per mode; A ``(d, s, s)``, b ``(d, s)``, q ``(d,)``, S ``(d, s, s)``.

The code is split along these ideas, one submodule each: :mod:`~toymodels.dynamics.stepwise`
(propagation step by step and k at once), :mod:`~toymodels.dynamics.lyapunov` (stationary moments),
:mod:`~toymodels.dynamics.closed_form` (the modal form's setup and values),
:mod:`~toymodels.dynamics.bound` (its lower bounds over step intervals),
:mod:`~toymodels.dynamics.crossing` (the exact first crossing), :mod:`~toymodels.dynamics.modal`
(:class:`ModalForm`, joining the three), :mod:`~toymodels.dynamics.fused` (the tuner's fused loss
at one step), with ``_kernels`` (small shared numba helpers) and ``threads`` (the parallel
threshold and threading layer).  Every name is importable from :mod:`toymodels.dynamics` itself.

Numba caching: every ``parallel=True`` function is an entry point called from Python with its
``prange`` loops inlined (see the note above ``_first_crossing_serial`` in
:mod:`~toymodels.dynamics.crossing`).  Numba invalidates a cached function when *its own* file
changes, not when a callee in another file does: after editing one submodule, clear the numba
cache (``NUMBA_CACHE_DIR`` or the ``__pycache__`` folders) before trusting results.
"""

from __future__ import annotations

from ..schedules import schedule_segments
from .closed_form import _modal_values_range_parallel
from .crossing import _first_crossing_parallel, _first_crossing_serial
from .fused import _loss_parts_serial, loss_at, loss_at_parts
from .lyapunov import _stein2_scalar, lyapunov
from .modal import ModalForm
from .stepwise import (MAX_SCAN_UPDATES, MAX_SCAN_WORK, jump, merged_segments, propagate, propagate_schedule,
                       propagate_varying)
from .threads import _PARALLEL_MIN_MODES, _ensure_threading_layer

__all__ = ["propagate", "propagate_schedule", "propagate_varying", "merged_segments", "schedule_segments", "jump",
           "ModalForm", "lyapunov", "loss_at", "loss_at_parts"]
