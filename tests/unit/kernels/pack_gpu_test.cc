// GPU int4 packing against the CPU reference, bit for bit, with the out-of-range count. Skips
// when no CUDA device is visible or this build has no kernel code for it, so it is safe in
// CPU-only CI.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <random>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "mq/kernels/pack.h"
#include "tests/unit/kernels/gpu_test_util.h"

namespace mq::kernels {
namespace {

using testing_util::DeviceBuffer;

class PackInt4GpuTest : public testing_util::KernelGpuTest<PackInt4IsSupported> {};

// rows x ld codes in [-8, 7]; `bad_every` > 0 puts an out-of-range code at every bad_every-th
// element. Bytes past cols hold 100 (out of range): they must never be read.
std::vector<int8_t> MakeCodes(int64_t rows, int64_t cols, int64_t ld, uint32_t seed,
                              int64_t bad_every = 0) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> in_range(-8, 7);
  std::uniform_int_distribution<int> wild(8, 127);
  std::vector<int8_t> codes(static_cast<size_t>(rows * ld), 100);
  int64_t n = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c, ++n) {
      int code = in_range(rng);
      if (bad_every > 0 && n % bad_every == bad_every - 1) {
        code = (n / bad_every) % 2 ? wild(rng) : -wild(rng) - 1;  // > 7 or < -8
      }
      codes[static_cast<size_t>(r * ld + c)] = static_cast<int8_t>(code);
    }
  }
  return codes;
}

struct Case {
  int64_t rows;
  int64_t cols;
  int64_t ld;
  size_t shift = 0;  // byte offset of the codes past an aligned allocation
  int64_t bad_every = 0;
  bool transposed = false;
};

// Packs on the GPU and compares words and the out-of-range count with the CPU reference.
void CompareWithCpu(const Case& k, uint32_t seed) {
  SCOPED_TRACE(testing::Message() << (k.transposed ? "transposed " : "rows ") << k.rows << "x"
                                  << k.cols << " ld " << k.ld << " shift " << k.shift
                                  << " bad_every " << k.bad_every);
  const std::vector<int8_t> codes = MakeCodes(k.rows, k.cols, k.ld, seed, k.bad_every);
  const size_t words = static_cast<size_t>(k.transposed ? Int4PackedWords(k.rows) * k.cols
                                                        : k.rows * Int4PackedWords(k.cols));
  std::vector<int32_t> want(words);
  const int64_t want_bad =
      k.transposed ? PackInt4TransposedCpu(codes.data(), k.rows, k.cols, k.ld, want.data())
                   : PackInt4Cpu(codes.data(), k.rows, k.cols, k.ld, want.data());
  if (k.bad_every > 0) {
    EXPECT_EQ(want_bad, k.rows * k.cols / k.bad_every);
  } else {
    EXPECT_EQ(want_bad, 0);
  }

  DeviceBuffer<int8_t> d_codes(codes.size() + 16);
  DeviceBuffer<int32_t> d_packed((words + 4) * sizeof(int32_t));
  DeviceBuffer<int64_t> d_bad(sizeof(int64_t));
  ASSERT_NE(d_codes.ptr, nullptr);
  ASSERT_NE(d_packed.ptr, nullptr);
  ASSERT_NE(d_bad.ptr, nullptr);
  int8_t* in = d_codes.ptr + k.shift;
  CUDA_OK(cudaMemcpy(in, codes.data(), codes.size(), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(d_packed.ptr, 0xAB, (words + 4) * sizeof(int32_t)));
  CUDA_OK(cudaMemset(d_bad.ptr, 0, sizeof(int64_t)));
  const absl::Status st =
      k.transposed
          ? LaunchPackInt4Transposed(in, k.rows, k.cols, k.ld, d_packed.ptr, d_bad.ptr, nullptr)
          : LaunchPackInt4(in, k.rows, k.cols, k.ld, d_packed.ptr, d_bad.ptr, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<int32_t> got(words + 4);
  CUDA_OK(
      cudaMemcpy(got.data(), d_packed.ptr, (words + 4) * sizeof(int32_t), cudaMemcpyDeviceToHost));
  int64_t got_bad = -1;
  CUDA_OK(cudaMemcpy(&got_bad, d_bad.ptr, sizeof(int64_t), cudaMemcpyDeviceToHost));
  int64_t mismatches = 0;
  for (size_t i = 0; i < words; ++i) {
    if (got[i] != want[i] && ++mismatches <= 5) {
      ADD_FAILURE() << "word " << i << ": gpu 0x" << std::hex << got[i] << " cpu 0x" << want[i];
    }
  }
  EXPECT_EQ(mismatches, 0);
  EXPECT_EQ(got_bad, want_bad);
  // Nothing written past the end.
  for (size_t i = words; i < words + 4; ++i) EXPECT_EQ(got[i], int32_t(0xABABABABu)) << i;
}

const std::pair<int64_t, int64_t> kRaggedShapes[] = {
    {1, 1},  {1, 7},   {1, 8},   {1, 9},     {1, 7168},  {3, 15},    {5, 13},
    {8, 3},  {9, 17},  {17, 64}, {127, 129}, {129, 127}, {200, 300}, {300, 208},
    {64, 7}, {7, 130}, {130, 1}, {1000, 1},  {33, 2049}};

TEST_F(PackInt4GpuTest, RowsMatchCpuOnDeepSeekShapes) {
  CompareWithCpu({7168, 2048, 2048}, 1);  // expert down_proj
  CompareWithCpu({2048, 7168, 7168}, 2);  // expert gate/up_proj
  CompareWithCpu({576, 7168, 7168}, 3);
  CompareWithCpu({7168, 2048, 2048, 0, 0, true}, 4);  // transposed, same size
}

TEST_F(PackInt4GpuTest, RowsMatchCpuOnRaggedShapes) {
  uint32_t seed = 10;
  for (auto [rows, cols] : kRaggedShapes) {
    CompareWithCpu({rows, cols, cols}, seed++);
    CompareWithCpu({rows, cols, cols + 3}, seed++);             // unaligned rows: byte path
    CompareWithCpu({rows, cols, (cols + 15) / 8 * 8}, seed++);  // padded, aligned rows
  }
}

TEST_F(PackInt4GpuTest, RowsMatchCpuOnUnalignedPointers) {
  for (size_t shift : {1, 2, 4, 7, 8}) {
    CompareWithCpu({200, 256, 256, shift}, 30 + static_cast<uint32_t>(shift));
    CompareWithCpu({33, 131, 136, shift}, 40 + static_cast<uint32_t>(shift));
  }
}

TEST_F(PackInt4GpuTest, TransposedMatchesCpu) {
  uint32_t seed = 50;
  for (auto [rows, cols] : kRaggedShapes) {
    CompareWithCpu({rows, cols, cols, 0, 0, true}, seed++);
    CompareWithCpu({rows, cols, cols + 5, 3, 0, true}, seed++);
  }
  CompareWithCpu({2048, 56, 56, 0, 0, true}, seed++);  // zero points [O, I/128] of an expert
}

TEST_F(PackInt4GpuTest, CountsOutOfRangeCodes) {
  uint32_t seed = 70;
  for (int64_t bad_every : {1, 2, 7, 1000, 14680064}) {
    CompareWithCpu({2048, 7168, 7168, 0, bad_every}, seed++);
    CompareWithCpu({129, 127, 130, 1, bad_every}, seed++);
    CompareWithCpu({129, 127, 130, 0, bad_every, true}, seed++);
  }
  // One bad code: the very last one, in a padded word.
  CompareWithCpu({5, 13, 13, 0, 65}, seed++);
}

TEST_F(PackInt4GpuTest, CountAccumulatesAndMayBeNull) {
  const int64_t rows = 64, cols = 100;
  const std::vector<int8_t> codes = MakeCodes(rows, cols, cols, 90, 10);
  const size_t words = static_cast<size_t>(rows * Int4PackedWords(cols));
  std::vector<int32_t> want(words);
  const int64_t want_bad = PackInt4Cpu(codes.data(), rows, cols, cols, want.data());
  ASSERT_EQ(want_bad, rows * cols / 10);
  DeviceBuffer<int8_t> d_codes(codes.size());
  DeviceBuffer<int32_t> d_packed(words * sizeof(int32_t));
  DeviceBuffer<int64_t> d_bad(sizeof(int64_t));
  CUDA_OK(cudaMemcpy(d_codes.ptr, codes.data(), codes.size(), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(d_bad.ptr, 0, sizeof(int64_t)));
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(
        LaunchPackInt4(d_codes.ptr, rows, cols, cols, d_packed.ptr, d_bad.ptr, nullptr).ok());
  }
  ASSERT_TRUE(LaunchPackInt4(d_codes.ptr, rows, cols, cols, d_packed.ptr, nullptr, nullptr).ok());
  CUDA_OK(cudaDeviceSynchronize());
  int64_t got_bad = 0;
  CUDA_OK(cudaMemcpy(&got_bad, d_bad.ptr, sizeof(int64_t), cudaMemcpyDeviceToHost));
  EXPECT_EQ(got_bad, 2 * want_bad);
  std::vector<int32_t> got(words);
  CUDA_OK(cudaMemcpy(got.data(), d_packed.ptr, words * sizeof(int32_t), cudaMemcpyDeviceToHost));
  EXPECT_EQ(got, want);
}

TEST_F(PackInt4GpuTest, EmptyMatrixLaunchesNothing) {
  EXPECT_TRUE(LaunchPackInt4(nullptr, 0, 128, 128, nullptr, nullptr, nullptr).ok());
  EXPECT_TRUE(LaunchPackInt4Transposed(nullptr, 16, 0, 0, nullptr, nullptr, nullptr).ok());
}

TEST_F(PackInt4GpuTest, ThroughputReport) {
  // Not a pass/fail check: effective bandwidth (int8 codes read + int32 words written).
  const std::pair<int64_t, int64_t> shapes[] = {{2048, 7168}, {7168, 2048}};
  for (auto [rows, cols] : shapes) {
    const size_t n = static_cast<size_t>(rows * cols);
    const size_t words = static_cast<size_t>(rows * Int4PackedWords(cols));
    DeviceBuffer<int8_t> codes(n);
    DeviceBuffer<int32_t> packed(words * sizeof(int32_t));
    DeviceBuffer<int64_t> bad(sizeof(int64_t));
    ASSERT_NE(codes.ptr, nullptr);
    ASSERT_NE(packed.ptr, nullptr);
    ASSERT_NE(bad.ptr, nullptr);
    CUDA_OK(cudaMemset(codes.ptr, 0x03, n));
    CUDA_OK(cudaMemset(bad.ptr, 0, sizeof(int64_t)));
    cudaEvent_t start, stop;
    CUDA_OK(cudaEventCreate(&start));
    CUDA_OK(cudaEventCreate(&stop));
    for (int i = 0; i < 3; ++i) {
      ASSERT_TRUE(LaunchPackInt4(codes.ptr, rows, cols, cols, packed.ptr, bad.ptr, nullptr).ok());
    }
    const int reps = 50;
    CUDA_OK(cudaEventRecord(start));
    for (int i = 0; i < reps; ++i) {
      ASSERT_TRUE(LaunchPackInt4(codes.ptr, rows, cols, cols, packed.ptr, bad.ptr, nullptr).ok());
    }
    CUDA_OK(cudaEventRecord(stop));
    CUDA_OK(cudaEventSynchronize(stop));
    float ms = 0;
    CUDA_OK(cudaEventElapsedTime(&ms, start, stop));
    const double seconds = ms / 1e3 / reps;
    std::printf("LaunchPackInt4 %lldx%lld: %.1f us, %.0f GB/s (1.5 bytes per code)\n",
                static_cast<long long>(rows), static_cast<long long>(cols), seconds * 1e6,
                (static_cast<double>(n) + 4.0 * static_cast<double>(words)) / seconds / 1e9);
    int64_t got_bad = -1;
    CUDA_OK(cudaMemcpy(&got_bad, bad.ptr, sizeof(int64_t), cudaMemcpyDeviceToHost));
    EXPECT_EQ(got_bad, 0);
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
}

}  // namespace
}  // namespace mq::kernels
