"""The attention kinds against independent NumPy references and timm.

Each kind's pure functions are checked under ``jax.jit`` against a float64
NumPy implementation written here from the papers' formulas, in float32 and
with bfloat16 inputs; its module against the pure functions, its options
and its recorded gates; and, where timm has the module, against timm's
module with random weights and BatchNorm statistics.
"""

import contextlib
import dataclasses
import functools
import io
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from se_jax import attention
from se_jax import primitives
from se_jax.attention import cbam
from se_jax.attention import coord
from se_jax.attention import ese
from se_jax.attention import gct
from se_jax.attention import ge
from se_jax.attention import simam
from se_jax.attention import srm

NEW_KINDS = ["ese", "cbam", "ge", "srm", "gct", "coord", "simam"]


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


@nnx.jit
def _run_recording(module, x):
  view = nnx.view(module, record_gates=True, raise_if_not_found=False)
  return nnx.capture(view, nnx.Intermediate)(x)


def _capture(module, x):
  """The module's output and what it records, under ``nnx.jit``."""
  y, captured = _run_recording(module, x)
  return y, {path[-1]: var[...] for path, var in nnx.to_flat_state(captured)}


_call = nnx.jit(lambda module, x: module(x))


def _channels_first(fn, *args):
  """`fn` on the channels-first twin of the NHWC map, the last argument,
  back in NHWC."""
  *args, x = args
  y = jax.jit(functools.partial(fn, data_format="NCHW"))(
      *args, np.moveaxis(x, -1, 1))
  return np.moveaxis(np.asarray(y), 1, -1)


def _eval(module):
  return nnx.view(module, use_running_average=True,
                  raise_if_not_found=False)


def _np_conv_same(x, kernel):
  """Zero-padded stride-1 convolution of an NHWC map with an HWIO kernel."""
  x, kernel = _f64(x), _f64(kernel)
  kh, kw = kernel.shape[:2]
  n, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  out = np.zeros((n, h, w, kernel.shape[3]))
  for a in range(kh):
    for b in range(kw):
      out += xp[:, a:a + h, b:b + w, :] @ kernel[a, b]
  return out


def _np_norm(bn):
  """A se_jax BatchNorm in eval mode, as a NumPy function."""
  mean, var = _f64(bn.mean[...]), _f64(bn.var[...])
  scale, bias = _f64(bn.scale[...]), _f64(bn.bias[...])
  return lambda v: (v - mean) / np.sqrt(var + bn.epsilon) * scale + bias


def _random_bn(bn, seed):
  rng = np.random.default_rng(seed)
  c = bn.scale[...].shape[0]
  bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
  bn.bias[...] = jnp.asarray(rng.normal(size=c), jnp.float32)
  bn.mean[...] = jnp.asarray(0.3 * rng.normal(size=c), jnp.float32)
  bn.var[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
  return bn


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


_run_plain = nnx.jit(lambda m, x: nnx.capture(m, nnx.Intermediate)(x))


@pytest.mark.parametrize("kind", NEW_KINDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_module_keeps_shape_and_dtype(kind, dtype):
  m = attention.create(kind, 16, rngs=nnx.Rngs(0))
  x = jnp.asarray(_x((2, 8, 8, 16)), dtype)
  y, captured = _run_plain(m, x)
  assert y.shape == x.shape and y.dtype == dtype
  assert not nnx.to_flat_state(captured)  # Nothing unless asked.
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


@pytest.mark.parametrize("gate,add_maxpool,use_bias", [
    ("hard_sigmoid", False, True), ("sigmoid", True, False)])
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
  _close(_channels_first(ese.effective_squeeze_excite, w, b, x),
         _ref_ese(w, b, x)[0])


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


def test_ese_affine_keeps_only_the_input_map():
  # As SE's folded path: the gradient keeps x, not the normalised map.
  from jax.ad_checkpoint import print_saved_residuals
  (w, b), x = _ese_params(), jnp.ones((2, 8, 8, 16), jnp.bfloat16)
  mul, add = np.full(16, 2.0, np.float32), np.zeros(16, np.float32)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(
        lambda x, mul, add: ese.effective_squeeze_excite_affine(
            w, b, x, mul, add).astype(jnp.float32).sum(), x, mul, add)
  found = [dt for dt, dims in re.findall(r"^(\w+)\[([\d,]*)\]",
                                         out.getvalue(), re.M)
           if math.prod(int(d) for d in dims.split(",") if d) == x.size]
  assert found == ["bf16"]


def test_ese_module_folds_the_norm():
  m = attention.create("ese", 16, rngs=nnx.Rngs(0))
  assert m.folds_norm
  assert not attention.create("ese", 16, add_maxpool=True,
                              rngs=nnx.Rngs(0)).folds_norm
  x, mul, add = _x(), np.full(16, 2.0, np.float32), np.zeros(16, np.float32)
  y = nnx.jit(lambda m, x: m.affine_call(x, mul, add, dtype=jnp.bfloat16))(
      m, x)
  assert y.dtype == jnp.bfloat16
  _close(y.astype(jnp.float32), np.asarray(_call(m, 2 * x)), rtol=1e-2,
         atol=1e-2)
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


# -------------------------------------------------------------------- CBAM


def _ref_mlp(mlp, z, activation="relu"):
  w1, b1, w2, b2 = mlp
  h = z @ _f64(w1) + (0 if b1 is None else _f64(b1))
  return NP_ACTIVATIONS[activation](h) @ _f64(w2) + (
      0 if b2 is None else _f64(b2))


def _ref_cbam(mlp, kernel, x, norm=None, gate="sigmoid"):
  x = _f64(x)
  g = NP_GATES[gate](_ref_mlp(mlp, x.mean(axis=(1, 2)))
                     + _ref_mlp(mlp, x.max(axis=(1, 2))))
  x1 = x * g[:, None, None, :]
  d = np.stack([x1.mean(axis=-1), x1.max(axis=-1)], axis=-1)
  s = _np_conv_same(d, kernel)
  if norm is not None:
    s = norm(s)
  sg = NP_GATES[gate](s[..., 0])
  return x1 * sg[..., None], g, sg


def _cbam_params(c=16, r=4, k=7, bias=True, seed=1):
  mlp = primitives.ExciteParams(
      _normal((c, r), seed), _normal((r,), seed + 1) if bias else None,
      _normal((r, c), seed + 2), _normal((c,), seed + 3) if bias else None)
  return cbam.CBAMParams(mlp, _normal((k, k, 2, 1), seed + 4, scale=0.2))


@pytest.mark.parametrize("bias,k,gate", [(True, 7, "sigmoid"),
                                         (False, 3, "hard_sigmoid")])
def test_cbam_matches_reference(bias, k, gate):
  p, x = _cbam_params(bias=bias, k=k), _x((2, 7, 9, 16))
  norm = (lambda v: 1.5 * v - 0.25)
  f = jax.jit(functools.partial(
      cbam.convolutional_block_attention, spatial_norm=norm, gate=gate,
      return_gates=True))
  y, (g, sg) = f(p, x)
  want_y, want_g, want_s = _ref_cbam(p.mlp, p.spatial_kernel, x,
                                     norm=lambda v: 1.5 * v - 0.25,
                                     gate=gate)
  assert g.shape == (2, 16) and sg.shape == (2, 7, 9)
  _close(g, want_g)
  _close(sg, want_s)
  _close(y, want_y)
  # The pieces on their own.
  _close(jax.jit(cbam.cbam_channel_gate)(p.mlp, x), _ref_cbam(
      p.mlp, p.spatial_kernel, x)[1])
  d = cbam.cbam_spatial_descriptor(x)
  _close(d, np.stack([_f64(x).mean(-1), _f64(x).max(-1)], -1))
  _close(jax.jit(cbam.cbam_spatial_gate)(p.spatial_kernel, d),
         _sigmoid(_np_conv_same(d, p.spatial_kernel)[..., 0]))


def test_cbam_bfloat16_and_channels_first():
  p, x = _cbam_params(), _x((2, 6, 6, 16))
  xb, x64 = _bf16(x)
  y, (g, sg) = jax.jit(functools.partial(
      cbam.convolutional_block_attention, return_gates=True))(p, xb)
  want_y, want_g, want_s = _ref_cbam(p.mlp, p.spatial_kernel, x64)
  assert y.dtype == jnp.bfloat16
  assert g.dtype == jnp.float32 and sg.dtype == jnp.float32
  _close(g, want_g)
  _close(sg, want_s)
  _close(y, want_y, rtol=1e-2, atol=1e-2)
  _close(_channels_first(cbam.convolutional_block_attention, p, x),
         _ref_cbam(p.mlp, p.spatial_kernel, x)[0])


def test_cbam_module_eval_train_and_recording():
  m = attention.create("cbam", 32, tag="CBAM_3_2", rngs=nnx.Rngs(0))
  _random_bn(m.spatial_norm, 3)
  x = _x((2, 6, 5, 32))
  mlp = m.params.mlp
  y, rec = _capture(_eval(m), x)
  want_y, want_g, want_s = _ref_cbam(mlp, m.spatial_kernel[...], x,
                                     norm=_np_norm(m.spatial_norm))
  assert set(rec) == {"CBAM_3_2", "CBAM_3_2:spatial"}
  _close(rec["CBAM_3_2"], want_g)
  _close(rec["CBAM_3_2:spatial"], want_s)
  _close(y, want_y)
  # Training: the spatial BatchNorm uses the batch's statistics and
  # updates its running ones.
  before = np.asarray(m.spatial_norm.mean[...])
  batch_stats = {}

  def batch_norm(v):
    batch_stats["mean"] = v.mean(axis=(0, 1, 2))
    batch_stats["var"] = v.var(axis=(0, 1, 2))
    return ((v - batch_stats["mean"]) / np.sqrt(batch_stats["var"] + 1e-5)
            * _f64(m.spatial_norm.scale[...]) + _f64(m.spatial_norm.bias[...]))

  want_y = _ref_cbam(mlp, m.spatial_kernel[...], x, norm=batch_norm)[0]
  _close(_call(m, x), want_y, atol=1e-5)
  _close(m.spatial_norm.mean[...], 0.9 * before + 0.1 * batch_stats["mean"])


def test_cbam_widths_and_bad_input():
  assert [cbam.cbam_reduced_width(c) for c in (16, 24, 40, 64, 2048)] == [
      1, 2, 3, 4, 128]
  assert cbam.cbam_reduced_width(40, rounding="paper") == 2
  _raises(ValueError, "leaves 0 channels", cbam.cbam_reduced_width, 8,
          rounding="paper")
  p, x = _cbam_params(), _x()
  _raises(ValueError, r"kernel must be \(k, k, 2, 1\) with k odd",
          cbam.convolutional_block_attention, p._replace(
              spatial_kernel=np.zeros((4, 4, 2, 1), np.float32)), x)
  _raises(ValueError, "params are for 16 channels",
          cbam.convolutional_block_attention, p, x[..., :8])
  _raises(ValueError, "data_format must be one of",
          cbam.convolutional_block_attention, p, x, data_format="NWC")
  _raises(ValueError, "expects x of rank 4",
          cbam.convolutional_block_attention, p, x[0])
  _raises(TypeError, "params must be a CBAMParams",
          cbam.convolutional_block_attention, p.mlp, x)
  _raises(TypeError, "x must be a floating-point",
          cbam.convolutional_block_attention, p, x.astype(np.int32))
  _raises(ValueError, r"d must be \(N, H, W, 2\)", cbam.cbam_spatial_gate,
          p.spatial_kernel, x)
  _raises(ValueError, "activation must be one of", cbam.cbam_channel_gate,
          p.mlp, x, activation="tanh")
  for bad in [dict(spatial_kernel_size=6), dict(reduction=0),
              dict(rounding="up"), dict(mlp_bias="no"), dict(gate="x"),
              dict(activation="x")]:
    name = next(iter(bad))
    _raises(ValueError, name, cbam.CBAMOptions, **bad)


def test_cbam_matches_timm():
  pytest.importorskip("timm")
  from timm.layers.cbam import CbamModule
  from timm.layers.helpers import make_divisible
  m = attention.create("cbam", 32, rngs=nnx.Rngs(0))
  _check_timm(m, CbamModule(32), _x((2, 9, 10, 32), loc=0.0))
  m = attention.create("cbam", 24, reduction=4, mlp_bias=True,
                       spatial_kernel_size=3, rngs=nnx.Rngs(0))
  _check_timm(m, CbamModule(24, rd_ratio=1 / 4, mlp_bias=True,
                            spatial_kernel_size=3), _x((2, 5, 4, 24)))
  # Defaults as timm's.
  t = CbamModule(48)
  o = attention.make_options("cbam")
  assert attention.create("cbam", 48, rngs=nnx.Rngs(0)).reduced_channels \
      == t.channel.fc1.out_channels == 3
  assert (t.channel.fc1.bias is None) == (not o.mlp_bias)
  assert t.spatial.conv.conv.kernel_size == (o.spatial_kernel_size,) * 2
  assert t.spatial.conv.conv.bias is None
  assert t.spatial.conv.bn.eps == m.spatial_norm.epsilon
  assert t.spatial.conv.bn.momentum == pytest.approx(
      1 - m.spatial_norm.momentum)
  assert type(t.channel.act).__name__ == "ReLU" and o.activation == "relu"
  assert all(cbam.cbam_reduced_width(c) == make_divisible(
      c * (1 / 16), 1, round_limit=0.0) for c in range(1, 600))


# ------------------------------------------------------------ Gather-Excite


def _np_pool(x, e, op):
  """Windows of 2e - 1 with stride e and padding e - 1, over the positions
  inside the map only."""
  x = _f64(x)
  k, p = 2 * e - 1, e - 1
  n, h, w, c = x.shape
  ho, wo = (h + 2 * p - k) // e + 1, (w + 2 * p - k) // e + 1
  out = np.zeros((n, ho, wo, c))
  for i in range(ho):
    r = slice(max(i * e - p, 0), min(i * e - p + k, h))
    for j in range(wo):
      q = slice(max(j * e - p, 0), min(j * e - p + k, w))
      out[:, i, j] = op(x[:, r, q], axis=(1, 2))
  return out


def _np_upsample(g, h, w):
  """Nearest neighbour: output row i reads row floor(i * h_in / h)."""
  rows = np.arange(h) * g.shape[1] // h
  cols = np.arange(w) * g.shape[2] // w
  return g[:, rows][:, :, cols]


def _np_depthwise(x, kernel, stride, pad):
  x, kernel = _f64(x), _f64(kernel)
  kh, kw = kernel.shape[:2]
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho = (xp.shape[1] - kh) // stride + 1
  wo = (xp.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, x.shape[3]))
  for a in range(kh):
    for b in range(kw):
      out += xp[:, a:a + stride * ho:stride, b:b + stride * wo:stride] \
          * kernel[a, b, 0]
  return out


def _ref_ge(params, x, extent, norms=None, add_maxpool=False,
            gate="sigmoid"):
  x = _f64(x)
  if params.gather_kernels:
    g = x
    count = len(params.gather_kernels)
    for i, k in enumerate(params.gather_kernels):
      g = _np_depthwise(g, k, *((1, 0) if extent == 0 else (2, 1)))
      if norms is not None:
        g = norms[i](g)
      if i < count - 1:
        g = np.maximum(g, 0.0)
  elif extent == 0:
    g = x.mean(axis=(1, 2), keepdims=True)
    if add_maxpool:
      g = 0.5 * g + 0.5 * x.max(axis=(1, 2), keepdims=True)
  else:
    g = _np_pool(x, extent, np.mean)
    if add_maxpool:
      g = 0.5 * g + 0.5 * _np_pool(x, extent, np.max)
  if params.mlp is not None:
    g = _ref_mlp(params.mlp, g)
  gates = _np_upsample(NP_GATES[gate](g), *x.shape[1:3])
  return x * gates, gates


def _ge_params(c=16, mlp=True, kernels=(), seed=1):
  m = primitives.ExciteParams(
      _normal((c, 4), seed), _normal((4,), seed + 1), _normal((4, c), seed + 2),
      _normal((c,), seed + 3)) if mlp else None
  return ge.GEParams(m, tuple(_normal(k, seed + 4 + i)
                              for i, k in enumerate(kernels)))


GE_CASES = {
    "global": dict(extent=0),
    "global-maxpool-nomlp": dict(extent=0, add_maxpool=True, mlp=False),
    "e2": dict(extent=2),
    "e4-maxpool": dict(extent=4, add_maxpool=True),
    "e8-nomlp": dict(extent=8, mlp=False),
    "theta-e4": dict(extent=4, kernels=[(3, 3, 1, 16)] * 2),
    "theta-global": dict(extent=0, kernels=[(9, 11, 1, 16)]),
}


@pytest.mark.parametrize("case", GE_CASES)
def test_ge_matches_reference(case):
  kw = dict(GE_CASES[case])
  p = _ge_params(mlp=kw.pop("mlp", True), kernels=kw.pop("kernels", ()))
  x = _x((2, 9, 11, 16))
  norms = None
  if p.gather_kernels:
    norms = [lambda v, i=i: (1.0 + 0.5 * i) * v - 0.1
             for i in range(len(p.gather_kernels))]
  y, g = jax.jit(functools.partial(ge.gather_excite, gather_norms=norms,
                                   return_gates=True, **kw))(p, x)
  want_y, want_g = _ref_ge(p, x, norms=norms, **kw)
  if kw["extent"] == 0:
    assert g.shape == (2, 16)
    want_g = want_g[:, 0, 0]
  _close(g, want_g)
  _close(y, want_y)


def test_ge_pieces_bfloat16_and_channels_first():
  x = _x((2, 9, 11, 16))
  _close(jax.jit(functools.partial(ge.ge_gather, extent=2))(x),
         _np_pool(x, 2, np.mean))
  g = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
  _close(ge.ge_upsample(g, (7, 10)), _np_upsample(_f64(g), 7, 10))
  # The float32 source rows of PyTorch agree with exact ones here.
  for n_in, n_out in [(5, 9), (6, 11), (3, 7), (2, 5), (4, 15), (7, 56)]:
    np.testing.assert_array_equal(ge._nearest_index(n_in, n_out),
                                  np.arange(n_out) * n_in // n_out)
  p = _ge_params()
  xb, x64 = _bf16(x)
  y, gates = jax.jit(functools.partial(ge.gather_excite, extent=2,
                                       return_gates=True))(p, xb)
  want_y, want_g = _ref_ge(p, x64, 2)
  assert y.dtype == jnp.bfloat16 and gates.dtype == jnp.float32
  _close(gates, want_g)
  _close(y, want_y, rtol=1e-2, atol=1e-2)
  _close(_channels_first(functools.partial(ge.gather_excite, extent=2), p,
                         x), _ref_ge(p, x, 2)[0])


@pytest.mark.parametrize("options", [dict(), dict(extent=4),
                                     dict(extent=2, extra_params=True),
                                     dict(extra_params=True, ge_feat_size=6)])
def test_ge_module_records_its_gates(options):
  m = attention.create("ge", 16, tag="GE_2_1", rngs=nnx.Rngs(0), **options)
  for i in range(1, m.num_gather_convs + 1):
    _random_bn(getattr(m, f"gather_norm{i}"), i)
  x = _x((2, 6, 6, 16))
  norms = [_np_norm(getattr(m, f"gather_norm{i}"))
           for i in range(1, m.num_gather_convs + 1)]
  y, rec = _capture(_eval(m), x)
  want_y, want_g = _ref_ge(m.params, x, m.options.extent, norms=norms)
  _close(y, want_y)
  if m.options.extent == 0:
    assert set(rec) == {"GE_2_1"}
    _close(rec["GE_2_1"], want_g[:, 0, 0])
  else:
    assert set(rec) == {"GE_2_1", "GE_2_1:spatial"}
    _close(rec["GE_2_1"], want_g.mean(axis=(1, 2)))
    _close(rec["GE_2_1:spatial"], want_g.mean(axis=-1))


def test_ge_bad_input_and_options():
  x = _x((2, 8, 8, 16))
  _raises(ValueError, "extent must be a non-negative int", ge.ge_gather, x,
          extent=-2)
  _raises(ValueError, "extent must be 0 or a power of two",
          ge.ge_gather_conv, [np.ones((3, 3, 1, 16), np.float32)] * 2, x,
          extent=6)
  _raises(ValueError, "kernels must be 1 of shape \\(8, 8, 1, 16\\)",
          ge.ge_gather_conv, [np.ones((6, 6, 1, 16), np.float32)], x,
          extent=0)
  _raises(ValueError, "norms must be 2 callables", ge.ge_gather_conv,
          [np.ones((3, 3, 1, 16), np.float32)] * 2, x, extent=4,
          norms=[abs])
  _raises(ValueError, "params are for 16 channels", ge.gather_excite,
          _ge_params(), x[..., :8])
  _raises(ValueError, "add_maxpool applies", ge.gather_excite,
          _ge_params(kernels=[(3, 3, 1, 16)]), x, extent=2, add_maxpool=True)
  _raises(TypeError, "params must be a GEParams", ge.gather_excite, None, x)
  _raises(TypeError, "x must be a floating-point", ge.ge_gather,
          x.astype(np.int32))
  _raises(ValueError, "g must be an NHWC map", ge.ge_upsample, x[0], (4, 4))
  for bad, match in [
      (dict(extent=3), "extent must be 0"),
      (dict(extent=6, extra_params=True), "power of two"),
      (dict(extent=64, extra_params=True), "at most 32"),
      (dict(extra_params=True), "ge_feat_size must be set"),
      (dict(ge_feat_size=7), "ge_feat_size must be set"),
      (dict(extra_params=True, ge_feat_size=0), "positive int"),
      (dict(extent=2, extra_params=True, add_maxpool=True), "add_maxpool"),
      (dict(use_mlp=1), "use_mlp must be a bool"),
      (dict(reduction=-1), "reduction"), (dict(rounding="x"), "rounding"),
      (dict(gate="x"), "gate"), (dict(activation="x"), "activation")]:
    _raises(ValueError, match, ge.GEOptions, **bad)


def _timm_ge(channels, **kw):
  """timm's GatherExcite; built from its own parts when its constructor
  fails (timm 1.0.31 passes device and dtype positionally to the MLP and the
  gather convolutions) as that constructor lays them out."""
  import torch.nn as nn
  from timm.layers.create_conv2d import create_conv2d
  from timm.layers.gather_excite import GatherExcite
  from timm.layers.helpers import make_divisible
  from timm.layers.mlp import ConvMlp
  try:
    return GatherExcite(channels, **kw)
  except TypeError:
    pass
  extent, extra = kw.get("extent", 0), kw.get("extra_params", False)
  m = GatherExcite(channels, extent=extent, use_mlp=False,
                   add_maxpool=kw.get("add_maxpool", False))
  if extra:
    m.gather = nn.Sequential()
    count = extent.bit_length() - 1
    for i in range(1, count + 1):
      m.gather.add_module(f"conv{i}", create_conv2d(
          channels, channels, kernel_size=3, stride=2, depthwise=True))
      m.gather.add_module(f"norm{i}", nn.BatchNorm2d(channels))
      if i < count:
        m.gather.add_module(f"act{i}", nn.ReLU(inplace=True))
  if kw.get("use_mlp", True):
    m.mlp = ConvMlp(channels, make_divisible(channels / 16, 1,
                                             round_limit=0.0),
                    act_layer=nn.ReLU)
  return m


@pytest.mark.parametrize("options", [
    dict(), dict(extent=2), dict(extent=4, add_maxpool=True),
    dict(extent=8, use_mlp=False), dict(extent=4, extra_params=True)])
def test_ge_matches_timm(options):
  pytest.importorskip("timm")
  m = attention.create("ge", 32, rngs=nnx.Rngs(0), **options)
  _check_timm(m, _timm_ge(32, **options), _x((2, 9, 11, 32), loc=0.0))


def test_ge_defaults_are_timms():
  pytest.importorskip("timm")
  import inspect
  from timm.layers.gather_excite import GatherExcite
  defaults = {k: v.default for k, v in inspect.signature(
      GatherExcite).parameters.items()}
  o = ge.GEOptions()
  assert (o.extent, o.extra_params, o.use_mlp, o.add_maxpool) == (
      defaults["extent"], defaults["extra_params"], defaults["use_mlp"],
      defaults["add_maxpool"])
  assert 1 / o.reduction == defaults["rd_ratio"] and defaults[
      "rd_divisor"] == 1 and defaults["gate_layer"] == o.gate
  assert _timm_ge(48).mlp.fc1.out_channels == attention.create(
      "ge", 48, rngs=nnx.Rngs(0)).reduced_channels == 3


# --------------------------------------------------------------------- SRM


def _ref_srm(cfc, x, norm=None, gate="sigmoid"):
  x = _f64(x)
  flat = x.reshape(x.shape[0], -1, x.shape[-1])
  t = np.stack([flat.mean(axis=1), flat.std(axis=1, ddof=1)], axis=-1)
  z = (t * _f64(cfc)).sum(axis=-1)
  if norm is not None:
    z = norm(z)
  g = NP_GATES[gate](z)
  return x * g[:, None, None, :], g


def test_srm_matches_reference():
  cfc, x = _normal((16, 2), 1, scale=1.0), _x((3, 5, 7, 16))
  norm = lambda z: 0.7 * z + 0.2
  f = jax.jit(functools.partial(srm.style_recalibration, norm=norm,
                                return_gates=True))
  y, g = f(cfc, x)
  want_y, want_g = _ref_srm(cfc, x, norm)
  _close(g, want_g)
  _close(y, want_y)
  xb, x64 = _bf16(x)
  yb, gb = f(cfc, xb)
  assert yb.dtype == jnp.bfloat16 and gb.dtype == jnp.float32
  _close(gb, _ref_srm(cfc, x64, norm)[1])
  _close(yb, _ref_srm(cfc, x64, norm)[0], rtol=1e-2, atol=1e-2)
  # Any layout, e.g. channels-first 1-D maps.
  x3 = _x((2, 16, 9), seed=2)
  t = jax.jit(functools.partial(srm.style_pool, data_format="NCW"))(x3)
  _close(t, np.stack([_f64(x3).mean(-1), _f64(x3).std(-1, ddof=1)], -1))


def test_srm_gradient_is_finite_for_a_constant_channel():
  cfc, x = _normal((16, 2), 1, scale=1.0), _x((2, 4, 4, 16))
  x[..., 3] = 1.5
  grad = jax.jit(jax.grad(lambda x: jnp.sum(
      srm.style_recalibration(cfc, x) ** 2)))(x)
  assert np.all(np.isfinite(grad))


def test_srm_module_eval_train_and_recording():
  m = attention.create("srm", 16, tag="SRM_4_1", rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(m.cfc[...], 0.0)
  m.cfc[...] = jnp.asarray(_normal((16, 2), 2, scale=1.0))
  _random_bn(m.norm, 4)
  x = _x((4, 5, 5, 16))
  y, rec = _capture(_eval(m), x)
  want_y, want_g = _ref_srm(m.cfc[...], x, _np_norm(m.norm))
  assert set(rec) == {"SRM_4_1"}
  _close(rec["SRM_4_1"], want_g)
  _close(y, want_y)
  # Training normalises the (N, C) combinations over the batch.
  scale, bias = _f64(m.norm.scale[...]), _f64(m.norm.bias[...])
  batch_norm = lambda z: (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5) \
      * scale + bias
  _close(_call(m, x),
         _ref_srm(m.cfc[...], x, batch_norm)[0], atol=1e-5)


def test_srm_bad_input():
  cfc, x = _normal((16, 2), 1), _x((2, 4, 4, 16))
  _raises(ValueError, "at least 2 positions", srm.style_pool,
          x[:, :1, :1])
  _raises(ValueError, r"cfc must be \(C, 2\)", srm.style_recalibration,
          cfc[:8], x)
  _raises(ValueError, r"t must be \(N, C, 2\)", srm.srm_gate, cfc,
          np.ones((2, 16), np.float32))
  _raises(TypeError, "x must be a floating-point", srm.style_pool,
          x.astype(np.int32))
  _raises(ValueError, "gate must be one of", srm.SRMOptions, gate="x")


# --------------------------------------------------------------------- GCT


def _ref_gct(alpha, gamma, beta, x, mode="l2", eps=1e-5):
  x = _f64(x)
  alpha, gamma, beta = _f64(alpha), _f64(gamma), _f64(beta)
  if mode == "l2":
    s = np.sqrt((x ** 2).sum(axis=(1, 2)) + eps) * alpha
    norm = gamma / np.sqrt((s ** 2).mean(axis=1, keepdims=True) + eps)
  else:
    s = np.abs(x).sum(axis=(1, 2)) * alpha
    norm = gamma / (np.abs(s).mean(axis=1, keepdims=True) + eps)
  g = 1.0 + np.tanh(s * norm + beta)
  return x * g[:, None, None, :], g


@pytest.mark.parametrize("mode", gct.MODES)
def test_gct_matches_reference(mode):
  p = gct.GCTParams(1.0 + _normal((16,), 1), _normal((16,), 2, 2.0),
                    _normal((16,), 3))
  x = _x((2, 6, 5, 16))
  f = jax.jit(functools.partial(gct.gated_channel_transformation,
                                mode=mode, return_gates=True))
  y, g = f(p, x)
  want_y, want_g = _ref_gct(*p, x, mode)
  _close(g, want_g)
  _close(y, want_y)
  xb, x64 = _bf16(x)
  yb, gb = f(p, xb)
  assert yb.dtype == jnp.bfloat16 and gb.dtype == jnp.float32
  _close(gb, _ref_gct(*p, x64, mode)[1])
  _close(yb, _ref_gct(*p, x64, mode)[0], rtol=1e-2, atol=1e-2)


def test_gct_module_starts_as_identity_and_records():
  m = attention.create("gct", 16, tag="GCT_2_2", rngs=nnx.Rngs(0))
  x = _x((2, 4, 4, 16))
  np.testing.assert_array_equal(_call(m, x), x)
  m.gamma[...] = jnp.asarray(_normal((16,), 5, 2.0))
  m.beta[...] = jnp.asarray(_normal((16,), 6))
  y, rec = _capture(m, x)
  want_y, want_g = _ref_gct(m.alpha[...], m.gamma[...], m.beta[...], x)
  assert set(rec) == {"GCT_2_2"}
  _close(rec["GCT_2_2"], want_g)
  _close(y, want_y)


def test_gct_bad_input():
  p, x = gct.GCTParams(np.ones(16, np.float32), np.zeros(16, np.float32),
                       np.zeros(16, np.float32)), _x((2, 4, 4, 16))
  _raises(ValueError, r"alpha must have shape \(C,\) = \(16,\)",
          gct.gated_channel_transformation, p._replace(alpha=p.alpha[:3]), x)
  _raises(ValueError, r"gamma must have shape", gct.gct_gate, p.gamma[:3],
          p.beta, np.ones((2, 16), np.float32))
  _raises(ValueError, r"s must be \(N, C\)", gct.gct_gate, p.gamma, p.beta,
          x)
  _raises(ValueError, "mode must be one of", gct.gct_embedding, p.alpha, x,
          mode="l3")
  _raises(TypeError, "params must be a GCTParams",
          gct.gated_channel_transformation, tuple(p), x)
  _raises(ValueError, "gct_mode", gct.GCTOptions, gct_mode="l3")
  _raises(ValueError, "gct_epsilon", gct.GCTOptions, gct_epsilon=0.0)


# ------------------------------------------------------------------- SimAM


def _ref_simam(x, lam=1e-4):
  x = _f64(x)
  d = (x - x.mean(axis=(1, 2), keepdims=True)) ** 2
  v = d.sum(axis=(1, 2), keepdims=True) / (x.shape[1] * x.shape[2] - 1)
  w = _sigmoid(d / (4 * (v + lam)) + 0.5)
  return x * w, w


def test_simam_matches_reference():
  x = _x((2, 5, 6, 16))
  f = jax.jit(functools.partial(simam.simam, e_lambda=0.1,
                                return_weights=True))
  y, w = f(x)
  want_y, want_w = _ref_simam(x, 0.1)
  _close(w, want_w)
  _close(y, want_y)
  xb, x64 = _bf16(x)
  yb, wb = f(xb)
  assert yb.dtype == jnp.bfloat16 and wb.dtype == jnp.float32
  _close(wb, _ref_simam(x64, 0.1)[1])
  _close(yb, _ref_simam(x64, 0.1)[0], rtol=1e-2, atol=1e-2)
  _close(_channels_first(simam.simam, x), _ref_simam(x)[0])


def test_simam_module_records_spatial_weights_only():
  m = attention.create("simam", 16, tag="SIMAM_3_1", rngs=nnx.Rngs(0))
  assert not nnx.to_flat_state(nnx.state(m, nnx.Param))
  x = _x((2, 5, 6, 16))
  y, rec = _capture(m, x)
  want_y, want_w = _ref_simam(x)
  assert set(rec) == {"SIMAM_3_1:spatial"}
  _close(rec["SIMAM_3_1:spatial"], want_w.mean(axis=-1))
  _close(y, want_y)


def test_simam_bad_input():
  x = _x((2, 4, 4, 16))
  _raises(ValueError, "at least 2 positions", simam.simam, x[:, :1, :1])
  _raises(ValueError, "e_lambda must be a positive number", simam.simam, x,
          e_lambda=0.0)
  _raises(ValueError, "expects x of rank 4", simam.simam, x[0])
  _raises(TypeError, "x must be a floating-point", simam.simam,
          x.astype(np.int32))
  _raises(ValueError, "simam_lambda", simam.SimAMOptions, simam_lambda=-1.0)


# ----------------------------------------------------- Coordinate attention


def _ref_coord(params, x, norm=None, activation="hard_swish",
               gate="sigmoid"):
  x = _f64(x)
  h = x.shape[1]
  w1, b1, w_h, b_h, w_w, b_w = (None if p is None else _f64(p)
                                for p in params)
  pooled = np.concatenate([x.mean(axis=2), x.mean(axis=1)], axis=1)
  y = pooled @ w1 + (0 if b1 is None else b1)
  if norm is not None:
    y = norm(y)
  y = NP_ACTIVATIONS[activation](y)
  a_h = NP_GATES[gate](y[:, :h] @ w_h + (0 if b_h is None else b_h))
  a_w = NP_GATES[gate](y[:, h:] @ w_w + (0 if b_w is None else b_w))
  return x * a_h[:, :, None, :] * a_w[:, None, :, :], a_h, a_w


def _coord_params(c=16, m=8, bias=True, seed=1):
  b = lambda shape, i: _normal(shape, seed + i) if bias else None
  return coord.CoordParams(_normal((c, m), seed), b((m,), 1),
                           _normal((m, c), seed + 2), b((c,), 3),
                           _normal((m, c), seed + 4), b((c,), 5))


@pytest.mark.parametrize("bias,activation", [(True, "hard_swish"),
                                             (False, "relu")])
def test_coord_matches_reference(bias, activation):
  p, x = _coord_params(bias=bias), _x((2, 5, 7, 16))
  norm = lambda v: 0.8 * v + 0.3
  f = jax.jit(functools.partial(coord.coordinate_attention, norm=norm,
                                activation=activation, return_gates=True))
  y, (a_h, a_w) = f(p, x)
  want_y, want_h, want_w = _ref_coord(p, x, norm, activation)
  assert a_h.shape == (2, 5, 16) and a_w.shape == (2, 7, 16)
  _close(a_h, want_h)
  _close(a_w, want_w)
  _close(y, want_y)
  _close(coord.coord_pool(x), np.concatenate(
      [_f64(x).mean(axis=2), _f64(x).mean(axis=1)], axis=1))


def test_coord_bfloat16_and_channels_first():
  p, x = _coord_params(), _x((2, 6, 4, 16))
  xb, x64 = _bf16(x)
  y, (a_h, a_w) = jax.jit(functools.partial(
      coord.coordinate_attention, return_gates=True))(p, xb)
  want_y, want_h, want_w = _ref_coord(p, x64)
  assert y.dtype == jnp.bfloat16 and a_h.dtype == jnp.float32
  _close(a_h, want_h)
  _close(a_w, want_w)
  _close(y, want_y, rtol=1e-2, atol=1e-2)
  _close(_channels_first(coord.coordinate_attention, p, x),
         _ref_coord(p, x)[0])


def test_coord_module_eval_train_and_recording():
  m = attention.create("coord", 32, tag="COORD_2_3", rngs=nnx.Rngs(0))
  _random_bn(m.norm, 7)
  x = _x((2, 5, 6, 32))
  y, rec = _capture(_eval(m), x)
  want_y, a_h, a_w = _ref_coord(m.params, x, _np_norm(m.norm))
  gate = a_h[:, :, None, :] * a_w[:, None, :, :]
  assert set(rec) == {"COORD_2_3", "COORD_2_3:spatial"}
  _close(rec["COORD_2_3"], gate.mean(axis=(1, 2)))
  _close(rec["COORD_2_3:spatial"], gate.mean(axis=-1))
  _close(y, want_y)
  # Training: the BatchNorm normalises the H + W descriptors of the batch.
  scale, bias = _f64(m.norm.scale[...]), _f64(m.norm.bias[...])
  batch_norm = lambda v: (v - v.mean((0, 1))) / np.sqrt(
      v.var((0, 1)) + 1e-5) * scale + bias
  _close(_call(m, x),
         _ref_coord(m.params, x, batch_norm)[0], atol=1e-5)


def test_coord_widths_and_bad_input():
  assert [coord.coord_reduced_width(c) for c in (16, 256, 512, 1024)] == [
      8, 8, 24, 40]
  assert coord.coord_reduced_width(512, 32, 1.0, "paper") == 16
  assert coord.coord_reduced_width(96, 32, 1.0, "paper") == 8
  p, x = _coord_params(), _x((2, 4, 4, 16))
  _raises(ValueError, r"params.w1 must be \(C, M\) with C = 8",
          coord.coordinate_attention, p, x[..., :8])
  _raises(ValueError, r"params.w_w must be \(M, C\)",
          coord.coordinate_attention, p._replace(w_w=p.w_w[:4]), x)
  _raises(ValueError, r"params.b_h must be \(16,\)",
          coord.coordinate_attention, p._replace(b_h=p.b_h[:4]), x)
  _raises(TypeError, "params must be a CoordParams",
          coord.coordinate_attention, tuple(p), x)
  _raises(ValueError, "height must be an int", coord.coord_gates, p,
          coord.coord_pool(x), 8)
  _raises(ValueError, "x must be an NHWC map", coord.coord_pool, x[0])
  _raises(ValueError, "activation must be one of", coord.coord_gates, p,
          coord.coord_pool(x), 4, activation="elu")
  for bad in [dict(reduction=0), dict(coord_width_factor=-1.0),
              dict(rounding="x"), dict(mlp_bias=0), dict(activation="x"),
              dict(gate="x")]:
    _raises(ValueError, next(iter(bad)), coord.CoordOptions, **bad)


def test_coord_matches_timm():
  pytest.importorskip("timm")
  from timm.layers.coord_attn import CoordAttn
  from timm.layers.helpers import make_divisible
  m = attention.create("coord", 64, rngs=nnx.Rngs(0))
  _check_timm(m, CoordAttn(64), _x((2, 7, 5, 64), loc=0.0))
  # The paper's configuration: r = 32, width max(8, C // 32), biases.
  m = attention.create("coord", 64, reduction=32, coord_width_factor=1.0,
                       rounding="paper", mlp_bias=True, rngs=nnx.Rngs(0))
  _check_timm(m, CoordAttn(64, rd_channels=8, bias=True),
              _x((2, 4, 6, 64)))
  # Defaults as timm's.
  t = CoordAttn(160)
  o = attention.make_options("coord")
  assert attention.create("coord", 160, rngs=nnx.Rngs(0)).reduced_channels \
      == t.conv1.out_channels == 8
  assert (t.conv1.bias is None) == (not o.mlp_bias)
  assert type(t.act).__name__ == "Hardswish" and o.activation == "hard_swish"
  assert type(t.gate).__name__ == "Sigmoid" and o.gate == "sigmoid"
  assert t.bn1.eps == 1e-5
  assert all(coord.coord_reduced_width(c) == make_divisible(
      c * (1 / 16) * (2 / 3), 8, round_limit=0.0) for c in range(1, 2049))


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("kind", list(attention.KINDS))
def test_every_kind_trains_in_a_resnet(kind):
  """Twenty steps of the trainer's own step on one batch: the loss falls,
  the attention's parameters move, and the gates stay finite."""
  import optax

  from experiments import steps
  from se_jax import models

  model = models.create("cifar_resnet20", attention=kind, stage_sizes=(1, 1, 1),
                        widths=(16, 16, 32), in_channels=1, num_classes=10,
                        rngs=nnx.Rngs(0))
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  tx = optax.adam(1e-2)
  step = jax.jit(steps.make_train_step(
      graphdef, tx, lambda s: jnp.float32(1e-2), num_classes=10))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(16, 12, 12, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}
  state = steps.init_state(params, stats, tx, 0)
  losses = []
  for _ in range(20):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses

  def attention_leaves(tree):
    return [np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(
        tree) if "attn" in jax.tree_util.keystr(path)]

  before, after = attention_leaves(params), attention_leaves(state["params"])
  assert len(before) == len(after)
  if kind != "simam":  # Parameter-free.
    assert before, f"{kind} has no parameters in the units"
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
  trained = nnx.merge(graphdef, state["params"], state["batch_stats"])
  trained.eval()
  gates = models.capture_gates(trained, batch["image"], spatial=True)
  assert gates and all(np.isfinite(np.asarray(g, np.float32)).all()
                       for g in gates.values())
