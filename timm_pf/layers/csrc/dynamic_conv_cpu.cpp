// Batch-1 CPU inference kernel of timm_pf.layers.DynamicConv2d with sigmoid routing (ParameterNet, §4.2):
// global average pool -> Linear -> sigmoid -> mix of the E expert kernels -> convolution, in one call.
// The pool, routing and mixing are plain loops over float32 data on ATen's intra-op threads, so the
// layer costs one dispatch instead of five; the convolution is ATen's own (a matmul for unstrided 1x1
// kernels). Calls it does not compute exactly as the eager path would (see `computes`) return None, and the
// caller takes the eager path.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// Floats mixed per inner block: the partial sums stay in L1 while the E expert rows stream past.
constexpr int64_t kMixBlock = 256;

bool plain_float_cpu(const at::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
         !t.unsafeGetTensorImpl()->is_python_dispatch() && !(at::GradMode::is_enabled() && t.requires_grad());
}

// Batch-1 float32 CPU inference with no autograd, autocast, tracing or Python dispatch mode (such as the
// FLOP counter or a fake-tensor trace) in play, and routing that fits the input.
bool computes(const at::Tensor& x, const at::Tensor& routing_weight, const at::Tensor& routing_bias,
              const at::Tensor& experts) {
  if (x.dim() != 4 || x.size(0) != 1 || routing_weight.dim() != 2 || experts.dim() != 2 ||
      routing_weight.size(1) != x.size(1) || routing_weight.size(0) != experts.size(0) ||
      routing_bias.numel() != experts.size(0)) {
    return false;
  }
  if (at::autocast::is_autocast_enabled(at::kCPU) || c10::impl::TorchDispatchModeTLS::any_modes_set() ||
      torch::jit::tracer::isTracing()) {
    return false;
  }
  return plain_float_cpu(x) && plain_float_cpu(routing_weight) && plain_float_cpu(routing_bias) &&
         plain_float_cpu(experts);
}

}  // namespace

std::optional<at::Tensor> sigmoid_routed_conv2d(const at::Tensor& x, const at::Tensor& routing_weight,
                                                const at::Tensor& routing_bias, const at::Tensor& experts,
                                                at::IntArrayRef weight_shape, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (!computes(x, routing_weight, routing_bias, experts)) {
    return std::nullopt;
  }
  const int64_t channels = x.size(1), spatial = x.size(2) * x.size(3);
  const int64_t num_experts = experts.size(0), numel = experts.size(1);
  TORCH_CHECK(c10::multiply_integers(weight_shape) == numel, "sigmoid_routed_conv2d: kernel shape ",
              weight_shape, " does not hold ", numel, " elements");

  // global average pool, a channel per task
  std::vector<float> pooled(channels);
  const float* x_data = x.const_data_ptr<float>();
  at::parallel_for(0, channels, std::max<int64_t>(1, 32768 / std::max<int64_t>(spatial, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const float* row = x_data + c * spatial;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < spatial; ++i) sum += row[i];
      pooled[c] = sum / static_cast<float>(spatial);
    }
  });

  // routing: sigmoid(W pooled + b)
  std::vector<float> coeffs(num_experts);
  const float* w = routing_weight.const_data_ptr<float>();
  const float* b = routing_bias.const_data_ptr<float>();
  for (int64_t e = 0; e < num_experts; ++e) {
    float logit = 0.f;
    const float* row = w + e * channels;
#pragma omp simd reduction(+ : logit)
    for (int64_t c = 0; c < channels; ++c) logit += row[c] * pooled[c];
    coeffs[e] = 1.f / (1.f + std::exp(-(logit + b[e])));
  }

  // mixed kernel = sum_e coeffs[e] * experts[e]
  at::Tensor kernel = at::empty(weight_shape, experts.options());
  float* out = kernel.mutable_data_ptr<float>();
  const float* expert_data = experts.const_data_ptr<float>();
  at::parallel_for(0, numel, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t start = begin; start < end; start += kMixBlock) {
      const int64_t stop = std::min(end, start + kMixBlock);
      const float first = coeffs[0];
#pragma omp simd
      for (int64_t i = start; i < stop; ++i) out[i] = first * expert_data[i];
      for (int64_t e = 1; e < num_experts; ++e) {
        const float coeff = coeffs[e];
        const float* row = expert_data + e * numel;
#pragma omp simd
        for (int64_t i = start; i < stop; ++i) out[i] += coeff * row[i];
      }
    }
  });
  const bool pointwise = weight_shape[2] == 1 && weight_shape[3] == 1 && stride[0] == 1 && stride[1] == 1 &&
                         padding[0] == 0 && padding[1] == 0;
  if (pointwise) {
    // a matmul per group on the NCHW input, as the eager path: a convolution would first reorder this
    // kernel, new at every call, into oneDNN's blocked layout
    const int64_t out_channels = weight_shape[0];
    at::Tensor out = at::matmul(kernel.view({groups, out_channels / groups, channels / groups}),
                                x.view({groups, channels / groups, spatial}));
    return out.view({1, out_channels, x.size(2), x.size(3)});
  }
  return at::conv2d(x, kernel, {}, stride, padding, dilation, groups);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sigmoid_routed_conv2d", &sigmoid_routed_conv2d,
        "Batch-1 dynamic convolution with sigmoid routing: pool, route, mix the experts, convolve; "
        "None where the eager path must run instead.");
}
