"""The paper's cost figures, recomputed from se_jax's models.

Counts parameters and multiply-adds of every network whose cost the paper
reports (Tables 2, 10, 13, 15, 16) and writes them beside the paper's numbers
to experiments/results/cost_table.md and cost_table.json.

  python -m experiments.cost_table [--out DIR]

Paper numbers: experiments/paper.py (Hu et al., TPAMI 2019). The models are
built abstractly (``nnx.eval_shape``), so the whole table takes seconds.
"""

from __future__ import annotations

import argparse
import json
import os

from flax import nnx

import se_jax
from experiments import cli, files, paper
from experiments.provenance import markdown_header, provenance
from se_jax.models import create

IMAGENET = (224, 224, 3)
_HERE = os.path.dirname(os.path.abspath(__file__))


def _cost(name: str, **overrides) -> tuple[float, float]:
  """(params in M, GFLOPs = 1e9 multiply-adds) of a model at 224x224."""
  model = nnx.eval_shape(lambda: create(name, **overrides))
  return (se_jax.count_params(model) / 1e6,
          se_jax.count_flops(model, IMAGENET) / 1e9)


def _describe(name: str, overrides: dict) -> str:
  opts = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
  return f"`{name}`" + (f" ({opts})" if opts else "")


def compute() -> dict:
  """Every row of the table, as plain data."""
  rows = {"table2": [], "ablations": [], "attention": [], "timm": []}
  for model, spec in paper.TABLE2.items():
    for kind, name in zip(("baseline", "se"), spec["names"]):
      params, gflops = _cost(name)
      label = model if kind == "baseline" else f"SE-{model}"
      rows["table2"].append(dict(
          model=label, build=_describe(name, {}), params_m=params,
          gflops=gflops, paper_gflops=spec[kind][2],
      ))

  def ablation(table, label, paper_params, paper_gflops=None, **overrides):
    for bias in (True, False):
      o = dict(rounding="paper", se_bias=bias, **overrides)
      params, gflops = _cost("legacy_se_resnet50", **o)
      rows["ablations"].append(dict(
          table=table, variant=label, se_bias=bias,
          build=_describe("legacy_se_resnet50", o), params_m=params,
          gflops=gflops, paper_params_m=paper_params,
          paper_gflops=paper_gflops,
      ))

  for r, (_, _, p) in paper.TABLE10_REDUCTION.items():
    ablation("10", f"r = {r}", p, reduction=r)
  for stages, (_, _, p) in paper.TABLE13_STAGES.items():
    label = "all stages" if len(stages) == 4 else f"stage {stages[0]} only"
    ablation("13", label, p, se_stages=stages)
  _, _, p, g = paper.TABLE15_SE_3X3
  ablation("15", "SE_3x3", p, g, position="3x3")
  _, _, p, g = paper.TABLE16_NO_SQUEEZE
  ablation("16", "NoSqueeze", p, g, no_squeeze=True)

  # Every attention kind on the Caffe-layout ResNet-50 whose 3.86 GFLOPs
  # the papers report, with its default options.
  base_params, base_gflops = _cost("legacy_resnet50")
  for kind in se_jax.attention.KINDS:
    params, gflops = _cost("legacy_resnet50", attention=kind)
    spec = paper.ATTENTION_RESNET50.get(kind, {})
    theirs, base = spec.get("attention"), spec.get("baseline")
    rows["attention"].append(dict(
        kind=kind, params_m=params, gflops=gflops,
        extra_params_m=params - base_params, extra_gflops=gflops - base_gflops,
        paper_params_m=theirs[2] if theirs else None,
        paper_gflops=theirs[3] if theirs else None,
        paper_extra_params_m=(theirs[2] - base[2]) if theirs and base
        and theirs[2] is not None and base[2] is not None else None,
        source=spec.get("source", "")))

  for ours, theirs in (("resnet50", "resnet50"), ("se_resnet50", "seresnet50")):
    model = nnx.eval_shape(lambda: create(ours))
    rows["timm"].append(dict(
        model=ours, timm=theirs, params=se_jax.count_params(model),
        timm_params=paper.TIMM_PARAMS[theirs],
    ))
  return rows


def _pct(a: float, b: float) -> str:
  return f"{100 * (a / b - 1):+.2f}%"


def to_markdown(rows: dict, prov: dict) -> str:
  out = [markdown_header("Cost table: se_jax against the paper", prov)]
  out.append(
      "\nGFLOPs are billions of multiply-adds of one 224x224 forward pass,"
      " counted over convolutions and fully connected layers (padding taps"
      " included) by `se_jax.count_flops`, in the Caffe layouts the paper"
      " measured (stride on the first 1x1 conv for ResNets; on the 3x3 for"
      " the released ResNeXts). Paper: Hu et al., TPAMI 2019.\n"
  )
  out.append("\n## Table 2: multiply-adds\n")
  out.append("| model | built as | params (M) | GFLOPs (ours) | GFLOPs"
             " (paper) | diff |\n|---|---|---|---|---|---|")
  for r in rows["table2"]:
    out.append(
        f"| {r['model']} | {r['build']} | {r['params_m']:.2f} |"
        f" {r['gflops']:.3f} | {r['paper_gflops']:.2f} |"
        f" {_pct(r['gflops'], r['paper_gflops'])} |"
    )
  out.append(
      "\n## Tables 10, 13, 15, 16: SE-ResNet-50 ablations\n\nThe paper drops"
      " the FC biases in its ablation runs (Sec. 6); its parameter counts are"
      " closer to the biased blocks, so both are listed.\n"
  )
  out.append("| table | variant | FC bias | params (M) | params (paper) |"
             " diff (M) | GFLOPs | GFLOPs (paper) |\n"
             "|---|---|---|---|---|---|---|---|")
  for r in rows["ablations"]:
    pg = r["paper_gflops"]
    out.append(
        f"| {r['table']} | {r['variant']} | {'yes' if r['se_bias'] else 'no'}"
        f" | {r['params_m']:.3f} | {r['paper_params_m']:.1f} |"
        f" {r['params_m'] - r['paper_params_m']:+.3f} | {r['gflops']:.3f} |"
        f" {'' if pg is None else f'{pg:.2f}'} |"
    )
  out.append(
      "\n## SE's successors on ResNet-50\n\nEach attention kind of"
      " `se_jax.attention` in every unit of the Caffe-layout ResNet-50"
      " (`legacy_resnet50`, 3.858 GFLOPs, the layout of the papers' 3.86),"
      " with its default options. Multiply-adds count convolutions and"
      " fully connected layers only, so the elementwise work of a kind"
      " (pooling, gating; all of SimAM) is not in them. The papers' columns"
      " are the numbers their sources print; \"extra\" is the kind's row"
      " minus the same source's ResNet-50 row.\n")
  out.append("| kind | params (M) | extra params (M) | GFLOPs | extra"
             " GFLOPs | paper params (M) | paper extra (M) | paper GFLOPs |"
             " source |\n|---|---|---|---|---|---|---|---|---|")
  fmt = lambda v, f: "-" if v is None else format(v, f)
  for r in rows["attention"]:
    out.append(
        f"| {r['kind']} | {r['params_m']:.3f} | {r['extra_params_m']:+.3f} |"
        f" {r['gflops']:.3f} | {r['extra_gflops']:+.4f} |"
        f" {fmt(r['paper_params_m'], '.2f')} |"
        f" {fmt(r['paper_extra_params_m'], '+.2f')} |"
        f" {fmt(r['paper_gflops'], '.2f')} | {r['source']} |")
  out.append("\n## Exact parameter counts against timm\n")
  out.append("| se_jax | timm | params (ours) | params (timm) |\n|---|---|---|---|")
  for r in rows["timm"]:
    out.append(f"| `{r['model']}` | `{r['timm']}` | {r['params']:,} |"
               f" {r['timm_params']:,} |")
  return "\n".join(out) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(_HERE, "results"),
                      help="folder for cost_table.md and cost_table.json")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  prov = provenance()
  print("Counting parameters and multiply-adds of the paper's models...",
        flush=True)
  rows = compute()
  md = to_markdown(rows, prov)
  files.write_atomic(os.path.join(args.out, "cost_table.json"),
                json.dumps({"provenance": prov, **rows}, indent=2) + "\n")
  files.write_atomic(os.path.join(args.out, "cost_table.md"), md)
  print(md)
  print(f"Wrote {args.out}/cost_table.md and cost_table.json")


if __name__ == "__main__":
  cli.main_guard(main)()
