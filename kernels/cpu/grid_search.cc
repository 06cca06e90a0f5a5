// CPU reference for the MSE scale (grid) search (see mq/kernels/grid_search.h): plain loops per
// (row, group) and candidate, the candidate arithmetic in fp32 exactly as documented, the loss
// terms in fp32 summed in double in column order. Every statement rounds to fp32 on its own
// (this file is built with -ffp-contract=off), so the candidates match the CUDA kernel's bits.
#include "mq/kernels/grid_search.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#include "absl/status/status.h"

namespace mq::kernels {
namespace {

// bf16 round-to-nearest-even of a finite float, back to float.
float RoundBf16(float x) {
  uint32_t bits = std::bit_cast<uint32_t>(x);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return std::bit_cast<float>(bits & 0xFFFF0000u);
}

// A raw scale rounded to bf16; a zero or subnormal result becomes bf16 eps (2^-7).
float RoundScale(float raw) {
  const float s = RoundBf16(raw);
  return (std::bit_cast<uint32_t>(s) & 0x7F800000u) == 0 ? 0.0078125f : s;
}

struct Problem {
  const float* w;
  int64_t cols, group_size, groups;
  bool symmetric, norm2;
  int n_points;
  double min_shrink;
  float qmin, qmax, half_range, range, norm;
  float* scales;
  float* zero_points;
};

// Searches the groups of rows [row_begin, row_end).
void SearchRows(const Problem& p, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t c0 = g * p.group_size;
      const int64_t len = std::min(p.group_size, p.cols - c0);
      const float* x = p.w + r * p.cols + c0;
      float mn = 0.0f, mx = 0.0f;
      for (int64_t c = 0; c < len; ++c) {
        mn = std::min(mn, x[c]);
        mx = std::max(mx, x[c]);
      }
      double best_loss = 0.0;
      float best_s = 0.0f, best_z = 0.0f;
      for (int k = 0; k < p.n_points; ++k) {
        const double shrink_d = 1.0 - k * (1.0 - p.min_shrink) / (p.n_points - 1);
        const float shrink = static_cast<float>(shrink_d);
        float s, z = 0.0f;
        if (p.symmetric) {
          const float raw = std::max(-mn, mx) / p.half_range;
          const float shrunk = raw * shrink;
          s = RoundScale(shrunk);
        } else {
          const float lo = mn * shrink;
          const float hi = mx * shrink;
          const float width = hi - lo;
          s = RoundScale(width / p.range);
          const float q = lo / s;
          z = std::clamp(std::nearbyint(p.qmin - q), p.qmin, p.qmax);
        }
        double loss = 0.0;
        for (int64_t c = 0; c < len; ++c) {
          float q = x[c] / s;
          if (!p.symmetric) q = q + z;
          q = std::clamp(std::nearbyint(q), p.qmin, p.qmax);
          const float d = p.symmetric ? q : q - z;
          const float prod = d * s;
          const float dq = RoundBf16(prod);
          const float e = std::fabs(dq - x[c]);
          const float term = p.norm2 ? e * e : std::pow(e, p.norm);
          loss += static_cast<double>(term);
        }
        if (k == 0 || loss < best_loss) {
          best_loss = loss;
          best_s = s;
          best_z = z;
        }
      }
      p.scales[r * p.groups + g] = best_s;
      if (!p.symmetric) p.zero_points[r * p.groups + g] = best_z;
    }
  }
}

// Element-candidate evaluations per thread below which another thread is not worth starting.
constexpr double kMinWorkPerThread = 16777216.0;
constexpr int kMaxThreads = 16;

}  // namespace

absl::Status GridSearchCpu(const GridSearchArgs& args, int num_threads) {
  if (absl::Status s = ValidateGridSearchArgs(args); !s.ok()) return s;
  if (args.rows == 0 || args.cols == 0) return absl::OkStatus();
  const GridSearchConfig& c = args.config;
  Problem p;
  p.w = args.w;
  p.cols = args.cols;
  p.group_size = c.group_size;
  p.groups = GridSearchGroups(args.cols, c.group_size);
  p.symmetric = c.symmetric;
  p.norm2 = c.norm == 2.0;
  p.n_points = c.n_points;
  p.min_shrink = c.min_shrink;
  p.qmin = static_cast<float>(-(1 << (c.bits - 1)));
  p.qmax = static_cast<float>((1 << (c.bits - 1)) - 1);
  p.half_range = static_cast<float>((static_cast<double>(p.qmax) - p.qmin) / 2.0);
  p.range = p.qmax - p.qmin;
  p.norm = static_cast<float>(c.norm);
  p.scales = args.scales;
  p.zero_points = args.zero_points;

  const int64_t rows = args.rows;
  int64_t threads = num_threads;
  if (threads <= 0) {
    const double work = static_cast<double>(rows) * static_cast<double>(args.cols) * c.n_points;
    const int64_t by_size = static_cast<int64_t>(
        std::clamp(work / kMinWorkPerThread, 1.0, static_cast<double>(kMaxThreads)));
    const int64_t hardware = std::max(1u, std::thread::hardware_concurrency());
    threads = std::min<int64_t>({by_size, hardware, kMaxThreads});
  }
  threads = std::min(threads, rows);
  if (threads <= 1) {
    SearchRows(p, 0, rows);
    return absl::OkStatus();
  }
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(threads - 1));
  auto range = [&](int64_t t) { return rows * t / threads; };
  for (int64_t t = 1; t < threads; ++t) {
    workers.emplace_back(SearchRows, std::cref(p), range(t), range(t + 1));
  }
  SearchRows(p, range(0), range(1));
  for (std::thread& worker : workers) worker.join();
  return absl::OkStatus();
}

}  // namespace mq::kernels
