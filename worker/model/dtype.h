// safetensors dtypes: names, sizes and the writer's ordering rank.
//
// Pure value helpers with no state; safe from any thread.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace mq::model {

// Declared in safetensors' enum order (FORMATS.md §1.1): the writer orders tensors by this
// rank, descending, then by name. Do not reorder.
enum class DType : int {
  kBool,
  kF4,
  kF6E2M3,
  kF6E3M2,
  kU8,
  kI8,
  kF8E5M2,
  kF8E4M3,
  kF8E8M0,
  kF8E4M3Fnuz,
  kF8E5M2Fnuz,
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kC64,
  kF64,
  kI64,
  kU64,
};

// "BF16" -> kBF16; nullopt for a string safetensors does not define.
std::optional<DType> ParseDType(std::string_view name);
// kBF16 -> "BF16".
std::string_view DTypeName(DType dtype);
// Bits per element: 4 for F4, 6 for F6_*, 8·bytes otherwise.
int DTypeBits(DType dtype);
// True for every floating-point dtype (F4 .. F64, C64 excluded).
bool IsFloat(DType dtype);

}  // namespace mq::model
