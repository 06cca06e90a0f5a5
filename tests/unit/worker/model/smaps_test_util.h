// Resident memory of this process's mappings, read from /proc/self/smaps, for tests of how much
// of a mapped checkpoint stays resident.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <string>
#include <string_view>

namespace mq::model::testing {

// Resident kB ("Rss:") summed over the mappings [lo, hi) for which keep(lo, hi, path) is true;
// path is the mapped file's ("" for anonymous memory and [heap], [stack], ...).
inline int64_t ResidentKbOfMappings(
    const std::function<bool(uintptr_t lo, uintptr_t hi, std::string_view path)>& keep) {
  std::ifstream smaps("/proc/self/smaps");
  bool inside = false;
  int64_t kb = 0;
  for (std::string line; std::getline(smaps, line);) {
    unsigned long lo = 0, hi = 0;  // a mapping's first line: "lo-hi perms offset dev inode path"
    if (std::sscanf(line.c_str(), "%lx-%lx ", &lo, &hi) == 2) {
      const size_t slash = line.find('/');
      const std::string_view path =
          slash == std::string::npos ? std::string_view() : std::string_view(line).substr(slash);
      inside = keep(lo, hi, path);
    } else if (inside && line.rfind("Rss:", 0) == 0) {
      kb += std::strtoll(line.c_str() + 4, nullptr, 10);
    }
  }
  return kb;
}

}  // namespace mq::model::testing
