// The coordinator's durable key-value store: a few tables (RocksDB column families), atomic
// synced batches. Two implementations share one contract test suite: InMemoryStore (unit
// tests) and RocksDbStore (everything else).
//
// Contract: every successful Write() is durable before it returns (RocksDB: WAL with
// sync = true) and atomic across tables. Implementations are thread-safe, but the coordinator
// serializes its writes anyway (one state-machine lock).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mq::server {

enum class Table {
  kMeta,
  kJobs,
  kAttempts,
  kAssignments,
  kEvents,
  kWorkers,
  kIdempotency,
  // Pipeline steps of a job: <job_id>/<step:06d> -> LayerRecord.
  kLayers,
};

// All tables, in a fixed order (RocksDB column family order).
const std::vector<Table>& AllTables();
// "meta", "jobs", ... (also the RocksDB column family names).
std::string_view TableName(Table table);

// A set of puts and deletes applied atomically by Store::Write.
class WriteBatch {
 public:
  struct Op {
    Table table;
    std::string key;
    std::optional<std::string> value;  // nullopt = delete
  };

  void Put(Table table, std::string key, std::string value) {
    ops_.push_back({table, std::move(key), std::move(value)});
  }
  void Delete(Table table, std::string key) {
    ops_.push_back({table, std::move(key), std::nullopt});
  }
  const std::vector<Op>& ops() const { return ops_; }
  bool empty() const { return ops_.empty(); }

 private:
  std::vector<Op> ops_;
};

using KeyValues = std::vector<std::pair<std::string, std::string>>;

class Store {
 public:
  virtual ~Store() = default;

  // Applies the batch atomically and durably.
  virtual absl::Status Write(const WriteBatch& batch) = 0;
  // The value, or nullopt when the key is absent.
  virtual absl::StatusOr<std::optional<std::string>> Get(Table table, std::string_view key) = 0;
  // All entries of the table whose key starts with `prefix`, in key order.
  virtual absl::StatusOr<KeyValues> GetAll(Table table, std::string_view prefix = "") = 0;
  // After a failed Write: makes the store writable again (RocksDB: reopens it once the device
  // has room) and proves it with a synced probe write. OK means the next Write may succeed;
  // otherwise the status names what still fails. Writes that failed were not applied.
  virtual absl::Status Recover() { return absl::OkStatus(); }
  // Cheap check (no write) that a Write could succeed now: RocksDB checks the device keeps its
  // free-space reserve. Not OK names why not.
  virtual absl::Status Writable() { return absl::OkStatus(); }

  // Convenience wrappers over Write.
  absl::Status Put(Table table, std::string key, std::string value);
  absl::Status Delete(Table table, std::string key);
};

// Volatile store for unit tests.
std::unique_ptr<Store> NewInMemoryStore();

// Free space a RocksDB store keeps in reserve by default: it refuses writes (UNAVAILABLE)
// rather than let RocksDB run the device full (a full device can abort RocksDB).
inline constexpr int64_t kDefaultStoreReserveBytes = int64_t{32} << 20;

// Opens (creating if needed) a RocksDB store in `dir`. Fails on corruption rather than
// repairing; the error names the directory. Before opening, checks that `dir` has
// `reserve_bytes` free and takes a small synced write: otherwise FAILED_PRECONDITION
// "data dir DIR has no room (...)". Write() answers UNAVAILABLE naming the cause when the
// device has less than `reserve_bytes` free or the write fails (I/O error).
absl::StatusOr<std::unique_ptr<Store>> OpenRocksDbStore(
    const std::string& dir, int64_t reserve_bytes = kDefaultStoreReserveBytes);

}  // namespace mq::server
