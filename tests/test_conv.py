"""conv2d against lax.conv_general_dilated, and what it changes on the CPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax
from jax.test_util import check_grads

import se_jax
from se_jax import conv as conv_lib
from se_jax.conv import conv2d
from se_jax.models import create

CASES = [  # (in channels, out channels, kernel, stride, padding, groups)
    (3, 8, 7, 2, 3, 1),
    (8, 8, 3, 1, 1, 1),
    (8, 16, 1, 2, 0, 1),
    (8, 8, 3, 2, 1, 4),
    # Wider than 16 features: the CPU formulations of conv2d.
    (24, 32, 3, 1, 1, 1),
    (24, 24, 3, 1, 0, 1),
    (40, 20, 3, 2, 1, 1),
    (32, 24, 1, 1, 0, 1),
    (20, 40, 1, 2, 0, 1),
    # At least 64 input features: strided ones by phases.
    (64, 24, 3, 2, 1, 1),
    (64, 20, 3, 3, 1, 1),
]


def _reference(x, k, stride, pad, groups):
  return lax.conv_general_dilated(
      x, k, (stride, stride), ((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups)


# oneDNN's handlers take float32 only; tests/test_onednn.py checks them to
# second order in float32.
@pytest.mark.parametrize("impl", ["auto", "formulated", "xla"])
@pytest.mark.parametrize("cin,cout,ks,stride,pad,groups", CASES)
def test_values_and_gradients_match_lax(cin, cout, ks, stride, pad, groups,
                                        impl):
  rng = np.random.default_rng(0)
  # 35 images: more than two blocks of 16 for the kernel gradient.
  x = jnp.asarray(rng.normal(size=(35, 9, 9, cin)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(ks, ks, cin // groups, cout)), jnp.float32)
  ours = lambda x, k: conv2d(x, k, strides=(stride, stride),
                             padding=((pad, pad), (pad, pad)), groups=groups,
                             impl=impl)
  ref = lambda x, k: _reference(x, k, stride, pad, groups)
  np.testing.assert_allclose(jax.jit(ours)(x, k), ref(x, k), rtol=1e-4,
                             atol=1e-4)
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, k)
  want = jax.grad(loss(ref), argnums=(0, 1))(x, k)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-3)
  # Forward and reverse mode, to second order (in float64: float32 finite
  # differences of second order are too coarse, for lax's own conv too).
  with jax.enable_x64(True):
    check_grads(ours, (x[:3].astype(jnp.float64), k.astype(jnp.float64)),
                order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("cin,cout,ks,stride,pad,groups", CASES[4:])
def test_bfloat16_matches_lax(cin, cout, ks, stride, pad, groups):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(20, 8, 8, cin)), jnp.bfloat16)
  k = jnp.asarray(rng.normal(size=(ks, ks, cin // groups, cout)) / ks,
                  jnp.bfloat16)
  ours = lambda x, k: conv2d(x, k, strides=(stride, stride),
                             padding=((pad, pad), (pad, pad)), groups=groups)
  ref = lambda x, k: _reference(x, k, stride, pad, groups)
  f32 = lambda t: np.asarray(t, np.float32)
  y = jax.jit(ours)(x, k)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(f32(y), f32(ref(x, k)), rtol=2e-2, atol=5e-2)
  dy = jnp.asarray(rng.normal(size=y.shape), jnp.bfloat16)
  got = jax.jit(lambda x, k: jax.vjp(ours, x, k)[1](dy))(x, k)
  want = jax.vjp(ref, x, k)[1](dy)
  for g, w in zip(got, want):
    assert g.dtype == jnp.bfloat16
    scale = np.abs(f32(w)).max()
    np.testing.assert_allclose(f32(g), f32(w), atol=2e-2 * scale)


def _convolutions_on_ynnpack(hlo: str) -> int:
  """Convolutions inside YNNPACK fusions of a compiled module."""
  bodies = {m.group(1): m.group(2) for m in re.finditer(
      r"^%([\w.-]+) .*?\{\n(.*?)^\}", hlo, flags=re.M | re.S)}
  count = 0
  for m in re.finditer(r"calls=%([\w.-]+), backend_config=\{\"fusion_config\":"
                       r"\{\"kind\":\"__ynn_fusion\"", hlo):
    count += bodies.get(m.group(1), "").count(" convolution(")
  return count


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU codegen")
def test_cpu_formulations_keep_stride_1_convolutions_off_ynnpack():
  # The default pipeline of XLA:CPU runs every stride-1 convolution of a
  # training step on Eigen through conv2d's formulation, and many on YNNPACK
  # without it.
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(40, 8, 8, 24)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 24, 32)), jnp.float32)
  k1 = jnp.asarray(rng.normal(size=(1, 1, 32, 24)), jnp.float32)

  def loss(x, k, k1, impl):
    h = conv2d(x, k, padding=((1, 1), (1, 1)), impl=impl)
    return jnp.sum(conv2d(jnp.sin(h), k1, impl=impl) ** 2)

  def hlo(impl):
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    return grad.lower(x, k, k1, impl).compile().as_text()

  assert _convolutions_on_ynnpack(hlo("formulated")) == 0
  if "__ynn_fusion" in hlo("xla"):
    assert _convolutions_on_ynnpack(hlo("xla")) > 0


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU codegen")
@pytest.mark.parametrize("stride", [1, 2])
def test_cpu_pointwise_forward_is_xlas_own_matrix_product(stride):
  # XLA:CPU's default pipeline hands a 1x1 convolution, and a matrix
  # product of the same operands, to YNNPACK; conv2d's forward pass reaches
  # XLA's own dot instead.
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(4, 14, 14, 64)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 64, 96)), jnp.float32)
  conv = lambda x, k: conv2d(x, k, strides=(stride, stride))
  assert conv_lib.resolve("auto", x, k, strides=(stride, stride)) != "onednn"
  hlo = jax.jit(conv).lower(x, k).compile().as_text()
  assert "__ynn_fusion" not in hlo
  assert re.search(r"= f32\[\d+,96\]\S* dot\(", hlo)
  np.testing.assert_allclose(jax.jit(conv)(x, k),
                             _reference(x, k, stride, 0, 1),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("h,k,stride,pad", [
    (8, 3, 2, (1, 1)), (7, 3, 2, (1, 1)), (9, 3, 3, (1, 1)),
    (11, 7, 2, (3, 3)), (8, 1, 2, (0, 0)), (8, 3, 2, (0, 0)),
    (10, 3, 2, (2, 0)), (8, 3, 1, (1, 1))])
def test_phases_give_the_strided_convolution(h, k, stride, pad):
  x = np.random.default_rng(0).standard_normal((2, h, h + 1, 5), np.float32)
  w = np.random.default_rng(1).standard_normal((k, k, 5, 6), np.float32)
  want = lax.conv_general_dilated(
      x, w, (stride, stride), (pad, pad),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST)
  spec = conv_lib._Spec((stride, stride), (pad, pad), 1)
  got = conv_lib._by_phases(jnp.asarray(x), jnp.asarray(w), spec)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU codegen")
def test_cpu_wide_strided_convolutions_run_by_phases_off_ynnpack():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 14, 14, 64)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 64, 64)), jnp.float32)
  conv = lambda x, k: conv2d(x, k, strides=(2, 2), padding=((1, 1), (1, 1)),
                             impl="formulated")
  assert _convolutions_on_ynnpack(
      jax.jit(conv).lower(x, k).compile().as_text()) == 0
  # Four phases, four convolutions.
  jaxpr = str(jax.make_jaxpr(conv)(x, k))
  assert jaxpr.count("conv_general_dilated[") >= 4


def test_gradient_with_respect_to_one_argument():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)
  f = lambda x, k: jnp.sum(conv2d(x, k, padding=((1, 1), (1, 1))) ** 2)
  r = lambda x, k: jnp.sum(_reference(x, k, 1, 1, 1) ** 2)
  for argnum in (0, 1):
    np.testing.assert_allclose(jax.grad(f, argnum)(x, k),
                               jax.grad(r, argnum)(x, k), rtol=1e-4)


def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match="NHWC x and HWIO kernel"):
    conv2d(jnp.ones((4, 4, 3)), jnp.ones((3, 3, 3, 8)))
  with pytest.raises(ValueError, match="x has 3 channels"):
    conv2d(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 4, 8)))
  with pytest.raises(ValueError, match="impl must be one of"):
    conv2d(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 3, 8)), impl="eigen")
  with pytest.raises(ValueError, match="strides must be positive"):
    conv2d(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 3, 8)), strides=(0, 1))
  with pytest.raises(ValueError, match="divisible by groups"):
    se_jax.layers.Conv(6, 8, (3, 3), groups=4, rngs=nnx.Rngs(0))


def _train_step_hlo(stage_sizes=(3, 1, 1), **options):
  options.setdefault("conv_impl", "formulated")
  model = create("cifar_resnet20", num_classes=10, stage_sizes=stage_sizes,
                 **options)
  model = nnx.view(model, use_running_average=True)
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

  def loss(params, x, y):
    m = nnx.merge(graphdef, params, stats)
    return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

  x, y = jnp.ones((8, 16, 16, 3)), jnp.zeros((8,), jnp.int32)
  return jax.jit(jax.grad(loss)).lower(params, x, y).compile().as_text()


def _widest_input_transpose(hlo: str) -> int:
  """Most operands read by a fusion that lays out a conv input for dw.

  The weight gradient reads each input as (C, H, W, N): batch (8) minor.
  """
  bodies = {m.group(1): m.group(2) for m in re.finditer(
      r"^%([\w.-]+) .*?\{\n(.*?)^\}", hlo, flags=re.M | re.S)}
  widest = 0
  for m in re.finditer(
      r"= f32\[(\d+),(\d+),(\d+),(\d+)\]\{[\d,]*\} fusion\((.*?)\),"
      r" kind=kLoop, calls=%([\w.-]+)", hlo):
    if int(m.group(4)) == 8 and " transpose(" in bodies.get(m.group(6), ""):
      widest = max(widest, m.group(5).count("%"))
  return widest


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU codegen")
def test_weight_gradients_read_saved_inputs_on_cpu(monkeypatch):
  # Without the saved buffer, XLA:CPU fuses the producers of a conv's input
  # (the BatchNorm and ReLU before it) into the transpose for the weight
  # gradient.
  assert _widest_input_transpose(_train_step_hlo()) == 1
  monkeypatch.setattr(conv_lib, "materialized", lambda x: x)
  assert _widest_input_transpose(_train_step_hlo()) > 1


def test_materialized_is_the_identity_in_value_and_derivative():
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
  np.testing.assert_array_equal(jax.jit(conv_lib.materialized)(x), x)
  g = jax.grad(lambda x: jnp.sum(conv_lib.materialized(x) ** 2))(x)
  np.testing.assert_allclose(g, 2 * x, rtol=1e-6)
  check_grads(conv_lib.materialized, (x,), order=2, modes=("fwd", "rev"))
  assert float(conv_lib.materialized(jnp.float32(2.0))) == 2.0
  assert conv_lib.materialized([1.0, 2.0]).shape == (2,)


def _widest_stage_fusion(hlo: str) -> int:
  """Most operands read by an elementwise fusion over the first stage's
  (8, 16, 16, 16) maps."""
  return max((m.group(1).count("%") for m in re.finditer(
      r"= f32\[8,16,16,16\]\{[\d,]*\} fusion\((.*?)\), kind=kLoop", hlo)),
             default=0)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU codegen")
def test_units_read_the_previous_units_output_once_on_cpu():
  # Each unit's output is computed into a buffer. Otherwise XLA:CPU fuses
  # the whole chain of earlier units (their BatchNorm, SE scale, shortcut
  # sum and ReLU) into each later unit's shortcut sum, and the work of a
  # step grows with the square of the depth.
  shallow = _widest_stage_fusion(_train_step_hlo((2, 1, 1)))
  deep = _widest_stage_fusion(_train_step_hlo((6, 1, 1)))
  assert deep == shallow
  unmaterialized = _widest_stage_fusion(
      _train_step_hlo((6, 1, 1), materialize=False))
  assert unmaterialized > deep + 8
