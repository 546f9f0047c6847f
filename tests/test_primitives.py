"""The SE primitives against the independent NumPy reference."""

import contextlib
import functools
import io
import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from jax.test_util import check_grads

import se_jax
from se_jax import primitives
from tests import reference as ref

FORMATS = primitives.DATA_FORMATS
SPATIAL = {3: (7,), 4: (5, 6), 5: (3, 4, 5)}
JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def _shape(data_format, n=2, c=12):
  spatial = SPATIAL[len(data_format)]
  if data_format[1] == "C":
    return (n, c, *spatial)
  return (n, *spatial, c)


def _x(data_format, seed=0, dtype=np.float32, n=2, c=12):
  rng = np.random.default_rng(seed)
  return rng.normal(size=_shape(data_format, n, c)).astype(dtype)


def _params(c=12, use_bias=True, seed=1, reduced=3):
  p = se_jax.init_excite(jax.random.key(seed), c, reduced_channels=reduced,
                         use_bias=use_bias)
  if use_bias:
    # Non-zero biases, so that a bias dropped by mistake would show.
    rng = np.random.default_rng(seed)
    p = p._replace(b1=jnp.asarray(rng.normal(size=p.b1.shape), jnp.float32),
                   b2=jnp.asarray(rng.normal(size=p.b2.shape), jnp.float32))
  return p


def _maybe_jit(fn, jit, **static):
  f = lambda *a: fn(*a, **static)
  return jax.jit(f) if jit else f


@JIT
@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("op", ["avg", "max"])
def test_squeeze_matches_reference(data_format, op, jit):
  x = _x(data_format)
  got = _maybe_jit(se_jax.squeeze, jit, op=op, data_format=data_format)(x)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref.squeeze(x, op, data_format), rtol=1e-6,
                             atol=1e-6)


@JIT
@pytest.mark.parametrize(
    "activation,gate,use_bias",
    [(a, g, b) for a, g, b in itertools.product(
        ["relu", "silu"], primitives.GATES, [True, False])],
)
def test_excite_matches_reference(activation, gate, use_bias, jit):
  p = _params(use_bias=use_bias)
  z = np.random.default_rng(3).normal(size=(4, 12)).astype(np.float32)
  got = _maybe_jit(se_jax.excite, jit, activation=activation, gate=gate)(p, z)
  assert got.dtype == jnp.float32 and got.shape == (4, 12)
  np.testing.assert_allclose(got, ref.excite(p, z, activation, gate),
                             rtol=1e-5, atol=1e-6)


@JIT
@pytest.mark.parametrize("data_format", FORMATS)
def test_scale_matches_reference(data_format, jit):
  x = _x(data_format)
  g = np.random.default_rng(4).uniform(size=(2, 12)).astype(np.float32)
  got = _maybe_jit(se_jax.scale, jit, data_format=data_format)(x, g)
  assert got.shape == x.shape and got.dtype == x.dtype
  np.testing.assert_allclose(got, ref.scale(x, g, data_format), rtol=1e-6,
                             atol=1e-6)


@JIT
@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("op", ["avg", "max"])
@pytest.mark.parametrize("gate", ["sigmoid", "tanh"])
def test_squeeze_excite_matches_reference(data_format, op, gate, jit):
  x, p = _x(data_format), _params()
  y, g = _maybe_jit(se_jax.squeeze_excite, jit, op=op, gate=gate,
                    data_format=data_format, return_gates=True)(p, x)
  want_y, want_g = ref.squeeze_excite(p, x, op, "relu", gate, data_format)
  np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-6)
  y_only = se_jax.squeeze_excite(p, x, op=op, gate=gate,
                                 data_format=data_format)
  np.testing.assert_array_equal(y_only, se_jax.squeeze_excite(
      p, x, op=op, gate=gate, data_format=data_format, return_gates=True)[0])


def test_channels_first_equals_channels_last():
  x, p = _x("NHWC"), _params()
  y_last = se_jax.squeeze_excite(p, x)
  y_first = se_jax.squeeze_excite(p, np.moveaxis(x, -1, 1),
                                  data_format="NCHW")
  np.testing.assert_allclose(np.moveaxis(y_first, 1, -1), y_last, rtol=1e-6)


def test_vmap_over_examples_and_over_params():
  x, p = _x("NHWC", n=3), _params()
  batched = se_jax.squeeze_excite(p, x)
  per_example = jax.vmap(lambda xi: se_jax.squeeze_excite(p, xi[None])[0])(x)
  np.testing.assert_allclose(per_example, batched, rtol=1e-6, atol=1e-6)
  # An ensemble of blocks: vmap over a stacked parameter pytree.
  ps = jax.tree.map(lambda *a: jnp.stack(a), _params(seed=1), _params(seed=2))
  ensemble = jax.vmap(lambda pi: se_jax.squeeze_excite(pi, x))(ps)
  for i, seed in enumerate((1, 2)):
    want, _ = ref.squeeze_excite(_params(seed=seed), x)
    np.testing.assert_allclose(ensemble[i], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["avg", "max"])
@pytest.mark.parametrize("data_format", ["NHWC", "NCW"])
def test_gradients(op, data_format):
  x, p = _x(data_format, c=6), _params(c=6, reduced=2)
  f = lambda p, x: se_jax.squeeze_excite(p, x, op=op, data_format=data_format)
  check_grads(f, (p, x), order=2, modes=("fwd", "rev"), atol=2e-2, rtol=2e-2)
  check_grads(jax.jit(f), (p, x), order=1, modes=("rev",), atol=2e-2,
              rtol=2e-2)


def test_gradient_of_mean_matches_reference_finite_difference():
  """The analytic gradient against a float64 NumPy central difference."""
  x, p = _x("NHWC", c=6), _params(c=6, reduced=2)
  loss = lambda x: jnp.sum(se_jax.squeeze_excite(p, x) ** 2)
  grad = np.asarray(jax.grad(loss)(x), np.float64)
  ref_loss = lambda x: np.sum(ref.squeeze_excite(p, x)[0] ** 2)
  rng = np.random.default_rng(0)
  for _ in range(5):
    idx = tuple(rng.integers(0, s) for s in x.shape)
    e = np.zeros(x.shape)
    e[idx] = 1e-4
    x64 = x.astype(np.float64)
    fd = (ref_loss(x64 + e) - ref_loss(x64 - e)) / 2e-4
    np.testing.assert_allclose(grad[idx], fd, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_pools_in_float32(dtype):
  # A large map with a large mean: a half-precision sum would lose the
  # fluctuations entirely (bf16 has 8 significant bits).
  rng = np.random.default_rng(0)
  x32 = (1000.0 + rng.normal(size=(2, 96, 96, 8))).astype(np.float32)
  x = jnp.asarray(x32, dtype)
  exact = ref.squeeze(np.asarray(x, np.float64), "avg", "NHWC")
  got = se_jax.squeeze(x)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, exact, rtol=1e-6)

  p = _params(c=8, reduced=2)
  y, g = se_jax.squeeze_excite(p, x, return_gates=True)
  assert y.dtype == dtype and g.dtype == jnp.float32
  y32, g32 = se_jax.squeeze_excite(p, jnp.asarray(x, jnp.float32),
                                   return_gates=True)
  np.testing.assert_allclose(g, g32, rtol=1e-6)
  # The output equals the float32 result rounded once to the half dtype.
  np.testing.assert_array_equal(np.asarray(y, np.float32),
                                np.asarray(y32.astype(dtype), np.float32))


def test_gate_ranges():
  p = _params()
  z = 10.0 * np.random.default_rng(0).normal(size=(8, 12)).astype(np.float32)
  for gate, lo, hi in [("sigmoid", 0, 1), ("tanh", -1, 1),
                       ("hard_sigmoid", 0, 1), ("relu", 0, np.inf)]:
    g = se_jax.excite(p, z, gate=gate)
    assert float(g.min()) >= lo and float(g.max()) <= hi, gate


def test_init_excite_is_he_initialised():
  p = se_jax.init_excite(jax.random.key(0), 1024, reduction=4)
  assert p.w1.shape == (1024, 256) and p.w2.shape == (256, 1024)
  np.testing.assert_array_equal(p.b1, 0.0)
  # Variance 2 / fan_in, up to sampling error.
  np.testing.assert_allclose(np.var(p.w1), 2.0 / 1024, rtol=0.05)
  np.testing.assert_allclose(np.var(p.w2), 2.0 / 256, rtol=0.05)
  no_bias = se_jax.init_excite(jax.random.key(0), 64, use_bias=False)
  assert no_bias.b1 is None and no_bias.b2 is None


@pytest.mark.parametrize(
    "channels,reduction,rounding,want",
    [(256, 16, "paper", 16), (2048, 16, "paper", 128), (64, 16, "paper", 4),
     (16, 16, "paper", 1), (64, 16, "timm", 8), (256, 16, "timm", 16),
     (2048, 16, "timm", 128), (200, 16, "timm", 16), (16, 16, "timm", 8),
     (1000, 2, "timm", 504)],
)
def test_reduced_width(channels, reduction, rounding, want):
  assert se_jax.reduced_width(channels, reduction, rounding=rounding) == want


# ----------------------------------------------------------------- bad input


def _raises(exc, match, fn, *args, **kwargs):
  with pytest.raises(exc, match=match):
    fn(*args, **kwargs)


def test_bad_rank():
  _raises(ValueError, r"x must have rank >= 3.*\(2, 12\)", se_jax.squeeze,
          np.ones((2, 12), np.float32))


def test_data_format_does_not_fit_rank():
  _raises(ValueError, r"data_format 'NHWC' expects x of rank 4.*rank 3",
          se_jax.squeeze, np.ones((2, 5, 12), np.float32))
  _raises(ValueError, r"data_format must be one of .*'NHCW'",
          se_jax.squeeze, np.ones((2, 5, 5, 12), np.float32),
          data_format="NHCW")


def test_params_channel_mismatch():
  _raises(ValueError, r"params are for 12 channels.*input has 8 channels",
          se_jax.squeeze_excite, _params(), np.ones((2, 4, 4, 8), np.float32))


def test_reduction_leaving_zero_channels():
  _raises(ValueError, r"reduction=16 leaves 0 channels for channels=8",
          se_jax.init_excite, jax.random.key(0), 8)
  _raises(ValueError, r"reduced_channels must be >= 1",
          se_jax.init_excite, jax.random.key(0), 8, reduced_channels=0)


def test_unknown_names():
  x, p = _x("NHWC"), _params()
  _raises(ValueError, r"op must be one of \['avg', 'max'\], got 'min'",
          se_jax.squeeze, x, op="min")
  _raises(ValueError, r"gate must be one of .*got 'softmax'",
          se_jax.squeeze_excite, p, x, gate="softmax")
  _raises(ValueError, r"activation must be one of .*got 'elu'",
          se_jax.excite, p, np.ones((2, 12), np.float32), activation="elu")
  _raises(ValueError, r"rounding must be one of", se_jax.reduced_width, 64,
          rounding="up")


def test_non_float_input():
  _raises(TypeError, r"x must be a floating-point array, got dtype int32",
          se_jax.squeeze, np.ones((2, 4, 4, 12), np.int32))
  _raises(TypeError, r"z must be a floating-point array",
          se_jax.excite, _params(), np.ones((2, 12), np.int32))


def test_bad_gates_shape():
  _raises(ValueError, r"gates must have shape \(N, C\) = \(2, 12\).*\(2, 6\)",
          se_jax.scale, _x("NHWC"), np.ones((2, 6), np.float32))


def test_errors_are_raised_at_trace_time_under_jit():
  f = jax.jit(lambda x: se_jax.squeeze(x, data_format="NCHW"))
  _raises(ValueError, r"expects x of rank 4", f, np.ones((2, 3, 4), np.float32))


def _affine(c, seed=3):
  rng = np.random.default_rng(seed)
  return (rng.uniform(0.5, 2.0, size=c).astype(np.float32),
          rng.normal(size=c).astype(np.float32))


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW", "NCW", "NDHWC"])
def test_squeeze_excite_affine_is_the_block_on_the_affine_map(data_format):
  x, p = _x(data_format), _params()
  mul, add = _affine(12)
  c_axis = primitives._channel_axis("x", jnp.asarray(x), data_format)
  shape = [1] * x.ndim
  shape[c_axis] = 12
  want_y, want_g = ref.squeeze_excite(
      p, x * mul.reshape(shape) + add.reshape(shape),
      data_format=data_format)
  y, g = jax.jit(functools.partial(
      se_jax.squeeze_excite_affine, data_format=data_format,
      return_gates=True))(p, x, mul, add)
  np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)


def test_squeeze_excite_affine_gradients():
  x, p = _x("NHWC", c=6), _params(c=6, reduced=2)
  mul, add = _affine(6)
  fused = lambda p, x, mul, add: se_jax.squeeze_excite_affine(p, x, mul, add)
  plain = lambda p, x, mul, add: se_jax.squeeze_excite(
      p, x * mul[None, None, None] + add[None, None, None])
  # Finite differences (of a block that computes in float32) ...
  check_grads(fused, (p, x, mul, add), order=2, modes=("fwd", "rev"),
              atol=2e-2, rtol=2e-2)
  # ... and, tightly, the derivatives of the block formed apart.
  ct = np.random.default_rng(4).normal(size=x.shape).astype(np.float32)
  tangents = jax.tree.map(lambda a: jnp.asarray(
      np.random.default_rng(5).normal(size=np.shape(a)), jnp.float32),
      (p, x, mul, add))
  np.testing.assert_allclose(
      jax.jvp(fused, (p, x, mul, add), tangents)[1],
      jax.jvp(plain, (p, x, mul, add), tangents)[1], rtol=1e-4, atol=1e-5)
  want = jax.vjp(plain, p, x, mul, add)[1](ct)
  got = jax.jit(lambda *a: jax.vjp(fused, *a)[1](ct))(p, x, mul, add)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
  # Forward over reverse: a Hessian-vector product in x.
  loss = lambda f: lambda x: jnp.sum(f(p, x, mul, add) * ct)
  hvp = lambda f, x: jax.jvp(jax.grad(loss(f)), (x,), (ct,))[1]
  np.testing.assert_allclose(jax.jit(lambda x: hvp(fused, x))(x),
                             hvp(plain, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,short", [(jnp.float32, "f32"),
                                         (jnp.bfloat16, "bf16")])
def test_squeeze_excite_affine_keeps_only_the_input_map(dtype, short):
  # The gradient of the block on a BatchNorm's output needs that output
  # when it is formed apart; the fused block keeps only the input map.
  x = jnp.ones((4, 8, 8, 16), dtype)
  p = _params(c=16, reduced=4)
  mul, add = _affine(16)

  def map_sized(f):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      print_saved_residuals(f, p, x, mul, add)
    found = []
    for dt, dims in re.findall(r"^(\w+)\[([\d,]*)\]", out.getvalue(), re.M):
      if math.prod(int(d) for d in dims.split(",") if d) == x.size:
        found.append(dt)
    return found

  fused = map_sized(lambda p, x, mul, add: se_jax.squeeze_excite_affine(
      p, x, mul, add).astype(jnp.float32).sum())
  plain = map_sized(lambda p, x, mul, add: se_jax.squeeze_excite(
      p, (x * mul[None, None, None] + add[None, None, None]).astype(dtype)
  ).astype(jnp.float32).sum())
  assert fused == [short]
  assert len(plain) >= 2


def test_squeeze_excite_affine_with_a_given_mean():
  x, p = _x("NHWC"), _params()
  mul, add = _affine(12)
  want_y, want_g = ref.squeeze_excite(p, x * mul + add)
  # The mean of a 1x1 convolution's output, from its input's mean.
  rng = np.random.default_rng(5)
  h = rng.normal(size=x.shape[:3] + (3,)).astype(np.float32)
  w = rng.normal(size=(3, 12)).astype(np.float32)
  y_conv = np.einsum("nhwi,io->nhwo", h, w)
  want_y, want_g = ref.squeeze_excite(p, y_conv * mul + add)
  y, g = se_jax.squeeze_excite_affine(p, y_conv, mul, add, return_gates=True,
                                      mean=h.mean(axis=(1, 2)) @ w)
  np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  # The mean is what the squeeze reads: another mean, other gates.
  _, other = se_jax.squeeze_excite_affine(
      p, y_conv, mul, add, return_gates=True,
      mean=h.mean(axis=(1, 2)) @ w + 1.0)
  assert not np.allclose(other, want_g)
  _raises(ValueError, r"mean must have shape \(N, C\) = \(2, 12\)",
          se_jax.squeeze_excite_affine, p, y_conv, mul, add,
          mean=np.zeros((2, 3), np.float32))
  _raises(TypeError, "mean", se_jax.squeeze_excite_affine, p, y_conv, mul,
          add, mean=np.zeros((2, 12), np.int32))


def test_squeeze_excite_affine_bad_input():
  x, p = _x("NHWC"), _params()
  mul, add = _affine(12)
  _raises(ValueError, r"mul must have shape \(C,\) = \(12,\)",
          se_jax.squeeze_excite_affine, p, x, mul[:5], add)
  _raises(ValueError, r"add must have shape", se_jax.squeeze_excite_affine,
          p, x, mul, add[None])
  _raises(TypeError, "mul", se_jax.squeeze_excite_affine, p, x,
          np.ones(12, np.int32), add)
