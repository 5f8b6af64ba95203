"""Schedule-free SGD on the NQM stepped in two states per mode, with an early exit at the target.

Per mode, with y = (1 - beta) z + beta x the gradient point, schedule-free SGD (Defazio et al. 2024,
Section 2) is

    z' = p z + r x - lr eps,   p = 1 - lr (h + wd)(1 - beta),   r = -lr (h + wd) beta,
    x' = (1 - c_k) x + c_k z',  c_k = 1 / (k + 2) (uniform averaging) or 1 (none),

so the second moments (zz, zx, xx) step as (g = q lr^2, the noise of z')

    E[z' x] = p zx + r xx,   zz' = p^2 zz + 2 p r zx + r^2 xx + g,
    zx' = (1 - c) E[z' x] + c zz',   xx' = (1 - c)^2 xx + 2 c (1 - c) E[z' x] + c^2 zz',

three numbers per mode instead of the nine of the general (y, z, x) system; y is not a state since it
is a fixed combination of z and x.  The weight c_k = 1 / (k + 2) enters the gradient point through
x = (z_0 + ... + z_k) / (k + 1): with the running sum in place of x the system keeps a 1 / (k + 1), so
unlike the Polyak average there is no constant system and the loss is computed one update at a time.

References:
    A. Defazio, X. A. Yang, H. Mehta, K. Mishchenko, A. Khaled, A. Cutkosky, "The Road Less
    Scheduled", NeurIPS 2024, Section 2, equations (1)-(3).
"""

from __future__ import annotations

import math

from numba import njit


@njit(cache=True, nogil=True)
def _scan(p, r, g, h, zz, zx, xx, k0, k1, target, uniform):
    """Step the moments ``zz, zx, xx`` ((d,) each, at step k0, updated in place) to step k1 and return
    ``(k, loss)``: k the first step in [k0, k1] with loss <= target (the moments are then at k), -1
    if none (the loss at k1), or -2 if the loss overflowed."""
    d = p.shape[0]
    k = k0
    while True:
        loss = 0.0
        for i in range(d):
            loss += h[i] * xx[i]
        loss *= 0.5
        if not math.isfinite(loss):
            return -2, math.inf
        if loss <= target:
            return k, loss
        if k == k1:
            return -1, loss
        c = 1.0 / (k + 2.0) if uniform else 1.0
        for i in range(d):
            zxp = p[i] * zx[i] + r[i] * xx[i]
            zzn = p[i] * p[i] * zz[i] + 2.0 * p[i] * r[i] * zx[i] + r[i] * r[i] * xx[i] + g[i]
            xx[i] = (1.0 - c) * (1.0 - c) * xx[i] + 2.0 * c * (1.0 - c) * zxp + c * c * zzn
            zx[i] = (1.0 - c) * zxp + c * zzn
            zz[i] = zzn
        k += 1
