// Grids and RTN on known values (FORMATS.md §4.3): bf16 scales, round-half-even, the reachable
// -8, zero scales, asymmetric zero points, short last groups, per-channel, and an MSE search
// that really runs (checked against a brute-force scalar search).
#include <ATen/ATen.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "gtest/gtest.h"
#include "worker/quant/grid.h"
#include "worker/quant/rtn.h"

namespace mq::quant {
namespace {

at::Tensor Rows(std::vector<float> values, int64_t rows) {
  return at::tensor(values, at::kFloat).reshape({rows, -1});
}

std::vector<float> Floats(const at::Tensor& t) {
  at::Tensor c = t.to(at::kFloat).contiguous().reshape({-1});
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

std::vector<int> Ints(const at::Tensor& t) {
  at::Tensor c = t.to(at::kInt).contiguous().reshape({-1});
  return std::vector<int>(c.data_ptr<int>(), c.data_ptr<int>() + c.numel());
}

// Round-to-nearest-even to bf16 by bit manipulation (finite inputs).
float RefBf16(float x) {
  uint32_t bits = std::bit_cast<uint32_t>(x);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return std::bit_cast<float>(bits & 0xFFFF0000u);
}

TEST(RtnTest, SymmetricKnownValues) {
  GridOptions o;
  o.group_size = 4;
  at::Tensor w = Rows({1.5f, -0.75f, 0.3f, 0.0f,  // s = bf16(1.5 / 7.5) = 0.2001953125
                       7.5f, 2.5f, -2.5f, 0.5f,   // s = 1: ties round to even, 7.5 -> 8 -> 7
                       -7.5f, 1.0f, 0.0f, 0.0f,   // -7.5 -> -8 is reachable
                       0.0f, 0.0f, 0.0f, 0.0f},   // zero group: s = bf16 eps
                      4);
  absl::StatusOr<QuantizedWeight> q = QuantizeRtn(w, o);
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ(q->codes.scalar_type(), at::kChar);
  EXPECT_EQ(q->scales.scalar_type(), at::kBFloat16);
  EXPECT_FALSE(q->zero_points.defined());
  EXPECT_EQ(Ints(q->codes), (std::vector<int>{7, -4, 1, 0, 7, 2, -2, 0, -8, 1, 0, 0, 0, 0, 0, 0}));
  EXPECT_EQ(Floats(q->scales), (std::vector<float>{0.2001953125f, 1.0f, 1.0f, 0.0078125f}));
  // 7 · 0.2001953125 = 1.4013671875 -> bf16 1.3984375; -4 · s = -0.80078125 (exact).
  EXPECT_EQ(Floats(q->dequantized),
            (std::vector<float>{1.3984375f, -0.80078125f, 0.2001953125f, 0.0f, 7, 2, -2, 0, -8, 1,
                                0, 0, 0, 0, 0, 0}));
}

TEST(RtnTest, AsymmetricKnownValues) {
  GridOptions o;
  o.group_size = 4;
  o.symmetric = false;
  // mn = 0, mx = 3: s = bf16(0.2), zp = round(-8 - 0) = -8.
  // Second group: mn = -1, mx = 2: s = bf16(0.2) = 0.2001953125, zp = round(-8 + 4.995) = -3.
  at::Tensor w = Rows({0.0f, 1.5f, 3.0f, 0.75f, -1.0f, 2.0f, 0.5f, 0.0f}, 2);
  absl::StatusOr<QuantizedWeight> q = QuantizeRtn(w, o);
  ASSERT_TRUE(q.ok()) << q.status();
  ASSERT_TRUE(q->zero_points.defined());
  EXPECT_EQ(Ints(q->zero_points), (std::vector<int>{-8, -3}));
  EXPECT_EQ(Floats(q->scales), (std::vector<float>{0.2001953125f, 0.2001953125f}));
  // codes = round(w / s + zp): 0 -> -8, 7.49 - 8 -> -1, 14.985 - 8 -> 7, 3.746 - 8 -> -4;
  // -4.995 - 3 -> -8, 9.99 - 3 -> 7, 2.4976 - 3 -> -1 (-0.502), 0 - 3 -> -3.
  EXPECT_EQ(Ints(q->codes), (std::vector<int>{-8, -1, 7, -4, -8, 7, -1, -3}));
  const float s = 0.2001953125f;
  std::vector<float> expected;
  for (auto [c, z] : std::vector<std::pair<int, int>>{
           {-8, -8}, {-1, -8}, {7, -8}, {-4, -8}, {-8, -3}, {7, -3}, {-1, -3}, {-3, -3}}) {
    expected.push_back(RefBf16(static_cast<float>(c - z) * s));
  }
  EXPECT_EQ(Floats(q->dequantized), expected);
}

TEST(RtnTest, ZeroCodesDequantizeToPositiveZero) {
  // -0.1 rounds to code -0.0 in float; compressed-tensors' integer code 0 gives +0 (bits 0x0000).
  GridOptions o;
  o.group_size = 4;
  absl::StatusOr<QuantizedWeight> q = QuantizeRtn(Rows({7.5f, -0.1f, -0.4f, 0.2f}, 1), o);
  ASSERT_TRUE(q.ok());
  at::Tensor bits = q->dequantized.view(at::kShort);
  EXPECT_EQ(bits.index({0, 1}).item<int16_t>(), 0);
  EXPECT_EQ(bits.index({0, 2}).item<int16_t>(), 0);
}

TEST(RtnTest, ShortLastGroupAndPerChannel) {
  GridOptions o;
  o.group_size = 4;
  // 6 columns: groups [0, 4) and [4, 6); the second group's scale sees only columns 4 and 5.
  at::Tensor w = Rows({100.0f, 0, 0, 0, 0.75f, -0.15f}, 1);
  absl::StatusOr<QuantizedWeight> q = QuantizeRtn(w, o);
  ASSERT_TRUE(q.ok());
  ASSERT_EQ(q->scales.sizes(), at::IntArrayRef({1, 2}));
  EXPECT_EQ(Floats(q->scales)[1], RefBf16(0.75f / 7.5f));
  EXPECT_EQ(Ints(q->codes)[4], 7);

  o.group_size = 0;  // per-channel: one scale per row from the whole row
  q = QuantizeRtn(w, o);
  ASSERT_TRUE(q.ok());
  ASSERT_EQ(q->scales.sizes(), at::IntArrayRef({1, 1}));
  EXPECT_EQ(Floats(q->scales)[0], RefBf16(100.0f / 7.5f));
  EXPECT_EQ(Ints(q->codes)[4], 0);
}

TEST(RtnTest, MatchesScalarReferenceOnRandomWeights) {
  at::manual_seed(5);
  at::Tensor w = at::randn({9, 200});
  GridOptions o;
  o.group_size = 32;
  absl::StatusOr<QuantizedWeight> q = QuantizeRtn(w.to(at::kBFloat16), o);  // bf16 input works
  ASSERT_TRUE(q.ok());
  at::Tensor wb = w.to(at::kBFloat16).to(at::kFloat);
  std::vector<float> wv = Floats(wb), sv = Floats(q->scales), dv = Floats(q->dequantized);
  std::vector<int> cv = Ints(q->codes);
  for (int64_t r = 0; r < 9; ++r) {
    for (int64_t g = 0; g * 32 < 200; ++g) {
      float amax = 0;
      for (int64_t c = g * 32; c < std::min<int64_t>(200, (g + 1) * 32); ++c) {
        amax = std::max(amax, std::fabs(wv[r * 200 + c]));
      }
      const float s = RefBf16(amax / 7.5f);
      ASSERT_EQ(sv[r * 7 + g], s);
      for (int64_t c = g * 32; c < std::min<int64_t>(200, (g + 1) * 32); ++c) {
        const float code = std::clamp(std::nearbyint(wv[r * 200 + c] / s), -8.0f, 7.0f);
        ASSERT_EQ(cv[r * 200 + c], static_cast<int>(code));
        ASSERT_EQ(dv[r * 200 + c], RefBf16(code * s));
      }
    }
  }
}

TEST(RtnTest, RejectsBadInputsNamingTheField) {
  GridOptions o;
  at::Tensor w = at::randn({4, 8});
  w.index_put_({1, 2}, std::numeric_limits<float>::quiet_NaN());
  absl::StatusOr<QuantizedWeight> q = QuantizeRtn(w, o);
  ASSERT_FALSE(q.ok());
  EXPECT_EQ(q.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(q.status().message().find("NaN"), std::string::npos);
  EXPECT_FALSE(QuantizeRtn(at::randn({4}), o).ok());
  EXPECT_FALSE(QuantizeRtn(at::zeros({4, 8}, at::kInt), o).ok());
  o.group_size = -1;
  q = QuantizeRtn(at::randn({4, 8}), o);
  ASSERT_FALSE(q.ok());
  EXPECT_NE(q.status().message().find("group_size = -1"), std::string::npos);
  o.group_size = 128;
  o.bits = 9;
  EXPECT_FALSE(QuantizeRtn(at::randn({4, 8}), o).ok());
}

// Brute force over the documented candidate list for one group, in double: the chosen scale must
// be the argmin (ties keep the first, larger, candidate).
TEST(MseSearchTest, PicksTheBruteForceArgmin) {
  at::manual_seed(6);
  for (double norm : {2.0, 2.4}) {
    at::Tensor w = at::randn({16, 64});
    GridOptions o;
    o.group_size = 64;
    o.scale_search = ScaleSearch::kMse;
    o.mse_norm = norm;
    Grid grid = ComputeGrid(w, o);
    std::vector<float> wv = Floats(w), sv = Floats(grid.scales);
    int shrunk = 0;
    for (int64_t r = 0; r < 16; ++r) {
      float amax = 0;
      for (int64_t c = 0; c < 64; ++c) amax = std::max(amax, std::fabs(wv[r * 64 + c]));
      const float raw = amax / 7.5f;
      double best_loss = std::numeric_limits<double>::infinity();
      float best = 0;
      for (int k = 0; k < o.mse_grid_points; ++k) {
        const double p = 1.0 - k * (1.0 - o.mse_min_shrink) / (o.mse_grid_points - 1);
        const float s = RefBf16(k == 0 ? raw : raw * static_cast<float>(p));
        double loss = 0;
        for (int64_t c = 0; c < 64; ++c) {
          const float x = wv[r * 64 + c];
          const float code = std::clamp(std::nearbyint(x / s), -8.0f, 7.0f);
          loss += std::pow(std::fabs(static_cast<double>(RefBf16(code * s)) - x), norm);
        }
        if (loss < best_loss * (1 - 1e-9)) {
          best_loss = loss;
          best = s;
        }
      }
      EXPECT_EQ(sv[r], best) << "row " << r << " norm " << norm;
      shrunk += sv[r] < RefBf16(raw);
    }
    EXPECT_GT(shrunk, 8) << "the search should shrink most Gaussian groups";
  }
}

TEST(MseSearchTest, NeverWorseThanMinMaxAndReducesError) {
  at::manual_seed(7);
  at::Tensor w = at::randn({64, 512});
  for (bool symmetric : {true, false}) {
    GridOptions o;
    o.symmetric = symmetric;
    o.mse_norm = 2.0;
    absl::StatusOr<QuantizedWeight> minmax = QuantizeRtn(w, o);
    o.scale_search = ScaleSearch::kMse;
    absl::StatusOr<QuantizedWeight> mse = QuantizeRtn(w, o);
    ASSERT_TRUE(minmax.ok() && mse.ok());
    auto group_err = [&](const QuantizedWeight& q) {
      return (q.dequantized.to(at::kFloat) - w).square().reshape({64, 4, 128}).sum(-1);
    };
    at::Tensor a = group_err(*minmax), b = group_err(*mse);
    EXPECT_TRUE((b <= a * (1 + 1e-6)).all().item<bool>()) << "symmetric " << symmetric;
    EXPECT_LT(b.sum().item<double>(), 0.9 * a.sum().item<double>()) << "symmetric " << symmetric;
  }
}

}  // namespace
}  // namespace mq::quant
