// GPU MSE grid search against the CPU reference (kernels/cpu/grid_search.cc) on every kernel
// path (warp with 1/2/4/8 values per lane, CTA with 4/16/32 values per thread, CTA re-reading
// long groups), with short last groups, symmetric and asymmetric grids, 2/4/8 bits and norms 2
// and 2.4. Every GPU (scale, zero point) must be bit-identical to one of the group's candidates;
// a choice that differs from the reference's must be a near-tie (the two sum their losses in a
// different order and precision, mq/kernels/grid_search.h), and such differences must be rare.
// Also prints the kernel time on DeepSeek expert shapes. Skips without a CUDA device.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "mq/kernels/grid_search.h"
#include "tests/unit/kernels/gpu_test_util.h"
#include "tests/unit/kernels/grid_search_ref_util.h"

namespace mq::kernels {
namespace {

using testing_util::ExactLoss;
using testing_util::GridPoint;
using testing_util::RandomWeights;
using testing_util::RefCandidates;

class GridSearchGpuTest : public testing_util::KernelGpuTest<GridSearchIsSupported> {};

// Device buffer freed on scope exit.
struct DeviceBuffer {
  float* ptr = nullptr;
  explicit DeviceBuffer(size_t count) {
    void* p = nullptr;
    if (cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(float)) == cudaSuccess) {
      ptr = static_cast<float*>(p);
    }
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

struct Case {
  int64_t rows, cols, group_size;
  int bits;
  bool symmetric;
  double norm;
  int n_points = 80;
};

// Runs the GPU search twice (the first launch loads the module); fills scales/zeros (zeros empty
// when symmetric) and *ms with the second launch's time.
void RunGpu(const std::vector<float>& w, int64_t rows, int64_t cols, const GridSearchConfig& c,
            std::vector<float>* scales, std::vector<float>* zeros, float* ms = nullptr) {
  const int64_t groups = GridSearchGroups(cols, c.group_size);
  DeviceBuffer dw(w.size()), ds(rows * groups), dz(c.symmetric ? 0 : rows * groups);
  ASSERT_NE(dw.ptr, nullptr);
  ASSERT_NE(ds.ptr, nullptr);
  ASSERT_NE(dz.ptr, nullptr);
  CUDA_OK(cudaMemcpy(dw.ptr, w.data(), w.size() * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(ds.ptr, 0xFF, rows * groups * sizeof(float)));  // NaN: unwritten shows
  GridSearchArgs a;
  a.w = dw.ptr;
  a.rows = rows;
  a.cols = cols;
  a.config = c;
  a.scales = ds.ptr;
  a.zero_points = c.symmetric ? nullptr : dz.ptr;
  cudaEvent_t start, stop;
  CUDA_OK(cudaEventCreate(&start));
  CUDA_OK(cudaEventCreate(&stop));
  // Warm-up launch (module load), then the timed one.
  absl::Status s = LaunchGridSearch(a, nullptr);
  ASSERT_TRUE(s.ok()) << s;
  CUDA_OK(cudaEventRecord(start, nullptr));
  s = LaunchGridSearch(a, nullptr);
  ASSERT_TRUE(s.ok()) << s;
  CUDA_OK(cudaEventRecord(stop, nullptr));
  CUDA_OK(cudaEventSynchronize(stop));
  CUDA_OK(cudaGetLastError());
  if (ms != nullptr) CUDA_OK(cudaEventElapsedTime(ms, start, stop));
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  scales->resize(rows * groups);
  CUDA_OK(
      cudaMemcpy(scales->data(), ds.ptr, scales->size() * sizeof(float), cudaMemcpyDeviceToHost));
  zeros->assign(c.symmetric ? 0 : rows * groups, 0.0f);
  if (!c.symmetric) {
    CUDA_OK(
        cudaMemcpy(zeros->data(), dz.ptr, zeros->size() * sizeof(float), cudaMemcpyDeviceToHost));
  }
}

void Compare(const Case& k) {
  SCOPED_TRACE(testing::Message() << k.rows << "x" << k.cols << " g" << k.group_size << " bits "
                                  << k.bits << (k.symmetric ? " sym" : " asym") << " norm "
                                  << k.norm << " points " << k.n_points);
  GridSearchConfig c;
  c.group_size = k.group_size;
  c.bits = k.bits;
  c.symmetric = k.symmetric;
  c.norm = k.norm;
  c.n_points = k.n_points;
  const std::vector<float> w = RandomWeights(
      k.rows, k.cols, static_cast<uint32_t>(k.rows * 7 + k.cols + k.group_size + k.bits));
  const int64_t groups = GridSearchGroups(k.cols, k.group_size);
  const int64_t sets = k.rows * groups;

  std::vector<float> want_s(sets), want_z(k.symmetric ? 0 : sets);
  GridSearchArgs a;
  a.w = w.data();
  a.rows = k.rows;
  a.cols = k.cols;
  a.config = c;
  a.scales = want_s.data();
  a.zero_points = k.symmetric ? nullptr : want_z.data();
  ASSERT_TRUE(GridSearchCpu(a).ok());

  std::vector<float> got_s, got_z;
  float ms = 0;
  RunGpu(w, k.rows, k.cols, c, &got_s, &got_z, &ms);
  if (testing::Test::HasFatalFailure()) return;

  int64_t differ = 0, not_candidate = 0, not_tie = 0;
  double worst_rel = 0;
  for (int64_t i = 0; i < sets; ++i) {
    const int64_t r = i / groups, g = i % groups;
    const GridPoint got{got_s[i], k.symmetric ? 0.0f : got_z[i]};
    const GridPoint want{want_s[i], k.symmetric ? 0.0f : want_z[i]};
    if (got == want) continue;
    ++differ;
    const float* x = &w[r * k.cols + g * k.group_size];
    const int64_t len = std::min(k.group_size, k.cols - g * k.group_size);
    const std::vector<GridPoint> cands = RefCandidates(x, len, c);
    if (std::find(cands.begin(), cands.end(), got) == cands.end()) {
      if (++not_candidate <= 5) {
        ADD_FAILURE() << "set (" << r << ", " << g << "): GPU scale " << got.s << " zero " << got.z
                      << " is none of the candidates (reference " << want.s << ", " << want.z
                      << ")";
      }
      continue;
    }
    const double lg = ExactLoss(x, len, got, c), lw = ExactLoss(x, len, want, c);
    const double rel = std::fabs(lg - lw) / std::max(lw, 1e-30);
    worst_rel = std::max(worst_rel, rel);
    if (rel > 1e-5 && ++not_tie <= 5) {
      ADD_FAILURE() << "set (" << r << ", " << g << "): GPU loss " << lg << " vs reference " << lw
                    << " (relative " << rel << ") is not a near-tie";
    }
  }
  std::printf(
      "grid search %lldx%lld g%lld bits %d %s norm %.1f points %d: %lld of %lld choices differ "
      "(worst relative loss gap %.2e), kernel %.3f ms\n",
      static_cast<long long>(k.rows), static_cast<long long>(k.cols),
      static_cast<long long>(k.group_size), k.bits, k.symmetric ? "sym" : "asym", k.norm,
      k.n_points, static_cast<long long>(differ), static_cast<long long>(sets), worst_rel, ms);
  EXPECT_EQ(not_candidate, 0);
  EXPECT_EQ(not_tie, 0);
  EXPECT_LE(differ, std::max<int64_t>(2, sets / 1000)) << "too many differing choices";
}

TEST_F(GridSearchGpuTest, MatchesCpuReferenceOnEveryPath) {
  const Case cases[] = {
      // Warp path: 1, 2, 4, 8 values per lane; short last groups.
      {40, 96, 32, 4, true, 2.4},
      {40, 200, 64, 4, false, 2.4},  // last group 8
      {64, 2048, 128, 4, true, 2.4},
      {64, 2048, 128, 4, false, 2.4},
      {64, 2048, 128, 4, true, 2.0},
      {64, 2048, 128, 4, false, 2.0},
      {64, 2048, 128, 8, true, 2.4},
      {64, 2048, 128, 8, false, 2.0},
      {33, 300, 128, 4, true, 2.4},  // last group 44
      {33, 300, 128, 2, false, 2.4},
      {24, 600, 256, 4, false, 2.4},  // last group 88
      {24, 600, 256, 8, true, 2.0},
      {16, 512, 128, 4, true, 2.4, 2},
      {16, 512, 128, 4, false, 2.4, 33},
      {16, 50, 64, 4, true, 2.4},  // one group shorter than group_size
      // CTA path: 4, 16, 32 values per thread, then re-read from memory.
      {16, 1000, 1000, 4, true, 2.4},
      {16, 1000, 1000, 4, false, 2.0},
      {16, 2500, 1024, 4, false, 2.4},  // last group 452
      {16, 2048, 2048, 8, true, 2.4},
      {16, 7168, 7168, 4, true, 2.4},  // per-channel, DeepSeek hidden size
      {16, 7168, 7168, 4, false, 2.0},
      {8, 10000, 10000, 4, true, 2.4},
      {8, 20000, 9000, 8, false, 2.4},  // last group 2000 (re-read path for the others)
  };
  for (const Case& k : cases) {
    Compare(k);
    if (HasFatalFailure()) return;
  }
}

TEST_F(GridSearchGpuTest, ReportsTimeOnExpertShapes) {
  // DeepSeek-V3 expert weights: gate/up [2048, 7168] and down [7168, 2048], group 128, and the
  // per-channel variant of gate/up.
  const std::vector<float> w = RandomWeights(2048, 7168, 99);
  for (int64_t group : {int64_t{128}, int64_t{7168}}) {
    for (bool symmetric : {true, false}) {
      GridSearchConfig c;
      c.group_size = group;
      c.symmetric = symmetric;
      std::vector<float> s, z;
      float ms = 0;
      RunGpu(w, 2048, 7168, c, &s, &z, &ms);
      if (HasFatalFailure()) return;
      std::printf("grid search 2048x7168 g%lld %s norm 2.4, 80 points: %.3f ms\n",
                  static_cast<long long>(group), symmetric ? "sym" : "asym", ms);
      for (float v : s) ASSERT_GT(v, 0.0f);  // every set written
    }
  }
  GridSearchConfig c;
  std::vector<float> s, z;
  float ms = 0;
  RunGpu(w, 7168, 2048, c, &s, &z, &ms);  // same data viewed as [7168, 2048]
  std::printf("grid search 7168x2048 g128 sym norm 2.4, 80 points: %.3f ms\n", ms);
}

TEST_F(GridSearchGpuTest, RejectsBadArgumentsBeforeLaunching) {
  GridSearchArgs a;
  a.rows = 4;
  a.cols = 8;
  a.config.group_size = 8;
  absl::Status s = LaunchGridSearch(a, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("w is null"), std::string::npos) << s;
  EXPECT_FALSE(GridSearchIsSupported(-1).ok());
}

}  // namespace
}  // namespace mq::kernels
