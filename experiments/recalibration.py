"""Adaptive recalibration: does SE help, and what do its gates do?

  python -m experiments.recalibration [--dataset fashion_mnist]
      [--model cifar_se_resnet20] [--epochs 1.5] [--seeds 0] [--quick]
      [--write-results]
  python -m experiments.recalibration --weights legacy_seresnet50
      --dataset imagenet2012

Trains a CIFAR-style ResNet and the same network with SE blocks under one
recipe and seed (the analogue of the paper's Table 4), then reads the SE
gates of the trained network on the test set and repeats the paper's
role-of-excitation analysis (Sec. 7.2): per-class mean gates of sampled
channels for the last SE block of each stage and every block of the last
stage (Fig. 6), within-class mean and spread for two classes (Fig. 7), and
numbers for what those figures show by eye (`se_jax.analysis`).

With ``--weights`` nothing is trained: the gates are those of a pretrained
network, a checkpoint directory written by ``python -m
experiments.convert_timm`` or a timm model name converted on the fly (which
needs the network and the torch extra). On ImageNet this is the paper's own
protocol (experiments/paper.py, ROLE_OF_EXCITATION): goldfish, pug, airliner
and cliff with their 50 validation images each, 50 sampled channels, blocks
SE_2_3 to SE_5_3, and the mean over all evaluated images.

The report puts the run beside the committed converged study
(experiments/results/converged, `python -m experiments.converged`): the
test errors of its seeds, the gate measures of every block, and how close
this run's gates are to those of the converged network of the same seed.
It never counts the study's runs as its own.

Everything lands in --report-dir (default WORKDIR/report): report.md,
report.json (every number) and the figures; ``--write-results`` writes the
committed experiments/results/recalibration instead. Training runs live in
--workdir; rerunning the command resumes unfinished runs and reuses finished
ones. On two CPU cores the default run takes 8 to 18 minutes and --quick
under 3.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import NamedTuple
import sys
import time

import jax
import numpy as np
from flax import nnx

import se_jax
from experiments import cli, data, files, paper, study_report, trainer
from experiments.configs import common
from experiments.plot_run import plot_curves
from experiments.provenance import markdown_header, provenance
from se_jax import analysis
from se_jax.analysis import class_gate_profiles, gate_statistics
from se_jax.models import capture_gates

_HERE = os.path.dirname(os.path.abspath(__file__))

# The main job's budget: both networks for this many epochs (702 steps each
# at batch 128), then the analysis: 17.6 minutes on the slowest two-core
# machine measured (AMD EPYC, 0.70 s per step with the data pipeline and
# huge pages advised; 20.6 minutes on 4 KiB pages), about 8 on a two-core
# Xeon. Two epochs took 20.5 minutes on a faster day of the same machine.
# The converged study's gates reach a correlation of 0.9 with their final
# class profiles after about 4.3 epochs, beyond any 20-minute run, so the
# report says where this leaves the gates: their correlation with the
# converged network of the same seed, and the epoch of the converged run's
# own training at which its gates were as close (the study's trajectory).
DEFAULT_EPOCHS = 1.5

# What Figs. 6-7 of the paper show, block by block (Sec. 7.2;
# docs/reference/facts.md, The role of excitation).
PAPER_FINDINGS = (
    "early blocks are nearly class-agnostic (the same gate profile for every"
    " class); deeper blocks become class-specific; SE_5_2 saturates near 1"
    " (close to identity); SE_5_3 differs between classes mainly by a scale.")


def make_config(args, model: str, seed: int):
  """The shared recipe: only the model differs between the two runs."""
  c = common.short_run(
      dataset=args.dataset, model=model, seed=seed, epochs=args.epochs,
      batch_size=args.batch_size, learning_rate=args.lr,
      max_train_examples=4096 if args.quick else None,
      max_eval_examples=1000 if args.quick else None)
  c.log_every_steps = 20
  c.data_dir = args.data_dir
  c.lock()
  return c


class GateSample(NamedTuple):
  """What `collect_gates` read from a network over an evaluation set.

  Attributes:
    gates: ``{block: (n, C)}`` gates of the kept images.
    labels: (n,) labels of the kept images.
    overall: ``{block: (C,)}`` mean gates over all evaluated images.
    images: how many images were evaluated.
    top1_err: top-1 error (%) of the network over all evaluated images.
  """

  gates: dict[str, np.ndarray]
  labels: np.ndarray
  overall: dict[str, np.ndarray]
  images: int
  top1_err: float


def collect_gates(model, source, transform, *, batch_size: int,
                  max_examples: int | None,
                  keep_classes=None) -> GateSample:
  """Gates of every SE block over an evaluation set.

  Args:
    model: a network with SE blocks.
    source: a random-access source of ``{"image", "label"}`` records.
    transform: ``record -> {"image", "label"}``, the evaluation transform.
    batch_size: images per forward pass.
    max_examples: evaluate only the first examples of `source`.
    keep_classes: keep the gates of these classes' images only (the others
      count towards the overall mean and the error); None keeps all.

  Returns:
    A `GateSample`.
  """
  graphdef, state = nnx.split(model)
  capture = jax.jit(
      lambda state, x: capture_gates(nnx.merge(graphdef, state), x,
                                     with_outputs=True))
  gates: dict[str, list[np.ndarray]] = {}
  sums: dict[str, np.ndarray] = {}
  labels, images, correct = [], 0, 0
  for batch in data.eval_batches(source, transform, global_batch=batch_size,
                                 max_examples=max_examples,
                                 num_threads=data.input_threads(None)):
    valid = batch["mask"] > 0
    logits, out = capture(state, batch["image"])
    y = batch["label"]
    keep = valid if keep_classes is None else valid & np.isin(
        y, list(keep_classes))
    images += int(valid.sum())
    correct += int((np.argmax(np.asarray(logits), -1) == y)[valid].sum())
    for name, g in out.items():
      g = np.asarray(g, np.float64)
      sums[name] = sums.get(name, 0.0) + g[valid].sum(0)
      gates.setdefault(name, []).append(g[keep].astype(np.float32))
    labels.append(y[keep])
  if images == 0:
    raise ValueError("the evaluation set is empty.")
  return GateSample(
      gates={k: np.concatenate(v) for k, v in gates.items()},
      labels=np.concatenate(labels),
      overall={k: (v / images).astype(np.float32) for k, v in sums.items()},
      images=images, top1_err=100.0 * (1 - correct / images))


def describe(results: dict) -> list[str]:
  """What the numbers say, in words, generated from the numbers."""
  lines = []
  table = results["table"]
  for seed_rows in _by_seed(table).values():
    base, se = seed_rows["baseline"], seed_rows["se"]
    diff = base["test_err"] - se["test_err"]
    verb = ("lowered" if diff > 0 else "did not lower")
    lines.append(
        f"Seed {se['seed']}: SE {verb} the test error, {base['test_err']:.2f}%"
        f" -> {se['test_err']:.2f}% ({-diff:+.2f} points), for"
        f" {100 * (se['params'] / base['params'] - 1):+.1f}% parameters,"
        f" {100 * (se['macs'] / base['macs'] - 1):+.2f}% multiply-adds and"
        f" {100 * (se['train_seconds'] / base['train_seconds'] - 1):+.0f}%"
        " training time on this machine."
    )
  stats = results["gate_stats"]
  blocks = results["blocks"]
  shares = [(b, stats[b]["class_share"]) for b in blocks]
  first, last = shares[0], shares[-1]
  rising = all(a[1] <= b[1] + 0.02 for a, b in zip(shares, shares[1:]))
  lines.append(
      f"Class dependence: the share of gate variance explained by the class"
      f" goes from {first[1]:.2f} in {first[0]} to {last[1]:.2f} in"
      f" {last[0]}" + (" and rises with depth" if rising else
                       ", not monotonically")
      + "; " + ", ".join(f"{b} {s:.2f}" for b, s in shares) + "."
  )
  wc = [(b, stats[b]["within_class_std"]) for b in blocks]
  constant = [b for b, s in wc if s < 1e-3]
  varying = [(b, s) for b, s in wc if s >= 1e-3]
  if varying:
    lines.append(
        "Input dependence: within a class the gates of "
        + ", ".join(b for b, _ in varying) + " still vary from image to"
        " image (mean within-class std " + ", ".join(
            f"{b} {s:.3f}" for b, s in varying) + "), so they are not a"
        " function of the class alone: there the recalibration is adaptive."
    )
  if constant:
    lines.append(
        "Constant gates: " + ", ".join(constant) + (" gives" if len(
            constant) == 1 else " give") + " every image the same gates"
        " (within-class std below 0.001, class share "
        + ", ".join(f"{stats[b]['class_share']:.2f}" for b in constant)
        + "): such a block scales its channels by fixed factors and does not"
        " recalibrate."
    )
  ident = min(blocks, key=lambda b: stats[b]["mean_abs_from_one"])
  near = stats[ident]["mean_abs_from_one"] < 0.1
  lines.append(
      (f"{ident} is close to identity" if near else
       f"No block is close to identity; the closest is {ident}")
      + f" (mean |gate - 1| = {stats[ident]['mean_abs_from_one']:.3f},"
      f" {100 * stats[ident]['near_one_share']:.0f}% of gates above 0.9)."
  )
  scale_r2 = stats[last[0]]["scale_r2"]
  lines.append(
      f"Scale: in the last block, {last[0]}, a per-class scale explains"
      f" {100 * scale_r2:.0f}% of the between-class differences."
  )
  conv = results.get("converged") or {}
  if conv.get("missing"):
    lines.append("No comparison with a converged study: " + conv["missing"])
  elif conv:
    base, se = conv["errors"]["baseline"], conv["errors"]["attention"]
    mine = conv["this_run"]
    corr = [r["correlation"] for r in conv["blocks"].values()
            if "correlation" in r]
    spread = lambda m: (f"{m[0]:.2f}%" if m[1] is None
                        else f"{m[0]:.2f} +- {m[1]:.2f}%")
    lines.append(
        f"Against the converged study ({len(conv['seeds'])} seed(s) of"
        f" {conv['epochs']:g} epochs): this run's test errors are"
        f" {mine['baseline']:.2f}% without SE and {mine['attention']:.2f}%"
        f" with SE, against {spread(base)} and {spread(se)} converged."
        + (f" Its gates' class profiles correlate with those of the"
           f" converged network of the same seed at"
           f" {min(corr):.2f}-{max(corr):.2f} across the blocks (mean"
           f" {np.mean(corr):.2f})." if corr else "")
        + _equivalence(conv))
    lines.append(
        "What this run can and cannot show: one seed and a short schedule"
        " show how the gates depend on the image and its class, and how far"
        " that is from where training ends; they cannot say whether SE"
        " improves the error, which needs converged networks over several"
        " seeds. The converged study: " + conv["verdict"])
  agree = lambda ok: "as in the paper" if ok else "unlike the paper"
  second_last = blocks[-2] if len(blocks) > 1 else None
  lines.append(
      "Against the paper (" + PAPER_FINDINGS + "): the first analysed block"
      f" is {'less' if first[1] < last[1] else 'not less'} class-dependent"
      f" than the last ({agree(first[1] < last[1])}); the second-to-last"
      f" block is {'' if near and ident == second_last else 'not '}near"
      f" identity ({agree(near and ident == second_last)}); the last block's"
      f" classes differ {'mainly' if scale_r2 > 0.5 else 'not mainly'} by a"
      f" scale ({agree(scale_r2 > 0.5)})."
      + (f" These are the pretrained weights {results['weights']} on"
         f" {results['dataset']}." if results.get("weights") else
         f" This is a small network on {results['dataset']}, not"
         " SE-ResNet-50 on ImageNet: the measures carry over, the values"
         " need not.")
  )
  return lines


def _by_seed(table):
  out: dict[int, dict] = {}
  for row in table:
    out.setdefault(row["seed"], {})[row["kind"]] = row
  return out


def _to_markdown(results: dict, prov: dict) -> str:
  out = [markdown_header("Adaptive recalibration on " + results["dataset"],
                         prov), ""]
  if results["table"]:
    out.append("## SE against the plain network (the Table 4 analogue)\n")
    out.append("| model | seed | test error (%) | top-5 error (%) | params |"
               " multiply-adds | train time (s) |\n"
               "|---|---|---|---|---|---|---|")
    for r in results["table"]:
      out.append(
          f"| `{r['model']}` | {r['seed']} | {r['test_err']:.2f} |"
          f" {r['top5_err']:.2f} | {r['params']:,} | {r['macs']:,} |"
          f" {r['train_seconds']:.0f} |")
    out.append(f"\nRecipe (both runs): {results['recipe']}.\n")
    source = (f"Gates of `{results['analysed_model']}` (seed"
              f" {results['analysed_seed']}) on {results['images']:,} test"
              " images.")
  else:
    source = (
        f"Gates of `{results['analysed_model']}` with the pretrained weights"
        f" {results['weights']}, on {results['images']:,} images of"
        f" {results['dataset']}'s {results['split']} split (top-1 error"
        f" {results['top1_err']:.2f}% on them); the per-class measures use"
        f" the {results['kept_images']:,} images of the classes "
        + ", ".join(results["class_names"]) + ".")
  out.append("## What the gates do (Sec. 7.2 analogue)\n")
  out.append(
      source + " Class share: between-class over total gate variance;"
      " within-class"
      " std: image-to-image spread inside a class; |g-1|: distance from"
      " identity; >0.9 / <0.1: saturated gates; scale R^2: share of the"
      " class differences that a per-class scale explains.\n")
  out.append("| block | channels | class share | within-class std | mean"
             " gate | mean abs(g-1) | > 0.9 | < 0.1 | scale R^2 |\n"
             "|---|---|---|---|---|---|---|---|---|")
  for b in results["blocks"]:
    s = results["gate_stats"][b]
    out.append(
        f"| {b} | {results['channels_per_block'][b]} |"
        f" {s['class_share']:.3f} | {s['within_class_std']:.3f} |"
        f" {s['mean_gate']:.3f} | {s['mean_abs_from_one']:.3f} |"
        f" {100 * s['near_one_share']:.1f}% |"
        f" {100 * s['near_zero_share']:.1f}% | {s['scale_r2']:.2f} |")
  out.append("\n![Fig. 6 analogue](fig6_class_gates.png)\n")
  out.append("*Fig. 6 analogue: per-class mean gate of sampled channels;"
             " dashed: all classes.*\n")
  out.append("![Fig. 7 analogue](fig7_within_class.png)\n")
  out.append("*Fig. 7 analogue: within-class mean and std of the gates for"
             f" {results['fig7_classes'][0]} and {results['fig7_classes'][1]}.*"
             "\n")
  if results["table"]:
    out.append("![Training curves](curves.png)\n")
  conv = results.get("converged") or {}
  if conv and not conv.get("missing"):
    out.append("## Against the converged study\n")
    out.append(
        f"The committed study (experiments/results/converged/report.md):"
        f" {len(conv['seeds'])} seed{'s' * (len(conv['seeds']) != 1)} of"
        f" {conv['epochs']:g} epochs. Measures"
        " of this run beside the study's mean +- std over its seeds;"
        " correlation: of the per-class gate profiles with the converged"
        " network of the same seed, channel by channel (same"
        " initialisation); similarity: of the class structure, whatever the"
        " channels (`se_jax.analysis`).\n")
    out.append("| block | class share (this / converged) | within-class std"
               " | mean abs(g-1) | correlation | similarity |\n"
               "|---|---|---|---|---|---|")
    for b, r in conv["blocks"].items():
      def cell(k, r=r):
        c = r["converged"].get(k)
        return (f"{r['this_run'][k]:.3f} / "
                + ("-" if c is None else f"{c[0]:.3f} +- {c[1]:.3f}"))
      out.append(
          f"| {b} | {cell('class_share')} | {cell('within_class_std')} |"
          f" {cell('mean_abs_from_one')} |"
          f" {r.get('correlation', float('nan')):.2f} |"
          f" {r.get('similarity', float('nan')):.2f} |")
    out.append("")
  out.append("## What the numbers say\n")
  out.extend(f"- {line}" for line in results["summary"])
  return "\n".join(out) + "\n"


def _equivalence(conv: dict) -> str:
  """Where this run's gates sit on the converged run's own trajectory."""
  e = conv.get("equivalent_epoch")
  if e is None:
    return ""
  where = " (the study's section \"How soon the gates settle\")."
  if conv.get("before_first_snapshot"):
    return (" They are further from them than the converged run's own gates"
            f" were at its first snapshot, after {e:.2f} of its"
            f" {conv['epochs']:g} epochs" + where)
  return (" The converged run's own gates were as close to their final"
          f" values after {e:.2f} of its {conv['epochs']:g} epochs" + where)


def against_converged(args, seed, gates, labels, stats, table) -> dict:
  """This run beside the committed converged study: test errors, the gate
  measures of every block, and how close its gates are to those of the
  converged network of the same seed (`se_jax.analysis`'s
  `profile_correlation`, channels matched by the shared initialisation, and
  `profile_similarity`, which needs no matching)."""
  from experiments import converged
  path = os.path.join(args.converged, "report.json")
  if not os.path.exists(path):
    return {"missing": f"no converged study at {args.converged} (run"
                       " python -m experiments.converged)."}
  with open(path) as f:
    study = json.load(f)
  recipe = converged.make_config(args.model, seed)
  if study.get("model") != args.model or args.dataset != recipe.dataset:
    return {"missing": f"the converged study is of {study.get('model')} on"
                       f" {recipe.dataset}, this run of {args.model} on"
                       f" {args.dataset}."}
  out = {"seeds": study["comparison"]["seeds"],
         "epochs": float(recipe.num_epochs),
         "errors": {k: (study["comparison"][f"{k}_mean"],
                        study["comparison"][f"{k}_std"])
                    for k in ("baseline", "attention")},
         "verdict": study["verdict"], "blocks": {}}
  ours = {r["kind"]: r["test_err"] for r in table if r["seed"] == seed}
  out["this_run"] = {"baseline": ours.get("baseline"),
                     "attention": ours.get("se")}
  params = os.path.join(args.converged, "runs",
                        converged.run_name(args.model, seed),
                        converged.PARAMS_FILE)
  reference = None
  if os.path.exists(params):
    print(f"Reading the gates of the converged {args.model}, seed {seed}...",
          file=sys.stderr, flush=True)
    try:
      sample, reference = converged.gate_analysis(
          recipe, params, data_dir=args.data_dir,
          max_examples=len(labels) if len(labels) < 10000 else None)
    except ValueError as e:
      out["note"] = f"the converged parameters do not fit this run: {e}"
    else:
      if not np.array_equal(sample.labels, labels):
        reference = None
  for b in gates:
    row = {"this_run": {k: stats[b][k] for k in ("class_share",
                                                  "within_class_std",
                                                  "mean_abs_from_one")},
           "converged": {k: study["stability"].get(b, {}).get(k)
                         for k in ("class_share", "within_class_std",
                                   "mean_abs_from_one")}}
    if reference is not None and b in reference:
      mine = class_gate_profiles(gates[b], labels)[1]
      theirs = reference[b]["class_means"]
      row["correlation"] = analysis.profile_correlation(mine, theirs)
      row["similarity"] = analysis.profile_similarity(mine, theirs)
    out["blocks"][b] = row
  traj = study.get("trajectory") or {}
  seed_corr = (traj.get("correlation") or {}).get(str(seed))
  corr = {b: r["correlation"] for b, r in out["blocks"].items()
          if "correlation" in r}
  place = (study_report.equivalent_epoch(traj["epochs"], seed_corr, corr)
           if seed_corr and corr else None)
  if place is not None:
    out["equivalent_epoch"], out["before_first_snapshot"] = place
  return out


def _load_weights(weights: str):
  """A pretrained network: a checkpoint directory or a timm model name."""
  if os.path.isdir(weights):
    return se_jax.models.load_pretrained(weights)
  from experiments import convert_timm
  from se_jax import interop
  try:
    state_dict = convert_timm.download_state_dict(weights)
  except convert_timm.ConversionError as e:
    raise SystemExit(
        f"--weights {weights!r} is neither a checkpoint directory nor a timm"
        f" model that could be downloaded: {e} Here: convert the weights"
        " with python -m experiments.convert_timm (which reads a file"
        " offline) and pass its --out directory as --weights.") from None
  return interop.from_timm(weights, state_dict)


def train_and_compare(args, info):
  """Trains the plain and the SE network per seed; the Table 4 analogue."""
  plain = se_jax.models.plain_twin(args.model)
  table, runs = [], []
  for seed in args.seeds:
    for kind, model in (("baseline", plain), ("se", args.model)):
      config = make_config(args, model, seed)
      wd = os.path.join(args.workdir, f"{model}_seed{seed}_ep{args.epochs:g}")
      result = trainer.finished_result(config, wd)
      if result is not None:
        print(f"{model} (seed {seed}): finished earlier, reusing {wd}",
              file=sys.stderr)
      else:
        print(f"Training {model} (seed {seed}) on {args.dataset} for"
              f" {args.epochs:g} epochs -> {wd}", file=sys.stderr, flush=True)
        result = trainer.train_and_evaluate(config, wd)
      abstract = nnx.eval_shape(lambda: trainer.build_model(
          config, rngs=nnx.Rngs(0)))
      table.append(dict(
          kind=kind, model=model, seed=seed, test_err=result["top1_err"],
          top5_err=result["top5_err"], test_loss=result["loss"],
          params=se_jax.count_params(abstract),
          macs=se_jax.count_flops(abstract, (info.image_size,
                                             info.image_size, info.channels)),
          train_seconds=result["train_seconds"], workdir=wd))
      runs.append((f"{model} s{seed}", wd))
  return table, runs


def _parse_ints(text: str | None, what: str, parser) -> list[int] | None:
  if text is None:
    return None
  try:
    return [int(k) for k in text.split(",") if k.strip()]
  except ValueError:
    parser.error(f"{what} must be comma-separated integers, got {text!r}")


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default="fashion_mnist",
                 choices=sorted(data.DATASETS))
  p.add_argument("--model", default="cifar_se_resnet20",
                 help="an SE model of the registry; its plain twin is the"
                      " baseline")
  p.add_argument("--weights", default=None,
                 help="analyse a pretrained network instead of training: a"
                      " directory written by experiments.convert_timm, or a"
                      " timm model name (e.g. legacy_seresnet50; needs the"
                      " network and the torch extra)")
  p.add_argument("--epochs", type=cli.positive, default=DEFAULT_EPOCHS,
                 help="epochs of each network (cosine decay over them)")
  p.add_argument("--seeds", default="0", type=common.parse_seeds,
                 help="comma-separated seeds; each trains both networks")
  p.add_argument("--batch-size", type=cli.at_least(1), default=128)
  p.add_argument("--lr", type=cli.positive, default=0.1)
  p.add_argument("--quick", action="store_true",
                 help="a smoke run: 4096 training and 1000 test images")
  p.add_argument("--channels", type=cli.at_least(1), default=50,
                 help="channels sampled per block for the figures")
  p.add_argument("--classes", default=None,
                 help="class indices of the per-class analysis (default: the"
                      " paper's four with --weights on imagenet2012, else"
                      " all)")
  p.add_argument("--images-per-class", type=cli.at_least(1), default=None,
                 help="at most this many images of each analysed class"
                      " (default: 50 with --weights on imagenet2012)")
  p.add_argument("--max-examples", type=cli.at_least(1), default=None,
                 help="evaluate only the first images of the split")
  p.add_argument("--fig7-classes", default=None,
                 help="two class indices for Fig. 7 (default: the paper's"
                      " goldfish and plane on imagenet2012, else the pair"
                      " whose last-block gate profiles differ most)")
  p.add_argument("--data-dir", default=None, help="TFDS data_dir")
  p.add_argument("--workdir", default="workdirs/recalibration")
  p.add_argument("--report-dir", default=None,
                 help="where the report goes; default WORKDIR/report")
  p.add_argument("--write-results", action="store_true",
                 help="write the report to the committed"
                      " experiments/results/recalibration instead")
  p.add_argument("--converged", default=os.path.join(_HERE, "results",
                                                     "converged"),
                 help="the committed converged study to compare with"
                      " (python -m experiments.converged)")
  args = p.parse_args(argv)
  with_attention = [n for n in se_jax.models.names()
                    if se_jax.models.plain_twin(n) != n]
  if args.weights is None and args.model not in with_attention:
    p.error(f"--model must be a model with attention, got {args.model!r};"
            f" one of: {', '.join(with_attention)}")
  classes = _parse_ints(args.classes, "--classes", p)
  fig7 = _parse_ints(args.fig7_classes, "--fig7-classes", p)
  if fig7 is not None and len(fig7) != 2:
    p.error(f"--fig7-classes takes two classes, got {args.fig7_classes!r}")
  protocol = paper.ROLE_OF_EXCITATION
  papers_setting = args.weights is not None and args.dataset == "imagenet2012"
  if papers_setting:
    classes = classes or list(protocol["classes"])
    fig7 = fig7 or list(protocol["fig7_classes"])
    if args.images_per_class is None:
      args.images_per_class = protocol["images_per_class"]
  info = data.DATASETS[args.dataset]
  if args.quick:
    args.epochs = min(args.epochs, 1.0)
    args.workdir = os.path.join(args.workdir, "quick")
  if args.report_dir is None:
    if args.write_results:
      name = "recalibration" if args.weights is None else (
          "recalibration_" + os.path.basename(os.path.normpath(args.weights))
          + f"_{args.dataset}")
      args.report_dir = os.path.join(_HERE, "results", name)
    else:
      args.report_dir = os.path.join(args.workdir, "report")
  prov = provenance()
  t_start = time.perf_counter()

  table, runs = [], []
  if args.weights is None:
    table, runs = train_and_compare(args, info)
    print("Reading the gates of the trained SE network...", file=sys.stderr,
          flush=True)
    seed = args.seeds[0]
    model, _ = trainer.restore_model(
        make_config(args, args.model, seed),
        os.path.join(args.workdir,
                     f"{args.model}_seed{seed}_ep{args.epochs:g}"))
    _, transform = data.make_transforms(info)
    analysed = args.model
    max_examples = 1000 if args.quick else args.max_examples
  else:
    print(f"Loading the pretrained weights {args.weights}...",
          file=sys.stderr, flush=True)
    model, preprocessing = _load_weights(args.weights)
    transform = data.pretrained_transform(preprocessing)
    analysed = os.path.basename(os.path.normpath(args.weights))
    seed = None
    max_examples = args.max_examples
    print(f"Reading its gates on {args.dataset} ({info.eval_split})...",
          file=sys.stderr, flush=True)
  source = data.get_source(args.dataset, info.eval_split,
                           data_dir=args.data_dir)
  sample = collect_gates(model, source, transform,
                         batch_size=500 if args.weights is None else 50,
                         max_examples=max_examples, keep_classes=classes)
  gates, labels = sample.gates, sample.labels
  if args.images_per_class is not None:
    keep = np.zeros(len(labels), bool)
    for k in np.unique(labels):
      keep[np.flatnonzero(labels == k)[:args.images_per_class]] = True
    gates = {b: g[keep] for b, g in gates.items()}
    labels = labels[keep]
  if len(np.unique(labels)) < 2:
    raise SystemExit(
        f"found images of {len(np.unique(labels))} of the requested classes"
        f" ({classes}) among {sample.images} images; the analysis needs two"
        " or more.")
  names = info.class_names or tuple(str(i) for i in range(info.num_classes))
  if papers_setting:
    names = tuple(protocol["classes"].get(i, n) for i, n in enumerate(names))
  blocks = study_report.selected_blocks(list(gates))
  rng = np.random.default_rng(0)
  channels = {b: np.sort(rng.choice(gates[b].shape[1],
                                    min(args.channels, gates[b].shape[1]),
                                    replace=False)) for b in gates}
  stats = {b: gate_statistics(gates[b], labels)._asdict() for b in gates}
  if fig7 is not None:
    pair = fig7
  else:
    present, mean, _ = class_gate_profiles(gates[blocks[-1]], labels)
    d = ((mean[:, None] - mean[None]) ** 2).sum(-1)
    pair = [int(present[i]) for i in np.unravel_index(np.argmax(d), d.shape)]
  missing = sorted(set(pair) - set(np.unique(labels).tolist()))
  if missing:
    raise SystemExit(f"--fig7-classes {missing} have no analysed images.")

  title = f"{analysed} on {args.dataset}"
  os.makedirs(args.report_dir, exist_ok=True)
  study_report.plot_fig6(gates, labels, sample.overall, blocks, names,
                         channels,
             os.path.join(args.report_dir, "fig6_class_gates.png"), title)
  study_report.plot_fig7(gates, labels, blocks, pair, names, channels,
             os.path.join(args.report_dir, "fig7_within_class.png"), title)
  if runs:
    plot_curves(runs, os.path.join(args.report_dir, "curves.png"))

  results = dict(
      dataset=args.dataset, split=info.eval_split, table=table, blocks=blocks,
      analysed_model=analysed, analysed_seed=seed, weights=args.weights,
      images=sample.images, kept_images=int(len(labels)),
      top1_err=sample.top1_err, gate_stats=stats, all_blocks=list(gates),
      classes=[int(k) for k in np.unique(labels)],
      class_names=[names[k] for k in np.unique(labels)],
      channels_per_block={b: int(gates[b].shape[1]) for b in gates},
      sampled_channels={b: channels[b].tolist() for b in blocks},
      class_means={b: class_gate_profiles(gates[b], labels)[1].tolist()
                   for b in blocks},
      overall_means={b: sample.overall[b].tolist() for b in blocks},
      fig7_classes=[names[k] for k in pair],
      recipe=None if args.weights else (
          f"SGD momentum 0.9, weight decay 1e-4 on weights, batch"
          f" {args.batch_size}, lr {args.lr} with cosine decay,"
          f" {args.epochs:g} epochs"
          + (" on 4096 training images (--quick)" if args.quick else "")
          + f", seed(s) {', '.join(map(str, args.seeds))}; the recipe's"
          f" augmentation for {args.dataset}"),
      wall_seconds=time.perf_counter() - t_start,
  )
  if args.weights is None:
    results["converged"] = against_converged(args, seed, gates, labels,
                                             stats, table)
  results["summary"] = describe(results)
  files.write_json(os.path.join(args.report_dir, "report.json"),
                   {"provenance": prov, **results})
  md = _to_markdown(results, prov)
  files.write_atomic(os.path.join(args.report_dir, "report.md"), md)
  print(md)
  print(f"Wrote {args.report_dir}/report.md, report.json and figures"
        f" ({results['wall_seconds']:.0f} s).", file=sys.stderr)
  return results


if __name__ == "__main__":
  cli.main_guard(main)()
