// The next-token metric definitions of worker/eval/next_token.h on small hand-made logits:
// identical distributions have KL 0 and full agreement, a uniform distribution has perplexity
// V, KL of a two-token example in closed form, which positions count (0..n-2), the p99 rule, and
// merging.
#include "worker/eval/next_token.h"

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "gtest/gtest.h"

namespace mq::eval {
namespace {

at::Tensor Ids(std::vector<int64_t> v, int64_t batch, int64_t seq) {
  return at::tensor(v, at::kLong).reshape({batch, seq});
}

TEST(NextTokenTest, IdenticalLogitsHaveZeroKlAndFullAgreement) {
  at::manual_seed(0);
  const at::Tensor logits = at::randn({2, 6, 11});
  NextTokenAccumulator acc;
  ASSERT_TRUE(acc.Add(logits, logits.clone(), at::randint(0, 11, {2, 6}, at::kLong)).ok());
  absl::StatusOr<NextTokenQuality> q = acc.Finish();
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ(q->positions, 2 * 5);
  EXPECT_EQ(q->kl_mean, 0.0);
  EXPECT_EQ(q->kl_p99, 0.0);
  EXPECT_EQ(q->kl_max, 0.0);
  EXPECT_EQ(q->top1_agreement, 1.0);
  EXPECT_EQ(q->nll_reference, q->nll_candidate);
  EXPECT_EQ(q->perplexity_reference, q->perplexity_candidate);
}

TEST(NextTokenTest, UniformDistributionHasPerplexityV) {
  const int64_t v = 50;
  NextTokenAccumulator acc;
  const at::Tensor uniform = at::full({3, 7, v}, 1.25);  // any constant: uniform after softmax
  ASSERT_TRUE(acc.Add(uniform, at::zeros({3, 7, v}), at::randint(0, v, {3, 7}, at::kLong)).ok());
  absl::StatusOr<NextTokenQuality> q = acc.Finish();
  ASSERT_TRUE(q.ok());
  EXPECT_NEAR(q->perplexity_reference, 50.0, 1e-12);
  EXPECT_NEAR(q->perplexity_candidate, 50.0, 1e-12);
  EXPECT_NEAR(q->nll_reference, std::log(50.0), 1e-14);
  EXPECT_NEAR(q->kl_mean, 0.0, 1e-15);
}

TEST(NextTokenTest, KlOfATwoTokenExampleInClosedForm) {
  // p_ref = (1/2, 1/2), p_cand = (3/4, 1/4): KL = ½ ln(½ / ¾) + ½ ln(½ / ¼) = ½ ln(4/3).
  const at::Tensor ref = at::tensor(std::vector<float>{0, 0}).reshape({1, 2});
  const at::Tensor cand =
      at::tensor(std::vector<double>{std::log(3.0), 0}).reshape({1, 2}).to(at::kFloat);
  const at::Tensor kl = PerTokenKl(ref, cand);
  ASSERT_EQ(kl.scalar_type(), at::kDouble);
  EXPECT_NEAR(kl.item<double>(), 0.5 * std::log(4.0 / 3.0), 1e-7);  // cand logit rounded to f32
  // KL is not symmetric: KL(cand ‖ ref) = ¾ ln(3/2) + ¼ ln(1/2).
  EXPECT_NEAR(PerTokenKl(cand, ref).item<double>(), 0.75 * std::log(1.5) + 0.25 * std::log(0.5),
              1e-7);
  // A reference probability that underflows to 0 contributes 0, not NaN.
  const at::Tensor sharp = at::tensor(std::vector<double>{0, -2000}).reshape({1, 2});
  const double k = PerTokenKl(sharp, at::zeros({1, 2}, at::kDouble)).item<double>();
  EXPECT_NEAR(k, std::log(2.0), 1e-12);
}

TEST(NextTokenTest, ScoresPositionsZeroToNMinusTwoOnly) {
  // One sequence of 5 tokens over 4 ids: positions 0..3 are scored (predicting ids 1..4).
  // Argmaxes: ref = 0 everywhere; cand = 0, 1, 0, 0 at positions 0..3 and 2 at the last one,
  // which is not scored: agreement 3/4.
  at::Tensor ref = at::zeros({1, 5, 4});
  ref.index_put_({0, at::indexing::Slice(), 0}, 3.0);
  at::Tensor cand = ref.clone();
  cand.index_put_({0, 1, 1}, 5.0);
  cand.index_put_({0, 4, 2}, 5.0);
  const at::Tensor ids = Ids({3, 0, 0, 1, 2}, 1, 5);
  NextTokenAccumulator acc;
  ASSERT_TRUE(acc.Add(ref, cand, ids).ok());
  absl::StatusOr<NextTokenQuality> q = acc.Finish();
  ASSERT_TRUE(q.ok());
  EXPECT_EQ(q->positions, 4);
  EXPECT_DOUBLE_EQ(q->top1_agreement, 0.75);
  ASSERT_EQ(acc.kl().size(), 4u);
  EXPECT_EQ(acc.kl()[0], 0.0);
  EXPECT_GT(acc.kl()[1], 0.0);
  EXPECT_EQ(acc.kl()[2], 0.0);
  EXPECT_EQ(acc.kl()[3], 0.0);  // the last position differs but is not scored
  // NLL of the reference: targets 0, 0, 1, 2 under p = softmax(3, 0, 0, 0).
  const double z = std::exp(3.0) + 3.0;
  const double lp0 = 3.0 - std::log(z), lp_other = -std::log(z);
  EXPECT_NEAR(q->nll_reference, -(2 * lp0 + 2 * lp_other) / 4, 1e-12);
}

TEST(NextTokenTest, P99IsTheNearestRank) {
  std::vector<double> v;
  for (int i = 1; i <= 200; ++i) v.push_back(201 - i);   // 200..1, unsorted order
  EXPECT_EQ(NearestRankQuantile(v, 0.99), 198.0);        // ceil(0.99 * 200) = 198th smallest
  EXPECT_EQ(NearestRankQuantile({5, 1, 3}, 0.99), 5.0);  // ceil(2.97) = 3
  EXPECT_EQ(NearestRankQuantile(std::vector<double>(100, 0.0), 0.99), 0.0);
  std::vector<double> hundred;
  for (int i = 0; i < 100; ++i) hundred.push_back(i);
  EXPECT_EQ(NearestRankQuantile(hundred, 0.99), 98.0);  // rank 99 of 0..99
  EXPECT_EQ(NearestRankQuantile({7}, 0.99), 7.0);
  EXPECT_TRUE(std::isnan(NearestRankQuantile({}, 0.99)));
}

TEST(NextTokenTest, MergeEqualsOneAccumulator) {
  at::manual_seed(4);
  const at::Tensor ref = at::randn({4, 6, 9});
  const at::Tensor cand = ref + 0.3 * at::randn({4, 6, 9});
  const at::Tensor ids = at::randint(0, 9, {4, 6}, at::kLong);
  NextTokenAccumulator all, first, second;
  ASSERT_TRUE(all.Add(ref, cand, ids).ok());
  ASSERT_TRUE(first.Add(ref.narrow(0, 0, 1), cand.narrow(0, 0, 1), ids.narrow(0, 0, 1)).ok());
  ASSERT_TRUE(second.Add(ref.narrow(0, 1, 3), cand.narrow(0, 1, 3), ids.narrow(0, 1, 3)).ok());
  first.Merge(second);
  EXPECT_EQ(first.kl(), all.kl());
  absl::StatusOr<NextTokenQuality> a = all.Finish(), b = first.Finish();
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->kl_mean, b->kl_mean);
  EXPECT_EQ(a->kl_p99, b->kl_p99);
  EXPECT_EQ(a->nll_candidate, b->nll_candidate);
  EXPECT_EQ(a->top1_agreement, b->top1_agreement);
  EXPECT_GT(a->kl_mean, 0.0);
  EXPECT_GE(a->kl_max, a->kl_p99);
  EXPECT_GE(a->kl_p99, 0.0);
}

TEST(NextTokenTest, RefusesBadArguments) {
  NextTokenAccumulator acc;
  EXPECT_EQ(acc.Finish().status().code(), absl::StatusCode::kFailedPrecondition);
  const at::Tensor l = at::zeros({1, 3, 4});
  EXPECT_EQ(acc.Add(at::zeros({1, 1, 4}), at::zeros({1, 1, 4}), Ids({0}, 1, 1)).code(),
            absl::StatusCode::kInvalidArgument);  // seq < 2
  EXPECT_EQ(acc.Add(l, at::zeros({1, 3, 5}), Ids({0, 1, 2}, 1, 3)).code(),
            absl::StatusCode::kInvalidArgument);  // shapes differ
  EXPECT_EQ(acc.Add(l, l, Ids({0, 1}, 1, 2)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(acc.Add(l, l, Ids({0, 1, 4}, 1, 3)).code(),
            absl::StatusCode::kInvalidArgument);  // id 4 >= vocab
  EXPECT_EQ(acc.positions(), 0);
}

}  // namespace
}  // namespace mq::eval
