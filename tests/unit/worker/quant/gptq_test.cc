// GPTQ: equivalence with RTN when H is diagonal, quality on correlated inputs, tied vs untied
// gate/up, and hostile inputs (dead columns, outliers, singular / zero / indefinite / non-finite
// Hessians) that must end in a defined, reported, NaN-free outcome.
#include "worker/quant/gptq.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <vector>

#include "gtest/gtest.h"
#include "worker/quant/hessian.h"
#include "worker/quant/rtn.h"

namespace mq::quant {
namespace {

// Correlated calibration inputs: a rank-`rank` signal plus small noise, with per-column scales
// spread over two orders of magnitude (so act-order matters).
at::Tensor CorrelatedInputs(int64_t tokens, int64_t in, int64_t rank, uint64_t seed) {
  at::manual_seed(seed);
  at::Tensor mix = at::randn({rank, in});
  at::Tensor col_scale = at::exp(at::randn({in}) * 1.2);
  at::manual_seed(seed * 7919 + 1);
  return (at::mm(at::randn({tokens, rank}), mix) + 0.1 * at::randn({tokens, in})) * col_scale;
}

at::Tensor HessianOf(const at::Tensor& x) {
  HessianAccumulator acc(x.size(1));
  EXPECT_TRUE(acc.Add(x).ok());
  return *acc.Finalize();
}

double Agreement(const at::Tensor& a, const at::Tensor& b) {
  return a.eq(b).to(at::kDouble).mean().item<double>();
}

bool Finite(const GptqResult& r) {
  return at::isfinite(r.weight.dequantized.to(at::kFloat)).all().item<bool>() &&
         at::isfinite(r.weight.scales.to(at::kFloat)).all().item<bool>();
}

TEST(GptqTest, DiagonalHessianGivesExactlyRtn) {
  at::manual_seed(20);
  at::Tensor w = at::randn({32, 200});
  at::Tensor h = at::diag(at::rand({200}) + 0.5);
  GptqOptions o;
  o.grid.group_size = 64;
  absl::StatusOr<GptqResult> g = QuantizeGptq(w, h, o);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->fallback, Fallback::kNone);
  absl::StatusOr<QuantizedWeight> r = QuantizeRtn(w, o.grid);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(at::equal(g->weight.codes, r->codes));
  EXPECT_TRUE(at::equal(g->weight.scales, r->scales));
  EXPECT_TRUE(at::equal(g->weight.dequantized, r->dequantized));
}

TEST(GptqTest, BeatsRtnOnHeldOutCorrelatedInputs) {
  const int64_t in = 256;
  at::Tensor x = CorrelatedInputs(2048, in, 24, 21);
  at::Tensor calib = x.narrow(0, 0, 1024), held_out = x.narrow(0, 1024, 1024);
  at::manual_seed(22);
  at::Tensor w = at::randn({96, in});
  at::Tensor h = HessianOf(calib);
  for (bool symmetric : {true, false}) {
    for (bool act_order : {true, false}) {
      GptqOptions o;
      o.grid.symmetric = symmetric;
      o.act_order = act_order;
      absl::StatusOr<GptqResult> g = QuantizeGptq(w, h, o);
      ASSERT_TRUE(g.ok()) << g.status();
      absl::StatusOr<QuantizedWeight> r = QuantizeRtn(w, o.grid);
      ASSERT_TRUE(r.ok());
      const double eg = *RelativeOutputError(w, g->weight.dequantized, held_out);
      const double er = *RelativeOutputError(w, r->dequantized, held_out);
      EXPECT_LT(eg, 0.7 * er) << "symmetric " << symmetric << " act_order " << act_order;
    }
  }
}

TEST(GptqTest, TiedAndUntiedGateUpAreIdentical) {
  at::Tensor x = CorrelatedInputs(512, 128, 16, 23);
  at::Tensor h = HessianOf(x);
  at::Tensor h_before = h.clone();
  at::manual_seed(24);
  at::Tensor gate = at::randn({80, 128}), up = at::randn({80, 128}) * 3;
  GptqOptions o;
  o.grid.group_size = 32;
  absl::StatusOr<std::vector<GptqResult>> tied = QuantizeGptqShared({gate, up}, h, o);
  ASSERT_TRUE(tied.ok()) << tied.status();
  EXPECT_TRUE(at::equal(h, h_before)) << "the caller's Hessian must not be modified";
  absl::StatusOr<GptqResult> g = QuantizeGptq(gate, h, o);
  absl::StatusOr<GptqResult> u = QuantizeGptq(up, h, o);
  ASSERT_TRUE(g.ok() && u.ok());
  // Order must not matter either: up first, then gate.
  absl::StatusOr<std::vector<GptqResult>> reversed = QuantizeGptqShared({up, gate}, h, o);
  ASSERT_TRUE(reversed.ok());
  for (const auto& [a, b] : {std::pair{&(*tied)[0], &*g}, std::pair{&(*tied)[1], &*u},
                             std::pair{&(*reversed)[1], &*g}, std::pair{&(*reversed)[0], &*u}}) {
    EXPECT_TRUE(at::equal(a->weight.codes, b->weight.codes));
    EXPECT_TRUE(at::equal(a->weight.scales, b->weight.scales));
    EXPECT_TRUE(at::equal(a->weight.dequantized, b->weight.dequantized));
    EXPECT_EQ(a->damping, b->damping);
  }
}

TEST(GptqTest, DeadColumnsAreZeroedAndCounted) {
  at::Tensor x = CorrelatedInputs(512, 64, 8, 25);
  x.select(1, 3).zero_();
  x.select(1, 40).zero_();
  at::manual_seed(26);
  at::Tensor w = at::randn({16, 64});
  w.select(1, 3).fill_(50.0);  // would dominate its group's scale if not zeroed first
  absl::StatusOr<GptqResult> g = QuantizeGptq(w, HessianOf(x), GptqOptions{});
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->dead_columns, 2);
  EXPECT_EQ(g->fallback, Fallback::kNone);
  EXPECT_TRUE(Finite(*g));
  EXPECT_TRUE(g->weight.dequantized.select(1, 3).eq(0).all().item<bool>());
  EXPECT_TRUE(g->weight.dequantized.select(1, 40).eq(0).all().item<bool>());
  EXPECT_LT(g->weight.scales.to(at::kFloat).max().item<double>(), 2.0);
}

TEST(GptqTest, HugeOutliersInWeightsAndInputsStayFinite) {
  at::Tensor x = CorrelatedInputs(512, 128, 16, 27);
  at::manual_seed(28);
  at::Tensor w = at::randn({32, 128});
  w.select(1, 5).fill_(1e4);
  x.select(1, 77).mul_(1e4);
  absl::StatusOr<GptqResult> g = QuantizeGptq(w, HessianOf(x), GptqOptions{});
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_NE(g->fallback, Fallback::kRtn);
  EXPECT_TRUE(Finite(*g));
  // The outlier column itself is representable: 1e4 = absmax -> code 7 with s = bf16(1e4/7.5).
  EXPECT_TRUE(g->weight.codes.select(1, 5).eq(7).all().item<bool>());
}

TEST(GptqTest, SingularHessianIsHandledByDamping) {
  // Rank 3 inputs in 64 dimensions: H is singular, the damping makes it definite.
  at::manual_seed(29);
  at::Tensor x = at::mm(at::randn({256, 3}), at::randn({3, 64}));
  at::Tensor w = at::randn({24, 64});
  at::Tensor h = HessianOf(x);
  absl::StatusOr<GptqResult> g = QuantizeGptq(w, h, GptqOptions{});
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_NE(g->fallback, Fallback::kRtn);
  EXPECT_TRUE(Finite(*g));
  absl::StatusOr<QuantizedWeight> r = QuantizeRtn(w, GptqOptions{}.grid);
  EXPECT_LT(*RelativeHessianError(w, g->weight.dequantized, h),
            *RelativeHessianError(w, r->dequantized, h));
}

TEST(GptqTest, ZeroTokensFallBackToRtnAndSaySo) {
  HessianAccumulator acc(48);
  at::Tensor h = *acc.Finalize();
  at::manual_seed(30);
  at::Tensor w = at::randn({8, 48});
  GptqOptions o;
  o.grid.group_size = 16;
  absl::StatusOr<GptqResult> g = QuantizeGptq(w, h, o);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->fallback, Fallback::kRtn);
  EXPECT_NE(g->fallback_reason.find("no calibration tokens"), std::string::npos)
      << g->fallback_reason;
  absl::StatusOr<QuantizedWeight> r = QuantizeRtn(w, o.grid);
  EXPECT_TRUE(at::equal(g->weight.codes, r->codes));
  EXPECT_TRUE(at::equal(g->weight.dequantized, r->dequantized));
}

TEST(GptqTest, IndefiniteHessianRaisesDampingThenFallsBackToRtn) {
  // H = I - 10·vvᵀ, v = 1/sqrt(64): diagonal 0.84 > 0 but one eigenvalue is -9.
  const int64_t in = 64;
  at::Tensor v = at::full({in, 1}, 1.0 / 8.0);
  at::Tensor h = at::eye(in) - 10.0 * at::mm(v, v.t());
  at::manual_seed(31);
  at::Tensor w = at::randn({8, in});
  GptqOptions o;  // rel_damp 0.01 -> 0.1 -> 1 -> 10 (λ 8.4, not enough) -> 100 (λ 84)
  absl::StatusOr<GptqResult> g = QuantizeGptq(w, h, o);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->fallback, Fallback::kRaisedDamping);
  EXPECT_EQ(g->damp_retries, 4);
  EXPECT_NEAR(g->rel_damp, 100.0, 1e-9);
  EXPECT_FALSE(g->fallback_reason.empty());
  EXPECT_TRUE(Finite(*g));

  o.max_damp_retries = 2;
  g = QuantizeGptq(w, h, o);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->fallback, Fallback::kRtn);
  EXPECT_NE(g->fallback_reason.find("cholesky"), std::string::npos) << g->fallback_reason;
  EXPECT_TRUE(at::equal(g->weight.codes, QuantizeRtn(w, o.grid)->codes));
}

TEST(GptqTest, NonFiniteInputsAreErrorsNotNaN) {
  at::Tensor x = CorrelatedInputs(128, 32, 4, 32);
  at::Tensor h = HessianOf(x);
  at::manual_seed(33);
  at::Tensor w = at::randn({8, 32});
  at::Tensor bad_w = w.clone();
  bad_w.index_put_({2, 7}, std::numeric_limits<float>::quiet_NaN());
  absl::StatusOr<GptqResult> g = QuantizeGptq(bad_w, h, GptqOptions{});
  ASSERT_FALSE(g.ok());
  EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(g.status().message().find("weight contains NaN or Inf"), std::string::npos);

  for (double bad :
       {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    at::Tensor bad_h = h.clone();
    bad_h.index_put_({1, 1}, bad);
    g = QuantizeGptq(w, bad_h, GptqOptions{});
    ASSERT_FALSE(g.ok());
    EXPECT_NE(g.status().message().find("hessian contains NaN or Inf"), std::string::npos);
  }
  // NaN calibration inputs are caught when the Hessian is finalized.
  HessianAccumulator acc(32);
  at::Tensor bad_x = x.clone();
  bad_x.index_put_({0, 0}, std::numeric_limits<float>::quiet_NaN());
  ASSERT_TRUE(acc.Add(bad_x).ok());
  EXPECT_FALSE(acc.Finalize().ok());
}

TEST(GptqTest, RejectsBadOptionsAndShapes) {
  at::Tensor h = at::eye(16);
  at::Tensor w = at::randn({4, 16});
  GptqOptions o;
  o.block_size = 0;
  absl::StatusOr<GptqResult> g = QuantizeGptq(w, h, o);
  ASSERT_FALSE(g.ok());
  EXPECT_NE(g.status().message().find("block_size = 0"), std::string::npos);
  o = GptqOptions{};
  o.rel_damp = 0;
  EXPECT_FALSE(QuantizeGptq(w, h, o).ok());
  EXPECT_FALSE(QuantizeGptq(at::randn({4, 15}), h, GptqOptions{}).ok());
  EXPECT_FALSE(QuantizeGptq(w, at::ones({16, 8}), GptqOptions{}).ok());
  at::Tensor negative = at::eye(16);
  negative.index_put_({3, 3}, -1.0);
  g = QuantizeGptq(w, negative, GptqOptions{});
  ASSERT_FALSE(g.ok());
  EXPECT_NE(g.status().message().find("diagonal entry 3"), std::string::npos);
}

TEST(GptqTest, BlockSizeOnlyChangesRoundingNoise) {
  at::Tensor x = CorrelatedInputs(1024, 192, 16, 34);
  at::Tensor h = HessianOf(x);
  at::manual_seed(35);
  at::Tensor w = at::randn({64, 192});
  GptqOptions a, b;
  b.block_size = 16;
  absl::StatusOr<GptqResult> ga = QuantizeGptq(w, h, a), gb = QuantizeGptq(w, h, b);
  ASSERT_TRUE(ga.ok() && gb.ok());
  EXPECT_GT(Agreement(ga->weight.codes, gb->weight.codes), 0.995);
}

TEST(GptqTest, OutputErrorThroughInputsEqualsThroughHessian) {
  at::Tensor x = CorrelatedInputs(300, 40, 5, 36);
  at::manual_seed(37);
  at::Tensor w = at::randn({10, 40});
  at::Tensor q = w + 0.01 * at::randn({10, 40});
  at::Tensor xd = x.to(at::kDouble);
  at::Tensor h = at::mm(xd.t(), xd) * (2.0 / 300);
  EXPECT_NEAR(*RelativeOutputError(w, q, x), *RelativeHessianError(w, q, h), 1e-9);
  EXPECT_EQ(*RelativeOutputError(w, w, x), 0.0);
  EXPECT_FALSE(RelativeOutputError(w, q, at::ones({3, 41})).ok());
}

TEST(GptqTest, HessianErrorTracesOnEvenlySpacedRows) {
  at::Tensor x = CorrelatedInputs(500, 48, 6, 38);
  at::manual_seed(39);
  at::Tensor w = at::randn({300, 48});
  at::Tensor q = w + 0.02 * at::randn({300, 48});
  at::Tensor h = HessianOf(x);
  // All rows (max_rows 0 or >= the rows): the exact traces of RelativeHessianError.
  for (int64_t max_rows : {0, 300, 1000}) {
    absl::StatusOr<at::Tensor> all = HessianErrorTraces(w, q, h, max_rows);
    ASSERT_TRUE(all.ok()) << all.status();
    ASSERT_EQ(all->scalar_type(), at::kDouble);
    EXPECT_NEAR(RelativeErrorOf((*all)[0].item<double>(), (*all)[1].item<double>()),
                *RelativeHessianError(w, q, h), 1e-12);
  }
  // 64 of 300 rows: the traces of exactly rows floor(i * 300 / 64), and a close estimate.
  absl::StatusOr<at::Tensor> some = HessianErrorTraces(w, q, h, 64);
  ASSERT_TRUE(some.ok()) << some.status();
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < 64; ++i) rows.push_back(i * 300 / 64);
  const at::Tensor pick = at::tensor(rows, at::kLong);
  absl::StatusOr<at::Tensor> picked =
      HessianErrorTraces(w.index_select(0, pick), q.index_select(0, pick), h);
  ASSERT_TRUE(picked.ok());
  EXPECT_TRUE(at::allclose(*some, *picked, 1e-12, 0));
  const double estimate = RelativeErrorOf((*some)[0].item<double>(), (*some)[1].item<double>());
  EXPECT_NEAR(estimate, *RelativeHessianError(w, q, h), 0.2 * *RelativeHessianError(w, q, h));
  // Identical weights: 0; a zero weight with a nonzero error: +inf; bad shapes: an error.
  absl::StatusOr<at::Tensor> same = HessianErrorTraces(w, w, h, 64);
  EXPECT_EQ(RelativeErrorOf((*same)[0].item<double>(), (*same)[1].item<double>()), 0.0);
  EXPECT_TRUE(std::isinf(RelativeErrorOf(1.0, 0.0)));
  EXPECT_FALSE(HessianErrorTraces(w, q.narrow(0, 0, 10), h, 64).ok());
  EXPECT_FALSE(HessianErrorTraces(w, q, at::ones({47, 47}), 64).ok());
}

}  // namespace
}  // namespace mq::quant
