"""The training engine: configs, smoke runs, resume, devices, guards."""

import glob
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from experiments import data, steps, trainer
from experiments.configs import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "experiments", "configs")
CONFIG_FILES = sorted(
    os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
    if not os.path.basename(p).startswith(("__", "common")))
FMNIST = os.path.join(CONFIG_DIR, "fashion_mnist_se_resnet20.py")
needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(data.FASHION_MNIST_DIR),
    reason="Debian's dataset-fashion-mnist is not installed;"
           " experiments/setup.sh installs it")


def _load(name):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(CONFIG_DIR, name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _jsonl(path, split="train"):
  with open(path) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def _variants(name):
  group = name.removeprefix("imagenet_ablation_")
  if group in common.ABLATIONS and len(common.ABLATIONS[group]) > 1:
    return sorted(common.ABLATIONS[group])
  return [None]


def test_every_paper_result_has_a_config():
  want = {f"{d}_{p}{m}" for d in ("cifar10", "cifar100")
          for p in ("", "se_") for m in ("resnet110", "resnet164", "wrn16_8")}
  want |= {f"imagenet_{p}{m}" for p in ("", "se_")
           for m in ("resnet50", "resnet101", "resnet152", "resnext50_32x4d")}
  want |= {f"imagenet_ablation_{g}" for g in common.ABLATIONS}
  want |= {"fashion_mnist_se_resnet20"}
  assert want <= set(CONFIG_FILES)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_files_are_locked_documented_and_build(name):
  module = _load(name)
  assert "python -m experiments.train" in module.__doc__
  assert f"--config=experiments/configs/{name}.py" in module.__doc__
  for variant in _variants(name):
    arg = variant
    config = module.get_config(arg)
    assert config.is_locked
    with pytest.raises(AttributeError):
      config.learning_rat = 0.1  # A typo is an error, not a new key.
    model = nnx.eval_shape(lambda: trainer.build_model(config,
                                                       rngs=nnx.Rngs(0)))
    assert model.fc.out_features == data.DATASETS[config.dataset].num_classes
    smoke = module.get_config(f"{arg},smoke" if arg else "smoke")
    assert smoke.num_train_steps == 3


def test_ablation_variants_set_the_option():
  cfg = _load("imagenet_ablation_reduction").get_config("8")
  assert cfg.model_options.reduction == 8 and not cfg.model_options.se_bias
  with pytest.raises(ValueError, match=r"unknown reduction variant '7'"):
    _load("imagenet_ablation_reduction").get_config("7")
  with pytest.raises(ValueError, match=r"choose a variant"):
    _load("imagenet_ablation_integration").get_config(None)


def _smoke_names():
  # One smoke run per config file; the ablation files run their first
  # variant (the variants differ only in the SE options tested above).
  return [(n, _variants(n)[0]) for n in CONFIG_FILES]


@pytest.mark.parametrize("name,variant", _smoke_names(),
                         ids=[n for n, _ in _smoke_names()])
def test_smoke_run(name, variant, tmp_path):
  config = _load(name).get_config(f"{variant},smoke" if variant else "smoke")
  if config.dataset == "fashion_mnist":
    if not os.path.isdir(data.FASHION_MNIST_DIR):
      pytest.skip("Debian's dataset-fashion-mnist is not installed")
    result = trainer.train_and_evaluate(config, str(tmp_path))
  else:
    import tensorflow_datasets as tfds
    # TFDS's mock data: random examples with the real dataset's features, so
    # the real loading path runs without the dataset.
    with tfds.testing.mock_data(num_examples=64):
      result = trainer.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(result["loss"]) and result["steps"] == 3
  assert [r["step"] for r in _jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["model"] == config.model
  assert os.listdir(tmp_path / "checkpoints") == ["3"]
  assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))


# ------------------------------------------------------------ schedules


def _schedule_config(**kw):
  c = common.base_config()
  c.update(kw)
  return c


def test_step_schedule_divides_by_ten_at_half_and_three_quarters():
  s = trainer.make_schedule(_schedule_config(), steps_per_epoch=10,
                            total_steps=100)
  np.testing.assert_allclose([s(0), s(49), s(50), s(74), s(75), s(99)],
                             [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_step_every_schedule_with_warmup():
  c = _schedule_config(schedule="step_every", decay_every_epochs=3.0,
                       warmup_epochs=1.0, learning_rate=0.6)
  s = trainer.make_schedule(c, steps_per_epoch=10, total_steps=100)
  np.testing.assert_allclose([s(0), s(5), s(10), s(29), s(30), s(60)],
                             [0.0, 0.3, 0.6, 0.6, 0.06, 0.006], rtol=1e-5)


def test_cosine_schedule():
  s = trainer.make_schedule(_schedule_config(schedule="cosine"),
                            steps_per_epoch=10, total_steps=100)
  np.testing.assert_allclose([s(0), s(50), s(100)], [0.1, 0.05, 0.0],
                             atol=1e-6)
  with pytest.raises(ValueError, match=r"schedule must be .* got 'linear'"):
    trainer.make_schedule(_schedule_config(schedule="linear"), 10, 100)


def test_weight_decay_only_on_weights():
  model = nnx.eval_shape(lambda: trainer.build_model(
      _schedule_config(model="cifar_se_resnet20"), rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  mask = steps._decay_mask(params)
  flat = {"/".join(map(str, k)): bool(getattr(v, "get_value", lambda: v)())
          for k, v in nnx.to_flat_state(mask)}
  assert flat["stem_conv/kernel"] and flat["fc/kernel"]
  assert flat["stages/0/0/attn/w1"] and flat["stages/0/0/attn/w2"]
  assert not flat["fc/bias"] and not flat["stages/0/0/attn/b1"]
  assert not flat["stem_norm/scale"] and not flat["stem_norm/bias"]


# ------------------------------------------------------------ runs


def _tiny_args(workdir, steps=24, extra=()):
  return [
      sys.executable, "-m", "experiments.train", f"--config={FMNIST}:smoke",
      f"--workdir={workdir}", f"--config.num_train_steps={steps}",
      "--config.checkpoint_every_steps=4", "--config.keep_checkpoints=2",
      "--config.batch_size=16", "--config.max_train_examples=256",
      "--config.model_options.widths=(8,16,32)",
      "--config.model_options.reduction=4", *extra,
  ]


def _final_params(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.StandardRestore())
  manager.close()
  return step, restored["params"]


def _run(args, env=None, **kw):
  return subprocess.run(args, cwd=ROOT, env={**os.environ, **(env or {})},
                        capture_output=True, text=True, **kw)


@needs_fmnist
def test_resume_after_sigkill_gives_the_same_final_params(tmp_path):
  whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
  r = _run(_tiny_args(whole))
  assert r.returncode == 0, r.stderr[-3000:]

  proc = subprocess.Popen(_tiny_args(cut), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt = os.path.join(cut, "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    steps = [int(s) for s in (os.listdir(ckpt) if os.path.isdir(ckpt) else ())
             if s.isdigit()]
    if steps and max(steps) >= 8:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be interrupted"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  r = _run(_tiny_args(cut))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Resuming from the checkpoint at step" in r.stderr

  (s1, p1), (s2, p2) = _final_params(whole), _final_params(cut)
  assert s1 == s2 == 24
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  # The metrics of the cut-off run were not written twice.
  steps = [r["step"] for r in _jsonl(os.path.join(cut, "metrics.jsonl"))]
  assert steps == sorted(set(steps))


@needs_fmnist
def test_four_devices_give_the_losses_of_one(tmp_path):
  losses = {}
  for n in (1, 4):
    wd = str(tmp_path / f"dev{n}")
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
    # A small step size keeps float rounding differences (the devices sum
    # in another order) from being amplified by the optimisation.
    r = _run(_tiny_args(wd, steps=6, extra=["--config.learning_rate=0.01"]),
             env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    losses[n] = [r["loss"] for r in _jsonl(os.path.join(wd, "metrics.jsonl"))]
  assert len(losses[1]) == 6
  # The first step is the same computation up to summation order; later
  # steps drift by a few 1e-5 at most as rounding passes through ReLU kinks.
  np.testing.assert_allclose(losses[4][0], losses[1][0], rtol=1e-6)
  np.testing.assert_allclose(losses[4], losses[1], rtol=1e-4)


def _tiny_config(**overrides):
  c = _load("fashion_mnist_se_resnet20").get_config("smoke")
  with c.unlocked():
    c.model_options.widths = (8, 16, 32)
    c.model_options.reduction = 4.0
    c.update(overrides)
  return c


@needs_fmnist
def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch):
  wd = str(tmp_path)
  trainer.train_and_evaluate(_tiny_config(num_train_steps=4,
                                          checkpoint_every_steps=2), wd)
  # A diverging run, short of a NaN learning rate (which the config checks
  # refuse): every update becomes NaN.
  make_optimizer = trainer.make_optimizer
  monkeypatch.setattr(trainer, "make_optimizer", lambda c, s: optax.chain(
      make_optimizer(c, s), optax.scale(float("nan"))))
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r"parameters became non-finite at step 5; .* step 4"):
    trainer.train_and_evaluate(
        _tiny_config(num_train_steps=12, checkpoint_every_steps=2), wd)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "4"]


@needs_fmnist
def test_a_held_workdir_is_refused(tmp_path):
  wd = str(tmp_path)
  with trainer._workdir_lock(wd):
    with pytest.raises(trainer.WorkdirLockedError, match="in use by another"):
      trainer.train_and_evaluate(_tiny_config(), wd)


@needs_fmnist
def test_bfloat16_compute_with_float32_parameters(tmp_path):
  result = trainer.train_and_evaluate(
      _tiny_config(num_train_steps=2, compute_dtype="bfloat16"),
      str(tmp_path))
  assert np.isfinite(result["loss"])
  manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
  params = manager.restore(2, args=ocp.args.StandardRestore())["params"]
  manager.close()
  assert {np.dtype(leaf.dtype) for leaf in jax.tree.leaves(params)} == {
      np.dtype(np.float32)}
  with pytest.raises(ValueError, match=r"compute_dtype='fp16' is not allowed"):
    trainer.train_and_evaluate(_tiny_config(compute_dtype="fp16"),
                               str(tmp_path / "bad"))
  assert not os.path.exists(tmp_path / "bad")


@needs_fmnist
def test_a_finished_run_is_reused_whatever_its_execution_settings(tmp_path):
  wd = str(tmp_path)
  first = trainer.train_and_evaluate(
      _tiny_config(num_train_steps=2, num_threads=2), wd)
  assert trainer.finished_result(
      _tiny_config(num_train_steps=2, num_threads=None, progress=True),
      wd) == first
  assert trainer.finished_result(
      _tiny_config(num_train_steps=2, learning_rate=0.5), wd) is None
  # A run from before a model option existed (left at None) still counts.
  path = os.path.join(wd, "config.json")
  with open(path) as f:
    saved = json.load(f)
  assert saved["model_options"].pop("relu_before_se") is None
  with open(path, "w") as f:
    json.dump(saved, f)
  assert trainer.finished_result(_tiny_config(num_train_steps=2), wd) == first


# ------------------------------------------------------------ faults


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A run of 12 steps with checkpoints at 4, 8 and 12, and its parameters."""
  if not os.path.isdir(data.FASHION_MNIST_DIR):
    pytest.skip("Debian's dataset-fashion-mnist is not installed")
  wd = str(tmp_path_factory.mktemp("finished"))
  trainer.train_and_evaluate(_finished_config(), wd)
  return wd, _final_params(wd)[1]


def _finished_config(**kw):
  return _tiny_config(num_train_steps=12, checkpoint_every_steps=4, **kw)


def _copy_of(run, tmp_path):
  wd = str(tmp_path / "run")
  shutil.copytree(run, wd)
  return wd


def _step_files(wd, step):
  top = os.path.join(wd, "checkpoints", str(step))
  return sorted((os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs),
                key=os.path.getsize, reverse=True)


def _overwrite_three(files):
  rng = np.random.default_rng(0)
  for path in files[:3]:
    with open(path, "r+b") as f:
      f.write(rng.bytes(os.path.getsize(path)))


def _flip_a_byte(files):
  # In the largest array file: TensorStore reads it without complaint, so
  # only the digest saved with the checkpoint can tell.
  with open(files[0], "r+b") as f:
    f.seek(os.path.getsize(files[0]) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0xFF]))


def _truncate(files):
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _delete_metadata(files):
  for path in files:
    if os.path.basename(path) in ("_METADATA", "manifest.ocdbt"):
      os.remove(path)


@pytest.mark.parametrize("damage_12,damage_8", [
    (_overwrite_three, _flip_a_byte), (_truncate, _delete_metadata)],
    ids=["overwritten-flipped", "truncated-deleted"])
def test_damaged_checkpoints_are_set_aside_and_an_older_one_resumes(
    finished_run, damage_12, damage_8, tmp_path, capsys):
  run, params = finished_run
  wd = _copy_of(run, tmp_path)
  damage_12(_step_files(wd, 12))
  damage_8(_step_files(wd, 8))
  trainer.train_and_evaluate(_finished_config(), wd)
  err = capsys.readouterr().err
  ckpt, aside = os.path.join(wd, "checkpoints"), os.path.join(
      wd, "corrupt_checkpoints")
  assert f"the checkpoint of step 12 in {ckpt} cannot be restored" in err
  assert f"the checkpoint of step 8 in {ckpt} cannot be restored" in err
  assert (f"moved the checkpoints of step(s) 8, 12 to {aside}; resuming from"
          " step 4." in err)
  assert "Resuming from the checkpoint at step 4 of 12." in err
  assert sorted(os.listdir(aside)) == ["12", "8"]
  # Steps 5 to 12 again, exactly as the first time.
  step, again = _final_params(wd)
  assert step == 12
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  steps = [r["step"] for r in _jsonl(os.path.join(wd, "metrics.jsonl"))]
  assert steps == list(range(1, 13))


def test_no_restorable_checkpoint_is_an_error_not_a_fresh_start(
    finished_run, tmp_path):
  run, _ = finished_run
  wd = _copy_of(run, tmp_path)
  # Another network in the same workdir: no checkpoint fits it.
  with pytest.raises(trainer.CheckpointError,
                     match=r"none of the checkpoints in .* \(steps 12, 8, 4\)"
                           r" can be restored; step 12: .* another config"):
    trainer.train_and_evaluate(_finished_config(
        model_options=dict(widths=(8, 16, 16))), wd)
  for step in (4, 8, 12):
    _delete_metadata(_step_files(wd, step))
  with pytest.raises(trainer.CheckpointError, match=r"none of the checkpoints"):
    trainer.train_and_evaluate(_finished_config(), wd)
  # Nothing was moved or overwritten.
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == [
      "12", "4", "8"]
  assert not os.path.exists(os.path.join(wd, "corrupt_checkpoints"))
  assert len(_jsonl(os.path.join(wd, "metrics.jsonl"))) == 12


def test_a_save_cut_off_is_never_restored(finished_run, tmp_path, capsys):
  run, params = finished_run
  wd = _copy_of(run, tmp_path)
  # What a process killed while saving step 12 leaves: Orbax writes into a
  # temporary directory and renames it when the save is complete.
  ckpt = os.path.join(wd, "checkpoints")
  os.rename(os.path.join(ckpt, "12"),
            os.path.join(ckpt, "12.orbax-checkpoint-tmp"))
  _truncate(_step_files(wd, "12.orbax-checkpoint-tmp")[:1])
  trainer.train_and_evaluate(_finished_config(), wd)
  assert "Resuming from the checkpoint at step 8 of 12." in (
      capsys.readouterr().err)
  assert sorted(os.listdir(ckpt)) == ["12", "4", "8"]
  _, again = _final_params(wd)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


@needs_fmnist
def test_a_full_workdir_fails_at_start(tmp_path, monkeypatch):
  wd = str(tmp_path / "run")
  usage = shutil.disk_usage(str(tmp_path))
  monkeypatch.setattr(trainer.shutil, "disk_usage", lambda path: usage._replace(
      free=2 ** 20))
  with pytest.raises(trainer.WorkdirError,
                     match=r"has 1.0 MiB free, and the run needs about .* MiB"
                           r" \(4 more checkpoint\(s\) of .* MiB,"
                           r" keep_checkpoints=3\); free some space"):
    trainer.train_and_evaluate(_tiny_config(), wd)
  assert os.listdir(wd) == [".lock"]


def test_input_threads_default_to_the_training_thread_on_cpus():
  assert data.input_threads(3) == 3
  assert data.input_threads(None) == (0 if jax.default_backend() == "cpu"
                                      else 8)


@needs_fmnist
def test_snapshots_are_kept_beside_the_latest_checkpoints(tmp_path):
  wd = str(tmp_path)
  trainer.train_and_evaluate(
      _tiny_config(num_train_steps=9, checkpoint_every_steps=1,
                   keep_checkpoints=2, keep_checkpoint_every_steps=4), wd)
  assert sorted(map(int, os.listdir(os.path.join(wd, "checkpoints")))) == [
      4, 8, 9]
  # A snapshot setting is not part of the recipe: the finished run counts
  # for a config without it.
  assert trainer.finished_result(
      _tiny_config(num_train_steps=9, checkpoint_every_steps=1,
                   keep_checkpoints=2), wd) is not None
