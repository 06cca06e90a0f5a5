// Retry policy for infrastructure failures (a gang that cannot form, a peer lost mid-layer):
// such attempts do not count against spec.max_attempts, so the policy bounds them instead.
// Each one in a row waits longer before the job is scheduled again (exponential backoff), and
// the same failure repeated without progress ends the job with that failure's message.
//
// Pure functions of their arguments, no I/O (like gang.h); safe from any thread.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace mq::server {

inline constexpr int64_t kFirstRetryDelayMs = 1000;
inline constexpr int64_t kMaxRetryDelayMs = 60000;
// The same infrastructure failure (FailureSignature) this many times in a row, with no step
// committed in between, fails the job.
inline constexpr int kMaxIdenticalInfrastructureFailures = 3;

// How long the job waits before its next attempt after the `failures_in_row`-th (>= 1)
// infrastructure failure in a row: kFirstRetryDelayMs · 2^(n-1), at most kMaxRetryDelayMs.
int64_t InfrastructureRetryDelayMs(int failures_in_row);

// What makes two failures "the same": the gang's workers (`worker_ids`, any order) and the
// failure message with what varies between attempts taken out. A leading "rank N (NAME) failed:
// " is dropped (either rank may report a gang's failure first); ids such as "a-" or "j-"
// followed by 26 base32 characters become "<id>"; every other run of digits becomes "#", except
// in network addresses (dotted IPv4 like 10.1.2.3 and the PORT of HOST:PORT), which are kept:
// failures at different addresses differ. Examples: "timed out after 2013 ms" and "... 1998 ms"
// are the same; "10.1.2.3:29500" and "10.1.2.4:29500" are not.
std::string FailureSignature(std::string_view reason, std::vector<std::string> worker_ids);

}  // namespace mq::server
