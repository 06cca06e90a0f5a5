// Scalar float conversions used by checkpoint writers and tests: f32 <-> bf16 and
// f32 <-> FP8 e4m3fn (FORMATS.md §1.2).
//
// Pure functions with no state; safe from any thread. They assume the default floating-point
// environment (round-to-nearest, no flush-to-zero), as torch's CPU conversions do.
#pragma once

#include <cstdint>

namespace mq::model {

// f32 -> bf16 bits, round-to-nearest-even: bit-identical to torch's `.to(torch.bfloat16)` for
// every non-NaN input (finite values that round past the bf16 range become ±Inf, as in torch).
// A NaN stays a quiet NaN with its sign kept (sign | 0x7FC0 | top payload bits); torch's own NaN
// bits differ between its scalar and vectorized paths, so only "is NaN" is guaranteed to match.
uint16_t FloatToBf16(float value);

// bf16 bits -> f32 (exact: the bits become the upper half of the f32).
float Bf16ToFloat(uint16_t bits);

// f32 -> FP8 e4m3fn code, round-to-nearest-even; bit-identical to torch's
// `.to(torch.float8_e4m3fn)` (c10 `fp8e4m3fn_from_fp32_value`) for every input, which means:
//   * |value| <= 464 rounds to the nearest code (464, the tie between 448 and the NaN code,
//     rounds to even, i.e. ±448 = 0x7E/0xFE); subnormals m/8·2^-6 and ±0 are produced exactly;
//   * |value| > 464, ±Inf and NaN give NaN: 0x7F, or 0xFF when the sign bit is set.
// torch does NOT saturate. Callers that need saturation clamp to [-448, 448] first (a
// block-scaled quantizer dividing by amax/448 never leaves that range).
uint8_t FloatToFp8E4M3(float value);

// FP8 e4m3fn code -> f32, exact. 0x7F and 0xFF are NaN (there is no Inf); exponent field 0
// is subnormal: (m/8)·2^-6; otherwise (1 + m/8)·2^(e-7). Largest finite value ±448.
float Fp8E4M3ToFloat(uint8_t code);

// Largest finite FP8 e4m3fn magnitude.
inline constexpr float kFp8E4M3Max = 448.0f;

}  // namespace mq::model
