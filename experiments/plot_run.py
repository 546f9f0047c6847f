"""Training curves of one or more runs, from their metrics.jsonl.

  python -m experiments.plot_run --workdir DIR [--workdir DIR2 ...] --out PNG
"""

from __future__ import annotations

import argparse
import json
import os


def plot_curves(runs: list[tuple[str, str]], path: str) -> None:
  """Train loss by step and test error by epoch, one line per run.

  Args:
    runs: (label, workdir) pairs.
    path: the PNG to write.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
  for name, wd in runs:
    with open(os.path.join(wd, "metrics.jsonl")) as f:
      recs = [json.loads(l) for l in f]
    train = [(r["step"], r["loss"]) for r in recs if r["split"] == "train"]
    evals = [(r["epoch"], r["top1_err"]) for r in recs if r["split"] == "eval"]
    if train:
      a.plot(*zip(*train), lw=0.8, label=name)
    if evals:
      b.plot(*zip(*evals), marker="o", label=name)
  a.set_xlabel("step")
  a.set_ylabel("train loss")
  a.legend()
  b.set_xlabel("epoch")
  b.set_ylabel("test error (%)")
  b.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", action="append", required=True,
                 help="a run's workdir (repeat for several runs)")
  p.add_argument("--out", required=True, help="PNG file to write")
  args = p.parse_args(argv)
  for wd in args.workdir:
    if not os.path.exists(os.path.join(wd, "metrics.jsonl")):
      p.error(f"{wd} has no metrics.jsonl; is it a training workdir?")
  plot_curves([(os.path.basename(os.path.normpath(wd)), wd)
               for wd in args.workdir], args.out)
  print(f"Wrote {args.out}")


if __name__ == "__main__":
  main()
