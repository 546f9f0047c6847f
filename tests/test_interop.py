"""timm interop: parity of every supported model, round trips, checkpoints.

The parity tests build each timm model with random weights and random
BatchNorm statistics, convert it, and compare logits, every SE block's gates
(read from timm with forward hooks) and a training-mode step with se_jax's.
They need the torch extra and skip without it.
"""

import os
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import cli
from se_jax import interop
from se_jax.models import Preprocessing, capture_gates, create, names
from se_jax.models import load_pretrained, save_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ISSUE_NAMES = [
    *(f"resnet{d}" for d in (18, 34, 50, 101, 152)),
    *(f"seresnet{d}" for d in (18, 34, 50, 101, 152)),
    "seresnext50_32x4d", "seresnext101_32x4d",
    *(f"legacy_seresnet{d}" for d in (18, 34, 50, 101, 152)),
    "legacy_seresnext50_32x4d", "legacy_seresnext101_32x4d",
    # ResNet-D and -T with SE and ECA.
    *(f"resnet{d}d" for d in (18, 26, 34, 50, 101, 152, 200)),
    "seresnet152d", "seresnext26d_32x4d", "seresnext26t_32x4d",
    "seresnext101_32x8d", "seresnext101d_32x8d", "ecaresnet26t",
    "ecaresnet50d", "ecaresnet50t", "ecaresnet101d", "ecaresnetlight",
]
PARITY = [*ISSUE_NAMES, "resnext50_32x4d", "resnext101_32x4d", "resnet26t",
          "resnet50t"]
IMAGE = (2, 64, 64, 3)  # NHWC; 64 is small and fine for the ceil-mode stem.
PREPROCESSING = Preprocessing((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (224, 224),
                              0.875, "bilinear")


@pytest.fixture(scope="module")
def torch():
  reason = ("PyTorch is not installed; the timm parity tests need the torch"
            " extra: pip install 'se_jax[torch]'")
  torch = pytest.importorskip("torch", reason=reason)
  # pytest -n 2 runs two processes on two cores: with more than one thread
  # each, torch's OpenMP workers contend and a forward pass takes 10-50x
  # longer.
  torch.set_num_threads(1)
  return torch


@pytest.fixture(scope="module")
def timm(torch):
  reason = ("timm is not installed; the timm parity tests need the torch"
            " extra: pip install 'se_jax[torch]'")
  return pytest.importorskip("timm", reason=reason)


@pytest.fixture(scope="module")
def ocp():
  return pytest.importorskip(
      "orbax.checkpoint", reason="orbax-checkpoint is not installed; pretrained"
      " checkpoints need it: pip install 'se_jax[experiments]'")


def _random_timm(timm, torch, name, seed=0):
  """timm's `name` with random weights and BatchNorm statistics, in eval mode.

  Every BatchNorm gets a random affine transform, and running statistics
  measured on random images and then perturbed, so no statistic keeps its
  default. The last BatchNorm of each residual branch is scaled down (timm
  initialises it to zero) to keep the random 152-layer networks well
  conditioned: float32 rounding in timm itself then stays near 1e-6, so a
  1e-4 bound measures the conversion rather than the network's chaos.
  """
  torch.manual_seed(seed)
  # The legacy SENets' dropout before the classifier (p=0.2 in training) has
  # no se_jax counterpart; without it their training-mode outputs compare.
  tm = timm.create_model(name, drop_rate=0.0)
  g = torch.Generator().manual_seed(seed)
  rand = lambda t, lo, hi: torch.rand(t.shape, generator=g) * (hi - lo) + lo
  randn = lambda t, std: torch.randn(t.shape, generator=g) * std
  norms = [m for m in tm.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for m in norms:
      m.weight.copy_(rand(m.weight, 0.5, 1.5))
      m.bias.copy_(randn(m.bias, 0.1))
    for m in tm.modules():
      if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
        m.bias.copy_(randn(m.bias, 0.1))  # the SE FCs
    for stage in (tm.layer1, tm.layer2, tm.layer3, tm.layer4):
      for unit in stage:
        last = getattr(unit, "bn3", None) or unit.bn2
        last.weight.mul_(0.2)
    tm.train()
    for m in norms:
      m.momentum = 1.0  # running statistics := those of the next batch
    tm(torch.randn(2, 3, *IMAGE[1:3], generator=g))
    for m in norms:
      m.momentum = 0.1
      m.running_mean.add_(randn(m.running_mean, 0.1) * m.running_var.sqrt())
      m.running_var.mul_(rand(m.running_var, 0.5, 2.0))
  return tm.eval()


def _hook_timm_gates(tm, prefix="SE") -> dict:
  """Records the gates of timm's SE or ECA modules, tagged as se_jax tags
  them."""
  gates = {}
  for stage_no, stage in enumerate(
      (tm.layer1, tm.layer2, tm.layer3, tm.layer4), start=2):
    for unit_no, unit in enumerate(stage, start=1):
      se = getattr(unit, "se", None) or getattr(unit, "se_module", None)
      if se is None:
        continue
      gate = getattr(se, "gate", None) or se.sigmoid  # resnet.py / senet.py

      def hook(module, inputs, output, tag=f"{prefix}_{stage_no}_{unit_no}"):
        gates[tag] = output.detach().reshape(output.shape[0], -1).numpy()

      gate.register_forward_hook(hook)
  return gates


def _nchw(torch, x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _flat(model):
  return {tuple(p): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(model))}


def _assert_same_state(a, b):
  fa, fb = _flat(a), _flat(b)
  assert list(fa) == list(fb)
  for path in fa:
    np.testing.assert_array_equal(fa[path], fb[path], err_msg=str(path))


def test_every_name_of_the_issue_maps_to_a_registry_model():
  assert set(ISSUE_NAMES) <= set(interop.TIMM_MODELS)
  assert set(interop.TIMM_MODELS.values()) <= set(names())


@pytest.mark.parametrize("name", PARITY)
def test_parity_with_timm(name, torch, timm):
  tm = _random_timm(timm, torch, name)
  reference = tm.state_dict()
  model, preprocessing = interop.from_timm(name, reference)
  assert preprocessing == interop.timm_preprocessing(name)

  # timm -> se_jax -> timm and se_jax -> timm -> se_jax are exact.
  state_dict = interop.to_timm(name, model)
  assert list(state_dict) == list(reference)
  for key, value in reference.items():
    if not key.endswith("num_batches_tracked"):
      assert value.dtype == state_dict[key].dtype == torch.float32, key
      assert torch.equal(value, state_dict[key]), key
  tm.load_state_dict(state_dict, strict=True)
  again, _ = interop.from_timm(name, tm.state_dict(),
                               preprocessing=preprocessing)
  _assert_same_state(model, again)

  x = np.random.default_rng(1).standard_normal(IMAGE).astype(np.float32)
  timm_gates = _hook_timm_gates(tm, "ECA" if "eca" in name else "SE")
  with torch.no_grad():
    expected = tm(_nchw(torch, x)).numpy()
  logits = model(jnp.asarray(x))
  assert logits.shape == expected.shape and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)

  if name.startswith(("se", "legacy_se", "eca")):
    gates = capture_gates(model, jnp.asarray(x))
    assert list(gates) == list(timm_gates)
    for tag, g in gates.items():
      np.testing.assert_allclose(g, timm_gates[tag], rtol=0, atol=1e-5,
                                 err_msg=tag)
  else:
    assert not timm_gates

  # Training mode: batch statistics, and the same running-statistics update.
  tm.train()
  model.train()
  with torch.no_grad():
    expected = tm(_nchw(torch, x)).numpy()
  np.testing.assert_allclose(model(jnp.asarray(x)), expected, rtol=0,
                             atol=1e-4)
  updated = interop.to_timm(name, model)
  for key, value in tm.state_dict().items():
    if key.endswith(("running_mean", "running_var")):
      np.testing.assert_allclose(updated[key], value, rtol=1e-4, atol=1e-5,
                                 err_msg=key)


def test_mismatched_state_dicts_name_the_first_key_and_both_shapes(
    torch, timm):
  state = timm.create_model("resnet18").state_dict()
  # Another architecture: resnet18's tensors are all in resnet34.
  with pytest.raises(ValueError, match=r"timm's 'resnet34'.*missing key"
                     r" 'layer1\.2\.conv1\.weight' \(expected shape"
                     r" \(64, 64, 3, 3\)\)"):
    interop.from_timm("resnet34", state, preprocessing=PREPROCESSING)
  with pytest.raises(ValueError, match=r"timm's 'legacy_seresnet50'.*missing"
                     r" key 'layer0\.conv1\.weight' \(expected shape"
                     r" \(64, 3, 7, 7\)\).*\(266 more key\(s\) do not fit\)"):
    interop.from_timm("legacy_seresnet50", state,
                      preprocessing=PREPROCESSING)

  wrong = dict(state)
  wrong["layer2.0.conv2.weight"] = torch.zeros(128, 128, 5, 5)
  with pytest.raises(ValueError, match=r"'layer2\.0\.conv2\.weight' has shape"
                     r" \(128, 128, 5, 5\), expected \(128, 128, 3, 3\)\.$"):
    interop.from_timm("resnet18", wrong, preprocessing=PREPROCESSING)

  missing = {k: v for k, v in state.items() if k != "layer3.1.bn2.bias"}
  with pytest.raises(ValueError, match=r"missing key 'layer3\.1\.bn2\.bias'"
                     r" \(expected shape \(256,\)\)"):
    interop.from_timm("resnet18", missing, preprocessing=PREPROCESSING)

  extra = {**state, "layer4.1.se.fc1.weight": torch.zeros(32, 512, 1, 1)}
  with pytest.raises(ValueError, match=r"unexpected key"
                     r" 'layer4\.1\.se\.fc1\.weight' \(shape"
                     r" \(32, 512, 1, 1\)\)"):
    interop.from_timm("resnet18", extra, preprocessing=PREPROCESSING)

  # Old checkpoints without num_batches_tracked load; fine-tuned heads too.
  old = {k: v for k, v in state.items()
         if not k.endswith("num_batches_tracked")}
  old["fc.weight"], old["fc.bias"] = torch.zeros(7, 512), torch.zeros(7)
  model, _ = interop.from_timm("resnet18", old, preprocessing=PREPROCESSING)
  assert model.fc.out_features == 7
  # A timm model stands for its state_dict.
  model, _ = interop.from_timm("resnet18", timm.create_model("resnet18"),
                               preprocessing=PREPROCESSING)
  assert model.fc.out_features == 1000
  with pytest.raises(ValueError, match="tags with weights: resnet50.a1_in1k"):
    interop.timm_preprocessing("resnet50.no_such_tag")


def test_unsupported_names_and_layouts_are_refused():
  with pytest.raises(ValueError, match="'vit_base_patch16_224' has no se_jax"
                     " counterpart; supported: ecaresnet101d"):
    interop.from_timm("vit_base_patch16_224", {})
  # timm's legacy SE-ResNet-18/34 have a ReLU before SE in their basic
  # units; without it the shapes are the same and the function is not.
  model = nnx.eval_shape(lambda: create("legacy_se_resnet18",
                                        relu_before_se=False))
  with pytest.raises(ValueError, match="relu_before_se"):
    interop.to_timm("legacy_seresnet18", model)
  # seresnet50 and legacy_seresnet50 have the same shapes but stride in
  # different convolutions.
  model = nnx.eval_shape(lambda: create("se_resnet50"))
  with pytest.raises(ValueError, match=r"layout of se_jax's"
                     r" 'legacy_se_resnet50', the counterpart of timm's"
                     r" 'legacy_seresnet50': stages/0/0/attn has options"
                     r" .*'rounding': 'timm'.*expected options"
                     r" .*'rounding': 'paper'"):
    interop.to_timm("legacy_seresnet50", model)


def test_interop_and_models_import_neither_torch_nor_orbax():
  code = ("import sys, se_jax, se_jax.interop, se_jax.models;"
          " print(sorted(m for m in ('torch', 'timm', 'orbax', 'safetensors')"
          " if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  assert out.strip() == "[]"


def test_pretrained_checkpoints_round_trip(ocp, tmp_path):
  model = create("cifar_se_resnet20", num_classes=10)
  model(jnp.ones((2, 32, 32, 3)))  # training mode: new running statistics
  out = save_pretrained(str(tmp_path / "ckpt"), model,
                        name="cifar_se_resnet20", preprocessing=PREPROCESSING,
                        source="test")
  assert out == str(tmp_path / "ckpt")
  restored, preprocessing = load_pretrained(out)
  assert preprocessing == PREPROCESSING
  _assert_same_state(model, restored)
  model.eval()
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)))
  np.testing.assert_array_equal(restored(x), model(x))  # restored is in eval

  with pytest.raises(FileExistsError, match="already exists"):
    save_pretrained(out, model, name="cifar_se_resnet20",
                    preprocessing=PREPROCESSING)
  with pytest.raises(ValueError, match="not have the layout of se_jax's"
                     " 'cifar_se_resnet32'"):
    save_pretrained(str(tmp_path / "other"), model, name="cifar_se_resnet32",
                    preprocessing=PREPROCESSING)
  assert not (tmp_path / "other").exists()
  with pytest.raises(FileNotFoundError, match="no pretrained checkpoint"):
    load_pretrained(str(tmp_path / "absent"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="not a pretrained se_jax checkpoint"):
    load_pretrained(str(tmp_path / "empty"))


@pytest.fixture(scope="module")
def convert_timm():
  from experiments import convert_timm
  return convert_timm


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_convert_cli_end_to_end(fmt, torch, timm, ocp, convert_timm, tmp_path,
                                capsys):
  name = "legacy_seresnet50"
  tm = _random_timm(timm, torch, name, seed=3)
  path = str(tmp_path / f"weights.{fmt}")
  if fmt == "pth":
    torch.save(tm.state_dict(), path)
  else:
    safetensors_torch = pytest.importorskip(
        "safetensors.torch", reason="safetensors is not installed; pip"
        " install 'se_jax[torch]'")
    safetensors_torch.save_file(tm.state_dict(), path)
  out = str(tmp_path / "converted")
  rc = convert_timm.main(["--model", name, "--checkpoint", path, "--out", out])
  assert rc == 0
  assert "load_pretrained" in capsys.readouterr().out

  model, preprocessing = load_pretrained(out)
  assert preprocessing == interop.timm_preprocessing(name)
  x = np.random.default_rng(2).standard_normal(IMAGE).astype(np.float32)
  with torch.no_grad():
    expected = tm(_nchw(torch, x)).numpy()
  np.testing.assert_allclose(model(jnp.asarray(x)), expected, rtol=0,
                             atol=1e-4)


def test_convert_cli_refuses_a_mismatch_and_writes_nothing(
    torch, timm, ocp, convert_timm, tmp_path, capsys):
  path = str(tmp_path / "resnet18.pth")
  torch.save(timm.create_model("resnet18").state_dict(), path)
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as e:
    cli.main_guard(convert_timm.main)(
        ["--model", "resnet34", "--checkpoint", path, "--out", str(out)])
  assert e.value.code == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and ("missing key 'layer1.2.conv1.weight' (expected"
                            " shape (64, 64, 3, 3))") in err[0]
  assert sorted(os.listdir(tmp_path)) == ["resnet18.pth"]

  out.mkdir()
  with pytest.raises(SystemExit):
    convert_timm.main(["--model", "resnet18", "--checkpoint", path,
                       "--out", str(out)])
  assert "already exists" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    convert_timm.main(["--model", "vit_base_patch16_224", "--pretrained",
                       "--out", str(tmp_path / "vit")])
  assert "not supported" in capsys.readouterr().err


def test_convert_cli_pretrained_says_it_needs_the_network(
    timm, ocp, convert_timm, tmp_path, capsys, monkeypatch):
  def no_network(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

  # Offline wherever the test runs, and with no cached download to find.
  monkeypatch.setattr(socket, "getaddrinfo", no_network)
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as e:
    cli.main_guard(convert_timm.main)(
        ["--model", "legacy_seresnet50", "--pretrained", "--out", str(out)])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "needs the network" in err and "--checkpoint FILE" in err
  assert not out.exists()
