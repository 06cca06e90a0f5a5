// GPU Hessian factorisation (cuSOLVER potrf + trtri and the flip / finish kernels) against the CPU
// reference, in fp64 and fp32, and its status word for matrices without a factor. Skips without
// a supported CUDA device.
#include <cuda_runtime_api.h>

#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "mq/kernels/hessian_factor.h"
#include "tests/unit/kernels/gpu_test_util.h"

namespace mq::kernels {
namespace {

class InverseFactorGpuTest : public testing_util::KernelGpuTest<InverseFactorIsSupported> {};

// A random SPD matrix with a few strongly correlated directions (X·Xᵀ/m + damp·I).
std::vector<double> RandomSpd(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  const int64_t m = n / 2 + 5;
  std::vector<double> x(static_cast<size_t>(n * m));
  for (double& v : x) v = normal(rng);
  std::vector<double> h(static_cast<size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      double s = 0;
      for (int64_t k = 0; k < m; ++k) s += x[i * m + k] * x[j * m + k];
      h[i * n + j] = h[j * n + i] = s / m;
    }
  }
  double mean = 0;
  for (int64_t i = 0; i < n; ++i) mean += h[i * n + i];
  mean /= static_cast<double>(n);
  for (int64_t i = 0; i < n; ++i) h[i * n + i] += 0.1 * mean;
  return h;
}

// Runs the GPU factorisation of `h` in `dtype`; returns the status word and fills `u`.
int RunGpu(const std::vector<double>& h, int64_t n, FactorDtype dtype, std::vector<float>& u,
           FactorForm form = FactorForm::kInverseUpper) {
  const size_t elem = dtype == FactorDtype::kFloat64 ? 8 : 4;
  std::vector<float> h32(h.begin(), h.end());
  void* a = nullptr;
  float* du = nullptr;
  int32_t* status = nullptr;
  void* ws = nullptr;
  size_t ws_bytes = 0;
  EXPECT_TRUE(InverseFactorWorkspaceBytes(n, dtype, &ws_bytes).ok());
  EXPECT_EQ(cudaMalloc(&a, n * n * elem), cudaSuccess);
  EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&du), n * n * sizeof(float)), cudaSuccess);
  EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&status), sizeof(int32_t)), cudaSuccess);
  EXPECT_EQ(cudaMalloc(&ws, ws_bytes), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(
                a, dtype == FactorDtype::kFloat64 ? static_cast<const void*>(h.data()) : h32.data(),
                n * n * elem, cudaMemcpyHostToDevice),
            cudaSuccess);
  EXPECT_EQ(cudaMemset(status, 0x7f, sizeof(int32_t)), cudaSuccess);
  InverseFactorArgs args;
  args.n = n;
  args.dtype = dtype;
  args.form = form;
  args.a = a;
  args.u = du;
  args.status = status;
  absl::Status launched = LaunchInverseFactor(args, ws, ws_bytes, nullptr);
  EXPECT_TRUE(launched.ok()) << launched;
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  int32_t host_status = -1;
  u.assign(static_cast<size_t>(n * n), 0.0f);
  EXPECT_EQ(cudaMemcpy(&host_status, status, sizeof(int32_t), cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(u.data(), du, n * n * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  cudaFree(a);
  cudaFree(du);
  cudaFree(status);
  cudaFree(ws);
  return host_status;
}

TEST_F(InverseFactorGpuTest, MatchesCpuReference) {
  for (int64_t n : {1, 5, 31, 32, 33, 128, 257, 1000}) {
    const std::vector<double> h = RandomSpd(n, static_cast<uint32_t>(n) + 3);
    for (FactorDtype dtype : {FactorDtype::kFloat64, FactorDtype::kFloat32}) {
      for (FactorForm form : {FactorForm::kInverseUpper, FactorForm::kCholeskyFeedback}) {
        SCOPED_TRACE(testing::Message() << "n " << n << " fp64 " << (dtype == FactorDtype::kFloat64)
                                        << " feedback " << (form == FactorForm::kCholeskyFeedback));
        std::vector<double> a64 = h;
        std::vector<float> a32(h.begin(), h.end());
        std::vector<float> want(static_cast<size_t>(n * n));
        InverseFactorArgs cpu;
        cpu.n = n;
        cpu.dtype = dtype;
        cpu.form = form;
        cpu.a = dtype == FactorDtype::kFloat64 ? static_cast<void*>(a64.data()) : a32.data();
        cpu.u = want.data();
        ASSERT_TRUE(InverseFactorCpu(cpu).ok());
        std::vector<float> got;
        ASSERT_EQ(RunGpu(h, n, dtype, got, form), 0);
        double worst = 0, scale = 0;
        for (int64_t i = 0; i < n; ++i) {
          ASSERT_EQ(got[i * n + i], 1.0f);
          for (int64_t j = 0; j < n; ++j) {
            if (j < i) {
              ASSERT_EQ(got[i * n + j], 0.0f) << i << "," << j;
            }
            worst =
                std::max(worst, std::fabs(static_cast<double>(got[i * n + j]) - want[i * n + j]));
            scale = std::max(scale, std::fabs(static_cast<double>(want[i * n + j])));
          }
        }
        // fp64: both round the same fp64 factor to fp32 (a few ulp of fp32 apart at most);
        // fp32: different summation orders in a factorisation of condition number ~1e3.
        const double tol = dtype == FactorDtype::kFloat64 ? 1e-6 : 5e-3;
        EXPECT_LE(worst, tol * scale) << "max |gpu - cpu| " << worst << " of max |u| " << scale;
      }
    }
  }
}

TEST_F(InverseFactorGpuTest, StatusReportsMatricesWithoutFactor) {
  const int64_t n = 64;
  std::vector<double> h = RandomSpd(n, 9);
  h[10 * n + 10] = -5.0;  // no longer positive definite
  std::vector<float> u;
  EXPECT_EQ(RunGpu(h, n, FactorDtype::kFloat64, u), 1);
  EXPECT_EQ(RunGpu(h, n, FactorDtype::kFloat64, u, FactorForm::kCholeskyFeedback), 1);
  std::vector<double> nan = RandomSpd(n, 10);
  nan[3 * n + 4] = nan[4 * n + 3] = std::nan("");
  EXPECT_NE(RunGpu(nan, n, FactorDtype::kFloat64, u), 0);
  // The next good matrix on the same thread's handle factorises normally.
  EXPECT_EQ(RunGpu(RandomSpd(n, 11), n, FactorDtype::kFloat64, u), 0);
}

TEST_F(InverseFactorGpuTest, WrongWorkspaceIsAnError) {
  InverseFactorArgs args;
  args.n = 16;
  void* a = nullptr;
  ASSERT_EQ(cudaMalloc(&a, 16 * 16 * 8 + 64), cudaSuccess);
  args.a = a;
  args.u = static_cast<float*>(a);
  args.status = static_cast<int32_t*>(a);
  absl::Status s = LaunchInverseFactor(args, a, 8, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_NE(s.message().find("workspace of 8 bytes"), std::string::npos) << s;
  cudaFree(a);
}

}  // namespace
}  // namespace mq::kernels
