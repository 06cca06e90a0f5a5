// libFuzzer entry point for the safetensors header parser: the input is a whole file (8-byte
// little-endian length, header, data). Build with -fsanitize=fuzzer,address and link mq_model.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "worker/model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 8) return 0;
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | data[i];
  const size_t available = size - 8;
  const size_t take = header_len < available ? static_cast<size_t>(header_len) : available;
  std::string_view header(reinterpret_cast<const char*>(data) + 8, take);
  (void)mq::model::ParseSafetensorsHeader(header, header_len, size);
  return 0;
}
