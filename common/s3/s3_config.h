// Where an S3-compatible store is and how mq signs in to it: s3:// URIs, the endpoint and region,
// and credentials, all resolved from the environment the way the AWS tools resolve them.
//
// Plain C++ (no proto, no torch) so the coordinator, the worker and mq-client share it. Every
// function is stateless and thread-safe; the resolving ones read the environment (through the
// Env hook, so tests choose it) and, for credentials, a few small files. Nothing here ever puts
// a secret into an error message.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace mq::s3 {

// "s3://bucket/some/prefix" -> {"bucket", "some/prefix"}. `key` has no leading '/' and may be
// empty (the whole bucket).
struct S3Uri {
  std::string bucket;
  std::string key;

  // "s3://bucket/key" (no trailing '/' added or removed).
  std::string ToString() const;
  // This URI with `name` appended as one more path component ("a/b" + "c" -> "a/b/c").
  S3Uri Child(absl::string_view name) const;
};

// True when `location` starts with "s3://".
bool IsS3Uri(absl::string_view location);

// Parses "s3://BUCKET[/KEY]". INVALID_ARGUMENT naming `field` and the value when the scheme is
// not s3://, the bucket name is not a valid S3 bucket name (3-63 characters of a-z, 0-9, '.',
// '-', starting and ending with a letter or digit), or the key has an empty component ("//"),
// a "." or ".." component, a control character, or is longer than 1024 bytes. A trailing '/'
// is dropped ("s3://b/p/" is {"b", "p"}).
absl::StatusOr<S3Uri> ParseS3Uri(absl::string_view field, absl::string_view uri);

// Looks an environment variable up; nullopt when unset. Tests pass a map-backed one.
using Env = std::function<std::optional<std::string>(const char* name)>;
// The process environment (getenv).
Env ProcessEnv();

struct Credentials {
  std::string access_key_id;
  std::string secret_access_key;
  std::string session_token;  // empty unless temporary credentials
  // Where they came from, for messages and logs ("environment", "/etc/mq/s3 (mounted secret)",
  // "/root/.aws/credentials [default]"); never the secret itself.
  std::string source;
};

// Credentials, from the first of:
//  1. AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN);
//  2. MQ_S3_CREDENTIALS_DIR: a directory holding files `access_key_id`, `secret_access_key`
//     and optionally `session_token` (a Kubernetes secret mounted as a volume; surrounding
//     whitespace is trimmed);
//  3. the AWS shared credentials file (AWS_SHARED_CREDENTIALS_FILE, else $HOME/.aws/credentials),
//     profile AWS_PROFILE (else "default"): aws_access_key_id, aws_secret_access_key,
//     aws_session_token.
// UNAUTHENTICATED saying what was looked at when none is found, or when one source is half set
// (e.g. AWS_ACCESS_KEY_ID without AWS_SECRET_ACCESS_KEY, or a named profile that is missing).
absl::StatusOr<Credentials> ResolveCredentials(const Env& env);

// How to reach the store, and how hard to try.
struct S3Config {
  // Base URL without a trailing '/': "http://127.0.0.1:9000", "https://s3.eu-west-1.amazonaws.com".
  // Requests use path-style addressing: <endpoint>/<bucket>/<key>.
  std::string endpoint;
  std::string region = "us-east-1";
  Credentials credentials;

  // Attempts per request (first try included) on retryable failures: HTTP 500/502/503/504,
  // SlowDown, RequestTimeout, InternalError, connection failures and resets, timeouts, short
  // bodies. Backoff before try n (n >= 1) is uniform in [0, min(max, base * 2^(n-1))].
  int max_attempts = 6;
  int64_t base_backoff_ms = 100;
  int64_t max_backoff_ms = 5000;
  int64_t connect_timeout_ms = 10000;
  // A transfer that moves fewer than 1 KiB/s for this long is aborted (then retried): a stalled
  // server can never hang a request forever.
  int64_t stall_timeout_ms = 30000;
  // Called (from the requesting thread) before each retry with a one-line reason that names
  // the operation and object, never a credential; for logs. May be empty.
  std::function<void(const std::string&)> on_retry;
};

// The configuration from the environment: MQ_S3_ENDPOINT (else https://s3.<region>.amazonaws.com),
// AWS_REGION, else AWS_DEFAULT_REGION, else us-east-1; MQ_S3_MAX_ATTEMPTS (1-20),
// MQ_S3_STALL_TIMEOUT_MS; credentials by ResolveCredentials. INVALID_ARGUMENT naming the variable
// for a malformed endpoint (not http:// or https://, or with a path, query or credentials in it),
// region or number.
absl::StatusOr<S3Config> S3ConfigFromEnv(const Env& env);

}  // namespace mq::s3
