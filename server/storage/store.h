// The coordinator's durable key-value store: a few tables (RocksDB column families), atomic
// synced batches. Two implementations share one contract test suite: InMemoryStore (unit
// tests) and RocksDbStore (everything else).
//
// Contract: every successful Write() is durable before it returns (RocksDB: WAL with
// sync = true) and atomic across tables. Implementations are thread-safe, but the coordinator
// serializes its writes anyway (one state-machine lock).
#pragma once

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

  // Convenience wrappers over Write.
  absl::Status Put(Table table, std::string key, std::string value);
  absl::Status Delete(Table table, std::string key);
};

// Volatile store for unit tests.
std::unique_ptr<Store> NewInMemoryStore();

// Opens (creating if needed) a RocksDB store in `dir`. Fails on corruption rather than
// repairing; the error names the directory.
absl::StatusOr<std::unique_ptr<Store>> OpenRocksDbStore(const std::string& dir);

}  // namespace mq::server
