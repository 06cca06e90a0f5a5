// mq-interop-helper: writes safetensors files that the Python interop tests compare with torch
// and safetensors.torch.save_file.
//
//   mq-interop-helper mixed PATH          a file with many dtypes, names out of order, a scalar,
//                                         an empty tensor and names that need JSON escaping
//                                         (contents mirrored in test_writer.py)
//   mq-interop-helper index PATH          a sharded index whose names need escaping (mirrored
//                                         in test_index.py)
//   mq-interop-helper numeric PATH [N]    N f32 inputs (default 4194304: ties, boundaries,
//                                         random bit patterns) with our bf16 and fp8 encodings,
//                                         plus all 256 fp8 codes and our decoding of them
//
// Single-threaded test tool; exits 0 on success, 1 on a write error, 2 on bad arguments.

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "worker/model/numeric.h"
#include "worker/model/safetensors_writer.h"

namespace mq::tools {
namespace {

using model::DType;
using model::TensorData;

template <typename T>
std::vector<uint8_t> Bytes(const std::vector<T>& values) {
  std::vector<uint8_t> out(values.size() * sizeof(T));
  if (!out.empty()) std::memcpy(out.data(), values.data(), out.size());
  return out;
}

std::vector<uint16_t> Bf16(const std::vector<float>& values) {
  std::vector<uint16_t> out;
  for (float v : values) out.push_back(model::FloatToBf16(v));
  return out;
}

int WriteOrFail(const std::string& path, std::vector<TensorData> tensors) {
  if (absl::Status s = model::WriteSafetensors(path, std::move(tensors)); !s.ok()) {
    std::cerr << "mq-interop-helper: " << s << "\n";
    return 1;
  }
  return 0;
}

int Mixed(const std::string& path) {
  std::vector<TensorData> t;
  t.push_back({"z.u8", DType::kU8, {5}, {0, 1, 2, 3, 255}});
  t.push_back({"layer.2.w", DType::kBF16, {1}, Bytes(Bf16({2.0f}))});
  t.push_back(
      {"b.bf16", DType::kBF16, {2, 3}, Bytes(Bf16({-1.0f, 0.5f, 0.0f, 3.0f, -0.25f, 448.0f}))});
  t.push_back({"f.fp8", DType::kF8E4M3, {2, 2}, {0x00, 0x38, 0xB8, 0x7E}});
  t.push_back({"a.f32", DType::kF32, {3}, Bytes<float>({1.5f, -2.25f, 0.125f})});
  t.push_back({"scalar", DType::kF32, {}, Bytes<float>({7.0f})});
  t.push_back({"empty", DType::kF32, {0, 4}, {}});
  t.push_back({"c.i64", DType::kI64, {2}, Bytes<int64_t>({-1, int64_t{1} << 40})});
  t.push_back({"i.i32", DType::kI32, {2, 2}, Bytes<int32_t>({0, -5, 7, 2147483647})});
  t.push_back({"layer.10.w", DType::kBF16, {1}, Bytes(Bf16({1.0f}))});
  t.push_back({"h.f16", DType::kF16, {2}, Bytes<uint16_t>({0x3C00, 0xB800})});
  t.push_back({"k.i8", DType::kI8, {3}, Bytes<int8_t>({-128, 0, 127})});
  t.push_back({"m.bool", DType::kBool, {3}, {1, 0, 1}});
  t.push_back({"d.f64", DType::kF64, {1}, Bytes<double>({0.1})});
  t.push_back({"\xc3\xbcn\xc3\xaf.code", DType::kF32, {1}, Bytes<float>({2.0f})});  // "ünï.code"
  t.push_back({"q\"uote\\name", DType::kU8, {1}, {9}});
  return WriteOrFail(path, std::move(t));
}

int Index(const std::string& path) {
  const std::map<std::string, std::string> weight_map = {
      {"model.layers.0.mlp.gate.weight", "model-00001-of-00002.safetensors"},
      {"\xc3\xbcn\xc3\xaf.code", "model-00002-of-00002.safetensors"},  // U+00FC, U+00EF
      {"emoji.\xf0\x9f\x98\x80", "f\xe2\x80\xa8"},                     // U+1F600; U+2028
      {"ctl.\x01\x1f\x7f\b\t\n\f\r", "q\"uote\\"},
      {"A", "Z"},
      {"a", "z"},
  };
  if (absl::Status s = model::WriteShardedIndex(path, 1234567890123, weight_map); !s.ok()) {
    std::cerr << "mq-interop-helper: " << s << "\n";
    return 1;
  }
  return 0;
}

// splitmix64: a tiny deterministic generator for test inputs.
uint64_t Next(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::vector<float> NumericInputs(size_t count) {
  std::vector<float> in;
  in.reserve(count);
  auto push = [&](float v) {
    if (in.size() < count) in.push_back(v);
  };
  // FP8: every code value, every midpoint between neighbours (exact ties) and the floats just
  // around them, both signs; the NaN boundary at 464 and 480; special values.
  for (int code = 0; code <= 0x7E; ++code) {
    const float lo = model::Fp8E4M3ToFloat(code);
    const float hi = code < 0x7E ? model::Fp8E4M3ToFloat(code + 1) : 480.0f;
    const float mid = (lo + hi) / 2;
    for (float v : {lo, mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e9f)}) {
      push(v);
      push(-v);
    }
  }
  for (float v : {464.0f, 480.0f, 479.99f, 500.0f, 1e30f, std::numeric_limits<float>::max(),
                  std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(),
                  std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min()}) {
    push(v);
    push(-v);
  }
  uint64_t state = 0x5EED;
  size_t i = 0;
  while (in.size() < count) {
    const uint64_t r = Next(state);
    const auto bits = static_cast<uint32_t>(r);
    switch (i++ % 6) {
      case 0:  // exact bf16 tie
        push(std::bit_cast<float>((bits & 0xFFFF0000u) | 0x8000u));
        break;
      case 1:  // one below / above a bf16 tie
        push(std::bit_cast<float>((bits & 0xFFFF0000u) | ((r >> 32) & 1 ? 0x8001u : 0x7FFFu)));
        break;
      case 2:  // any bit pattern: NaN, Inf, subnormals included
        push(std::bit_cast<float>(bits));
        break;
      case 3: {  // uniform in [-500, 500): the fp8 range and just past it
        push(static_cast<float>((static_cast<double>(r >> 11) * 0x1.0p-53 - 0.5) * 1000.0));
        break;
      }
      case 4: {  // small magnitudes with random exponent in [2^-20, 2^9)
        const int exponent = static_cast<int>((r >> 32) % 29) - 20;
        push(std::ldexp(1.0f + static_cast<float>(bits & 0xFFFFFF) * 0x1.0p-24f, exponent) *
             ((r >> 63) ? -1.0f : 1.0f));
        break;
      }
      default:  // exact fp8 ties inside scaled ranges: k + 0.5 quanta
        push(std::bit_cast<float>((bits & 0x80000000u) | (((bits >> 23) % 20 + 117) << 23) |
                                  (bits & 0x00700000u) | 0x00080000u));
    }
  }
  return in;
}

int Numeric(const std::string& path, size_t count) {
  const std::vector<float> in = NumericInputs(count);
  std::vector<uint16_t> bf16;
  std::vector<uint8_t> fp8;
  bf16.reserve(in.size());
  fp8.reserve(in.size());
  for (float v : in) {
    bf16.push_back(model::FloatToBf16(v));
    fp8.push_back(model::FloatToFp8E4M3(v));
  }
  std::vector<uint8_t> codes(256);
  std::vector<float> decoded(256);
  for (int c = 0; c < 256; ++c) {
    codes[c] = static_cast<uint8_t>(c);
    decoded[c] = model::Fp8E4M3ToFloat(static_cast<uint8_t>(c));
  }
  const auto n = static_cast<int64_t>(in.size());
  std::vector<TensorData> t;
  t.push_back({"input", DType::kF32, {n}, Bytes(in)});
  t.push_back({"bf16", DType::kBF16, {n}, Bytes(bf16)});
  t.push_back({"fp8", DType::kF8E4M3, {n}, std::move(fp8)});
  t.push_back({"fp8_codes", DType::kU8, {256}, codes});
  t.push_back({"fp8_decoded", DType::kF32, {256}, Bytes(decoded)});
  return WriteOrFail(path, std::move(t));
}

int Main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "mixed" && argc == 3) return Mixed(argv[2]);
  if (mode == "index" && argc == 3) return Index(argv[2]);
  size_t count = size_t{1} << 22;
  if (mode == "numeric" && (argc == 3 || argc == 4)) {
    if (argc == 4 && (!absl::SimpleAtoi(argv[3], &count) || count < 4096)) {
      std::cerr << "mq-interop-helper: COUNT = \"" << argv[3] << "\": must be an integer >= 4096\n";
      return 2;
    }
    return Numeric(argv[2], count);
  }
  std::cerr << "usage: mq-interop-helper mixed PATH | index PATH | numeric PATH [COUNT]\n";
  return 2;
}

}  // namespace
}  // namespace mq::tools

int main(int argc, char** argv) { return mq::tools::Main(argc, argv); }
