"""Studies: one module per figure, each reproducing a seed paper's figure with theory beside
measurement.  ``python -m studies list`` shows them; ``python -m studies run NAME`` runs one.

A study module ``NAME`` defines ``run(*, scale="default", out="results", progress=True, ...)``
(scales ``"quick"``, ``"default"``, ``"full"``), which computes, writes ``<out>/NAME.nc`` with
:func:`studies._io.save` and the figure ``<out>/NAME.png``, and returns the results;
``plot(result, path)``, which draws the figure from those results (also from a saved file:
``python -m studies plot FILE.nc``); and ``main(argv)`` on :func:`studies._io.parser`.  Adding a
study is writing those three functions and one line in :data:`STUDIES`.
"""

STUDIES = {
    "batch_size_scaling": "NQM steps to target vs batch size for SGD, preconditioning, momentum, EMA and "
                          "schedules, with the lower bound and the tuned learning rate",
    "optimizer_zoo": "Zhang et al. 2019's question for every optimizer family: tuned NQM steps vs batch size "
                     "(SGD, preconditioning, momentum, Nesterov, EMA, accelerated SGD, Polyak, schedule-free) with "
                     "the lower bound and the tuned hyper-parameters",
    "rate_vs_floor": "SGD along a high- and a low-curvature NQM direction: faster convergence, higher noise floor",
    "interpolation": "online NQM vs linear regression (label noise or not) and finite data: SGD vs Kaczmarz",
    "rf_variance": "random features: variance of SG-B, SG-2B, SVRG and GC vs overparametrization and duplicates",
    "nqm_vs_cnn": "a CNN's (or MLP's) measured steps vs batch size beside an NQM fitted to it; variance along training",
    "gradient_tails": "heavy tails vs Gaussianity of gradients (Xie et al. Tables 1, 4) and covariance spectra, "
                      "toy models and networks",
    "network_variance": "gradient variance along training of an MLP and a CNN for SG-B, SG-2B, SVRG and gradient "
                        "clustering",
    "hessian_vs_covariance": "Rayleigh quotients v^T H v vs v^T C v of an MLP and a CNN: is the noise covariance "
                             "the Hessian?",
    "theory_vs_practice": "a network's critical batch size predicted from one small-batch run (noise scale, "
                          "NQMs along training) vs measured with a bootstrap interval; B_crit along training; "
                          "batch-size warmup",
    "coherent_gradients": "memorization of corrupt labels under SGD, RA3, RM3, M3 and winsorization",
    "scaling_laws": "power-law random features, exact: risk curves, the compute-optimal frontier, and B_crit vs "
                    "data and model size",
    "transformer_noise": "a transformer's gradient noise scale along training: per example, gradient accumulation "
                         "and DDP on the same examples",
    "deep_bootstrap": "the deep bootstrap: test risk of SGD on a fixed training set vs fresh samples, exact in linear "
                      "regression for several n, measured on an MLP with MNIST-1D",
}
"""Every study: its module name under :mod:`studies` -> one line on what it shows (``python -m studies
list`` prints them, in this order)."""
