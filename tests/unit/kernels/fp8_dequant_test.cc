// CPU FP8 block dequantization against an independent straightforward reference, plus the
// launcher's argument checks and architecture gate on this (possibly GPU-less) machine.
#include "mq/kernels/fp8_dequant.h"

#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace mq::kernels {
namespace {

// e4m3fn decoded from its definition: (-1)^s · 2^(e-7) · (1 + m/8), subnormal 2^-6 · m/8,
// S.1111.111 NaN.
double DecodeE4M3(uint8_t code) {
  const int s = code >> 7, e = (code >> 3) & 15, m = code & 7;
  if (e == 15 && m == 7) return std::numeric_limits<double>::quiet_NaN();
  const double magnitude =
      e == 0 ? std::pow(2.0, -6) * (m / 8.0) : std::pow(2.0, e - 7) * (1.0 + m / 8.0);
  return s ? -magnitude : magnitude;
}

// bf16 value of `bits`, with the overflow neighbour of the largest finite value (0x7F80) read
// as 2^128 so that distances decide the rounding there too.
double Bf16Value(uint16_t bits) {
  const double sign = (bits & 0x8000) ? -1.0 : 1.0;
  if ((bits & 0x7FFF) == 0x7F80) return sign * std::pow(2.0, 128);
  return static_cast<double>(std::bit_cast<float>(static_cast<uint32_t>(bits) << 16));
}

// Round-to-nearest-even to bf16 by comparing the distances to the two neighbours (in double,
// exactly), ties to the even mantissa; NaN -> 0x7FFF; Inf stays Inf.
uint16_t ReferenceBf16(float value) {
  if (std::isnan(value)) return 0x7FFF;
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  const uint16_t low = static_cast<uint16_t>(bits >> 16);  // truncation, toward zero
  if (std::isinf(value) || (bits & 0xFFFF) == 0) return low;
  const uint16_t high = static_cast<uint16_t>(low + 1);  // next magnitude away from zero
  const double v = value;
  const double d_low = std::fabs(v - Bf16Value(low));
  const double d_high = std::fabs(Bf16Value(high) - v);
  if (d_low < d_high) return low;
  if (d_high < d_low) return high;
  return (low & 1) ? high : low;
}

uint16_t Reference(uint8_t code, float scale) {
  // fp32 multiply of the exact fp8 value (float holds it exactly), then one rounding.
  const float product = static_cast<float>(DecodeE4M3(code)) * scale;
  return ReferenceBf16(product);
}

struct Case {
  std::vector<uint8_t> w;
  std::vector<float> scale;
};

// Random codes with every one of the 256 codes present (when the matrix has room), and random
// positive scales spanning tiny (denormal products) to large (overflow to Inf) magnitudes.
Case MakeCase(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  Case c;
  c.w.resize(static_cast<size_t>(rows * cols));
  for (size_t i = 0; i < c.w.size(); ++i) c.w[i] = static_cast<uint8_t>(rng());
  for (size_t i = 0; i < 256 && i < c.w.size(); ++i) {
    c.w[(i * 7919) % c.w.size()] = static_cast<uint8_t>(i);
  }
  const size_t nb = static_cast<size_t>(Fp8ScaleBlocks(rows) * Fp8ScaleBlocks(cols));
  std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
  std::uniform_int_distribution<int> exponent(-20, 4);
  for (size_t i = 0; i < nb; ++i) {
    float s = std::ldexp(mantissa(rng), exponent(rng));
    if (i % 11 == 3) s = std::ldexp(mantissa(rng), -135);  // denormal products
    if (i % 13 == 5) s = std::ldexp(mantissa(rng), 120);   // products past bf16 max -> Inf
    c.scale.push_back(s);
  }
  return c;
}

void ExpectMatchesReference(int64_t rows, int64_t cols, int num_threads, uint32_t seed) {
  SCOPED_TRACE(testing::Message() << rows << "x" << cols << " threads=" << num_threads);
  Case c = MakeCase(rows, cols, seed);
  std::vector<uint16_t> out(static_cast<size_t>(rows * cols), 0xDEAD);
  Fp8BlockDequantCpu(c.w.data(), c.scale.data(), rows, cols, out.data(), num_threads);
  const int64_t nb = Fp8ScaleBlocks(cols);
  int64_t mismatches = 0;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      const uint8_t code = c.w[i * cols + j];
      const float scale = c.scale[(i / 128) * nb + j / 128];
      const uint16_t want = Reference(code, scale);
      const uint16_t got = out[i * cols + j];
      if (got != want && ++mismatches <= 5) {
        ADD_FAILURE() << "[" << i << "][" << j << "] code 0x" << std::hex << int(code) << " scale "
                      << scale << ": got 0x" << got << " want 0x" << want;
      }
    }
  }
  EXPECT_EQ(mismatches, 0);
}

TEST(Fp8DequantCpuTest, MatchesReferenceOnRaggedShapes) {
  const std::pair<int64_t, int64_t> shapes[] = {{1, 1},     {1, 300},   {127, 129}, {128, 128},
                                                {129, 127}, {200, 300}, {7, 1000},  {256, 16},
                                                {130, 1},   {576, 512}, {64, 7168}};
  uint32_t seed = 1;
  for (auto [rows, cols] : shapes) ExpectMatchesReference(rows, cols, 0, seed++);
}

TEST(Fp8DequantCpuTest, DeepSeekShapeKvAProj) {
  // kv_a_proj_with_mqa: [576, 7168], scale [5, 56]; rows 512..575 use scale row 4.
  ExpectMatchesReference(576, 7168, 0, 42);
}

TEST(Fp8DequantCpuTest, ThreadCountsAgree) {
  for (int threads : {1, 2, 3, 8}) ExpectMatchesReference(700, 260, threads, 9);
}

TEST(Fp8DequantCpuTest, AllCodesTimesEdgeCaseScales) {
  // Every code against scales 1, 0, -1, a power of two, +Inf and NaN; NaN results are 0x7FFF.
  const float scales[] = {1.0f, 0.0f, -1.0f, 0x1p-7f, 3.0e38f, INFINITY, NAN, 0x1p-140f};
  for (float s : scales) {
    std::vector<uint8_t> w(256);
    for (int i = 0; i < 256; ++i) w[i] = static_cast<uint8_t>(i);
    std::vector<uint16_t> out(256);
    std::vector<float> grid = {s, s};
    Fp8BlockDequantCpu(w.data(), grid.data(), 1, 256, out.data());
    for (int i = 0; i < 256; ++i) {
      EXPECT_EQ(out[i], Reference(static_cast<uint8_t>(i), s)) << "code " << i << " scale " << s;
      EXPECT_EQ(out[i], Fp8DequantOne(static_cast<uint8_t>(i), s));
    }
  }
  // The NaN codes, exactly.
  const float one = 1.0f;
  EXPECT_EQ(Fp8DequantOne(0x7F, one), 0x7FFF);
  EXPECT_EQ(Fp8DequantOne(0xFF, one), 0x7FFF);
  EXPECT_EQ(Fp8DequantOne(0x7E, one), 0x43E0);  // 448
  EXPECT_EQ(Fp8DequantOne(0x01, one), 0x3B00);  // 2^-9
  EXPECT_EQ(Fp8DequantOne(0x80, one), 0x8000);  // -0
}

TEST(Fp8DequantCpuTest, EdgeBlocksUseTheirOwnScale) {
  // All codes 0x38 (= 1.0): the output is bf16(scale of the element's block).
  const int64_t rows = 300, cols = 260;  // blocks 3 x 3, the last ones partial (44 and 4)
  std::vector<uint8_t> w(rows * cols, 0x38);
  std::vector<float> scale(9);
  for (int i = 0; i < 9; ++i) scale[i] = static_cast<float>(i + 1) * 0.5f;
  std::vector<uint16_t> out(rows * cols);
  Fp8BlockDequantCpu(w.data(), scale.data(), rows, cols, out.data());
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      const float want = scale[(i / 128) * 3 + j / 128];
      ASSERT_EQ(out[i * cols + j], std::bit_cast<uint32_t>(want) >> 16) << i << "," << j;
    }
  }
}

TEST(Fp8DequantCpuTest, EmptyMatrixIsNoOp) {
  uint16_t sentinel = 0x1234;
  Fp8BlockDequantCpu(nullptr, nullptr, 0, 5, &sentinel);
  Fp8BlockDequantCpu(nullptr, nullptr, 5, 0, &sentinel);
  EXPECT_EQ(sentinel, 0x1234);
}

TEST(Fp8DequantCpuTest, ThroughputReport) {
  // Not a pass/fail check: prints the CPU rate for an expert-sized weight.
  const int64_t rows = 2048, cols = 7168;
  Case c = MakeCase(rows, cols, 3);
  std::vector<uint16_t> out(rows * cols);
  for (int threads : {1, 0}) {
    Fp8BlockDequantCpu(c.w.data(), c.scale.data(), rows, cols, out.data(), threads);  // warm
    const int reps = 5;
    const auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) {
      Fp8BlockDequantCpu(c.w.data(), c.scale.data(), rows, cols, out.data(), threads);
    }
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / reps;
    std::printf(
        "Fp8BlockDequantCpu %lldx%lld threads=%d: %.2f ms, %.2f GB/s of fp8 in "
        "(%.2f GB/s in+out)\n",
        static_cast<long long>(rows), static_cast<long long>(cols), threads, s * 1e3,
        rows * cols / s / 1e9, 3.0 * rows * cols / s / 1e9);
  }
}

TEST(Fp8DequantLaunchTest, ArgumentErrorsNameTheArgument) {
  uint8_t w = 0;
  float s = 1.0f;
  uint16_t out = 0;
  absl::Status st = LaunchFp8BlockDequant(&w, &s, -1, 1, &out, nullptr);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("rows = -1"), std::string::npos) << st;
  st = LaunchFp8BlockDequant(&w, &s, 1, -2, &out, nullptr);
  EXPECT_NE(st.message().find("cols = -2"), std::string::npos) << st;
  st = LaunchFp8BlockDequant(nullptr, &s, 1, 1, &out, nullptr);
  EXPECT_NE(st.message().find("w is null"), std::string::npos) << st;
  st = LaunchFp8BlockDequant(&w, nullptr, 1, 1, &out, nullptr);
  EXPECT_NE(st.message().find("scale_inv is null"), std::string::npos) << st;
  st = LaunchFp8BlockDequant(&w, &s, 1, 1, nullptr, nullptr);
  EXPECT_NE(st.message().find("out_bf16 is null"), std::string::npos) << st;
  st = LaunchFp8BlockDequant(&w, &s, int64_t{1} << 40, int64_t{1} << 40, &out, nullptr);
  EXPECT_NE(st.message().find("overflows"), std::string::npos) << st;
  EXPECT_TRUE(LaunchFp8BlockDequant(nullptr, nullptr, 0, 7, nullptr, nullptr).ok());
}

TEST(Fp8DequantLaunchTest, IsSupportedGivesAClearAnswer) {
  absl::Status st = Fp8BlockDequantIsSupported(0);
  if (!Fp8DequantCudaBuilt()) {
    EXPECT_EQ(st.code(), absl::StatusCode::kUnimplemented) << st;
    EXPECT_NE(st.message().find("MQ_ENABLE_CUDA=ON"), std::string::npos) << st;
    uint8_t w = 0;
    float s = 1.0f;
    uint16_t out = 0;
    EXPECT_EQ(LaunchFp8BlockDequant(&w, &s, 1, 1, &out, nullptr).code(),
              absl::StatusCode::kUnimplemented);
  } else if (!st.ok()) {
    // A CUDA build on a machine without a (Hopper) GPU: a precondition, with the reason.
    EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
    EXPECT_FALSE(st.message().empty());
  }
  EXPECT_FALSE(Fp8BlockDequantIsSupported(-1).ok());
}

}  // namespace
}  // namespace mq::kernels
