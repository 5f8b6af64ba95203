"""Small networks for the probes; any ``torch.nn.Module`` works with them too.

All constructors take a ``seed`` (parameters are drawn from ``torch.Generator`` seeded with it) and
return float32 modules on CPU; call ``.to(device)`` for CUDA.  Widths are integers >= 1, and a model
whose parameters would not fit in the memory available is refused before it is built.

Layers have names (``nn.Sequential`` built from an ``OrderedDict``): the MLP's ``fc1, relu1, ...,
out``; the CNN's ``input, conv1, relu1, pool1, conv2, relu2, pool2, flatten, fc1, relu3, out``;
ResNet-8's ``input, stem, bn, relu, block1, block2, block3, pool, flatten, out``; random features'
``features, out``.  They are the probes' ``layer`` coordinate and the keys of ``state_dict()``
(``conv1.weight``, ``out.bias`` ...).

The image models (CNN, ResNet-8) begin with an ``input`` layer (no parameters) that says what input
they take: images ``(N, C, H, W)``, or flat rows ``(N, C*H*W)`` (e.g. ``deepmodels.data.digits()``,
flat by default), reshaped to images when the model knows H and W (the CNN always; ResNet-8 when
built with ``image_size``); any other shape is a ``ValueError`` naming the shapes it takes.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict

import torch
from torch import nn

from . import _validate as V
from ._validate import Boolean, Integer, Maybe, Options, SequenceOf, validate

_WIDTH = Integer(1, V.MAX_WIDTH)
_SEED = V.Seed()


def _check_size(n_params: int, sizes: dict):
    """Refuse a model of ``n_params`` float32 parameters that cannot fit, naming its widest argument."""
    name = max(sizes, key=lambda k: sizes[k])
    widths = ", ".join(f"{k}={v}" for k, v in sizes.items())
    V.check_bytes(name, 4.0 * n_params, f"the {n_params:.3g} parameters of this model ({widths})")

BUILDERS = ("mlp", "cnn", "resnet8", "linear", "random_features")
__all__ = [*BUILDERS, "Factory", "Restored"]


def _seeded(seed: int, build):
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative int; got {seed!r}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@validate(in_features=_WIDTH, out_features=_WIDTH, hidden=SequenceOf(_WIDTH, min_len=0, max_len=1000,
                                                                     what="hidden widths, each >= 1"), seed=_SEED)
def mlp(in_features: int, out_features: int, hidden=(128, 128), *, seed: int = 0) -> nn.Sequential:
    """Fully connected ReLU network: in -> hidden... -> out (``hidden`` a list of widths, maybe empty);
    layers ``fc1, relu1, fc2, relu2, ..., out``.  Input ``(N, in_features)``."""
    widths = [in_features, *hidden, out_features]
    _check_size(sum((a + 1) * b for a, b in zip(widths, widths[1:])),
                {"in_features": in_features, "hidden": max(hidden, default=0), "out_features": out_features})

    def build():
        layers, width = [], in_features
        for i, h in enumerate(hidden, start=1):
            layers += [(f"fc{i}", nn.Linear(width, h)), (f"relu{i}", nn.ReLU())]
            width = h
        layers.append(("out", nn.Linear(width, out_features)))
        return nn.Sequential(OrderedDict(layers))

    return _seeded(seed, build)


@validate(in_channels=_WIDTH, out_features=_WIDTH, image_size=Integer(4, 2**16), width=_WIDTH, seed=_SEED)
def cnn(in_channels: int = 1, out_features: int = 10, image_size: int = 8, *, width: int = 16, seed: int = 0) -> nn.Sequential:
    """LeNet-style: two 3x3 conv + ReLU + 2x2 max-pool blocks, then two Linear layers (``image_size``
    >= 4, the side of square inputs).

    Input: images ``(N, in_channels, image_size, image_size)`` or flat rows
    ``(N, in_channels * image_size**2)`` (reshaped); another shape is a ``ValueError`` naming these.
    Layers ``input, conv1, relu1, pool1, conv2, relu2, pool2, flatten, fc1, relu3, out``."""
    s = image_size // 4
    _check_size(9 * in_channels * width + 18 * width * width + 2 * width * s * s * 64 + 64 * out_features,
                {"in_channels": in_channels, "width": width, "image_size": image_size, "out_features": out_features})

    def build():
        s = image_size // 4
        return nn.Sequential(OrderedDict([
            ("input", _ImageInput(in_channels, image_size, image_size, "CNN")),
            ("conv1", nn.Conv2d(in_channels, width, 3, padding=1)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(width, 2 * width, 3, padding=1)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()), ("fc1", nn.Linear(2 * width * s * s, 64)), ("relu3", nn.ReLU()),
            ("out", nn.Linear(64, out_features)),
        ]))

    return _seeded(seed, build)


class _ImageInput(nn.Module):
    """The first layer of an image model: passes images ``(N, C, H, W)`` on, reshapes flat rows
    ``(N, C*H*W)`` to them, and refuses any other shape with a ``ValueError`` that names the
    shapes the model takes (instead of torch's conv2d or matmul shape error further in).

    ``height`` and ``width`` None: any image size (a model with global pooling), flat rows refused.
    No parameters: it leaves ``state_dict()`` and the probes' layers as they are.
    """

    def __init__(self, channels: int, height: int | None, width: int | None, model: str = "model"):
        super().__init__()
        self.channels, self.height, self.width, self.model = int(channels), height, width, str(model)

    def _expected(self) -> str:
        c = self.channels
        if self.height is None:
            return (f"(N, {c}, H, W) for this {self.model} (any H, W; for flat rows (N, {c}*H*W) build it with "
                    f"image_size=H, square images)")
        return f"(N, {c}, {self.height}, {self.width}) or (N, {c * self.height * self.width}) for this {self.model}"

    def forward(self, x):
        shape = tuple(x.shape)
        sized = self.height is None or shape[2:] == (self.height, self.width)
        if x.dim() == 4 and shape[1] == self.channels and sized:
            return x
        if x.dim() == 2 and self.height is not None and shape[1] == self.channels * self.height * self.width:
            return x.reshape(shape[0], self.channels, self.height, self.width)
        raise ValueError(f"`x` must have shape {self._expected()}; got {shape}.")

    def extra_repr(self):
        return f"channels={self.channels}, height={self.height}, width={self.width}"


class _Block(nn.Module):
    """Basic residual block: two 3x3 convolutions (optionally with batch norm), a 1x1 projection when
    the shape changes."""

    def __init__(self, cin, cout, stride, batch_norm):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=not batch_norm)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=not batch_norm)
        self.bn2 = norm(cout)
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride=stride)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.skip(x))


@validate(in_channels=_WIDTH, out_features=_WIDTH, width=_WIDTH, batch_norm=Boolean(), seed=_SEED,
          image_size=Maybe(Integer(1, 2**16)))
def resnet8(in_channels: int = 3, out_features: int = 10, *, width: int = 16, batch_norm: bool = True,
            seed: int = 0, image_size: int | None = None) -> nn.Sequential:
    """ResNet-8 (He et al. 2016's CIFAR family with one block per stage): a 3x3 stem and three
    residual blocks of width w, 2w, 4w (strides 1, 2, 2), global average pooling, a Linear head.
    ``batch_norm=False`` (Faghri et al.'s CIFAR-10 model) keeps every layer per-example separable,
    so the hook fast path applies; with batch norm, measure in ``eval()`` mode.

    Input: images ``(N, in_channels, H, W)`` of any size (global pooling); with ``image_size``
    (the side of square images) only ``(N, in_channels, image_size, image_size)`` or flat rows
    ``(N, in_channels * image_size**2)`` (reshaped).  Without it flat input is refused (the model
    cannot know H and W): a ``ValueError`` naming the shapes it takes.
    Layers ``input, stem, bn, relu, block1, block2, block3, pool, flatten, out`` (each block's
    ``conv1, bn1, conv2, bn2, skip``; ``bn`` layers are identities without batch norm)."""
    _check_size(9 * in_channels * width + 9 * 43 * width * width + 4 * width * out_features,
                {"in_channels": in_channels, "width": width, "out_features": out_features})

    def build():
        norm = nn.BatchNorm2d(width) if batch_norm else nn.Identity()
        return nn.Sequential(OrderedDict([
            ("input", _ImageInput(in_channels, image_size, image_size, "ResNet-8")),
            ("stem", nn.Conv2d(in_channels, width, 3, padding=1, bias=not batch_norm)), ("bn", norm),
            ("relu", nn.ReLU()),
            ("block1", _Block(width, width, 1, batch_norm)), ("block2", _Block(width, 2 * width, 2, batch_norm)),
            ("block3", _Block(2 * width, 4 * width, 2, batch_norm)),
            ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("out", nn.Linear(4 * width, out_features)),
        ]))

    return _seeded(seed, build)


@validate(in_features=_WIDTH, out_features=_WIDTH, bias=Boolean(), seed=_SEED)
def linear(in_features: int, out_features: int = 1, *, bias: bool = False, seed: int = 0) -> nn.Linear:
    """A linear model (linear regression with a squared loss: compare with :mod:`toymodels.linreg`)."""
    _check_size((in_features + 1) * out_features, {"in_features": in_features, "out_features": out_features})
    return _seeded(seed, lambda: nn.Linear(in_features, out_features, bias=bias))


class _Frozen(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x):
        return torch.relu(x @ self.weight)


@validate(in_features=_WIDTH, hidden=_WIDTH, out_features=_WIDTH, seed=_SEED)
def random_features(in_features: int, hidden: int, out_features: int = 1, *, seed: int = 0) -> nn.Sequential:
    """Frozen random ReLU features (unit-norm columns, a buffer, not a parameter) and a trained
    Linear read-out without bias, as in Faghri et al. Sec. 4.2 (:class:`toymodels.features.RandomFeatures`);
    layers ``features, out``."""
    _check_size(2 * in_features * hidden + hidden * out_features,
                {"in_features": in_features, "hidden": hidden, "out_features": out_features})

    def build():
        w = torch.randn(in_features, hidden)
        return nn.Sequential(OrderedDict([("features", _Frozen(w / w.norm(dim=0, keepdim=True))),
                                          ("out", nn.Linear(hidden, out_features, bias=False))]))

    return _seeded(seed, build)


class Factory:
    """A picklable ``seed -> model`` callable (for sweeps whose runs go to other processes):
    ``Factory("mlp", 64, 10, (32,))(seed)`` is ``mlp(64, 10, (32,), seed=seed)``."""

    @validate(name=Options(*BUILDERS))
    def __init__(self, name: str, *args, **kwargs):
        if "seed" in kwargs:
            raise TypeError("`seed` must not be given to Factory: it is the argument of each call.")
        try:
            inspect.signature(globals()[name]).bind(*args, seed=0, **kwargs)
        except TypeError as err:
            raise TypeError(f"`args` must fit {name}(): {err}") from None
        self.name, self.args, self.kwargs = name, args, kwargs

    @validate(seed=_SEED)
    def __call__(self, seed: int) -> nn.Module:
        return globals()[self.name](*self.args, seed=seed, **self.kwargs)

    def __repr__(self):
        return f"Factory({self.name!r}, *{self.args}, **{self.kwargs})"


class _StateDict(V.Constraint):
    """A module's ``state_dict()``: a non-empty dict of str -> tensor."""

    def __call__(self, name, value):
        if not isinstance(value, dict) or not value or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()):
            raise TypeError(f"`{name}` must be a module's state_dict() (a non-empty dict of str -> tensor); got "
                            f"{type(value).__name__}.")
        return value

    def bad_values(self):
        return [None, {}, {"w": 1.0}, [torch.zeros(1)]]


class Restored:
    """A picklable ``seed -> model`` callable that starts every model from saved parameters: the
    architecture of ``factory(seed)`` with the parameters ``state_dict`` (e.g. a checkpoint of a
    reference run, for runs branching from it; the seed then only drives the batches).

    Args:
        factory: ``seed -> nn.Module`` (e.g. a :class:`Factory`), whose models take ``state_dict``.
        state_dict: the parameters (copied to CPU).
        label: a readable name for the state (it appears in the repr, with a hash of the tensors).
    """

    @validate(factory=V.Function("a callable seed -> nn.Module"), state_dict=_StateDict())
    def __init__(self, factory, state_dict: dict, *, label: str = ""):
        self.factory = factory
        self.state_dict = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
        self.label = str(label)

    @validate(seed=_SEED)
    def __call__(self, seed: int) -> nn.Module:
        model = self.factory(seed)
        model.load_state_dict(self.state_dict)
        return model

    def __repr__(self):  # names the run files of a sweep: the same in every process
        return f"Restored({self.factory!r}, {self.label or 'state'} {V.state_hash(self.state_dict)[:12]})"
