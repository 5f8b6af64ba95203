"""Real small data sets that need no download, with label noise and duplicated examples.

* :func:`digits`: scikit-learn's handwritten digits (1797 real 8x8 images, 10 classes), shipped
  with scikit-learn.
* :func:`mnist1d`: MNIST-1D (Greydanus 2020), generated locally by the ``mnist1d`` package from its
  ten 1-D templates (length-40 signals; nothing is downloaded).
* :func:`load_mnist_npz` / :func:`load_cifar10`: files a user already has (Keras' ``mnist.npz``;
  the CIFAR-10 "python version" folder).  Nothing is downloaded.
* :func:`text_corpus`: the bytes of the Python standard library's own source files, as windows of
  next-token prediction for a language model (present wherever Python is).

Every split and corruption is drawn from an explicit seed.  Arguments are checked before any
work (see :mod:`deepmodels._validate`); ``device`` must be one this torch build can use.

References:
    * F. Faghri, D. Duvenaud, D. J. Fleet and J. Ba, "A Study of Gradient Variance in Deep
      Learning", 2020.
    * Zielinski et al., "Weak and Strong Gradient Directions: Explaining Memorization,
      Generalization, and Hardness of Examples at Scale", 2020.
"""

from __future__ import annotations

import os
import pickle
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from . import _validate as V
from ._validate import Boolean, Constraint, Device, Instance, Integer, Maybe, Real, validate

__all__ = ["Dataset", "digits", "mnist1d", "load_mnist_npz", "load_cifar10", "text_corpus", "corrupt_labels",
           "add_duplicates"]

MAX_SAMPLES = 10**6  # MNIST-1D examples generated in one call

_FRACTION = Real(0.0, 1.0, high_open=True)
_PATH = Instance(str, os.PathLike, what="a path (str or os.PathLike)")


@dataclass(repr=False)
class Dataset:
    """Train and test tensors: ``x`` float32 ``(n, ...)``, ``y`` int64 ``(n,)`` class labels, or
    ``(n, ...)`` labels per position (a sequence's next tokens: ``y[i, t]`` the class of output
    position t, in ``[0, n_classes)``).

    The loaders also record where the data came from: ``source`` (a sentence), ``seed`` (of the
    split and the corruptions), ``label_noise`` (share of training labels replaced),
    ``duplicates`` (share of the training set replaced by copies of a few examples) and ``attrs``
    (a dict of further facts, e.g. :func:`text_corpus`'s Python version and content hash).  The
    repr is a short summary (name, source, sizes, example shape and dtype, classes, corruptions,
    seed), never the tensors.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    name: str
    source: str = ""
    seed: int | None = None
    label_noise: float = 0.0
    duplicates: float = 0.0
    attrs: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.source, str):
            raise TypeError(f"`source` must be a str; got {type(self.source).__name__}.")
        if self.seed is not None:
            self.seed = V.check_int("seed", self.seed, low=0, high=V.MAX_SEED)
        self.label_noise = V.check_real("label_noise", self.label_noise, low=0.0, high=1.0)
        self.duplicates = V.check_real("duplicates", self.duplicates, low=0.0, high=1.0, high_open=True)
        xt = V.Tensor("float", min_ndim=1, nonempty=True)
        self.x_train = xt("x_train", self.x_train)
        self.x_test = V.Tensor("float", min_ndim=1)("x_test", self.x_test)
        y = V.Tensor("int", min_ndim=1, what="an int64 tensor of labels (n,) or (n, ...)")
        self.y_train = y("y_train", self.y_train)
        self.y_test = y("y_test", self.y_test)
        if not isinstance(self.attrs, dict):
            raise TypeError(f"`attrs` must be a dict; got {type(self.attrs).__name__}.")
        self.n_classes = V.check_int("n_classes", self.n_classes, low=1, high=V.MAX_WIDTH)
        if not isinstance(self.name, str):
            raise TypeError(f"`name` must be a str; got {type(self.name).__name__}.")
        for part in ("train", "test"):
            x, y = getattr(self, f"x_{part}"), getattr(self, f"y_{part}")
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"`y_{part}` must have {x.shape[0]} entries to match `x_{part}`; got {y.shape[0]}.")
            if y.numel():
                lo, hi = (int(v) for v in torch.aminmax(y))
                if lo < 0 or hi >= self.n_classes:
                    raise ValueError(f"`y_{part}` must hold class labels in [0, {self.n_classes}) (`n_classes`); got "
                                     f"{lo if lo < 0 else hi}.")
        if self.y_test.shape[1:] != self.y_train.shape[1:]:
            raise ValueError(f"`y_test` must have the label shape of `y_train` {tuple(self.y_train.shape[1:])}; got "
                             f"{tuple(self.y_test.shape[1:])}.")
        if self.x_test.shape[1:] != self.x_train.shape[1:]:
            raise ValueError(f"`x_test` must have the example shape of `x_train` {tuple(self.x_train.shape[1:])}; got "
                             f"{tuple(self.x_test.shape[1:])}.")
        devices = {t.device for t in (self.x_train, self.y_train, self.x_test, self.y_test)}
        if len(devices) != 1:
            raise ValueError(f"`x_train`, `y_train`, `x_test` and `y_test` must be on one device; got "
                             f"{sorted(map(str, devices))}.")

    @validate(device=Device())
    def to(self, device) -> "Dataset":
        """A copy with the four tensors on ``device`` (a ``torch.device`` or its name; one this torch build
        can use); ``n_classes`` and ``name`` are kept."""
        return dataclasses.replace(self, x_train=self.x_train.to(device), y_train=self.y_train.to(device),
                                   x_test=self.x_test.to(device), y_test=self.y_test.to(device))

    def __repr__(self) -> str:
        x = self.x_train
        rows = [("source", self.source or "(not recorded)"),
                ("n_train", f"{x.shape[0]}"), ("n_test", f"{self.x_test.shape[0]}"),
                ("x", f"(n, {', '.join(str(d) for d in x.shape[1:])}) {str(x.dtype).replace('torch.', '')} "
                      f"on {x.device}"),
                ("n_classes", f"{self.n_classes}")]
        if self.y_train.dim() > 1:
            rows.insert(-1, ("y", f"(n, {', '.join(str(d) for d in self.y_train.shape[1:])}) labels per position"))
        if self.attrs.get("sha256"):
            rows.append(("corpus", f"Python {self.attrs.get('python_version')}, sha256 {self.attrs['sha256'][:16]}"))
        if self.label_noise:
            rows.append(("label_noise", f"{self.label_noise:g} of the training labels replaced"))
        if self.duplicates:
            rows.append(("duplicates", f"{self.duplicates:g} of the training set replaced by copies of a few examples"))
        rows.append(("seed", "(not recorded)" if self.seed is None else f"{self.seed}"))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k + ':':{width + 1}s} {v}" for k, v in rows]
        return "\n".join([f"<deepmodels.data.Dataset {self.name!r}>", *lines])


def _check_fraction(name, value, high=1.0):
    v = float(value)
    if not (0.0 <= v < high):
        raise ValueError(f"`{name}` must be a float in [0, {high:g}); got {value!r}.")
    return v


def _split(x, y, test_fraction, seed):
    test_fraction = _check_fraction("test_fraction", test_fraction)
    rng = np.random.default_rng(seed)
    order = rng.permutation(x.shape[0])
    n_test = int(round(test_fraction * x.shape[0]))
    if n_test >= x.shape[0]:
        raise ValueError(f"`test_fraction` must leave at least one of the {x.shape[0]} examples for training; "
                         f"got {test_fraction:g}.")
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


class _Array(Constraint):
    """A 1-D array-like of integers (numpy, torch, list), returned as a numpy array."""

    def __init__(self, ndim: int | None = 1, kind: str = "iu", what: str = "a 1-D array of integer labels"):
        self.ndim, self.kind, self.what = ndim, kind, what

    def __call__(self, name, value):
        if isinstance(value, torch.Tensor):
            if value.device.type == "meta":
                raise TypeError(f"`{name}` must be {self.what}; got a tensor on the 'meta' device (no data).")
            value = value.detach().cpu().numpy()
        if isinstance(value, (str, bytes, dict, set)) or value is None:
            raise TypeError(f"`{name}` must be {self.what}; got {type(value).__name__}.")
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError):
            raise TypeError(f"`{name}` must be {self.what}; got {type(value).__name__}.") from None
        if arr.dtype.kind not in self.kind:
            raise TypeError(f"`{name}` must be {self.what}; got dtype {arr.dtype}.")
        if (self.ndim is not None and arr.ndim != self.ndim) or (self.ndim is None and arr.ndim < 1) or arr.shape[0] == 0:
            raise ValueError(f"`{name}` must be {self.what}, non-empty; got shape {arr.shape}.")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise ValueError(f"`{name}` must be finite (no NaN or inf); got {int(np.sum(~np.isfinite(arr)))} entries "
                             "that are not finite.")
        return arr

    def bad_values(self):
        bad = [None, "1", 1 + 1j, 3, np.zeros((0,) * max(self.ndim or 1, 1), dtype=np.int64),
               np.zeros(3, dtype=complex)]
        if "f" not in self.kind:
            bad.append(np.zeros(3))
        else:
            bad.append(np.full(3, np.nan))
        if self.ndim == 1:
            bad.append(np.zeros((2, 2), dtype=np.int64))
        return bad


@validate(y=_Array(), fraction=Real(0.0, 1.0), n_classes=Integer(2, V.MAX_WIDTH), seed=V.Seed(), redraw=Boolean())
def corrupt_labels(y, fraction: float, n_classes: int, seed: int = 0, *, redraw: bool = False):
    """Symmetric label noise on a ``fraction`` of the labels, chosen at random.

    By default each chosen label is replaced by a different class drawn uniformly (``fraction`` in
    [0, 1)).  ``redraw=True`` draws the chosen labels uniformly from all classes instead, as the
    coherent-gradients paper randomizes labels (Zielinski et al. 2020, Sec. 2): about 1 / n_classes
    of them keep their class, and ``fraction`` may be 1.  Returns ``(new_labels, corrupted_mask)``
    (numpy), the mask true where the label differs from the original.  ``y``: integer labels in
    ``[0, n_classes)``.
    """
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"`y` must hold class labels in [0, {n_classes}) (`n_classes`); got "
                         f"{y.min() if y.min() < 0 else y.max()}.")
    if not (0.0 <= fraction < 1.0 or (redraw and fraction == 1.0)):
        raise ValueError(f"`fraction` must be in [0, {'1]' if redraw else '1)'}; got {fraction!r}.")
    y = np.asarray(y).copy()
    rng = np.random.default_rng(seed)
    idx = rng.choice(y.size, size=int(round(fraction * y.size)), replace=False)
    if redraw:
        new = y.copy()
        new[idx] = rng.integers(0, n_classes, size=idx.size)
        return new, new != y
    y[idx] = (y[idx] + rng.integers(1, n_classes, size=idx.size)) % n_classes
    mask = np.zeros(y.size, dtype=bool)
    mask[idx] = True
    return y, mask


@validate(x=_Array(ndim=None, kind="fiu", what="an array of examples (n, ...)"), y=_Array(), share=_FRACTION,
          n_points=Integer(1, V.MAX_WIDTH), seed=V.Seed())
def add_duplicates(x, y, share: float, n_points: int = 5, seed: int = 0):
    """Replace a ``share`` of the examples by copies of ``n_points`` of them (Faghri et al. Sec. 4.3):
    the set keeps its size.  Returns ``(x, y)`` (numpy)."""
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"`y` must have {x.shape[0]} entries to match `x`; got {y.shape[0]}.")
    if n_points > x.shape[0]:
        raise ValueError(f"`n_points` must be at most the number of examples {x.shape[0]}; got {n_points}.")
    x, y = x.copy(), y.copy()
    n_dup = int(round(share * x.shape[0]))
    if n_dup == 0:
        return x, y
    if n_dup < n_points:
        raise ValueError(f"`duplicates` must make up at least {n_points} examples; got {n_dup}.")
    rng = np.random.default_rng(seed)
    src = rng.choice(x.shape[0], size=n_points, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(x.shape[0]), src), size=n_dup - n_points, replace=False)
    x[dst] = x[src[np.arange(dst.size) % n_points]]
    y[dst] = y[src[np.arange(dst.size) % n_points]]
    return x, y


def _finish(x, y, n_classes, name, *, test_fraction, seed, label_noise, duplicates, device, image_shape=None,
            source=""):
    x = (x - x.mean()) / x.std()
    x_tr, y_tr, x_te, y_te = _split(x, y, test_fraction, seed)
    if _check_fraction("label_noise", label_noise):
        y_tr, _ = corrupt_labels(y_tr, label_noise, n_classes, seed=seed + 1)
    if duplicates:
        x_tr, y_tr = add_duplicates(x_tr, y_tr, duplicates, seed=seed + 2)
    shape = (-1,) + tuple(image_shape) if image_shape else (-1,) + x.shape[1:]
    t = lambda a, dt: torch.as_tensor(np.ascontiguousarray(a), dtype=dt, device=device)  # noqa: E731
    return Dataset(t(x_tr.reshape(shape), torch.float32), t(y_tr, torch.int64), t(x_te.reshape(shape), torch.float32),
                   t(y_te, torch.int64), n_classes, name, source=source, seed=seed, label_noise=label_noise,
                   duplicates=duplicates)


_COMMON = dict(test_fraction=_FRACTION, seed=V.Seed(), label_noise=_FRACTION, duplicates=_FRACTION, device=Device())


@validate(flatten=Boolean(), **_COMMON)
def digits(*, test_fraction: float = 0.2, seed: int = 0, label_noise: float = 0.0, duplicates: float = 0.0,
           flatten: bool = True, device="cpu") -> Dataset:
    """scikit-learn's handwritten digits, standardised; ``flatten=False`` gives ``(n, 1, 8, 8)`` images.

    Args:
        test_fraction: share of the 1797 images held out (a seeded random split).
        seed: seed of the split and of the corruptions.
        label_noise: share of training labels replaced by another class.
        duplicates: share of the training set replaced by copies of 5 examples.
        flatten: 64-vectors (MLP) or 1x8x8 images (CNN).
        device: torch device of the tensors.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    return _finish(d.data.astype(np.float64), d.target.astype(np.int64), 10, "digits", test_fraction=test_fraction,
                   seed=seed, label_noise=label_noise, duplicates=duplicates, device=device,
                   image_shape=None if flatten else (1, 8, 8),
                   source="scikit-learn's handwritten digits (8x8 images), standardised, "
                          + ("flattened to 64-vectors" if flatten else "as 1x8x8 images"))


@validate(n_samples=Integer(20, MAX_SAMPLES), channels=Boolean(), **_COMMON)
def mnist1d(*, n_samples: int = 5000, test_fraction: float = 0.2, seed: int = 0, label_noise: float = 0.0,
            duplicates: float = 0.0, channels: bool = False, device="cpu") -> Dataset:
    """MNIST-1D generated here (the package's ``make_dataset``; its default transformations: padding,
    shear, translation, correlated and iid noise), ``(n, 40)`` signals or ``(n, 1, 40)`` with
    ``channels=True``.  ``n_samples`` in [20, 10**6].

    The generator seeds numpy's global random state; it is saved and restored around the call.
    """
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = n_samples, seed, 1.0
    state, pystate = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
        random.setstate(pystate)
    return _finish(d["x"].astype(np.float64), d["y"].astype(np.int64), 10, "mnist1d", test_fraction=test_fraction,
                   seed=seed, label_noise=label_noise, duplicates=duplicates, device=device,
                   image_shape=(1, 40) if channels else None,
                   source=f"MNIST-1D generated locally ({n_samples} length-40 signals), standardised")


def _stdlib_files(max_bytes: int):
    """The stdlib folder and the ``(name, size)`` of the files :func:`text_corpus` reads."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    names = sorted(f for f in os.listdir(root) if f.endswith(".py") and os.path.isfile(os.path.join(root, f)))
    chosen, total = [], 0
    for f in names:
        size = os.path.getsize(os.path.join(root, f))
        if total + size <= max_bytes:
            chosen.append((f, size))
            total += size
    return root, chosen


def _windows(text: bytes, context_length: int):
    """Non-overlapping next-token windows: ``x[i] = text[iT:(i+1)T]``, ``y[i] = text[iT+1:(i+1)T+1]``."""
    arr = np.frombuffer(text, dtype=np.uint8)
    n = max((arr.size - 1) // context_length, 0)
    x = arr[:n * context_length].reshape(n, context_length)
    y = arr[1:n * context_length + 1].reshape(n, context_length)
    return x, y


@validate(context_length=Integer(1, 2**16), max_bytes=Integer(1, 2**31 - 1), test_fraction=_FRACTION, seed=V.Seed(),
          device=Device())
def text_corpus(*, context_length: int = 64, max_bytes: int = 2**20, test_fraction: float = 0.1, seed: int = 0,
                device="cpu") -> Dataset:
    """A real text corpus that needs no download: the bytes of the Python standard library's own
    source files, as next-token windows for a byte-level language model (vocabulary 256).

    Files: the ``*.py`` files directly in the stdlib folder (``sysconfig.get_paths()["stdlib"]``; its
    test suite lies in subfolders and is left out), sorted by name; in that order each file is taken
    if it fits in what remains of ``max_bytes`` (the default 1 MiB takes about 50 of the 168 files
    of Python 3.11).
    The set does not depend on ``seed``.  The standard library differs between Python versions, so
    ``attrs`` records ``python_version`` and ``sha256``, a hash of the files' names and bytes, which
    the name also carries (``stdlib-py3.11-<8 hex digits>``).

    Split by file: the files are shuffled with ``numpy.random.default_rng(seed)``; the first ones
    whose bytes reach ``test_fraction`` of the total (at least one file, if ``test_fraction`` > 0)
    are the test set, the others the training set (no file is in both; ``attrs["files_train"]``
    and ``attrs["files_test"]`` list them).  Each split's files are joined in name order and cut
    into non-overlapping windows of ``context_length`` + 1 bytes, the last ones shared by the next
    window (a window may cross from one file into the next; the bytes after the last whole window
    are dropped).

    Returns:
        Dataset with ``x`` float32 ``(n, context_length)``: token ids 0..255, exact in float32, the
        dtype the probes take for ``x`` (:func:`deepmodels.models.transformer` takes them, and int64);
        ``y`` int64 ``(n, context_length)``: the next byte of every position, ``y[i, t] = x[i, t + 1]``
        within a window.  ``n_classes`` 256.  With the transformer's ``(B, 256, T)`` logits,
        ``F.cross_entropy(model(x), y)`` is the mean next-byte loss in nats (``deepmodels.train.train``'s
        default loss).

    Raises:
        ValueError: ``max_bytes`` admits fewer than two files, or a split too short for one window.
    """
    import hashlib
    import platform

    root, chosen = _stdlib_files(max_bytes)
    if len(chosen) < 2:
        need = sum(sorted(size for _, size in _stdlib_files(2**62)[1])[:2])
        raise ValueError(f"`max_bytes` must admit at least two files of {root} (the two smallest take {need} "
                         f"bytes); got {max_bytes}.")
    texts = {}
    digest = hashlib.sha256()
    for name, _ in chosen:
        with open(os.path.join(root, name), "rb") as f:
            texts[name] = f.read()
        digest.update(name.encode() + b"\0" + str(len(texts[name])).encode() + b"\0" + texts[name])
    sha = digest.hexdigest()
    names = [n for n, _ in chosen]
    total = sum(len(t) for t in texts.values())
    order = np.random.default_rng(seed).permutation(len(names))
    test, n_test_bytes = set(), 0
    for i in order:
        if test_fraction == 0 or n_test_bytes >= test_fraction * total:
            break
        test.add(names[i])
        n_test_bytes += len(texts[names[i]])
    if len(test) == len(names):
        raise ValueError(f"`test_fraction` must leave at least one of the {len(names)} files for training; got "
                         f"{test_fraction:g}.")
    parts = {}
    for part, files in (("train", [n for n in names if n not in test]), ("test", [n for n in names if n in test])):
        x, y = _windows(b"".join(texts[n] for n in files), context_length)
        if part == "train" and x.shape[0] == 0:
            raise ValueError(f"`context_length` must leave at least one window in the training files; got "
                             f"{context_length}.")
        parts[part] = (torch.as_tensor(x.astype(np.float32), device=device),
                       torch.as_tensor(y.astype(np.int64), device=device), files)
    version = platform.python_version()
    attrs = dict(python_version=version, stdlib=root, sha256=sha, n_bytes=total, n_bytes_test=n_test_bytes,
                 context_length=context_length, files_train=parts["train"][2], files_test=parts["test"][2])
    ver = ".".join(version.split(".")[:2])
    return Dataset(parts["train"][0], parts["train"][1], parts["test"][0], parts["test"][1], 256,
                   f"stdlib-py{ver}-{sha[:8]}",
                   source=f"bytes of {len(names)} *.py files of the Python {version} standard library "
                          f"({total} bytes), {len(test)} of them held out, windows of {context_length} + 1 bytes",
                   seed=seed, attrs=attrs)


_LOAD = dict(n_train=Maybe(Integer(1, V.MAX_WIDTH)), seed=V.Seed(), label_noise=_FRACTION, device=Device())


@validate(path=_PATH, **_LOAD)
def load_mnist_npz(path, *, n_train: int | None = None, seed: int = 0, label_noise: float = 0.0, device="cpu") -> Dataset:
    """MNIST from a Keras-style ``mnist.npz`` (keys x_train, y_train, x_test, y_test) the user has."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"`path` {path!r} does not exist (nothing is downloaded; point it at your mnist.npz).")
    with np.load(path) as f:
        xtr, ytr, xte, yte = (f[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    return _from_arrays(xtr, ytr, xte, yte, 10, "mnist", n_train, seed, label_noise, device, (1, 28, 28),
                        f"MNIST from {os.fspath(path)}, standardised")


@validate(folder=_PATH, **_LOAD)
def load_cifar10(folder, *, n_train: int | None = None, seed: int = 0, label_noise: float = 0.0, device="cpu") -> Dataset:
    """CIFAR-10 from the "python version" folder (data_batch_1..5, test_batch) the user has."""
    def batch(name):
        p = os.path.join(folder, name)
        if not os.path.exists(p):
            raise FileNotFoundError(f"`folder` {folder!r} lacks {name} (nothing is downloaded).")
        with open(p, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        return d[b"data"].reshape(-1, 3, 32, 32), np.asarray(d[b"labels"])

    parts = [batch(f"data_batch_{i}") for i in range(1, 6)]
    xte, yte = batch("test_batch")
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    return _from_arrays(xtr, ytr, xte, yte, 10, "cifar10", n_train, seed, label_noise, device, (3, 32, 32),
                        f"CIFAR-10 from {os.fspath(folder)}, standardised")


def _from_arrays(xtr, ytr, xte, yte, n_classes, name, n_train, seed, label_noise, device, shape, source=""):
    xtr = xtr.astype(np.float64) / 255.0
    xte = xte.astype(np.float64) / 255.0
    mean, std = xtr.mean(), xtr.std()
    if n_train is not None and n_train > xtr.shape[0]:
        raise ValueError(f"`n_train` must be at most the {xtr.shape[0]} training examples of {name}; got {n_train}.")
    if n_train is not None:
        idx = np.random.default_rng(seed).choice(xtr.shape[0], size=n_train, replace=False)
        xtr, ytr = xtr[idx], ytr[idx]
    if label_noise:
        ytr, _ = corrupt_labels(ytr, label_noise, n_classes, seed=seed + 1)
    t = lambda a, dt: torch.as_tensor(np.ascontiguousarray(a), dtype=dt, device=device)  # noqa: E731
    return Dataset(t(((xtr - mean) / std).reshape((-1,) + shape), torch.float32), t(ytr.astype(np.int64), torch.int64),
                   t(((xte - mean) / std).reshape((-1,) + shape), torch.float32), t(yte.astype(np.int64), torch.int64),
                   n_classes, name, source=source, seed=seed, label_noise=label_noise)
