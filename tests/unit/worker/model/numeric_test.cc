#include "worker/model/numeric.h"

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include "gtest/gtest.h"

namespace mq::model {
namespace {

float Bits(uint32_t bits) { return std::bit_cast<float>(bits); }

TEST(Fp8E4M3Test, DecodesKnownCodes) {
  EXPECT_EQ(Fp8E4M3ToFloat(0x00), 0.0f);
  EXPECT_FALSE(std::signbit(Fp8E4M3ToFloat(0x00)));
  EXPECT_EQ(Fp8E4M3ToFloat(0x80), 0.0f);
  EXPECT_TRUE(std::signbit(Fp8E4M3ToFloat(0x80)));
  EXPECT_EQ(Fp8E4M3ToFloat(0x01), std::ldexp(1.0f, -9));  // smallest subnormal 1/8·2^-6
  EXPECT_EQ(Fp8E4M3ToFloat(0x07), 7 * std::ldexp(1.0f, -9));
  EXPECT_EQ(Fp8E4M3ToFloat(0x08), std::ldexp(1.0f, -6));  // smallest normal
  EXPECT_EQ(Fp8E4M3ToFloat(0x38), 1.0f);
  EXPECT_EQ(Fp8E4M3ToFloat(0xB8), -1.0f);
  EXPECT_EQ(Fp8E4M3ToFloat(0x39), 1.125f);
  EXPECT_EQ(Fp8E4M3ToFloat(0x7E), 448.0f);
  EXPECT_EQ(Fp8E4M3ToFloat(0xFE), -448.0f);
  EXPECT_TRUE(std::isnan(Fp8E4M3ToFloat(0x7F)));
  EXPECT_TRUE(std::isnan(Fp8E4M3ToFloat(0xFF)));
  EXPECT_EQ(Fp8E4M3ToFloat(0x78), 256.0f);  // exponent 15 is a normal exponent (no Inf)
}

TEST(Fp8E4M3Test, AllCodesRoundTripThroughDecodeAndEncode) {
  for (int code = 0; code < 256; ++code) {
    EXPECT_EQ(FloatToFp8E4M3(Fp8E4M3ToFloat(static_cast<uint8_t>(code))), code) << code;
  }
}

TEST(Fp8E4M3Test, PositiveCodesIncreaseStrictly) {
  for (int code = 1; code <= 0x7E; ++code) {
    EXPECT_LT(Fp8E4M3ToFloat(code - 1), Fp8E4M3ToFloat(code)) << code;
    EXPECT_EQ(Fp8E4M3ToFloat(code | 0x80), -Fp8E4M3ToFloat(code)) << code;
  }
}

TEST(Fp8E4M3Test, RoundsToNearestEvenBetweenEveryPairOfCodes) {
  for (int code = 0; code < 0x7E; ++code) {
    const float lo = Fp8E4M3ToFloat(code);
    const float hi = Fp8E4M3ToFloat(code + 1);
    const float mid = (lo + hi) / 2;  // exact in f32
    const int even = (code % 2 == 0) ? code : code + 1;
    EXPECT_EQ(FloatToFp8E4M3(mid), even) << "tie above code " << code;
    EXPECT_EQ(FloatToFp8E4M3(-mid), even | 0x80) << "tie above code " << code;
    EXPECT_EQ(FloatToFp8E4M3(std::nextafter(mid, 0.0f)), code) << code;
    EXPECT_EQ(FloatToFp8E4M3(std::nextafter(mid, 1000.0f)), code + 1) << code;
  }
}

TEST(Fp8E4M3Test, OutOfRangeBecomesNanLikeTorch) {
  EXPECT_EQ(FloatToFp8E4M3(464.0f), 0x7E);  // tie between 448 and the NaN code: even = 448
  EXPECT_EQ(FloatToFp8E4M3(-464.0f), 0xFE);
  EXPECT_EQ(FloatToFp8E4M3(std::nextafter(464.0f, 1000.0f)), 0x7F);
  EXPECT_EQ(FloatToFp8E4M3(480.0f), 0x7F);
  EXPECT_EQ(FloatToFp8E4M3(1e9f), 0x7F);
  EXPECT_EQ(FloatToFp8E4M3(-1e9f), 0xFF);
  EXPECT_EQ(FloatToFp8E4M3(std::numeric_limits<float>::infinity()), 0x7F);
  EXPECT_EQ(FloatToFp8E4M3(-std::numeric_limits<float>::infinity()), 0xFF);
  EXPECT_EQ(FloatToFp8E4M3(std::numeric_limits<float>::quiet_NaN()), 0x7F);
  EXPECT_EQ(FloatToFp8E4M3(-std::numeric_limits<float>::quiet_NaN()), 0xFF);
}

TEST(Fp8E4M3Test, TinyValuesAndSignedZero) {
  EXPECT_EQ(FloatToFp8E4M3(0.0f), 0x00);
  EXPECT_EQ(FloatToFp8E4M3(-0.0f), 0x80);
  EXPECT_EQ(FloatToFp8E4M3(std::ldexp(1.0f, -10)), 0x00);  // half the smallest subnormal: even
  EXPECT_EQ(FloatToFp8E4M3(std::nextafter(std::ldexp(1.0f, -10), 1.0f)), 0x01);
  EXPECT_EQ(FloatToFp8E4M3(-1e-30f), 0x80);
  EXPECT_EQ(FloatToFp8E4M3(std::numeric_limits<float>::denorm_min()), 0x00);
}

// Reference encoder: nearest code by exact distance, ties to the even code, torch's NaN rule.
uint8_t ReferenceEncode(float x) {
  if (std::isnan(x)) return std::signbit(x) ? 0xFF : 0x7F;
  const uint8_t sign = std::signbit(x) ? 0x80 : 0x00;
  const double a = std::fabs(static_cast<double>(x));
  if (a > 464.0) return sign | 0x7F;
  int best = 0;
  double best_distance = std::numeric_limits<double>::infinity();
  for (int code = 0; code <= 0x7E; ++code) {
    const double d = std::fabs(a - Fp8E4M3ToFloat(code));
    if (d < best_distance || (d == best_distance && code % 2 == 0)) {
      best = code;
      best_distance = d;
    }
  }
  return sign | best;
}

TEST(Fp8E4M3Test, MatchesReferenceOnRandomInputs) {
  std::mt19937_64 rng(42);  // only the inputs are random; any sequence is fine
  std::uniform_real_distribution<float> wide(-500.0f, 500.0f);
  std::uniform_real_distribution<float> narrow(-0.05f, 0.05f);
  for (int i = 0; i < 200000; ++i) {
    const float a = wide(rng);
    const float b = narrow(rng);
    const float c = Bits(static_cast<uint32_t>(rng()));
    ASSERT_EQ(FloatToFp8E4M3(a), ReferenceEncode(a)) << a;
    ASSERT_EQ(FloatToFp8E4M3(b), ReferenceEncode(b)) << b;
    ASSERT_EQ(FloatToFp8E4M3(c), ReferenceEncode(c)) << c;
  }
}

TEST(Bf16Test, RoundsToNearestEven) {
  EXPECT_EQ(FloatToBf16(Bits(0x3F800000)), 0x3F80);  // 1.0 exact
  EXPECT_EQ(FloatToBf16(Bits(0x3F808000)), 0x3F80);  // tie, even stays
  EXPECT_EQ(FloatToBf16(Bits(0x3F818000)), 0x3F82);  // tie, odd rounds up
  EXPECT_EQ(FloatToBf16(Bits(0x3F808001)), 0x3F81);  // just above the tie
  EXPECT_EQ(FloatToBf16(Bits(0x3F807FFF)), 0x3F80);  // just below the tie
  EXPECT_EQ(FloatToBf16(Bits(0xBF818000)), 0xBF82);  // negative tie
  EXPECT_EQ(FloatToBf16(Bits(0x3FFF8000)), 0x4000);  // carry into the exponent
  EXPECT_EQ(FloatToBf16(-0.0f), 0x8000);
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(FloatToBf16(Bits(0x00018000)), 0x0002);  // subnormal tie, odd rounds up
}

TEST(Bf16Test, InfinityOverflowAndNan) {
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::infinity()), 0x7F80);
  EXPECT_EQ(FloatToBf16(-std::numeric_limits<float>::infinity()), 0xFF80);
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::max()), 0x7F80);  // rounds past the range
  EXPECT_EQ(FloatToBf16(Bits(0x7F7F7FFF)), 0x7F7F);
  const uint16_t nan = FloatToBf16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_TRUE(std::isnan(Bf16ToFloat(nan)));
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(Bits(0x7F800001)))));  // signaling, low payload
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(Bits(0xFFFFFFFF)))));
  EXPECT_TRUE(std::signbit(Bf16ToFloat(FloatToBf16(Bits(0xFF800001)))));
}

TEST(Bf16Test, EveryBf16ValueRoundTrips) {
  for (uint32_t bits = 0; bits <= 0xFFFF; ++bits) {
    const float f = Bf16ToFloat(static_cast<uint16_t>(bits));
    EXPECT_EQ(std::bit_cast<uint32_t>(f), bits << 16);
    if (!std::isnan(f)) {
      EXPECT_EQ(FloatToBf16(f), bits) << bits;
    }
  }
}

}  // namespace
}  // namespace mq::model
