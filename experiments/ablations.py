"""The SE ablations of Tables 10-16, at CPU scale.

  python -m experiments.ablations [--groups reduction,squeeze,...]
      [--seeds 0,1,2] [--epochs 1] [--train-examples 20000] [--quick]
      [--report-only]

One small network (CIFAR-style SE-ResNet-20 by default) on Fashion-MNIST,
trained once per variant and seed under one recipe: the reduction ratio
(Table 10), the squeeze operator (11), the gate (12), the stages with SE
(13), the integration (14), SE_3x3 (15), NoSqueeze (16), the network
without SE, and (group ``attention``) every attention kind of
`se_jax.attention` in SE's place. The report gives mean +- std over the seeds with params and
multiply-adds, beside the paper's ImageNet numbers (experiments/paper.py).
Runs are resumable and finished ones are reused, so a group can be run,
interrupted and extended one at a time.

As in the paper's ablations, the FC biases are dropped and C_r = C // r.
At ResNet-20's 16-channel first stage, r = 32 leaves no channel, so the
reduction ratios are 2, 4, 8 and 16.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import sys
import time

import numpy as np
from flax import nnx

import se_jax
from experiments import cli, data, files, paper, trainer
from experiments.configs import common
from experiments.provenance import markdown_header, provenance
from se_jax.attention.se import SEOptions
from se_jax.models import Placement, plain_twin

_HERE = os.path.dirname(os.path.abspath(__file__))
CONVERGED_REPORT = os.path.join(_HERE, "results", "converged", "report.json")

# group -> [(variant label, SE options or None for no SE, paper row)].
GROUPS = {
    "baseline": [("no SE", None, paper.ABLATION_BASELINE[:2])],
    "reduction": [(f"r = {r}", dict(reduction=float(r)),
                   paper.TABLE10_REDUCTION[r][:2]) for r in (2, 4, 8, 16)],
    "squeeze": [(op, dict(squeeze=op), paper.TABLE11_SQUEEZE[op])
                for op in ("avg", "max")],
    "excitation": [(g, dict(gate=g), paper.TABLE12_EXCITATION[g])
                   for g in ("sigmoid", "tanh", "relu")],
    "stages": [(f"stage {s}", dict(se_stages=(s,)),
                paper.TABLE13_STAGES[(s,)][:2]) for s in (2, 3, 4)]
              + [("all", dict(se_stages=None),
                  paper.TABLE13_STAGES[(2, 3, 4, 5)][:2])],
    "integration": [(i, dict(integration=i), paper.TABLE14_INTEGRATION[i])
                    for i in ("standard", "pre", "post", "identity")],
    "se_3x3": [("SE_3x3", dict(position="3x3"), paper.TABLE15_SE_3X3[:2])],
    "no_squeeze": [("NoSqueeze", dict(no_squeeze=True),
                    paper.TABLE16_NO_SQUEEZE[:2])],
    # SE and its successors in the same slot, each with its paper's
    # defaults (SE as in the other groups, so it shares their runs).
    "attention": [
        (kind, {} if kind == "se" else dict(attention=kind),
         (paper.ATTENTION_RESNET50.get(kind, {}).get("attention")
          or (None, None))[:2])
        for kind in se_jax.attention.KINDS],
}


# The SE block of the paper's ablations: C // r, no FC biases (Sec. 6),
# every option and the placement set explicitly (see `run_key`).
ABLATION_SE = {**dataclasses.asdict(SEOptions(rounding="paper", se_bias=False)),
               **dataclasses.asdict(Placement())}


def run_key(config) -> str:
  """A name for the network and recipe of `config`, without the seed.

  Every SE option is set explicitly (`make_config`), so the variants that
  build the same network (r = 16, avg, sigmoid, all stages, standard
  integration) share one key, and one run per seed.
  """
  what = trainer.recipe(config)
  what.pop("seed")
  digest = hashlib.sha256(
      json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]
  return f"{config.model}-{digest}"


def make_config(args, se_options: dict | None, seed: int):
  c = common.short_run(
      dataset=args.dataset,
      model=args.model if se_options is not None else args.baseline,
      seed=seed, epochs=args.epochs, batch_size=args.batch_size,
      learning_rate=args.lr, max_train_examples=args.train_examples,
      max_eval_examples=args.eval_examples)
  c.log_every_steps = 50
  c.progress = not args.no_progress
  if se_options is not None:
    kind = se_options.get("attention", "se")
    base = ABLATION_SE if kind == "se" else dataclasses.asdict(Placement())
    for k, v in {**base, **se_options}.items():
      c.model_options[k] = float(v) if k == "reduction" else v
  c.lock()
  return c


def run_group(args, group: str, seeds: list[int]) -> list[dict]:
  info = data.DATASETS[args.dataset]
  shape = (info.image_size, info.image_size, info.channels)
  rows = []
  for label, options, paper_row in GROUPS[group]:
    errs, secs = [], []
    for seed in seeds:
      config = make_config(args, options, seed)
      key = run_key(config)
      wd = os.path.join(args.workdir, "runs", f"{key}_seed{seed}")
      result = trainer.finished_result(config, wd)
      if result is None:
        print(f"[{group}] {label}, seed {seed} -> {wd}", file=sys.stderr,
              flush=True)
        result = trainer.train_and_evaluate(config, wd)
      errs.append(result["top1_err"])
      secs.append(result["train_seconds"])
    model = nnx.eval_shape(lambda: trainer.build_model(config,
                                                       rngs=nnx.Rngs(0)))
    rows.append(dict(
        group=group, variant=label, options=options, run_key=key,
        seeds=seeds,
        test_err=errs, mean=float(np.mean(errs)),
        std=float(np.std(errs, ddof=1)) if len(errs) > 1 else 0.0,
        params=se_jax.count_params(model),
        macs=se_jax.count_flops(model, shape), train_seconds=secs,
        paper_top1=paper_row[0], paper_top5=paper_row[1]))
  return rows


def budget_note(rows, args, converged: dict | None) -> str:
  """What this budget can show about the variants, against the converged
  study's comparison of the same two networks (its report.json)."""
  base = [r for r in rows if r["group"] == "baseline"]
  se = [r for r in rows if r["group"] != "baseline" and r["options"] is not
        None and r["run_key"] == _standard_key(args, r["seeds"][0])]
  if not base or not se or converged is None:
    return ""
  b, s = base[0], se[0]
  gap = s["mean"] - b["mean"]
  c = converged["comparison"]
  n = len(c["seeds"])
  text = (
      f"**What this budget can show.** Every network here trains"
      f" {args.epochs:g} epoch(s) on {args.train_examples or 'all'} images,"
      f" and the standard SE block ends {gap:+.2f} points against the"
      f" network without SE. Trained to convergence (10 epochs on all"
      " training images: `python -m experiments.converged`, report in"
      " experiments/results/converged/report.md), ")
  if n >= 2 and c.get("welch"):
    w = c["welch"]
    text += (
        f"the two networks differ by {w['mean']:+.2f} points over {n} seeds"
        f" (95% CI [{w['low']:+.2f}, {w['high']:+.2f}]).")
    if w["low"] <= gap <= w["high"]:
      text += (" The one-epoch gap lies inside that interval, but")
    else:
      text += (" The one-epoch gap lies outside that interval, so what"
               " SE does after one short epoch is not what it does once"
               " trained, and")
  elif n == 1:
    text += (
        f"the one seed finished so far gives {c['attention'][0]:.2f}%"
        f" against {c['baseline'][0]:.2f}% ({c['attention'][0] - c['baseline'][0]:+.2f}"
        " points). With one seed no interval exists, but")
  else:
    return ""
  distinct = list({r["run_key"]: r["mean"] for r in rows}.values())
  pairs = [abs(a - b) for i, a in enumerate(distinct) for b in distinct[:i]]
  text += (
      " what one short epoch measures is how fast a variant starts to"
      " learn, not how good it is once trained; and here the seeds' standard"
      f" deviations run from {min(r['std'] for r in rows):.2f} to"
      f" {max(r['std'] for r in rows):.2f} points, while the median"
      f" difference between two variants' means is {np.median(pairs):.2f}"
      " points. This budget cannot rank the variants; the paper's tables"
      " (right-hand column) come from full ImageNet training.")
  return text


def _standard_key(args, seed: int) -> str:
  """The run key of the paper's default SE block under this recipe."""
  return run_key(make_config(args, {}, seed))


def to_markdown(rows, prov, args, converged: dict | None = None,
                written_by: str | None = None) -> str:
  out = [markdown_header("SE ablations at CPU scale", prov), ""]
  if written_by:
    out.append(written_by + "\n")
  out.append(
      f"`{args.model}` (baseline `{args.baseline}`) on {args.dataset},"
      f" {args.epochs:g} epoch(s) on {args.train_examples or 'all'} training"
      f" images, SGD momentum 0.9, lr {args.lr} cosine, batch"
      f" {args.batch_size}; FC biases off, C_r = C // r. Test error over"
      f" {args.eval_examples or 'all'} test images, mean +- std over seeds"
      f" {', '.join(map(str, rows[0]['seeds']))}. Paper: SE-ResNet-50 on"
      " ImageNet, top-1 / top-5 error (Tables 10-16)"
      + ("; for the attention group, ResNet-50 with each kind as its own"
         " source reports it (experiments/paper.py, ATTENTION_RESNET50), '-'"
         " where none does. The SE options (FC biases off, C // r) apply to"
         " SE only; every other kind has its paper's defaults.\n"
         if any(r["group"] == "attention" for r in rows) else ".\n"))
  out.append("| group | variant | test error (%) | each seed | params |"
             " multiply-adds | paper top-1 / top-5 |\n"
             "|---|---|---|---|---|---|---|")
  for r in rows:
    each = ", ".join(f"{e:.2f}" for e in r["test_err"])
    out.append(
        f"| {r['group']} | {r['variant']} | {r['mean']:.2f} +- {r['std']:.2f}"
        f" | {each} | {r['params']:,} | {r['macs']:,} | "
        + ("-" if r["paper_top1"] is None else
           f"{r['paper_top1']:.2f} / {r['paper_top5']:.2f}") + " |")
  out.append("\n![Test error of each variant](ablations.png)")
  shared: dict[str, list[str]] = {}
  for r in rows:
    shared.setdefault(r["run_key"], []).append(
        f"{r['group']} {r['variant']}")
  for names in shared.values():
    if len(names) > 1:
      out.append(f"\n{', '.join(names)} build the same network and share"
                 " their runs.")
  base = [r for r in rows if r["group"] == "baseline"]
  if base:
    b = base[0]
    variants = {r["run_key"]: r for r in rows if r["group"] != "baseline"}
    better = [r for r in variants.values() if r["mean"] < b["mean"]]
    out.append(
        f"\n{len(better)} of {len(variants)} distinct SE networks have a"
        f" lower mean test error than the network without SE"
        f" ({b['mean']:.2f}%)"
        + (": " + ", ".join(f"{r['group']} {r['variant']}" for r in better)
           if better else "") + ".")
    if len(b["test_err"]) > 1:
      # Standard error of the difference of two means over the seeds.
      clear = [r for r in variants.values() if abs(r["mean"] - b["mean"])
               > 2 * np.hypot(r["std"], b["std"]) / np.sqrt(len(r["seeds"]))]
      out.append(
          f"{len(clear)} of them differ from it by more than two standard"
          " errors of the difference"
          + (": " + ", ".join(
              f"{r['group']} {r['variant']} ({r['mean'] - b['mean']:+.2f})"
              for r in clear) if clear else
             "; at this scale the other differences are within seed noise")
          + ".")
  note = budget_note(rows, args, converged)
  if note:
    out.append("\n" + note)
  return "\n".join(out) + "\n"


def plot(rows, path: str, title: str) -> None:
  """Test error of each variant: mean +- std, each seed a dot, and the
  network without SE as a vertical band (its mean +- std)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7.0, 0.32 * len(rows) + 1.4))
  y = np.arange(len(rows))[::-1]
  groups = list(dict.fromkeys(r["group"] for r in rows))
  cmap = plt.get_cmap("tab10")
  for yi, r in zip(y, rows):
    color = cmap(groups.index(r["group"]) % cmap.N)
    ax.errorbar(r["mean"], yi, xerr=r["std"], fmt="o", color=color,
                capsize=3, ms=5)
    ax.plot(r["test_err"], [yi] * len(r["test_err"]), "x", color=color,
            ms=4, alpha=0.6)
  base = [r for r in rows if r["group"] == "baseline"]
  if base:
    b = base[0]
    ax.axvspan(b["mean"] - b["std"], b["mean"] + b["std"], color="0.85",
               zorder=0)
    ax.axvline(b["mean"], color="0.4", ls="--", lw=1, zorder=0)
  ax.set_yticks(y, [f"{r['group']}: {r['variant']}" for r in rows],
                fontsize=8)
  ax.set_xlabel("test error (%): mean +- std over seeds, x = each seed")
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
  """The command line, with --quick applied."""
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--groups", default=",".join(GROUPS),
                 help=f"comma-separated, from {', '.join(GROUPS)}")
  p.add_argument("--seeds", default="0,1,2", type=common.parse_seeds)
  p.add_argument("--dataset", default="fashion_mnist",
                 choices=sorted(data.DATASETS))
  p.add_argument("--model", default="cifar_se_resnet20")
  p.add_argument("--baseline", default=None,
                 help="the network without SE; default the model's plain"
                      " twin in the registry")
  p.add_argument("--epochs", type=cli.positive, default=1.0)
  p.add_argument("--train-examples", type=cli.at_least(1), default=20000)
  p.add_argument("--eval-examples", type=cli.at_least(1), default=None)
  p.add_argument("--batch-size", type=cli.at_least(1), default=128)
  p.add_argument("--lr", type=cli.positive, default=0.1)
  p.add_argument("--quick", action="store_true",
                 help="a smoke run: 1024 training and 500 test images")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--workdir", default="workdirs/ablations")
  p.add_argument("--report-dir",
                 default=os.path.join(_HERE, "results", "ablations"))
  p.add_argument("--converged-report", default=CONVERGED_REPORT,
                 help="the converged study's report.json, whose comparison"
                      " the report sets beside this budget's")
  p.add_argument("--report-only", action="store_true",
                 help="train nothing: write ablations.md and the figure"
                      " again from REPORT_DIR/ablations.json, under the"
                      " options of the command that measured it")
  args = p.parse_args(argv)
  args.groups = [g for g in args.groups.split(",") if g]
  if args.baseline is None:
    args.baseline = plain_twin(args.model)
  unknown = sorted(set(args.groups) - set(GROUPS))
  if unknown:
    p.error(f"unknown group(s) {unknown}; choose from {list(GROUPS)}")
  if args.quick:
    args.train_examples, args.eval_examples = 1024, 500
    args.epochs = min(args.epochs, 1.0)
    if args.report_dir == p.get_default("report_dir"):
      args.report_dir = os.path.join(args.workdir, "report_quick")
    args.workdir = os.path.join(args.workdir, "quick")
  return args


def _load_converged(path: str) -> dict | None:
  if not path or not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def rewrite_report(args) -> list[dict]:
  """ablations.md and its figure from the measurements in ablations.json,
  with the measuring run's provenance and options."""
  path = os.path.join(args.report_dir, "ablations.json")
  if not os.path.exists(path):
    raise SystemExit(f"--report-only: no {path}; run the ablations first.")
  with open(path) as f:
    saved = json.load(f)
  prov, rows = saved["provenance"], saved["rows"]
  measured = parse_args(shlex.split(prov["command"])[3:])
  commit = provenance()["commit"]
  md = to_markdown(
      rows, prov, measured, _load_converged(args.converged_report),
      written_by=f"Report text written from ablations.json by `python -m"
                 f" experiments.ablations --report-only` at commit {commit}.")
  plot(rows, os.path.join(args.report_dir, "ablations.png"),
       f"{measured.model} on {measured.dataset}; band: {measured.baseline}")
  files.write_atomic(os.path.join(args.report_dir, "ablations.md"), md)
  print(md)
  return rows


def main(argv=None):
  args = parse_args(argv)
  if args.report_only:
    return rewrite_report(args)
  groups, seeds = args.groups, args.seeds
  os.makedirs(args.report_dir, exist_ok=True)
  prov = provenance()
  t0 = time.perf_counter()
  rows = []
  for group in groups:
    rows.extend(run_group(args, group, seeds))
  md = to_markdown(rows, prov, args, _load_converged(args.converged_report))
  files.write_json(os.path.join(args.report_dir, "ablations.json"),
                   {"provenance": prov, "rows": rows,
                    "wall_seconds": time.perf_counter() - t0})
  plot(rows, os.path.join(args.report_dir, "ablations.png"),
       f"{args.model} on {args.dataset}; band: {args.baseline}")
  files.write_atomic(os.path.join(args.report_dir, "ablations.md"), md)
  print(md)
  return rows


if __name__ == "__main__":
  cli.main_guard(main)()
