"""deepmodels.models: named layers (state_dict keys, the probes' `layer` coordinate) and the image
models' input: images or flat rows, any other shape a ValueError naming the shapes they take."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from deepmodels import data, models, probes, steps
from deepmodels.train import train


@pytest.fixture(scope="module")
def digits():
    return data.digits(seed=0)  # flat (n, 64), the default


def test_layers_have_names():
    assert [k for k, _ in models.mlp(64, 10, (16, 8)).named_children()] == ["fc1", "relu1", "fc2", "relu2", "out"]
    assert list(models.mlp(64, 10, ()).state_dict()) == ["out.weight", "out.bias"]
    cnn = models.cnn(1, 10, 8, width=4)
    assert isinstance(cnn, torch.nn.Sequential)
    assert [k for k, _ in cnn.named_children()] == ["input", "conv1", "relu1", "pool1", "conv2", "relu2", "pool2",
                                                   "flatten", "fc1", "relu3", "out"]
    assert list(cnn.state_dict()) == [f"{n}.{p}" for n in ("conv1", "conv2", "fc1", "out") for p in ("weight", "bias")]
    res = models.resnet8(1, 10, width=2, batch_norm=False)
    assert [k for k, _ in res.named_children()] == ["input", "stem", "bn", "relu", "block1", "block2", "block3", "pool",
                                                   "flatten", "out"]
    assert "block2.skip.weight" in res.state_dict() and "out.bias" in res.state_dict()
    assert "bn.running_mean" in models.resnet8(1, 10, width=2).state_dict()
    assert list(models.random_features(64, 8, 3).state_dict()) == ["features.weight", "out.weight"]


def test_probe_layers_are_the_names(digits):
    img = data.digits(seed=0, flatten=False)
    ds = probes.gradient_stats(models.cnn(1, 10, 8, width=4), F.cross_entropy, img.x_train[:32], img.y_train[:32])
    assert list(ds.layer.values) == ["conv1", "conv2", "fc1", "out", "total"]
    ds = probes.gradient_stats(models.mlp(64, 10, (16,)), F.cross_entropy, digits.x_train[:32], digits.y_train[:32])
    assert list(ds.layer.values) == ["fc1", "out", "total"]


def test_cnn_takes_images_and_flat_rows(digits):
    img = data.digits(seed=0, flatten=False)
    model = models.cnn(1, 10, 8, width=4, seed=1)
    torch.testing.assert_close(model(digits.x_train[:16]), model(img.x_train[:16]), rtol=0, atol=0)
    # the probes and training take the flat digits as they come (hooks and torch.func alike)
    for method in ("hooks", "func"):
        flat = probes.gradient_stats(model, F.cross_entropy, digits.x_train[:32], digits.y_train[:32], method=method)
        imgs = probes.gradient_stats(model, F.cross_entropy, img.x_train[:32], img.y_train[:32], method=method)
        torch.testing.assert_close(torch.as_tensor(flat.grad_norm_sq.values), torch.as_tensor(imgs.grad_norm_sq.values))
    ds = train(models.cnn(1, 10, 8, width=4), digits, lr=0.1, batch_size=8, n_steps=3, probe_at=[0, 3],
               probe_size=16, progress=False)
    assert ds.sizes["step"] == 2
    run = steps.run_one(models.Factory("cnn", 1, 10, 8, width=4), digits, batch_size=8, lr=0.1, momentum=0.0, seed=0,
                        target=10.0, metric="train_loss", max_steps=2, eval_every=1)
    assert run == 0.0


def test_wrong_input_shape_is_named():
    model = models.cnn(1, 10, 8, width=4)
    msg = re.escape("`x` must have shape (N, 1, 8, 8) or (N, 64) for this CNN; got (5, 40).")
    with pytest.raises(ValueError, match=msg):
        model(torch.zeros(5, 40))
    with pytest.raises(ValueError, match=re.escape("got (5, 1, 28, 28).")):
        model(torch.zeros(5, 1, 28, 28))
    with pytest.raises(ValueError, match=re.escape("`x` must have shape (N, 3, 32, 32) or (N, 3072) for this CNN; got "
                                                   "(5, 1, 32, 32).")):
        models.cnn(3, 10, 32, width=2)(torch.zeros(5, 1, 32, 32))
    # through the functions that take a model and data: the same message, naming the argument
    one_d = data.mnist1d(n_samples=40, seed=0)
    with pytest.raises(ValueError, match=r"`data` must suit `model`: `x` must be an input the model accepts; .*"
                                         + re.escape("`x` must have shape (N, 1, 8, 8) or (N, 64) for this CNN; got "
                                                     "(1, 40).")):
        train(model, one_d, lr=0.1, batch_size=4, n_steps=1, progress=False)


def test_resnet_takes_any_image_size_and_flat_rows_only_with_image_size(digits):
    res = models.resnet8(1, 10, width=2, batch_norm=False, seed=0)
    assert res(torch.zeros(3, 1, 8, 8)).shape == (3, 10) and res(torch.zeros(3, 1, 12, 9)).shape == (3, 10)
    with pytest.raises(ValueError, match=re.escape("`x` must have shape (N, 1, H, W) for this ResNet-8 (any H, W; for "
                                                   "flat rows (N, 1*H*W) build it with image_size=H, square images); "
                                                   "got (4, 64).")):
        res(digits.x_train[:4])
    with pytest.raises(ValueError, match=re.escape("got (3, 3, 8, 8).")):
        res(torch.zeros(3, 3, 8, 8))
    sized = models.resnet8(1, 10, width=2, batch_norm=False, seed=0, image_size=8)
    torch.testing.assert_close(sized(digits.x_train[:4]), res(digits.x_train[:4].reshape(4, 1, 8, 8)), rtol=0, atol=0)
    with pytest.raises(ValueError, match=re.escape("`x` must have shape (N, 1, 8, 8) or (N, 64) for this ResNet-8; "
                                                   "got (3, 1, 12, 9).")):
        sized(torch.zeros(3, 1, 12, 9))
    # the input layer has no parameters: the two models are the same parameters under the same names
    assert list(sized.state_dict()) == list(res.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(sized.state_dict().values(), res.state_dict().values()))
