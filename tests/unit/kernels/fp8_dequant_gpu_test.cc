// GPU FP8 block dequantization against the CPU reference, bit for bit. Skips when no CUDA
// device is visible or the device is not supported (pre-Hopper), so it is safe in CPU-only CI.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "mq/kernels/fp8_dequant.h"
#include "tests/unit/kernels/gpu_test_util.h"

namespace mq::kernels {
namespace {

using testing_util::DeviceBuffer;

class Fp8DequantGpuTest : public testing_util::KernelGpuTest<Fp8BlockDequantIsSupported> {};

struct Input {
  std::vector<uint8_t> w;
  std::vector<float> scale;
};

Input MakeInput(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  Input in;
  in.w.resize(static_cast<size_t>(rows * cols));
  for (auto& code : in.w) code = static_cast<uint8_t>(rng());
  for (size_t i = 0; i < 256 && i < in.w.size(); ++i) {
    in.w[(i * 7919) % in.w.size()] = static_cast<uint8_t>(i);  // every code, NaNs included
  }
  std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
  std::uniform_int_distribution<int> exponent(-20, 4);
  const int64_t nb = Fp8ScaleBlocks(rows) * Fp8ScaleBlocks(cols);
  for (int64_t i = 0; i < nb; ++i) {
    float s = std::ldexp(mantissa(rng), exponent(rng));
    if (i % 11 == 3) s = std::ldexp(mantissa(rng), -135);  // denormal products
    if (i % 13 == 5) s = std::ldexp(mantissa(rng), 120);   // overflow to Inf
    in.scale.push_back(s);
  }
  return in;
}

// Runs the GPU kernel with `w` and `out` placed `w_shift` / `out_shift` bytes past an aligned
// allocation (to reach the narrower vector paths) and compares with the CPU reference.
void CompareWithCpu(int64_t rows, int64_t cols, uint32_t seed, size_t w_shift = 0,
                    size_t out_shift = 0) {
  SCOPED_TRACE(testing::Message() << rows << "x" << cols << " shifts " << w_shift << "/"
                                  << out_shift);
  const Input in = MakeInput(rows, cols, seed);
  const size_t n = in.w.size();
  std::vector<uint16_t> want(n);
  Fp8BlockDequantCpu(in.w.data(), in.scale.data(), rows, cols, want.data());

  DeviceBuffer<uint8_t> d_w(n + 16);
  DeviceBuffer<float> d_scale(in.scale.size() * sizeof(float));
  DeviceBuffer<uint8_t> d_out(2 * n + 32);
  ASSERT_NE(d_w.ptr, nullptr);
  ASSERT_NE(d_scale.ptr, nullptr);
  ASSERT_NE(d_out.ptr, nullptr);
  uint8_t* w = d_w.ptr + w_shift;
  uint16_t* out = reinterpret_cast<uint16_t*>(d_out.ptr + out_shift);
  CUDA_OK(cudaMemcpy(w, in.w.data(), n, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_scale.ptr, in.scale.data(), in.scale.size() * sizeof(float),
                     cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(d_out.ptr, 0xAB, 2 * n + 32));
  absl::Status st = LaunchFp8BlockDequant(w, d_scale.ptr, rows, cols, out, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<uint16_t> got(n);
  CUDA_OK(cudaMemcpy(got.data(), out, 2 * n, cudaMemcpyDeviceToHost));
  int64_t mismatches = 0;
  for (size_t i = 0; i < n; ++i) {
    if (got[i] != want[i] && ++mismatches <= 5) {
      ADD_FAILURE() << "element " << i << " ([" << i / cols << "][" << i % cols << "]) code 0x"
                    << std::hex << int(in.w[i]) << ": gpu 0x" << got[i] << " cpu 0x" << want[i];
    }
  }
  EXPECT_EQ(mismatches, 0);
  // Nothing written past the end.
  uint16_t tail = 0;
  CUDA_OK(cudaMemcpy(&tail, out + n, 2, cudaMemcpyDeviceToHost));
  EXPECT_EQ(tail, 0xABAB);
}

TEST_F(Fp8DequantGpuTest, MatchesCpuOnDeepSeekShapes) {
  CompareWithCpu(7168, 2048, 1);  // expert down_proj
  CompareWithCpu(2048, 7168, 2);  // expert gate/up_proj
  CompareWithCpu(576, 7168, 3);   // kv_a_proj_with_mqa: scale [5, 56]
  CompareWithCpu(1536, 7168, 4);  // q_a_proj
}

TEST_F(Fp8DequantGpuTest, MatchesCpuOnRaggedShapes) {
  const std::pair<int64_t, int64_t> shapes[] = {{1, 1},     {1, 16},    {127, 129}, {129, 127},
                                                {200, 300}, {300, 208}, {3, 24},    {5, 12},
                                                {7, 130},   {130, 1},   {1, 7168}};
  uint32_t seed = 10;
  for (auto [rows, cols] : shapes) CompareWithCpu(rows, cols, seed++);
}

TEST_F(Fp8DequantGpuTest, MatchesCpuOnUnalignedPointers) {
  CompareWithCpu(200, 256, 30, 1, 0);   // w odd: scalar path
  CompareWithCpu(200, 256, 31, 4, 8);   // 4-wide path
  CompareWithCpu(200, 256, 32, 8, 16);  // 8-wide path
  CompareWithCpu(200, 256, 33, 0, 2);   // out 2-aligned only
}

TEST_F(Fp8DequantGpuTest, EmptyMatrixLaunchesNothing) {
  EXPECT_TRUE(LaunchFp8BlockDequant(nullptr, nullptr, 0, 128, nullptr, nullptr).ok());
}

TEST_F(Fp8DequantGpuTest, ThroughputReport) {
  // Not a pass/fail check: effective bandwidth (fp8 read + scales + bf16 written).
  const std::pair<int64_t, int64_t> shapes[] = {{7168, 2048}, {2048, 7168}, {18432, 7168}};
  for (auto [rows, cols] : shapes) {
    const size_t n = static_cast<size_t>(rows * cols);
    const size_t scales = static_cast<size_t>(Fp8ScaleBlocks(rows) * Fp8ScaleBlocks(cols));
    DeviceBuffer<uint8_t> w(n);
    DeviceBuffer<float> s(scales * sizeof(float));
    DeviceBuffer<uint16_t> out(2 * n);
    ASSERT_NE(out.ptr, nullptr);
    CUDA_OK(cudaMemset(w.ptr, 0x38, n));
    CUDA_OK(cudaMemset(s.ptr, 0, scales * sizeof(float)));
    cudaEvent_t start, stop;
    CUDA_OK(cudaEventCreate(&start));
    CUDA_OK(cudaEventCreate(&stop));
    for (int i = 0; i < 3; ++i) {
      ASSERT_TRUE(LaunchFp8BlockDequant(w.ptr, s.ptr, rows, cols, out.ptr, nullptr).ok());
    }
    const int reps = 20;
    CUDA_OK(cudaEventRecord(start));
    for (int i = 0; i < reps; ++i) {
      ASSERT_TRUE(LaunchFp8BlockDequant(w.ptr, s.ptr, rows, cols, out.ptr, nullptr).ok());
    }
    CUDA_OK(cudaEventRecord(stop));
    CUDA_OK(cudaEventSynchronize(stop));
    float ms = 0;
    CUDA_OK(cudaEventElapsedTime(&ms, start, stop));
    const double seconds = ms / 1e3 / reps;
    std::printf("LaunchFp8BlockDequant %lldx%lld: %.1f us, %.0f GB/s (3 bytes per element)\n",
                static_cast<long long>(rows), static_cast<long long>(cols), seconds * 1e6,
                (3.0 * n + 4.0 * scales) / seconds / 1e9);
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
}

}  // namespace
}  // namespace mq::kernels
