#include "worker/model/packed_int4.h"

#include <ATen/ATen.h>

#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace mq::model {
namespace {

constexpr int64_t kPerWord = 8;  // 4-bit values per int32 word

std::string Sizes(const at::Tensor& t) {
  if (!t.defined()) return "undefined";
  return absl::StrCat(c10::toString(t.scalar_type()), " [", absl::StrJoin(t.sizes(), ", "), "]");
}

}  // namespace

absl::StatusOr<at::Tensor> UnpackInt4(const at::Tensor& packed, int64_t cols) {
  const int64_t words = (cols + kPerWord - 1) / kPerWord;
  if (!packed.defined() || packed.dim() != 2 || packed.scalar_type() != at::kInt || cols < 0 ||
      packed.size(1) != words) {
    return absl::InvalidArgumentError(absl::StrCat("packed ", Sizes(packed), ": must be int32 [R, ",
                                                   words, "] for ", cols, " columns"));
  }
  // The words as unsigned 32-bit values (int64), each split into its 8 nibbles, lowest first.
  at::Tensor word = packed.to(at::kLong).bitwise_and(0xFFFFFFFFLL).unsqueeze(-1);
  at::Tensor shifts = at::arange(0, 4 * kPerWord, 4, word.options());
  at::Tensor u = word.bitwise_right_shift(shifts).bitwise_and(0xF);
  return u.reshape({packed.size(0), words * kPerWord}).narrow(1, 0, cols).sub(8).to(at::kChar);
}

absl::StatusOr<at::Tensor> DequantizePackedInt4(const PackedInt4Linear& linear) {
  const at::Tensor& shape_t = linear.weight_shape;
  if (!shape_t.defined() || shape_t.numel() != 2 ||
      !at::isIntegralType(shape_t.scalar_type(), /*includeBool=*/false)) {
    return absl::InvalidArgumentError(
        absl::StrCat("weight_shape ", Sizes(shape_t), ": must hold two integers [O, I]"));
  }
  const at::Tensor shape = shape_t.to(at::kCPU, at::kLong).reshape({2});
  const int64_t rows = shape[0].item<int64_t>();
  const int64_t cols = shape[1].item<int64_t>();
  if (rows <= 0 || cols <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("weight_shape = [", rows, ", ", cols, "]: must be positive"));
  }
  absl::StatusOr<at::Tensor> codes = UnpackInt4(linear.weight_packed, cols);
  if (!codes.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("weight_", codes.status().message(),
                                                   " (weight_shape [", rows, ", ", cols, "])"));
  }
  if (codes->size(0) != rows) {
    return absl::InvalidArgumentError(absl::StrCat("weight_packed ", Sizes(linear.weight_packed),
                                                   ": must have ", rows, " rows for weight_shape [",
                                                   rows, ", ", cols, "]"));
  }
  const at::Tensor& scale = linear.weight_scale;
  const int64_t groups = scale.defined() && scale.dim() == 2 ? scale.size(1) : 0;
  if (!scale.defined() || scale.dim() != 2 || !at::isFloatingType(scale.scalar_type()) ||
      scale.size(0) != rows || groups < 1 || cols % groups != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "weight_scale ", Sizes(scale), ": must be a float [", rows, ", groups] with the ", cols,
        " input columns a whole number of groups (1 = per-channel; a short last group is not "
        "supported)"));
  }
  const int64_t group = cols / groups;
  at::Tensor index =
      at::arange(cols, scale.options().dtype(at::kLong)).div(group, /*rounding_mode=*/"floor");
  at::Tensor d = codes->to(at::kInt).to(at::kFloat);
  if (linear.weight_zero_point.defined()) {
    const at::Tensor& zp_packed = linear.weight_zero_point;
    const int64_t zp_rows = (rows + kPerWord - 1) / kPerWord;
    if (zp_packed.dim() != 2 || zp_packed.size(0) != zp_rows || zp_packed.size(1) != groups) {
      return absl::InvalidArgumentError(absl::StrCat("weight_zero_point ", Sizes(zp_packed),
                                                     ": must be int32 [", zp_rows, ", ", groups,
                                                     "] (packed along the output rows)"));
    }
    absl::StatusOr<at::Tensor> zp = UnpackInt4(zp_packed.t().contiguous(), rows);
    if (!zp.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("weight_zero_point: ", zp.status().message()));
    }
    d = d.sub(zp->t().to(d.device()).to(at::kInt).to(at::kFloat).index_select(1, index));
  }
  return d.mul(scale.to(at::kFloat).index_select(1, index)).to(at::kBFloat16);
}

}  // namespace mq::model
