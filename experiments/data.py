"""Input pipelines: TFDS data sources, paper augmentations, grain batching.

Datasets are named by their TFDS names. TFDS defines them and, on a networked
machine, downloads and prepares them; ``tfds.data_source`` then reads them by
random access without TensorFlow. Fashion-MNIST can also come from Debian's
``dataset-fashion-mnist`` package, whose files are checked against known
sha256 digests. There is never a silent fallback to synthetic data: with no
source, `get_source` raises `DataUnavailableError` naming the ways to get it.

The host pipeline is grain: a seeded shuffle that changes every epoch,
per-example augmentation whose randomness is a function of the seed and the
example's position (so a resumed run sees exactly the batches an
uninterrupted one would), batching, and threaded prefetch. Each host reads
only its own slice of every global batch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import grain
import numpy as np

from experiments import fashion_mnist

__all__ = [
    "DATASETS", "DataUnavailableError", "DatasetInfo", "FASHION_MNIST_DIR",
    "get_source", "eval_batches", "train_batches", "make_transforms",
    "input_threads", "pretrained_transform",
]

FASHION_MNIST_DIR = fashion_mnist.FASHION_MNIST_DIR
FASHION_MNIST_SHA256 = fashion_mnist.FASHION_MNIST_SHA256


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the pipeline needs to know of a dataset.

  Normalisation constants are the per-channel mean and std of the training
  images, in [0, 1] units (tests recompute Fashion-MNIST's from the data).
  """

  num_classes: int
  image_size: int
  channels: int
  train_split: str
  eval_split: str
  mean: tuple[float, ...]
  std: tuple[float, ...]
  recipe: str  # "cifar", "imagenet" or "fashion_mnist"
  class_names: tuple[str, ...] = ()


_FASHION_CLASSES = fashion_mnist.CLASSES
_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog",
                    "frog", "horse", "ship", "truck")

DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(10, 28, 1, "train", "test", (0.2860,),
                                 (0.3530,), "fashion_mnist", _FASHION_CLASSES),
    "cifar10": DatasetInfo(10, 32, 3, "train", "test",
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           "cifar", _CIFAR10_CLASSES),
    "cifar100": DatasetInfo(100, 32, 3, "train", "test",
                            (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762), "cifar"),
    "imagenet2012": DatasetInfo(1000, 224, 3, "train", "validation",
                                (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                                "imagenet"),
}


class DataUnavailableError(RuntimeError):
  """No source for a dataset could be found."""


class ArraySource:
  """A random-access source over in-memory images and labels."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if len(images) != len(labels):
      raise ValueError(
          f"{len(images)} images but {len(labels)} labels."
      )
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int) -> dict:
    return {"image": self.images[i], "label": self.labels[i]}


def load_fashion_mnist_files(directory: str, split: str) -> ArraySource:
  """Reads Debian's Fashion-MNIST files, checking their sha256 digests."""
  try:
    return ArraySource(*fashion_mnist.load_arrays(directory, split))
  except fashion_mnist.CorruptFileError as e:
    raise DataUnavailableError(str(e)) from None


def get_source(name: str, split: str, *, data_dir: str | None = None,
               fashion_mnist_dir: str = FASHION_MNIST_DIR,
               download: bool = True):
  """A random-access source of ``{"image": uint8 HWC, "label": int}``.

  Args:
    name: a TFDS name in `DATASETS`.
    split: a TFDS split, e.g. ``"train"`` or ``"test"``.
    data_dir: TFDS data directory (default: TFDS's own).
    fashion_mnist_dir: where Debian's Fashion-MNIST files are looked for.
    download: let TFDS download and prepare a dataset it does not have.

  Raises:
    ValueError: for an unknown dataset.
    DataUnavailableError: when no source has the data, naming the ways to
      get it.
  """
  if name not in DATASETS:
    raise ValueError(
        f"unknown dataset {name!r}; supported: {sorted(DATASETS)}."
    )
  if name == "fashion_mnist" and os.path.isdir(fashion_mnist_dir):
    return load_fashion_mnist_files(fashion_mnist_dir, split)
  import tensorflow_datasets as tfds
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir,
                            download=download)
  except Exception as e:  # TFDS raises many types for "not here".
    ways = [
        f"on a networked machine, prepare it once with TFDS (pip install"
        f" tensorflow-cpu; python -c \"import tensorflow_datasets as tfds;"
        f" tfds.builder('{name}').download_and_prepare()\"), then pass its"
        f" data_dir"
    ]
    if name == "fashion_mnist":
      ways.insert(0, "install Debian's dataset-fashion-mnist (apt-get install"
                     f" dataset-fashion-mnist), which puts the files in"
                     f" {fashion_mnist_dir}")
    if name == "imagenet2012":
      ways[0] += (" (ImageNet must first be downloaded by hand into TFDS's"
                  " manual_dir)")
    raise DataUnavailableError(
        f"{name!r} split {split!r} is not available here ({type(e).__name__}:"
        f" {e}). To get it: " + "; or ".join(ways) + "."
    ) from e


# ------------------------------------------------------------ augmentation


def _normalise(image: np.ndarray, mean, std) -> np.ndarray:
  x = image.astype(np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def pad_crop_flip(image: np.ndarray, rng: np.random.Generator, *, pad: int,
                  flip: bool) -> np.ndarray:
  """Zero-pad, random crop back to size, optional horizontal flip."""
  h, w = image.shape[:2]
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  i, j = rng.integers(0, 2 * pad + 1, size=2)
  out = padded[i:i + h, j:j + w]
  if flip and rng.random() < 0.5:
    out = out[:, ::-1]
  return out


INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def _resize(image: np.ndarray, size: tuple[int, int],
            interpolation: str = "bilinear") -> np.ndarray:
  from PIL import Image
  if interpolation not in INTERPOLATIONS:
    raise ValueError(
        f"interpolation must be one of {INTERPOLATIONS}, got"
        f" {interpolation!r}.")
  squeeze = image.shape[-1] == 1
  img = Image.fromarray(image[..., 0] if squeeze else image)
  resample = getattr(Image.Resampling, interpolation.upper())
  out = np.asarray(img.resize((size[1], size[0]), resample))
  return out[..., None] if squeeze else out


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, *,
                        size: int, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """Inception-style crop of random area and aspect ratio, resized."""
  h, w = image.shape[:2]
  area = h * w
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    cw = int(round(np.sqrt(target * aspect)))
    ch = int(round(np.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      i = rng.integers(0, h - ch + 1)
      j = rng.integers(0, w - cw + 1)
      return _resize(image[i:i + ch, j:j + cw], (size, size))
  s = min(h, w)  # Fallback: the central square.
  i, j = (h - s) // 2, (w - s) // 2
  return _resize(image[i:i + s, j:j + s], (size, size))


def resize_centre_crop(image: np.ndarray, *, resize: int, size: int,
                       interpolation: str = "bilinear") -> np.ndarray:
  """Resize the short side to `resize`, then take the central square.

  The long side and the crop offsets are rounded as torchvision's Resize and
  CenterCrop round them, so that pretrained timm models see the images they
  were evaluated on.
  """
  h, w = image.shape[:2]
  if h <= w:
    nh, nw = resize, int(resize * w / h)
  else:
    nh, nw = int(resize * h / w), resize
  nh, nw = max(nh, size), max(nw, size)
  image = _resize(image, (nh, nw), interpolation)
  i, j = int(round((nh - size) / 2)), int(round((nw - size) / 2))
  return image[i:i + size, j:j + size]


def pretrained_transform(preprocessing) -> Callable:
  """The evaluation transform of a pretrained model.

  Args:
    preprocessing: a `se_jax.models.Preprocessing`: the shorter side is
      resized to ``floor(input / crop_fraction)`` (timm's rule), the centre
      `input_size` is cropped and the channels are normalised.

  Returns:
    ``record -> {"image": float32 HWC, "label": int32}``.
  """
  h, w = preprocessing.input_size
  if h != w:
    raise ValueError(f"square inputs only, got input_size {(h, w)}.")
  resize = int(np.floor(h / preprocessing.crop_fraction))

  def evaluate(record):
    img = np.asarray(record["image"])
    if img.shape[-1] == 1:
      img = np.repeat(img, 3, axis=-1)
    img = resize_centre_crop(img, resize=resize, size=h,
                             interpolation=preprocessing.interpolation)
    return {"image": _normalise(img, preprocessing.mean, preprocessing.std),
            "label": np.int32(record["label"])}

  return evaluate


def make_transforms(info: DatasetInfo, *, flip: bool | None = None,
                    pad: int | None = None) -> tuple[Callable, Callable]:
  """(train, eval) per-example transforms for the dataset's recipe.

  The train transform takes ``(record, rng)``; both return
  ``{"image": float32 HWC, "label": int32}``.

  Recipes: CIFAR (He et al. 2016): 4-pixel zero pad, random 32x32 crop,
  horizontal flip, per-channel normalisation. ImageNet (paper, Sec. 5.1):
  random-size crop to 224 and flip; eval resize 256, centre crop 224.
  Fashion-MNIST: 2-pixel pad and random crop (no flip by default), normalise.
  """
  if info.recipe == "imagenet":
    def train(record, rng):
      img = random_resized_crop(np.asarray(record["image"]), rng,
                                size=info.image_size)
      if rng.random() < 0.5:
        img = img[:, ::-1]
      return _example(img, record, info)

    def evaluate(record):
      img = resize_centre_crop(np.asarray(record["image"]), resize=256,
                               size=info.image_size)
      return _example(img, record, info)
    return train, evaluate

  default_pad, default_flip = (4, True) if info.recipe == "cifar" else (2,
                                                                        False)
  pad = default_pad if pad is None else pad
  flip = default_flip if flip is None else flip

  def train(record, rng):
    img = pad_crop_flip(np.asarray(record["image"]), rng, pad=pad, flip=flip)
    return _example(img, record, info)

  def evaluate(record):
    return _example(np.asarray(record["image"]), record, info)
  return train, evaluate


def _example(img, record, info):
  return {"image": _normalise(img, info.mean, info.std),
          "label": np.int32(record["label"])}


# ------------------------------------------------------------ batching


def _check_batch(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(
        f"batch_size {global_batch} must be divisible by the number of"
        f" processes ({process_count})."
    )
  return global_batch // process_count


def input_threads(num_threads: int | None) -> int:
  """`num_threads`, or for None the right number for JAX's devices.

  When the devices are the host's own CPU cores, input threads running
  beside the computation preempt XLA's threads, and every parallel XLA
  operation waits for its slowest thread: on two cores this doubled the time
  of a CIFAR ResNet-20 training step, while reading the batch in the
  training thread adds a few percent. So None is 0 (read in the caller's
  thread) on CPUs and 8 on accelerators, whose hosts have cores to spare.
  """
  if num_threads is not None:
    return num_threads
  import jax
  return 0 if jax.default_backend() == "cpu" else 8


def _read_options(num_threads: int, prefetch: int) -> grain.ReadOptions:
  if num_threads < 0:
    raise ValueError(f"num_threads must be >= 0, got {num_threads}.")
  # With no threads, examples are read in the caller's thread, on demand.
  return grain.ReadOptions(num_threads=num_threads,
                           prefetch_buffer_size=prefetch if num_threads else 0)


def train_batches(source, transform: Callable, *, global_batch: int,
                  seed: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, num_threads: int = 8,
                  prefetch: int = 64, max_examples: int | None = None):
  """An endless iterator over this host's part of every training batch.

  Global step ``s`` uses the examples ``s * B ... (s + 1) * B - 1`` of an
  endless stream that is reshuffled every epoch; host ``p`` of ``P`` reads the
  ``p``-th slice of ``B / P``. Starting at `start_step` gives exactly the
  batches an uninterrupted run would see from there.

  Args:
    source: a random-access source, see `get_source`.
    transform: ``(record, rng) -> example``.
    global_batch: B, the batch over all hosts.
    seed: shuffling and augmentation seed.
    start_step: the first global step to produce.
    process_index: this host's index p.
    process_count: the number of hosts P.
    num_threads: threads reading and augmenting ahead of the consumer; 0
      reads in the consumer's thread when a batch is asked for.
    prefetch: batches buffered ahead (with threads).
    max_examples: use only the first examples of `source` (smoke runs).
  """
  local = _check_batch(global_batch, process_count)
  ds = grain.MapDataset.source(source)
  if max_examples is not None:
    ds = ds[:max_examples]
  if len(ds) < global_batch:
    raise ValueError(
        f"the training set has {len(ds)} examples, fewer than one batch of"
        f" {global_batch}."
    )
  ds = ds.seed(seed).shuffle().repeat().random_map(transform)
  ds = ds.batch(local, drop_remainder=True)
  ds = ds[process_index::process_count][start_step:]
  return iter(ds.to_iter_dataset(_read_options(num_threads, prefetch * local)))


def eval_batches(source, transform: Callable, *, global_batch: int,
                 process_index: int = 0, process_count: int = 1,
                 max_examples: int | None = None, num_threads: int = 8):
  """This host's part of every eval batch, padded, with a ``mask``.

  Every example is seen exactly once; the last batch is padded with masked
  copies so that every batch has the same shape.
  """
  local = _check_batch(global_batch, process_count)
  ds = grain.MapDataset.source(source)
  if max_examples is not None:
    ds = ds[:max_examples]
  n = len(ds)
  n_batches = -(-n // global_batch)
  padded = n_batches * global_batch

  def fetch(i):
    example = transform(ds[i % n])
    example["mask"] = np.float32(i < n)
    return example

  idx = grain.MapDataset.range(padded).map(fetch).batch(local)
  idx = idx[process_index::process_count]
  return iter(idx.to_iter_dataset(_read_options(num_threads, 4 * local)))


def num_examples(source, max_examples: int | None = None) -> int:
  n = len(source)
  return n if max_examples is None else min(n, max_examples)
