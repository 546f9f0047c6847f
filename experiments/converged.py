"""The converged study: does SE help once the networks are trained?

  python -m experiments.converged [--seeds 0,1,2,3,4] [--train-only]
      [--report-only] [--update-readme]

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
``--update-readme`` also writes the report's verdict into README.md.
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

from experiments import cli, data, files, paper, study_report, trainer
from experiments.configs import common
from experiments.configs import fashion_mnist_se_resnet20 as recipe_config
from experiments.provenance import markdown_header, provenance
from se_jax import models as se_jax_models

_HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(_HERE, "results", "converged")
MODELS = ("cifar_resnet20", "cifar_se_resnet20")
RUN_FILES = ("config.json", "metrics.jsonl", "final.json", "provenance.jsonl")
PARAMS_FILE = "params.npz"
TRAJECTORY_FILE = "trajectory.npz"
# A snapshot of every run every this many steps (0.85 epochs of the recipe),
# kept in the workdir; an SE run's export reads its gates from each.
SNAPSHOT_EVERY_STEPS = 400


def make_config(model: str, seed: int, data_dir: str | None = None,
                progress: bool = True, smoke: bool = False):
  """The recipe of fashion_mnist_se_resnet20.py with `model` and `seed`
  (with `smoke`, its few-step variant)."""
  c = recipe_config.get_config("smoke" if smoke else None)
  with c.unlocked():
    c.model = model
    c.seed = seed
    if smoke:
      c.checkpoint_every_steps = 1
      c.keep_checkpoint_every_steps = 1
    else:
      # Frequent checkpoints: an interruption costs at most 200 steps.
      c.checkpoint_every_steps = 200
      c.keep_checkpoints = 2
      c.keep_checkpoint_every_steps = SNAPSHOT_EVERY_STEPS
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
    save_trajectory(config, workdir, os.path.join(tmp, TRAJECTORY_FILE))
  shutil.rmtree(dest, ignore_errors=True)
  os.replace(tmp, dest)


def save_trajectory(config, workdir: str, path: str) -> None:
  """The gates along a run: for every checkpoint its workdir kept (the
  snapshots and the last), the test error and each SE block's per-class
  mean gates over the test set, as one .npz (``steps``, ``top1_err``,
  ``classes`` and one (snapshots, classes, channels) array per block)."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  profiles: dict[str, list[np.ndarray]] = {}
  errors, classes = [], None
  for step in steps:
    print(f"[converged] reading the gates of {os.path.basename(workdir)} at"
          f" step {step}", file=sys.stderr, flush=True)
    model, _ = trainer.restore_model(config, workdir, step)
    sample, measures = gate_analysis(config, model, data_dir=config.data_dir,
                                     max_examples=config.max_eval_examples)
    errors.append(sample.top1_err)
    classes = np.unique(sample.labels)
    for block, m in measures.items():
      profiles.setdefault(block, []).append(m["class_means"])
  arrays = {f"profile/{b}": np.stack(v) for b, v in profiles.items()}
  tmp = path + ".tmp.npz"
  np.savez_compressed(tmp, steps=np.asarray(steps),
                      top1_err=np.asarray(errors), classes=classes, **arrays)
  os.replace(tmp, path)


def load_trajectory(path: str) -> dict | None:
  """What `save_trajectory` wrote, as ``{"steps", "top1_err", "classes",
  "profiles": {block: (snapshots, classes, channels)}}``; None without
  the file."""
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    return {"steps": f["steps"], "top1_err": f["top1_err"],
            "classes": f["classes"],
            "profiles": {k.split("/", 1)[1]: f[k] for k in f.files
                         if k.startswith("profile/")}}


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


def gate_analysis(config, params, *, data_dir=None,
                  max_examples: int | None = None):
  """The gates of a trained SE network over the test set, and their
  measures: ``(sample, {block: measures})``.

  `params` is the network, or the path of its `save_params` file."""
  from experiments import recalibration
  if isinstance(params, str):
    model = load_params(trainer.build_model(config, rngs=nnx.Rngs(0)),
                        params)
  else:
    model = params
  model.eval()
  info = data.DATASETS[config.dataset]
  _, transform = data.make_transforms(info)
  source = data.get_source(config.dataset, info.eval_split,
                           data_dir=data_dir)
  sample = recalibration.collect_gates(model, source, transform,
                                       batch_size=500,
                                       max_examples=max_examples)
  return sample, study_report.block_measures(sample.gates, sample.labels)


def steps_per_epoch(run_dir: str) -> float:
  """Training steps per epoch of a run, from its evaluation records."""
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
  if not evals:
    raise ValueError(f"{run_dir}/metrics.jsonl has no evaluation record.")
  return evals[-1]["step"] / evals[-1]["epoch"]


def gate_trajectory(se_runs: list[dict]) -> dict:
  """`study_report.trajectory` of the SE runs that saved one."""
  found = {r["seed"]: load_trajectory(os.path.join(r["run_dir"],
                                                   TRAJECTORY_FILE))
           for r in se_runs}
  found = {s: t for s, t in found.items() if t is not None}
  if not found:
    return {}
  # Seeds are compared snapshot by snapshot: those whose snapshots are at
  # other steps (a run resumed without its earlier snapshots) are left out.
  groups: dict[tuple, dict] = {}
  for s, t in found.items():
    groups.setdefault(tuple(int(x) for x in t["steps"]), {})[s] = t
  kept = max(groups.values(), key=len)
  left_out = sorted(set(found) - set(kept))
  if left_out:
    print(f"[converged] the snapshots of seed(s) {left_out} are at other"
          f" steps than those of seed(s) {sorted(kept)}: left out of the"
          " trajectory", file=sys.stderr, flush=True)
  first = next(r for r in se_runs if r["seed"] in kept)
  traj = study_report.trajectory(kept, steps_per_epoch(first["run_dir"]))
  traj["left_out"] = left_out
  return traj


def report(args, runs: list[dict]) -> dict:
  """The study's report: errors, their statistics, learning curves, and
  the role-of-excitation analysis of every converged SE network."""
  t0 = time.perf_counter()
  prov = provenance()
  os.makedirs(args.results, exist_ok=True)
  baseline, model = args.models[0], args.models[1]
  c = study_report.compare(runs, baseline, model)
  models = list(dict.fromkeys(r["model"] for r in runs))
  series = []
  for r in runs:
    with open(os.path.join(r["run_dir"], "metrics.jsonl")) as f:
      recs = [json.loads(line) for line in f]
    evals = [x for x in recs if x["split"] == "eval"]
    train = [x for x in recs if x["split"] == "train"]
    series.append(dict(
        label=r["model"] if r["seed"] == runs[0]["seed"] else None,
        color=f"C{models.index(r['model'])}",
        epochs=[x["epoch"] for x in evals],
        errors=[x["top1_err"] for x in evals],
        steps=[x["step"] for x in train], losses=[x["loss"] for x in train]))
  study_report.plot_curves(os.path.join(args.results, "curves.png"), series,
                           "Every seed of the converged study")

  se_runs = [r for r in runs if r["model"] == model]
  per_seed, samples = {}, {}
  for r in se_runs:
    config = make_config(model, r["seed"], args.data_dir, smoke=args.smoke)
    print(f"[converged] reading the gates of {model} seed {r['seed']}",
          file=sys.stderr, flush=True)
    sample, measures = gate_analysis(
        config, os.path.join(r["run_dir"], PARAMS_FILE),
        data_dir=args.data_dir,
        max_examples=1000 if args.smoke else None)
    per_seed[r["seed"]], samples[r["seed"]] = measures, sample
  stability = study_report.stability(per_seed)
  traj = gate_trajectory(se_runs)
  if traj:
    study_report.plot_trajectory(
        os.path.join(args.results, "gate_trajectory.png"), traj,
        f"{model}: the gates along training, against the converged ones")

  first = min(samples) if samples else None
  figures = []
  if first is not None:
    sample = samples[first]
    info = data.DATASETS[make_config(model, first).dataset]
    figures = study_report.draw_figures(
        sample.gates, sample.labels, sample.overall, info.class_names,
        args.results, f"converged {model}, seed {first}, on {info.recipe}")

  results = dict(
      baseline=baseline, model=model,
      runs=[{k: r[k] for k in ("model", "seed", "top1_err", "top5_err",
                               "train_seconds")} for r in runs],
      comparison=c, verdict=study_report.verdict(c, baseline, model),
      gate_measures={s: {b: {k: (v.tolist() if isinstance(v, np.ndarray)
                                 else v) for k, v in m.items()}
                         for b, m in per_seed[s].items()}
                     for s in per_seed},
      stability=stability, figures=figures, trajectory=traj,
      report_seconds=time.perf_counter() - t0)
  files.write_json(os.path.join(args.results, "report.json"),
                   {"provenance": prov, **results})
  md = _to_markdown(results, prov, args)
  files.write_atomic(os.path.join(args.results, "report.md"), md)
  if args.update_readme:
    path = os.path.join(os.path.dirname(_HERE), "README.md")
    if not files.replace_section(path, README_START, README_END,
                                 readme_summary(results, prov)):
      raise SystemExit(
          f"--update-readme: {path} has no converged-study summary markers"
          f" ({README_START!r} ... {README_END!r}).")
  print(md)
  return results


README_START = "<!-- converged study summary: written by python -m"
README_END = "<!-- end of converged study summary -->"


def readme_summary(results: dict, prov: dict) -> str:
  """The README's paragraph on the converged study, from its report."""
  lines = [f"{README_START} experiments.converged --report-only"
           " --update-readme -->",
           f"From the converged study's runs (report of {prov['date']},"
           f" commit {prov['commit']}): {results['verdict']}"]
  traj = results.get("trajectory")
  if traj:
    seeds = sorted(traj["reach_epoch"], key=int)
    when = ", ".join("never" if traj["reach_epoch"][s] is None
                     else f"{traj['reach_epoch'][s]:.2f}" for s in seeds)
    lines[-1] += (
        " The per-class gate profiles of every SE block stay within"
        f" correlation {study_report.REACH} of the converged ones from epoch"
        f" {when} of {traj['epochs'][-1]:.2f} (seed"
        f"{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}).")
  lines.append(README_END)
  return "\n".join(lines)


def _to_markdown(results: dict, prov: dict, args) -> str:
  c, model, baseline = results["comparison"], results["model"], \
      results["baseline"]
  out = [markdown_header("The converged study: SE on Fashion-MNIST", prov),
         ""]
  cfg = make_config(model, 0)
  out.append(
      f"`{baseline}` and `{model}`, {cfg.num_epochs:g} epochs of the"
      f" {cfg.dataset} training set, SGD momentum {cfg.momentum}, weight"
      f" decay {cfg.weight_decay}, batch {cfg.batch_size}, lr"
      f" {cfg.learning_rate} with {cfg.schedule} decay (the recipe of"
      " experiments/configs/fashion_mnist_se_resnet20.py); test error on"
      " the 10,000 test images. Within a seed both networks see the same"
      " batches and augmentation. A training time is that of the run's"
      " last invocation (a resumed run counts from its resumption), on the"
      " machine that ran it.\n")
  out.append("## Test error\n")
  out.append("| seed | " + " | ".join(f"`{m}` (%)" for m in (baseline, model))
             + " | difference | train time (s) of the last invocation |"
             "\n|---|---|---|---|---|")
  by = {(r["model"], r["seed"]): r for r in results["runs"]}
  for s in sorted({r["seed"] for r in results["runs"]}):
    a, b = by.get((baseline, s)), by.get((model, s))
    cell = lambda r: "-" if r is None else f"{r['top1_err']:.2f}"
    diff = ("-" if a is None or b is None
            else f"{b['top1_err'] - a['top1_err']:+.2f}")
    secs = " / ".join("-" if r is None else f"{r['train_seconds']:.0f}"
                      for r in (a, b))
    out.append(f"| {s} | {cell(a)} | {cell(b)} | {diff} | {secs} |")
  if c.get("welch"):
    out.append(
        f"| mean +- std | {c['baseline_mean']:.2f} +- {c['baseline_std']:.2f}"
        f" | {c['attention_mean']:.2f} +- {c['attention_std']:.2f} |"
        f" {c['welch']['mean']:+.2f} | |")
  out.append("\n" + results["verdict"] + "\n")
  out.append("![Learning curves of every run](curves.png)\n")
  stab = results["stability"]
  if stab:
    n = len(results["gate_measures"])
    out.append(f"## What the gates do, converged ({n} seed(s))\n")
    out.append(
        "Sec. 7.2's measures on the test set for every SE block, mean +- std"
        " over the seeds (see `se_jax.analysis`): class share of gate"
        " variance, within-class std (input dependence), distance from"
        " identity, saturation, how much a per-class scale explains, and the"
        " share of classes for which the block's gates are constant (a dead"
        " bottleneck). \"Dead everywhere\": seeds whose block gives every"
        " image the same gates. \"Seed agreement\": how alike the class"
        " structure of the gates is between seeds"
        " (`se_jax.analysis.profile_similarity`, 1 = the same).\n")
    out.append("| block | " + " | ".join(h for _, h in study_report.MEASURES)
               + " | dead everywhere | seed agreement |\n|---|"
               + "---|" * (len(study_report.MEASURES) + 2))
    for b, row in stab.items():
      cells = [f"{row[k][0]:.3f} +- {row[k][1]:.3f}" for k, _ in study_report.MEASURES]
      sim = row["cross_seed_similarity"]
      out.append(f"| {b} | " + " | ".join(cells)
                 + f" | {row['dead_all_seeds']} of {n} |"
                 + (f" {sim:.2f} |" if sim is not None else " - |"))
    for fig, caption in zip(results["figures"], (
        "Fig. 6 analogue from the converged network: per-class mean gate of"
        " 50 sampled channels; dashed: all classes.",
        "Fig. 7 analogue: within-class mean and std of the gates for the two"
        " classes whose last-block profiles differ most.")):
      out.append(f"\n![{caption}]({fig})\n\n*{caption}*")
  traj = results.get("trajectory")
  if traj:
    out.append(_trajectory_markdown(traj))
  t4 = paper.TABLE4_CIFAR10["ResNet-110"]
  out.append(
      "\n## The paper's protocol\n\nOn CIFAR-10 with an accelerator, Table"
      f" 4's ResNet-110 (paper: {t4[0]}% -> {t4[1]}% with SE) is two"
      " commands: `python -m experiments.train"
      " --config=experiments/configs/cifar10_resnet110.py --workdir=DIR1` and"
      " the same with `cifar10_se_resnet110.py`.")
  return "\n".join(out) + "\n"


def _trajectory_markdown(traj: dict) -> str:
  seeds = sorted(traj["correlation"])
  reach = study_report.REACH
  out = ["\n## How soon the gates settle\n",
         f"Snapshots of every SE run along its training ({len(seeds)}"
         " seed(s)): the test error, and the correlation of each block's"
         " per-class gate profiles with those of the converged network of the"
         " same run (`se_jax.analysis.profile_correlation`; channels match"
         " within a run), mean over the seeds. The snapshots are points of"
         " the full-length cosine schedule, whose learning rate is still high"
         " early on: a shorter run, annealed sooner, is not measured here.\n",
         "| epoch | test error (%) | lowest block | mean over blocks |",
         "|---|---|---|---|"]
  for i, e in enumerate(traj["epochs"]):
    err = np.mean([traj["top1_err"][s][i] for s in seeds])
    low = np.mean([traj["min_correlation"][s][i] for s in seeds])
    mean = np.mean([np.mean([traj["correlation"][s][b][i]
                             for b in traj["blocks"]]) for s in seeds])
    out.append(f"| {e:.2f} | {err:.2f} | {low:.3f} | {mean:.3f} |")
  words = []
  for s in seeds:
    e = traj["reach_epoch"][s]
    words.append(f"seed {s}: " + ("never before the end" if e is None
                                  else f"from epoch {e:.2f}"))
  out.append(
      f"\nEvery block within reach (correlation >= {reach} with the"
      " converged profiles, and staying so): " + "; ".join(words) + ".\n")
  if traj.get("left_out"):
    out.append(f"Seed(s) {traj['left_out']} left out: their snapshots are at"
               " other steps.\n")
  out.append("![The gates along training](gate_trajectory.png)\n")
  return "\n".join(out)


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
  p.add_argument("--report-only", action="store_true",
                 help="train nothing: write the report from the finished"
                      " runs in --results")
  p.add_argument("--update-readme", action="store_true",
                 help="also write the report's summary into README.md")
  args = p.parse_args(argv)
  args.models = [m for m in args.models.split(",") if m]
  if len(args.models) < 2:
    p.error(f"--models needs a baseline and at least one other network,"
            f" got {args.models}")
  unknown = [m for m in args.models if m not in se_jax_models.names()]
  if unknown:
    p.error(f"--models: unknown model(s) {unknown}; see"
            " se_jax.models.names()")
  if args.train_only and args.report_only:
    p.error("--train-only and --report-only exclude each other")
  if args.train_only and args.update_readme:
    p.error("--update-readme needs a report; --train-only writes none")
  return args


def finished_runs(args) -> list[dict]:
  """The runs of the study already in the results directory."""
  done = []
  for seed in args.seeds:
    for model in args.models:
      config = make_config(model, seed, args.data_dir, smoke=args.smoke)
      dest = os.path.join(args.results, "runs", run_name(model, seed))
      result = committed_result(config, dest)
      if result is not None:
        done.append({"model": model, "seed": seed, "run_dir": dest,
                     **result})
  return done


def main(argv=None):
  args = parse_args(argv)
  t0 = time.perf_counter()
  runs = finished_runs(args) if args.report_only else train(args)
  print(f"[converged] {len(runs)} runs in {time.perf_counter() - t0:.0f} s",
        file=sys.stderr)
  if args.train_only:
    return runs
  return report(args, runs)


if __name__ == "__main__":
  cli.main_guard(main)()
