// Test helpers for the GPTQ kernel tests: a random problem in the kernel's layout with factors
// computed in double on the host (no torch).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

namespace mq::kernels::testing_util {

struct GptqProblem {
  int64_t batch, rows, cols, group_size;
  int bits = 4;
  std::vector<std::vector<float>> u;       // per factor [I, I]
  std::vector<std::vector<int32_t>> perm;  // per factor [I]
  std::vector<int> factor_of;              // [B]
  std::vector<float> wt;                   // [B, I, O]
  std::vector<float> scales_t, zeros_t;    // [B, G, O]
};

// Normalized upper factor U of H⁻¹ (rows divided by their diagonal) for H = X Xᵀ/n + damp·I with
// correlated random X, via one Cholesky of the reversed H and a triangular inverse.
inline std::vector<float> RandomFactor(int64_t n, std::mt19937& rng) {
  std::normal_distribution<double> nd;
  const int64_t tokens = 2 * n;
  std::vector<double> x(n * tokens), h(n * n, 0.0);
  for (auto& v : x) v = nd(rng);
  for (int64_t i = 1; i < n; ++i) {  // correlate neighbouring inputs
    for (int64_t t = 0; t < tokens; ++t) x[i * tokens + t] += 0.7 * x[(i - 1) * tokens + t];
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      double s = 0;
      for (int64_t t = 0; t < tokens; ++t) s += x[i * tokens + t] * x[j * tokens + t];
      h[i * n + j] = h[j * n + i] = s / tokens;
    }
  }
  double mean = 0;
  for (int64_t i = 0; i < n; ++i) mean += h[i * n + i] / n;
  for (int64_t i = 0; i < n; ++i) h[i * n + i] += 0.05 * mean;
  // Reversed: R[i][j] = H[n-1-i][n-1-j]; lower Cholesky L of R.
  std::vector<double> l(n * n, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      double s = h[(n - 1 - i) * n + (n - 1 - j)];
      for (int64_t k = 0; k < j; ++k) s -= l[i * n + k] * l[j * n + k];
      l[i * n + j] = i == j ? std::sqrt(s) : s / l[j * n + j];
    }
  }
  // M = L⁻¹ (lower).
  std::vector<double> m(n * n, 0.0);
  for (int64_t j = 0; j < n; ++j) {
    m[j * n + j] = 1.0 / l[j * n + j];
    for (int64_t i = j + 1; i < n; ++i) {
      double s = 0;
      for (int64_t k = j; k < i; ++k) s += l[i * n + k] * m[k * n + j];
      m[i * n + j] = -s / l[i * n + i];
    }
  }
  // U[i][j] = M[n-1-i][n-1-j] (upper), rows normalized by the diagonal.
  std::vector<float> u(n * n, 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    const double d = m[(n - 1 - i) * n + (n - 1 - i)];
    for (int64_t j = i; j < n; ++j)
      u[i * n + j] = static_cast<float>(m[(n - 1 - i) * n + (n - 1 - j)] / d);
  }
  return u;
}

inline float Bf16(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  b += 0x7FFFu + ((b >> 16) & 1u);
  b &= 0xFFFF0000u;
  std::memcpy(&x, &b, 4);
  return x;
}

inline GptqProblem MakeProblem(int64_t batch, int64_t rows, int64_t cols, int64_t group_size,
                               int factors, bool asym, uint32_t seed) {
  std::mt19937 rng(seed);
  GptqProblem p;
  p.batch = batch;
  p.rows = rows;
  p.cols = cols;
  p.group_size = group_size;
  for (int f = 0; f < factors; ++f) {
    p.u.push_back(RandomFactor(cols, rng));
    std::vector<int32_t> perm(cols);
    for (int64_t i = 0; i < cols; ++i) perm[i] = static_cast<int32_t>(i);
    std::shuffle(perm.begin(), perm.end(), rng);
    p.perm.push_back(perm);
  }
  for (int64_t b = 0; b < batch; ++b) p.factor_of.push_back(static_cast<int>(b % factors));
  std::normal_distribution<float> nd(0.0f, 0.02f);
  p.wt.resize(batch * cols * rows);
  for (auto& v : p.wt) v = nd(rng);
  const int64_t groups = (cols + group_size - 1) / group_size;
  std::uniform_real_distribution<float> sd(0.004f, 0.012f);
  p.scales_t.resize(batch * groups * rows);
  for (auto& v : p.scales_t) v = Bf16(sd(rng));
  if (asym) {
    std::uniform_int_distribution<int> zd(-2, 2);
    p.zeros_t.resize(p.scales_t.size());
    for (auto& v : p.zeros_t) v = static_cast<float>(zd(rng));
  }
  return p;
}

// The Cholesky-feedback form of a problem: every factor U (unit upper) replaced by R = U⁻¹
// (unit upper, back substitution in fp64), the factor the feedback form of the solve reads.
inline GptqProblem FeedbackForm(GptqProblem p) {
  const int64_t n = p.cols;
  for (std::vector<float>& u : p.u) {
    std::vector<double> r(static_cast<size_t>(n * n), 0.0);
    for (int64_t c = 0; c < n; ++c) {  // column c of R: solve U · r_c = e_c upward
      r[c * n + c] = 1.0;
      for (int64_t i = c - 1; i >= 0; --i) {
        double s = 0;
        for (int64_t k = i + 1; k <= c; ++k) s += static_cast<double>(u[i * n + k]) * r[k * n + c];
        r[i * n + c] = -s;  // U has a unit diagonal
      }
    }
    for (int64_t i = 0; i < n * n; ++i) u[i] = static_cast<float>(r[i]);
  }
  return p;
}

}  // namespace mq::kernels::testing_util
