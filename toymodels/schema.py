"""The shared xarray vocabulary (names of dimensions, variables and attributes) and a validator.

Theory and measurement write the same names; a curve from a toy model and one from a network differ
in the ``source`` attribute, not in shape or names.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ._validate import Instance, Options
from ._validate import validate as _validate

__all__ = ["DIMS", "VARIABLES", "SOURCES", "validate", "attach_attrs"]

STEP, BATCH_SIZE, LR, MOMENTUM, DECAY, SEED, MODE = "step", "batch_size", "lr", "momentum", "decay", "seed", "mode"
DIMS = (STEP, BATCH_SIZE, LR, MOMENTUM, DECAY, SEED, MODE, "example", "layer", "rank", "piece", "optimizer", "curve", "estimator", "n_train", "duplicates", "bound",
        "label_noise", "subset", "case", "kind", "network", "predictor", "checkpoint", "estimate", "schedule",
        "aggregation", "draw", "flops", "n_features", "target")

VARIABLES = {
    "loss": "expected (theory) or measured training loss",
    "loss_sem": "standard error of a Monte Carlo or measured mean loss",
    "test_loss": "test loss",
    "accuracy": "accuracy",
    "steps_to_target": "first step whose loss is <= target (inf: unreachable or divergent)",
    "steps_lower_bound": "information-theoretic lower bound on steps_to_target",
    "loss_lower_bound": "information-theoretic lower bound on the expected loss",
    "sq_error": "E|w - w*|^2, squared distance to the optimum",
    "sq_error_sem": "standard error of a Monte Carlo mean sq_error",
    "sv_bound": "Strohmer-Vershynin bound on Kaczmarz's sq_error",
    "grad_var_max": "maximum of grad_var over (the last 70% of) training",
    "grad_nvar_max": "maximum of grad_nvar over (the last 70% of) training",
    "trace_cov": "tr of the per-example gradient covariance (population)",
    "trace_cov_sem": "standard error of a measured or Monte Carlo mean trace_cov",
    "grad_norm_sq_sem": "standard error of a Monte Carlo mean grad_norm_sq",
    "grad_norm_sq_unbiased": "unbiased estimate of |E g|^2 (two batch sizes, McCandlish et al. App. A)",
    "noise_scale_unbiased": "B_simple from the unbiased two-batch-size estimates",
    "n_params": "number of parameters",
    "n_examples": "number of examples in a subset (e.g. the pristine or corrupt training examples)",
    "second_moment_eigenvalue": "eigenvalue of the mini-batch gradient's second-moment matrix",
    "covariance_eigenvalue": "eigenvalue of the mini-batch gradient's covariance matrix",
    "grad_norm_sq_ci": "bootstrap interval (bound low/high) of grad_norm_sq",
    "grad_var_ci": "bootstrap interval of grad_var",
    "grad_nvar_ci": "bootstrap interval of grad_nvar",
    "snr_ci": "bootstrap interval of snr",
    "noise_scale_ci": "bootstrap interval of noise_scale",
    "noise_scale_unbiased_ci": "bootstrap interval of noise_scale_unbiased",
    "grad_var_sampled": "grad_var measured from draws of the estimator (as Faghri et al. measure it)",
    "lr_opt": "tuned learning rate",
    "lr_eff_opt": "tuned effective learning rate lr_opt / (1 - momentum_opt) of heavy-ball momentum (lr_opt without "
                  "momentum): smooth in the batch size where the tuned (lr, momentum) pair jumps along its ridge",
    "target_value": "the absolute target a run used (target_rel x its own initial metric, for a relative target)",
    "steps_best": "measured steps_to_target of the best hyper-parameters (median over seeds)",
    "momentum_opt": "tuned heavy-ball momentum",
    "decay_opt": "tuned iterate-averaging decay",
    "kappa_opt": "tuned long-step parameter kappa of accelerated SGD (Kidambi et al. 2018)",
    "lr_schedule_opt": "tuned piecewise-constant learning rates",
    "piece_fraction_opt": "fraction of the steps spent in each schedule piece",
    "reason": "why steps_to_target is inf (empty when finite)",
    "grad_norm_sq": "|E g|^2",
    "grad_var": "average per-coordinate variance of the mini-batch gradient",
    "grad_nvar": "normalized variance tr Cov / E|g|^2",
    "noise_scale": "B_simple = tr Sigma / |E g|^2",
    "snr": "|E g|^2 / tr Cov",
    "trace_cov_label": "label-noise part of the per-example gradient covariance trace (law of total covariance)",
    "trace_cov_batch": "batch-noise part of the per-example gradient covariance trace (vanishes at an interpolating optimum)",
    "eigenvalue": "eigenvalue",
    "curvature": "curvature h_i",
    "noise_variance": "per-example gradient noise variance c_i",
    "loss_inf": "stationary expected loss (noise floor) of a constant learning rate",
    "relaxation_steps": "steps for the distance to the floor to shrink by e (1 / (1 - rate))",
    "ks_distance": "KS distance to the fitted power law (mean over the tested sets)",
    "ks_critical": "5% critical KS distance 1.36 / sqrt(K) of a power-law test on the top K values",
    "power_law_rate": "fraction of tested sets not rejected as power laws (KS distance < critical)",
    "power_law_beta": "MLE power-law density exponent beta (median over the tested sets)",
    "p_value_mean": "mean p-value of the D'Agostino K^2 normality tests",
    "gaussian_rate": "fraction of tested sets not rejected as Gaussian (p > alpha)",
    "zipf_exponent": "Zipf exponent s = 1 / (beta - 1) of a spectrum's power-law fit (lambda_k ~ k^-s)",
    "zipf_exponent_se": "standard error of zipf_exponent",
    "n_outliers": "top eigenvalues set apart from the rest by a large ratio lambda_k / lambda_(k+1)",
    "steps_per_seed": "measured steps_to_target of each seed at the batch size's tuned hyper-parameters",
    "b_crit": "critical batch size B_crit of S = S_min (1 + B_crit / B) (measured: fitted to steps_best)",
    "b_crit_lo": "lower end of the bootstrap interval (over seeds) of b_crit",
    "b_crit_hi": "upper end of the bootstrap interval (over seeds) of b_crit",
    "s_min": "S_min of S = S_min (1 + B_crit / B), the steps at an infinite batch size",
    "s_min_lo": "lower end of the bootstrap interval (over seeds) of s_min",
    "s_min_hi": "upper end of the bootstrap interval (over seeds) of s_min",
    "b_crit_pred": "critical batch size predicted from one reference run (theory)",
    "steps_pred": "steps_to_target predicted from one reference run (theory)",
    "examples_to_target": "training examples drawn until the target (sum of the batch sizes)",
    "local_b_crit": "B_crit of the next loss segment, measured by branch runs from a checkpoint",
    "eigenvalue_batch_slope": "log-log slope of the top covariance eigenvalue vs batch size (-1: ~ 1/B)",
    "batch_size_now": "batch size of the training update from this step on (a schedule's or an adaptive rule's)",
    "examples": "training examples drawn before this step (the sum of the batch sizes of the earlier updates)",
    "lr_now": "learning rate of the training update from this step on",
    "hessian_trace": "tr H of the loss's Hessian (per layer: of the layer's diagonal block), Hutchinson's estimate",
    "hessian_trace_sem": "standard error of hessian_trace (over the Hutchinson vectors)",
    "spread_draws": "a statistic's value on each of K independent batches (draw)",
    "spread_mean": "mean of a statistic over K independent batches",
    "spread_sd": "standard deviation (ddof 1) of a statistic over K independent batches",
    "spread_sem": "standard error of spread_mean (spread_sd / sqrt(K))",
    "samples_needed": "samples (batches) whose mean has the requested relative standard error, estimated from K",
    "samples_needed_low": "lower end of the interval of samples_needed (noncentral t, exact for normal values)",
    "samples_needed_high": "upper end of the interval of samples_needed (inf: the sign of the mean is unresolved)",
    "probe_sd": "standard deviation of one Hutchinson probe's v^T H v, pooled over batches",
    "probes_needed": "Hutchinson vectors per batch for the requested relative standard error of the trace",
    "micro_batch_size": "examples of one micro-batch: one backward pass of one process (the small batch of the two-batch "
                        "noise-scale estimate under gradient accumulation)",
    "n_micro_batches": "micro-batches of one training step over all processes (accumulation steps x processes)",
    "grad_norm_sq_micro": "mean over a step's micro-batches of |g_micro|^2 (|G_small|^2 of the two-batch estimate)",
    "grad_norm_sq_step": "|G_big|^2 of a step's accumulated, all-reduced gradient (the big batch of the two-batch estimate)",
    "grad_norm_sq_unbiased_sem": "standard error of grad_norm_sq_unbiased",
    "noise_scale_unbiased_sem": "standard error of noise_scale_unbiased",
    "grad_norm_sq_ema": "bias-corrected exponential moving average of grad_norm_sq_unbiased over training steps",
    "trace_cov_ema": "bias-corrected exponential moving average of the two-batch trace_cov over training steps",
    "noise_scale_ema": "trace_cov_ema / grad_norm_sq_ema: the smoothed B_simple (a ratio of averages, McCandlish et al.)",
    "noise_scale_ema_sem": "standard error of noise_scale_ema from the per-step scatter and the EMA's effective steps",
    "noise_scale_ema_lo": "lower end of the Fieller interval of noise_scale_ema (from the per-step scatter)",
    "noise_scale_ema_hi": "upper end of the Fieller interval of noise_scale_ema (inf: |G|^2 not significantly > 0)",
    "d_opt": "compute-optimal model size d*(F): the parameter count that minimises the loss at a FLOP budget F",
    "loss_opt": "the loss at the compute-optimal model size, L(d*(F); F)",
    "at_grid_end": "the iso-FLOP minimum lies at an end of the model-size grid (left out of the exponent fit)",
    "b_crit_fit_lo": "lower end of the fit interval of b_crit (exact steps: how well S = S_min (1 + B_crit / B) fits)",
    "b_crit_fit_hi": "upper end of the fit interval of b_crit (exact steps: how well S = S_min (1 + B_crit / B) fits)",
    "e_min": "E_min = S_min B_crit: the examples (data) a small batch size needs to reach the target",
    "fit_rms": "rms relative error of the fit S = S_min (1 + B_crit / B) to the steps",
    "ema_n_eff": "effective number of steps of a bias-corrected EMA (1 / sum of its squared weights)",
    "online_risk": "expected population (test) excess risk of SGD with fresh examples at every step (the deep "
                   "bootstrap's ideal world, Nakkiran et al. 2021)",
    "offline_risk": "expected population (test) excess risk of SGD reusing a fixed training set (the deep bootstrap's "
                    "real world)",
    "offline_risk_sem": "standard error of offline_risk over training sets",
    "offline_train_loss": "expected training loss on the fixed training set of the offline run",
    "offline_train_loss_sem": "standard error of offline_train_loss over training sets",
    "bootstrap_error": "offline_risk - online_risk (or offline - online test error): Nakkiran et al.'s bootstrap error",
    "bootstrap_error_sem": "standard error of bootstrap_error over training sets",
    "online_test_error": "test classification error of a network trained on fresh examples at every step",
    "offline_test_error": "test classification error of a network trained on a fixed training set",
    "offline_train_error": "classification error on its own fixed training set of the offline network",
}

SOURCES = ("exact", "simulation", "measurement", "theory")  # theory: a prediction from measurements

# results that must never be NaN (hyper-parameters may be NaN where they do not apply, e.g. momentum_opt of SGD)
NO_NAN = ("loss", "test_loss", "steps_to_target", "steps_lower_bound", "grad_norm_sq", "grad_var", "grad_nvar",
          "noise_scale", "snr", "online_risk", "offline_risk", "offline_train_loss", "bootstrap_error")


@_validate(obj=Instance(xr.Dataset, xr.DataArray, what="an xarray Dataset or DataArray"), model=Instance(str),
           source=Options(*SOURCES))
def attach_attrs(obj, *, model: str, source: str, **params):
    """Set the vocabulary's attrs (``model``, ``source`` and the generating parameters) in place.

    Values that netCDF cannot store (None, bool, dicts) are converted to strings.
    """
    if source not in SOURCES:
        raise ValueError(f"`source` must be one of {SOURCES}; got {source!r}.")
    obj.attrs["model"] = model
    obj.attrs["source"] = source
    for k, v in params.items():
        if v is None or isinstance(v, (bool, np.bool_, dict, list, tuple)):
            v = str(v)
        obj.attrs[k] = v
    return obj


@_validate(obj=Instance(xr.Dataset, xr.DataArray, what="an xarray Dataset or DataArray"))
def validate(obj) -> None:
    """Check an xarray object against the vocabulary.

    Raises:
        ValueError: an unknown variable or dimension name, a non-float64 numeric variable, a missing
            or unknown ``model`` / ``source`` attribute, or NaN in a data variable.
    """
    if isinstance(obj, xr.DataArray):
        obj = obj.to_dataset(name=obj.name if obj.name is not None else "loss", promote_attrs=True)
    if not isinstance(obj, xr.Dataset):
        raise TypeError(f"expected an xarray Dataset or DataArray; got {type(obj).__name__}.")
    for attr in ("model", "source"):
        if attr not in obj.attrs:
            raise ValueError(f"missing attribute `{attr}`.")
    if obj.attrs["source"] not in SOURCES:
        raise ValueError(f"attribute `source` must be one of {SOURCES}; got {obj.attrs['source']!r}.")
    for dim in obj.dims:
        if dim not in DIMS:
            raise ValueError(f"unknown dimension `{dim}`; known: {DIMS}.")
    for name, var in obj.data_vars.items():
        if name not in VARIABLES:
            raise ValueError(f"unknown variable `{name}`; known: {tuple(VARIABLES)}.")
        if var.dtype.kind in "fc":
            if var.dtype != np.float64:
                raise ValueError(f"variable `{name}` must be float64; got {var.dtype}.")
            if name in NO_NAN and np.any(np.isnan(var.values)):
                raise ValueError(f"variable `{name}` holds NaN; report divergence as inf with a reason.")
