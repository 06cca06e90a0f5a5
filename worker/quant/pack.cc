#include "worker/quant/pack.h"

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "kernels/torch/pack_ops.h"
#include "worker/model/packed_int4.h"
#include "worker/quant/validate.h"

namespace mq::quant {
namespace {

constexpr int64_t kPerWord = 8;  // 4-bit values per int32 word
constexpr char kOutOfRange[] = "codes: values must be in [-8, 7] for 4-bit packing";

bool IsIntegral(const at::Tensor& t) {
  return at::isIntegralType(t.scalar_type(), /*includeBool=*/false);
}

}  // namespace

absl::StatusOr<at::Tensor> PackInt4(const at::Tensor& codes) {
  if (!codes.defined() || codes.dim() != 2 || !IsIntegral(codes)) {
    return absl::InvalidArgumentError(
        absl::StrCat("codes ", codes.defined() ? SizesString(codes) : "undefined",
                     ": must be a 2-D integer tensor"));
  }
  // Contiguous int8 codes on a CUDA device with the kernel available: one kernel and one sync
  // (reading the out-of-range count). Everything else takes the ATen path below; both give the
  // same bits.
  if (codes.is_cuda() && codes.scalar_type() == at::kChar && codes.is_contiguous() &&
      kernels::PackInt4TorchSupported(codes.device()).ok()) {
    kernels::PackInt4CudaResult packed;
    if (absl::Status s = kernels::PackInt4Cuda(codes, &packed); !s.ok()) return s;
    if (packed.out_of_range.item<int64_t>() != 0) return absl::InvalidArgumentError(kOutOfRange);
    return std::move(packed.packed);
  }
  const int64_t rows = codes.size(0);
  const int64_t cols = codes.size(1);
  const int64_t words = (cols + kPerWord - 1) / kPerWord;
  at::Tensor u = codes.to(at::kLong).add(8);
  if (u.numel() > 0 && (u.min().item<int64_t>() < 0 || u.max().item<int64_t>() > 15)) {
    return absl::InvalidArgumentError(kOutOfRange);
  }
  if (words * kPerWord != cols) u = at::constant_pad_nd(u, {0, words * kPerWord - cols}, 0);
  at::Tensor shifts = at::arange(0, 4 * kPerWord, 4, u.options());
  // Nibbles do not overlap, so the sum is the bitwise OR; computed in int64 and mapped to the
  // int32 with the same bit pattern (two's complement).
  at::Tensor word = u.reshape({rows, words, kPerWord}).bitwise_left_shift(shifts).sum(-1);
  word = at::where(word >= (int64_t{1} << 31), word - (int64_t{1} << 32), word);
  return word.to(at::kInt);
}

absl::StatusOr<at::Tensor> UnpackInt4(const at::Tensor& packed, int64_t cols) {
  return model::UnpackInt4(packed, cols);  // the engine's loader reads packed weights with it too
}

absl::StatusOr<PackedWeight> PackWeight(const QuantizedWeight& q) {
  if (q.bits != 4) {
    return absl::InvalidArgumentError(
        absl::StrCat("bits = ", q.bits, ": pack-quantized packing here supports 4 only"));
  }
  if (!q.codes.defined() || q.codes.dim() != 2 || !q.scales.defined() || q.scales.dim() != 2) {
    return absl::InvalidArgumentError("quantized weight: codes and scales must be 2-D tensors");
  }
  const int64_t rows = q.codes.size(0);
  const int64_t cols = q.codes.size(1);
  const int64_t groups = NumGroups(cols, q.group_size);
  if (q.scales.size(0) != rows || q.scales.size(1) != groups) {
    return absl::InvalidArgumentError(
        absl::StrCat("scales ", SizesString(q.scales), ": must be [", rows, ", ", groups,
                     "] for codes ", SizesString(q.codes), " and group_size ", q.group_size));
  }
  PackedWeight out;
  out.group_size = q.group_size;
  absl::StatusOr<at::Tensor> packed = PackInt4(q.codes);
  if (!packed.ok()) return packed.status();
  out.weight_packed = *std::move(packed);
  out.weight_scale = q.scales.to(at::kBFloat16).contiguous();
  out.weight_shape = at::tensor(std::vector<int64_t>{rows, cols}, at::TensorOptions(at::kLong));
  if (q.zero_points.defined()) {
    if (q.zero_points.sizes() != q.scales.sizes()) {
      return absl::InvalidArgumentError(absl::StrCat("zero_points ", SizesString(q.zero_points),
                                                     ": must be shaped like scales ",
                                                     SizesString(q.scales)));
    }
    absl::StatusOr<at::Tensor> zp = PackInt4(q.zero_points.t());
    if (!zp.ok()) return zp.status();
    out.weight_zero_point = zp->t().contiguous();
  }
  return out;
}

absl::StatusOr<at::Tensor> DequantizePacked(const PackedWeight& packed) {
  if (!packed.weight_shape.defined() || packed.weight_shape.numel() != 2) {
    return absl::InvalidArgumentError("weight_shape: must hold [O, I]");
  }
  at::Tensor shape = packed.weight_shape.to(at::kCPU, at::kLong);
  const int64_t rows = shape[0].item<int64_t>();
  const int64_t cols = shape[1].item<int64_t>();
  absl::StatusOr<at::Tensor> codes = UnpackInt4(packed.weight_packed, cols);
  if (!codes.ok()) return codes.status();
  const int64_t groups = NumGroups(cols, packed.group_size);
  if (codes->size(0) != rows || !packed.weight_scale.defined() ||
      packed.weight_scale.sizes() != at::IntArrayRef({rows, groups})) {
    return absl::InvalidArgumentError(
        absl::StrCat("weight_scale ",
                     packed.weight_scale.defined() ? SizesString(packed.weight_scale) : "undefined",
                     " / weight_packed ", SizesString(packed.weight_packed),
                     ": inconsistent with weight_shape [", rows, ", ", cols, "] and group_size ",
                     packed.group_size));
  }
  at::Tensor zero;
  if (packed.weight_zero_point.defined()) {
    absl::StatusOr<at::Tensor> zp = UnpackInt4(packed.weight_zero_point.t(), rows);
    if (!zp.ok()) return zp.status();
    zero = ExpandGroups(zp->t(), cols, packed.group_size);
  }
  return DequantizeCodes(*codes, ExpandGroups(packed.weight_scale, cols, packed.group_size), zero);
}

}  // namespace mq::quant
