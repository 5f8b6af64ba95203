"""Eigen-spectra used by the toy models.

The lecture's NQM (seed 004, "Noisy Quadratic Model") takes a scale-free Hessian h_i = 1/i and
gradient covariance C = H.  :func:`power_law` generalises that to h_i = scale * i^-p.
"""

from __future__ import annotations

import numpy as np

from ._validate import check_int, check_real

__all__ = ["power_law"]


def power_law(dim: int, power: float = 1.0, *, scale: float = 1.0) -> np.ndarray:
    """Eigenvalues ``scale * i**-power`` for i = 1..dim.

    Args:
        dim: number of eigen-directions, >= 1.
        power: decay exponent p >= 0 (p = 0 gives a flat spectrum).
        scale: the top eigenvalue, > 0.

    Returns:
        float64 array of shape ``(dim,)``, non-increasing.

    Example:
        >>> power_law(3)
        array([1.        , 0.5       , 0.33333333])
    """
    dim = check_int("dim", dim, low=1)
    power = check_real("power", power, low=0.0, high=50.0)
    scale = check_real("scale", scale, low=0.0, high=np.inf, low_open=True, high_open=True)
    return scale * np.arange(1, dim + 1, dtype=np.float64) ** (-power)
