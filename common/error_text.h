// Error text for people: what goes into job events and assignment results, without the C++
// stack traces that LibTorch appends to its exception messages. Pure functions; thread-safe.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace mq {

// Longest message an event (or a job's state message) carries, in bytes.
inline constexpr size_t kMaxEventMessageBytes = 1024;

// `message` without stack traces: everything from the first line that starts with "Exception
// raised from" or "frame #" (c10::Error's backtrace) is cut, as is a trailing
// "(most recent call first):" header; the remaining lines are joined with "; " and trailing
// white space is dropped. A message without a trace comes back unchanged (but on one line).
std::string WithoutBacktrace(std::string_view message);

// WithoutBacktrace, then at most `max_bytes` bytes: a longer message is cut on a UTF-8
// character boundary and ends with " ... (N bytes cut)", the whole staying within
// `max_bytes` (>= 64).
std::string EventMessage(std::string_view message, size_t max_bytes = kMaxEventMessageBytes);

}  // namespace mq
