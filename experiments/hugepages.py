"""Transparent huge pages for XLA's CPU buffers, in the experiment scripts.

XLA:CPU allocates the buffers of a compiled program afresh on every call:
one block for all its temporaries and the scratch of its convolutions, a few
hundred MB for a CIFAR ResNet training step at batch 128. glibc serves
allocations that large with a new ``mmap``, which the kernel fills one 4 KiB
page at a time, each page a fault, then unmaps them when the call ends. On a
Linux machine whose transparent huge pages are in ``madvise`` mode (the
default of many distributions), glibc's tunable ``glibc.malloc.hugetlb=1``
(glibc 2.35 and later) advises those mappings for 2 MiB pages: 512 times
fewer faults and fewer TLB misses, the same numbers. The benchmark's
"allocator" section measures what it buys.

glibc reads its tunables when the process starts, so no import can set them.
The experiment scripts (``python -m experiments.NAME``) therefore restart
themselves once, before importing anything else, with the tunable added to
``GLIBC_TUNABLES``. They do not when the variable already names
``glibc.malloc.hugetlb``, when ``SE_JAX_HUGEPAGES=0``, off Linux and glibc,
and when the kernel's transparent huge pages are ``always`` (nothing to
advise) or ``never``. Users of the library in their own programs get the
same by starting Python with the variable set::

  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python my_training.py
"""

from __future__ import annotations

import os
import platform
import sys

OPT_OUT = "SE_JAX_HUGEPAGES"
TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def with_hugepages(tunables: str) -> str | None:
  """`tunables` (a ``GLIBC_TUNABLES`` value) with ``glibc.malloc.hugetlb=1``
  added, or None when it already sets that tunable."""
  parts = [t for t in tunables.split(":") if t]
  if any(t.split("=", 1)[0] == TUNABLE for t in parts):
    return None
  return ":".join([*parts, f"{TUNABLE}=1"])


def thp_mode(path: str = THP_MODE) -> str | None:
  """The kernel's transparent huge page mode (``always``, ``madvise`` or
  ``never``), None when unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def script_module(argv: list[str]) -> str | None:
  """The module that ``python [options] -m MODULE ...`` runs, if any."""
  if "-m" not in argv[1:]:
    return None
  i = argv.index("-m", 1)
  return argv[i + 1] if i + 1 < len(argv) else None


def restart_argv(argv: list[str], environ: dict[str, str],
                 mode: str | None, libc: str) -> tuple[list[str], dict] | None:
  """The command and environment to restart an experiment script with,
  huge pages advised; None when it should run as it is."""
  module = script_module(argv)
  if module is None or not module.startswith("experiments."):
    return None
  if environ.get(OPT_OUT, "1") == "0" or libc != "glibc" or mode != "madvise":
    return None
  tunables = with_hugepages(environ.get("GLIBC_TUNABLES", ""))
  if tunables is None:
    return None
  return [sys.executable, *argv[1:]], {**environ, "GLIBC_TUNABLES": tunables}


def state() -> str:
  """In words, whether this process's large allocations get huge pages."""
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  advised = with_hugepages(tunables) is None and f"{TUNABLE}=0" not in tunables
  mode = thp_mode()
  if mode == "always":
    return "transparent huge pages always on"
  if mode == "madvise" and advised:
    return f"transparent huge pages advised ({TUNABLE}=1)"
  return f"4 KiB pages (transparent huge pages: {mode or 'unknown'})"


def restart_if_needed() -> None:
  """Restarts this process with huge pages advised when it is an
  experiment script and they are not yet (see the module's doc)."""
  argv = list(getattr(sys, "orig_argv", None) or [])
  if sys.platform != "linux" or not (script_module(argv) or "").startswith(
      "experiments."):
    return
  plan = restart_argv(argv, dict(os.environ), thp_mode(),
                      platform.libc_ver()[0])
  if plan is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, *plan)


if __name__ == "__main__":
  print(state())
