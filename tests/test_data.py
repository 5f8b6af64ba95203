"""deepmodels.data.Dataset: a short repr (like xarray's), never the tensors."""

from __future__ import annotations

import torch

from deepmodels import data


def test_repr_is_a_short_summary():
    text = repr(data.digits(seed=0))
    lines = text.splitlines()
    assert lines[0] == "<deepmodels.data.Dataset 'digits'>"
    assert len(lines) <= 10 and len(text) < 600
    assert "tensor(" not in text and "[" not in text  # no tensor dump
    assert "source:    scikit-learn's handwritten digits" in text
    assert "n_train:   1438" in text and "n_test:    359" in text
    assert "x:         (n, 64) float32 on cpu" in text
    assert "n_classes: 10" in text and "seed:      0" in text
    assert "label_noise" not in text and "duplicates" not in text  # only when there are any
    assert str(data.digits(seed=0)) == text


def test_repr_names_corruptions_and_image_shape():
    text = repr(data.digits(seed=3, flatten=False, label_noise=0.1, duplicates=0.2))
    assert "x:           (n, 1, 8, 8) float32 on cpu" in text
    assert "label_noise: 0.1 of the training labels replaced" in text
    assert "duplicates:  0.2 of the training set replaced" in text
    assert "seed:        3" in text
    moved = data.digits(seed=3, label_noise=0.1).to("cpu")  # .to() keeps what the loader recorded
    assert "label_noise: 0.1" in repr(moved) and "seed:        3" in repr(moved)


def test_repr_of_a_dataset_built_by_hand():
    x, y = torch.zeros(6, 2, 3), torch.arange(6) % 2
    text = repr(data.Dataset(x, y, x[:2], y[:2], 2, "toy"))
    assert text.splitlines() == ["<deepmodels.data.Dataset 'toy'>", "source:    (not recorded)", "n_train:   6",
                                 "n_test:    2", "x:         (n, 2, 3) float32 on cpu", "n_classes: 2",
                                 "seed:      (not recorded)"]
