"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` files, with NumPy
alone (no data pipeline), checked against known digests."""

from __future__ import annotations

import gzip
import hashlib
import os

import numpy as np

__all__ = ["CLASSES", "FASHION_MNIST_DIR", "FASHION_MNIST_SHA256",
           "MEAN", "STD", "load_arrays"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# sha256 of the decompressed files
# (docs/reference/facts.md, Data on these machines).
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte":
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte":
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte":
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte":
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
# Per-channel mean and std of the training images, in [0, 1] units.
MEAN, STD = (0.2860,), (0.3530,)
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
           "Shirt", "Sneaker", "Bag", "Ankle boot")


class CorruptFileError(RuntimeError):
  """A Fashion-MNIST file does not have the known contents."""


def read_idx(path: str, name: str) -> np.ndarray:
  """An idx file (gzip-compressed), checked against its known sha256."""
  with gzip.open(path, "rb") as f:
    raw = f.read()
  digest = hashlib.sha256(raw).hexdigest()
  if digest != FASHION_MNIST_SHA256[name]:
    raise CorruptFileError(
        f"{path} decompresses to sha256 {digest}, expected"
        f" {FASHION_MNIST_SHA256[name]}; the file is corrupt or not"
        " Fashion-MNIST. Reinstall: apt-get install --reinstall"
        " dataset-fashion-mnist.")
  ndim = raw[3]
  dims = np.frombuffer(raw, ">u4", count=ndim, offset=4)
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_arrays(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """``(images (N, 28, 28, 1) uint8, labels (N,) int64)`` of a split.

  Raises:
    ValueError: for a split other than ``"train"`` and ``"test"``.
    FileNotFoundError: if a file is missing.
    CorruptFileError: if a file's contents are not the known ones.
  """
  prefix = {"train": "train", "test": "t10k"}.get(split)
  if prefix is None:
    raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
  images = read_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"),
                    f"{prefix}-images-idx3-ubyte")
  labels = read_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"),
                    f"{prefix}-labels-idx1-ubyte")
  return images[..., None], labels.astype(np.int64)
