// XLA FFI handlers for 2-D convolutions on oneDNN: the forward pass, the
// input gradient and the kernel gradient of a cross-correlation of NHWC
// float32 images with an HWIO kernel, for `se_jax.onednn`.
//
// oneDNN picks the kernel's layout for each convolution; the kernel (or its
// gradient) is reordered from (or to) HWIO on every call, images and maps
// stay NHWC. Primitives are created once per geometry and kept; each call
// brings its own scratch memory, so calls may run concurrently.

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include <dnnl.hpp>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;

namespace {

enum class Kind { kForward, kInputGrad, kKernelGrad };

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Image (N, H, W, C), kernel (KH, KW, C, O), output (N, OH, OW, O), strides,
// and the zero padding before and after each spatial dim.
struct Geometry {
  int64_t n, h, w, c, o, kh, kw, oh, ow, sh, sw, top, left, bottom, right;

  auto Key() const {
    return std::make_tuple(n, h, w, c, o, kh, kw, oh, ow, sh, sw, top, left,
                           bottom, right);
  }
  memory::desc Image() const {
    return memory::desc({n, c, h, w}, memory::data_type::f32, Tag::nhwc);
  }
  memory::desc Output() const {
    return memory::desc({n, o, oh, ow}, memory::data_type::f32, Tag::nhwc);
  }
  memory::desc Kernel(Tag tag) const {
    return memory::desc({o, c, kh, kw}, memory::data_type::f32, tag);
  }
};

struct Primitives {
  dnnl::primitive conv;
  dnnl::reorder reorder;
  memory::desc kernel, scratch;
};

Primitives Create(Kind kind, const Geometry& g) {
  dnnl::engine& engine = Engine();
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const memory::dims strides = {g.sh, g.sw}, low = {g.top, g.left},
                     high = {g.bottom, g.right};
  const auto algorithm = dnnl::algorithm::convolution_direct;
  auto forward = dnnl::convolution_forward::primitive_desc(
      dnnl::convolution_forward::desc(
          dnnl::prop_kind::forward_training, algorithm, g.Image(),
          g.Kernel(Tag::any), g.Output(), strides, low, high),
      attr, engine);
  const memory::desc hwio = g.Kernel(Tag::hwio);
  Primitives p;
  if (kind == Kind::kForward) {
    p.conv = dnnl::convolution_forward(forward);
    p.kernel = forward.weights_desc();
    p.scratch = forward.scratchpad_desc();
    p.reorder = dnnl::reorder(
        dnnl::reorder::primitive_desc(engine, hwio, engine, p.kernel));
  } else if (kind == Kind::kInputGrad) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        dnnl::convolution_backward_data::desc(
            algorithm, g.Image(), g.Kernel(Tag::any), g.Output(), strides,
            low, high),
        attr, engine, forward);
    p.conv = dnnl::convolution_backward_data(pd);
    p.kernel = pd.weights_desc();
    p.scratch = pd.scratchpad_desc();
    p.reorder = dnnl::reorder(
        dnnl::reorder::primitive_desc(engine, hwio, engine, p.kernel));
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        dnnl::convolution_backward_weights::desc(
            algorithm, g.Image(), g.Kernel(Tag::any), g.Output(), strides,
            low, high),
        attr, engine, forward);
    p.conv = dnnl::convolution_backward_weights(pd);
    p.kernel = pd.diff_weights_desc();
    p.scratch = pd.scratchpad_desc();
    p.reorder = dnnl::reorder(
        dnnl::reorder::primitive_desc(engine, p.kernel, engine, hwio));
  }
  return p;
}

const Primitives& Get(Kind kind, const Geometry& g) {
  static std::mutex mutex;
  static auto* cache =
      new std::map<std::tuple<Kind, decltype(g.Key())>, Primitives>();
  std::lock_guard<std::mutex> lock(mutex);
  auto key = std::make_tuple(kind, g.Key());
  auto it = cache->find(key);
  if (it == cache->end()) it = cache->emplace(key, Create(kind, g)).first;
  return it->second;
}

// `image`, `kernel` and `output` are the NHWC image, the HWIO kernel and the
// NHWC output, or their gradients, as `kind` reads or writes them.
ffi::Error Run(Kind kind, const Geometry& g, float* image, float* kernel,
               float* output) {
  try {
    const Primitives& p = Get(kind, g);
    dnnl::engine& engine = Engine();
    dnnl::stream stream(engine);
    std::vector<uint8_t> scratch(p.scratch.get_size());
    std::vector<uint8_t> reordered(p.kernel.get_size());
    memory scratch_m(p.scratch, engine, scratch.data());
    memory hwio_m(g.Kernel(Tag::hwio), engine, kernel);
    memory kernel_m(p.kernel, engine, reordered.data());
    memory image_m(g.Image(), engine, image);
    memory output_m(g.Output(), engine, output);
    if (kind == Kind::kForward) {
      p.reorder.execute(stream, hwio_m, kernel_m);
      p.conv.execute(stream, {{DNNL_ARG_SRC, image_m},
                              {DNNL_ARG_WEIGHTS, kernel_m},
                              {DNNL_ARG_DST, output_m},
                              {DNNL_ARG_SCRATCHPAD, scratch_m}});
    } else if (kind == Kind::kInputGrad) {
      p.reorder.execute(stream, hwio_m, kernel_m);
      p.conv.execute(stream, {{DNNL_ARG_DIFF_DST, output_m},
                              {DNNL_ARG_WEIGHTS, kernel_m},
                              {DNNL_ARG_DIFF_SRC, image_m},
                              {DNNL_ARG_SCRATCHPAD, scratch_m}});
    } else {
      p.conv.execute(stream, {{DNNL_ARG_SRC, image_m},
                              {DNNL_ARG_DIFF_DST, output_m},
                              {DNNL_ARG_DIFF_WEIGHTS, kernel_m},
                              {DNNL_ARG_SCRATCHPAD, scratch_m}});
      p.reorder.execute(stream, kernel_m, hwio_m);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("oneDNN convolution: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Check(ffi::Span<const int64_t> strides,
                 ffi::Span<const int64_t> padding) {
  if (strides.size() != 2 || padding.size() != 4) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "expected 2 strides and 4 paddings");
  }
  return ffi::Error::Success();
}

Geometry Make(ffi::Span<const int64_t> image, ffi::Span<const int64_t> kernel,
              ffi::Span<const int64_t> output,
              ffi::Span<const int64_t> strides,
              ffi::Span<const int64_t> padding) {
  return Geometry{image[0],   image[1],   image[2],   image[3],
                  kernel[3],  kernel[0],  kernel[1],  output[1],
                  output[2],  strides[0], strides[1], padding[0],
                  padding[1], padding[2], padding[3]};
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> y,
                   ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> padding) {
  if (auto e = Check(strides, padding); e.failure()) return e;
  Geometry g = Make(x.dimensions(), kernel.dimensions(), y->dimensions(),
                    strides, padding);
  return Run(Kind::kForward, g, x.typed_data(), kernel.typed_data(),
             y->typed_data());
}

ffi::Error InputGrad(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> kernel,
                     ffi::ResultBuffer<ffi::F32> dx,
                     ffi::Span<const int64_t> strides,
                     ffi::Span<const int64_t> padding) {
  if (auto e = Check(strides, padding); e.failure()) return e;
  Geometry g = Make(dx->dimensions(), kernel.dimensions(), dy.dimensions(),
                    strides, padding);
  return Run(Kind::kInputGrad, g, dx->typed_data(), kernel.typed_data(),
             dy.typed_data());
}

ffi::Error KernelGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dkernel,
                      ffi::Span<const int64_t> strides,
                      ffi::Span<const int64_t> padding) {
  if (auto e = Check(strides, padding); e.failure()) return e;
  Geometry g = Make(x.dimensions(), dkernel->dimensions(), dy.dimensions(),
                    strides, padding);
  return Run(Kind::kKernelGrad, g, x.typed_data(), dkernel->typed_data(),
             dy.typed_data());
}

}  // namespace

#define SE_JAX_BIND                                                 \
  ffi::Ffi::Bind()                                                  \
      .Arg<ffi::Buffer<ffi::F32>>()                                 \
      .Arg<ffi::Buffer<ffi::F32>>()                                 \
      .Ret<ffi::Buffer<ffi::F32>>()                                 \
      .Attr<ffi::Span<const int64_t>>("strides")                    \
      .Attr<ffi::Span<const int64_t>>("padding")

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeJaxConvForward, Forward, SE_JAX_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(SeJaxConvInputGrad, InputGrad, SE_JAX_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(SeJaxConvKernelGrad, KernelGrad, SE_JAX_BIND);
