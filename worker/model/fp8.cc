#include "worker/model/fp8.h"

#include <bit>
#include <cmath>
#include <cstring>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "mq/kernels/fp8_dequant.h"
#include "worker/model/numeric.h"
#include "worker/model/safetensors.h"

namespace mq::model {
namespace {

static_assert(std::endian::native == std::endian::little, "mq assumes a little-endian host");

std::string Quote(std::string_view s) { return absl::StrCat("\"", std::string(s), "\""); }

std::string DTypeStr(DType dtype) { return std::string(DTypeName(dtype)); }

// IEEE binary16 bits -> f32 (exact).
float HalfToFloat(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const int exponent = (bits >> 10) & 0x1F;
  const uint32_t mantissa = bits & 0x3FFu;
  float magnitude;
  if (exponent == 0x1F) {
    magnitude = mantissa == 0 ? INFINITY : std::bit_cast<float>(0x7FC00000u | (mantissa << 13));
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);
  } else {
    magnitude =
        std::bit_cast<float>(static_cast<uint32_t>(exponent - 15 + 127) << 23 | (mantissa << 13));
  }
  return std::bit_cast<float>(std::bit_cast<uint32_t>(magnitude) | sign);
}

absl::StatusOr<std::vector<uint16_t>> DequantFp8(const TensorView& weight,
                                                 const TensorView* scale_inv, int num_threads) {
  absl::StatusOr<std::vector<float>> scales = Fp8BlockScales(weight, scale_inv);
  if (!scales.ok()) return scales.status();
  PrefetchTensor(weight);
  const int64_t rows = weight.shape[0];
  const int64_t cols = weight.shape[1];
  std::vector<uint16_t> out(static_cast<size_t>(rows * cols));
  kernels::Fp8BlockDequantCpu(weight.data, scales->data(), rows, cols, out.data(), num_threads);
  return out;
}

}  // namespace

absl::StatusOr<std::vector<float>> Fp8BlockScales(const TensorView& weight,
                                                   const TensorView* scale_inv) {
  const std::string scale_name = absl::StrCat(weight.name, kScaleInvSuffix);
  if (weight.shape.size() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("FP8 weight ", Quote(weight.name), ": shape ", ShapeToString(weight.shape),
                     " must be 2-D [rows, cols] for 128x128 block dequantization"));
  }
  if (scale_inv == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("FP8 weight ", Quote(weight.name), " has no ", Quote(scale_name)));
  }
  const int64_t rows = weight.shape[0];
  const int64_t cols = weight.shape[1];
  const std::vector<int64_t> expected = {kernels::Fp8ScaleBlocks(rows),
                                         kernels::Fp8ScaleBlocks(cols)};
  if (scale_inv->dtype != DType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat(Quote(scale_inv->name), " (scale of FP8 weight ",
                                                   Quote(weight.name), "): dtype ",
                                                   DTypeStr(scale_inv->dtype), ", expected F32"));
  }
  if (scale_inv->shape != expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        Quote(scale_inv->name), ": shape ", ShapeToString(scale_inv->shape), ", expected ",
        ShapeToString(expected), " = [ceil(", rows, "/128), ceil(", cols, "/128)] for FP8 weight ",
        Quote(weight.name), " of shape ", ShapeToString(weight.shape)));
  }
  // The scale may sit at any byte offset in the file: copy it to aligned storage (it is 1/16384
  // the size of the weight).
  std::vector<float> scales(static_cast<size_t>(expected[0] * expected[1]));
  std::memcpy(scales.data(), scale_inv->data, scales.size() * sizeof(float));
  if (absl::Status s = CheckTensorRead(*scale_inv); !s.ok()) return s;
  return scales;
}

absl::StatusOr<TensorView> Fp8ScaleView(CheckpointReader& reader, const std::string& weight_name) {
  const std::string scale_name = absl::StrCat(weight_name, kScaleInvSuffix);
  if (!reader.Has(scale_name)) {
    return absl::NotFoundError(absl::StrCat("FP8 weight ", Quote(weight_name), " has no ",
                                            Quote(scale_name), " in the checkpoint ",
                                            reader.dir()));
  }
  return reader.Get(scale_name);
}

absl::StatusOr<std::vector<uint16_t>> ViewAsBf16(const TensorView& weight,
                                                 const TensorView* scale_inv, int num_threads) {
  const size_t n = static_cast<size_t>(weight.num_elements());
  switch (weight.dtype) {
    case DType::kF8E4M3:
      return DequantFp8(weight, scale_inv, num_threads);
    case DType::kBF16: {
      std::vector<uint16_t> out(n);
      if (n > 0) std::memcpy(out.data(), weight.data, n * sizeof(uint16_t));
      return out;
    }
    case DType::kF32: {
      std::vector<uint16_t> out(n);
      for (size_t i = 0; i < n; ++i) {
        float value;
        std::memcpy(&value, weight.data + i * sizeof(float), sizeof(float));
        out[i] = FloatToBf16(value);
      }
      return out;
    }
    case DType::kF16: {
      std::vector<uint16_t> out(n);
      for (size_t i = 0; i < n; ++i) {
        uint16_t bits;
        std::memcpy(&bits, weight.data + i * sizeof(uint16_t), sizeof(uint16_t));
        out[i] = FloatToBf16(HalfToFloat(bits));
      }
      return out;
    }
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("tensor ", Quote(weight.name), ": dtype ", DTypeStr(weight.dtype),
                       " cannot be loaded as bf16 (expected F8_E4M3 with a _scale_inv, BF16, "
                       "F16 or F32)"));
  }
}

absl::StatusOr<std::vector<uint16_t>> LoadAsBf16(CheckpointReader& reader,
                                                 const std::string& weight_name) {
  absl::StatusOr<TensorView> weight = reader.Get(weight_name);
  if (!weight.ok()) return weight.status();
  absl::StatusOr<TensorView> scale;
  if (weight->dtype == DType::kF8E4M3) {
    scale = Fp8ScaleView(reader, weight_name);
    if (!scale.ok()) return scale.status();
  }
  absl::StatusOr<std::vector<uint16_t>> out =
      ViewAsBf16(*weight, weight->dtype == DType::kF8E4M3 ? &*scale : nullptr);
  // The checkpoint's bytes were read through its mapping: a shard that shrank meanwhile is an
  // error naming it, never zeros.
  if (out.ok()) {
    if (absl::Status s = CheckTensorRead(*weight); !s.ok()) return s;
  }
  return out;
}

}  // namespace mq::model
