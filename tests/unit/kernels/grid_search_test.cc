// CPU reference of the MSE grid search (kernels/cpu/grid_search.cc): argument checks, hand-worked
// groups, and bit-for-bit agreement with an independent whole-matrix implementation of the
// documented search (tests/unit/kernels/grid_search_ref_util.h) over shapes, bit widths, norms
// and candidate counts.
#include "mq/kernels/grid_search.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/unit/kernels/grid_search_ref_util.h"

namespace mq::kernels {
namespace {

using testing_util::Bf16;
using testing_util::ExactLoss;
using testing_util::GridPoint;
using testing_util::RandomWeights;
using testing_util::RefSearch;

struct Output {
  std::vector<float> scales, zeros;
};

absl::Status RunCpu(const std::vector<float>& w, int64_t rows, int64_t cols,
                    const GridSearchConfig& c, Output* out, int threads = 0) {
  const int64_t groups = GridSearchGroups(cols, c.group_size);
  out->scales.assign(rows * groups, -1.0f);
  out->zeros.assign(c.symmetric ? 0 : rows * groups, -100.0f);
  GridSearchArgs a;
  a.w = w.data();
  a.rows = rows;
  a.cols = cols;
  a.config = c;
  a.scales = out->scales.data();
  a.zero_points = c.symmetric ? nullptr : out->zeros.data();
  return GridSearchCpu(a, threads);
}

void ExpectMessage(const absl::Status& s, const std::string& text) {
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find(text), std::string::npos) << s << " should mention " << text;
}

TEST(GridSearchCpuTest, RejectsBadArguments) {
  std::vector<float> w(32, 1.0f), s(8), z(8);
  GridSearchArgs good;
  good.w = w.data();
  good.rows = 4;
  good.cols = 8;
  good.config.group_size = 8;
  good.scales = s.data();
  ASSERT_TRUE(GridSearchCpu(good).ok());

  auto with = [&](auto change) {
    GridSearchArgs a = good;
    change(a);
    return GridSearchCpu(a);
  };
  ExpectMessage(with([](GridSearchArgs& a) { a.config.group_size = 0; }), "group_size = 0");
  ExpectMessage(with([](GridSearchArgs& a) { a.config.bits = 1; }), "bits = 1");
  ExpectMessage(with([](GridSearchArgs& a) { a.config.bits = 9; }), "bits = 9");
  ExpectMessage(with([](GridSearchArgs& a) { a.config.n_points = 1; }), "n_points = 1");
  ExpectMessage(with([](GridSearchArgs& a) { a.config.min_shrink = 0.0; }), "min_shrink = 0");
  ExpectMessage(with([](GridSearchArgs& a) { a.config.min_shrink = 1.5; }), "min_shrink = 1.5");
  ExpectMessage(with([](GridSearchArgs& a) { a.config.norm = 0.0; }), "norm = 0");
  ExpectMessage(with([](GridSearchArgs& a) { a.config.norm = std::nan(""); }), "norm = nan");
  ExpectMessage(with([](GridSearchArgs& a) { a.rows = -1; }), "rows = -1");
  ExpectMessage(with([](GridSearchArgs& a) { a.cols = -2; }), "cols = -2");
  ExpectMessage(with([](GridSearchArgs& a) { a.cols = int64_t{1} << 31; }), "cols = 2147483648");
  ExpectMessage(with([](GridSearchArgs& a) { a.w = nullptr; }), "w is null");
  ExpectMessage(with([](GridSearchArgs& a) { a.scales = nullptr; }), "scales is null");
  ExpectMessage(with([](GridSearchArgs& a) { a.config.symmetric = false; }), "zero_points is null");
  ExpectMessage(with([&](GridSearchArgs& a) { a.zero_points = z.data(); }), "zero_points is set");
  // The launcher checks its arguments before anything CUDA, in any build.
  GridSearchArgs bad = good;
  bad.config.bits = 9;
  ExpectMessage(LaunchGridSearch(bad, nullptr), "bits = 9");
}

TEST(GridSearchCpuTest, EmptyMatrixIsANoOp) {
  GridSearchArgs a;
  a.rows = 0;
  a.cols = 16;
  EXPECT_TRUE(GridSearchCpu(a).ok());
  a.rows = 3;
  a.cols = 0;
  EXPECT_TRUE(GridSearchCpu(a).ok());
  EXPECT_TRUE(LaunchGridSearch(a, nullptr).ok());
  EXPECT_EQ(GridSearchGroups(0, 128), 0);
  EXPECT_EQ(GridSearchGroups(300, 128), 3);
  EXPECT_EQ(GridSearchGroups(7168, 7168), 1);
}

// With every candidate equal (min_shrink 1) the result is the min-max grid, worked by hand.
TEST(GridSearchCpuTest, MinMaxGridByHand) {
  const std::vector<float> w = {1.0f,  -3.0f, 0.5f,  2.0f,  // absmax 3
                                0.0f,  0.0f,  0.0f,  0.0f,  // all zero: eps
                                -1.0f, 3.0f,  0.25f, 0.0f};
  GridSearchConfig c;
  c.group_size = 4;
  c.n_points = 2;
  c.min_shrink = 1.0;
  Output out;
  ASSERT_TRUE(RunCpu(w, 3, 4, c, &out).ok());
  EXPECT_EQ(out.scales[0], Bf16(3.0f / 7.5f));
  EXPECT_EQ(out.scales[0], 0.400390625f);
  EXPECT_EQ(out.scales[1], 0.0078125f);
  EXPECT_EQ(out.scales[2], Bf16(3.0f / 7.5f));

  c.symmetric = false;
  ASSERT_TRUE(RunCpu(w, 3, 4, c, &out).ok());
  // Row 0: lo = -3, hi = 2, s = bf16(5 / 15), z = clamp(rint(-8 + 3 / s)) = -8 + 9 = 1.
  const float s0 = Bf16(5.0f / 15.0f);
  EXPECT_EQ(out.scales[0], s0);
  EXPECT_EQ(out.zeros[0], std::nearbyint(-8.0f - (-3.0f / s0)));
  EXPECT_EQ(out.zeros[0], 1.0f);
  EXPECT_EQ(out.scales[1], 0.0078125f);
  EXPECT_EQ(out.zeros[1], -8.0f);  // lo = 0: z = qmin
  const float s2 = Bf16(4.0f / 15.0f);
  EXPECT_EQ(out.scales[2], s2);
  EXPECT_EQ(out.zeros[2], std::nearbyint(-8.0f + 1.0f / s2));
}

// Gaussian groups: the search moves most of them off min-max (a shrunk range rounds the bulk of
// the values more finely), and never to a worse loss.
TEST(GridSearchCpuTest, ShrinksGaussianGroupsAndNeverLosesToMinMax) {
  const int64_t rows = 32, cols = 256;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  std::vector<float> w(rows * cols);
  for (float& v : w) v = nd(rng);
  for (bool symmetric : {true, false}) {
    GridSearchConfig c;
    c.symmetric = symmetric;
    Output out;
    ASSERT_TRUE(RunCpu(w, rows, cols, c, &out).ok());
    int shrunk = 0;
    double total_first = 0, total_chosen = 0;
    for (int64_t i = 0; i < rows * 2; ++i) {
      const float* x = &w[i * 128];
      const GridPoint first = testing_util::RefCandidates(x, 128, c)[0];
      const GridPoint chosen{out.scales[i], symmetric ? 0.0f : out.zeros[i]};
      const double l_first = ExactLoss(x, 128, first, c), l_chosen = ExactLoss(x, 128, chosen, c);
      EXPECT_LE(l_chosen, l_first * (1 + 1e-6)) << "set " << i << " symmetric " << symmetric;
      shrunk += chosen.s < first.s;
      total_first += l_first;
      total_chosen += l_chosen;
    }
    EXPECT_GT(shrunk, rows) << "symmetric " << symmetric;
    EXPECT_LT(total_chosen, 0.95 * total_first) << "symmetric " << symmetric;
  }
}

struct Case {
  int64_t rows, cols, group_size;
  int bits;
  bool symmetric;
  double norm;
  int n_points = 80;
  double min_shrink = 0.2;
};

class GridSearchCpuMatchTest : public testing::TestWithParam<Case> {};

TEST_P(GridSearchCpuMatchTest, MatchesIndependentImplementation) {
  const Case& k = GetParam();
  GridSearchConfig c;
  c.group_size = k.group_size;
  c.bits = k.bits;
  c.symmetric = k.symmetric;
  c.norm = k.norm;
  c.n_points = k.n_points;
  c.min_shrink = k.min_shrink;
  const std::vector<float> w =
      RandomWeights(k.rows, k.cols, static_cast<uint32_t>(k.cols * 31 + k.group_size + k.bits));
  Output out;
  ASSERT_TRUE(RunCpu(w, k.rows, k.cols, c, &out).ok());
  std::vector<float> want_s, want_z;
  RefSearch(w, k.rows, k.cols, c, &want_s, &want_z);
  ASSERT_EQ(out.scales.size(), want_s.size());
  int64_t shrunk = 0;
  const int64_t groups = GridSearchGroups(k.cols, k.group_size);
  for (size_t i = 0; i < want_s.size(); ++i) {
    ASSERT_EQ(out.scales[i], want_s[i]) << "set " << i;
    if (!k.symmetric) {
      ASSERT_EQ(out.zeros[i], want_z[i]) << "set " << i;
    }
    const int64_t r = static_cast<int64_t>(i) / groups, g = static_cast<int64_t>(i) % groups;
    const GridPoint first = testing_util::RefCandidates(
        &w[r * k.cols + g * k.group_size], std::min(k.group_size, k.cols - g * k.group_size), c)[0];
    shrunk += out.scales[i] != first.s;
  }
  // With few levels and a fine candidate list most Gaussian groups gain from some shrinking (at
  // 8 bits, or with only p = 1 and 0.5, min-max usually stays best).
  if (k.bits <= 4 && k.n_points >= 10 && k.min_shrink < 1.0 && k.group_size >= 32 &&
      k.rows * groups >= 16) {
    EXPECT_GT(shrunk, 0) << "the search should move some groups off min-max";
  }
  // The thread count does not change the result.
  Output one;
  ASSERT_TRUE(RunCpu(w, k.rows, k.cols, c, &one, 1).ok());
  EXPECT_EQ(one.scales, out.scales);
  EXPECT_EQ(one.zeros, out.zeros);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, GridSearchCpuMatchTest,
    testing::Values(Case{16, 512, 128, 4, true, 2.4}, Case{16, 512, 128, 4, false, 2.4},
                    Case{9, 300, 128, 4, true, 2.0},  // short last group (44)
                    Case{9, 300, 128, 4, false, 2.0}, Case{7, 200, 64, 8, true, 2.4},
                    Case{7, 200, 64, 8, false, 2.4}, Case{6, 1000, 1000, 4, true, 2.4},  // channel
                    Case{6, 1000, 1000, 4, false, 2.0}, Case{5, 50, 64, 4, true, 2.4},   // G > cols
                    Case{8, 96, 32, 2, false, 2.4}, Case{8, 96, 32, 3, true, 1.0},
                    Case{6, 64, 1, 4, false, 2.4},  // one column per group
                    Case{12, 256, 128, 4, true, 2.4, 2, 0.5},
                    Case{12, 256, 128, 4, false, 3.0, 33, 0.1},
                    Case{12, 256, 128, 4, true, 2.0, 80, 1.0}));

}  // namespace
}  // namespace mq::kernels
