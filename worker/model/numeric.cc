#include "worker/model/numeric.h"

#include <bit>
#include <cmath>
#include <limits>

namespace mq::model {

uint16_t FloatToBf16(float value) {
  uint32_t bits = std::bit_cast<uint32_t>(value);
  if (std::isnan(value)) {
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);  // quiet, sign kept
  }
  // Round to nearest, ties to even: add 0x7FFF plus the lowest kept bit, then truncate.
  // Overflow past the largest bf16 carries into the exponent and yields Inf, like torch.
  uint32_t rounding_bias = 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding_bias) >> 16);
}

float Bf16ToFloat(uint16_t bits) { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }

uint8_t FloatToFp8E4M3(float value) {
  // Port of c10::detail::fp8e4m3fn_from_fp32_value (torch/c10/util/Float8_e4m3fn.h) so the
  // results match torch bit for bit, including NaN for out-of-range inputs.
  constexpr uint32_t kFp8Max = UINT32_C(1087) << 20;     // 480.0f: first value that maps to NaN
  constexpr uint32_t kDenormMask = UINT32_C(141) << 23;  // 2^14 as f32
  uint32_t f_bits = std::bit_cast<uint32_t>(value);
  const uint32_t sign = f_bits & UINT32_C(0x80000000);
  f_bits ^= sign;
  uint8_t result;
  if (f_bits >= kFp8Max) {
    // NaN, Inf and |value| >= 480 (464 < |value| < 480 reach 0x7F through rounding below).
    result = 0x7F;
  } else if (f_bits < (UINT32_C(121) << 23)) {
    // |value| < 2^-6: subnormal or zero. Adding 2^14 aligns the fp8 subnormal quantum (2^-9)
    // with the f32 mantissa LSB, so the FPU's round-to-nearest-even does the rounding.
    f_bits =
        std::bit_cast<uint32_t>(std::bit_cast<float>(f_bits) + std::bit_cast<float>(kDenormMask));
    result = static_cast<uint8_t>(f_bits - kDenormMask);
  } else {
    // Normal: rebias the exponent (127 -> 7) and round the mantissa to 3 bits, ties to even.
    const uint32_t mant_odd = (f_bits >> 20) & 1u;
    f_bits += (static_cast<uint32_t>(7 - 127) << 23) + UINT32_C(0x7FFFF);
    f_bits += mant_odd;
    result = static_cast<uint8_t>(f_bits >> 20);
  }
  return static_cast<uint8_t>(result | (sign >> 24));
}

float Fp8E4M3ToFloat(uint8_t code) {
  const bool negative = (code & 0x80u) != 0;
  const int exponent = (code >> 3) & 0xF;
  const int mantissa = code & 0x7;
  float magnitude;
  if (exponent == 0xF && mantissa == 0x7) {
    magnitude = std::numeric_limits<float>::quiet_NaN();
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -9);  // (m/8)·2^-6
  } else {
    magnitude = std::ldexp(static_cast<float>(8 + mantissa), exponent - 7 - 3);  // (1+m/8)·2^(e-7)
  }
  return negative ? -magnitude : magnitude;
}

}  // namespace mq::model
