"""The NNX layers: BatchNorm against NumPy, SqueezeExcite against the primitives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import se_jax
from se_jax.layers import BatchNorm
from tests import reference as ref


def _x(shape=(4, 5, 6, 3), seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return (2.0 + 3.0 * rng.normal(size=shape)).astype(dtype)


def _bn(c=3, **kw):
  bn = BatchNorm(c, **kw)
  rng = np.random.default_rng(1)
  bn.scale[...] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
  bn.bias[...] = jnp.asarray(rng.normal(size=c), jnp.float32)
  return bn


def test_batchnorm_train_mode_matches_numpy():
  bn = _bn(momentum=0.9, epsilon=1e-5)
  x = _x()
  graphdef, state = nnx.split(bn)
  y = jax.jit(lambda state, x: nnx.merge(graphdef, state, copy=True)(x))(
      state, x)
  flat = x.reshape(-1, 3).astype(np.float64)
  mean, var = flat.mean(0), flat.var(0)
  want = (x - mean) / np.sqrt(var + 1e-5) * np.asarray(bn.scale[...]) + \
      np.asarray(bn.bias[...])
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  bn(x)
  # Running statistics as PyTorch keeps them: unbiased variance.
  n = flat.shape[0]
  np.testing.assert_allclose(bn.mean[...], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * var * n / (n - 1),
                             rtol=1e-5)


def test_batchnorm_eval_mode_uses_running_statistics():
  bn = _bn()
  bn.mean[...] = jnp.array([1.0, -1.0, 0.5])
  bn.var[...] = jnp.array([4.0, 0.25, 1.0])
  x = _x()
  for layer in (nnx.view(bn, use_running_average=True), bn):
    if layer is bn:
      bn.eval()
    y = layer(x)
    want = (x - np.array([1.0, -1.0, 0.5])) / np.sqrt(
        np.array([4.0, 0.25, 1.0]) + 1e-5) * np.asarray(bn.scale[...]) + \
        np.asarray(bn.bias[...])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(bn.mean[...], [1.0, -1.0, 0.5])


def test_batchnorm_bfloat16_statistics_in_float32():
  bn = _bn(dtype=jnp.bfloat16)
  x = _x(shape=(8, 16, 16, 3))
  x[..., 0] += 500.0  # A large mean that bf16 statistics would blur.
  y = bn(jnp.asarray(x, jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  y32 = _bn()(jnp.asarray(jnp.asarray(x, jnp.bfloat16), jnp.float32))
  np.testing.assert_allclose(np.asarray(y, np.float32), y32, atol=0.05,
                             rtol=0.02)


def test_batchnorm_gradients():
  from jax.test_util import check_grads
  bn = _bn()
  graphdef, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)
  f = lambda x: nnx.merge(graphdef, params, stats, copy=True)(x)
  check_grads(f, (_x(shape=(3, 2, 2, 3)),), order=1, modes=("rev",),
              atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("no_squeeze", [False, True])
def test_squeeze_excite_module_calls_the_primitives(no_squeeze):
  se = se_jax.SqueezeExcite(16, reduction=4, no_squeeze=no_squeeze,
                            rngs=nnx.Rngs(0))
  x = _x(shape=(2, 5, 5, 16))
  y = se(x)
  if no_squeeze:
    g = ref.excite(se.params, x)
    np.testing.assert_allclose(y, x * g, rtol=1e-5, atol=1e-5)
  else:
    want, _ = ref.squeeze_excite(se.params, x)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_squeeze_excite_records_gates_only_when_asked():
  se = se_jax.SqueezeExcite(16, reduction=4, tag="SE_2_1", rngs=nnx.Rngs(0))
  x = _x(shape=(2, 5, 5, 16))
  _, captured = nnx.capture(se, nnx.Intermediate)(x)
  assert not list(nnx.to_flat_state(captured))
  view = nnx.view(se, record_gates=True)
  _, captured = nnx.capture(view, nnx.Intermediate)(x)
  (path, gates), = list(nnx.to_flat_state(captured))
  assert path[-1] == "SE_2_1"
  np.testing.assert_allclose(gates[...], ref.squeeze_excite(se.params, x)[1],
                             rtol=1e-5, atol=1e-6)
