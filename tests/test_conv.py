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
]


def _reference(x, k, stride, pad, groups):
  return lax.conv_general_dilated(
      x, k, (stride, stride), ((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups)


@pytest.mark.parametrize("cin,cout,ks,stride,pad,groups", CASES)
def test_values_and_gradients_match_lax(cin, cout, ks, stride, pad, groups):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 9, 9, cin)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(ks, ks, cin // groups, cout)), jnp.float32)
  ours = lambda x, k: conv2d(x, k, strides=(stride, stride),
                             padding=((pad, pad), (pad, pad)), groups=groups)
  ref = lambda x, k: _reference(x, k, stride, pad, groups)
  np.testing.assert_allclose(jax.jit(ours)(x, k), ref(x, k), rtol=1e-5,
                             atol=1e-5)
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, k)
  want = jax.grad(loss(ref), argnums=(0, 1))(x, k)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
  # Forward and reverse mode, to second order (in float64: float32 finite
  # differences of second order are too coarse, for lax's own conv too).
  with jax.enable_x64(True):
    check_grads(ours, (x.astype(jnp.float64), k.astype(jnp.float64)),
                order=2, modes=("fwd", "rev"))


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
  with pytest.raises(ValueError, match="divisible by groups"):
    se_jax.layers.Conv(6, 8, (3, 3), groups=4, rngs=nnx.Rngs(0))


def _train_step_hlo():
  model = create("cifar_resnet20", num_classes=10, stage_sizes=(3, 1, 1))
  model = nnx.view(model, use_running_average=True)
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

  def loss(params, x, y):
    m = nnx.merge(graphdef, params, stats)
    return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

  x, y = jnp.ones((8, 16, 16, 3)), jnp.zeros((8,), jnp.int32)
  lowered = jax.jit(jax.grad(loss)).lower(params, x, y)
  return lowered.compile(
      compiler_options=se_jax.compiler_options("cpu")).as_text()


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
  # Without the saved buffer, XLA:CPU fuses the producers of a unit's input
  # (BatchNorm, ReLU and, through the identity shortcuts, the earlier units)
  # into the transpose for the weight gradient.
  assert _widest_input_transpose(_train_step_hlo()) == 1
  monkeypatch.setattr(conv_lib, "_materialized", lambda x: x)
  assert _widest_input_transpose(_train_step_hlo()) > 4
