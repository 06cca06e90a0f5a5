// A test store: the in-memory store whose writes (and Recover) fail while `failing` is set, and
// whose Writable() reports no room while `full` is set, as a full or broken disk would.
// Threading: the flags and counters are atomic, so a test may flip them while server threads
// use the store.
#pragma once

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "server/storage/store.h"

namespace mq::server {

class FaultyStore : public Store {
 public:
  absl::Status Write(const WriteBatch& batch) override {
    ++writes;
    if (failing) return Failure();
    return inner_->Write(batch);
  }
  absl::StatusOr<std::optional<std::string>> Get(Table table, std::string_view key) override {
    return inner_->Get(table, key);
  }
  absl::StatusOr<KeyValues> GetAll(Table table, std::string_view prefix) override {
    return inner_->GetAll(table, prefix);
  }
  absl::Status Recover() override {
    ++recovers;
    return failing ? Failure() : absl::OkStatus();
  }
  absl::Status Writable() override { return full ? Failure() : absl::OkStatus(); }

  static absl::Status Failure() {
    return absl::UnavailableError("IO error: No space left on device: While appending to file");
  }

  std::atomic<bool> failing{false};
  std::atomic<bool> full{false};  // Writable() reports no room (no write failed yet)
  std::atomic<int> writes{0};
  std::atomic<int> recovers{0};

 private:
  std::unique_ptr<Store> inner_ = NewInMemoryStore();
};

}  // namespace mq::server
