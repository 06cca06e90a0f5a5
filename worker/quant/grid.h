// Quantization grids shared by RTN and GPTQ (FORMATS.md §4.3, DESIGN.md §4): per-group scales
// (and zero points) computed once from a weight in its ORIGINAL column order, and the exact
// quantize / dequantize rules of compressed-tensors.
//
// Conventions (one for the whole of worker/quant):
//  * Integer codes are SIGNED, in [qmin, qmax] = [-2^(bits-1), 2^(bits-1) - 1] ([-8, 7] for 4
//    bits), for symmetric and asymmetric grids alike — compressed-tensors' convention. Packing
//    (pack.h) stores code + 8.
//  * Quantize: code = clamp(round_half_even(w / s + zp), qmin, qmax) in fp32 (zp = 0 when
//    symmetric). Dequantize: w' = bf16(float(code - zp) · s) — the product is exact in fp32, so
//    this is one round-to-nearest-even and equals compressed-tensors' bf16 decompression bit for
//    bit.
//  * Scales are rounded to bf16 (the checkpoint's scale dtype, FORMATS.md §4.4) BEFORE any code
//    is computed, so what GPTQ optimises is exactly what a loader reconstructs. A scale that is
//    zero or subnormal after rounding becomes bf16 eps (2^-7), as compressed-tensors does for 0.
//  * Groups are `group_size` consecutive input columns of the original order: group g = columns
//    [g·G, (g+1)·G); the last group is shorter when G does not divide I. group_size 0 means
//    per-channel (one group spanning all I columns, scale [O, 1]).
//
// Min-max grid (compressed-tensors' observer): mn = min(min(w), 0), mx = max(max(w), 0).
//   symmetric:  s = max(|mn|, mx) / ((qmax - qmin) / 2)          (= absmax / 7.5 for 4 bits)
//   asymmetric: s = (mx - mn) / (qmax - qmin), zp = clamp(round(qmin - mn / s), qmin, qmax),
//               zp computed from the bf16-rounded s.
// MSE grid search (DESIGN.md §4 "that actually runs"): candidates p_k = 1 - k·(1 - min_shrink)/
// (n - 1), k = 0..n-1 (1.0 down to min_shrink, default 80 points down to 0.2); candidate k
// shrinks the min-max range by p_k (symmetric: s_k = bf16(p_k · s); asymmetric: mn·p_k, mx·p_k
// with s and zp recomputed) and each group keeps the candidate minimising
// Σ |dequant(quant(w)) - w|^norm over its columns (default norm 2.4, the value of the GPTQ
// reference code and MoE-Quant; norm 2 is plain squared error). Ties keep the larger p (p = 1
// first), so mse never does worse than min-max on this loss. The loss is not Hessian-weighted.
//
// For torch code only (includes ATen; never include together with a .pb.h, DESIGN.md §7).
// Threading: pure functions, no shared state; tensors may live on any device (CPU or CUDA), and
// results are on the input's device.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mq::quant {

enum class ScaleSearch { kMinMax, kMse };

// "minmax" / "mse".
std::string ScaleSearchName(ScaleSearch search);
// Inverse of ScaleSearchName; InvalidArgument naming the value otherwise.
absl::StatusOr<ScaleSearch> ParseScaleSearch(const std::string& name);

struct GridOptions {
  int bits = 4;              // 2..8 (pack.h packs 4 only)
  int64_t group_size = 128;  // > 0, or 0 = per-channel
  bool symmetric = true;     // false = asymmetric with per-group zero points
  ScaleSearch scale_search = ScaleSearch::kMinMax;
  int mse_grid_points = 80;     // >= 2 candidates p_k from 1.0 down to mse_min_shrink
  double mse_min_shrink = 0.2;  // in (0, 1]
  double mse_norm = 2.4;        // > 0; exponent of the per-element error in the search loss
};

// InvalidArgument naming the field, its value and what is allowed.
absl::Status ValidateGridOptions(const GridOptions& options);

inline int64_t QMin(int bits) { return -(int64_t{1} << (bits - 1)); }
inline int64_t QMax(int bits) { return (int64_t{1} << (bits - 1)) - 1; }

// Columns per group: group_size, or in_features for per-channel (group_size 0).
int64_t EffectiveGroupSize(int64_t in_features, int64_t group_size);
// ceil(in_features / EffectiveGroupSize): the scale tensor's second dimension.
int64_t NumGroups(int64_t in_features, int64_t group_size);

// A weight's grid. Both tensors fp32 [O, NumGroups]; scales are > 0 and exactly representable
// in bf16; zero points are integral in [qmin, qmax] and undefined (not defined()) when symmetric.
struct Grid {
  at::Tensor scales;
  at::Tensor zero_points;
};

// The grid of `w` ([O, I], finite, any float dtype) under `options` (validated by the caller).
Grid ComputeGrid(const at::Tensor& w, const GridOptions& options);

// Expands per-group values [O, NumGroups] to per-column [O, I] (column j gets group j / G).
at::Tensor ExpandGroups(const at::Tensor& per_group, int64_t in_features, int64_t group_size);

// Codes (fp32 tensor of integral values) of `w` given per-element-broadcastable scale and zero
// point tensors (`zero_point` undefined = symmetric): clamp(round(w / s + zp), qmin, qmax).
at::Tensor QuantizeCodes(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero_point,
                         int bits);
// bf16(float(codes - zp) · s), broadcasting like QuantizeCodes. Returns bf16. Codes (any
// dtype holding integral values) go through int32 first, so a code of -0.0 dequantizes to +0
// exactly as compressed-tensors' integer codes do.
at::Tensor DequantizeCodes(const at::Tensor& codes, const at::Tensor& scale,
                           const at::Tensor& zero_point);

// A quantized weight in our in-memory form (input of pack.h).
struct QuantizedWeight {
  at::Tensor codes;        // int8 [O, I], signed, in [qmin, qmax]
  at::Tensor scales;       // bf16 [O, NumGroups]
  at::Tensor zero_points;  // int8 [O, NumGroups] in [qmin, qmax]; undefined when symmetric
  at::Tensor dequantized;  // bf16 [O, I] = DequantizeCodes(codes, scales, zero_points) per group
  int bits = 4;
  int64_t group_size = 128;  // as requested: 0 = per-channel
};

// Builds a QuantizedWeight from fp32 codes [O, I] and the grid they were computed with
// (computes `dequantized`).
QuantizedWeight MakeQuantizedWeight(const at::Tensor& codes, const Grid& grid,
                                    const GridOptions& options);

// OK when every element of `t` is finite (one device sync for CUDA tensors).
bool AllFinite(const at::Tensor& t);

}  // namespace mq::quant
