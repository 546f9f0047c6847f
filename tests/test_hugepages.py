"""The experiment scripts' restart with huge pages advised to glibc."""

import os
import platform
import subprocess
import sys

import pytest

from experiments import hugepages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_with_hugepages_adds_the_tunable_once():
  assert hugepages.with_hugepages("") == "glibc.malloc.hugetlb=1"
  assert (hugepages.with_hugepages("glibc.malloc.arena_max=2")
          == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
  # A user's own choice, on or off, stays.
  assert hugepages.with_hugepages("glibc.malloc.hugetlb=0") is None
  assert hugepages.with_hugepages("a=1:glibc.malloc.hugetlb=2") is None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert hugepages.thp_mode(str(f)) == "madvise"
  f.write_text("[always] madvise never\n")
  assert hugepages.thp_mode(str(f)) == "always"
  assert hugepages.thp_mode(str(tmp_path / "missing")) is None


def test_script_module_skips_interpreter_options():
  assert hugepages.script_module(["py", "-m", "experiments.x", "-m"]) == (
      "experiments.x")
  assert hugepages.script_module(["py", "-W", "ignore", "-m", "a.b"]) == "a.b"
  assert hugepages.script_module(["py", "script.py", "-m", "x"]) == "x"
  assert hugepages.script_module(["py", "-c", "pass"]) is None
  assert hugepages.script_module(["py", "-m"]) is None


@pytest.mark.parametrize("argv, environ, mode, libc, restarts", [
    (["py", "-m", "experiments.trainer", "--config", "c"], {}, "madvise",
     "glibc", True),
    (["py", "-m", "pytest"], {}, "madvise", "glibc", False),
    (["py", "-m", "experiments.trainer"], {"SE_JAX_HUGEPAGES": "0"},
     "madvise", "glibc", False),
    (["py", "-m", "experiments.trainer"],
     {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "madvise", "glibc", False),
    (["py", "-m", "experiments.trainer"], {}, "always", "glibc", False),
    (["py", "-m", "experiments.trainer"], {}, "never", "glibc", False),
    (["py", "-m", "experiments.trainer"], {}, None, "glibc", False),
    (["py", "-m", "experiments.trainer"], {}, "madvise", "", False),
])
def test_restart_only_experiment_scripts_that_gain(argv, environ, mode, libc,
                                                   restarts):
  plan = hugepages.restart_argv(argv, environ, mode, libc)
  assert (plan is not None) == restarts
  if plan is not None:
    command, env = plan
    assert command == [sys.executable, *argv[1:]]
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_a_script_restarts_once_with_the_tunable():
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "SE_JAX_HUGEPAGES")}

  def run(extra):
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "experiments.hugepages"],
        cwd=ROOT, env={**env, **extra}, capture_output=True, text=True,
        check=True).stdout.strip()

  if (sys.platform != "linux" or hugepages.thp_mode() != "madvise"
      or platform.libc_ver()[0] != "glibc"):
    pytest.skip("transparent huge pages are not in madvise mode under glibc")
  assert run({}) == "transparent huge pages advised (glibc.malloc.hugetlb=1)"
  assert run({"SE_JAX_HUGEPAGES": "0"}) == (
      "4 KiB pages (transparent huge pages: madvise)")
  assert run({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}).startswith(
      "4 KiB pages")
