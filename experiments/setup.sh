#!/usr/bin/env bash
# Sets up se_jax on a fresh machine: the offline Fashion-MNIST data and
# oneDNN where Debian's packages are available, a virtual environment in
# .venv, the package with its experiment, test and docs extras, and
# se_jax's oneDNN convolution handlers (se_jax/onednn.py). With SE_JAX_TORCH=1 (as CI
# runs it) also the torch extra: PyTorch, timm and safetensors, for
# se_jax.interop and its parity tests. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

debs=()
[ -d /usr/share/datasets/fashion-mnist ] || debs+=(dataset-fashion-mnist)
[ -f /usr/include/dnnl.hpp ] || debs+=(libdnnl-dev)
command -v "${CXX:-g++}" >/dev/null || debs+=(g++)
if [ "${#debs[@]}" -gt 0 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "se_jax setup: installing Debian's ${debs[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${debs[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "se_jax setup: creating .venv" >&2
  python3 -m venv .venv
fi
stamp=.venv/.se_jax-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ experiments/setup.sh -nt "$stamp" ]; then
  echo "se_jax setup: installing se_jax[experiments,test,docs] into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[experiments,test,docs]"
  touch "$stamp"
fi

torch_stamp=.venv/.se_jax-torch-installed
if [ "${SE_JAX_TORCH:-0}" = 1 ] && { [ ! -f "$torch_stamp" ] \
    || [ setup.cfg -nt "$torch_stamp" ] \
    || [ experiments/setup.sh -nt "$torch_stamp" ]; }; then
  echo "se_jax setup: installing PyTorch and se_jax[torch] into .venv" >&2
  # timm needs torchvision, and torchvision only imports with its own torch.
  .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
  .venv/bin/python -m pip install -q -e ".[torch]"
  touch "$torch_stamp"
fi

lib=se_jax/csrc/libse_jax_onednn.so
if [ ! -f "$lib" ] || [ se_jax/csrc/onednn_conv.cc -nt "$lib" ] \
    || [ "$stamp" -nt "$lib" ]; then
  if [ -f /usr/include/dnnl.hpp ]; then
    echo "se_jax setup: building se_jax's oneDNN convolution handlers" >&2
    .venv/bin/python -m se_jax.build_onednn
  else
    echo "se_jax setup: oneDNN's headers are missing (Debian: libdnnl-dev);" \
      "conv2d computes with its XLA formulation" >&2
  fi
fi
