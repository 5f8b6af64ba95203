"""PyTorch probes that measure, on real networks, the statistics the toy models predict.

CPU by default; every entry point takes a ``device`` argument ("cuda" when
``torch.cuda.is_available()``).  Results are xarray objects with the names of
:mod:`toymodels.schema` and ``source="measurement"``, so they overlay the toy models' curves.

Every public function refuses bad input before doing any work, with a message naming the argument
(``"`x` must be a float32 tensor (the model's dtype); got float64."``); the policy (float64 input
to a float32 model is refused, not converted; unavailable devices; memory estimates; divergence
reported as ``inf`` with a reason) is in :mod:`deepmodels._validate`.
"""

from . import bridge, callbacks, cluster, data, gns, hessian, models, optim, pergrad, predict, probes, spectra, steps, train

__all__ = ["bridge", "callbacks", "cluster", "data", "gns", "hessian", "models", "optim", "pergrad", "predict", "probes", "spectra", "steps",
           "train"]
