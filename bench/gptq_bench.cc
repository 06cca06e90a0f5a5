// Per-matrix GPTQ on the GPU at the reference shapes of one routed expert: 2048×7168 (gate,
// up) and 7168×2048 (down), 65,536 calibration tokens (one expert's share at 512×4096
// calibration), sym 4-bit g128, act-order, block 128, damping 0.1 — the setting of the
// MoE-Quant numbers quoted in bench/RESULTS.md. Prints Hessian accumulation and solve times
// (minmax and mse) and the relative output error on held-out tokens.
//
// usage: mq-bench-gptq [--device cuda:0] [--tokens 65536] [--iters 3]

#include <ATen/ATen.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "worker/quant/gptq.h"
#include "worker/quant/hessian.h"
#include "worker/quant/rtn.h"

namespace {

using mq::bench::Activations;
using mq::bench::MedianMs;

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
