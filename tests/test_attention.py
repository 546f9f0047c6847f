"""The attention kinds against independent NumPy references and timm.

Each kind's pure functions are checked under ``jax.jit`` against a float64
NumPy implementation written here from the papers' formulas, in float32 and
with bfloat16 inputs; its module against the pure functions, its options
and its recorded gates; and, where timm has the module, against timm's
module with random weights and BatchNorm statistics.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from se_jax import attention
from se_jax.attention import ese

NEW_KINDS = ["ese"]


# ------------------------------------------------------------------ helpers


def _x(shape=(2, 8, 8, 16), seed=0, dtype=np.float32, loc=0.5):
  rng = np.random.default_rng(seed)
  return (loc + rng.normal(size=shape)).astype(dtype)


def _normal(shape, seed, scale=0.5):
  return (scale * np.random.default_rng(seed).normal(size=shape)).astype(
      np.float32)


def _sigmoid(v):
  return 1.0 / (1.0 + np.exp(-v))


NP_GATES = {
    "sigmoid": _sigmoid,
    "hard_sigmoid": lambda v: np.clip(v / 6.0 + 0.5, 0.0, 1.0),
    "tanh": np.tanh,
    "relu": lambda v: np.maximum(v, 0.0),
}
NP_ACTIVATIONS = {
    "relu": lambda v: np.maximum(v, 0.0),
    "hard_swish": lambda v: v * np.clip(v + 3.0, 0.0, 6.0) / 6.0,
    "silu": lambda v: v * _sigmoid(v),
}


def _f64(a):
  return np.asarray(a, np.float64)


def _close(got, want, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol,
                             atol=atol)


def _bf16(x):
  """`x` rounded to bfloat16, and the same values in float64."""
  xb = jnp.asarray(x, jnp.bfloat16)
  return xb, np.asarray(xb.astype(jnp.float32), np.float64)


def _capture(module, x):
  view = nnx.view(module, record_gates=True, raise_if_not_found=False)
  y, captured = nnx.capture(view, nnx.Intermediate)(x)
  return y, {path[-1]: var[...] for path, var in nnx.to_flat_state(captured)}


def _eval(module):
  return nnx.view(module, use_running_average=True,
                  raise_if_not_found=False)


def _raises(exc, match, fn, *args, **kwargs):
  with pytest.raises(exc, match=match):
    fn(*args, **kwargs)


# -------------------------------------------------------------------- timm


def _torch_to_se_jax(layout, a):
  a = a.detach().cpu().numpy()
  return {
      "conv": lambda: a.transpose(2, 3, 1, 0),
      "fc_conv": lambda: a[:, :, 0, 0].T,
      "linear": lambda: a.T,
      "vector": lambda: a,
      "conv1d": lambda: a[0, 0],
  }[layout]()


def _randomise(torch_module, seed=0):
  """Random weights and BatchNorm statistics, in place; eval mode."""
  import torch
  g = torch.Generator().manual_seed(seed)
  bn_names = {name for name, m in torch_module.named_modules()
              if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
  with torch.no_grad():
    for key, t in torch_module.state_dict().items():
      if not t.is_floating_point():
        continue
      owner, _, leaf = key.rpartition(".")
      if owner in bn_names and leaf in ("weight", "running_var"):
        t.copy_(0.5 + torch.rand(t.shape, generator=g))
      else:
        t.copy_(0.5 * torch.randn(t.shape, generator=g))
  return torch_module.eval()


def _load_timm(module, torch_module):
  """Copies timm's weights into `module` through its `timm_params`."""
  state = torch_module.state_dict()
  used = set()
  for path, (key, layout) in type(module).timm_params.items():
    owner = module
    *parents, name = path.split("/")
    for parent in parents:
      owner = getattr(owner, parent, None)
    var = None if owner is None else getattr(owner, name, None)
    if var is None:
      assert key not in state, (path, key)
      continue
    value = _torch_to_se_jax(layout, state[key])
    assert value.shape == var[...].shape, (path, value.shape)
    var[...] = jnp.asarray(value, jnp.float32)
    used.add(key)
  unmapped = {k for k in state if not k.endswith("num_batches_tracked")}
  assert used == unmapped, sorted(unmapped - used)
  return module


def _timm_forward(torch_module, x):
  import torch
  with torch.no_grad():
    y = torch_module(torch.from_numpy(np.ascontiguousarray(
        x.transpose(0, 3, 1, 2))))
  return y.numpy().transpose(0, 2, 3, 1)


def _check_timm(module, torch_module, x, rtol=1e-5, atol=1e-5):
  _load_timm(module, _randomise(torch_module))
  want = _timm_forward(torch_module, x)
  got = jax.jit(lambda x: _eval(module)(x))(x)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- registry


def test_registry_keeps_se_and_eca_first_and_has_the_new_kinds():
  assert list(attention.KINDS)[:2] == ["se", "eca"]
  assert set(NEW_KINDS) <= set(attention.KINDS)
  for kind in NEW_KINDS:
    cls = attention.KINDS[kind]
    assert cls.kind == kind and cls.tag_prefix
    assert cls.Options.__name__.endswith("Options")
    assert dataclasses.is_dataclass(cls.Options)


def test_option_names_have_one_type_across_kinds_and_models():
  from se_jax.models import option_types
  option_types()  # Raises on a name with two types.


@pytest.mark.parametrize("kind", NEW_KINDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_module_keeps_shape_and_dtype(kind, dtype):
  m = attention.create(kind, 16, rngs=nnx.Rngs(0))
  x = jnp.asarray(_x((2, 8, 8, 16)), dtype)
  y = m(x)
  assert y.shape == x.shape and y.dtype == dtype
  assert np.all(np.isfinite(np.asarray(y, np.float32)))
  for _, v in nnx.to_flat_state(nnx.state(m, nnx.Param)):
    assert v[...].dtype == jnp.float32


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_options_are_frozen_and_reject_unknown_names(kind):
  o = attention.make_options(kind)
  with pytest.raises(dataclasses.FrozenInstanceError):
    setattr(o, dataclasses.fields(o)[0].name, None)
  _raises(ValueError, "do not apply", attention.make_options, kind,
          no_such_option=1)
  _raises(TypeError, "options of", attention.KINDS[kind], 16, options=3,
          rngs=nnx.Rngs(0))
  _raises(ValueError, "channels must be a positive int",
          attention.KINDS[kind], 0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_nothing_is_recorded_unless_asked(kind):
  m = attention.create(kind, 16, rngs=nnx.Rngs(0))
  _, captured = nnx.capture(m, nnx.Intermediate)(_x())
  assert not nnx.to_flat_state(captured)


# --------------------------------------------------------------------- eSE


def _ref_ese(w, b, x, gate="hard_sigmoid", add_maxpool=False):
  x = _f64(x)
  z = x.mean(axis=(1, 2))
  if add_maxpool:
    z = 0.5 * z + 0.5 * x.max(axis=(1, 2))
  s = z @ _f64(w)
  if b is not None:
    s = s + _f64(b)
  g = NP_GATES[gate](s)
  return x * g[:, None, None, :], g


def _ese_params(c=16, seed=1):
  return _normal((c, c), seed), _normal((c,), seed + 1)


@pytest.mark.parametrize("gate", ["hard_sigmoid", "sigmoid"])
@pytest.mark.parametrize("add_maxpool", [False, True])
@pytest.mark.parametrize("use_bias", [True, False])
def test_ese_matches_reference(gate, add_maxpool, use_bias):
  (w, b), x = _ese_params(), _x()
  b = b if use_bias else None
  f = jax.jit(functools.partial(
      ese.effective_squeeze_excite, gate=gate, add_maxpool=add_maxpool,
      return_gates=True))
  y, g = f(w, b, x)
  want_y, want_g = _ref_ese(w, b, x, gate, add_maxpool)
  assert y.dtype == jnp.float32 and g.dtype == jnp.float32
  _close(g, want_g)
  _close(y, want_y)
  _close(jax.jit(ese.ese_gate)(w, b, x.mean(axis=(1, 2))),
         NP_GATES["hard_sigmoid"](x.mean(axis=(1, 2)) @ _f64(w)
                                  + (0 if b is None else _f64(b))))


def test_ese_bfloat16():
  (w, b), (xb, x64) = _ese_params(), _bf16(_x())
  y, g = jax.jit(functools.partial(ese.effective_squeeze_excite,
                                   return_gates=True))(w, b, xb)
  want_y, want_g = _ref_ese(w, b, x64)
  assert y.dtype == jnp.bfloat16 and g.dtype == jnp.float32
  _close(g, want_g)
  _close(y, want_y, rtol=1e-2, atol=1e-2)


def test_ese_channels_first():
  (w, b), x = _ese_params(), _x()
  y = ese.effective_squeeze_excite(w, b, np.moveaxis(x, -1, 1),
                                   data_format="NCHW")
  _close(np.moveaxis(np.asarray(y), 1, -1), _ref_ese(w, b, x)[0])


def test_ese_affine_is_the_block_on_the_affine_map():
  (w, b), x = _ese_params(), _x()
  rng = np.random.default_rng(5)
  mul = rng.uniform(0.5, 2.0, 16).astype(np.float32)
  add = rng.normal(size=16).astype(np.float32)
  y, g = jax.jit(functools.partial(ese.effective_squeeze_excite_affine,
                                   return_gates=True))(w, b, x, mul, add)
  want_y, want_g = _ref_ese(w, b, _f64(x) * mul + add)
  _close(g, want_g)
  _close(y, want_y, atol=1e-5)
  # The gradient is that of the block formed apart.
  ct = _x(seed=6)
  fused = lambda x, mul, add: ese.effective_squeeze_excite_affine(
      w, b, x, mul, add)
  plain = lambda x, mul, add: ese.effective_squeeze_excite(
      w, b, x * mul[None, None, None] + add[None, None, None])
  vjp = lambda f: jax.jit(lambda *a: jax.vjp(f, *a)[1](ct))(x, mul, add)
  for gf, gp in zip(vjp(fused), vjp(plain)):
    np.testing.assert_allclose(gf, gp, rtol=1e-4, atol=1e-5)


def test_ese_module_folds_the_norm():
  m = attention.create("ese", 16, rngs=nnx.Rngs(0))
  assert m.folds_norm
  assert not attention.create("ese", 16, add_maxpool=True,
                              rngs=nnx.Rngs(0)).folds_norm
  x, mul, add = _x(), np.full(16, 2.0, np.float32), np.zeros(16, np.float32)
  y = m.affine_call(jnp.asarray(x), mul, add, dtype=jnp.bfloat16)
  assert y.dtype == jnp.bfloat16
  _close(y.astype(jnp.float32), np.asarray(m(2 * x)), rtol=1e-2, atol=1e-2)
  _raises(ValueError, "add_maxpool=False", attention.create(
      "ese", 16, add_maxpool=True, rngs=nnx.Rngs(0)).affine_call, x, mul,
          add)


def test_ese_module_records_its_gates():
  m = attention.create("ese", 16, tag="ESE_2_1", rngs=nnx.Rngs(0))
  x = _x()
  y, rec = _capture(m, x)
  want_y, want_g = _ref_ese(m.weight[...], m.bias[...], x)
  assert set(rec) == {"ESE_2_1"}
  _close(rec["ESE_2_1"], want_g)
  _close(y, want_y)


def test_ese_bad_input():
  (w, b), x = _ese_params(), _x()
  _raises(ValueError, r"weight must be \(C, C\)", ese.effective_squeeze_excite,
          w[:, :8], b, x)
  _raises(ValueError, r"bias must be \(C,\)", ese.effective_squeeze_excite,
          w, b[:3], x)
  _raises(ValueError, "gate must be one of", ese.effective_squeeze_excite,
          w, b, x, gate="softmax")
  _raises(TypeError, "x must be a floating-point", ese.effective_squeeze_excite,
          w, b, x.astype(np.int32))
  _raises(ValueError, r"z must be \(N, C\)", ese.ese_gate, w, b, x)
  _raises(ValueError, r"mul must have shape \(C,\)",
          ese.effective_squeeze_excite_affine, w, b, x, np.ones(3), b)
  _raises(ValueError, "gate must be one of", ese.ESEOptions, gate="swish")
  _raises(ValueError, "add_maxpool must be a bool", ese.ESEOptions,
          add_maxpool=1)


def test_ese_matches_timm():
  pytest.importorskip("timm")
  from timm.layers.squeeze_excite import EffectiveSEModule
  m = attention.create("ese", 32, rngs=nnx.Rngs(0))
  _check_timm(m, EffectiveSEModule(32), _x((2, 6, 7, 32), loc=0.0))
  # Defaults as timm's: a hard sigmoid gate, no max pooling.
  t = EffectiveSEModule(32)
  assert type(t.gate).__name__ == "Hardsigmoid" and not t.add_maxpool
  assert attention.make_options("ese") == ese.ESEOptions(
      gate="hard_sigmoid", add_maxpool=False)
