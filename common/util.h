// Small process-wide helpers: clocks, ids, logging. Thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace mq {

// Milliseconds since the Unix epoch (wall clock, for records people read).
int64_t NowMs();
// Milliseconds from a monotonic clock (for leases and timeouts).
int64_t MonotonicMs();

// A time-ordered unique id: `prefix` + 26 Crockford base32 characters (48-bit milliseconds,
// then 80 random bits), so ids sort by creation time.
std::string NewId(std::string_view prefix);

// Formats "2026-11-26T10:20:51Z" from milliseconds since the epoch.
std::string FormatTimeMs(int64_t ms);

// Writes one line "<time> <component> <level> <message>" to stderr atomically.
void LogLine(std::string_view component, std::string_view level, std::string_view message);

// "1.50 GiB", "12.0 MiB", "512 B" (binary units).
std::string HumanBytes(int64_t bytes);

// The mq version string (project version).
const char* Version();

}  // namespace mq
