"""se_jax.onednn against lax.conv_general_dilated, in float32, to second order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from se_jax import conv as conv_lib
from se_jax import onednn
from se_jax.costs import macs_of_jaxpr
from se_jax.models import create

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="oneDNN's handlers run on CPUs")

CASES = [  # (H, W, in channels, out channels, kernel, stride, padding)
    (9, 9, 3, 8, 7, 2, (3, 3)),
    (9, 9, 8, 8, 3, 1, (1, 1)),
    (8, 8, 16, 32, 3, 2, (1, 1)),
    (9, 8, 5, 7, 3, (2, 1), (1, 1)),
    (9, 9, 8, 16, 1, 2, (0, 0)),
    (8, 8, 24, 24, 3, 1, (0, 0)),
    (7, 7, 4, 6, 3, 2, (0, 2)),
    (6, 6, 4, 4, 3, 1, (2, 1)),
]


def _case(h, w, cin, cout, ks, stride, pad, n=5, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, h, w, cin)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(ks, ks, cin, cout)) / ks, jnp.float32)
  strides = stride if isinstance(stride, tuple) else (stride, stride)
  padding = (pad, pad)
  ours = lambda x, k: onednn.conv2d(x, k, strides=strides, padding=padding)
  ref = lambda x, k: lax.conv_general_dilated(
      x, k, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST)
  return x, k, ours, ref


def _close(got, want, rtol=2e-5):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_allclose(got, want, rtol=0,
                             atol=rtol * max(1.0, np.abs(want).max()))


def test_handlers_are_built():
  assert onednn.available(), (
      f"se_jax's oneDNN handlers are not built at {onednn.library_path()};"
      " `python -m se_jax.build_onednn` builds them (experiments/setup.sh runs it)")


@pytest.mark.parametrize("case", CASES)
def test_values_and_derivatives_match_lax(case):
  x, k, ours, ref = _case(*case)
  _close(jax.jit(ours)(x, k), ref(x, k))
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))
  for got, want in zip(jax.jit(jax.grad(loss(ours), (0, 1)))(x, k),
                       jax.grad(loss(ref), (0, 1))(x, k)):
    _close(got, want)
  # Forward mode.
  tx, tk = jnp.cos(x), jnp.sin(k)
  _close(jax.jvp(ours, (x, k), (tx, tk))[1], jax.jvp(ref, (x, k), (tx, tk))[1])
  # Second order: forward over reverse, and reverse over reverse.
  hvp = lambda f: jax.jvp(jax.grad(loss(f), (0, 1)), (x, k), (tx, tk))[1]
  for got, want in zip(hvp(ours), hvp(ref)):
    _close(got, want, rtol=1e-4)
  gg = lambda f: jax.grad(
      lambda x, k: jnp.sum(jax.grad(loss(f), 0)(x, k) ** 2), (0, 1))(x, k)
  for got, want in zip(gg(ours), gg(ref)):
    _close(got, want, rtol=1e-4)


def test_vmap_computes_with_xlas_convolution():
  x, k, ours, ref = _case(8, 8, 4, 6, 3, 1, (1, 1))
  xs = jnp.stack([x, 2 * x, -x])
  ks = jnp.stack([k, k / 2, -k])
  _close(jax.vmap(ours, (0, None))(xs, k), jax.vmap(ref, (0, None))(xs, k))
  _close(jax.vmap(ours)(xs, ks), jax.vmap(ref)(xs, ks))
  per_example = lambda f: jax.vmap(
      jax.grad(lambda x, k: jnp.sum(f(x[None], k) ** 2), 1), (0, None))(x, k)
  _close(per_example(ours), per_example(ref), rtol=1e-4)


def test_conv2d_runs_each_part_as_one_call():
  x, k, _, _ = _case(8, 8, 16, 32, 3, 1, (1, 1))
  conv = lambda x, k: conv_lib.conv2d(x, k, padding=((1, 1), (1, 1)))
  assert conv_lib.resolve("auto", x, k, padding=((1, 1), (1, 1))) == "onednn"
  step = jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k) ** 2), (0, 1)))
  hlo = step.lower(x, k).compile().as_text()
  for target in ("SeJaxConvForward", "SeJaxConvInputGrad",
                 "SeJaxConvKernelGrad"):
    assert hlo.count(f'custom_call_target="{target}"') == 1, target
  assert " convolution(" not in hlo


def test_auto_leaves_what_onednn_does_not_take_to_the_formulation():
  x = jnp.ones((2, 8, 8, 16), jnp.float32)
  k3, k1 = jnp.ones((3, 3, 16, 8), jnp.float32), jnp.ones((1, 1, 16, 8))
  pad = ((1, 1), (1, 1))
  assert conv_lib.resolve("auto", x, k3, padding=pad) == "onednn"
  # 1x1 convolutions: XLA's own matrix product.
  assert conv_lib.resolve("auto", x, k1) == "formulated"
  assert conv_lib.resolve("auto", x.astype(jnp.bfloat16),
                          k3.astype(jnp.bfloat16), padding=pad) == "formulated"
  assert conv_lib.resolve("auto", x, k3[:, :, :4], padding=pad,
                          groups=4) == "formulated"
  # The last window stops short of the last column: the padding past it is
  # negative, which oneDNN does not take.
  assert not onednn.supports(x[:, :7, :7], k3, (2, 2), ((1, 0), (1, 0)))
  assert conv_lib.resolve("auto", x[:, :7, :7], k3, strides=(2, 2),
                          padding=((1, 0), (1, 0))) == "formulated"
  for impl in ("formulated", "xla"):
    assert conv_lib.resolve(impl, x, k3, padding=pad) == impl


def test_what_onednn_does_not_take_is_named():
  x = jnp.ones((2, 8, 8, 16), jnp.bfloat16)
  k = jnp.ones((3, 3, 16, 8), jnp.bfloat16)
  with pytest.raises(ValueError, match="takes float32.*bfloat16"):
    conv_lib.conv2d(x, k, impl="onednn")
  with pytest.raises(ValueError, match="takes float32.*bfloat16"):
    onednn.conv2d(x, k)
  with pytest.raises(ValueError, match="groups 2"):
    conv_lib.conv2d(x.astype(jnp.float32), k[:, :, :8].astype(jnp.float32),
                    groups=2, impl="onednn")


def test_a_missing_compiler_is_named(tmp_path):
  with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-c"):
    onednn.build(str(tmp_path / "lib.so"), compiler="no-such-c++")


def test_missing_handlers_fall_back_to_the_formulation(monkeypatch, tmp_path):
  monkeypatch.setenv("SE_JAX_ONEDNN_LIB", str(tmp_path / "absent.so"))
  onednn.available.cache_clear()
  try:
    assert not onednn.available()
    x, k = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 8))
    assert conv_lib.resolve("auto", x, k, padding=((1, 1),) * 2) == (
        "formulated")
    with pytest.raises(RuntimeError, match="python -m se_jax.build_onednn"):
      conv_lib.conv2d(x, k, impl="onednn")
  finally:
    monkeypatch.undo()
    onednn.available.cache_clear()
  assert onednn.available()


def test_training_step_matches_the_formulation():
  # A CIFAR SE-ResNet's loss gradient (BatchNorm on running averages)
  # through oneDNN (its 3x3 convolutions) and through the formulation.
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  y = jnp.arange(4) % 10

  def grads(conv_impl):
    model = create("cifar_se_resnet20", num_classes=10, stage_sizes=(1, 1, 1),
                   conv_impl=conv_impl, rngs=nnx.Rngs(0))
    model = nnx.view(model, use_running_average=True)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
      logits = nnx.merge(graphdef, params, rest)(x)
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y])

    return jax.jit(jax.value_and_grad(loss))(params)

  (l1, g1), (l2, g2) = grads("auto"), grads("formulated")
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    _close(a, b, rtol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_multiply_adds_are_counted_as_for_lax(case):
  x, k, ours, ref = _case(*case)
  for padding in (True, False):
    assert macs_of_jaxpr(jax.make_jaxpr(ours)(x, k),
                         count_padding=padding) == macs_of_jaxpr(
                             jax.make_jaxpr(ref)(x, k), count_padding=padding)
  # The input and the kernel gradient take as many as the forward pass.
  grad = jax.grad(lambda x, k: jnp.sum(ours(x, k)), (0, 1))
  assert macs_of_jaxpr(jax.make_jaxpr(grad)(x, k)) == 3 * macs_of_jaxpr(
      jax.make_jaxpr(ref)(x, k))


def test_explicit_sharding_on_one_device():
  # The trainer's mesh on one device: the batch is typed as split over a
  # 'data' axis of size 1, and stays so through the custom calls.
  mesh = jax.make_mesh((1,), ("data",))
  spec = jax.sharding.NamedSharding
  x = jax.device_put(jax.random.normal(jax.random.key(0), (8, 14, 14, 16)),
                     spec(mesh, jax.sharding.PartitionSpec("data")))
  k = jax.device_put(jax.random.normal(jax.random.key(1), (3, 3, 16, 16)),
                     spec(mesh, jax.sharding.PartitionSpec()))

  def loss(x, k, impl):
    pad = ((1, 1), (1, 1))
    h = conv_lib.materialized(
        jax.nn.relu(conv_lib.conv2d(x, k, padding=pad, impl=impl)))
    return jnp.sum(conv_lib.conv2d(h, k, padding=pad, impl=impl) ** 2)

  with jax.set_mesh(mesh):
    grad = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)
    assert "SeJaxConvKernelGrad" in grad.lower(x, k, "auto").as_text()
    got, want = grad(x, k, "auto"), grad(x, k, "formulated")
  assert got[0].sharding.spec[0] == "data"
  for a, b in zip(got, want):
    _close(a, b, rtol=1e-4)
