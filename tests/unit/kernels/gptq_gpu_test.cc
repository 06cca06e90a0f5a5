// GPU batched GPTQ solve against the CPU reference (kernels/cpu/gptq.cc). The in-block arithmetic
// is identical; the lazy-update GEMM sums in a different order, so a small fraction of codes may
// flip. Skips without a supported CUDA device.
#include <cuda_runtime_api.h>

#include <vector>

#include "gtest/gtest.h"
#include "mq/kernels/gptq.h"
#include "tests/unit/kernels/gptq_ref_util.h"
#include "tests/unit/kernels/gpu_test_util.h"

namespace mq::kernels {
namespace {

using testing_util::GptqProblem;
using testing_util::MakeProblem;

class GptqGpuTest : public testing_util::KernelGpuTest<GptqIsSupported> {};

template <typename T>
T* Upload(const std::vector<T>& v, std::vector<void*>& owned) {
  void* p = nullptr;
  if (cudaMalloc(&p, v.size() * sizeof(T) + 16) != cudaSuccess) return nullptr;
  cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  owned.push_back(p);
  return static_cast<T*>(p);
}

void Compare(int64_t batch, int64_t rows, int64_t cols, int64_t group, bool asym, bool tf32,
             double max_frac, bool feedback = false) {
  SCOPED_TRACE(testing::Message() << batch << "x[" << rows << "," << cols << "] g" << group
                                  << " asym " << asym << " tf32 " << tf32 << " feedback "
                                  << feedback);
  GptqProblem p = MakeProblem(batch, rows, cols, group, 2, asym, 11 + cols + asym);
  if (feedback) p = testing_util::FeedbackForm(p);
  const std::vector<float> w0 = p.wt;
  // CPU reference.
  std::vector<const float*> hu;
  std::vector<const int32_t*> hp;
  for (int64_t b = 0; b < batch; ++b) {
    hu.push_back(p.u[p.factor_of[b]].data());
    hp.push_back(p.perm[p.factor_of[b]].data());
  }
  std::vector<float> wt_ref = p.wt;
  std::vector<int8_t> want(p.wt.size(), 127);
  GptqSolveArgs a;
  a.batch = batch;
  a.rows = rows;
  a.cols = cols;
  a.group_size = group;
  a.wt = wt_ref.data();
  a.u = hu.data();
  a.perm = hp.data();
  a.scales_t = p.scales_t.data();
  a.zeros_t = asym ? p.zeros_t.data() : nullptr;
  a.codes_t = want.data();
  a.w0 = feedback ? w0.data() : nullptr;
  ASSERT_TRUE(GptqSolveCpu(a).ok());

  std::vector<void*> owned;
  std::vector<const float*> du;
  std::vector<const int32_t*> dp;
  std::vector<float*> fu;
  std::vector<int32_t*> fp;
  for (size_t f = 0; f < p.u.size(); ++f) {
    fu.push_back(Upload(p.u[f], owned));
    fp.push_back(Upload(p.perm[f], owned));
  }
  for (int64_t b = 0; b < batch; ++b) {
    du.push_back(fu[p.factor_of[b]]);
    dp.push_back(fp[p.factor_of[b]]);
  }
  a.wt = Upload(p.wt, owned);
  a.u = du.data();
  a.perm = dp.data();
  a.scales_t = Upload(p.scales_t, owned);
  a.zeros_t = asym ? Upload(p.zeros_t, owned) : nullptr;
  std::vector<int8_t> got(p.wt.size(), 127);  // poison: out of the 4-bit range
  a.codes_t = Upload(got, owned);
  a.update_math = tf32 ? GptqUpdateMath::kTf32 : GptqUpdateMath::kFp32;
  a.w0 = feedback ? Upload(w0, owned) : nullptr;
  const size_t bytes = GptqSolveWorkspaceBytes(a);
  void* ws = nullptr;
  CUDA_OK(cudaMalloc(&ws, bytes));
  owned.push_back(ws);
  absl::Status s = LaunchGptqSolve(a, ws, bytes, nullptr);
  ASSERT_TRUE(s.ok()) << s;
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaMemcpy(got.data(), a.codes_t, got.size(), cudaMemcpyDeviceToHost));
  for (void* q : owned) cudaFree(q);
  int64_t diff = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(got[i] >= -8 && got[i] <= 7) << "code " << i << " not written: " << int(got[i]);
    diff += got[i] != want[i];
  }
  const double frac = static_cast<double>(diff) / got.size();
  std::printf("codes differing from the CPU reference: %lld of %zu (%.2e)\n",
              static_cast<long long>(diff), got.size(), frac);
  EXPECT_LE(frac, max_frac);
}

TEST_F(GptqGpuTest, MatchesCpuReference) {
  Compare(3, 200, 300, 128, false, false, 2e-3);  // ragged rows and last block
  Compare(3, 200, 300, 128, true, false, 2e-3);
  Compare(4, 256, 512, 64, false, false, 2e-3);
  Compare(2, 130, 256, 256, true, false, 2e-3);  // group spanning blocks
}

TEST_F(GptqGpuTest, FeedbackFormMatchesCpuReference) {
  Compare(3, 200, 300, 128, false, false, 2e-3, /*feedback=*/true);
  Compare(3, 200, 300, 128, true, false, 2e-3, true);
  Compare(2, 130, 256, 256, true, false, 2e-3, true);
}

TEST_F(GptqGpuTest, Tf32UpdateIsClose) { Compare(3, 256, 512, 128, false, true, 3e-2); }

TEST_F(GptqGpuTest, RejectsMissingWorkspace) {
  GptqSolveArgs a;
  a.batch = 1;
  a.rows = 4;
  a.cols = 8;
  a.group_size = 8;
  float w = 0;
  int8_t c = 0;
  const float* u = &w;
  int32_t pi = 0;
  const int32_t* pp = &pi;
  a.wt = &w;
  a.u = &u;
  a.perm = &pp;
  a.scales_t = &w;
  a.codes_t = &c;
  EXPECT_EQ(LaunchGptqSolve(a, nullptr, 0, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mq::kernels
