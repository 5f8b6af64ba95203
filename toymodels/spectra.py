"""Eigen-spectra used by the toy models.

The NQM of Grosse's lecture (CSC 2541 Lecture 7, "Noisy Quadratic Model") takes a scale-free
Hessian h_i = 1/i and gradient covariance C = H.  :func:`power_law` generalises that to h_i = scale * i^-p.

References:
    R. Grosse, "CSC 2541: Neural Net Training Dynamics", Lecture 7 "Stochasticity and Parallelism",
    University of Toronto, Winter 2022.
"""

from __future__ import annotations

import numpy as np

from ._validate import Integer, Real, check_bytes, validate

__all__ = ["power_law"]


@validate(dim=Integer(1, 2**40), power=Real(0.0, 50.0), scale=Real(0.0, np.inf, low_open=True, high_open=True))
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
    check_bytes("dim", 8.0 * dim, what=f"{dim} eigenvalues")
    return scale * np.arange(1, dim + 1, dtype=np.float64) ** (-power)
