// Private helpers of deepseek_v3*.cc: exception-to-status conversion at the API boundary.
#pragma once

#include <ATen/ATen.h>

#include <exception>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace mq::model::internal {

// Thrown inside GuardTorch to return a specific status from deep inside a forward.
struct StatusException : std::exception {
  explicit StatusException(absl::Status s) : status(std::move(s)) {}
  const char* what() const noexcept override { return "mq::model::internal::StatusException"; }
  absl::Status status;
};

// Runs `fn` (returning absl::StatusOr<T> or absl::Status) and turns torch exceptions into
// statuses: device out-of-memory -> RESOURCE_EXHAUSTED, anything else -> INTERNAL, both prefixed
// with `what`; a StatusException returns its status unchanged.
template <typename Fn>
auto GuardTorch(const std::string& what, Fn&& fn) -> decltype(fn()) {
  try {
    return std::forward<Fn>(fn)();
  } catch (const StatusException& e) {
    return e.status;
  } catch (const c10::OutOfMemoryError& e) {
    return absl::ResourceExhaustedError(
        absl::StrCat(what, ": out of device memory: ", e.what_without_backtrace()));
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat(what, ": ", e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(what, ": ", e.what()));
  }
}

}  // namespace mq::model::internal
