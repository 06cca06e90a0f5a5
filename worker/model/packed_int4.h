// Reading compressed-tensors `pack-quantized` 4-bit linears (FORMATS.md §4.1–§4.3) back into
// dense weights: the one place that unpacks int4 words (worker/quant/pack.h's UnpackInt4 and
// DequantizePacked go through UnpackInt4 here).
//
//  weight_packed      int32 [O, ceil(I/8)]: word w of row o holds u = q + 8 of columns 8w+k in
//                     bits 4k..4k+3 (lowest nibble = lowest column).
//  weight_scale       [O, NG] (any float dtype; mq writes BF16). NG = 1: per-channel; otherwise
//                     group size G = I / NG and column j uses group j / G. I must be a multiple
//                     of NG: a short last group (which mq never writes and vLLM cannot run)
//                     would make G ambiguous without the config, and is refused.
//  weight_shape       int64 (or int32) [2] = [O, I].
//  weight_zero_point  asymmetric only: int32 [ceil(O/8), NG], zero points + 8 packed along dim 0.
//
// Dequantization is compressed-tensors' (and worker/quant's DequantizeCodes):
//   w' = bf16( float(q − zp) · float(s) ),   zp = 0 when there is no zero-point tensor,
// so the result equals the quantizer's in-memory dequantized weight bit for bit.
//
// For engine code only (includes ATen; never include together with a .pb.h, DESIGN.md §7).
// Threading: pure functions, no shared state; CPU or CUDA tensors, results on the input's device.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "absl/status/statusor.h"

namespace mq::model {

// Unpacks int32 words [R, ceil(cols/8)] into signed codes int8 [R, cols] in [-8, 7] (u − 8).
// InvalidArgument when `packed` is not a 2-D int32 tensor with ceil(cols/8) columns.
absl::StatusOr<at::Tensor> UnpackInt4(const at::Tensor& packed, int64_t cols);

// The tensors of one pack-quantized linear as stored (any device; weight_shape is read on the
// CPU). weight_zero_point undefined = symmetric.
struct PackedInt4Linear {
  at::Tensor weight_packed;
  at::Tensor weight_scale;
  at::Tensor weight_shape;
  at::Tensor weight_zero_point;
};

// The dense bf16 [O, I] weight (formula above), on weight_packed's device. InvalidArgument
// naming the tensor for a wrong dtype or shape: weight_shape not 2 positive integers,
// weight_packed not int32 [O, ceil(I/8)], weight_scale not a float [O, NG] with I % NG == 0,
// weight_zero_point not int32 [ceil(O/8), NG].
absl::StatusOr<at::Tensor> DequantizePackedInt4(const PackedInt4Linear& linear);

}  // namespace mq::model
