"""Small networks for the probes; any ``torch.nn.Module`` works with them too.

All constructors take a ``seed`` (parameters are drawn from ``torch.Generator`` seeded with it) and
return float32 modules on CPU; call ``.to(device)`` for CUDA.  Widths are integers >= 1, and a model
whose parameters would not fit in the memory available is refused before it is built.

Layers have names (``nn.Sequential`` built from an ``OrderedDict``): the MLP's ``fc1, relu1, ...,
out``; the CNN's ``input, conv1, relu1, pool1, conv2, relu2, pool2, flatten, fc1, relu3, out``;
ResNet-8's ``input, stem, bn, relu, block1, block2, block3, pool, flatten, out``; random features'
``features, out``; the transformer's ``tok, pos, block1 ... blockL, ln_f, head`` (each block's
``ln1, attn.qkv, attn.out, ln2, mlp.fc, mlp.proj``).  They are the probes' ``layer`` coordinate and
the keys of ``state_dict()`` (``conv1.weight``, ``out.bias``, ``block1.attn.qkv.weight`` ...).

The image models (CNN, ResNet-8) begin with an ``input`` layer (no parameters) that says what input
they take: images ``(N, C, H, W)``, or flat rows ``(N, C*H*W)`` (e.g. ``deepmodels.data.digits()``,
flat by default), reshaped to images when the model knows H and W (the CNN always; ResNet-8 when
built with ``image_size``); any other shape is a ``ValueError`` naming the shapes it takes.
"""

from __future__ import annotations

import inspect
import math
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

BUILDERS = ("mlp", "cnn", "resnet8", "linear", "random_features", "transformer")
__all__ = [*BUILDERS, "Factory", "Restored"]  # the transformer's module classes are documented by transformer()


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


MAX_VOCAB = 2**24  # token ids up to this size are exact in float32 (the probes' input dtype)


def _under_vmap(x) -> bool:
    """True inside ``torch.func.vmap`` (a batched tensor), where checks of the values cannot branch."""
    wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return bool(wrapped(x)) if wrapped is not None else False


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (Vaswani et al. 2017, "Attention Is All You Need", Sec. 3.2)
    from two ``nn.Linear`` layers: ``qkv`` (d -> 3d, the queries, keys and values of every head)
    and ``out`` (d -> d); per head softmax(q k^T / sqrt(d_head) + M) v, M = -inf above the diagonal,
    written out (``F.scaled_dot_product_attention`` has no ``torch.func.vmap`` batching rule on CPU in
    torch 2.13: the per-example gradients would run example by example).  Input and output
    ``(B, T, d_model)``; position t attends to positions <= t only."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = int(n_heads)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, h):
        B, T, D = h.shape
        q, k, v = self.qkv(h).reshape(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, heads, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=h.device).triu(1)
        a = scores.masked_fill(future, -math.inf).softmax(-1) @ v  # (B, heads, T, d_head)
        return self.out(a.transpose(1, 2).reshape(B, T, D))

    def extra_repr(self):
        return f"n_heads={self.n_heads}"


class TransformerBlock(nn.Module):
    """A pre-LayerNorm transformer block (Radford et al. 2019, "Language Models are Unsupervised
    Multitask Learners", Sec. 2.3): h + attn(ln1(h)), then h + mlp(ln2(h)), the MLP
    ``fc`` (d -> d_mlp), GELU, ``proj`` (d_mlp -> d).  Input and output ``(B, T, d_model)``."""

    def __init__(self, d_model: int, n_heads: int, d_mlp: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([("fc", nn.Linear(d_model, d_mlp)), ("gelu", nn.GELU()),
                                              ("proj", nn.Linear(d_mlp, d_model))]))

    def forward(self, h):
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class Transformer(nn.Module):
    """A small GPT-style decoder (built by :func:`transformer`, which documents it): token ids
    ``(B, T)`` -> next-token logits ``(B, vocab_size, T)``.

    Layers: ``tok`` (nn.Embedding of tokens), ``pos`` (nn.Embedding of positions 0..T-1, looked up
    with a ``(B, T)`` index so that it is a per-example layer like ``tok``), ``block1 ...
    blockL`` (:class:`TransformerBlock`), ``ln_f`` (nn.LayerNorm), ``head`` (nn.Linear without bias;
    with tied weights ``head.weight`` *is* ``tok.weight``, one Parameter, listed once by
    ``named_parameters()`` as ``tok.weight``).
    """

    def __init__(self, vocab_size: int, context_length: int, d_model: int, n_layers: int, n_heads: int, d_mlp: int,
                 tie_weights: bool):
        super().__init__()
        self.vocab_size, self.context_length, self.tie_weights = int(vocab_size), int(context_length), bool(tie_weights)
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context_length, d_model)
        self.n_layers = int(n_layers)
        for i in range(1, n_layers + 1):
            self.add_module(f"block{i}", TransformerBlock(d_model, n_heads, d_mlp))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if self.tie_weights:
            self.head.weight = self.tok.weight

    def _check(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"`x` must be a tensor of token ids (B, T), int64 or float holding whole numbers; got "
                            f"{type(x).__name__}.")
        if not (x.dtype == torch.int64 or x.dtype.is_floating_point):
            raise TypeError(f"`x` must be a tensor of token ids (B, T), int64 or float holding whole numbers; got "
                            f"{str(x.dtype).replace('torch.', '')}.")
        if x.dim() != 2 or not 1 <= x.shape[1] <= self.context_length:
            raise ValueError(f"`x` must have shape (B, T) with 1 <= T <= {self.context_length} (the context length); "
                             f"got shape {tuple(x.shape)}.")
        if _under_vmap(x) or x.numel() == 0:
            return  # per-example calls of torch.func: the batch was checked by the caller's first forward pass
        if x.dtype.is_floating_point and not bool(torch.all(x == torch.round(x))):  # NaN and inf fail too
            raise ValueError("`x` must hold whole-number token ids; got values that are not whole numbers "
                             "(or not finite).")
        lo, hi = (int(v) for v in torch.aminmax(x.detach()))
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"`x` must hold token ids in [0, {self.vocab_size}) (the vocabulary size); got "
                             f"{lo if lo < 0 else hi}.")

    def forward(self, x):
        """Logits ``(B, vocab_size, T)``: entry ``[b, v, t]`` scores token v at position t + 1 given
        the tokens ``x[b, :t + 1]``; the class axis is second, as ``F.cross_entropy`` takes it."""
        self._check(x)
        ids = x if x.dtype == torch.int64 else x.long()
        B, T = ids.shape
        positions = torch.arange(T, device=ids.device).expand(B, T)
        h = self.tok(ids) + self.pos(positions)
        for i in range(1, self.n_layers + 1):
            h = getattr(self, f"block{i}")(h)
        return self.head(self.ln_f(h)).transpose(1, 2)

    def extra_repr(self):
        return (f"vocab_size={self.vocab_size}, context_length={self.context_length}, n_layers={self.n_layers}, "
                f"tie_weights={self.tie_weights}")


@validate(vocab_size=Integer(2, MAX_VOCAB), context_length=_WIDTH, d_model=_WIDTH, n_layers=Integer(0, 10**4),
          n_heads=_WIDTH, d_mlp=Maybe(_WIDTH), tie_weights=Boolean(), seed=_SEED)
def transformer(vocab_size: int = 256, context_length: int = 64, *, d_model: int = 64, n_layers: int = 2,
                n_heads: int = 4, d_mlp: int | None = None, tie_weights: bool = True, seed: int = 0) -> nn.Module:
    """A small GPT-style language model (Radford et al. 2019, "Language Models are Unsupervised
    Multitask Learners", Sec. 2.3, without dropout): token and learned position embeddings, then
    ``n_layers`` pre-LayerNorm blocks of causal self-attention (``n_heads`` heads) and an MLP
    (width ``d_mlp``, default ``4 * d_model``, GELU), a final LayerNorm and the unembedding ``head``.

    By default the unembedding is tied to the token embedding (Press and Wolf 2017, "Using the
    Output Embedding to Improve Language Models"): one Parameter ``tok.weight`` (V x d) serves both;
    ``tie_weights=False`` gives ``head.weight`` its own.  Every trainable parameter belongs to an
    nn.Embedding, nn.LayerNorm or nn.Linear.  Initialisation as GPT-2: weights N(0, 0.02^2), the
    residual projections (``attn.out``, ``mlp.proj``) N(0, 0.02^2 / (2 n_layers)), biases 0,
    LayerNorms 1 and 0.

    Input: token ids ``(B, T)``, ``1 <= T <= context_length``, ids in ``[0, vocab_size)``; int64, or
    floating tensors holding whole numbers (the dtype the probes take for ``x``, as
    :func:`deepmodels.data.text_corpus` gives them; exact in float32 up to 2**24, the largest
    ``vocab_size``).  Another type, shape or value is a ``TypeError`` / ``ValueError`` naming ``x``.

    Output: logits ``(B, vocab_size, T)`` (the class axis second, as ``torch.nn.functional.cross_entropy``
    takes them with targets ``(B, T)``, so ``F.cross_entropy(model(x), y)`` is the mean next-token
    loss and the probes and :func:`deepmodels.train.train` work unchanged); ``model(x).transpose(1, 2)``
    is the usual ``(B, T, vocab_size)``.  Per example (one sequence) the loss is the mean over its
    T positions.
    """
    if d_model % n_heads:
        raise ValueError(f"`n_heads` must divide `d_model` ({d_model}); got {n_heads}.")
    d_mlp = 4 * d_model if d_mlp is None else d_mlp
    n_params = (vocab_size * d_model * (1 if tie_weights else 2) + context_length * d_model + 2 * d_model
                + n_layers * (4 * d_model * d_model + 2 * d_model * d_mlp + 9 * d_model + d_mlp))
    _check_size(n_params, {"vocab_size": vocab_size, "context_length": context_length, "d_model": d_model,
                           "n_layers": n_layers, "d_mlp": d_mlp})

    def build():
        model = Transformer(vocab_size, context_length, d_model, n_layers, n_heads, d_mlp, tie_weights)
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln" in name or name.startswith("ln_"):
                continue  # biases and LayerNorms keep their (0, 1) initialisation
            residual = name.endswith(("attn.out.weight", "mlp.proj.weight"))
            nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layers) if residual else 0.02)
        return model

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
