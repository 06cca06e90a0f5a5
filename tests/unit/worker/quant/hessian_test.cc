// Hessian accumulation: (2/N)·Σ xxᵀ against float64, shard merging, bf16 inputs, the panelled
// lower-half product, zero tokens and non-finite inputs.
#include "worker/quant/hessian.h"

#include <ATen/ATen.h>

#include <limits>

#include "gtest/gtest.h"

namespace mq::quant {
namespace {

double MaxRelDiff(const at::Tensor& a, const at::Tensor& ref) {
  return ((a.to(at::kDouble) - ref).abs().max() / ref.abs().max()).item<double>();
}

TEST(HessianTest, MatchesFloat64ReferenceOverSeveralBatches) {
  at::manual_seed(10);
  at::Tensor x1 = at::randn({50, 24}), x2 = at::randn({3, 7, 24});  // leading dims flattened
  HessianAccumulator acc(24);
  ASSERT_TRUE(acc.Add(x1).ok());
  ASSERT_TRUE(acc.Add(x2).ok());
  EXPECT_EQ(acc.tokens(), 71);
  absl::StatusOr<at::Tensor> h = acc.Finalize();
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->scalar_type(), at::kFloat);
  at::Tensor x = at::cat({x1, x2.reshape({-1, 24})}).to(at::kDouble);
  at::Tensor ref = at::mm(x.t(), x).mul(2.0 / 71);
  EXPECT_LT(MaxRelDiff(*h, ref), 1e-5);
}

TEST(HessianTest, MergeOfShardsEqualsOneAccumulator) {
  at::manual_seed(11);
  at::Tensor a = at::randn({40, 16}), b = at::randn({25, 16});
  HessianAccumulator whole(16), left(16), right(16);
  ASSERT_TRUE(whole.Add(a).ok());
  ASSERT_TRUE(whole.Add(b).ok());
  ASSERT_TRUE(left.Add(a).ok());
  ASSERT_TRUE(right.Add(b).ok());
  ASSERT_TRUE(left.Merge(right).ok());
  EXPECT_EQ(left.tokens(), 65);
  EXPECT_TRUE(at::allclose(*left.Finalize(), *whole.Finalize(), 1e-6, 1e-7));
  ASSERT_TRUE(left.MergeSum(at::zeros({16, 16}), 0).ok());
  EXPECT_FALSE(left.Merge(HessianAccumulator(8)).ok());
  EXPECT_FALSE(left.MergeSum(at::zeros({16, 16}), -1).ok());
}

TEST(HessianTest, Bf16InputsAreWidenedExactly) {
  at::manual_seed(12);
  at::Tensor x = at::randn({30, 8}).to(at::kBFloat16);
  HessianAccumulator acc(8);
  ASSERT_TRUE(acc.Add(x).ok());
  at::Tensor xd = x.to(at::kDouble);
  EXPECT_LT(MaxRelDiff(*acc.Finalize(), at::mm(xd.t(), xd).mul(2.0 / 30)), 1e-6);
}

// Panelled accumulation (the lower half, mirrored on read) against a whole product, across a
// partial last panel, reads between Adds (mirror, then stale again), merging and bf16 inputs.
TEST(HessianTest, PanelledLowerHalfEqualsTheWholeProduct) {
  at::manual_seed(13);
  const int64_t in = 53;
  at::Tensor x1 = at::randn({40, in}), x2 = at::randn({2, 9, in}), x3 = at::randn({17, in});
  HessianAccumulator whole(in, c10::kCPU, /*panel=*/in), panelled(in, c10::kCPU, /*panel=*/12);
  for (const at::Tensor& x : {x1, x2}) {
    ASSERT_TRUE(whole.Add(x).ok());
    ASSERT_TRUE(panelled.Add(x).ok());
  }
  EXPECT_TRUE(at::allclose(panelled.sum(), whole.sum(), 1e-5, 1e-5));
  // A read in between, then more rows: the mirrored half must follow the new ones.
  ASSERT_TRUE(whole.Add(x3).ok());
  ASSERT_TRUE(panelled.Add(x3).ok());
  at::Tensor h = *panelled.Finalize();
  EXPECT_TRUE(at::equal(h, h.t())) << "the mirrored upper half is the lower half's transpose";
  at::Tensor x = at::cat({x1, x2.reshape({-1, in}), x3}).to(at::kDouble);
  EXPECT_LT(MaxRelDiff(h, at::mm(x.t(), x).mul(2.0 / 75)), 1e-5);
  EXPECT_TRUE(at::allclose(h, *whole.Finalize(), 1e-5, 1e-6));

  // Merging a panelled accumulator whose upper half is stale takes its symmetric sum.
  HessianAccumulator left(in, c10::kCPU, 12), right(in, c10::kCPU, 20);
  ASSERT_TRUE(left.Add(x1).ok());
  ASSERT_TRUE(right.Add(x3).ok());
  ASSERT_TRUE(left.Merge(right).ok());
  at::Tensor lr = at::cat({x1, x3}).to(at::kDouble);
  EXPECT_LT(MaxRelDiff(*left.Finalize(), at::mm(lr.t(), lr).mul(2.0 / 57)), 1e-5);

  at::Tensor xb = x1.to(at::kBFloat16);
  HessianAccumulator b(in, c10::kCPU, 16);
  ASSERT_TRUE(b.Add(xb).ok());
  at::Tensor xd = xb.to(at::kDouble);
  EXPECT_LT(MaxRelDiff(*b.Finalize(), at::mm(xd.t(), xd).mul(2.0 / 40)), 1e-6);
}

TEST(HessianTest, ZeroTokensGiveZeroHessian) {
  HessianAccumulator acc(5);
  ASSERT_TRUE(acc.Add(at::zeros({0, 5})).ok());
  EXPECT_EQ(acc.tokens(), 0);
  absl::StatusOr<at::Tensor> h = acc.Finalize();
  ASSERT_TRUE(h.ok());
  EXPECT_TRUE(at::equal(*h, at::zeros({5, 5})));
}

TEST(HessianTest, NonFiniteInputsFailFinalizeAndBadShapesFailAdd) {
  HessianAccumulator acc(4);
  at::Tensor x = at::ones({3, 4});
  x.index_put_({1, 1}, std::numeric_limits<float>::quiet_NaN());
  ASSERT_TRUE(acc.Add(x).ok());
  absl::StatusOr<at::Tensor> h = acc.Finalize();
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(h.status().message().find("NaN or Inf"), std::string::npos);

  absl::Status s = acc.Add(at::ones({3, 5}));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("in_features = 4"), std::string::npos);
  EXPECT_FALSE(acc.Add(at::ones({3, 4}, at::kInt)).ok());

  // Panelled: an Inf in the last column reaches only the lower half's last panel row; the
  // mirrored sum still carries it and Finalize still refuses.
  HessianAccumulator panelled(40, c10::kCPU, /*panel=*/8);
  at::Tensor y = at::randn({6, 40});
  y.index_put_({2, 39}, std::numeric_limits<float>::infinity());
  ASSERT_TRUE(panelled.Add(y).ok());
  absl::StatusOr<at::Tensor> hp = panelled.Finalize();
  ASSERT_FALSE(hp.ok());
  EXPECT_NE(hp.status().message().find("NaN or Inf"), std::string::npos);
}

}  // namespace
}  // namespace mq::quant
