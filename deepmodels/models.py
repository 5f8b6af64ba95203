"""Small networks for the probes; any ``torch.nn.Module`` works with them too.

All constructors take a ``seed`` (parameters are drawn from ``torch.Generator`` seeded with it) and
return float32 modules on CPU; call ``.to(device)`` for CUDA.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["mlp", "cnn", "linear", "random_features"]


def _seeded(seed: int, build):
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative int; got {seed!r}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def mlp(in_features: int, out_features: int, hidden=(128, 128), *, seed: int = 0) -> nn.Sequential:
    """Fully connected ReLU network: in -> hidden... -> out."""
    def build():
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, out_features))
        return nn.Sequential(*layers)

    return _seeded(seed, build)


def cnn(in_channels: int = 1, out_features: int = 10, image_size: int = 8, *, width: int = 16, seed: int = 0) -> nn.Sequential:
    """LeNet-style: two 3x3 conv + ReLU + 2x2 max-pool blocks, then two Linear layers."""
    def build():
        s = image_size // 4
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * s * s, 64), nn.ReLU(), nn.Linear(64, out_features),
        )

    return _seeded(seed, build)


def linear(in_features: int, out_features: int = 1, *, bias: bool = False, seed: int = 0) -> nn.Linear:
    """A linear model (linear regression with a squared loss: compare with :mod:`toymodels.linreg`)."""
    return _seeded(seed, lambda: nn.Linear(in_features, out_features, bias=bias))


class _Frozen(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x):
        return torch.relu(x @ self.weight)


def random_features(in_features: int, hidden: int, out_features: int = 1, *, seed: int = 0) -> nn.Sequential:
    """Frozen random ReLU features (unit-norm columns, a buffer, not a parameter) and a trained
    Linear read-out without bias, as in Faghri et al. Sec. 4.2 (:class:`toymodels.features.RandomFeatures`)."""
    def build():
        w = torch.randn(in_features, hidden)
        return nn.Sequential(_Frozen(w / w.norm(dim=0, keepdim=True)), nn.Linear(hidden, out_features, bias=False))

    return _seeded(seed, build)
