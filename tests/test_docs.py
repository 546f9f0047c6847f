"""The documentation builds without a warning and covers the whole API.

`test_docs_build` runs the build command of docs/conf.py in a subprocess,
into a fresh directory: every notebook page is executed, every warning is an
error, and every internal link and API cross-reference must resolve (no
network is used). It then reads the built inventory (objects.inv) and
checks that every public name of se_jax (each name in the ``__all__`` of
each module whose name has no part starting with "_") is in it, and that
no object is documented twice. It needs the docs extra
(``pip install -e ".[experiments,docs]"``, which experiments/setup.sh
installs) and skips without it.

The other tests are quick and need no build: the reference page and the
code it documents agree.
"""

import importlib
import importlib.util
import os
import pathlib
import pkgutil
import re
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FACTS = DOCS / "reference" / "facts.md"
# The build command of docs/conf.py, into a directory given at the end.
BUILD = [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going",
         "-j", "auto", "-b", "html", str(DOCS)]
DOCS_EXTRA = ("sphinx", "myst_nb", "furo", "ipykernel", "matplotlib")


def _missing_docs_extra() -> list[str]:
  return [m for m in DOCS_EXTRA if importlib.util.find_spec(m) is None]


def public_names() -> list[tuple[str, str, object]]:
  """(module, name, object) for every name in every public module's
  ``__all__``."""
  import se_jax
  modules = ["se_jax"] + [
      m.name for m in pkgutil.walk_packages(se_jax.__path__, "se_jax.")
      if not any(part.startswith("_") for part in m.name.split("."))]
  out = []
  for modname in sorted(modules):
    module = importlib.import_module(modname)
    assert hasattr(module, "__all__"), f"{modname} has no __all__"
    out.extend((modname, name, getattr(module, name))
               for name in module.__all__)
  return out


def test_docs_build(tmp_path):
  missing = _missing_docs_extra()
  if missing:
    pytest.skip(f"the docs extra is not installed ({', '.join(missing)}"
                " missing); pip install -e '.[experiments,docs]', as"
                " experiments/setup.sh does")
  out = tmp_path / "html"
  env = dict(os.environ)
  # The build caches nothing: not even the tests' compilation cache.
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  start = time.monotonic()
  proc = subprocess.run(BUILD + [str(out)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=1200)
  seconds = time.monotonic() - start
  log = proc.stdout + proc.stderr
  # The notebook kernels' own start-up notices (IPKernelApp) are not the
  # build's warnings.
  problems = [line for line in log.splitlines()
              if re.search(r"WARNING|ERROR|Traceback|Error:", line)
              and "[IPKernelApp]" not in line]
  assert proc.returncode == 0, (
      f"the docs build failed after {seconds:.0f} s:\n"
      + "\n".join(problems[:50]) + "\n--- end of the log:\n" + log[-4000:])

  from sphinx.util.inventory import InventoryFile
  with open(out / "objects.inv", "rb") as f:
    inventory = InventoryFile.load(f, "", lambda base, uri: uri)
  documented = {}
  for objtype, entries in inventory.items():
    if objtype.startswith("py:"):
      for name, entry in entries.items():
        documented[name] = entry

  names = public_names()
  missing_names = sorted(
      f"{m}.{n}" for m, n, _ in names if f"{m}.{n}" not in documented)
  missing_modules = sorted({m for m, _, _ in names} - set(documented))
  assert not missing_modules, f"modules not in the API reference:" \
      f" {missing_modules}"
  assert not missing_names, (
      f"public names not in the API reference: {missing_names}; document"
      " them on their module's page in docs/api/")

  # Each object once: a name that re-exports another is an alias of the
  # entry where the object is defined, at the same address.
  by_object = {}
  for m, n, obj in names:
    if isinstance(obj, (str, int, float, bool)) or obj is None:
      continue
    by_object.setdefault(id(obj), set()).add(documented[f"{m}.{n}"].uri)
  twice = {uris for uris in map(frozenset, by_object.values())
           if len(uris) > 1}
  assert not twice, f"objects documented more than once: {sorted(twice)}"
  print(f"docs built in {seconds:.0f} s")


def _facts_rows() -> set[str]:
  text = FACTS.read_text()
  return {re.sub(r"\s+", " ", line.strip()) for line in text.splitlines()
          if line.startswith("|")}


def test_facts_page_has_the_papers_numbers():
  from experiments import paper
  rows = _facts_rows()
  expected = []
  for name, v in paper.TABLE2.items():
    b, s = v["baseline"], v["se"]
    expected.append(
        f"| {name} | {b[0]:.2f} / {b[1]:.2f} | {b[2]:.2f} |"
        f" {s[0]:.2f} / {s[1]:.2f} | {s[2]:.2f} | `{v['names'][0]}`,"
        f" `{v['names'][1]}` |")
  for name, (base, se) in paper.TABLE4_CIFAR10.items():
    base100, se100 = paper.TABLE5_CIFAR100[name]
    expected.append(f"| {name} | {base:.2f} | {se:.2f} | {base100:.2f} |"
                    f" {se100:.2f} |")
  b = paper.ABLATION_BASELINE
  expected.append(f"| - | ResNet-50 (no SE) | {b[0]:.2f} / {b[1]:.2f} |"
                  f" {b[2]} | |")
  for r, v in paper.TABLE10_REDUCTION.items():
    expected.append(f"| 10 | r = {r} | {v[0]:.2f} / {v[1]:.2f} | {v[2]} | |")
  for table, prefix, values in (
      (11, "squeeze", paper.TABLE11_SQUEEZE),
      (12, "excitation", paper.TABLE12_EXCITATION),
      (14, "integration", paper.TABLE14_INTEGRATION)):
    for k, v in values.items():
      expected.append(f"| {table} | {prefix} {k} | {v[0]:.2f} / {v[1]:.2f}"
                      " | | |")
  for stages, v in paper.TABLE13_STAGES.items():
    expected.append(
        f"| 13 | SE in stage(s) {', '.join(map(str, stages))} |"
        f" {v[0]:.2f} / {v[1]:.2f} | {v[2]} | |")
  for name, v in (("SE_3x3", paper.TABLE15_SE_3X3),
                  ("NoSqueeze", paper.TABLE16_NO_SQUEEZE)):
    n = 15 if name == "SE_3x3" else 16
    expected.append(f"| {n} | {name} | {v[0]:.2f} / {v[1]:.2f} | {v[2]} |"
                    f" {v[3]} |")
  for kind, v in paper.ATTENTION_RESNET50.items():
    def cells(t):
      if t is None:
        return "none given"
      e1, e5, params, gflops = t
      return (f"{e1:.2f} / {e5:.2f}, "
              + ("-" if params is None else f"{params}M") + ", "
              + ("-" if gflops is None else f"{gflops}"))
    expected.append(f"| `{kind}` | {v['source']} | {cells(v['baseline'])} |"
                    f" {cells(v['attention'])} |")
  missing = [row for row in expected if row not in rows]
  assert not missing, (
      "docs/reference/facts.md and experiments/paper.py disagree; rows"
      " missing from the page:\n" + "\n".join(missing))


def test_facts_page_has_the_data_checksums():
  text = FACTS.read_text()
  data = importlib.import_module("experiments.data")
  digests = getattr(data, "FASHION_MNIST_SHA256", None)
  if digests is None:
    digests = importlib.import_module(
        "experiments.fashion_mnist").FASHION_MNIST_SHA256
  for name, digest in digests.items():
    assert f"| `{name}` | `{digest}` |" in text, name
  info = data.DATASETS["fashion_mnist"]
  assert f"are {info.mean[0]:.4f} and {info.std[0]:.4f}" in text


def test_code_points_to_the_reference_page():
  pointers = []
  for path in (ROOT / "experiments").rglob("*.py"):
    text = path.read_text()
    assert "REFERENCE.md" not in text, (
        f"{path.relative_to(ROOT)} points to REFERENCE.md, which is"
        " docs/reference/facts.md")
    pointers += re.findall(r"docs/reference/facts\.md(?:, ([^)\n]+))?", text)
  assert pointers
  headings = {re.sub(r"[^a-z0-9 ]", "", h.lower()).strip()
              for h in re.findall(r"^#+ (.*)$", FACTS.read_text(), re.M)}
  for section in filter(None, pointers):
    name = re.sub(r"[^a-z0-9 ]", "", section.lower()).strip()
    assert any(h.startswith(name) for h in headings), (
        f"facts.md has no section {section!r}")
