"""glibc's heap kept for XLA's CPU buffers, from the import of se_jax.

XLA:CPU allocates the buffers of a compiled program afresh on every call:
for a CIFAR ResNet training step at batch 128, one block of a few hundred MB
for its temporaries. With glibc's defaults a block that large gets a mapping
of its own (as do large blocks of the threads' own arenas), so on every
call the kernel hands out fresh zeroed pages, one fault each, and takes them
back when the call ends: the step takes some 1.2x to 1.3x as long on a
2-core Xeon (the benchmark's ``allocator`` section measures it).

Importing se_jax therefore sets three of glibc's malloc parameters for the
process (``mallopt``), the ones ``GLIBC_TUNABLES`` calls
``glibc.malloc.arena_max=1`` (threads allocate from the main heap),
``glibc.malloc.mmap_max=0`` (blocks of any size come from the heap) and
``glibc.malloc.trim_threshold`` (2 GiB, the most ``mallopt`` takes: freed
memory stays with the process). The calls after the first reuse the same
pages. What is computed does not change; the process keeps the largest heap
it has needed, as the caching allocators of PyTorch and of XLA on GPUs keep
theirs.

- They apply to the threads that allocate after the import. XLA's CPU
  threads start with its CPU backend, at the process's first computation,
  so importing se_jax before that, before or after ``import jax``, is
  enough; `state` says when the backend had started first.
- ``SE_JAX_ALLOCATOR=0`` in the environment leaves glibc's defaults.
- A parameter that ``GLIBC_TUNABLES`` names keeps the value given there.
- Off Linux with glibc nothing is set.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

__all__ = ["OPT_OUT", "SETTINGS", "keep", "state"]

#: The environment variable that, set to ``0``, keeps glibc's defaults.
OPT_OUT = "SE_JAX_ALLOCATOR"
#: (tunable, ``mallopt``'s parameter in glibc's ``malloc.h``, value) of each
#: setting.
SETTINGS = (("glibc.malloc.arena_max", -8, 1),
            ("glibc.malloc.mmap_max", -4, 0),
            ("glibc.malloc.trim_threshold", -1, 2**31 - 1))

_done: dict = {"set": (), "why": "se_jax.heap.keep has not run",
               "backend_started": False}


def _tunables(value: str) -> dict[str, str]:
  return dict(t.split("=", 1) if "=" in t else (t, "")
              for t in value.split(":") if t)


def _kept_by(name: str, value: str) -> bool:
  """Whether a tunable's value in ``GLIBC_TUNABLES`` keeps the heap as
  `SETTINGS` does."""
  want = {n: v for n, _, v in SETTINGS}[name]
  try:
    return int(value) >= want if name.endswith("trim_threshold") else (
        int(value) == want)
  except ValueError:
    return False


def _cpu_backend_started() -> bool:
  """Whether this process has started JAX's backends (and so XLA's CPU
  threads) already."""
  bridge = sys.modules.get("jax._src.xla_bridge")
  return bool(getattr(bridge, "_backends", None))


def keep(environ=None) -> tuple[str, ...]:
  """Sets `SETTINGS` through glibc's ``mallopt``, each that the environment's
  ``GLIBC_TUNABLES`` does not name; nothing with ``SE_JAX_ALLOCATOR=0`` or
  off glibc. se_jax's import calls it. Returns the tunables set."""
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT, "1") == "0":
    _done.update(set=(), why=f"{OPT_OUT}=0")
    return ()
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    _done.update(set=(), why="not glibc")
    return ()
  named = _tunables(environ.get("GLIBC_TUNABLES", ""))
  mallopt = ctypes.CDLL(None).mallopt
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  done = tuple(name for name, param, value in SETTINGS
               if name not in named and mallopt(param, value) == 1)
  _done.update(set=done, why="", backend_started=_cpu_backend_started())
  return done


def state() -> str:
  """In words, how this process's heap keeps XLA's buffers between calls."""
  named = _tunables(os.environ.get("GLIBC_TUNABLES", ""))
  given = {n for n, _, _ in SETTINGS if n in named and _kept_by(n, named[n])}
  kept = given | set(_done["set"])
  if not kept:
    return "glibc's default heap" + (f" ({_done['why']})" if _done["why"]
                                     else "")
  if len(kept) < len(SETTINGS):
    return "glibc's heap partly kept (" + ", ".join(sorted(kept)) + ")"
  how = " and ".join(w for w, on in (("se_jax's import", _done["set"]),
                                      ("GLIBC_TUNABLES", given)) if on)
  if _done["set"] and _done["backend_started"]:
    return (f"heap kept between calls ({how}), but not for the threads of"
            " XLA's CPU backend, started before se_jax was imported")
  return f"heap kept between calls ({how})"
