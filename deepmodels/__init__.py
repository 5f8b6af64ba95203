"""PyTorch probes that measure, on real networks, the statistics the toy models predict.

CPU by default; every entry point takes a ``device`` argument ("cuda" when
``torch.cuda.is_available()``).  Results are xarray objects with the names of
:mod:`toymodels.schema` and ``source="measurement"``, so they overlay the toy models' curves.
"""

from . import bridge, cluster, data, hessian, models, optim, pergrad, probes, spectra, steps, train

__all__ = ["bridge", "cluster", "data", "hessian", "models", "optim", "pergrad", "probes", "spectra", "steps", "train"]
