"""The converged study: does SE help once the networks are trained?

  python -m experiments.converged [--seeds 0,1,2,3,4] [--train-only]
      [--report-only]

Trains CIFAR-style ResNet-20 and SE-ResNet-20 on Fashion-MNIST under the
recipe of experiments/configs/fashion_mnist_se_resnet20.py (10 epochs of the
60,000 training images, SGD momentum 0.9, lr 0.1 with cosine decay, batch
128), several seeds each; within a seed both networks see the same batches,
augmentation and initialisation stream. Then it compares their test errors
(mean +- std, the difference with a 95% confidence interval, Welch's t) and
repeats the role-of-excitation analysis of Sec. 7.2 on every converged
SE network (`experiments.gates_study`).

The study is hours of CPU. Each run checkpoints and resumes, and a finished
run's small files (config, metrics, final result, provenance and, for the SE
networks, the final parameters) are copied to the results directory, which
is committed: on any machine a run found there is not trained again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
from flax import nnx

from experiments import files, trainer
from experiments.configs import common
from experiments.configs import fashion_mnist_se_resnet20 as recipe_config

_HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(_HERE, "results", "converged")
MODELS = ("cifar_resnet20", "cifar_se_resnet20")
RUN_FILES = ("config.json", "metrics.jsonl", "final.json", "provenance.jsonl")
PARAMS_FILE = "params.npz"


def make_config(model: str, seed: int, data_dir: str | None = None,
                progress: bool = True, smoke: bool = False):
  """The recipe of fashion_mnist_se_resnet20.py with `model` and `seed`
  (with `smoke`, its few-step variant)."""
  c = recipe_config.get_config("smoke" if smoke else None)
  with c.unlocked():
    c.model = model
    c.seed = seed
    if not smoke:
      # Frequent checkpoints: an interruption costs at most 200 steps.
      c.checkpoint_every_steps = 200
      c.keep_checkpoints = 2
    c.data_dir = data_dir
    c.progress = progress
  return c


def run_name(model: str, seed: int) -> str:
  return f"{model}_seed{seed}"


def save_params(model, path: str) -> None:
  """The parameters and BatchNorm statistics of `model`, as one .npz."""
  state = nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat)))
  flat = {"/".join(map(str, k)): np.asarray(v)
          for k, v in _flatten(state).items()}
  tmp = path + ".tmp.npz"
  np.savez_compressed(tmp, **flat)
  os.replace(tmp, path)


def load_params(model, path: str):
  """`model` with the parameters and statistics saved by `save_params`.

  Raises:
    ValueError: if the file does not hold exactly `model`'s variables.
  """
  with np.load(path) as saved:
    flat = {tuple(_key(p) for p in k.split("/")): saved[k]
            for k in saved.files}
  state = nnx.state(model, (nnx.Param, nnx.BatchStat))
  expected = set(_flatten(nnx.to_pure_dict(state)))
  if expected != set(flat):
    diff = sorted(map(str, expected ^ set(flat)))
    raise ValueError(f"{path} does not fit the model: {diff[:3]} ...")
  nnx.replace_by_pure_dict(state, _unflatten(flat))
  nnx.update(model, state)
  return model


def _key(part: str):
  return int(part) if part.isdigit() else part


def _flatten(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat):
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def export_run(config, workdir: str, dest: str) -> None:
  """Copies a finished run's small files (and an SE network's parameters)
  from its workdir to `dest`, atomically: `dest` appears whole or not."""
  tmp = dest + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  for name in RUN_FILES:
    shutil.copy2(os.path.join(workdir, name), os.path.join(tmp, name))
  if "_se_" in config.model:
    model, _ = trainer.restore_model(config, workdir)
    save_params(model, os.path.join(tmp, PARAMS_FILE))
  shutil.rmtree(dest, ignore_errors=True)
  os.replace(tmp, dest)


def committed_result(config, run_dir: str) -> dict | None:
  """The final metrics of a run of `config` copied to `run_dir`, if any."""
  result = trainer.finished_result(config, run_dir)
  if result is None:
    return None
  if "_se_" in config.model and not os.path.exists(
      os.path.join(run_dir, PARAMS_FILE)):
    return None
  return result


def train(args) -> list[dict]:
  """Every (seed, model) run: reused from the results, exported from a
  finished workdir, or trained (resuming) and exported."""
  done = []
  for seed in args.seeds:
    for model in args.models:
      name = run_name(model, seed)
      config = make_config(model, seed, args.data_dir,
                           progress=not args.no_progress, smoke=args.smoke)
      dest = os.path.join(args.results, "runs", name)
      result = committed_result(config, dest)
      if result is not None:
        print(f"[converged] {name}: in {dest}, not trained again",
              file=sys.stderr, flush=True)
      else:
        wd = os.path.join(args.workdir, name)
        if trainer.finished_result(config, wd) is None:
          print(f"[converged] training {name} -> {wd}", file=sys.stderr,
                flush=True)
          trainer.train_and_evaluate(config, wd)
        export_run(config, wd, dest)
        result = committed_result(config, dest)
      done.append({"model": model, "seed": seed, "run_dir": dest, **result})
  return done


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seeds", default="0,1,2,3,4", type=common.parse_seeds)
  p.add_argument("--models", default=",".join(MODELS),
                 help="comma-separated registry names; the first is the"
                      " baseline")
  p.add_argument("--workdir", default="workdirs/converged")
  p.add_argument("--results", default=RESULTS,
                 help="where finished runs and the report are written")
  p.add_argument("--data-dir", default=None, help="TFDS data_dir")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--smoke", action="store_true",
                 help="a few steps of one-unit networks: checks the study"
                      " end to end")
  p.add_argument("--train-only", action="store_true",
                 help="train and export the runs, write no report")
  args = p.parse_args(argv)
  args.models = [m for m in args.models.split(",") if m]
  return args


def main(argv=None):
  args = parse_args(argv)
  t0 = time.perf_counter()
  runs = train(args)
  print(json.dumps([{k: r[k] for k in ("model", "seed", "top1_err")}
                    for r in runs]), file=sys.stderr)
  print(f"[converged] {len(runs)} runs in {time.perf_counter() - t0:.0f} s",
        file=sys.stderr)
  return runs


if __name__ == "__main__":
  main()
