// AWQ's numerics (worker/quant/awq.h): candidates, statistics, scales, fake quantization and
// the folding identities the pipeline relies on.
#include "worker/quant/awq.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "worker/model/deepseek_v3.h"
#include "worker/quant/rtn.h"

namespace mq::quant {
namespace {

TEST(AwqTest, CandidatesStartWithIdentity) {
  const std::vector<double> a = AwqCandidateAlphas(20);
  ASSERT_EQ(a.size(), 22u);
  EXPECT_EQ(a[0], -1.0);
  EXPECT_EQ(a[1], 0.0);
  EXPECT_EQ(a[11], 0.5);
  EXPECT_EQ(a[21], 1.0);
  EXPECT_EQ(AwqCandidateAlphas(0), std::vector<double>{-1.0});
}

TEST(AwqTest, WeightStatisticIsRelativeToTheGroupMax) {
  const at::Tensor w = at::tensor({1.0f, -2.0f, 3.0f, 0.0f, 0.0f, 0.0f, -4.0f, 2.0f}).view({2, 4});
  const at::Tensor sum = NormalizedWeightColumnSum(w, 2);
  ASSERT_EQ(sum.scalar_type(), at::kDouble);
  // Row 0: groups [1, -2] (max 2) and [3, 0] (max 3); row 1: [0, 0] (all zero) and [-4, 2].
  const std::vector<double> expected = {0.5, 1.0, 1.0 + 1.0, 0.0 + 0.5};
  for (int c = 0; c < 4; ++c) EXPECT_DOUBLE_EQ(sum[c].item<double>(), expected[c]) << c;
  // Per channel (group 0): every column against the row max.
  const at::Tensor pc = NormalizedWeightColumnSum(w, 0);
  EXPECT_NEAR(pc[0].item<double>(), 1.0 / 3.0, 1e-7);  // fp32 ratios, summed in fp64
  EXPECT_DOUBLE_EQ(pc[2].item<double>(), 1.0 + 1.0);
}

TEST(AwqTest, ScaleFollowsTheFormulaAndIsNormalised) {
  const at::Tensor x = at::tensor({4.0, 1.0, 0.25}, at::kDouble);
  const at::Tensor w = at::tensor({0.5, 0.5, 1.0}, at::kDouble);
  EXPECT_TRUE(AwqScale(x, w, -1).equal(at::ones({3})));
  const at::Tensor s = AwqScale(x, w, 0.5);
  ASSERT_EQ(s.scalar_type(), at::kFloat);
  std::vector<double> raw;
  for (int c = 0; c < 3; ++c) {
    raw.push_back(std::sqrt(x[c].item<double>()) / (std::sqrt(w[c].item<double>()) + 1e-4));
  }
  const double norm = std::sqrt(*std::max_element(raw.begin(), raw.end()) *
                                *std::min_element(raw.begin(), raw.end()));
  for (int c = 0; c < 3; ++c) {
    const float expected = at::tensor(raw[c] / norm).to(at::kBFloat16).item<float>();
    EXPECT_EQ(s[c].item<float>(), expected) << c;  // rounded to bf16
  }
  EXPECT_NEAR((s.max() * s.min()).item<float>(), 1.0f, 1e-2);
  // α = 0 depends on the weights only; α = 1 on the activations only.
  const at::Tensor s1 = AwqScale(x, w, 1.0);
  EXPECT_GT(s1[0].item<float>(), s1[1].item<float>());
  EXPECT_GT(s1[1].item<float>(), s1[2].item<float>());
  const at::Tensor s0 = AwqScale(x, w, 0.0);
  EXPECT_FLOAT_EQ(s0[0].item<float>(), s0[1].item<float>());
}

TEST(AwqTest, IdentityCandidateIsPlainRtn) {
  at::manual_seed(3);
  const at::Tensor w = at::randn({16, 64});
  GridOptions g;
  g.group_size = 32;
  g.scale_search = ScaleSearch::kMse;
  absl::StatusOr<at::Tensor> fq = FakeQuantizeScaled(w, at::ones({64}), g);
  ASSERT_TRUE(fq.ok()) << fq.status();
  absl::StatusOr<QuantizedWeight> rtn = QuantizeRtn(w, g);
  ASSERT_TRUE(rtn.ok());
  EXPECT_TRUE(fq->equal(rtn->dequantized.to(at::kFloat)));
  // A non-trivial s: Q(W·s)/s, column by column.
  const at::Tensor s = at::rand({64}) + 0.5;
  absl::StatusOr<at::Tensor> fs = FakeQuantizeScaled(w, s, g);
  ASSERT_TRUE(fs.ok());
  absl::StatusOr<QuantizedWeight> q = QuantizeRtn(w * s.unsqueeze(0), g);
  EXPECT_TRUE(at::allclose(*fs, q->dequantized.to(at::kFloat) / s.unsqueeze(0), 0, 0));
}

TEST(AwqTest, FoldingKeepsTheFunction) {
  at::manual_seed(5);
  const int64_t hidden = 32, inter = 48;
  const at::Tensor h = at::randn({10, hidden});
  const at::Tensor gamma = at::rand({hidden}) + 0.5;
  model::MlpWeights mlp{at::randn({inter, hidden}) * 0.1, at::randn({inter, hidden}) * 0.1,
                        at::randn({hidden, inter}) * 0.1};
  const at::Tensor s1 = at::rand({hidden}) * 3 + 0.2, s2 = at::rand({inter}) * 3 + 0.2;
  const at::Tensor ref = model::RunMlpRows("m.", mlp, model::RmsNorm(h, gamma, 1e-6));
  // Norm → gate/up with s1, then up → down with s2, kept in fp32: equal to rounding.
  model::MlpWeights f{ScaleColumns(mlp.gate_proj, s1, at::kFloat),
                      DivideRows(ScaleColumns(mlp.up_proj, s1, at::kFloat), s2, at::kFloat),
                      ScaleColumns(mlp.down_proj, s2, at::kFloat)};
  const at::Tensor out =
      model::RunMlpRows("m.", f, model::RmsNorm(h, DivideBy(gamma, s1, at::kFloat), 1e-6));
  EXPECT_TRUE(at::allclose(out, ref, 1e-4, 1e-5));
  // Stored as bf16 (the tensors keep fp32 dtype but hold bf16 values): a small difference.
  const at::Tensor g16 = DivideBy(gamma, s1, at::kBFloat16);
  EXPECT_EQ(g16.scalar_type(), at::kFloat);
  EXPECT_TRUE(g16.equal(g16.to(at::kBFloat16).to(at::kFloat)));
  model::MlpWeights b{ScaleColumns(mlp.gate_proj, s1, at::kBFloat16),
                      DivideRows(ScaleColumns(mlp.up_proj, s1, at::kFloat), s2, at::kBFloat16),
                      ScaleColumns(mlp.down_proj, s2, at::kBFloat16)};
  const at::Tensor out16 = model::RunMlpRows("m.", b, model::RmsNorm(h, g16, 1e-6));
  const double rel = ((out16 - ref).abs().max() / ref.abs().max()).item<double>();
  EXPECT_GT(rel, 0.0);
  EXPECT_LT(rel, 0.02);
}

TEST(AwqTest, SquaredErrorSumsInDouble) {
  const at::Tensor a = at::tensor({1.0f, 2.0f, 3.0f});
  const at::Tensor b = at::tensor({1.0f, 0.0f, 6.0f});
  EXPECT_DOUBLE_EQ(SquaredError(a, b), 4.0 + 9.0);
  EXPECT_DOUBLE_EQ(SquaredError(at::empty({0}), at::empty({0})), 0.0);
}

}  // namespace
}  // namespace mq::quant
