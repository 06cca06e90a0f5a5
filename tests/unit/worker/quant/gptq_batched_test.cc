// QuantizeGptqBatched: on CPU it must equal QuantizeGptq exactly (gate/up sharing a Hessian,
// experts with their own, RTN and dead-column fallbacks, bad inputs); on CUDA (skipped without a
// device) the fused kernels must agree with QuantizeGptq up to a tiny fraction of codes.
#include "worker/quant/gptq_batched.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>

#include "gtest/gtest.h"

namespace mq::quant {
namespace {

at::Tensor Hessian(int64_t in, uint64_t seed, const at::Device& d = at::kCPU) {
  at::manual_seed(seed);
  at::Tensor mix = at::randn({16, in});
  at::Tensor x = at::mm(at::randn({4 * in, 16}), mix) + 0.1 * at::randn({4 * in, in});
  return at::mm(x.t(), x).mul(2.0 / (4 * in)).to(d);
}

void ExpectSame(const GptqResult& a, const GptqResult& b) {
  EXPECT_TRUE(at::equal(a.weight.codes.cpu(), b.weight.codes.cpu()));
  EXPECT_TRUE(at::equal(a.weight.scales.cpu(), b.weight.scales.cpu()));
  EXPECT_TRUE(at::equal(a.weight.dequantized.cpu(), b.weight.dequantized.cpu()));
  EXPECT_EQ(a.fallback, b.fallback);
  EXPECT_EQ(a.damping, b.damping);
  EXPECT_EQ(a.dead_columns, b.dead_columns);
}

TEST(GptqBatchedTest, CpuEqualsLoopedQuantizeGptq) {
  GptqOptions o;
  o.grid.group_size = 32;
  at::Tensor h0 = Hessian(96, 1), h1 = Hessian(96, 2), h2 = Hessian(48, 3);
  h1.index_put_({5}, 0.0);  // a dead input
  h1.index_put_({at::indexing::Slice(), 5}, 0.0);
  at::Tensor zero = at::zeros({48, 48});
  at::manual_seed(9);
  std::vector<at::Tensor> w = {at::randn({40, 96}), at::randn({40, 96}), at::randn({40, 96}),
                               at::randn({96, 48}), at::randn({96, 48})};
  std::vector<int64_t> of = {0, 0, 1, 2, 3};  // gate/up share h0
  auto got = QuantizeGptqBatched(w, of, std::vector<at::Tensor>{h0, h1, h2, zero}, o);
  ASSERT_TRUE(got.ok()) << got.status();
  std::vector<at::Tensor> hs = {h0, h0, h1, h2, zero};
  for (size_t k = 0; k < w.size(); ++k) {
    auto want = QuantizeGptq(w[k], hs[k], o);
    ASSERT_TRUE(want.ok());
    ExpectSame((*got)[k], *want);
  }
  EXPECT_EQ((*got)[2].dead_columns, 1);
  EXPECT_EQ((*got)[4].fallback, Fallback::kRtn);
}

TEST(GptqBatchedTest, RejectsBadInputs) {
  GptqOptions o;
  at::Tensor h = Hessian(64, 4);
  std::vector<at::Tensor> w = {at::randn({8, 64}), at::randn({8, 32})};
  auto r = QuantizeGptqBatched(w, {0, 0}, std::vector<at::Tensor>{h}, o);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("weights[1]"), std::string::npos) << r.status();
  r = QuantizeGptqBatched(w, {0}, std::vector<at::Tensor>{h}, o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  r = QuantizeGptqBatched({w[0]}, {1}, std::vector<at::Tensor>{h}, o);
  EXPECT_NE(r.status().message().find("hessian_of = 1"), std::string::npos) << r.status();
  at::Tensor bad = h.clone();
  bad.index_put_({0, 0}, NAN);
  r = QuantizeGptqBatched({w[0]}, {0}, std::vector<at::Tensor>{bad}, o);
  EXPECT_NE(r.status().message().find("hessians[0]"), std::string::npos) << r.status();
}

class GptqBatchedCudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_F(GptqBatchedCudaTest, MatchesQuantizeGptqOnCuda) {
  const at::Device d(at::kCUDA);
  for (bool asym : {false, true}) {
    for (auto how :
         {HessianFactorization::kInverseCholesky, HessianFactorization::kReversedCholesky,
          HessianFactorization::kCholeskyFeedback}) {
      GptqOptions o;
      o.grid.symmetric = !asym;
      GptqBatchOptions bo;
      bo.factorization = how;
      at::Tensor h0 = Hessian(384, 5, d), h1 = Hessian(384, 6, d);
      h1.index_put_({7}, 0.0);
      h1.index_put_({at::indexing::Slice(), 7}, 0.0);
      at::manual_seed(10);
      std::vector<at::Tensor> w = {at::randn({200, 384}, d), at::randn({200, 384}, d),
                                   at::randn({200, 384}, d)};
      auto got = QuantizeGptqBatched(w, {0, 0, 1}, std::vector<at::Tensor>{h0, h1}, o, bo);
      ASSERT_TRUE(got.ok()) << got.status();
      std::vector<at::Tensor> hs = {h0, h0, h1};
      int64_t diff = 0, total = 0;
      for (size_t k = 0; k < w.size(); ++k) {
        auto want = QuantizeGptq(w[k], hs[k], o);
        ASSERT_TRUE(want.ok());
        EXPECT_TRUE(at::equal((*got)[k].weight.scales, want->weight.scales));
        diff += (*got)[k].weight.codes.ne(want->weight.codes).sum().item<int64_t>();
        total += want->weight.codes.numel();
        const double eg = RelativeHessianError(w[k], (*got)[k].weight.dequantized, hs[k]).value();
        const double ew = RelativeHessianError(w[k], want->weight.dequantized, hs[k]).value();
        EXPECT_NEAR(eg, ew, 0.02 * ew);
        EXPECT_EQ((*got)[k].dead_columns, want->dead_columns);
      }
      std::printf("asym %d factorization %d: %lld of %lld codes differ from QuantizeGptq\n", asym,
                  static_cast<int>(how), static_cast<long long>(diff),
                  static_cast<long long>(total));
      EXPECT_LE(static_cast<double>(diff) / total, 5e-3);
    }
  }
}

// The kernel factorisations (cuSOLVER trtri for the inverse form on 1 or 4 streams, and the
// Cholesky-feedback form) against ATen's: the same damping retries and fallbacks, the inverse
// factor equal up to rounding, codes nearly all equal.
TEST_F(GptqBatchedCudaTest, KernelFactorisationMatchesAten) {
  const at::Device d(at::kCUDA);
  GptqOptions o;
  std::vector<at::Tensor> hs;
  for (int i = 0; i < 6; ++i) hs.push_back(Hessian(256, 20 + i, d));
  // Indefinite: the default damping (0.1 of the mean diagonal) is not enough, 1.0 is.
  // A 2x2 coupling c² = (d_a + mean/2)(d_b + mean/2) makes it so while the diagonal stays positive.
  at::Tensor indefinite = Hessian(256, 30, d);
  const double mean = indefinite.diagonal().mean().item<double>();
  const double da = indefinite[3][3].item<double>(), db = indefinite[9][9].item<double>();
  const double c = std::sqrt((da + 0.5 * mean) * (db + 0.5 * mean));
  indefinite.index_put_({3, 9}, c);
  indefinite.index_put_({9, 3}, c);
  hs.push_back(indefinite);
  GptqBatchOptions aten;
  aten.factorization = HessianFactorization::kReversedCholesky;
  aten.factor_kernels = false;
  aten.factor_streams = 1;
  auto want = PrepareHessiansBatched(hs, o, aten);
  ASSERT_TRUE(want.ok()) << want.status();
  EXPECT_EQ((*want)[6].fallback, Fallback::kRaisedDamping);
  for (int variant = 0; variant < 4; ++variant) {
    const bool feedback = variant >= 2;
    const int streams = variant % 2 == 0 ? 1 : 4;
    SCOPED_TRACE(testing::Message() << "feedback " << feedback << " streams " << streams);
    GptqBatchOptions bo;
    bo.factorization = feedback ? HessianFactorization::kCholeskyFeedback
                                : HessianFactorization::kReversedCholesky;
    bo.factor_kernels = true;
    bo.factor_streams = streams;
    auto got = PrepareHessiansBatched(hs, o, bo);
    ASSERT_TRUE(got.ok()) << got.status();
    for (size_t k = 0; k < hs.size(); ++k) {
      EXPECT_EQ((*got)[k].fallback, (*want)[k].fallback) << k;
      EXPECT_EQ((*got)[k].damp_retries, (*want)[k].damp_retries) << k;
      EXPECT_EQ((*got)[k].rel_damp, (*want)[k].rel_damp) << k;
      ASSERT_TRUE((*got)[k].u.defined());
      EXPECT_EQ((*got)[k].feedback_form, feedback);
      if (feedback) continue;  // R, not U
      const double diff = ((*got)[k].u - (*want)[k].u).abs().max().item<double>();
      EXPECT_LT(diff, 1e-4 * (*want)[k].u.abs().max().item<double>()) << k;
    }
    at::manual_seed(12);
    std::vector<at::Tensor> w;
    std::vector<int64_t> of;
    for (size_t k = 0; k < hs.size(); ++k) {
      w.push_back(at::randn({160, 256}, d));
      of.push_back(static_cast<int64_t>(k));
    }
    auto a = QuantizeGptqBatched(w, of, *want, o);
    auto b = QuantizeGptqBatched(w, of, *got, o);
    ASSERT_TRUE(a.ok() && b.ok());
    int64_t diff = 0, total = 0;
    for (size_t k = 0; k < w.size(); ++k) {
      diff += (*a)[k].weight.codes.ne((*b)[k].weight.codes).sum().item<int64_t>();
      total += w[k].numel();
    }
    std::printf("feedback %d streams %d: %lld of %lld codes differ from the ATen factor's\n",
                feedback, streams, static_cast<long long>(diff), static_cast<long long>(total));
    EXPECT_LE(static_cast<double>(diff) / total, 2e-3);
  }
}

}  // namespace
}  // namespace mq::quant
