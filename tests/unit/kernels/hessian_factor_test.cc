// CPU reference of the Hessian factorisation against the definition: U is the upper Cholesky
// factor of H⁻¹ (H⁻¹ = Uᵀ·U) with rows divided by their diagonal, computed here independently
// through Gauss–Jordan inversion and a Cholesky of H⁻¹.
#include "mq/kernels/hessian_factor.h"

#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace mq::kernels {
namespace {

// A random symmetric positive definite matrix X·Xᵀ/m + damp·I (row-major n×n).
std::vector<double> RandomSpd(int64_t n, int64_t m, double damp, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  std::vector<double> x(static_cast<size_t>(n * m));
  for (double& v : x) v = normal(rng);
  std::vector<double> h(static_cast<size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t k = 0; k < m; ++k) s += x[i * m + k] * x[j * m + k];
      h[i * n + j] = s / m + (i == j ? damp : 0.0);
    }
  }
  return h;
}

std::vector<double> Expected(const std::vector<double>& h, int64_t n) {
  // Gauss–Jordan with partial pivoting.
  std::vector<double> a = h, inv(static_cast<size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i) inv[i * n + i] = 1.0;
  for (int64_t c = 0; c < n; ++c) {
    int64_t p = c;
    for (int64_t r = c + 1; r < n; ++r) {
      if (std::fabs(a[r * n + c]) > std::fabs(a[p * n + c])) p = r;
    }
    for (int64_t k = 0; k < n; ++k) {
      std::swap(a[c * n + k], a[p * n + k]);
      std::swap(inv[c * n + k], inv[p * n + k]);
    }
    const double d = a[c * n + c];
    for (int64_t k = 0; k < n; ++k) {
      a[c * n + k] /= d;
      inv[c * n + k] /= d;
    }
    for (int64_t r = 0; r < n; ++r) {
      if (r == c) continue;
      const double f = a[r * n + c];
      for (int64_t k = 0; k < n; ++k) {
        a[r * n + k] -= f * a[c * n + k];
        inv[r * n + k] -= f * inv[c * n + k];
      }
    }
  }
  // Upper Cholesky R of inv (inv = Rᵀ·R), row by row.
  std::vector<double> r(static_cast<size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    double d = inv[i * n + i];
    for (int64_t k = 0; k < i; ++k) d -= r[k * n + i] * r[k * n + i];
    r[i * n + i] = std::sqrt(d);
    for (int64_t j = i + 1; j < n; ++j) {
      double s = inv[i * n + j];
      for (int64_t k = 0; k < i; ++k) s -= r[k * n + i] * r[k * n + j];
      r[i * n + j] = s / r[i * n + i];
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const double d = r[i * n + i];
    for (int64_t j = 0; j < n; ++j) r[i * n + j] /= d;
  }
  return r;
}

TEST(InverseFactorCpuTest, MatchesDefinitionInBothPrecisions) {
  for (int64_t n : {1, 2, 7, 64, 130}) {
    SCOPED_TRACE(n);
    const std::vector<double> h = RandomSpd(n, n / 2 + 3, 0.05, static_cast<uint32_t>(n));
    const std::vector<double> want = Expected(h, n);
    for (FactorDtype dtype : {FactorDtype::kFloat64, FactorDtype::kFloat32}) {
      std::vector<double> a64 = h;
      std::vector<float> a32(h.begin(), h.end());
      std::vector<float> u(static_cast<size_t>(n * n), -1.0f);
      InverseFactorArgs args;
      args.n = n;
      args.dtype = dtype;
      args.a = dtype == FactorDtype::kFloat64 ? static_cast<void*>(a64.data()) : a32.data();
      args.u = u.data();
      ASSERT_TRUE(InverseFactorCpu(args).ok());
      const double tol = dtype == FactorDtype::kFloat64 ? 1e-6 : 2e-2;
      double worst = 0;
      for (int64_t i = 0; i < n; ++i) {
        EXPECT_EQ(u[i * n + i], 1.0f);
        for (int64_t j = 0; j < i; ++j) ASSERT_EQ(u[i * n + j], 0.0f);
        for (int64_t j = i; j < n; ++j) {
          worst = std::max(worst, std::fabs(u[i * n + j] - want[i * n + j]));
        }
      }
      EXPECT_LT(worst, tol) << "dtype " << static_cast<int>(dtype);
    }
  }
}

// The feedback form is the inverse of the row-normalized factor: R · Ũ = I.
TEST(InverseFactorCpuTest, FeedbackFormIsTheInverseOfTheNormalizedFactor) {
  for (int64_t n : {1, 9, 100}) {
    SCOPED_TRACE(n);
    const std::vector<double> h = RandomSpd(n, n / 2 + 3, 0.05, static_cast<uint32_t>(n) + 40);
    const std::vector<double> u = Expected(h, n);
    std::vector<double> a = h;
    std::vector<float> r(static_cast<size_t>(n * n), -1.0f);
    InverseFactorArgs args;
    args.n = n;
    args.form = FactorForm::kCholeskyFeedback;
    args.a = a.data();
    args.u = r.data();
    ASSERT_TRUE(InverseFactorCpu(args).ok());
    double worst = 0;
    for (int64_t i = 0; i < n; ++i) {
      EXPECT_EQ(r[i * n + i], 1.0f);
      for (int64_t j = 0; j < n; ++j) {
        if (j < i) {
          ASSERT_EQ(r[i * n + j], 0.0f);
        }
        double s = 0;
        for (int64_t k = 0; k < n; ++k) s += r[i * n + k] * u[k * n + j];
        worst = std::max(worst, std::fabs(s - (i == j ? 1.0 : 0.0)));
      }
    }
    EXPECT_LT(worst, 1e-4);
  }
}

TEST(InverseFactorCpuTest, NotPositiveDefiniteIsAnError) {
  const int64_t n = 3;
  std::vector<double> a = {1, 2, 0, 2, 1, 0, 0, 0, 1};  // eigenvalues 3, -1, 1
  std::vector<float> u(9);
  InverseFactorArgs args;
  args.n = n;
  args.a = a.data();
  args.u = u.data();
  absl::Status s = InverseFactorCpu(args);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("not positive definite"), std::string::npos) << s;
}

TEST(InverseFactorCpuTest, BadArgumentsNameTheArgument) {
  std::vector<double> a(4, 1.0);
  std::vector<float> u(4);
  InverseFactorArgs args;
  args.n = 0;
  args.a = a.data();
  args.u = u.data();
  EXPECT_NE(InverseFactorCpu(args).message().find("n = 0"), std::string::npos);
  args.n = 2;
  args.a = nullptr;
  EXPECT_NE(InverseFactorCpu(args).message().find("a is null"), std::string::npos);
  args.a = a.data();
  args.u = nullptr;
  EXPECT_NE(InverseFactorCpu(args).message().find("u is null"), std::string::npos);
  // The GPU launcher checks the same and also wants the status word.
  args.u = u.data();
  EXPECT_NE(LaunchInverseFactor(args, a.data(), 0, nullptr).message().find("status is null"),
            std::string::npos);
}

TEST(InverseFactorCpuTest, WorkspaceQueryRejectsBadSize) {
  size_t bytes = 0;
  EXPECT_EQ(InverseFactorWorkspaceBytes(-3, FactorDtype::kFloat64, &bytes).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mq::kernels
