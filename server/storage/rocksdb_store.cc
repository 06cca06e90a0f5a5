// RocksDB implementation of Store: one column family per table, every write a synced
// WriteBatch (OPS.md §1: WAL on, sync = true, point-in-time recovery, paranoid checks).

#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>

#include <map>

#include "absl/strings/str_cat.h"
#include "server/storage/store.h"

namespace mq::server {
namespace {

class RocksDbStore : public Store {
 public:
  RocksDbStore(std::string dir, rocksdb::DB* db, std::vector<rocksdb::ColumnFamilyHandle*> handles)
      : dir_(std::move(dir)), db_(db), handles_(std::move(handles)) {
    for (rocksdb::ColumnFamilyHandle* h : handles_) by_name_[h->GetName()] = h;
  }

  ~RocksDbStore() override {
    for (rocksdb::ColumnFamilyHandle* h : handles_) db_->DestroyColumnFamilyHandle(h);
    // Close does not fsync the WAL; every write was already synced.
    db_->Close().PermitUncheckedError();
    delete db_;
  }

  absl::Status Write(const WriteBatch& batch) override {
    rocksdb::WriteBatch wb;
    for (const WriteBatch::Op& op : batch.ops()) {
      rocksdb::ColumnFamilyHandle* cf = Handle(op.table);
      rocksdb::Status s = op.value ? wb.Put(cf, op.key, *op.value) : wb.Delete(cf, op.key);
      if (!s.ok()) return Error("batch", s);
    }
    rocksdb::WriteOptions options;
    options.sync = true;
    rocksdb::Status s = db_->Write(options, &wb);
    if (!s.ok()) return Error("write", s);
    return absl::OkStatus();
  }

  absl::StatusOr<std::optional<std::string>> Get(Table table, std::string_view key) override {
    std::string value;
    rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), Handle(table), key, &value);
    if (s.IsNotFound()) return std::optional<std::string>();
    if (!s.ok()) return Error("get", s);
    return std::optional<std::string>(std::move(value));
  }

  absl::StatusOr<KeyValues> GetAll(Table table, std::string_view prefix) override {
    KeyValues out;
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), Handle(table)));
    for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) {
      out.emplace_back(it->key().ToString(), it->value().ToString());
    }
    if (!it->status().ok()) return Error("scan", it->status());
    return out;
  }

 private:
  rocksdb::ColumnFamilyHandle* Handle(Table table) {
    return by_name_.at(std::string(TableName(table)));
  }

  absl::Status Error(std::string_view op, const rocksdb::Status& s) {
    std::string msg = absl::StrCat("state store ", dir_, ": ", std::string(op), " failed: ", s.ToString());
    if (s.IsCorruption()) return absl::DataLossError(msg);
    return absl::InternalError(msg);
  }

  std::string dir_;
  rocksdb::DB* db_;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;
  std::map<std::string, rocksdb::ColumnFamilyHandle*> by_name_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Store>> OpenRocksDbStore(const std::string& dir) {
  rocksdb::Options options;
  options.OptimizeForSmallDb();
  options.create_if_missing = true;
  options.create_missing_column_families = true;
  options.paranoid_checks = true;
  options.max_background_jobs = 2;
  options.max_total_wal_size = 64 << 20;
  options.keep_log_file_num = 5;
  options.max_log_file_size = 8 << 20;

  std::vector<rocksdb::ColumnFamilyDescriptor> descriptors;
  descriptors.emplace_back(rocksdb::kDefaultColumnFamilyName, rocksdb::ColumnFamilyOptions(options));
  for (Table t : AllTables()) {
    descriptors.emplace_back(std::string(TableName(t)), rocksdb::ColumnFamilyOptions(options));
  }
  // Keep column families an older/newer version may have created, so Open does not fail.
  std::vector<std::string> existing;
  if (rocksdb::DB::ListColumnFamilies(options, dir, &existing).ok()) {
    for (const std::string& name : existing) {
      bool known = false;
      for (const auto& d : descriptors) known = known || d.name == name;
      if (!known) descriptors.emplace_back(name, rocksdb::ColumnFamilyOptions(options));
    }
  }

  rocksdb::DB* db = nullptr;
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::Status s = rocksdb::DB::Open(options, dir, descriptors, &handles, &db);
  if (!s.ok()) {
    std::string msg = absl::StrCat("--data-dir ", dir, ": cannot open the state store: ", s.ToString());
    if (s.IsCorruption()) return absl::DataLossError(msg);
    if (s.IsIOError()) return absl::FailedPreconditionError(msg);
    return absl::InternalError(msg);
  }
  return std::unique_ptr<Store>(new RocksDbStore(dir, db, std::move(handles)));
}

}  // namespace mq::server
