"""The experiment scripts' restart with glibc's allocator tunables."""

import os
import platform
import subprocess
import sys

import pytest

from experiments import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAP = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
        "glibc.malloc.trim_threshold=1099511627776")


def test_tunables_keep_the_heap_and_advise_huge_pages_where_taken():
  assert allocator.tunables("madvise") == HEAP + ":glibc.malloc.hugetlb=1"
  for mode in ("always", "never", None):
    assert allocator.tunables(mode) == HEAP
  assert allocator.parse(allocator.tunables("madvise")) == dict(
      allocator.wanted("madvise"))


def test_with_tunables_adds_only_what_the_value_does_not_name():
  pairs = allocator.wanted("madvise")
  assert allocator.with_tunables("", pairs) == allocator.tunables("madvise")
  # A user's own choices stay, on or off; only the others are added.
  assert allocator.with_tunables("glibc.malloc.hugetlb=0", pairs) == (
      "glibc.malloc.hugetlb=0:" + HEAP)
  assert allocator.with_tunables(
      "glibc.malloc.arena_max=4:x=1", pairs) == (
          "glibc.malloc.arena_max=4:x=1:glibc.malloc.mmap_max=0:"
          "glibc.malloc.trim_threshold=1099511627776:glibc.malloc.hugetlb=1")
  assert allocator.with_tunables(allocator.tunables("madvise"), pairs) is None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert allocator.thp_mode(str(f)) == "madvise"
  f.write_text("[always] madvise never\n")
  assert allocator.thp_mode(str(f)) == "always"
  assert allocator.thp_mode(str(tmp_path / "missing")) is None


def test_script_module_skips_interpreter_options():
  assert allocator.script_module(["py", "-m", "experiments.x", "-m"]) == (
      "experiments.x")
  assert allocator.script_module(["py", "-W", "ignore", "-m", "a.b"]) == "a.b"
  assert allocator.script_module(["py", "script.py", "-m", "x"]) == "x"
  assert allocator.script_module(["py", "-c", "pass"]) is None
  assert allocator.script_module(["py", "-m"]) is None


@pytest.mark.parametrize("argv, environ, mode, libc, want", [
    (["py", "-m", "experiments.trainer", "--config", "c"], {}, "madvise",
     "glibc", HEAP + ":glibc.malloc.hugetlb=1"),
    (["py", "-m", "pytest"], {}, "madvise", "glibc", None),
    (["py", "-m", "experiments.trainer"], {"SE_JAX_ALLOCATOR": "0"},
     "madvise", "glibc", None),
    (["py", "-m", "experiments.trainer"],
     {"GLIBC_TUNABLES": HEAP + ":glibc.malloc.hugetlb=0"}, "madvise", "glibc",
     None),
    (["py", "-m", "experiments.trainer"],
     {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "madvise", "glibc",
     "glibc.malloc.hugetlb=1:" + HEAP),
    (["py", "-m", "experiments.trainer"], {}, "always", "glibc", HEAP),
    (["py", "-m", "experiments.trainer"], {}, "never", "glibc", HEAP),
    (["py", "-m", "experiments.trainer"], {}, None, "glibc", HEAP),
    (["py", "-m", "experiments.trainer"], {}, "madvise", "", None),
])
def test_restart_only_experiment_scripts_that_gain(argv, environ, mode, libc,
                                                   want):
  plan = allocator.restart_argv(argv, environ, mode, libc)
  assert (plan is not None) == (want is not None)
  if plan is not None:
    command, env = plan
    assert command == [sys.executable, *argv[1:]]
    assert env["GLIBC_TUNABLES"] == want


def test_a_script_restarts_once_with_the_tunables():
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "SE_JAX_ALLOCATOR")}

  def run(extra):
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "experiments.allocator"],
        cwd=ROOT, env={**env, **extra}, capture_output=True, text=True,
        check=True).stdout.strip()

  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    pytest.skip("glibc's tunables")
  mode = allocator.thp_mode()
  assert run({}).startswith("heap kept between calls (GLIBC_TUNABLES), ")
  if mode == "madvise":
    assert run({}).endswith("advised (glibc.malloc.hugetlb=1)")
  assert run({"SE_JAX_ALLOCATOR": "0"}).startswith("glibc's default heap, ")
  assert run({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=1"}).startswith(
      "glibc's default heap, ")


def test_the_kept_heap_spares_the_page_faults_of_a_fresh_block():
  # A block far above glibc's mmap threshold, allocated, written and freed
  # on every call, as XLA:CPU does with a step's temporaries: with the heap
  # kept the calls after the first take no new pages.
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    pytest.skip("glibc's tunables")
  child = (
      "import ctypes, resource\n"
      "libc = ctypes.CDLL(None)\n"
      "libc.malloc.restype = ctypes.c_void_p\n"
      "libc.free.argtypes = [ctypes.c_void_p]\n"
      "n = 64 << 20\n"
      "def call():\n"
      "  p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)\n"
      "call()\n"
      "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
      "for _ in range(5): call()\n"
      "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)\n")
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}

  def faults(value):
    return int(subprocess.run(
        [sys.executable, "-c", child], env={**env, "GLIBC_TUNABLES": value},
        capture_output=True, text=True, check=True).stdout)

  # 5 x 64 MB in 4 KiB pages without: some 80,000 faults.
  assert faults("glibc.malloc.hugetlb=0") > 10_000
  assert faults(allocator.tunables(None)) < 100
