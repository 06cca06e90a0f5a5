// Loading checkpoint weights as bf16: FP8 block dequantization (FORMATS.md §2.3) and plain
// float conversions, on the CPU.
//
// Stateless functions; safe from any thread (CheckpointReader::Get is thread-safe).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/model/checkpoint_reader.h"

namespace mq::model {

// Suffix of the dequant multiplier of an FP8 weight: "<weight>_scale_inv".
inline constexpr const char* kScaleInvSuffix = "_scale_inv";

// Returns `weight_name` as row-major bf16 bit patterns (prod(shape) elements):
//   * F8_E4M3: must be 2-D [r, c] with an F32 "<weight_name>_scale_inv" of shape
//     [ceil(r/128), ceil(c/128)]; out = bf16_rne(fp8 · scale_inv[i/128][j/128]) with the fp32
//     multiply (mq::kernels::Fp8BlockDequantCpu, multithreaded for large weights);
//   * BF16: copied;  F32, F16: converted with round-to-nearest-even.
// Errors name the tensor: NotFound for a missing weight or missing scale; InvalidArgument for
// an FP8 weight that is not 2-D, a scale of the wrong dtype or shape, or any other dtype.
absl::StatusOr<std::vector<uint16_t>> LoadAsBf16(CheckpointReader& reader,
                                                 const std::string& weight_name);

// The same for views already in hand (`scale_inv` is ignored unless `weight` is F8_E4M3; it may
// be null otherwise). `num_threads` as in Fp8BlockDequantCpu (0 = pick from the size).
absl::StatusOr<std::vector<uint16_t>> ViewAsBf16(const TensorView& weight,
                                                 const TensorView* scale_inv, int num_threads = 0);

// The block scales of FP8 `weight` (F8_E4M3 [r, c]) from `scale_inv`, checked (F32 of shape
// [ceil(r/128), ceil(c/128)]) and copied to aligned storage, row-major. The same errors as
// ViewAsBf16 for a weight that is not 2-D, a null `scale_inv`, or a scale of the wrong dtype or
// shape.
absl::StatusOr<std::vector<float>> Fp8BlockScales(const TensorView& weight,
                                                   const TensorView* scale_inv);

// The "<weight_name>_scale_inv" view of `reader`; NotFound naming the weight and the checkpoint
// when there is none.
absl::StatusOr<TensorView> Fp8ScaleView(CheckpointReader& reader, const std::string& weight_name);

}  // namespace mq::model
