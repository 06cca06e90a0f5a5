// Shared by the GPU benchmark programs of bench/: timing and synthetic activations.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

namespace mq::bench {

inline void Sync(const at::Device& device) {
  if (device.is_cuda()) c10::cuda::device_synchronize();
}

// Median wall milliseconds of `iters` calls of `fn` after one warm-up call, the device
// synchronized before each clock reading.
template <typename Fn>
double MedianMs(const at::Device& device, int iters, Fn fn) {
  fn();
  Sync(device);
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    Sync(device);
    ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Correlated activations, like a transformer's hidden states: most energy in a 256-dimensional
// subspace (the same for every seed), a little isotropic noise, and 8 channels of large
// magnitude. bf16 [tokens, dim] on `device`.
inline at::Tensor Activations(int64_t tokens, int64_t dim, const at::Device& device,
                              int64_t seed) {
  const auto o = at::TensorOptions().device(device);
  at::manual_seed(7);  // the same subspace for calibration and held-out tokens
  at::Tensor basis = at::randn({256, dim}, o) / 16.0;
  at::manual_seed(seed);
  at::Tensor x =
      at::matmul(at::randn({tokens, 256}, o), basis) + 0.05 * at::randn({tokens, dim}, o);
  x.index_put_({at::indexing::Slice(), at::indexing::Slice(0, 8)},
               x.index({at::indexing::Slice(), at::indexing::Slice(0, 8)}) * 20);
  return x.to(at::kBFloat16);
}

}  // namespace mq::bench
