"""The README's commands and examples are the ones that work."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(lang):
  return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readmes_test_command():
  commands = [b.strip() for b in _blocks("bash")]
  ci = [l for l in (ROOT / ".ci" / "run").read_text().splitlines()
        if l and not l.startswith(("#", "set ", "cd "))]
  assert commands[1] == ci[-1]
  assert "setup.sh" in commands[0] and "setup.sh" in commands[1]


def test_python_examples_run():
  # The examples build on each other, as a reader would run them.
  from se_jax import attention
  kinds = dict(attention.KINDS)
  namespace = {}
  try:
    for block in _blocks("python"):
      exec(compile(block, "README.md", "exec"), namespace)
  finally:
    # The README registers a kind of its own: not for the other tests.
    attention.KINDS.clear()
    attention.KINDS.update(kinds)
  assert namespace["gates"]["SE_5_2"].shape == (2, 2048)
