// Per-matrix GPTQ on the GPU at the reference shapes of one routed expert: 2048×7168 (gate,
// up) and 7168×2048 (down), 65,536 calibration tokens (one expert's share at 512×4096
// calibration), sym 4-bit g128, act-order, block 128, damping 0.1 — the setting of the
// MoE-Quant numbers quoted in bench/RESULTS.md. Prints Hessian accumulation and solve times
// (minmax and mse) and the relative output error on held-out tokens.
//
// usage: mq-bench-gptq [--device cuda:0] [--tokens 65536] [--iters 3]

#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "worker/quant/gptq.h"
#include "worker/quant/hessian.h"
#include "worker/quant/rtn.h"

namespace {

void Sync(const at::Device& d) {
  if (d.is_cuda()) c10::cuda::device_synchronize();
}

template <typename Fn>
double MedianMs(const at::Device& d, int iters, Fn fn) {
  fn();
  Sync(d);
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    Sync(d);
    ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Correlated activations, like a transformer's hidden states: most energy in a 256-dimensional
// subspace, a little isotropic noise, and a few channels with large magnitude.
at::Tensor Activations(int64_t tokens, int64_t dim, const at::Device& d, int64_t seed) {
  at::manual_seed(seed);
  const auto o = at::TensorOptions().device(d);
  at::manual_seed(7);  // the same subspace for calibration and held-out tokens
  at::Tensor basis = at::randn({256, dim}, o) / 16.0;
  at::manual_seed(seed);
  at::Tensor x = at::matmul(at::randn({tokens, 256}, o), basis) + 0.05 * at::randn({tokens, dim}, o);
  x.index_put_({at::indexing::Slice(), at::indexing::Slice(0, 8)},
               x.index({at::indexing::Slice(), at::indexing::Slice(0, 8)}) * 20);
  return x.to(at::kBFloat16);
}

}  // namespace

int main(int argc, char** argv) {
  std::string device_name = "cuda:0";
  int64_t tokens = 65536;
  int iters = 3;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--device") device_name = value;
    else if (flag == "--tokens") tokens = std::atoll(value.c_str());
    else if (flag == "--iters") iters = std::atoi(value.c_str());
    else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  const at::Device d(device_name);
  std::printf("%-10s %9s %12s %14s %11s %11s %12s\n", "matrix", "tokens", "hessian_ms",
              "solve_minmax", "solve_mse", "err_gptq", "err_rtn");
  for (auto [out, in] : std::vector<std::pair<int64_t, int64_t>>{{2048, 7168}, {7168, 2048}}) {
    at::Tensor x = Activations(tokens, in, d, 1);
    at::Tensor held_out = Activations(4096, in, d, 2);
    at::Tensor w = (at::randn({out, in}, at::TensorOptions().device(d)) * 0.02).to(at::kBFloat16);
    at::Tensor h;
    const double hess_ms = MedianMs(d, iters, [&] {
      mq::quant::HessianAccumulator acc(in, d);
      if (!acc.Add(x).ok()) std::abort();
      h = *acc.Finalize();
    });
    mq::quant::GptqOptions options;
    options.rel_damp = 0.1;
    double err = 0, err_rtn = 0;
    const double minmax_ms = MedianMs(d, iters, [&] {
      auto r = mq::quant::QuantizeGptq(w, h, options);
      if (!r.ok()) std::abort();
      err = *mq::quant::RelativeOutputError(w, r->weight.dequantized, held_out);
    });
    mq::quant::GptqOptions mse = options;
    mse.grid.scale_search = mq::quant::ScaleSearch::kMse;
    const double mse_ms = MedianMs(d, iters, [&] {
      if (!mq::quant::QuantizeGptq(w, h, mse).ok()) std::abort();
    });
    auto rtn = mq::quant::QuantizeRtn(w, options.grid);
    if (rtn.ok()) err_rtn = *mq::quant::RelativeOutputError(w, rtn->dequantized, held_out);
    std::printf("%lldx%-5lld %9lld %12.1f %14.1f %11.1f %11.5f %12.5f\n",
                static_cast<long long>(out), static_cast<long long>(in),
                static_cast<long long>(tokens), hess_ms, minmax_ms, mse_ms, err, err_rtn);
  }
  return 0;
}
