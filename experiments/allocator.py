"""glibc's allocator settings for XLA's CPU buffers, in the experiment scripts.

XLA:CPU allocates the buffers of a compiled program afresh on every call:
one block for all its temporaries, a few hundred MB for a CIFAR ResNet
training step at batch 128. glibc serves a block that large with a new
``mmap`` (and blocks freed in a thread's own arena go back to the kernel
too), so on every call the kernel hands out and zeroes fresh pages, one
fault each, and unmaps them when the call ends. Two groups of glibc's
tunables change where the buffers live, not what is computed:

- the heap kept (`HEAP`): every thread allocates from the main heap
  (``glibc.malloc.arena_max=1``), blocks of any size included
  (``glibc.malloc.mmap_max=0``), and what is freed stays with the process
  (``glibc.malloc.trim_threshold``), so that the next call reuses the same
  pages: no page faults after the first call. The process keeps the largest
  heap it has needed, as the caching allocators of PyTorch and of XLA on
  GPUs keep theirs;
- huge pages advised (`HUGEPAGES`, glibc 2.35 and later), where the
  kernel's transparent huge pages are in ``madvise`` mode (the default of
  many distributions): 2 MiB pages for the heap, 512 times fewer faults for
  the first call and fewer TLB misses after it.

The benchmark's "allocator" section measures what each buys.

Importing se_jax keeps the heap of any program, through glibc's ``mallopt``
(`se_jax.heap`), for the threads that XLA's CPU backend starts after the
import. The huge page advice has no ``mallopt``: glibc reads it, as all its
tunables, only when the process starts. The experiment scripts
(``python -m experiments.NAME``) therefore restart themselves once, before
importing anything else, with all of these tunables added to
``GLIBC_TUNABLES``; a tunable the variable already names keeps its value.
They do not when ``SE_JAX_ALLOCATOR=0`` (which turns se_jax's ``mallopt``
off too), off Linux and glibc, and when the variable names every one of
them. Programs of one's own get the huge pages too, and the kept heap even
where they compute before importing se_jax, by starting Python with the
variable set to `tunables`, on one line
(``python -m experiments.allocator --tunables`` prints it)::

  GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776:glibc.malloc.hugetlb=1 python my_training.py
"""

from __future__ import annotations

import os
import platform
import sys

OPT_OUT = "SE_JAX_ALLOCATOR"
HEAP = (("glibc.malloc.arena_max", "1"), ("glibc.malloc.mmap_max", "0"),
        ("glibc.malloc.trim_threshold", str(1 << 40)))
HUGEPAGES = ("glibc.malloc.hugetlb", "1")
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def wanted(mode: str | None) -> tuple[tuple[str, str], ...]:
  """The tunables the experiment scripts run with, given the kernel's
  transparent huge page mode: the heap kept, and huge pages advised where
  the kernel takes advice."""
  return HEAP + ((HUGEPAGES,) if mode == "madvise" else ())


def tunables(mode: str | None) -> str:
  """The ``GLIBC_TUNABLES`` value of `wanted`."""
  return ":".join(f"{k}={v}" for k, v in wanted(mode))


def parse(value: str) -> dict[str, str]:
  """A ``GLIBC_TUNABLES`` value as a dict of tunable names to values."""
  return dict(t.split("=", 1) if "=" in t else (t, "")
              for t in value.split(":") if t)


def with_tunables(value: str, pairs) -> str | None:
  """`value` (a ``GLIBC_TUNABLES`` value) with each of `pairs` that it does
  not name added, or None when it names them all."""
  named = parse(value)
  missing = [f"{k}={v}" for k, v in pairs if k not in named]
  if not missing:
    return None
  return ":".join([t for t in value.split(":") if t] + missing)


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
  """The command and environment to restart an experiment script with, the
  allocator's tunables added; None when it should run as it is."""
  module = script_module(argv)
  if module is None or not module.startswith("experiments."):
    return None
  if environ.get(OPT_OUT, "1") == "0" or libc != "glibc":
    return None
  value = with_tunables(environ.get("GLIBC_TUNABLES", ""), wanted(mode))
  if value is None:
    return None
  return [sys.executable, *argv[1:]], {**environ, "GLIBC_TUNABLES": value}


def state() -> str:
  """In words, how this process's allocator keeps its large buffers: its
  heap as `se_jax.heap` says where se_jax is imported, and its pages."""
  named = parse(os.environ.get("GLIBC_TUNABLES", ""))
  library = sys.modules.get("se_jax.heap")
  if library is not None:
    heap = library.state()
  else:
    heap = ("heap kept between calls (GLIBC_TUNABLES)"
            if all(named.get(k) == v for k, v in HEAP)
            else "glibc's default heap")
  advised = named.get(HUGEPAGES[0], "0") != "0"
  mode = thp_mode()
  if mode == "always":
    pages = "transparent huge pages always on"
  elif mode == "madvise" and advised:
    pages = f"transparent huge pages advised ({HUGEPAGES[0]}=1)"
  else:
    pages = f"4 KiB pages (transparent huge pages: {mode or 'unknown'})"
  return f"{heap}, {pages}"


def restart_if_needed() -> None:
  """Restarts this process with the allocator's tunables when it is an
  experiment script and they are not yet set (see the module's doc)."""
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
  print(tunables(thp_mode()) if "--tunables" in sys.argv[1:] else state())
