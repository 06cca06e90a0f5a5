// CPU reference of the Hessian factorisation (mq/kernels/hessian_factor.h): the same steps as the
// GPU path — flip, lower Cholesky, lower triangular inverse, reverse + normalize — with plain
// loops in the input's precision.
#include "mq/kernels/hessian_factor.h"

#include <cmath>
#include <cstdint>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/hessian_factor_internal.h"

namespace mq::kernels {
namespace {

// `a` row-major n×n (symmetric). Returns 0 or the status code of the header.
template <typename T>
int Factor(T* a, int64_t n, float* u, bool feedback) {
  const int64_t total = n * n;
  for (int64_t idx = 0; idx < total / 2; ++idx) std::swap(a[idx], a[total - 1 - idx]);
  // Lower Cholesky (row-major here: L(i, j) at a[i·n + j], i ≥ j), right-looking.
  for (int64_t j = 0; j < n; ++j) {
    T d = a[j * n + j];
    for (int64_t k = 0; k < j; ++k) d -= a[j * n + k] * a[j * n + k];
    if (!(d > T(0)) || !std::isfinite(static_cast<double>(d))) return 1;
    const T ljj = std::sqrt(d);
    a[j * n + j] = ljj;
    for (int64_t i = j + 1; i < n; ++i) {
      T s = a[i * n + j];
      for (int64_t k = 0; k < j; ++k) s -= a[i * n + k] * a[j * n + k];
      a[i * n + j] = s / ljj;
    }
  }
  if (feedback) {
    // R[i][j] = L(n−1−i, n−1−j) / L(n−1−j, n−1−j) for j ≥ i (L row-major in a, lower part).
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        if (j < i) {
          u[i * n + j] = 0.0f;
          continue;
        }
        const double x = static_cast<double>(a[(n - 1 - i) * n + (n - 1 - j)]);
        const double d = static_cast<double>(a[(n - 1 - j) * n + (n - 1 - j)]);
        const double r = x / d;
        if (!std::isfinite(x) || !(d > 0.0) || !std::isfinite(r)) return 3;
        u[i * n + j] = static_cast<float>(r);
      }
    }
    return 0;
  }
  // Inverse of L, column by column (forward substitution against the identity).
  std::vector<T> inv(static_cast<size_t>(total), T(0));
  for (int64_t c = 0; c < n; ++c) {
    if (a[c * n + c] == T(0)) return 2;
    inv[c * n + c] = T(1) / a[c * n + c];
    for (int64_t r = c + 1; r < n; ++r) {
      T s = 0;
      for (int64_t k = c; k < r; ++k) s += a[r * n + k] * inv[k * n + c];
      inv[r * n + c] = -s / a[r * n + r];
    }
  }
  // U[i][j] = inv(n−1−i, n−1−j) / inv(n−1−i, n−1−i) for j ≥ i.
  for (int64_t i = 0; i < n; ++i) {
    const int64_t ip = n - 1 - i;
    const double d = static_cast<double>(inv[ip * n + ip]);
    for (int64_t j = 0; j < n; ++j) {
      if (j < i) {
        u[i * n + j] = 0.0f;
        continue;
      }
      const double x = static_cast<double>(inv[ip * n + (n - 1 - j)]);
      const double r = x / d;
      if (!std::isfinite(x) || !(d > 0.0) || !std::isfinite(r)) return 3;
      u[i * n + j] = static_cast<float>(r);
    }
  }
  return 0;
}

}  // namespace

absl::Status InverseFactorCpu(const InverseFactorArgs& args) {
  if (absl::Status s = ValidateInverseFactorArgs(args); !s.ok()) return s;
  const bool feedback = args.form == FactorForm::kCholeskyFeedback;
  const int code = args.dtype == FactorDtype::kFloat64
                       ? Factor(static_cast<double*>(args.a), args.n, args.u, feedback)
                       : Factor(static_cast<float*>(args.a), args.n, args.u, feedback);
  switch (code) {
    case 0:
      return absl::OkStatus();
    case 1:
      return absl::FailedPreconditionError(
          absl::StrCat("not positive definite (code 1): the Cholesky factorisation of the ", args.n,
                       "x", args.n, " matrix failed"));
    case 2:
      return absl::FailedPreconditionError("not positive definite (code 2): singular factor");
    default:
      return absl::FailedPreconditionError(
          "not positive definite (code 3): non-finite value or non-positive diagonal in U");
  }
}

}  // namespace mq::kernels
