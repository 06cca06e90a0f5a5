#include "worker/model/dtype.h"

#include <array>
#include <utility>

namespace mq::model {
namespace {

struct DTypeInfo {
  DType dtype;
  std::string_view name;
  int bits;
  bool is_float;
};

constexpr std::array<DTypeInfo, 22> kDTypes = {{
    {DType::kBool, "BOOL", 8, false},
    {DType::kF4, "F4", 4, true},
    {DType::kF6E2M3, "F6_E2M3", 6, true},
    {DType::kF6E3M2, "F6_E3M2", 6, true},
    {DType::kU8, "U8", 8, false},
    {DType::kI8, "I8", 8, false},
    {DType::kF8E5M2, "F8_E5M2", 8, true},
    {DType::kF8E4M3, "F8_E4M3", 8, true},
    {DType::kF8E8M0, "F8_E8M0", 8, true},
    {DType::kF8E4M3Fnuz, "F8_E4M3FNUZ", 8, true},
    {DType::kF8E5M2Fnuz, "F8_E5M2FNUZ", 8, true},
    {DType::kI16, "I16", 16, false},
    {DType::kU16, "U16", 16, false},
    {DType::kF16, "F16", 16, true},
    {DType::kBF16, "BF16", 16, true},
    {DType::kI32, "I32", 32, false},
    {DType::kU32, "U32", 32, false},
    {DType::kF32, "F32", 32, true},
    {DType::kC64, "C64", 64, false},
    {DType::kF64, "F64", 64, true},
    {DType::kI64, "I64", 64, false},
    {DType::kU64, "U64", 64, false},
}};

const DTypeInfo& Info(DType dtype) { return kDTypes[static_cast<int>(dtype)]; }

}  // namespace

std::optional<DType> ParseDType(std::string_view name) {
  for (const DTypeInfo& info : kDTypes) {
    if (info.name == name) return info.dtype;
  }
  return std::nullopt;
}

std::string_view DTypeName(DType dtype) { return Info(dtype).name; }
int DTypeBits(DType dtype) { return Info(dtype).bits; }
bool IsFloat(DType dtype) { return Info(dtype).is_float; }

}  // namespace mq::model
