#include "server/storage/store.h"

#include <map>
#include <mutex>

namespace mq::server {

const std::vector<Table>& AllTables() {
  static const std::vector<Table> kTables = {Table::kMeta,        Table::kJobs,   Table::kAttempts,
                                             Table::kAssignments, Table::kEvents, Table::kWorkers,
                                             Table::kIdempotency, Table::kLayers};
  return kTables;
}

std::string_view TableName(Table table) {
  switch (table) {
    case Table::kMeta:
      return "meta";
    case Table::kJobs:
      return "jobs";
    case Table::kAttempts:
      return "attempts";
    case Table::kAssignments:
      return "assignments";
    case Table::kEvents:
      return "events";
    case Table::kWorkers:
      return "workers";
    case Table::kIdempotency:
      return "idempotency";
    case Table::kLayers:
      return "layers";
  }
  return "unknown";
}

absl::Status Store::Put(Table table, std::string key, std::string value) {
  WriteBatch batch;
  batch.Put(table, std::move(key), std::move(value));
  return Write(batch);
}

absl::Status Store::Delete(Table table, std::string key) {
  WriteBatch batch;
  batch.Delete(table, std::move(key));
  return Write(batch);
}

namespace {

class InMemoryStore : public Store {
 public:
  absl::Status Write(const WriteBatch& batch) override {
    std::lock_guard<std::mutex> lock(mu_);
    for (const WriteBatch::Op& op : batch.ops()) {
      auto& table = tables_[op.table];
      if (op.value) {
        table[op.key] = *op.value;
      } else {
        table.erase(op.key);
      }
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::optional<std::string>> Get(Table table, std::string_view key) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto& t = tables_[table];
    auto it = t.find(std::string(key));
    if (it == t.end()) return std::optional<std::string>();
    return std::optional<std::string>(it->second);
  }

  absl::StatusOr<KeyValues> GetAll(Table table, std::string_view prefix) override {
    std::lock_guard<std::mutex> lock(mu_);
    KeyValues out;
    auto& t = tables_[table];
    for (auto it = t.lower_bound(std::string(prefix));
         it != t.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it) {
      out.emplace_back(it->first, it->second);
    }
    return out;
  }

 private:
  std::mutex mu_;
  std::map<Table, std::map<std::string, std::string>> tables_;
};

}  // namespace

std::unique_ptr<Store> NewInMemoryStore() { return std::make_unique<InMemoryStore>(); }

}  // namespace mq::server
