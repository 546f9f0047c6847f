"""Input pipelines: offline Fashion-MNIST, augmentation, batching, errors."""

import gzip
import os
import shutil

import numpy as np
import pytest

from experiments import data

HAVE_FMNIST = os.path.isdir(data.FASHION_MNIST_DIR)
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST,
    reason=f"Debian's dataset-fashion-mnist is not installed"
           f" ({data.FASHION_MNIST_DIR}); experiments/setup.sh installs it")


@needs_fmnist
def test_fashion_mnist_from_debian_files_is_checked_and_complete():
  train = data.get_source("fashion_mnist", "train")
  test = data.get_source("fashion_mnist", "test")
  assert (len(train), len(test)) == (60000, 10000)
  r = train[0]
  assert r["image"].shape == (28, 28, 1) and r["image"].dtype == np.uint8
  assert np.bincount(test.labels, minlength=10).tolist() == [1000] * 10
  # The normalisation constants are the training set's statistics.
  x = train.images.astype(np.float64) / 255.0
  info = data.DATASETS["fashion_mnist"]
  assert abs(x.mean() - info.mean[0]) < 5e-4
  assert abs(x.std() - info.std[0]) < 5e-4


@needs_fmnist
def test_corrupt_fashion_mnist_file_is_refused(tmp_path):
  for name in os.listdir(data.FASHION_MNIST_DIR):
    shutil.copy(os.path.join(data.FASHION_MNIST_DIR, name), tmp_path)
  path = tmp_path / "t10k-labels-idx1-ubyte.gz"
  with gzip.open(path, "rb") as f:
    raw = bytearray(f.read())
  raw[100] ^= 1
  with gzip.open(path, "wb") as f:
    f.write(bytes(raw))
  with pytest.raises(data.DataUnavailableError, match=r"sha256 .* corrupt"):
    data.get_source("fashion_mnist", "test", fashion_mnist_dir=str(tmp_path))


def test_missing_data_names_both_ways_to_get_it(tmp_path):
  with pytest.raises(data.DataUnavailableError) as e:
    data.get_source("fashion_mnist", "test", data_dir=str(tmp_path),
                    fashion_mnist_dir=str(tmp_path / "absent"),
                    download=False)
  msg = str(e.value)
  assert "apt-get install dataset-fashion-mnist" in msg
  assert "download_and_prepare" in msg


def test_unknown_dataset():
  with pytest.raises(ValueError, match=r"unknown dataset 'mnist2'"):
    data.get_source("mnist2", "train")


def test_tfds_sources_go_through_the_same_pipeline():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=24):
    src = data.get_source("cifar10", "train")
    train_tf, eval_tf = data.make_transforms(data.DATASETS["cifar10"])
    batch = next(data.train_batches(src, train_tf, global_batch=8, seed=0,
                                    num_threads=1))
  assert batch["image"].shape == (8, 32, 32, 3)
  assert batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32


def _toy_source(n=40, size=8, c=1):
  rng = np.random.default_rng(0)
  return data.ArraySource(
      rng.integers(0, 256, size=(n, size, size, c), dtype=np.uint8),
      np.arange(n) % 10)


def test_pad_crop_flip():
  img = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(50):
    out = data.pad_crop_flip(img, rng, pad=1, flip=True)
    assert out.shape == img.shape
    seen.add(out.tobytes())
    # Every crop is a window of the zero-padded image, possibly mirrored.
    padded = np.pad(img, ((1, 1), (1, 1), (0, 0)))
    windows = [padded[i:i + 4, j:j + 4] for i in range(3) for j in range(3)]
    assert any(np.array_equal(out, w) or np.array_equal(out, w[:, ::-1])
               for w in windows)
  assert len(seen) > 5


def test_imagenet_transforms_shapes():
  info = data.DATASETS["imagenet2012"]
  train_tf, eval_tf = data.make_transforms(info)
  record = {"image": np.random.default_rng(0).integers(
      0, 256, (300, 400, 3), dtype=np.uint8), "label": 3}
  out = train_tf(record, np.random.default_rng(1))
  assert out["image"].shape == (224, 224, 3)
  assert eval_tf(record)["image"].shape == (224, 224, 3)
  centre = data.resize_centre_crop(record["image"], resize=256, size=224)
  assert centre.shape == (224, 224, 3)


def test_train_batches_are_deterministic_and_resumable():
  src = _toy_source()
  info = data.DatasetInfo(10, 8, 1, "train", "test", (0.5,), (0.25,),
                          "fashion_mnist")
  tf, _ = data.make_transforms(info)
  kw = dict(global_batch=8, seed=3, num_threads=1)
  a = data.train_batches(src, tf, **kw)
  first = [next(a) for _ in range(12)]  # 2.4 epochs
  b = data.train_batches(src, tf, **kw)
  for x, y in zip(first, [next(b) for _ in range(12)]):
    np.testing.assert_array_equal(x["image"], y["image"])
  resumed = data.train_batches(src, tf, start_step=7, **kw)
  for x in first[7:]:
    y = next(resumed)
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  # Every epoch is a permutation of the whole set, reshuffled each time.
  labels = np.concatenate([f["label"] for f in first[:10]])
  assert sorted(labels[:40].tolist()) == sorted((np.arange(40) % 10).tolist())
  assert not np.array_equal(labels[:40], labels[40:80])


def test_hosts_read_disjoint_slices_of_each_global_batch():
  src = _toy_source()
  info = data.DatasetInfo(10, 8, 1, "train", "test", (0.5,), (0.25,),
                          "fashion_mnist")
  tf, eval_tf = data.make_transforms(info)
  whole = data.train_batches(src, tf, global_batch=8, seed=1, num_threads=1)
  parts = [data.train_batches(src, tf, global_batch=8, seed=1, process_index=p,
                              process_count=2, num_threads=1) for p in (0, 1)]
  for _ in range(3):
    w = next(whole)
    joined = np.concatenate([next(p)["image"] for p in parts])
    np.testing.assert_array_equal(joined, w["image"])
  with pytest.raises(ValueError, match=r"batch_size 9 must be divisible"):
    data.train_batches(src, tf, global_batch=9, seed=1, process_count=2)


def test_eval_batches_cover_every_example_once():
  src = _toy_source(n=21)
  info = data.DatasetInfo(10, 8, 1, "train", "test", (0.5,), (0.25,),
                          "fashion_mnist")
  _, eval_tf = data.make_transforms(info)
  batches = list(data.eval_batches(src, eval_tf, global_batch=8,
                                   num_threads=1))
  assert len(batches) == 3
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 21 and mask[:21].all()
  labels = np.concatenate([b["label"] for b in batches])[:21]
  np.testing.assert_array_equal(labels, np.arange(21) % 10)


@pytest.mark.parametrize("interpolation,crop,shape", [
    ("bilinear", 0.875, (300, 400, 3)), ("bicubic", 0.95, (375, 250, 3))])
def test_pretrained_transform_matches_timms_evaluation(interpolation, crop,
                                                       shape):
  pytest.importorskip("timm", reason="the torch extra is not installed")
  from PIL import Image
  from timm.data import create_transform
  from se_jax.models import Preprocessing
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  pre = Preprocessing(mean, std, (224, 224), crop, interpolation)
  image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  ours = data.pretrained_transform(pre)({"image": image, "label": 7})
  theirs = create_transform(input_size=(3, 224, 224), crop_pct=crop,
                            interpolation=interpolation, mean=mean, std=std)(
                                Image.fromarray(image))
  assert ours["label"] == 7
  np.testing.assert_allclose(ours["image"],
                             theirs.numpy().transpose(1, 2, 0), atol=1e-5)
