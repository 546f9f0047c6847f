"""Where a result came from: command, date, machine, commit, versions."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys

from experiments import allocator


def _commit() -> str:
  try:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True,
        text=True, check=True, cwd=os.path.dirname(os.path.abspath(__file__)),
    ).stdout.strip()
    # Changed code, not changed results (nor the README's summaries,
    # which the scripts write from them), makes a checkout uncommitted.
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--",
         ":(top)", ":(top,exclude)experiments/results",
         ":(top,exclude)README.md"],
        capture_output=True, text=True, check=True,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    ).stdout.strip()
    return out + ("+uncommitted" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def provenance() -> dict:
  """A dict that every committed result carries."""
  import jax
  import flax
  devices = jax.devices()
  return {
      "command": "python -m " + shlex.join(
          [sys.modules["__main__"].__spec__.name
           if getattr(sys.modules["__main__"], "__spec__", None)
           else sys.argv[0], *sys.argv[1:]]),
      "date": datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%d %H:%M UTC"),
      "commit": _commit(),
      "machine": f"{_cpu_name()}, {os.cpu_count()} cores, "
                 f"{platform.system()} {platform.machine()}",
      "devices": f"{len(devices)} x {devices[0].device_kind}"
                 f" ({devices[0].platform})",
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "flax": flax.__version__},
      "memory_pages": allocator.state(),
  }


def markdown_header(title: str, prov: dict) -> str:
  return (
      f"# {title}\n\n"
      f"Written by `{prov['command']}` on {prov['date']}, commit"
      f" {prov['commit']}.\nMachine: {prov['machine']}; devices:"
      f" {prov['devices']}; jax {prov['versions']['jax']}, flax"
      f" {prov['versions']['flax']}"
      + (f"; memory: {prov['memory_pages']}." if "memory_pages" in prov
         else ".")
  )
