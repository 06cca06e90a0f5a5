// compressed-tensors `pack-quantized` tensors for 4-bit weights (FORMATS.md §4.1–§4.3, §6 items
// 9–14), bit-exact with compressed-tensors 0.20 (`pack_to_int32` / `unpack_from_int32` /
// `PackedQuantizationCompressor.decompress`).
//
//  weight_packed      int32 [O, ceil(I/8)]: word w of row o holds u = code + 8 of columns 8w+k in
//                     bits 4k..4k+3 (lowest nibble = lowest column); a short last word is padded
//                     with u = 0. Little-endian on disk (the host order of every supported host).
//  weight_scale       bf16 [O, NumGroups] (channel: [O, 1]).
//  weight_shape       int64 [2] = [O, I].
//  weight_zero_point  asymmetric only: int32 [ceil(O/8), NumGroups], the signed zero points + 8
//                     packed along dim 0 (8 output rows per word, same nibble order). Symmetric
//                     weights have no zero-point tensor (compressed-tensors implies 0, i.e. 8).
//
// Decompression (compressed-tensors): w' = bf16(bf16(q) − bf16(zp)) · bf16(s)) with q = u − 8,
// i.e. bf16(float(q − zp) · s) — DequantizePacked reproduces it bit for bit and equals
// QuantizedWeight::dequantized.
//
// For torch code only (includes ATen; never include together with a .pb.h, DESIGN.md §7).
// Threading: pure functions, no shared state; CPU or CUDA tensors, results on the input's device.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "absl/status/statusor.h"
#include "worker/quant/grid.h"

namespace mq::quant {

struct PackedWeight {
  at::Tensor weight_packed;      // int32 [O, ceil(I/8)]
  at::Tensor weight_scale;       // bf16 [O, NumGroups]
  at::Tensor weight_shape;       // int64 [2] = [O, I] (always on CPU)
  at::Tensor weight_zero_point;  // int32 [ceil(O/8), NumGroups]; undefined when symmetric
  int64_t group_size = 128;      // as quantized: 0 = per-channel (not stored in the tensors)
};

// Packs signed 4-bit codes ([R, C], any integer dtype, values in [-8, 7]) along dim 1 into int32
// [R, ceil(C/8)]. InvalidArgument for a non-2-D or non-integer tensor or an out-of-range value.
absl::StatusOr<at::Tensor> PackInt4(const at::Tensor& codes);
// Inverse of PackInt4: int8 [R, cols] in [-8, 7]. InvalidArgument when `packed` is not int32
// [R, ceil(cols/8)]. This is model::UnpackInt4 (worker/model/packed_int4.h), the one unpacker.
absl::StatusOr<at::Tensor> UnpackInt4(const at::Tensor& packed, int64_t cols);

// The compressed-tensors tensors of a 4-bit QuantizedWeight. InvalidArgument when bits != 4 or
// the tensors are inconsistent.
absl::StatusOr<PackedWeight> PackWeight(const QuantizedWeight& q);
// compressed-tensors' decompression of `packed` (bf16 [O, I]). InvalidArgument for inconsistent
// tensors.
absl::StatusOr<at::Tensor> DequantizePacked(const PackedWeight& packed);

}  // namespace mq::quant
