// CPU reference of the batched GPTQ solve (kernels/cpu/gptq.cc): argument checks, RTN when U is
// the identity, and agreement with an unblocked fp64 GPTQ (the lazy-batch update is exact
// algebra, so only rounding may flip a code).
#include "mq/kernels/gptq.h"

#include <cmath>
#include <cstdio>
#include <vector>

#include "gtest/gtest.h"
#include "tests/unit/kernels/gptq_ref_util.h"

namespace mq::kernels {
namespace {

using testing_util::Bf16;
using testing_util::GptqProblem;
using testing_util::MakeProblem;

struct Bound {
  std::vector<const float*> u;
  std::vector<const int32_t*> perm;
  std::vector<float> wt;
  std::vector<int8_t> codes;
  GptqSolveArgs args;
};

Bound Bind(const GptqProblem& p) {
  Bound b;
  b.wt = p.wt;
  b.codes.assign(p.wt.size(), 127);
  for (int64_t i = 0; i < p.batch; ++i) {
    b.u.push_back(p.u[p.factor_of[i]].data());
    b.perm.push_back(p.perm[p.factor_of[i]].data());
  }
  b.args.batch = p.batch;
  b.args.rows = p.rows;
  b.args.cols = p.cols;
  b.args.group_size = p.group_size;
  b.args.bits = p.bits;
  b.args.wt = b.wt.data();
  b.args.u = b.u.data();
  b.args.perm = b.perm.data();
  b.args.scales_t = p.scales_t.data();
  b.args.zeros_t = p.zeros_t.empty() ? nullptr : p.zeros_t.data();
  b.args.codes_t = b.codes.data();
  return b;
}

TEST(GptqCpuTest, RejectsBadArguments) {
  GptqSolveArgs a;
  EXPECT_TRUE(GptqSolveCpu(a).ok());  // batch 0
  a.batch = 1;
  a.rows = 4;
  a.cols = 8;
  a.group_size = 0;
  EXPECT_EQ(GptqSolveCpu(a).code(), absl::StatusCode::kInvalidArgument);
  a.group_size = 8;
  absl::Status s = GptqSolveCpu(a);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("wt"), std::string::npos) << s;
}

TEST(GptqCpuTest, IdentityFactorIsRoundToNearest) {
  GptqProblem p = MakeProblem(2, 16, 200, 64, 1, /*asym=*/true, 3);
  for (auto& v : p.u[0]) v = 0.0f;
  for (int64_t i = 0; i < p.cols; ++i) p.u[0][i * p.cols + i] = 1.0f;
  Bound b = Bind(p);
  ASSERT_TRUE(GptqSolveCpu(b.args).ok());
  const int64_t groups = (p.cols + p.group_size - 1) / p.group_size;
  for (int64_t m = 0; m < p.batch; ++m) {
    for (int64_t t = 0; t < p.cols; ++t) {
      const int64_t g = p.perm[0][t] / p.group_size;
      for (int64_t o = 0; o < p.rows; ++o) {
        const float s = p.scales_t[(m * groups + g) * p.rows + o];
        const float z = p.zeros_t[(m * groups + g) * p.rows + o];
        const float q = std::fmin(
            std::fmax(std::nearbyint(p.wt[(m * p.cols + t) * p.rows + o] / s + z), -8.f), 7.f);
        ASSERT_EQ(b.codes[(m * p.cols + t) * p.rows + o], static_cast<int8_t>(q));
      }
    }
  }
}

TEST(GptqCpuTest, MatchesUnblockedGptq) {
  for (bool asym : {false, true}) {
    GptqProblem p = MakeProblem(2, 24, 300, 128, 2, asym, 5 + asym);
    Bound b = Bind(p);
    ASSERT_TRUE(GptqSolveCpu(b.args).ok());
    const int64_t groups = (p.cols + p.group_size - 1) / p.group_size;
    int64_t diff = 0;
    for (int64_t m = 0; m < p.batch; ++m) {
      const std::vector<float>& u = p.u[p.factor_of[m]];
      const std::vector<int32_t>& perm = p.perm[p.factor_of[m]];
      for (int64_t o = 0; o < p.rows; ++o) {
        std::vector<double> w(p.cols);
        for (int64_t t = 0; t < p.cols; ++t) w[t] = p.wt[(m * p.cols + t) * p.rows + o];
        for (int64_t t = 0; t < p.cols; ++t) {
          const int64_t g = perm[t] / p.group_size;
          const float s = p.scales_t[(m * groups + g) * p.rows + o];
          const float z = asym ? p.zeros_t[(m * groups + g) * p.rows + o] : 0.f;
          const float q =
              std::fmin(std::fmax(std::nearbyint(static_cast<float>(w[t]) / s + z), -8.f), 7.f);
          const double e = w[t] - Bf16((q - z) * s);
          for (int64_t k = t + 1; k < p.cols; ++k) w[k] -= u[t * p.cols + k] * e;
          diff += b.codes[(m * p.cols + t) * p.rows + o] != static_cast<int8_t>(q);
        }
      }
    }
    const double frac = static_cast<double>(diff) / (p.batch * p.rows * p.cols);
    EXPECT_LT(frac, 2e-2) << "asym " << asym;
    for (int8_t c : b.codes) ASSERT_TRUE(c >= -8 && c <= 7);
  }
}

// The Cholesky-feedback form (R = U⁻¹, errors against the original weights) is the same
// algorithm: only rounding may flip a code.
TEST(GptqCpuTest, FeedbackFormMatchesInverseForm) {
  for (bool asym : {false, true}) {
    const GptqProblem p = MakeProblem(3, 40, 300, 64, 2, asym, 21 + asym);
    Bound inverse = Bind(p);
    ASSERT_TRUE(GptqSolveCpu(inverse.args).ok());
    const GptqProblem f = testing_util::FeedbackForm(p);
    Bound feedback = Bind(f);
    const std::vector<float> w0 = p.wt;
    feedback.args.w0 = w0.data();
    ASSERT_TRUE(GptqSolveCpu(feedback.args).ok());
    int64_t diff = 0;
    for (size_t i = 0; i < inverse.codes.size(); ++i) {
      ASSERT_TRUE(feedback.codes[i] >= -8 && feedback.codes[i] <= 7);
      diff += inverse.codes[i] != feedback.codes[i];
    }
    const double frac = static_cast<double>(diff) / inverse.codes.size();
    std::printf("asym %d: %lld of %zu codes differ between the two forms\n", asym,
                static_cast<long long>(diff), inverse.codes.size());
    EXPECT_LT(frac, 5e-3) << "asym " << asym;
    // Not the trivial agreement of RTN: the feedback changed codes.
    int64_t changed = 0;
    const int64_t groups = (p.cols + p.group_size - 1) / p.group_size;
    for (int64_t m = 0; m < p.batch; ++m) {
      for (int64_t t = 0; t < p.cols; ++t) {
        const int64_t g = p.perm[p.factor_of[m]][t] / p.group_size;
        for (int64_t o = 0; o < p.rows; ++o) {
          const float s = p.scales_t[(m * groups + g) * p.rows + o];
          const float z = asym ? p.zeros_t[(m * groups + g) * p.rows + o] : 0.f;
          const float q = std::fmin(
              std::fmax(std::nearbyint(p.wt[(m * p.cols + t) * p.rows + o] / s + z), -8.f), 7.f);
          changed += feedback.codes[(m * p.cols + t) * p.rows + o] != static_cast<int8_t>(q);
        }
      }
    }
    EXPECT_GT(changed, static_cast<int64_t>(feedback.codes.size() / 20));
  }
}

}  // namespace
}  // namespace mq::kernels
