"""The random-features teacher-student model of Faghri et al. 2020 (Sec. 4.2 and 4.3).

Data: x ~ N(0, I_I); a teacher with h_t ReLU features (columns of theta_hat_1 ``(I, h_t)``, each
scaled to unit norm), second layer theta_hat_2 ~ N(0, I) and bias b ~ N(0, 1) labels
y = sign(relu(x^T theta_hat_1) theta_hat_2 + b - c) in {-1, +1}, where c, the mean teacher output on
the training set, centres the labels so that both classes occur.  Optionally a share of the N
training points are copies of a few points (Sec. 4.3, Fig. 8: 5 points repeated to make up 10%, 50%
or 90% of the set).  The student has frozen random ReLU features phi(x) = relu(x^T theta_1)
(theta_1 ``(I, h_s)``, unit-norm columns) and trains the second layer theta_2 ``(h_s,)`` on the
logistic (binary cross-entropy) loss l_i = log(1 + exp(-y_i phi_i . theta_2)), whose per-example
gradients are closed-form: g_i = -y_i sigmoid(-y_i phi_i . theta_2) phi_i.

:meth:`RandomFeatures.train` runs mini-batch SGD and, on a schedule, measures the variance of the
gradient-mean estimators of :mod:`toymodels.estimators` (SG-B, SG-2B, SVRG and GC, with the SVRG
snapshot and the GC clustering refreshed every ``update_every`` steps, as in the paper).

References:
    F. Faghri, D. Duvenaud, D. J. Fleet and J. Ba, "A Study of Gradient Variance in Deep Learning",
    2020.
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from . import estimators
from ._validate import Array, Boolean, Integer, Real, check_bytes, check_int, check_real, validate
from .schema import attach_attrs

MAX_TRAIN_STEPS = 10**8  # SGD updates of one train() call
DIVERGENCE_FACTOR = 1e3  # train() stops when the loss exceeds this multiple of the initial loss (log 2)
_COUNT = Integer(1, 2**40)

__all__ = ["RandomFeatures"]


def _unit_columns(A):
    return A / np.linalg.norm(A, axis=0, keepdims=True)


class RandomFeatures:
    """Teacher-student random-features classification (Faghri et al. Sec. 4.2).

    Args:
        n_train: N, training examples.
        input_dim: I.
        teacher_hidden: h_t.
        student_hidden: h_s (the overparametrization coefficient is h_s / N).
        duplicates: share of the N examples that are copies of ``n_duplicated`` points, in [0, 1).
        n_duplicated: how many distinct points are repeated (5 in the paper).
        seed: seed of every draw (data, teacher, student features).
    """

    model_name = "rf"

    @validate(n_train=Integer(2, 2**40), input_dim=_COUNT, teacher_hidden=_COUNT, student_hidden=_COUNT,
              duplicates=Real(0.0, 1.0, high_open=True), n_duplicated=_COUNT, seed=Integer(0, 2**63 - 1))
    def __init__(self, n_train: int, input_dim: int = 20, teacher_hidden: int = 10, student_hidden: int = 100, *,
                 duplicates: float = 0.0, n_duplicated: int = 5, seed: int = 0):
        self.n_train = check_int("n_train", n_train, low=2)
        self.input_dim = check_int("input_dim", input_dim, low=1)
        self.teacher_hidden = check_int("teacher_hidden", teacher_hidden, low=1)
        self.student_hidden = check_int("student_hidden", student_hidden, low=1)
        self.duplicates = check_real("duplicates", duplicates, low=0.0, high=1.0, high_open=True)
        self.n_duplicated = check_int("n_duplicated", n_duplicated, low=1)
        self.seed = check_int("seed", seed, low=0)
        n, i, t, h = self.n_train, self.input_dim, self.teacher_hidden, self.student_hidden
        check_bytes("n_train", 8.0 * n * (i + t + 1), what=f"{n} examples x ({i} inputs + {t} teacher features)")
        check_bytes("student_hidden", 8.0 * (n + i) * h, what=f"({n} examples + {i} inputs) x {h} student features")
        rng = np.random.default_rng(self.seed)
        n_dup = int(round(self.duplicates * self.n_train))
        if n_dup and n_dup < self.n_duplicated:
            raise ValueError(f"`duplicates` must make up at least n_duplicated={self.n_duplicated} examples "
                             f"(or be 0); got {n_dup} of {self.n_train}.")
        base = rng.standard_normal((self.n_duplicated, self.input_dim))
        fresh = rng.standard_normal((self.n_train - n_dup, self.input_dim))
        self.X = np.concatenate([base[np.arange(n_dup) % self.n_duplicated], fresh])
        self.is_duplicate = np.arange(self.n_train) < n_dup
        t1 = _unit_columns(rng.standard_normal((self.input_dim, self.teacher_hidden)))
        t2 = rng.standard_normal(self.teacher_hidden)
        b = rng.standard_normal()
        out = np.maximum(self.X @ t1, 0.0) @ t2 + b
        self.y = np.where(out - out.mean() >= 0.0, 1.0, -1.0)
        self.theta1 = _unit_columns(rng.standard_normal((self.input_dim, self.student_hidden)))
        self.phi = np.maximum(self.X @ self.theta1, 0.0)  # (N, h_s) frozen features

    @property
    def overparametrization(self) -> float:
        """h_s / N."""
        return self.student_hidden / self.n_train

    @property
    def params(self) -> dict:
        """The generating parameters, as attrs of the model's results: ``n_train``, ``input_dim``,
        ``teacher_hidden``, ``student_hidden``, ``duplicates`` and ``seed``."""
        return {"n_train": self.n_train, "input_dim": self.input_dim, "teacher_hidden": self.teacher_hidden,
                "student_hidden": self.student_hidden, "duplicates": self.duplicates, "seed": self.seed}

    # ------------------------------------------------------------------------------------------
    def _check_theta(self, theta2):
        t = np.asarray(theta2, dtype=np.float64)
        if t.shape != (self.student_hidden,) or not np.all(np.isfinite(t)):
            raise ValueError(f"`theta2` must be a finite array of shape ({self.student_hidden},); got shape {t.shape}.")
        return t

    @validate(theta2=Array(1))
    def loss(self, theta2) -> float:
        """Mean logistic loss on the training set."""
        return self._loss(self._check_theta(theta2))

    def _loss(self, theta2) -> float:
        with np.errstate(over="ignore", invalid="ignore"):
            m = self.y * (self.phi @ theta2)
            return float(np.mean(np.logaddexp(0.0, -m)))

    @validate(theta2=Array(1))
    def accuracy(self, theta2) -> float:
        """Training accuracy of the student with second layer ``theta2``: the fraction of the N training
        examples with y_i (phi_i . theta_2) > 0 (a zero margin counts as wrong).

        Args:
            theta2: second-layer weights, shape ``(student_hidden,)``, finite.

        Returns:
            float: the accuracy, in [0, 1].
        """
        return float(np.mean(self.y * (self.phi @ self._check_theta(theta2)) > 0))

    def _grad_weights(self, theta2, idx=slice(None)):
        """-y_i sigmoid(-y_i phi_i . theta_2) for the examples ``idx`` (overflow-free via tanh)."""
        y = self.y[idx]
        m = y * (self.phi[idx] @ theta2)
        return -y * 0.5 * (1.0 - np.tanh(0.5 * m))

    @validate(theta2=Array(1))
    def per_example_grads(self, theta2) -> np.ndarray:
        """``(N, h_s)``: g_i = -y_i sigmoid(-y_i phi_i . theta_2) phi_i."""
        return self._grad_weights(self._check_theta(theta2))[:, None] * self.phi

    @validate(lr=Real(0.0, math.inf, low_open=True, high_open=True), batch_size=_COUNT,
              n_steps=Integer(1, MAX_TRAIN_STEPS), log_every=_COUNT, update_every=_COUNT, n_iter=Integer(1, 10**5),
              n_samples=Integer(0, 10**7), seed=Integer(0, 2**63 - 1), progress=Boolean())
    def train(self, lr: float, batch_size: int, n_steps: int, *, log_every: int = 100, update_every: int = 1000,
              n_iter: int = 3, n_samples: int = 0, seed: int = 0, progress: bool = False) -> xr.Dataset:
        """Mini-batch SGD (batches drawn with replacement) from theta_2 = 0, measuring the estimators.

        Args:
            lr: learning rate > 0.
            batch_size: B; GC uses B clusters, SVRG batches of B (the paper's setting).
            n_steps: SGD updates, at most 10^8.
            log_every: steps between measurements (``Log T``).
            update_every: steps between refreshes of SVRG's snapshot and GC's clustering (``U``).
            n_iter: A-U iterations per clustering (``GC T``).
            n_samples: if > 0, also measure each estimator's variance from that many draws.
            seed: seed of the batches, the clustering and the draws.
            progress: tqdm bar.

        Returns:
            Dataset over ``step`` (and ``estimator``): ``loss``, ``accuracy``, ``grad_norm_sq`` and
            per estimator ``grad_var``, ``grad_nvar`` (exact at each snapshot), ``grad_var_sampled``.
            A run that diverges -- its weights overflow, or its loss at a measured step exceeds
            :data:`DIVERGENCE_FACTOR` (1000) times the initial loss log 2 -- stops there: its last row,
            at that step, holds ``inf`` in every variable, and ``attrs["diverged"]`` /
            ``attrs["reason"]`` say so (no NaN, no statistics of a blown-up run).
        """
        lr = check_real("lr", lr, low=0.0, high=math.inf, low_open=True, high_open=True)
        bs = check_int("batch_size", batch_size, low=1, high=self.n_train)
        n_steps = check_int("n_steps", n_steps, low=1)
        log_every = check_int("log_every", log_every, low=1)
        update_every = check_int("update_every", update_every, low=1)
        rng = np.random.default_rng(check_int("seed", seed, low=0))
        check_bytes("n_steps", 8.0 * (n_steps // log_every + 2) * 16,
                    what=f"{n_steps // log_every + 2} logged steps")
        theta = np.zeros(self.student_hidden)
        diverged_at = None
        steps, rows = [], []
        snapshot, assign = None, None
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_steps, desc="train rf", unit="step")
        for k in range(n_steps + 1):
            refresh, log = k % update_every == 0, k % log_every == 0 or k == n_steps
            if not np.all(np.isfinite(theta)) or ((refresh or log)
                                                  and not self._loss(theta) <= DIVERGENCE_FACTOR * math.log(2.0)):
                diverged_at = k
                steps.append(k)
                break
            if refresh or log:
                G = self.per_example_grads(theta)
            if refresh:
                snapshot = G
                assign, _ = estimators.gradient_clustering(G, bs, n_iter=n_iter, seed=int(rng.integers(2**31)))
            if log:
                st = estimators.estimator_stats(G, bs, assign=assign, G_snapshot=snapshot, n_samples=n_samples,
                                                seed=int(rng.integers(2**31)))
                rows.append((self._loss(theta), self.accuracy(theta), st))
                steps.append(k)
            if k == n_steps:
                break
            idx = rng.integers(0, self.n_train, size=bs)
            with np.errstate(over="ignore", invalid="ignore"):
                theta = theta - lr * (self._grad_weights(theta, idx) @ self.phi[idx]) / bs
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if diverged_at is not None:  # the overflowed step: every variable inf
            inf_stats = rows[-1][2].copy(deep=True) if rows else None
            if inf_stats is not None:
                for v in inf_stats.data_vars.values():
                    v.values[...] = np.inf
                rows.append((math.inf, math.inf, inf_stats.assign_attrs(grad_norm_sq=math.inf)))
            else:  # pragma: no cover - step 0 (theta = 0) is always finite
                steps.pop()
        stats = xr.concat([r[2] for r in rows], dim="step").drop_attrs()
        ds = stats.assign_coords(step=np.array(steps, dtype=np.int64))
        ds["loss"] = ("step", np.array([r[0] for r in rows], dtype=np.float64))
        ds["accuracy"] = ("step", np.array([r[1] for r in rows], dtype=np.float64))
        ds["grad_norm_sq"] = ("step", np.array([r[2].attrs["grad_norm_sq"] for r in rows], dtype=np.float64))
        for v in ds.data_vars.values():
            v.values[np.isnan(v.values)] = np.inf
        reason = "" if diverged_at is None else (
            f"diverges: the loss exceeded {DIVERGENCE_FACTOR:g} x its initial value (or overflowed) by step "
            f"{diverged_at} (learning rate {lr:g} too large)")
        attach_attrs(ds, model=self.model_name, source="exact", optimizer="sgd", lr=lr, batch_size=float(bs),
                     update_every=update_every, overparametrization=self.overparametrization,
                     diverged=diverged_at is not None, reason=reason, **self.params)
        return ds
