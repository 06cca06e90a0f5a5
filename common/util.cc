#include "common/util.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>
#include <random>

namespace mq {

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

int64_t MonotonicMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::string NewId(std::string_view prefix) {
  static constexpr char kAlphabet[] = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
  static std::mutex mu;
  static std::mt19937_64 rng{std::random_device{}() ^ (static_cast<uint64_t>(getpid()) << 32)};
  static uint64_t last_ms = 0, last_hi = 0, last_lo = 0;
  uint64_t ms = static_cast<uint64_t>(NowMs()) & ((uint64_t{1} << 48) - 1);
  uint64_t rand_hi, rand_lo;
  {
    // Monotonic within the process: in the same millisecond (or if the clock steps back) the
    // random part of the previous id is incremented, so ids keep creation order.
    std::lock_guard<std::mutex> lock(mu);
    if (ms <= last_ms) {
      ms = last_ms;
      rand_lo = last_lo + 1;
      rand_hi = (last_hi + (rand_lo == 0 ? 1 : 0)) & 0xFFFF;
    } else {
      rand_hi = rng() & 0xFFFF;  // 16 bits
      rand_lo = rng();           // 64 bits
    }
    last_ms = ms;
    last_hi = rand_hi;
    last_lo = rand_lo;
  }
  // 130 bits: 2 zero bits, 48 bits of time, 80 random bits, emitted 5 bits at a time.
  std::string out(prefix);
  auto bit_at = [&](int i) -> int {  // i = 0 is the most significant of 130 bits
    if (i < 2) return 0;
    i -= 2;
    if (i < 48) return (ms >> (47 - i)) & 1;
    i -= 48;
    if (i < 16) return (rand_hi >> (15 - i)) & 1;
    i -= 16;
    return (rand_lo >> (63 - i)) & 1;
  };
  for (int c = 0; c < 26; ++c) {
    int v = 0;
    for (int b = 0; b < 5; ++b) v = (v << 1) | bit_at(c * 5 + b);
    out.push_back(kAlphabet[v]);
  }
  return out;
}

std::string FormatTimeMs(int64_t ms) {
  std::time_t secs = static_cast<std::time_t>(ms / 1000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

void LogLine(std::string_view component, std::string_view level, std::string_view message) {
  const int64_t ms = NowMs();
  std::string line = FormatTimeMs(ms);
  line.insert(line.size() - 1, "." + std::to_string(1000 + ms % 1000).substr(1));
  line += " ";
  line += component;
  line += " ";
  line += level;
  line += " ";
  line += message;
  line += "\n";
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  std::fwrite(line.data(), 1, line.size(), stderr);
  std::fflush(stderr);
}

std::string HumanBytes(int64_t bytes) {
  char buf[32];
  const double b = static_cast<double>(bytes);
  if (bytes >= (int64_t{1} << 40)) {
    std::snprintf(buf, sizeof(buf), "%.2f TiB", b / (1ull << 40));
  } else if (bytes >= (int64_t{1} << 30)) {
    std::snprintf(buf, sizeof(buf), "%.2f GiB", b / (1ull << 30));
  } else if (bytes >= (int64_t{1} << 20)) {
    std::snprintf(buf, sizeof(buf), "%.1f MiB", b / (1ull << 20));
  } else if (bytes >= (int64_t{1} << 10)) {
    std::snprintf(buf, sizeof(buf), "%.1f KiB", b / (1ull << 10));
  } else {
    std::snprintf(buf, sizeof(buf), "%lld B", static_cast<long long>(bytes));
  }
  return buf;
}

const char* Version() { return MQ_VERSION; }

}  // namespace mq
