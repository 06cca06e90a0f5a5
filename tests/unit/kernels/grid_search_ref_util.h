// Test helpers for the grid search kernel tests: an independent, straightforward implementation
// of the documented search (whole-matrix passes per candidate, the way the ATen code in
// worker/quant/grid.cc is written), candidate lists, exact losses and random weights (no torch).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "mq/kernels/grid_search.h"

namespace mq::kernels::testing_util {

inline float Bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  float y;
  std::memcpy(&y, &u, 4);
  return y;
}

inline float QMinF(int bits) { return -std::ldexp(1.0f, bits - 1); }
inline float QMaxF(int bits) { return std::ldexp(1.0f, bits - 1) - 1.0f; }

struct GridPoint {
  float s = 0, z = 0;
  bool operator==(const GridPoint& o) const {
    return std::memcmp(&s, &o.s, 4) == 0 && std::memcmp(&z, &o.z, 4) == 0;
  }
};

// Candidate k of a group with min mn <= 0 and max mx >= 0 (grid_search.h's formulas).
inline GridPoint RefCandidate(float mn, float mx, int k, const GridSearchConfig& c) {
  const float qmin = QMinF(c.bits), qmax = QMaxF(c.bits);
  const float p = static_cast<float>(1.0 - k * (1.0 - c.min_shrink) / (c.n_points - 1));
  float raw;
  GridPoint g;
  if (c.symmetric) {
    volatile float unshrunk = std::max(-mn, mx) / ((qmax - qmin) / 2.0f);
    raw = unshrunk * p;
  } else {
    volatile float lo = mn * p, hi = mx * p;
    raw = (hi - lo) / (qmax - qmin);
  }
  g.s = Bf16(raw);
  if (!(std::fabs(g.s) >= 1.17549435e-38f)) g.s = 0.0078125f;
  if (!c.symmetric) {
    volatile float lo = mn * p;
    g.z = std::min(qmax, std::max(qmin, std::nearbyint(qmin - lo / g.s)));
  }
  return g;
}

// fp32 term of one element (grid_search.h's loss term).
inline float RefTerm(float x, const GridPoint& g, const GridSearchConfig& c) {
  const float qmin = QMinF(c.bits), qmax = QMaxF(c.bits);
  volatile float q = x / g.s;
  const float code = std::min(qmax, std::max(qmin, std::nearbyint(q + g.z)));
  volatile float prod = (code - g.z) * g.s;
  const float e = std::fabs(Bf16(prod) - x);
  return c.norm == 2.0 ? e * e : std::pow(e, static_cast<float>(c.norm));
}

// Group [g·G, min((g+1)·G, cols)) of row r: min(min, 0) and max(max, 0).
inline void RefMinMax(const float* x, int64_t len, float* mn, float* mx) {
  *mn = 0;
  *mx = 0;
  for (int64_t i = 0; i < len; ++i) {
    *mn = std::min(*mn, x[i]);
    *mx = std::max(*mx, x[i]);
  }
}

// All n_points candidates of one group.
inline std::vector<GridPoint> RefCandidates(const float* x, int64_t len,
                                            const GridSearchConfig& c) {
  float mn, mx;
  RefMinMax(x, len, &mn, &mx);
  std::vector<GridPoint> out;
  for (int k = 0; k < c.n_points; ++k) out.push_back(RefCandidate(mn, mx, k, c));
  return out;
}

// Σ |dq - x|^norm over a group in double from the exact error (for judging near-ties).
inline double ExactLoss(const float* x, int64_t len, const GridPoint& g,
                        const GridSearchConfig& c) {
  const float qmin = QMinF(c.bits), qmax = QMaxF(c.bits);
  double loss = 0;
  for (int64_t i = 0; i < len; ++i) {
    volatile float q = x[i] / g.s;
    const float code = std::min(qmax, std::max(qmin, std::nearbyint(q + g.z)));
    volatile float prod = (code - g.z) * g.s;
    loss += std::pow(std::fabs(static_cast<double>(Bf16(prod)) - x[i]), c.norm);
  }
  return loss;
}

// The search over a whole [rows, cols] matrix, one pass per candidate: candidate grids of every
// group, then every element's term accumulated (in double, column order) into its group's loss,
// then a masked update of the best (strictly smaller loss wins).
inline void RefSearch(const std::vector<float>& w, int64_t rows, int64_t cols,
                      const GridSearchConfig& c, std::vector<float>* scales,
                      std::vector<float>* zeros) {
  const int64_t gs = c.group_size;
  const int64_t groups = (cols + gs - 1) / gs;
  std::vector<float> mn(rows * groups), mx(rows * groups);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      RefMinMax(&w[r * cols + g * gs], std::min(gs, cols - g * gs), &mn[r * groups + g],
                &mx[r * groups + g]);
    }
  }
  std::vector<GridPoint> best(rows * groups), cand(rows * groups);
  std::vector<double> best_loss(rows * groups), loss(rows * groups);
  for (int k = 0; k < c.n_points; ++k) {
    for (int64_t i = 0; i < rows * groups; ++i) cand[i] = RefCandidate(mn[i], mx[i], k, c);
    std::fill(loss.begin(), loss.end(), 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t col = 0; col < cols; ++col) {
        const int64_t i = r * groups + col / gs;
        loss[i] += static_cast<double>(RefTerm(w[r * cols + col], cand[i], c));
      }
    }
    for (int64_t i = 0; i < rows * groups; ++i) {
      if (k == 0 || loss[i] < best_loss[i]) {
        best_loss[i] = loss[i];
        best[i] = cand[i];
      }
    }
  }
  scales->resize(rows * groups);
  zeros->assign(c.symmetric ? 0 : rows * groups, 0.0f);
  for (int64_t i = 0; i < rows * groups; ++i) {
    (*scales)[i] = best[i].s;
    if (!c.symmetric) (*zeros)[i] = best[i].z;
  }
}

// Gaussian weights with per-row scales spanning 1e-4..10, sparse outliers, an all-zero row, a
// row of positive values only, a row of tiny (subnormal-scale) values and a row with -0.0s.
inline std::vector<float> RandomWeights(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::uniform_real_distribution<float> ud(0.0f, 1.0f);
  std::vector<float> w(rows * cols);
  for (int64_t r = 0; r < rows; ++r) {
    const float row_scale = std::pow(10.0f, -4.0f + 5.0f * ud(rng));
    for (int64_t c = 0; c < cols; ++c) {
      float v = nd(rng) * row_scale;
      if (ud(rng) < 0.01f) v *= 8.0f;  // outliers
      w[r * cols + c] = v;
    }
  }
  auto fill_row = [&](int64_t r, auto f) {
    if (r < rows) {
      for (int64_t c = 0; c < cols; ++c) w[r * cols + c] = f(c);
    }
  };
  fill_row(1, [](int64_t) { return 0.0f; });
  fill_row(2, [&](int64_t) { return std::fabs(nd(rng)); });
  fill_row(3, [&](int64_t) { return nd(rng) * 1e-39f; });
  fill_row(4, [&](int64_t c) { return c % 3 == 0 ? -0.0f : nd(rng) * 0.01f; });
  return w;
}

}  // namespace mq::kernels::testing_util
