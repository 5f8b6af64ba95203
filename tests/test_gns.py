"""deepmodels.gns: the two-batch noise scale of a training step against an independent slow
computation (one backward pass per micro-batch, gradients flattened in float64), its unbiasedness on
a model whose true |G|^2 and tr Sigma are known, the EMA's bias correction and the coverage of its
standard error, resume, bfloat16 autocast, bad input and non-finite gradients."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepmodels import gns as G
from toymodels import schema


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).to(dtype)


def _batches(M, b, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, b, 6, generator=g, dtype=dtype), torch.randint(0, 3, (M, b), generator=g)


def _accumulate(model, x, y, *, accumulation="mean"):
    M = x.shape[0]
    for m in range(M):
        loss = F.cross_entropy(model(x[m]), y[m])
        (loss / M if accumulation == "mean" else loss).backward()


def _reference(model, x, y):
    """Slow, independent: each micro-batch's gradient by its own backward pass, in float64."""
    gs = []
    for m in range(x.shape[0]):
        model.zero_grad()
        F.cross_entropy(model(x[m]), y[m]).backward()
        gs.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double())
    model.zero_grad()
    gs = torch.stack(gs).numpy()
    n, b = x.shape[0], x.shape[1]
    a = (gs**2).sum(1)
    big = (gs.mean(0) ** 2).sum()
    tr = (a.mean() - big) / (1 / b - 1 / (b * n))
    g2 = (b * n * big - b * a.mean()) / (b * n - b)
    return {"grad_norm_sq_micro": a.mean(), "grad_norm_sq_step": big, "trace_cov": tr, "grad_norm_sq_unbiased": g2,
            "noise_scale_unbiased": tr / g2}


@pytest.mark.parametrize("accumulation", ["mean", "sum"])
def test_step_matches_slow_reference(accumulation):
    x, y = _batches(4, 8)
    model = _mlp()
    ref = _reference(model, x, y)
    with G.GradientNoiseScale(model, accumulation=accumulation) as gns:
        _accumulate(model, x, y, accumulation=accumulation)
        est = gns.update(micro_batch_size=8)
    assert (est.micro_batch_size, est.n_micro_batches, est.batch_size, est.step) == (8, 4, 32, 0)
    for k, v in ref.items():
        assert getattr(est, k) == pytest.approx(v, rel=2e-5), k
    assert est.diverged is None
    schema.validate(est.to_dataset())
