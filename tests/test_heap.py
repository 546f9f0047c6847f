"""se_jax's import keeps glibc's heap for XLA's CPU buffers (se_jax.heap)."""

import os
import platform
import subprocess
import sys

import pytest

from se_jax import heap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
    reason="glibc's mallopt")

# A block far above glibc's mmap threshold, allocated, written and freed
# five times, as XLA:CPU does with a step's temporaries, by a thread started
# after the import (XLA's CPU threads start with its backend); the page
# faults of the five.
_CHILD = """
import ctypes, resource, sys, threading
{before}
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 64 << 20
def call():
  p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)
out = {{}}
def work():
  call()
  r0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
  for _ in range(5):
    call()
  out["faults"] = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - r0
t = threading.Thread(target=work); t.start(); t.join()
print(out["faults"], se_jax.heap.state(), sep="\\n")
"""


def _run(before="import se_jax", **env):
  base = {k: v for k, v in os.environ.items()
          if k not in ("GLIBC_TUNABLES", heap.OPT_OUT)}
  out = subprocess.run(
      [sys.executable, "-c", _CHILD.format(before=before)], cwd=ROOT,
      env={**base, **env}, capture_output=True, text=True, check=True)
  faults, state = out.stdout.strip().splitlines()[-2:]
  return int(faults), state


def test_the_import_spares_the_page_faults_of_a_fresh_block():
  # 5 x 64 MB in 4 KiB pages: some 80,000 faults with glibc's defaults.
  faults, state = _run(SE_JAX_ALLOCATOR="0")
  assert faults > 10_000
  assert state == "glibc's default heap (SE_JAX_ALLOCATOR=0)"
  faults, state = _run()
  assert faults < 100
  assert state == "heap kept between calls (se_jax's import)"


def test_the_import_after_jax_but_before_its_backend_is_enough():
  faults, state = _run("import jax\nimport se_jax")
  assert faults < 100 and state == "heap kept between calls (se_jax's import)"
  # After a computation, XLA's CPU threads have their own heaps already,
  # and the state says so.
  _, state = _run("import jax\njax.numpy.ones(2).block_until_ready()\n"
                  "import se_jax")
  assert state.endswith("but not for the threads of XLA's CPU backend,"
                        " started before se_jax was imported")


def test_tunables_named_in_the_environment_keep_their_values():
  # The user's own value stays (mallopt does not override it): with mmap
  # allowed again the large block is mapped anew on each call.
  faults, state = _run(GLIBC_TUNABLES="glibc.malloc.mmap_max=65536")
  assert faults > 10_000
  assert state == ("glibc's heap partly kept (glibc.malloc.arena_max,"
                   " glibc.malloc.trim_threshold)")
  faults, state = _run(GLIBC_TUNABLES=(
      "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
      "glibc.malloc.trim_threshold=1099511627776"))
  assert faults < 100 and state == "heap kept between calls (GLIBC_TUNABLES)"


def test_keep_sets_only_what_the_environment_leaves():
  assert heap.keep({heap.OPT_OUT: "0"}) == ()
  assert heap.keep({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1:"
                    "glibc.malloc.trim_threshold=5"}) == (
      "glibc.malloc.mmap_max",)
  assert heap.keep({}) == tuple(name for name, _, _ in heap.SETTINGS)
