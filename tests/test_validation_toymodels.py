"""Bad input to every public function of ``toymodels``, generated from the declared constraints, and
the findings of issue 12 (stress test of the public API), each pinned by its message.

Every function registered with :func:`toymodels._validate.validate` has a small valid call in
``EXAMPLES``; :func:`badinput.bad_calls` replaces one argument at a time by each value its
constraint must refuse.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import xarray as xr

import toymodels
from toymodels import (EMA, NQM, SGD, BatchSizeWarmup, Constant, Cosine, Exponential, FiniteLinearRegression,
                       GaussianLinearRegression, Momentum, PiecewiseConstant, RandomFeatures, StepDecay, Tabulated, Warmup,
                       batch_schedule, critical, dynamics, estimators, features, finite_regression, history, linreg,
                       nqm, optimizers, parallel, plrf, schedules, schema, secular, spectra, stats, sweep, tails)
from toymodels._validate import REGISTRY

from badinput import bad_calls, check_example_runs, check_refused

assert all(m.__name__.startswith("toymodels") for m in (batch_schedule, estimators, features, finite_regression, history,
                                                        linreg, nqm,
                                                        optimizers, parallel, schedules, schema, secular, spectra,
                                                        stats, sweep, tails, dynamics, toymodels))

# ------------------------------------------------------------------------------------------------
# small models, built once (examples never mutate them)
# ------------------------------------------------------------------------------------------------
NQM8 = NQM.power_law(8)
GLR6 = GaussianLinearRegression.power_law(6, noise_std=0.1)
FLR4 = FiniteLinearRegression.gaussian(12, 4, noise_std=0.3, seed=0)
RF = RandomFeatures(20, input_dim=5, teacher_hidden=3, student_hidden=8)
PLRF = plrf.PowerLawRF(1.0, 0.5, 8, 4, seed=0)
G = np.random.default_rng(0).standard_normal((10, 4))
ASSIGN = np.arange(10) % 2
HISTORY = np.random.default_rng(1).standard_normal((25, 25))
X_SMALL = np.random.default_rng(2).standard_normal((6, 3))
ZIPF = np.arange(1.0, 30.0) ** -1.0
VALID_DS = xr.Dataset({"loss": ("step", [1.0])}, coords={"step": [0]}, attrs={"model": "nqm", "source": "exact"})


def _new(cls):
    """An uninitialised instance, for calling a registered ``__init__``."""
    return object.__new__(cls)


def _rng():
    return np.random.default_rng(0)


EXAMPLES = {
    # batch-size schedules: steps and examples to target
    "toymodels.batch_schedule.compare_tuned": lambda: (
        (NQM8, "momentum", BatchSizeWarmup(1, 4, 6, every=3), [1.0, 4.0], 0.5),
        dict(lrs=[0.1], momentum=0.5, max_steps=1000, progress=False, tuned=None)),
    # the deep bootstrap
    "toymodels.bootstrap.deep_bootstrap": lambda: ((GLR6, 5, SGD(0.1), 2, 4), dict(n_sets=2, seed=0)),
    "toymodels.bootstrap.training_set": lambda: ((GLR6, 5), dict(seed=0)),
    "toymodels.batch_schedule.lr_follows_batch": lambda: ((BatchSizeWarmup(1, 4, 6), [1.0, 4.0], [0.2, 0.5]), {}),
    "toymodels.batch_schedule.compare_with_constant": lambda: (
        (NQM8, SGD(0.5), BatchSizeWarmup(1, 4, 6), [1.0, 4.0], 0.5), dict(max_steps=1000)),
    "toymodels.batch_schedule.cost_to_target": lambda: (
        (NQM8, SGD(0.5), BatchSizeWarmup(1, 4, 6), 0.5), dict(max_steps=1000)),
    # estimators
    "toymodels.estimators.estimator_stats": lambda: (
        (G, 2), dict(assign=ASSIGN, G_snapshot=G, n_samples=3, seed=0)),
    "toymodels.estimators.gc_variance": lambda: ((G, ASSIGN), {}),
    "toymodels.estimators.gradient_clustering": lambda: ((G, 2), dict(n_iter=2, seed=0)),
    "toymodels.estimators.sample_gc": lambda: ((G, ASSIGN, 3, _rng()), {}),
    "toymodels.estimators.sample_sg": lambda: ((G, 2, 3, _rng()), {}),
    "toymodels.estimators.sample_svrg": lambda: ((G, G, 2, 3, _rng()), {}),
    "toymodels.estimators.sg_variance": lambda: ((G, 2), {}),
    "toymodels.estimators.svrg_variance": lambda: ((G, G, 2), {}),
    # random features
    "toymodels.features.RandomFeatures.__init__": lambda: (
        (_new(RandomFeatures), 20), dict(input_dim=5, teacher_hidden=3, student_hidden=8, duplicates=0.0,
                                         n_duplicated=5, seed=0)),
    "toymodels.features.RandomFeatures.accuracy": lambda: ((RF, np.zeros(8)), {}),
    "toymodels.features.RandomFeatures.loss": lambda: ((RF, np.zeros(8)), {}),
    "toymodels.features.RandomFeatures.per_example_grads": lambda: ((RF, np.zeros(8)), {}),
    "toymodels.features.RandomFeatures.train": lambda: (
        (RF, 0.1, 4, 6), dict(log_every=3, update_every=3, n_iter=2, n_samples=2, seed=0, progress=False)),
    # finite data
    "toymodels.finite_regression.FiniteLinearRegression.__init__": lambda: (
        (_new(FiniteLinearRegression), X_SMALL, np.ones(6)), dict(w0=0.0)),
    "toymodels.finite_regression.FiniteLinearRegression.gaussian": lambda: (
        (FiniteLinearRegression, 12, 4), dict(spectrum=np.ones(4), noise_std=0.3, seed=0)),
    "toymodels.finite_regression.FiniteLinearRegression.kaczmarz_curve": lambda: ((FLR4, 5), dict(sampling="norm")),
    "toymodels.finite_regression.FiniteLinearRegression.kaczmarz_simulate": lambda: (
        (FLR4, 5), dict(sampling="uniform", n_runs=3, seed=0)),
    "toymodels.finite_regression.FiniteLinearRegression.loss_at_step": lambda: ((FLR4, SGD(0.1), 2.0, 5), dict(lr=0.1)),
    "toymodels.finite_regression.FiniteLinearRegression.loss_curve": lambda: ((FLR4, 0.1, 2, 5), dict(weight_decay=0.1)),
    "toymodels.finite_regression.FiniteLinearRegression.lr_limit": lambda: ((FLR4,), dict(optimizer=SGD(0.1))),
    "toymodels.finite_regression.FiniteLinearRegression.modal_form": lambda: ((FLR4, SGD(0.1), 2.0), dict(lr=0.1)),
    "toymodels.finite_regression.FiniteLinearRegression.simulate": lambda: (
        (FLR4, 0.1, 2, 5), dict(replacement=True, n_runs=3, seed=0, weight_decay=0.1)),
    "toymodels.finite_regression.FiniteLinearRegression.steps_to_target": lambda: (
        (FLR4, SGD(0.1), 2.0, 0.5), dict(max_steps=100, full_output=False)),
    # power-law random features
    "toymodels.plrf.PowerLawRF.__init__": lambda: ((_new(plrf.PowerLawRF), 1.0, 0.5, 8, 4),
                                                   dict(seed=0, spectrum="exact")),
    "toymodels.plrf.compute_optimal_frontier": lambda: (
        (np.array([[2.0, 1.0], [1.0, 2.0], [3.0, 3.0]]), np.array([1.0, 2.0, 4.0]), np.array([1.0, 10.0])), {}),
    "toymodels.plrf.plrf_frontier": lambda: (
        (1.0, 0.3, np.array([4.0, 8.0]), np.array([100.0])),
        dict(v=16, batch_size=1.0, lr_fraction=0.5, seed=0, spectrum="exact")),
    "toymodels.plrf.phase": lambda: ((1.0, 0.7), {}),
    "toymodels.plrf.frontier_exponents": lambda: ((1.0, 0.7), {}),
    "toymodels.plrf.deterministic_equivalent": lambda: ((1.0, 0.5, 8, 4), dict(ratio=1.01, eps=1e-3)),
    "toymodels.plrf.PowerLawRF.from_features": lambda: ((plrf.PowerLawRF, 1.0, 0.5, np.eye(3)), {}),
    "toymodels.plrf.PowerLawRF.risk": lambda: ((PLRF, np.zeros(4)), {}),
    "toymodels.plrf.PowerLawRF.lr_limit": lambda: ((PLRF, SGD(0.1)), {}),
    "toymodels.plrf.PowerLawRF.stable_lr": lambda: ((PLRF, SGD(0.1), 2), {}),
    "toymodels.plrf.PowerLawRF.stationary_loss": lambda: ((PLRF, SGD(0.1), 2), {}),
    "toymodels.plrf.PowerLawRF.loss_curve": lambda: ((PLRF, SGD(0.1), 2, 5), dict(progress=False)),
    "toymodels.plrf.PowerLawRF.gradient_stats": lambda: ((PLRF, SGD(0.1), 2, 5), dict(progress=False)),
    "toymodels.plrf.PowerLawRF.loss_at_step": lambda: ((PLRF, SGD(0.1), 2, 5), dict(lr=0.1)),
    "toymodels.plrf.PowerLawRF.modal_form": lambda: ((PLRF, SGD(0.1), 2), dict(lr=0.1)),
    "toymodels.plrf.PowerLawRF.steps_to_target": lambda: (
        (PLRF, SGD(0.1), 2, 0.5), dict(max_steps=100, full_output=False)),
    "toymodels.plrf.PowerLawRF.simulate": lambda: ((PLRF, SGD(0.1), 2, 3), dict(n_runs=2, seed=0)),
    # gradient histories
    "toymodels.history.gradient_history": lambda: ((NQM8, np.ones(8)), dict(batch_size=2, n_iter=3, lr=0.0, seed=0)),
    "toymodels.history.gradient_moments": lambda: ((NQM8, np.ones(8), 2), {}),
    # online linear regression
    "toymodels.linreg.GaussianLinearRegression.__init__": lambda: (
        (_new(GaussianLinearRegression), np.ones(3)), dict(w_star=1.0, noise_std=0.1)),
    "toymodels.linreg.GaussianLinearRegression.gradient_covariance": lambda: ((GLR6, np.zeros(6)), {}),
    "toymodels.linreg.GaussianLinearRegression.gradient_stats": lambda: ((GLR6, SGD(0.1), 2, 5), dict(progress=False)),
    "toymodels.linreg.GaussianLinearRegression.loss_at_step": lambda: ((GLR6, SGD(0.1), 2, 5), dict(lr=0.1)),
    "toymodels.linreg.GaussianLinearRegression.loss_curve": lambda: ((GLR6, SGD(0.1), 2, 5), dict(progress=False)),
    "toymodels.linreg.GaussianLinearRegression.lr_limit": lambda: ((GLR6, SGD(0.1)), {}),
    "toymodels.linreg.GaussianLinearRegression.modal_form": lambda: ((GLR6, SGD(0.1), 2), dict(lr=0.1)),
    "toymodels.linreg.GaussianLinearRegression.power_law": lambda: (
        (GaussianLinearRegression, 6), dict(power=1.0, w_star=1.0, noise_std=0.1)),
    "toymodels.linreg.GaussianLinearRegression.simulate": lambda: (
        (GLR6, SGD(0.1), 2, 5), dict(n_runs=3, seed=0, progress=False)),
    "toymodels.linreg.GaussianLinearRegression.stable_lr": lambda: ((GLR6, SGD(0.1), 2), {}),
    "toymodels.linreg.GaussianLinearRegression.stationary_loss": lambda: ((GLR6, SGD(0.1), 2), {}),
    "toymodels.linreg.GaussianLinearRegression.steps_to_target": lambda: (
        (GLR6, SGD(0.1), 2, 0.5), dict(max_steps=1000, full_output=False)),
    # NQM
    "toymodels.nqm.NQM.__init__": lambda: ((_new(NQM), np.ones(3)), dict(c=np.ones(3), init_sq=1.0)),
    "toymodels.nqm.NQM.coarsen": lambda: ((NQM8,), dict(rel_width=0.1)),
    "toymodels.nqm.NQM.family_loss": lambda: ((NQM8, lambda e: Momentum(1.0, e), 2.0), {}),
    "toymodels.nqm.NQM.family_evaluator": lambda: ((NQM8, lambda e: Momentum(1.0, e), 2.0), {}),
    "toymodels.nqm.NQM.gradient_stats": lambda: ((NQM8, SGD(0.1), 2.0, 5), dict(progress=False)),
    "toymodels.nqm.NQM.loss_at_step": lambda: ((NQM8, SGD(0.1), 2.0, 5), dict(lr=0.1)),
    "toymodels.nqm.NQM.loss_curve": lambda: ((NQM8, SGD(0.1), 2.0, 5), dict(progress=False)),
    "toymodels.nqm.NQM.lower_bound_loss": lambda: ((NQM8, [0, 1, 2]), {}),
    "toymodels.nqm.NQM.lower_bound_steps": lambda: ((NQM8, 2.0, 0.5), {}),
    "toymodels.nqm.NQM.lr_limit": lambda: ((NQM8, SGD(0.1)), {}),
    "toymodels.nqm.NQM.modal_form": lambda: ((NQM8, SGD(0.1), 2.0), dict(lr=0.1)),
    "toymodels.nqm.NQM.noise_floor": lambda: ((NQM8, SGD(0.1), 2.0), {}),
    "toymodels.nqm.NQM.power_law": lambda: ((NQM, 8), dict(hessian_power=1.0, noise_power=1.0, init_sq=1.0)),
    "toymodels.nqm.NQM.simulate": lambda: ((NQM8, SGD(0.1), 2.0, 5), dict(n_runs=3, seed=0, progress=False)),
    "toymodels.nqm.NQM.steps_to_target": lambda: (
        (NQM8, SGD(0.5), 2.0, 0.5), dict(max_steps=10**6, full_output=False)),
    # optimizers
    "toymodels.optimizers.EMA.__init__": lambda: ((_new(EMA), SGD(0.1)), dict(decay=0.9)),
    "toymodels.optimizers.Momentum.__init__": lambda: ((_new(Momentum), 0.1), dict(beta=0.9, precond=0.0,
                                                                                  weight_decay=0.0)),
    "toymodels.optimizers.Nesterov.__init__": lambda: ((_new(optimizers.Nesterov), 0.1),
                                                       dict(beta=0.9, precond=0.0, weight_decay=0.1)),
    "toymodels.optimizers.AcceleratedSGD.__init__": lambda: ((_new(optimizers.AcceleratedSGD), 0.1),
                                                             dict(kappa=100.0, xi=5.0, small_const=0.7, weight_decay=0.0)),
    "toymodels.optimizers.PolyakAverage.__init__": lambda: ((_new(optimizers.PolyakAverage), SGD(0.1)), {}),
    "toymodels.optimizers.ScheduleFree.__init__": lambda: ((_new(optimizers.ScheduleFree), 0.1),
                                                           dict(beta=0.9, weight_decay=0.0, averaging="uniform")),
    "toymodels.optimizers.Optimizer.parts": lambda: ((optimizers.ScheduleFree(0.1), np.ones(3)), {}),
    "toymodels.optimizers.Optimizer.coefficients": lambda: ((optimizers.PolyakAverage(SGD(0.1)), np.arange(3)), {}),
    "toymodels.optimizers.Optimizer.affine": lambda: ((SGD(0.1), np.ones(3)), {}),
    "toymodels.optimizers.Optimizer.lr_limit": lambda: ((SGD(0.1), np.ones(3)), {}),
    "toymodels.optimizers.Optimizer.transition": lambda: ((SGD(0.1), np.ones(3), 0.1), {}),
    "toymodels.optimizers.Optimizer.with_lr": lambda: ((SGD(0.1), 0.2), {}),
    "toymodels.optimizers.SGD.__init__": lambda: ((_new(SGD), 0.1), dict(precond=0.0, weight_decay=0.0)),
    # parallel
    "toymodels.parallel.run_tasks": lambda: ((abs, [1, -2]), dict(scheduler=None, on_result=None, n_workers=1)),
    "toymodels.parallel.local_cluster": lambda: ((), dict(n_workers=1)),  # not entered: no cluster starts
    # schedules
    "toymodels.schedules.BatchSizeWarmup.__init__": lambda: (
        (_new(BatchSizeWarmup), 1, 8, 10), dict(every=2, integer=False)),
    "toymodels.schedules.Constant.__init__": lambda: ((_new(Constant), 0.1), {}),
    "toymodels.schedules.cumulative": lambda: ((BatchSizeWarmup(1, 8, 10), [0, 5, 20]), {}),
    "toymodels.schedules.Cosine.__init__": lambda: ((_new(Cosine), 0.1, 10), dict(final_lr=0.0)),
    "toymodels.schedules.Exponential.__init__": lambda: ((_new(Exponential), 0.1), dict(gamma=0.9, min_lr=0.0)),
    "toymodels.schedules.PiecewiseConstant.__init__": lambda: ((_new(PiecewiseConstant), (5,), (0.1, 0.01)), {}),
    "toymodels.schedules.Schedule.at": lambda: ((Cosine(0.1, 10), np.arange(3)), {}),
    "toymodels.schedules.Schedule.values": lambda: ((Cosine(0.1, 10), 3), {}),
    "toymodels.schedules.StepDecay.__init__": lambda: (
        (_new(StepDecay), 0.1), dict(factor=0.5, every=3, n_decays=2)),
    "toymodels.schedules.Warmup.__init__": lambda: ((_new(Warmup), Constant(0.1), 3), {}),
    "toymodels.schedules.Tabulated.__init__": lambda: ((_new(Tabulated), [0.3, 0.1]), {}),
    "toymodels.schedules.WarmupStableDecay.__init__": lambda: (
        (_new(schedules.WarmupStableDecay), 0.1, 100), dict(warmup_steps=10, decay_fraction=0.2, final_lr=0.0,
                                                           shape="linear")),
    "toymodels.schedules.LinearDecay.__init__": lambda: ((_new(schedules.LinearDecay), 0.1, 100),
                                                         dict(final_lr=0.0, warmup_steps=5)),
    "toymodels.schedules.InverseSqrt.__init__": lambda: ((_new(schedules.InverseSqrt), 0.1), dict(warmup_steps=5,
                                                                                                  min_lr=0.0)),
    "toymodels.schedules.as_schedule": lambda: ((0.1,), {}),
    # schema, secular, spectra, stats
    "toymodels.schema.attach_attrs": lambda: ((xr.Dataset(),), dict(model="nqm", source="exact")),
    "toymodels.schema.validate": lambda: ((VALID_DS,), {}),
    "toymodels.secular.loss_modes": lambda: (
        (np.array([0.5, 0.8]), np.array([0.1, 0.1]), np.ones(2), np.ones(2)), dict(f=np.ones(2))),
    "toymodels.spectra.power_law": lambda: ((5,), dict(power=1.0, scale=1.0)),
    "toymodels.stats.fit_critical_batch": lambda: (([1, 2, 4, 8], [100, 55, 30, 20]), {}),
    "toymodels.stats.gradient_statistics": lambda: ((1.0, 2.0, 10, 4), {}),
    "toymodels.stats.two_batch_estimates": lambda: ((2.0, 1.0, 1.5, 4.0), {}),
    "toymodels.critical.noise_scale_prediction": lambda: (([0, 10, 20], [5.0, 8.0, 9.0], 2.0, 20.0, [1, 4, 16]), {}),
    "toymodels.critical.critical_batch_scaling": lambda: ((NQM.power_law, [5], [0.1], [1, 4, 16]), {}),
    "toymodels.critical.tune_lr": lambda: (([NQM.power_law(10)], [1.0], SGD, 4.0, [0.1]), {"n_grid": 5}),
    "toymodels.critical.piecewise_prediction": lambda: (([NQM.power_law(10)], [100.0], [0.5], SGD, 2.0, [1, 4, 16]), {}),
    "toymodels.stats.crossing_step": lambda: (([0, 10, 20], [1.0, 0.5, 0.1], 0.2), {}),
    "toymodels.stats.bootstrap_critical_batch": lambda: (
        ([1, 2, 4], [[100.0, 110.0], [55.0, 60.0], [30.0, 33.0]]), dict(level=0.9, n_boot=20, seed=0)),
    "toymodels.stats.tuned_median": lambda: ((np.ones((2, 2, 3)),), {}),
    # sweeps (tiny: 8 modes, an easy target)
    "toymodels.sweep.batch_size_sweep": lambda: (
        (NQM8, "sgd", [1.0, 2.0], 0.5), dict(precond=0.5, decay=0.99, progress=False, path=None, weight_decay=0.0)),
    "toymodels.sweep.default_grid": lambda: ((NQM8, "sgd"), dict(n_lr=5, n_extra=2, precond=0.5, decay=0.99)),
    "toymodels.sweep.family_sweeps": lambda: (
        (NQM8, ["sgd"], [1.0, 2.0], 0.5), dict(n_jobs=1, paths=None, progress=False, scheduler=None)),
    "toymodels.sweep.grid_search": lambda: (
        (NQM8, "sgd", 1.0, 0.5), dict(lr_fractions=[0.1, 0.5], extras=[None], precond=0.5, decay=0.99,
                                      incumbent=math.inf, weight_decay=0.0)),
    "toymodels.sweep.make_optimizer": lambda: (("momentum", 0.1, 0.9), dict(precond=0.5, decay=0.99, weight_decay=0.1)),
    "toymodels.sweep.tune": lambda: (
        (NQM8, "sgd", 1.0, 0.5), dict(precond=0.5, decay=0.99, start=None, coarse=False, k_floor=0, weight_decay=0.0)),
    "toymodels.sweep.tune_schedule": lambda: ((NQM8, 1.0, 0.5), dict(n_pieces=2, precond=0.0, coarse=False)),
    # tails
    "toymodels.tails.davis_kahan_bound": lambda: ((0.1, 0.5), {}),
    "toymodels.tails.eigengaps": lambda: (([3.0, 2.0, 1.0],), dict(two_sided=False)),
    "toymodels.tails.gradient_history_tests": lambda: (
        (HISTORY,), dict(k_power=5, n_normal=20, alpha=0.05, max_tests=3, seed=0)),
    "toymodels.tails.normality_test": lambda: (
        (np.random.default_rng(3).standard_normal(30),), dict(axis=0, alpha=0.05, whiten=True)),
    "toymodels.tails.power_law_fit": lambda: ((ZIPF,), dict(k=10, xmin=None, k_min=3, n_candidates=5)),
    "toymodels.tails.rank_fit": lambda: ((ZIPF,), dict(k=5)),
}

# examples whose valid call raises by design (no closed form), with the exception they raise
RAISES = {"toymodels.finite_regression.FiniteLinearRegression.modal_form": NotImplementedError}


@pytest.mark.parametrize("qualname, arg, bad", bad_calls(REGISTRY, EXAMPLES, "toymodels."))
def test_bad_input_is_refused_naming_the_argument(qualname, arg, bad):
    check_refused(REGISTRY, EXAMPLES, qualname, arg, bad)


@pytest.mark.parametrize("qualname", sorted(q for q in REGISTRY if q.startswith("toymodels.")))
def test_every_example_runs(qualname):
    assert qualname in EXAMPLES, f"{qualname} is registered but has no example"
    if qualname in RAISES:
        with pytest.raises(RAISES[qualname]):
            check_example_runs(REGISTRY, EXAMPLES, qualname)
    else:
        check_example_runs(REGISTRY, EXAMPLES, qualname)


def test_every_example_is_registered():
    assert not set(EXAMPLES) - set(REGISTRY)


def test_public_api_is_registered():
    """The classes and functions README documents are all declared."""
    for name in ("NQM.loss_curve", "NQM.simulate", "GaussianLinearRegression.steps_to_target",
                 "FiniteLinearRegression.loss_curve", "RandomFeatures.train"):
        cls, meth = name.split(".")
        assert hasattr(getattr(toymodels, cls).__dict__[meth], "__constraints__"), name
    for fn in (sweep.batch_size_sweep, sweep.family_sweeps, sweep.tune, sweep.tune_schedule, stats.fit_critical_batch,
               stats.bootstrap_critical_batch, tails.power_law_fit, history.gradient_history, spectra.power_law, parallel.run_tasks,
               parallel.local_cluster,
               estimators.estimator_stats):
        assert hasattr(fn, "__constraints__"), fn.__name__



def test_validate_shortcut_binds_as_signature_bind():
    """The decorator binds a plain signature (no *args, **kwargs, positional-only) without
    Signature.bind: every call must pass the same converted values, or raise the same error, as
    binding with Signature.bind and then checking."""
    import inspect

    from toymodels._validate import Integer, Real, validate

    checks = {"a": Integer(1, 10), "c": Real(0.0, 1.0), "d": Integer(0, 5)}
    seen = []

    def f(a, b=2, c=0.5, *, d=1, e=None):
        seen.append((a, b, c, d, e))

    decorated = validate(**checks)(f)
    REGISTRY.pop(f"{f.__module__}.{f.__qualname__}")

    def reference(args, kwargs):
        try:
            bound = inspect.signature(f).bind(*args, **kwargs)
        except TypeError as err:
            return TypeError, f"{f.__qualname__}(): {err}"
        try:
            for arg, check in checks.items():
                if arg in bound.arguments:
                    bound.arguments[arg] = check(arg, bound.arguments[arg])
        except (TypeError, ValueError) as err:
            return type(err), str(err)
        f(*bound.args, **bound.kwargs)
        return seen.pop()

    calls = [((3,), {}), ((3.0, 4), {"d": 2.0}), ((), {"a": 3, "c": 1}), ((3, 4, 0.25), {"e": "x"}),
             ((3, "b", 1, ), {"e": 1, "d": 0}), ((), {}), ((1, 2, 0.5, 4), {}), ((1,), {"a": 2}), ((1,), {"z": 0}),
             ((), {"b": 1}), ((0,), {}), ((2,), {"c": 2.0}), ((2,), {"d": -1}), ((2, 3, "x"), {}), ((True,), {})]
    for args, kwargs in calls:
        want = reference(args, dict(kwargs))
        try:
            decorated(*args, **kwargs)
            got = seen.pop()
        except (TypeError, ValueError) as err:
            got = type(err), str(err)
        assert got == want and [type(v) for v in got] == [type(v) for v in want], (args, kwargs, got, want)


# ------------------------------------------------------------------------------------------------
# issue 12: errors that did not name the argument
# ------------------------------------------------------------------------------------------------
def test_huge_batch_size_is_refused_not_a_zero_division():
    with pytest.raises(ValueError, match=r"`batch_size` must be a float in \[1, 9.0072e\+15\]; got 1e\+30"):
        NQM8.steps_to_target(SGD(0.5), batch_size=1e30, target=0.1)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_fit_critical_batch_refuses_non_finite_batch_sizes_before_lapack(bad, capfd):
    with pytest.raises(ValueError, match=r"`batch_sizes` must be finite; got 1 non-finite entries"):
        stats.fit_critical_batch([bad, 2, 4], [10, 6, 5])
    out, err = capfd.readouterr()
    assert "DLASCL" not in out + err


def test_fit_critical_batch_refuses_nan_steps_and_keeps_infinite_ones():
    with pytest.raises(ValueError, match=r"`steps` must be finite or \+inf; got 1 NaN or -inf entries"):
        stats.fit_critical_batch([1, 2, 4], [10, math.nan, 5])
    fit = stats.fit_critical_batch([1, 2, 4, 8], [100.0, 55.0, 32.5, math.inf])  # S = 10 (1 + 9 / B)
    assert fit["n_points"] == 3
    assert fit["critical_batch_size"] == pytest.approx(9.0, rel=1e-10)


def test_fit_critical_batch_is_never_negative():
    """Steps rising with B: the least-squares fit constrained to B_crit >= 0 is a constant, S_min the
    relative-error optimum sum(1/s) / sum(1/s^2)."""
    s = np.array([10.0, 12.0, 15.0])
    fit = stats.fit_critical_batch([1, 2, 4], s)
    assert fit["critical_batch_size"] == 0.0
    assert fit["steps_min"] == pytest.approx(np.sum(1 / s) / np.sum(1 / s**2), rel=1e-12)


@pytest.mark.parametrize("call, match", [
    (lambda: NQM("abc"), r"`h` must be a non-empty 1-D array of reals; got str"),
    (lambda: NQM(["1.0", "x"]), r"`h` must be a non-empty 1-D array of reals; got dtype <U3"),
    (lambda: NQM8.loss_curve(SGD(0.1), "4", 5), r"`batch_size` must be a real number; got str"),
    (lambda: SGD("0.1"), r"`lr` must be a float in \(0, inf\) or a Schedule; got str"),
])
def test_strings_are_a_typeerror_naming_the_argument(call, match):
    with pytest.raises(TypeError, match=match):
        call()


@pytest.mark.parametrize("call, match", [
    # a count of 10^12 steps would be 8 TB of indices ("Maximum allowed size exceeded")
    (lambda: NQM8.loss_curve(SGD(0.1), 1, 10**12), r"`steps` must be small enough for its arrays to fit in 4 "
                                                   r"GiB; got an estimated 7.28 TiB"),
    # 10^6 x 10^6 data was a MemoryError of 7.28 TiB
    (lambda: FiniteLinearRegression.gaussian(10**6, 10**6), r"`n` must be small enough for its arrays to fit in 4 GiB; "
                                                            r"got an estimated 14.6 TiB \(the 1000000 x 1000000 data\)"),
    (lambda: RandomFeatures(10**6, student_hidden=10**6), r"`student_hidden` must be small enough for its arrays to fit"),
    (lambda: history.gradient_history(NQM8, np.ones(8), batch_size=1, n_iter=10**8),
     r"`n_iter` must be small enough for its arrays to fit in 4 GiB; got an estimated 5.96 GiB"),
    (lambda: NQM.power_law(10**4).simulate(SGD(0.1), 1, 5, n_runs=10**5), r"`n_runs` must be small enough for its arrays to fit"),
    (lambda: GLR6.simulate(SGD(0.1), 10**9, 5, n_runs=2), r"`batch_size` must be small enough for its arrays to fit"),
    (lambda: estimators.sample_sg(G, 10**5, 10**6, _rng()), r"`n_samples` must be small enough for its arrays to fit"),
])
def test_sizes_that_cannot_fit_are_refused_before_allocating(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------------------------
# issue 12: invalid input accepted silently
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, name", [
    (lambda: NQM(np.array([1.0 + 1j, 2.0])), "h"),
    (lambda: NQM(np.ones(2), c=np.array([1.0 + 0j, 1.0])), "c"),
    (lambda: GaussianLinearRegression(np.array([1.0 + 0j])), "spectrum"),
    (lambda: FiniteLinearRegression(np.ones((2, 2)) * (1 + 1j), np.ones(2)), "X"),
    (lambda: stats.fit_critical_batch(np.array([1, 2, 4]) + 0j, [3, 2, 1]), "batch_sizes"),
])
def test_complex_input_is_refused_without_a_cast(call, name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ComplexWarning: nothing is cast
        with pytest.raises(TypeError, match=rf"`{name}` must be a non-empty .*; got complex"):
            call()


@pytest.mark.parametrize("model", [NQM8, GLR6, FLR4], ids=["nqm", "linreg", "finite"])
def test_negative_step_is_refused(model):
    with pytest.raises(ValueError, match=r"`k` must be an integer in \[0, 1000000000000000\]; got -1"):
        model.loss_at_step(SGD(0.1), 1, k=-1)


def test_loss_at_step_needs_a_constant_rate_or_lr():
    with pytest.raises(ValueError, match="`optimizer` must have a constant learning rate here"):
        NQM8.loss_at_step(SGD(Cosine(0.1, 10)), 1, 5)


# ------------------------------------------------------------------------------------------------
# issue 12: calls that never ended -- every iteration count has a finite, documented bound
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, exc, match", [
    (lambda: history.gradient_history(NQM8, np.ones(8), batch_size=1, n_iter=1e30), TypeError,
     r"`n_iter` must be an integer; got 1e\+30"),
    (lambda: history.gradient_history(NQM8, np.ones(8), batch_size=1, n_iter=10**15), ValueError,
     r"`n_iter` must be an integer in \[1, 100000000\]; got 1000000000000000"),
    (lambda: RF.train(0.1, 2, 10**15), ValueError, r"`n_steps` must be an integer in \[1, 100000000\]"),
    (lambda: estimators.gradient_clustering(G, 2, n_iter=10**6), ValueError,
     r"`n_iter` must be an integer in \[1, 100000\]; got 1000000"),
    (lambda: NQM8.simulate(SGD(0.1), 1, 10**9), ValueError, r"`steps` must be an integer in \[0, 100000000\]"),
    (lambda: FLR4.loss_curve(0.1, 1, [0, 10**8]), ValueError, r"`steps` must be step indices, integers in \[0, 10000000\]"),
    (lambda: NQM8.steps_to_target(SGD(0.1), 1, 0.1, max_steps=10**16), ValueError,
     r"`max_steps` must be an integer in \[1, 1000000000000000\]"),
    (lambda: GLR6.steps_to_target(Momentum(0.1, 0.9), 1, 1e-9, max_steps=10**12), ValueError,
     r"`max_steps` must be at most 1000000000 here"),
    (lambda: FLR4.steps_to_target(SGD(0.1), 1, 0.1, max_steps=10**12), ValueError,
     r"`max_steps` must be an integer in \[1, 1000000000\]"),
    (lambda: sweep.tune_schedule(NQM8, 1.0, 0.5, n_pieces=11), ValueError, r"`n_pieces` must be an integer in \[1, 10\]"),
])
def test_iteration_counts_are_bounded(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------------------------------
# issue 12: every model can be swept
# ------------------------------------------------------------------------------------------------
def test_finite_regression_can_be_swept():
    """batch_size_sweep on a FiniteLinearRegression: each tuned point is reached exactly at its
    reported step (checked against loss_curve, the step-by-step recursion), and is at least as good as
    the exact optimum of the 100-point lr grid."""
    model = FiniteLinearRegression.gaussian(30, 4, spectrum=np.linspace(1.0, 0.2, 4), noise_std=0.2, seed=3)
    target = 0.05 * model.initial_loss
    bss = [1.0, 2.0, 4.0, 8.0]
    ds = sweep.batch_size_sweep(model, "sgd", bss, target, progress=False)
    fr, extras = sweep.default_grid(model, "sgd")
    for b, steps, lr in zip(bss, ds.steps_to_target.values, ds.lr_opt.values):
        assert math.isfinite(steps)
        curve = model.loss_curve(lr, b, int(steps)).loss.values
        assert curve[-1] <= target < curve[-2]
        assert np.all(curve[:-1] > target)
        grid = sweep.grid_search(model, "sgd", b, target, lr_fractions=fr, extras=extras)
        assert steps <= grid["steps"]
    assert np.all(np.diff(ds.steps_to_target.values) <= 0)  # larger batches never need more steps


def test_finite_regression_exact_loss_matches_the_recursion():
    ks = np.array([0, 1, 2, 7, 40, 300])
    for lr, bs in ((0.2, 1), (0.6, 3)):
        curve = FLR4.loss_curve(lr, bs, ks).loss.values
        at = [FLR4.loss_at_step(SGD(lr), bs, int(k)) for k in ks]
        np.testing.assert_allclose(at, curve, rtol=1e-9, atol=1e-15)


def test_finite_regression_sweeps_only_sgd():
    with pytest.raises(ValueError, match=r"`family` must be one of \('sgd',\) for FiniteLinearRegression; got 'momentum'"):
        sweep.batch_size_sweep(FLR4, "momentum", [1.0, 2.0], 0.1, progress=False)
    with pytest.raises(ValueError, match="`optimizer` must be SGD without preconditioning"):
        FLR4.steps_to_target(Momentum(0.1, 0.9), 1, 0.1)
    big = FiniteLinearRegression.gaussian(40, 40, seed=0)
    with pytest.raises(ValueError, match=r"`X` must be at most 32 features wide"):
        big.loss_at_step(SGD(0.01), 1, 10)


# ------------------------------------------------------------------------------------------------
# issue 12: divergence is reported (inf with a reason, a flag), never NaN or finite nonsense
# ------------------------------------------------------------------------------------------------
def _assert_diverged(ds, names):
    assert ds.attrs["diverged"] == "True"
    assert ds.attrs["reason"].startswith("diverges")
    for name in names:
        v = ds[name].values
        assert not np.any(np.isnan(v)), name
        assert v[-1] == math.inf, name
    first = int(np.argmax(ds.loss.values == math.inf))
    assert first > 0 and np.all(np.isfinite(ds.loss.values[:first]))
    assert np.all(ds.loss.values[first:] == math.inf)


def test_nqm_simulate_reports_divergence():
    ds = NQM8.simulate(SGD(3.0), 1, np.array([0, 10, 100, 2000]), n_runs=3, seed=0)  # |1 - 3 h_1| = 2
    _assert_diverged(ds, ["loss", "loss_sem", "grad_norm_sq", "grad_nvar", "snr", "noise_scale"])
    assert f"by step {int(ds.step[np.argmax(ds.loss.values == math.inf)])}" in ds.attrs["reason"]
    ok = NQM8.simulate(SGD(0.5), 1, np.array([0, 10, 100]), n_runs=3, seed=0)
    assert ok.attrs["diverged"] == "False" and np.all(np.isfinite(ok.loss.values))


def test_linreg_simulate_reports_divergence():
    ds = GLR6.simulate(SGD(4.0), 1, np.array([0, 5, 3000]), n_runs=3, seed=0)
    _assert_diverged(ds, ["loss", "loss_sem", "grad_norm_sq", "grad_var", "grad_nvar"])


def test_finite_simulate_reports_divergence():
    ds = FLR4.simulate(10.0 * FLR4.lr_limit(), 1, np.array([0, 2, 2000]), n_runs=3, seed=0)
    _assert_diverged(ds, ["loss", "loss_sem", "sq_error", "sq_error_sem"])


def test_random_features_train_reports_divergence():
    rf = RandomFeatures(100, student_hidden=200)
    ds = rf.train(1e6, 10, 300, log_every=100, update_every=100)
    assert ds.attrs["diverged"] == "True" and "by step 100" in ds.attrs["reason"]
    assert list(ds.step.values) == [0, 100]
    for name, v in ds.data_vars.items():
        assert np.all(v.sel(step=100).values == math.inf), name
        assert not np.any(np.isnan(v.values)), name
    for name in ("loss", "accuracy", "grad_norm_sq", "grad_var", "grad_nvar"):
        assert np.all(np.isfinite(ds[name].sel(step=0).values)), name
    ok = rf.train(0.5, 10, 200, log_every=100, update_every=100)
    assert ok.attrs["diverged"] == "False" and list(ok.step.values) == [0, 100, 200]


def test_exact_searches_report_divergence_with_a_reason():
    steps, info = FLR4.steps_to_target(SGD(10.0 * FLR4.lr_limit()), 1, 1e-3, full_output=True)
    assert steps == math.inf and info["reason"].startswith("diverges: the loss overflowed by step")
    assert FLR4.loss_at_step(SGD(10.0 * FLR4.lr_limit()), 1, 10**6) == math.inf
    assert GLR6.loss_at_step(Momentum(3.0, 0.9), 1, 5000) == math.inf
    steps, info = GLR6.steps_to_target(Momentum(3.0, 0.9), 1, 1e-3, full_output=True)
    assert steps == math.inf and info["reason"].startswith("diverges")


def test_exact_curves_report_divergence_as_inf():
    for model in (NQM8, GLR6):
        curve = model.loss_curve(SGD(4.0), 1, np.array([0, 10, 10**6]))
        assert curve.attrs["diverged"] == "True" and curve.values[-1] == math.inf and not np.any(np.isnan(curve.values))


# ------------------------------------------------------------------------------------------------
# long scheduled curves: closed form over constant pieces, bounded step-by-step updates, a bar
# ------------------------------------------------------------------------------------------------
def test_piecewise_constant_curve_over_a_billion_steps_is_exact_and_fast():
    """Pieces jumped over in closed form equal the step-by-step propagation (small horizon), and a
    10^9-step curve costs a handful of jumps."""
    sched = StepDecay(0.5, factor=0.3, every=70, n_decays=3)
    ks = np.array([0, 1, 69, 70, 71, 200, 350])
    got = NQM8.loss_curve(SGD(sched), 2.0, ks).values
    opt = SGD(sched)
    a0, a1, b1 = opt.affine(NQM8.h)
    ref, _ = dynamics.propagate(a0, a1, b1, NQM8.c / 2.0, NQM8.h, 0, sched.values(350), ks, NQM8._S0(opt).copy())
    np.testing.assert_allclose(got, ref, rtol=1e-11)
    long = SGD(StepDecay(0.5, factor=0.3, every=10**8, n_decays=5))
    curve = NQM8.loss_curve(long, 2.0, np.unique(np.geomspace(1, 10**9, 30).astype(np.int64)))
    assert np.all(np.isfinite(curve.values)) and curve.values[-1] < curve.values[0]


@pytest.mark.parametrize("model", [NQM8, GLR6], ids=["nqm", "linreg"])
def test_cosine_tail_is_closed_form(model):
    """A cosine decay to 1000 steps, read at 10^12: the tail is the constant final rate's closed
    form (its noise floor); before 1000 it equals plain step-by-step propagation."""
    opt = SGD(Cosine(0.4, 1000, final_lr=0.05))
    ks = np.array([0, 500, 1000, 1500, 10**12])
    got = model.loss_curve(opt, 2.0, ks).values
    floor = model.noise_floor(SGD(0.05), 2.0)
    assert got[-1] == pytest.approx(floor, rel=1e-9)
    ref = model.loss_curve(SGD(PiecewiseConstant(tuple(range(1, 1001)), tuple(opt.lr.values(1001)))), 2.0,
                           ks[:4]).values
    np.testing.assert_allclose(got[:4], ref, rtol=1e-9)


def test_changing_schedule_past_the_documented_size_is_refused():
    big = NQM.power_law(100)
    with pytest.raises(ValueError, match=r"`steps` must be reached within 1e\+09 step-by-step updates .* got 1000000000 "
                                         r"updates x 100 modes up to step 1000000000"):
        big.loss_curve(SGD(Cosine(0.5, 10**9)), 1, np.array([0, 10**9]))
    with pytest.raises(ValueError, match=r"`steps` must be reached within 1e\+09 step-by-step updates"):
        NQM8.loss_curve(SGD(Exponential(0.5, gamma=0.999999)), 1, np.array([0, 2 * 10**9]))
    with pytest.raises(ValueError, match=r"`steps` must be reached within"):
        GLR6.loss_curve(Momentum(Cosine(0.1, 10**10), 0.9), 1, np.array([0, 10**10]))


def test_progress_bar_over_step_by_step_updates(capfd):
    NQM8.loss_curve(SGD(Cosine(0.4, 3000)), 1, np.array([0, 3000]), progress=True)
    assert "loss curve" in capfd.readouterr().err
    NQM8.loss_curve(SGD(Cosine(0.4, 3000)), 1, np.array([0, 3000]))  # default: no bar for small curves
    assert "loss curve" not in capfd.readouterr().err


def test_long_unstable_piece_is_searched_within_a_bound(monkeypatch):
    """lr = 2 on h_1 = 1 is marginal (|1 - 2| = 1): the loss never overflows, so a 10^12-step piece
    used to be stepped for ever; the search now stops at the documented bound with a reason."""
    monkeypatch.setattr(nqm, "_SCAN_LIMIT", 10**4)
    steps, info = NQM8.steps_to_target(SGD(PiecewiseConstant((10**12,), (2.0, 0.1))), 1, 1e-3, full_output=True)
    assert steps == math.inf
    assert info["reason"] == ("diverges: spectral radius >= 1 on a piece of 1000000000000 steps (searched step by "
                              "step for its first 10000)")
