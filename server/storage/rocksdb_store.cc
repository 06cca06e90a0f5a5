// RocksDB implementation of Store: one column family per table, every write a synced
// WriteBatch (OPS.md §1: WAL on, sync = true, point-in-time recovery, paranoid checks).
//
// A full device: RocksDB in Debian 12 asserts (aborts) when it writes again to a file that has
// failed, and it may hit ENOSPC in a background flush. So Write refuses (UNAVAILABLE) while the
// device has less free space than the reserve, and a failed write leaves the store "broken":
// Recover() closes and reopens the DB (DB::Resume() does not recover a failed WAL write) once
// there is room, then proves it with a synced probe write. Nor is the DB closed at exit while
// the device is full.

#include <fcntl.h>
#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>
#include <shared_mutex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/util.h"
#include "server/storage/store.h"

namespace mq::server {
namespace {

constexpr char kProbeKey[] = "write_probe";
// Free space below which the DB is not closed at exit (see ~RocksDbStore).
constexpr int64_t kCloseRoomBytes = int64_t{1} << 20;

std::string MiB(int64_t bytes) { return absl::StrFormat("%.1f MiB", bytes / 1048576.0); }

// OK when `dir` has at least `reserve` bytes free; otherwise UNAVAILABLE naming both.
absl::Status CheckRoom(const std::string& dir, int64_t reserve) {
  struct statvfs st;
  if (statvfs(dir.c_str(), &st) != 0) {
    return absl::UnavailableError(absl::StrCat("cannot stat ", dir, ": ", std::strerror(errno)));
  }
  const int64_t free_bytes = static_cast<int64_t>(st.f_bavail) * static_cast<int64_t>(st.f_frsize);
  if (free_bytes < reserve) {
    return absl::UnavailableError(absl::StrCat("No space left on device: ", MiB(free_bytes),
                                               " free in ", dir, ", the state store keeps ",
                                               MiB(reserve), " in reserve"));
  }
  return absl::OkStatus();
}

// Writes, syncs and removes a small file in `dir`: proves the directory takes writes.
absl::Status ProbeWrite(const std::string& dir) {
  const std::string path = dir + "/.mq-write-probe";
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0)
    return absl::UnavailableError(absl::StrCat("cannot create ", path, ": ", std::strerror(errno)));
  const std::string block(64 << 10, '\0');
  absl::Status status;
  if (::write(fd, block.data(), block.size()) != static_cast<ssize_t>(block.size())) {
    status =
        absl::UnavailableError(absl::StrCat("cannot write ", path, ": ", std::strerror(errno)));
  } else if (::fsync(fd) != 0) {
    status = absl::UnavailableError(absl::StrCat("cannot sync ", path, ": ", std::strerror(errno)));
  }
  ::close(fd);
  ::unlink(path.c_str());
  return status;
}

rocksdb::Options DbOptions() {
  rocksdb::Options options;
  options.OptimizeForSmallDb();
  options.create_if_missing = true;
  options.create_missing_column_families = true;
  options.paranoid_checks = true;
  options.max_background_jobs = 2;
  options.max_total_wal_size = 64 << 20;
  options.keep_log_file_num = 5;
  options.max_log_file_size = 8 << 20;
  return options;
}

// Opens the DB with every table's column family (and any unknown one it already has).
rocksdb::Status OpenDb(const std::string& dir, rocksdb::DB** db,
                       std::vector<rocksdb::ColumnFamilyHandle*>* handles) {
  const rocksdb::Options options = DbOptions();
  std::vector<rocksdb::ColumnFamilyDescriptor> descriptors;
  descriptors.emplace_back(rocksdb::kDefaultColumnFamilyName,
                           rocksdb::ColumnFamilyOptions(options));
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
  return rocksdb::DB::Open(options, dir, descriptors, handles, db);
}

// Thread-safe: reads share mu_, writes and Recover take it exclusively (RocksDB's own locking
// would do for reads and writes; Recover replaces the DB).
class RocksDbStore : public Store {
 public:
  RocksDbStore(std::string dir, int64_t reserve_bytes, rocksdb::DB* db,
               std::vector<rocksdb::ColumnFamilyHandle*> handles)
      : dir_(std::move(dir)), reserve_bytes_(reserve_bytes) {
    Adopt(db, std::move(handles));
  }

  ~RocksDbStore() override {
    // RocksDB asserts when it closes on a full device (its files' final writes fail). Closing
    // adds nothing to durability (every acknowledged write is in the synced WAL), so then the
    // DB is left open, exactly as after a crash, and recovered at the next start.
    if (db_ != nullptr &&
        (broken_ || !CheckRoom(dir_, std::max(reserve_bytes_, kCloseRoomBytes)).ok())) {
      LogLine("coordinator", "WARN",
              absl::StrCat("state store ", dir_,
                           ": no room to close the store cleanly; "
                           "leaving it as after a crash (every acknowledged write is synced)"));
      return;
    }
    CloseDb();
  }

  absl::Status Write(const WriteBatch& batch) override {
    std::unique_lock<std::shared_mutex> lock(mu_);
    if (broken_ || db_ == nullptr) {
      return absl::UnavailableError(absl::StrCat("a write failed earlier (", last_error_,
                                                 "); waiting until the store can write again"));
    }
    // Refuse before RocksDB sees a full device (see the file comment).
    if (absl::Status room = CheckRoom(dir_, reserve_bytes_); !room.ok()) return room;
    rocksdb::WriteBatch wb;
    for (const WriteBatch::Op& op : batch.ops()) {
      rocksdb::ColumnFamilyHandle* cf = Handle(op.table);
      rocksdb::Status s = op.value ? wb.Put(cf, op.key, *op.value) : wb.Delete(cf, op.key);
      if (!s.ok()) return Error("batch", s);
    }
    rocksdb::WriteOptions options;
    options.sync = true;
    rocksdb::Status s = db_->Write(options, &wb);
    if (!s.ok()) {
      // RocksDB stops writing after a failed WAL write; only a reopen clears that.
      broken_ = true;
      last_error_ = s.ToString();
      return Error("write", s);
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::optional<std::string>> Get(Table table, std::string_view key) override {
    std::shared_lock<std::shared_mutex> lock(mu_);
    if (db_ == nullptr) return Closed();
    std::string value;
    rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), Handle(table), key, &value);
    if (s.IsNotFound()) return std::optional<std::string>();
    if (!s.ok()) return Error("get", s);
    return std::optional<std::string>(std::move(value));
  }

  absl::StatusOr<KeyValues> GetAll(Table table, std::string_view prefix) override {
    std::shared_lock<std::shared_mutex> lock(mu_);
    if (db_ == nullptr) return Closed();
    KeyValues out;
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), Handle(table)));
    for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) {
      out.emplace_back(it->key().ToString(), it->value().ToString());
    }
    if (!it->status().ok()) return Error("scan", it->status());
    return out;
  }

  absl::Status Writable() override {
    std::shared_lock<std::shared_mutex> lock(mu_);
    if (broken_ || db_ == nullptr) return absl::UnavailableError(last_error_);
    return CheckRoom(dir_, reserve_bytes_);
  }

  absl::Status Recover() override {
    std::unique_lock<std::shared_mutex> lock(mu_);
    if (absl::Status room = CheckRoom(dir_, reserve_bytes_); !room.ok()) return room;
    if (broken_ || db_ == nullptr) {
      CloseDb();
      rocksdb::DB* db = nullptr;
      std::vector<rocksdb::ColumnFamilyHandle*> handles;
      rocksdb::Status s = OpenDb(dir_, &db, &handles);
      if (!s.ok()) return Error("reopen", s);
      Adopt(db, std::move(handles));
      LogLine("coordinator", "INFO", absl::StrCat("state store ", dir_, " reopened"));
    }
    rocksdb::WriteOptions options;
    options.sync = true;
    rocksdb::Status s = db_->Put(options, Handle(Table::kMeta), kProbeKey, std::to_string(NowMs()));
    if (!s.ok()) {
      broken_ = true;
      last_error_ = s.ToString();
      return Error("probe write", s);
    }
    broken_ = false;
    last_error_.clear();
    return absl::OkStatus();
  }

 private:
  void Adopt(rocksdb::DB* db, std::vector<rocksdb::ColumnFamilyHandle*> handles) {
    db_ = db;
    handles_ = std::move(handles);
    by_name_.clear();
    for (rocksdb::ColumnFamilyHandle* h : handles_) by_name_[h->GetName()] = h;
    broken_ = false;
  }

  void CloseDb() {
    if (db_ == nullptr) return;
    for (rocksdb::ColumnFamilyHandle* h : handles_) db_->DestroyColumnFamilyHandle(h);
    handles_.clear();
    by_name_.clear();
    // Close does not fsync the WAL; every acknowledged write was already synced.
    db_->Close().PermitUncheckedError();
    delete db_;
    db_ = nullptr;
  }

  rocksdb::ColumnFamilyHandle* Handle(Table table) {
    return by_name_.at(std::string(TableName(table)));
  }

  absl::Status Closed() const {
    return absl::UnavailableError(
        absl::StrCat("state store ", dir_, " is closed after a failed write (", last_error_, ")"));
  }

  absl::Status Error(std::string_view op, const rocksdb::Status& s) {
    std::string msg =
        absl::StrCat("state store ", dir_, ": ", std::string(op), " failed: ", s.ToString());
    if (s.IsCorruption()) return absl::DataLossError(msg);
    if (s.IsIOError() || s.IsBusy() || s.IsTryAgain() || s.IsIncomplete()) {
      return absl::UnavailableError(msg);
    }
    return absl::InternalError(msg);
  }

  const std::string dir_;
  const int64_t reserve_bytes_;
  std::shared_mutex mu_;
  rocksdb::DB* db_ = nullptr;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;
  std::map<std::string, rocksdb::ColumnFamilyHandle*> by_name_;
  bool broken_ = false;     // a write failed; Recover() reopens the DB
  std::string last_error_;  // that write's error
};

}  // namespace

absl::StatusOr<std::unique_ptr<Store>> OpenRocksDbStore(const std::string& dir,
                                                        int64_t reserve_bytes) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return absl::FailedPreconditionError(
        absl::StrCat("--data-dir ", dir, ": cannot create it: ", ec.message()));
  }
  // RocksDB opening on a full device can abort the process; say so in one line instead.
  absl::Status room = CheckRoom(dir, reserve_bytes);
  if (room.ok()) room = ProbeWrite(dir);
  if (!room.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "data dir ", dir, " has no room (", room.message(), "); make room and start again"));
  }
  rocksdb::DB* db = nullptr;
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::Status s = OpenDb(dir, &db, &handles);
  if (!s.ok()) {
    std::string msg = absl::StrCat("--data-dir ", dir, ": cannot open the state store: ", s.ToString());
    if (s.IsCorruption()) return absl::DataLossError(msg);
    if (s.IsIOError()) return absl::FailedPreconditionError(msg);
    return absl::InternalError(msg);
  }
  return std::unique_ptr<Store>(new RocksDbStore(dir, reserve_bytes, db, std::move(handles)));
}

}  // namespace mq::server
