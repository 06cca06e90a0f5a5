// The same worker/quant code on CUDA tensors (skipped without a CUDA device, e.g. on CI):
// results agree with the CPU run, bf16 Hessian inputs take the fp32-output GEMM, and DeepSeek
// expert shapes run in a reported time.
#include <ATen/ATen.h>

#include <chrono>
#include <cstdio>

#include "gtest/gtest.h"
#include "worker/quant/gptq.h"
#include "worker/quant/hessian.h"
#include "worker/quant/pack.h"
#include "worker/quant/rtn.h"

namespace mq::quant {
namespace {

class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  }
};

at::Tensor Inputs(int64_t tokens, int64_t in, int64_t rank, uint64_t seed) {
  at::manual_seed(seed);
  at::Tensor mix = at::randn({rank, in});
  at::Tensor col_scale = at::exp(at::randn({in}) * 1.2);
  return (at::mm(at::randn({tokens, rank}), mix) + 0.1 * at::randn({tokens, in})) * col_scale;
}

TEST_F(CudaTest, HessianFromBf16MatchesCpu) {
  at::Tensor x = Inputs(4096, 512, 32, 40).to(at::kBFloat16);
  // The GPU accumulators take the tensor-core GEMM with fp32 output: whole, and in panels of
  // the lower half (a partial last one) accumulated in place over two Adds.
  HessianAccumulator cpu(512), gpu(512, at::Device(at::kCUDA), /*panel=*/512),
      panelled(512, at::Device(at::kCUDA), /*panel=*/160);
  ASSERT_TRUE(cpu.Add(x).ok());
  ASSERT_TRUE(gpu.Add(x.cuda()).ok());
  ASSERT_TRUE(panelled.Add(x.narrow(0, 0, 1500).cuda()).ok());
  ASSERT_TRUE(panelled.Add(x.narrow(0, 1500, 4096 - 1500).cuda()).ok());
  // All are fp32 sums of exact bf16 products in different orders: compare each with float64.
  at::Tensor xd = x.to(at::kDouble);
  at::Tensor ref = at::mm(xd.t(), xd).mul(2.0 / 4096);
  for (const at::Tensor& h : {*cpu.Finalize(), gpu.Finalize()->cpu(), panelled.Finalize()->cpu()}) {
    EXPECT_LT(((h.to(at::kDouble) - ref).abs().max() / ref.abs().max()).item<double>(), 3e-5);
  }
  EXPECT_EQ(panelled.tokens(), 4096);
}

TEST_F(CudaTest, RtnAndPackingBitExactWithCpu) {
  at::manual_seed(41);
  at::Tensor w = at::randn({300, 512});
  for (bool symmetric : {true, false}) {
    GridOptions o;
    o.symmetric = symmetric;
    o.scale_search = ScaleSearch::kMse;
    absl::StatusOr<QuantizedWeight> c = QuantizeRtn(w, o), g = QuantizeRtn(w.cuda(), o);
    ASSERT_TRUE(c.ok() && g.ok());
    EXPECT_TRUE(at::equal(c->codes, g->codes.cpu()));
    EXPECT_TRUE(at::equal(c->scales, g->scales.cpu()));
    EXPECT_TRUE(at::equal(c->dequantized, g->dequantized.cpu()));
    absl::StatusOr<PackedWeight> pc = PackWeight(*c), pg = PackWeight(*g);
    ASSERT_TRUE(pc.ok() && pg.ok());
    EXPECT_TRUE(at::equal(pc->weight_packed, pg->weight_packed.cpu()));
    EXPECT_TRUE(at::equal(*DequantizePacked(*pg), g->dequantized));
  }
}

TEST_F(CudaTest, GptqAgreesWithCpu) {
  at::Tensor x = Inputs(2048, 512, 32, 42);
  HessianAccumulator acc(512);
  ASSERT_TRUE(acc.Add(x).ok());
  at::Tensor h = *acc.Finalize();
  at::manual_seed(43);
  at::Tensor w = at::randn({256, 512});
  GptqOptions o;
  absl::StatusOr<GptqResult> c = QuantizeGptq(w, h, o), g = QuantizeGptq(w.cuda(), h.cuda(), o);
  ASSERT_TRUE(c.ok() && g.ok()) << c.status() << g.status();
  EXPECT_TRUE(g->weight.codes.is_cuda());
  const double agree =
      c->weight.codes.eq(g->weight.codes.cpu()).to(at::kDouble).mean().item<double>();
  std::printf("GPTQ codes CPU vs CUDA agreement: %.4f%%\n", 100 * agree);
  EXPECT_GT(agree, 0.99);
  const double ec = *RelativeHessianError(w, c->weight.dequantized, h);
  const double eg = *RelativeHessianError(w, g->weight.dequantized.cpu(), h);
  EXPECT_NEAR(eg / ec, 1.0, 0.02);
}

TEST_F(CudaTest, DeepSeekExpertShapesTiming) {
  // gate/up [2048, 7168] sharing one Hessian, down [7168, 2048]; 512 tokens each.
  const at::Device cuda(at::kCUDA);
  for (auto [rows, in, shared] : {std::tuple<int64_t, int64_t, bool>{2048, 7168, true},
                                  std::tuple<int64_t, int64_t, bool>{7168, 2048, false}}) {
    at::Tensor x = Inputs(512, in, 64, 44).to(cuda, at::kBFloat16);
    at::manual_seed(45);
    std::vector<at::Tensor> ws = {at::randn({rows, in}, cuda).to(at::kBFloat16)};
    if (shared) ws.push_back(at::randn({rows, in}, cuda).to(at::kBFloat16));
    for (int rep = 0; rep < 2; ++rep) {  // the first repetition warms up
      const auto t0 = std::chrono::steady_clock::now();
      HessianAccumulator acc(in, cuda);
      ASSERT_TRUE(acc.Add(x).ok());
      absl::StatusOr<at::Tensor> h = acc.Finalize();
      ASSERT_TRUE(h.ok());
      absl::StatusOr<std::vector<GptqResult>> r = QuantizeGptqShared(ws, *h, GptqOptions{});
      ASSERT_TRUE(r.ok()) << r.status();
      for (const GptqResult& g : *r) {
        ASSERT_TRUE(PackWeight(g.weight).ok());
        EXPECT_EQ(g.fallback, Fallback::kNone);
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (rep == 1) {
        std::printf("GPTQ on CUDA: %zu x [%ld, %ld] (one Hessian): %.3f s\n", ws.size(),
                    static_cast<long>(rows), static_cast<long>(in), s);
      }
    }
  }
}

}  // namespace
}  // namespace mq::quant
