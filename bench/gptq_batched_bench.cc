// Batched GPTQ (worker/quant/gptq_batched.h) on the GPU at the routed-expert shapes of
// DeepSeek-V3: E experts × {gate, up: 2048×7168 sharing one 7168² Hessian} and E × {down:
// 7168×2048, 2048² Hessian}, 65,536 calibration tokens, sym 4-bit g128, act-order, block 128,
// damping 0.1 (the MoE-Quant reference setting). Prints, per shape: Hessian time, prepare
// (factorisation) time per Hessian for each factorisation variant, solve time for one matrix
// alone and amortized per matrix over the batch (minmax, mse, TF32 update), the relative output
// error on held-out tokens of ours / QuantizeGptq / RTN and the fraction of codes that differ
// from QuantizeGptq.
//
// usage: mq-bench-gptq-batched [--device cuda:0] [--tokens 65536] [--experts 32] [--iters 3]
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/bench_util.h"
#include "worker/quant/gptq.h"
#include "worker/quant/gptq_batched.h"
#include "worker/quant/hessian.h"
#include "worker/quant/rtn.h"

namespace {

const char* FactorizationName(mq::quant::HessianFactorization how) {
  switch (how) {
    case mq::quant::HessianFactorization::kInverseCholesky: return "chain";
    case mq::quant::HessianFactorization::kReversedCholesky: return "reversed Cholesky";
    case mq::quant::HessianFactorization::kCholeskyFeedback: return "Cholesky feedback";
  }
  return "?";
}

using namespace mq::quant;
using mq::bench::Activations;
using mq::bench::MedianMs;

template <typename T>
T Must(absl::StatusOr<T> v) {
  if (!v.ok()) {
    std::fprintf(stderr, "error: %s\n", v.status().ToString().c_str());
    std::exit(1);
  }
  return *std::move(v);
}

}  // namespace

int main(int argc, char** argv) {
  std::string device_name = "cuda:0";
  int64_t tokens = 65536, experts = 32;
  int iters = 3;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--device") device_name = value;
    else if (flag == "--tokens") tokens = std::atoll(value.c_str());
    else if (flag == "--experts") experts = std::atoll(value.c_str());
    else if (flag == "--iters") iters = std::atoi(value.c_str());
    else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  const at::Device d(device_name);
  GptqOptions options;
  options.rel_damp = 0.1;
  GptqOptions mse = options;
  mse.grid.scale_search = ScaleSearch::kMse;
  std::vector<std::string> table;
  for (auto [out, in] : std::vector<std::pair<int64_t, int64_t>>{{2048, 7168}, {7168, 2048}}) {
    const bool shared = out < in;  // gate/up: two weights per Hessian
    const int64_t per_h = shared ? 2 : 1;
    at::Tensor x = Activations(tokens, in, d, 1);
    at::Tensor held_out = Activations(4096, in, d, 2);
    at::Tensor h;
    auto hessian_ms = [&](int64_t panel) {
      return MedianMs(d, iters, [&] {
        HessianAccumulator acc(in, d, panel);
        if (!acc.Add(x).ok()) std::abort();
        h = Must(acc.Finalize());
      });
    };
    // The whole product in one GEMM for comparison, then the accumulator as the pipeline uses it
    // (lower half in panels for wide inputs), whose H the solves below take.
    const double whole_ms = hessian_ms(in);
    const double hess_ms = hessian_ms(HessianAccumulator::kDefaultPanel);
    x.reset();
    std::vector<at::Tensor> hs, ws;
    std::vector<int64_t> of;
    at::manual_seed(3);
    for (int64_t e = 0; e < experts; ++e) {
      hs.push_back(h * (1.0 + 0.01 * e));
      for (int64_t k = 0; k < per_h; ++k) {
        ws.push_back((at::randn({out, in}, at::TensorOptions().device(d)) * 0.02).to(at::kBFloat16));
        of.push_back(e);
      }
    }
    const int64_t nmat = static_cast<int64_t>(ws.size());
    std::printf("== %lldx%lld: %lld experts, %lld matrices, %lld Hessians\n", (long long)out,
                (long long)in, (long long)experts, (long long)nmat, (long long)experts);
    std::printf(
        "hessian (one expert, %lld tokens, bf16 GEMM fp32 out): %.2f ms (whole product: %.2f "
        "ms)\n",
        (long long)tokens, hess_ms, whole_ms);

    // Factorisation variants: per Hessian, amortized over the batch.
    struct Variant {
      const char* name;
      bool fp64;
      HessianFactorization how;
      bool kernels;
      int streams;
      bool is_default;
    };
    std::vector<PreparedHessian> prepared;
    const HessianFactorization kChain = HessianFactorization::kInverseCholesky;
    const HessianFactorization kRev = HessianFactorization::kReversedCholesky;
    const HessianFactorization kFb = HessianFactorization::kCholeskyFeedback;
    // The row "(mq's defaults)" is GptqBatchOptions{} as the pipeline uses it (its
    // factorization, kernels and streams, whatever they are), with the error of both scale
    // searches; the other rows vary one choice.
    const GptqBatchOptions defaults;
    for (Variant v : {Variant{"fp64 chain (PrepareHessian's), ATen", true, kChain, false, 1, false},
                      Variant{"fp64 reversed, ATen trsm", true, kRev, false, 1, false},
                      Variant{"fp64 reversed, ATen trsm, 4 streams", true, kRev, false, 4, false},
                      Variant{"fp64 reversed, cuSOLVER trtri, 1 stream", true, kRev, true, 1, false},
                      Variant{"fp64 Cholesky feedback, kernels, 1 stream", true, kFb, true, 1, false},
                      Variant{"fp64 Cholesky feedback, kernels, 4 streams", true, kFb, true, 4, false},
                      Variant{"fp32 Cholesky feedback, kernels", false, kFb, true, 1, false},
                      Variant{"(mq's defaults: GptqBatchOptions{})", options.fp64_factorization,
                              defaults.factorization, defaults.factor_kernels,
                              defaults.factor_streams, true}}) {
      GptqOptions o = options;
      o.fp64_factorization = v.fp64;
      GptqBatchOptions bo;
      bo.factorization = v.how;
      bo.factor_kernels = v.kernels;
      bo.factor_streams = v.streams;
      std::vector<PreparedHessian> p;
      const double ms = MedianMs(d, std::max(1, iters - 1), [&] { p = Must(PrepareHessiansBatched(hs, o, bo)); });
      auto r = Must(QuantizeGptqBatched({ws[0]}, {0}, std::vector<PreparedHessian>{p[0]}, options));
      const double err = Must(RelativeOutputError(ws[0], r[0].weight.dequantized, held_out));
      auto r_mse = Must(QuantizeGptqBatched({ws[0]}, {0}, std::vector<PreparedHessian>{p[0]}, mse));
      const double err_mse = Must(RelativeOutputError(ws[0], r_mse[0].weight.dequantized, held_out));
      std::printf("prepare %-42s: %8.2f ms per Hessian (batch of %lld), err(matrix 0) minmax "
                  "%.5e, mse %.5e%s\n",
                  v.name, ms / experts, (long long)experts, err, err_mse,
                  v.is_default ? absl::StrCat(" [", FactorizationName(v.how), ", kernels ",
                                              v.kernels ? "on" : "off", ", ", v.streams,
                                              " stream(s), fp64 ", v.fp64 ? "on" : "off", "]")
                                     .c_str()
                               : "");
      if (v.is_default) prepared = p;
    }
    const double prep1_ms = MedianMs(d, iters, [&] {
      Must(PrepareHessiansBatched({hs[0]}, options));
    });

    // Reference: the existing per-matrix path (prepare + solve).
    GptqResult ref;
    const double ref_ms = MedianMs(d, 1, [&] { ref = Must(QuantizeGptq(ws[0], hs[0], options)); });
    const double err_ref = Must(RelativeOutputError(ws[0], ref.weight.dequantized, held_out));
    const double err_rtn = Must(RelativeOutputError(
        ws[0], Must(QuantizeRtn(ws[0], options.grid)).dequantized, held_out));

    // One matrix alone (its own prepared Hessian), then the whole batch.
    std::vector<PreparedHessian> p0 = {prepared[0]};
    std::vector<GptqResult> alone;
    const double alone_ms = MedianMs(d, iters, [&] { alone = Must(QuantizeGptqBatched({ws[0]}, {0}, p0, options)); });
    const double alone_mse_ms = MedianMs(d, iters, [&] { Must(QuantizeGptqBatched({ws[0]}, {0}, p0, mse)); });
    std::vector<GptqResult> all;
    const double batch_ms = MedianMs(d, iters, [&] { all = Must(QuantizeGptqBatched(ws, of, prepared, options)); });
    const double batch_mse_ms = MedianMs(d, std::max(1, iters - 1), [&] { Must(QuantizeGptqBatched(ws, of, prepared, mse)); });
    GptqBatchOptions tf32;
    tf32.tf32_update = true;
    std::vector<GptqResult> all_tf32;
    const double batch_tf32_ms = MedianMs(d, iters, [&] { all_tf32 = Must(QuantizeGptqBatched(ws, of, prepared, options, tf32)); });
    const double err_ours = Must(RelativeOutputError(ws[0], all[0].weight.dequantized, held_out));
    const double err_tf32 = Must(RelativeOutputError(ws[0], all_tf32[0].weight.dequantized, held_out));
    const double diff = all[0].weight.codes.ne(ref.weight.codes).to(at::kDouble).mean().item<double>();
    const double diff_alone = alone[0].weight.codes.ne(all[0].weight.codes).sum().item<double>();
    // Codes vs QuantizeGptq with the same (chain, fp64) factorisation, to isolate the GEMM order.
    GptqBatchOptions chain;
    chain.factorization = HessianFactorization::kInverseCholesky;
    auto chained = Must(QuantizeGptqBatched({ws[0]}, {0}, std::vector<at::Tensor>{hs[0]}, options, chain));
    const double diff_chain = chained[0].weight.codes.ne(ref.weight.codes).to(at::kDouble).mean().item<double>();

    std::printf("existing QuantizeGptq (prepare+solve, one matrix): %.1f ms\n", ref_ms);
    std::printf("prepare one Hessian alone (defaults): %.2f ms\n", prep1_ms);
    std::printf("solve alone: minmax %.2f ms, mse %.2f ms\n", alone_ms, alone_mse_ms);
    std::printf("solve batch of %lld: minmax %.1f ms (%.2f per matrix), mse %.1f ms (%.2f), tf32 update %.1f ms (%.2f)\n",
                (long long)nmat, batch_ms, batch_ms / nmat, batch_mse_ms, batch_mse_ms / nmat,
                batch_tf32_ms, batch_tf32_ms / nmat);
    std::printf("rel. output error: ours %.5e, ours tf32 %.5e, QuantizeGptq %.5e, RTN %.5e\n",
                err_ours, err_tf32, err_ref, err_rtn);
    std::printf("codes != QuantizeGptq: %.3e (default factorisation), %.3e (fp64 chain, the same as QuantizeGptq); batch vs alone differ in %.0f codes\n",
                diff, diff_chain, diff_alone);
    const double prep_per_matrix = prepared.empty() ? 0 : 0;  // printed above per Hessian
    (void)prep_per_matrix;
    char line[512];
    std::snprintf(line, sizeof(line),
                  "| %lldx%lld | %.1f | %.2f / %.2f | %.2f / %.2f | %.2f | %.2e / %.2e / %.2e | %.1e |",
                  (long long)out, (long long)in, hess_ms, alone_ms, alone_mse_ms, batch_ms / nmat,
                  batch_mse_ms / nmat, batch_tf32_ms / nmat, err_ours, err_ref, err_rtn, diff);
    table.push_back(line);
  }
  std::printf("\n| matrix | Hessian ms | solve alone minmax/mse ms | solve amortized minmax/mse ms | tf32 amortized ms | err ours / QuantizeGptq / RTN | codes != QuantizeGptq |\n|---|---|---|---|---|---|---|\n");
  for (const auto& l : table) std::printf("%s\n", l.c_str());
  return 0;
}
