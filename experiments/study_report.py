"""The pieces of a study's report that need no data pipeline: the
comparison of two networks over seeds, the gate measures of every block and
their stability across seeds, and the figures.

Shared by the CPU studies (`experiments.converged`,
`experiments.recalibration`) and the accelerator run
(`experiments.accelerator_run`), so that all report the same numbers the
same way.
"""

from __future__ import annotations

import numpy as np

from experiments import stats
from se_jax import analysis

__all__ = ["MEASURES", "REACH", "block_measures", "compare", "draw_figures",
           "equivalent_epoch", "plot_curves", "plot_fig6", "plot_fig7",
           "plot_trajectory", "selected_blocks", "stability", "trajectory",
           "verdict"]


def selected_blocks(names: list[str]) -> list[str]:
  """The last SE block of each stage and every block of the last stage."""
  stages: dict[int, list[str]] = {}
  for n in names:
    stages.setdefault(int(n.split("_")[1]), []).append(n)
  last = max(stages)
  picked = [units[-1] for s, units in sorted(stages.items()) if s != last]
  return picked + stages[last]


MEASURES = (("class_share", "class share"),
             ("within_class_std", "within-class std"),
             ("mean_abs_from_one", "mean abs(g-1)"),
             ("near_one_share", "> 0.9"), ("near_zero_share", "< 0.1"),
             ("scale_r2", "scale R^2"),
             ("dead_class_share", "dead classes"))


def block_measures(gates: dict, labels) -> dict:
  """`se_jax.analysis`'s measures of every block's (N, C) gates, with the
  dead-bottleneck shares and the per-class mean profiles."""
  out = {}
  for block, g in gates.items():
    s = analysis.gate_statistics(g, labels)._asdict()
    dead = analysis.dead_gates(g, labels)
    s.update(dead_all=dead.all_inputs, dead_class_share=dead.class_share,
             class_means=analysis.class_gate_profiles(g, labels)[1])
    out[block] = s
  return out


def stability(per_seed: dict) -> dict:
  """Each block's measures over the seeds: ``(mean, std)``, how many seeds
  have it dead everywhere, and how alike the seeds' class structure is."""
  blocks = list(next(iter(per_seed.values()))) if per_seed else []
  seeds = sorted(per_seed)
  out = {}
  for b in blocks:
    row = {}
    for key, _ in MEASURES:
      v = [float(per_seed[s][b][key]) for s in seeds]
      row[key] = (float(np.mean(v)),
                  float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
    row["dead_all_seeds"] = sum(bool(per_seed[s][b]["dead_all"])
                                for s in seeds)
    sims = [analysis.profile_similarity(per_seed[i][b]["class_means"],
                                        per_seed[j][b]["class_means"])
            for k, i in enumerate(seeds) for j in seeds[k + 1:]]
    row["cross_seed_similarity"] = float(np.mean(sims)) if sims else None
    out[b] = row
  return out


# A network's gates are "within reach" of the converged ones when the
# per-class profiles of every block correlate with them at least this much.
REACH = 0.9


def trajectory(runs: dict, steps_per_epoch: float) -> dict:
  """How the gates approach their converged values along training.

  Args:
    runs: ``{seed: {"steps": (S,), "top1_err": (S,), "profiles": {block:
      (S, K, C)}}}``, snapshots in step order, the last one the converged
      network (`experiments.converged.load_trajectory`).
    steps_per_epoch: of the runs' recipe.

  Returns:
    ``{"epochs": (S,) of the first seed, "blocks": [...], "correlation":
    {seed: {block: [S]}}, "min_correlation": {seed: [S]}, "top1_err":
    {seed: [S]}, "reach_epoch": {seed: first epoch before the last
    snapshot at which every block's correlation is >= REACH and stays so,
    or None}}``, correlations by
    `se_jax.analysis.profile_correlation` with the last snapshot.

  Raises:
    ValueError: if the seeds' snapshots are at different steps.
  """
  seeds = sorted(runs)
  if not seeds:
    return {}
  steps = np.asarray(runs[seeds[0]]["steps"])
  for s in seeds[1:]:
    if not np.array_equal(np.asarray(runs[s]["steps"]), steps):
      raise ValueError(
          f"the snapshots of seed {s} are at steps {list(runs[s]['steps'])},"
          f" those of seed {seeds[0]} at {list(steps)}.")
  blocks = list(runs[seeds[0]]["profiles"])
  epochs = steps / float(steps_per_epoch)
  corr, low, reach, err = {}, {}, {}, {}
  for s in seeds:
    prof = runs[s]["profiles"]
    corr[s] = {b: [analysis.profile_correlation(p, prof[b][-1])
                   for p in prof[b]] for b in blocks}
    low[s] = [min(corr[s][b][i] for b in blocks) for i in range(len(steps))]
    within = np.asarray(low[s]) >= REACH
    # The first snapshot from which every later one is within reach; the
    # last snapshot, the converged network itself, does not count.
    first = next((i for i in range(len(steps) - 1) if within[i:].all()),
                 None)
    reach[s] = None if first is None else float(epochs[first])
    err[s] = [float(e) for e in runs[s]["top1_err"]]
  return {"epochs": epochs.tolist(), "blocks": blocks, "correlation": corr,
          "min_correlation": low, "top1_err": err, "reach_epoch": reach}


def equivalent_epoch(epochs, correlation: dict,
                     mine: dict) -> tuple[float, bool] | None:
  """The first snapshot of a long run whose gates are as close to its
  converged gates as another run's are: the epoch at which the snapshot's
  correlation, averaged over the blocks both have, reaches `mine`'s.

  Args:
    epochs: (S,) the snapshots' epochs.
    correlation: ``{block: [S]}``, one seed's `trajectory` correlations.
    mine: ``{block: correlation}`` of the other run with the same converged
      network.

  Returns:
    ``(epoch, before_first)``, `before_first` True when the other run is
    further from the converged gates than even the first snapshot (`epoch`
    is then the first snapshot's); None if no block is shared.
  """
  blocks = [b for b in mine if b in correlation]
  if not blocks:
    return None
  target = float(np.mean([mine[b] for b in blocks]))
  along = np.mean([correlation[b] for b in blocks], axis=0)
  first = next((i for i, v in enumerate(along) if v >= target),
               len(along) - 1)
  return float(epochs[first]), bool(target < along[0])


def plot_trajectory(path: str, traj: dict, title: str) -> None:
  """Each block's correlation with its converged profile, by epoch (mean
  over the seeds), and the lowest block's, seed by seed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(10.5, 3.8))
  x, seeds = traj["epochs"], sorted(traj["correlation"])
  cmap = plt.get_cmap("viridis")
  for i, blk in enumerate(traj["blocks"]):
    y = np.mean([traj["correlation"][s][blk] for s in seeds], axis=0)
    a.plot(x, y, color=cmap(i / max(1, len(traj["blocks"]) - 1)), lw=1.2,
           marker="o", ms=2.5, label=blk)
  for s in seeds:
    b.plot(x, traj["min_correlation"][s], marker="o", ms=2.5, lw=1,
           label=f"seed {s}")
  for ax in (a, b):
    ax.axhline(REACH, color="0.5", ls="--", lw=0.8)
    ax.set_xlabel("epoch")
  a.set_ylabel("correlation with the converged profiles")
  b.set_ylabel("lowest block's correlation")
  a.legend(fontsize=6, ncol=2)
  b.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_curves(path: str, series: list[dict], title: str) -> None:
  """Test error by epoch and training loss by step, one line per run.

  Args:
    path: the PNG to write.
    series: dicts of ``label`` (None: no legend entry), ``color``,
      ``epochs`` and ``errors`` and optionally ``steps`` and ``losses``.
    title: of the figure.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(10.5, 3.8))
  for s in series:
    a.plot(s["epochs"], s["errors"], color=s["color"], marker="o", ms=2.5,
           lw=1, alpha=0.8, label=s["label"])
    if s.get("steps"):
      b.plot(s["steps"], s["losses"], color=s["color"], lw=0.6, alpha=0.6,
             label=s["label"])
  a.set_xlabel("epoch")
  a.set_ylabel("test error (%)")
  a.set_yscale("log")
  a.legend()
  b.set_xlabel("step")
  b.set_ylabel("training loss")
  b.set_yscale("log")
  if b.lines:
    b.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def compare(runs: list[dict], baseline: str, model: str) -> dict:
  """Test errors of the two networks over the seeds both finished."""
  by = {(r["model"], r["seed"]): r["top1_err"] for r in runs}
  seeds = sorted(s for (m, s) in by if m == model and (baseline, s) in by)
  a = [by[(baseline, s)] for s in seeds]
  b = [by[(model, s)] for s in seeds]
  out = {"seeds": seeds, "baseline": a, "attention": b,
         "baseline_mean": float(np.mean(a)) if a else None,
         "attention_mean": float(np.mean(b)) if b else None,
         "baseline_std": float(np.std(a, ddof=1)) if len(a) > 1 else None,
         "attention_std": float(np.std(b, ddof=1)) if len(b) > 1 else None}
  if len(seeds) > 1:
    out["welch"] = stats.welch_difference(a, b)._asdict()
    out["paired"] = stats.paired_difference(a, b)._asdict()
  return out


def verdict(c: dict, baseline: str, model: str) -> str:
  """What the comparison says, in words, from its numbers."""
  n = len(c["seeds"])
  if n < 2:
    return (f"Only {n} seed(s) have both networks; no interval can be"
            " given yet.")
  w, p = c["welch"], c["paired"]
  diff = w["mean"]
  direction = "lower" if diff < 0 else "higher"
  text = (
      f"Over {n} seeds, `{model}` reaches {c['attention_mean']:.2f} +-"
      f" {c['attention_std']:.2f}% test error against"
      f" {c['baseline_mean']:.2f} +- {c['baseline_std']:.2f}% for"
      f" `{baseline}`: {abs(diff):.2f} points {direction}, 95% CI"
      f" [{w['low']:+.2f}, {w['high']:+.2f}] (Welch, p = {w['p']:.3f}); paired"
      f" by seed (same data order and initialisation stream),"
      f" [{p['low']:+.2f}, {p['high']:+.2f}] (p = {p['p']:.3f}). ")
  if w["high"] < 0 or p["high"] < 0:
    strength = ("both intervals exclude zero" if w["high"] < 0 and
                p["high"] < 0 else "the paired interval excludes zero, the"
                " unpaired one does not")
    text += (f"SE helps here: {strength}, so the improvement is unlikely to"
             " be seed noise at the 95% level.")
  elif w["low"] > 0 or p["low"] > 0:
    text += ("SE hurts here: an interval lies above zero, so the network"
             " without SE is better beyond seed noise at the 95% level.")
  else:
    text += ("Both intervals contain zero: with these seeds the data cannot"
             " tell whether SE helps here; a difference larger than the"
             " intervals' half-widths would have shown.")
  return text


def plot_fig6(gates, labels, overall, blocks, class_names, channels, path,
               title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cols = min(3, len(blocks))
  rows = -(-len(blocks) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows),
                           squeeze=False)
  cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
  for ax, block in zip(axes.flat, blocks):
    classes, mean, _ = analysis.class_gate_profiles(gates[block], labels)
    idx = channels[block]
    x = np.arange(len(idx))
    for i, k in enumerate(classes):
      ax.plot(x, mean[i, idx], lw=1.0, color=cmap(i % cmap.N),
              label=class_names[k])
    ax.plot(x, overall[block][idx], "k--", lw=1.6, label="all")
    ax.set_title(block)
    ax.set_xlabel("channel index (sampled)")
    ax.set_ylabel("mean gate")
    ax.set_ylim(-0.02, 1.02)
  for ax in list(axes.flat)[len(blocks):]:
    ax.axis("off")
  handles, lbls = axes.flat[0].get_legend_handles_labels()
  fig.legend(handles, lbls, loc="lower center", ncol=min(11, len(lbls)),
             fontsize=8, frameon=False)
  fig.suptitle(title)
  fig.tight_layout(rect=(0, 0.06, 1, 0.96))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_fig7(gates, labels, blocks, pair, class_names, channels, path,
               title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(len(pair), len(blocks),
                           figsize=(3.6 * len(blocks), 2.9 * len(pair)),
                           squeeze=False)
  for r, k in enumerate(pair):
    for c, block in enumerate(blocks):
      g = gates[block][labels == k][:, channels[block]]
      m, s = g.mean(0), g.std(0)
      x = np.arange(len(m))
      ax = axes[r, c]
      ax.plot(x, m, color="C0", lw=1.0)
      ax.fill_between(x, m - s, m + s, color="C0", alpha=0.3, lw=0)
      ax.set_ylim(-0.02, 1.02)
      ax.set_title(f"{block}, {class_names[k]}", fontsize=9)
      if c == 0:
        ax.set_ylabel("gate: mean +- std")
  fig.suptitle(title)
  fig.tight_layout(rect=(0, 0, 1, 0.95))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def draw_figures(gates: dict, labels, overall: dict, class_names,
                 directory: str, title: str) -> list[str]:
  """Figs. 6 and 7 of one network into `directory`: 50 sampled channels of
  the blocks of `selected_blocks`, and for Fig. 7 the two classes whose
  last-block profiles differ most. Returns the files' names."""
  import os
  blocks = list(gates)
  shown = selected_blocks(blocks)
  rng = np.random.default_rng(0)
  channels = {b: np.sort(rng.choice(gates[b].shape[1],
                                    min(50, gates[b].shape[1]),
                                    replace=False)) for b in blocks}
  _, mean, _ = analysis.class_gate_profiles(gates[shown[-1]], labels)
  d = ((mean[:, None] - mean[None]) ** 2).sum(-1)
  pair = [int(i) for i in np.unravel_index(np.argmax(d), d.shape)]
  names = ("fig6_class_gates.png", "fig7_within_class.png")
  plot_fig6(gates, labels, overall, shown, class_names, channels,
            os.path.join(directory, names[0]), title)
  plot_fig7(gates, labels, shown, pair, class_names, channels,
            os.path.join(directory, names[1]), title)
  return list(names)
