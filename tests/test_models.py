"""The NNX SE-ResNet family, its registry, gates and functional path."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import se_jax
from se_jax import SqueezeExcite
from se_jax.models import capture_gates, create, names, pretrained
from se_jax.models.resnet import squeezes_through_conv3
from tests import reference as ref

REQUIRED = [
    *(f"{p}resnet{d}" for p in ("", "se_") for d in (18, 34, 50, 101, 152)),
    "resnext50_32x4d", "resnext101_32x4d", "se_resnext50_32x4d",
    "se_resnext101_32x4d",
    *(f"cifar_{p}resnet{d}" for p in ("", "se_")
      for d in (20, 32, 44, 56, 110, 164)),
    "wrn16_8", "se_wrn16_8", "legacy_se_resnet50",
]


def _images(n=2, size=32, c=3, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, size, size, c))


def _se_blocks(model):
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, SqueezeExcite)]


def _attention_blocks(model):
  return [m for _, m in nnx.iter_modules(model)
          if isinstance(m, se_jax.attention.Attention)]


def test_registry_has_the_papers_models():
  assert set(REQUIRED) <= set(names())


@pytest.mark.parametrize("name", names())
def test_every_model_runs_train_and_eval(name):
  # One unit per stage keeps the family's layout and the suite fast; the
  # full depths are checked by the parameter counts and the timm tests.
  full = nnx.eval_shape(lambda: create(name, num_classes=7))
  model = create(name, num_classes=7,
                 stage_sizes=(1,) * len(full.stages))
  x = _images()
  stats = lambda: jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
  before = stats()
  model.train()
  y = model(x)
  assert y.shape == (2, 7) and y.dtype == jnp.float32
  assert np.all(np.isfinite(y))
  after_train = stats()
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, before,
                                              after_train)))
  model.eval()
  y_eval = model(x)
  assert np.all(np.isfinite(y_eval))
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, after_train,
                                          stats())))
  np.testing.assert_array_equal(y_eval, model(x))
  assert bool(_se_blocks(model)) == ("se_" in name)
  has_attention = se_jax.models.plain_twin(name) != name
  assert bool(_attention_blocks(model)) == has_attention


def test_se_resnet50_structure_and_gate_names():
  model = create("se_resnet50")
  gates = capture_gates(model, _images(size=64))
  want = [f"SE_{s}_{u}" for s, n in zip((2, 3, 4, 5), (3, 4, 6, 3))
          for u in range(1, n + 1)]
  assert list(gates) == want
  for tag, c in (("SE_2_1", 256), ("SE_3_4", 512), ("SE_4_6", 1024),
                 ("SE_5_3", 2048)):
    assert gates[tag].shape == (2, c) and gates[tag].dtype == jnp.float32
  block = model.stages[3][2].attn
  assert (block.channels, block.reduced_channels) == (2048, 128)


def test_gates_are_input_dependent_and_match_the_primitive():
  model = create("cifar_se_resnet20", num_classes=10)
  model.eval()
  x = _images(n=4)
  gates = capture_gates(model, x)
  assert not np.allclose(gates["SE_4_3"][0], gates["SE_4_3"][1])
  # Recompute the last block's gates from its input with the NumPy reference.
  unit = model.stages[2][2]
  h = x
  h = nnx.relu(model.stem_norm(model.stem_conv(h)))
  for stage in model.stages:
    for u in stage:
      if u is unit:
        break
      h = u(h)
  r = nnx.relu(unit.bn1(unit.conv1(h)))
  r = unit.bn2(unit.conv2(r))
  _, want = ref.squeeze_excite(unit.attn.params, np.asarray(r))
  np.testing.assert_allclose(gates["SE_4_3"], want, rtol=1e-5, atol=1e-6)


def test_capture_gates_leaves_the_model_as_it_was():
  model = create("cifar_se_resnet20", num_classes=10)
  before = jax.tree.map(np.array, nnx.state(model))
  capture_gates(model, _images())
  assert all(not m.use_running_average for _, m in nnx.iter_modules(model)
             if isinstance(m, se_jax.layers.BatchNorm))
  assert all(not b.record_gates for b in _se_blocks(model))
  after = jax.tree.map(np.array, nnx.state(model))
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, before, after)))


def test_capture_gates_under_jit():
  model = create("cifar_se_resnet20", num_classes=10)
  x = _images()
  eager = capture_gates(model, x)
  jitted = nnx.jit(capture_gates)(model, x)
  for k in eager:
    np.testing.assert_allclose(jitted[k], eager[k], rtol=1e-5, atol=1e-6)


def test_capture_gates_with_the_outputs_of_the_same_pass():
  model = create("cifar_se_resnet20", num_classes=10)
  x = _images()
  logits, gates = capture_gates(model, x, with_outputs=True)
  np.testing.assert_allclose(logits, nnx.view(
      model, use_running_average=True)(x), rtol=1e-5, atol=1e-5)
  assert gates.keys() == capture_gates(model, x).keys()


def test_capture_gates_needs_se_blocks():
  with pytest.raises(ValueError, match="no attention modules"):
    capture_gates(create("cifar_resnet20"), _images())


# ------------------------------------------------------------ SE variants


def _unit(name="se_resnet50", stage=1, unit=0, **overrides):
  return create(name, **overrides).stages[stage][unit]


def test_reduction_and_rounding():
  assert _unit(reduction=8).attn.reduced_channels == 64        # 512 / 8
  assert _unit("se_resnet18", stage=0).attn.reduced_channels == 8   # timm
  assert _unit("legacy_se_resnet18", stage=0).attn.reduced_channels == 4
  assert _unit("cifar_se_resnet20", stage=0).attn.reduced_channels == 1
  u = _unit(rounding="paper", se_bias=False, reduction=32)
  assert u.attn.reduced_channels == 16 and u.attn.b1 is None


def test_integration_and_position_widths():
  # The first unit of stage 3 maps 256 -> 512 channels, width 128.
  assert _unit(integration="pre").attn.channels == 256
  assert _unit(integration="post").attn.channels == 512
  assert _unit(integration="identity").attn.channels == 512
  assert _unit(position="3x3").attn.channels == 128


@pytest.mark.parametrize(
    "overrides",
    [dict(integration=i) for i in ("standard", "pre", "post", "identity")]
    + [dict(position="3x3"), dict(squeeze="max"), dict(gate="tanh"),
       dict(gate="relu"), dict(no_squeeze=True), dict(se_stages=(3,)),
       dict(preact=True)],
    ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()),
)
def test_variants_run_and_differ(overrides):
  rngs = lambda: nnx.Rngs(0)
  x = _images(n=2)
  base = create("cifar_se_resnet20", num_classes=10, rngs=rngs())
  model = create("cifar_se_resnet20", num_classes=10, rngs=rngs(),
                 **overrides)
  y = model(x)
  assert y.shape == (2, 10) and np.all(np.isfinite(y))
  if overrides != dict(integration="standard"):
    assert not np.allclose(y, base(x))


def test_integration_semantics():
  """Each integration puts the block where Table 14 / Fig. 5 says."""
  x = _images(n=2)

  def run(integration):
    m = create("cifar_se_resnet20", num_classes=10, integration=integration)
    m.eval()
    u = m.stages[1][0]  # 16 -> 32 channels, stride 2, projected shortcut.
    h = nnx.relu(m.stem_norm(m.stem_conv(x)))
    for v in m.stages[0]:
      h = v(h)
    return u, h, u(h)

  def branch(u, h):
    r = nnx.relu(u.bn1(u.conv1(h)))
    return u.bn2(u.conv2(r))

  se = lambda u, h: se_jax.squeeze_excite(u.attn.params, h)
  shortcut = lambda u, h: u.downsample_norm(u.downsample_conv(h))
  u, h, out = run("standard")
  np.testing.assert_allclose(
      out, nnx.relu(se(u, branch(u, h)) + shortcut(u, h)), atol=1e-5)
  u, h, out = run("pre")
  np.testing.assert_allclose(
      out, nnx.relu(branch(u, se(u, h)) + shortcut(u, h)), atol=1e-5)
  u, h, out = run("post")
  np.testing.assert_allclose(
      out, se(u, nnx.relu(branch(u, h) + shortcut(u, h))), atol=1e-5)
  u, h, out = run("identity")
  np.testing.assert_allclose(
      out, nnx.relu(branch(u, h) + se(u, shortcut(u, h))), atol=1e-5)


def test_se_stages_selects_stages():
  model = create("se_resnet50", se_stages=(4,))
  gates = capture_gates(model, _images(size=64))
  assert list(gates) == [f"SE_4_{u}" for u in range(1, 7)]


def test_no_squeeze_gates_are_per_position():
  model = create("cifar_se_resnet20", num_classes=10, no_squeeze=True)
  gates = capture_gates(model, _images())
  assert gates["SE_2_1"].shape == (2, 32, 32, 16)
  assert gates["SE_4_1"].shape == (2, 8, 8, 64)


def test_stride_placement():
  v15 = _unit("resnet50")
  caffe = _unit("resnet50", stride="caffe")
  assert v15.conv1.strides == (1, 1) and v15.conv2.strides == (2, 2)
  assert caffe.conv1.strides == (2, 2) and caffe.conv2.strides == (1, 1)
  legacy = create("legacy_se_resnet50")
  assert legacy.ceil_pool and legacy.stages[1][0].conv1.strides == (2, 2)
  resnext = create("legacy_se_resnext50_32x4d")
  assert resnext.stages[1][0].conv2.strides == (2, 2)


def test_ceil_mode_max_pool_matches_reference():
  from se_jax.models.resnet import _max_pool_3x3_s2
  x = np.random.default_rng(0).normal(size=(1, 8, 7, 2)).astype(np.float32)
  got = _max_pool_3x3_s2(jnp.asarray(x), ceil_mode=True)
  # PyTorch/Caffe ceil mode: windows start at 0, 2, 4, ...; the last may be
  # cut off by the border.
  oh, ow = 4, 3
  want = np.empty((1, oh, ow, 2), np.float32)
  for i in range(oh):
    for j in range(ow):
      want[0, i, j] = x[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(0, 1))
  np.testing.assert_array_equal(got, want)


def test_resnext_and_wide_widths():
  u = _unit("se_resnext50_32x4d", stage=0)
  assert u.conv2.groups == 32
  assert u.conv2.in_features == 128 and u.out_channels == 256
  w = create("se_wrn16_8").stages[2][1]
  assert w.out_channels == 512 and w.preact


def test_bfloat16_compute():
  model = create("cifar_se_resnet20", num_classes=10, dtype=jnp.bfloat16)
  y = model(_images())
  assert y.dtype == jnp.float32 and np.all(np.isfinite(y))
  assert model.stem_conv.kernel[...].dtype == jnp.float32


# ------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(name="se_resnet51"), r"unknown model 'se_resnet51'"),
     (dict(name="se_resnet50", reducton=8), r"unknown option\(s\) \['reducton'\]"),
     (dict(name="resnet50", reduction=8), r"'resnet50' has no attention"),
     (dict(name="resnet50", attention="eca", reduction=8),
      r"unknown option\(s\) \['reduction'\] for 'resnet50' with 'eca'"),
     (dict(name="resnet50", attention="sk"), r"unknown attention 'sk'"),
     (dict(name="resnet50", integration="pre"),
      r"'resnet50' has no attention, so placement"),
     (dict(name="eca_resnet50d", kernel_size=4),
      r"kernel_size must be an odd positive int"),
     (dict(name="resnet50", stem_type="deeper"), r"stem_type must be one of"),
     (dict(name="resnet50", conv_impl="eigen"), r"conv_impl must be one of"),
     (dict(name="se_resnet50", integration="parallel"),
      r"integration must be one of .*'parallel'"),
     (dict(name="se_resnet50", gate="softmax"), r"gate must be one of"),
     (dict(name="se_resnet50", se_stages=(1, 2)),
      r"se_stages must be among .*\(2, 3, 4, 5\).*\(1, 2\)"),
     (dict(name="se_resnet50", position="3x3", integration="pre"),
      r"position='3x3' .* needs integration='standard'"),
     (dict(name="cifar_se_resnet20", reduction=32),
      r"reduction=32 leaves 0 channels for channels=16"),
     (dict(name="resnet50", stride="v2"), r"stride must be one of"),
     (dict(name="se_wrn16_8", relu_before_se=True),
      r"relu_before_se needs a BN .* pre-activation units have none")],
)
def test_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    create(kwargs.pop("name"), **kwargs)


def test_bad_images():
  model = create("cifar_se_resnet20")
  with pytest.raises(TypeError, match=r"floating-point .* got dtype uint8"):
    model(jnp.zeros((1, 32, 32, 3), jnp.uint8))
  with pytest.raises(ValueError, match=r"NHWC with 3 channels, got shape"):
    model(jnp.zeros((1, 3, 32, 32)))
  gray = create("cifar_se_resnet20", in_channels=1)
  assert gray(jnp.zeros((1, 28, 28, 1))).shape == (1, 1000)


# ------------------------------------------------------- functional path


def test_split_apply_merge_under_jit_and_grad():
  model = create("cifar_se_resnet20", num_classes=10)
  x, labels = _images(n=4), jnp.arange(4)
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

  @jax.jit
  def loss_fn(params, stats, x, labels):
    m = nnx.merge(graphdef, params, stats)
    logits = m(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return loss.mean(), nnx.state(m, nnx.BatchStat)

  (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, stats, x, labels)
  assert np.isfinite(loss)
  # Gradients reach every parameter, the SE blocks' included.
  se_grads = grads["stages"][2][2]["attn"]
  assert float(jnp.abs(se_grads["w1"][...]).sum()) > 0
  # The stateful call gives the same loss and the same new statistics.
  logits = model(x)
  np.testing.assert_allclose(
      optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(),
      loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(new_stats),
                  jax.tree.leaves(nnx.state(model, nnx.BatchStat))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Merging back gives a model that computes what the pure function did.
  merged = nnx.merge(graphdef, params, new_stats)
  merged.eval()
  model.eval()
  np.testing.assert_allclose(merged(x), model(x), rtol=1e-5, atol=1e-5)


def _unit_train_step(name, stage, size, **options):
  """A residual unit in training mode: its output, the gradients of a
  random projection of it, and the updated BatchNorm statistics."""
  unit = create(name, **options).stages[stage][0]
  graphdef, params, stats = nnx.split(unit, nnx.Param, nnx.BatchStat)
  channels = unit.conv1.in_features
  x = _images(n=4, size=size, c=channels, seed=3)
  ct = _images(n=4, size=size, c=channels, seed=4)

  @jax.jit
  def f(params, stats, x):
    m = nnx.merge(graphdef, params, stats)
    out = m(x)
    return jnp.sum(out * jax.image.resize(ct, out.shape, "nearest")), (
        out, nnx.state(m, nnx.BatchStat))

  (_, aux), grads = jax.value_and_grad(f, argnums=(0, 2), has_aux=True)(
      params, stats, x)
  return aux, grads


@pytest.mark.parametrize("name,stage,options", [
    ("se_resnet50", 1, {}),                       # bottleneck, projected
    ("se_resnet18", 1, {}),                       # basic, projected
    ("cifar_se_resnet20", 0, dict(gate="tanh")),  # basic, identity
])
def test_folding_the_norm_into_se_computes_the_same(name, stage, options):
  units = [u for s in create(name, **options).stages for u in s]
  assert all(u.fold_norm for u in units)
  folded = _unit_train_step(name, stage, 16, **options)
  apart = _unit_train_step(name, stage, 16, fold_norm=False, **options)
  assert not create(name, fold_norm=False, **options).stages[0][0].fold_norm
  for a, b in zip(jax.tree.leaves(folded), jax.tree.leaves(apart)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def test_the_units_buffered_output_changes_no_value_or_gradient():
  # `materialize` only decides whether XLA:CPU keeps a unit's output in a
  # buffer; values, gradients and BatchNorm statistics are bit for bit the
  # same, and pretrained weights load into either.
  buffered = _unit_train_step("cifar_se_resnet20", 0, 16)
  recomputed = _unit_train_step("cifar_se_resnet20", 0, 16, materialize=False)
  for a, b in zip(jax.tree.leaves(buffered), jax.tree.leaves(recomputed)):
    np.testing.assert_array_equal(a, b)
  assert pretrained._layout_difference(
      create("se_resnet50", materialize=False), create("se_resnet50")) is None


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's copies")
def test_inference_keeps_each_bottleneck_output_in_one_buffer():
  # In eval mode a bottleneck unit writes its output in the shape that the
  # next unit's 1x1 convolution reads (rows of pixels), so XLA:CPU copies no
  # map for one of its two readers; the values are those of the unbuffered
  # net, up to float32 rounding (XLA fuses the two programs differently).
  def program(model):
    model.eval()
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)), state

  x = _images(n=2, size=64, seed=5)
  f, state = program(create("se_resnet50", stage_sizes=(2, 2, 1, 1)))
  hlo = f.lower(state, x).compile().as_text()
  assert hlo[hlo.index("ENTRY"):].count(" copy(") == 0
  g, state_g = program(create("se_resnet50", stage_sizes=(2, 2, 1, 1),
                              materialize=False))
  np.testing.assert_allclose(f(state, x), g(state_g, x), rtol=1e-5,
                             atol=1e-6)


def _given_means(monkeypatch, kind: str) -> list:
  """The `mean` that each call of attention `kind`'s `affine_call` gets,
  in a list that fills as the calls come."""
  cls = type(create("se_resnet50", attention=kind).stages[1][0].attn)
  seen = []
  call = cls.affine_call
  monkeypatch.setattr(cls, "affine_call",
                      lambda self, *a, **k: seen.append(k["mean"]) or
                      call(self, *a, **k))
  return seen


@pytest.mark.parametrize("kind", ["se", "ese"])
def test_inference_squeezes_through_the_last_1x1_conv(kind, monkeypatch):
  # In eval mode a bottleneck unit gives its attention the squeeze as conv3
  # of the mean of conv3's input; the unit computes what the unit with the
  # BN apart (which squeezes the normalised map) does.
  seen = _given_means(monkeypatch, kind)
  # 2 x 16 x 16 output positions: the input's 128 channels and conv3's
  # 128 x 512 kernel are less to read than the output's 512 channels.
  x = _images(n=2, size=32, c=256, seed=3)
  out = {}
  for fold in (True, False):
    unit = create("se_resnet50", attention=kind, fold_norm=fold).stages[1][0]
    unit.eval()
    # Statistics that are not the identity, as after training.
    rng = np.random.default_rng(0)
    unit.bn3.mean.set_value(jnp.asarray(rng.normal(size=512), jnp.float32))
    unit.bn3.var.set_value(jnp.asarray(rng.uniform(0.5, 2, 512),
                                       jnp.float32))
    out[fold] = unit(x)
  assert seen and seen[0] is not None and seen[0].shape == (2, 512)
  np.testing.assert_allclose(out[True], out[False], rtol=1e-5, atol=1e-5)
  # In training the squeeze reads the map with the BN's statistics.
  seen.clear()
  create("se_resnet50", attention=kind).stages[1][0](x)
  assert seen == [None]


def test_inference_squeezes_the_output_where_conv3s_kernel_outweighs_it(
    monkeypatch):
  # The last stage's unit at one 2 x 2 image: 4 positions x 2048 output
  # channels against 4 x 512 inputs and a 512 x 2048 kernel.
  assert not squeezes_through_conv3(4, 512, 2048)
  assert squeezes_through_conv3(2 * 16 * 16, 128, 512)
  seen = _given_means(monkeypatch, "se")
  x = _images(n=1, size=4, c=1024, seed=4)
  out = {}
  for fold in (True, False):
    unit = create("se_resnet50", fold_norm=fold).stages[3][0]
    unit.eval()
    out[fold] = unit(x)
  assert seen == [None]
  np.testing.assert_allclose(out[True], out[False], rtol=1e-5, atol=1e-5)


def _maps_written(name: str, x: jax.Array, elements: int) -> int:
  """How many of the compiled eval-mode unit's top-level fusions write a
  map of `elements` values, in-place updates aside."""
  unit = create(name).stages[1][0]
  unit.eval()
  graphdef, state = nnx.split(unit)
  text = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(
      state, x).compile().as_text()
  count = 0
  for line in text[text.index("ENTRY"):].splitlines():
    m = re.match(r"\s*%(\S+) = \w+\[([\d,]*)\]\S* fusion\(", line)
    if m and "dynamic-update-slice" not in m[1] and math.prod(
        int(d) for d in m[2].split(",")) == elements:
      count += 1
  return count


def test_inference_squeeze_through_conv3_computes_its_input_once():
  # The squeeze's mean and conv3 read one buffer: XLA:CPU does not compute
  # the BN + ReLU before conv3 a second time for the mean, so the SE unit
  # writes as many maps of conv3's input size as the plain one.
  x = _images(n=2, size=32, c=256, seed=3)
  elements = 2 * 16 * 16 * 128
  assert squeezes_through_conv3(2 * 16 * 16, 128, 512)
  plain = _maps_written("resnet50", x, elements)
  assert plain >= 1
  assert _maps_written("se_resnet50", x, elements) == plain


def test_only_the_standard_unit_folds_the_norm():
  fold = lambda **kw: create("cifar_se_resnet20", **kw).stages[0][0] \
      .fold_norm
  assert fold() and fold(gate="tanh") and fold(se_bias=False)
  for kw in (dict(squeeze="max"), dict(no_squeeze=True),
             dict(integration="pre"), dict(integration="post"),
             dict(integration="identity"), dict(position="3x3")):
    assert not fold(**kw), kw
  assert not create("legacy_se_resnet18").stages[0][0].fold_norm
  assert not create("cifar_resnet20").stages[0][0].fold_norm
  assert not create("eca_resnet50d").stages[0][0].fold_norm
  se = SqueezeExcite(8, dict(reduction=2, squeeze="max"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="squeeze='avg'"):
    se.affine_call(jnp.ones((1, 2, 2, 8)), jnp.ones(8), jnp.zeros(8))


def test_se_adds_no_activation_memory_to_a_training_step():
  # The SE units keep what the plain units keep, plus (N, C) vectors.
  def temp_bytes(name):
    model = create(name, num_classes=10)
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    x, labels = _images(n=32), jnp.arange(32) % 10

    def loss_fn(params):
      m = nnx.merge(graphdef, params, stats, copy=True)
      return optax.softmax_cross_entropy_with_integer_labels(
          m(x), labels).mean()

    compiled = jax.jit(jax.grad(loss_fn)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert temp_bytes("cifar_se_resnet20") / temp_bytes("cifar_resnet20") < 1.03
