"""The random-features teacher-student model of Faghri et al. (seeds 000/001, Sec. 4.2 and 4.3).

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
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from . import estimators
from ._validate import check_int, check_real
from .schema import attach_attrs

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

    def __init__(self, n_train: int, input_dim: int = 20, teacher_hidden: int = 10, student_hidden: int = 100, *,
                 duplicates: float = 0.0, n_duplicated: int = 5, seed: int = 0):
        self.n_train = check_int("n_train", n_train, low=2)
        self.input_dim = check_int("input_dim", input_dim, low=1)
        self.teacher_hidden = check_int("teacher_hidden", teacher_hidden, low=1)
        self.student_hidden = check_int("student_hidden", student_hidden, low=1)
        self.duplicates = check_real("duplicates", duplicates, low=0.0, high=1.0, high_open=True)
        self.n_duplicated = check_int("n_duplicated", n_duplicated, low=1)
        self.seed = check_int("seed", seed, low=0)
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
        return {"n_train": self.n_train, "input_dim": self.input_dim, "teacher_hidden": self.teacher_hidden,
                "student_hidden": self.student_hidden, "duplicates": self.duplicates, "seed": self.seed}

    # ------------------------------------------------------------------------------------------
    def _check_theta(self, theta2):
        t = np.asarray(theta2, dtype=np.float64)
        if t.shape != (self.student_hidden,) or not np.all(np.isfinite(t)):
            raise ValueError(f"`theta2` must be a finite array of shape ({self.student_hidden},); got shape {t.shape}.")
        return t

    def loss(self, theta2) -> float:
        """Mean logistic loss on the training set."""
        m = self.y * (self.phi @ self._check_theta(theta2))
        return float(np.mean(np.logaddexp(0.0, -m)))

    def accuracy(self, theta2) -> float:
        return float(np.mean(self.y * (self.phi @ self._check_theta(theta2)) > 0))

    def _grad_weights(self, theta2, idx=slice(None)):
        """-y_i sigmoid(-y_i phi_i . theta_2) for the examples ``idx`` (overflow-free via tanh)."""
        y = self.y[idx]
        m = y * (self.phi[idx] @ theta2)
        return -y * 0.5 * (1.0 - np.tanh(0.5 * m))

    def per_example_grads(self, theta2) -> np.ndarray:
        """``(N, h_s)``: g_i = -y_i sigmoid(-y_i phi_i . theta_2) phi_i."""
        return self._grad_weights(self._check_theta(theta2))[:, None] * self.phi

    def train(self, lr: float, batch_size: int, n_steps: int, *, log_every: int = 100, update_every: int = 1000,
              n_iter: int = 3, n_samples: int = 0, seed: int = 0, progress: bool = False) -> xr.Dataset:
        """Mini-batch SGD (batches drawn with replacement) from theta_2 = 0, measuring the estimators.

        Args:
            lr: learning rate > 0.
            batch_size: B; GC uses B clusters, SVRG batches of B (the paper's setting).
            n_steps: SGD updates.
            log_every: steps between measurements (``Log T``).
            update_every: steps between refreshes of SVRG's snapshot and GC's clustering (``U``).
            n_iter: A-U iterations per clustering (``GC T``).
            n_samples: if > 0, also measure each estimator's variance from that many draws.
            seed: seed of the batches, the clustering and the draws.
            progress: tqdm bar.

        Returns:
            Dataset over ``step`` (and ``estimator``): ``loss``, ``accuracy``, ``grad_norm_sq`` and
            per estimator ``grad_var``, ``grad_nvar`` (exact at each snapshot), ``grad_var_sampled``.
        """
        lr = check_real("lr", lr, low=0.0, high=math.inf, low_open=True, high_open=True)
        bs = check_int("batch_size", batch_size, low=1, high=self.n_train)
        n_steps = check_int("n_steps", n_steps, low=1)
        log_every = check_int("log_every", log_every, low=1)
        update_every = check_int("update_every", update_every, low=1)
        rng = np.random.default_rng(check_int("seed", seed, low=0))
        theta = np.zeros(self.student_hidden)
        steps, rows = [], []
        snapshot, assign = None, None
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_steps, desc="train rf", unit="step")
        for k in range(n_steps + 1):
            refresh, log = k % update_every == 0, k % log_every == 0 or k == n_steps
            if refresh or log:
                G = self.per_example_grads(theta)
            if refresh:
                snapshot = G
                assign, _ = estimators.gradient_clustering(G, bs, n_iter=n_iter, seed=int(rng.integers(2**31)))
            if log:
                st = estimators.estimator_stats(G, bs, assign=assign, G_snapshot=snapshot, n_samples=n_samples,
                                                seed=int(rng.integers(2**31)))
                rows.append((self.loss(theta), self.accuracy(theta), st))
                steps.append(k)
            if k == n_steps:
                break
            idx = rng.integers(0, self.n_train, size=bs)
            theta = theta - lr * (self._grad_weights(theta, idx) @ self.phi[idx]) / bs
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        stats = xr.concat([r[2] for r in rows], dim="step").drop_attrs()
        ds = stats.assign_coords(step=np.array(steps, dtype=np.int64))
        ds["loss"] = ("step", np.array([r[0] for r in rows]))
        ds["accuracy"] = ("step", np.array([r[1] for r in rows]))
        ds["grad_norm_sq"] = ("step", np.array([r[2].attrs["grad_norm_sq"] for r in rows]))
        attach_attrs(ds, model=self.model_name, source="exact", optimizer="sgd", lr=lr, batch_size=float(bs),
                     update_every=update_every, overparametrization=self.overparametrization, **self.params)
        return ds
