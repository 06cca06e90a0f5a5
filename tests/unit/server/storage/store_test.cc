// One contract suite run against both Store implementations, plus RocksDB reopen tests.

#include "server/storage/store.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <random>

namespace mq::server {
namespace {

std::string TempDir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() /
             (name + "-" + std::to_string(getpid()) + "-" + std::to_string(std::random_device{}()));
  std::filesystem::remove_all(dir);
  return dir.string();
}

class StoreContract : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "memory") {
      store_ = NewInMemoryStore();
    } else {
      dir_ = TempDir("mq-store");
      auto s = OpenRocksDbStore(dir_);
      ASSERT_TRUE(s.ok()) << s.status();
      store_ = *std::move(s);
    }
  }
  void TearDown() override {
    store_.reset();
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }
  std::unique_ptr<Store> store_;
  std::string dir_;
};

TEST_P(StoreContract, GetOfMissingKeyIsEmpty) {
  auto v = store_->Get(Table::kJobs, "nope");
  ASSERT_TRUE(v.ok());
  EXPECT_FALSE(v->has_value());
}

TEST_P(StoreContract, PutGetOverwriteDelete) {
  ASSERT_TRUE(store_->Put(Table::kJobs, "a", "1").ok());
  EXPECT_EQ(**store_->Get(Table::kJobs, "a"), "1");
  ASSERT_TRUE(store_->Put(Table::kJobs, "a", "2").ok());
  EXPECT_EQ(**store_->Get(Table::kJobs, "a"), "2");
  ASSERT_TRUE(store_->Delete(Table::kJobs, "a").ok());
  EXPECT_FALSE(store_->Get(Table::kJobs, "a")->has_value());
  ASSERT_TRUE(store_->Delete(Table::kJobs, "never-there").ok());
}

TEST_P(StoreContract, TablesAreSeparate) {
  ASSERT_TRUE(store_->Put(Table::kJobs, "k", "job").ok());
  ASSERT_TRUE(store_->Put(Table::kWorkers, "k", "worker").ok());
  EXPECT_EQ(**store_->Get(Table::kJobs, "k"), "job");
  EXPECT_EQ(**store_->Get(Table::kWorkers, "k"), "worker");
  EXPECT_FALSE(store_->Get(Table::kEvents, "k")->has_value());
}

TEST_P(StoreContract, GetAllIsOrderedAndPrefixed) {
  for (const char* k : {"j2/0002", "j1/0001", "j1/0000", "j10/0000", "j1/0010"}) {
    ASSERT_TRUE(store_->Put(Table::kEvents, k, k).ok());
  }
  auto all = store_->GetAll(Table::kEvents, "j1/");
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 3u);
  EXPECT_EQ((*all)[0].first, "j1/0000");
  EXPECT_EQ((*all)[1].first, "j1/0001");
  EXPECT_EQ((*all)[2].first, "j1/0010");
  EXPECT_EQ(store_->GetAll(Table::kEvents)->size(), 5u);
  EXPECT_TRUE(store_->GetAll(Table::kEvents, "zzz")->empty());
}

TEST_P(StoreContract, BatchAppliesEveryOpInOrder) {
  ASSERT_TRUE(store_->Put(Table::kJobs, "gone", "x").ok());
  WriteBatch b;
  b.Put(Table::kJobs, "a", "1");
  b.Put(Table::kAttempts, "a/1", "att");
  b.Put(Table::kJobs, "a", "2");  // later op wins
  b.Delete(Table::kJobs, "gone");
  ASSERT_TRUE(store_->Write(b).ok());
  EXPECT_EQ(**store_->Get(Table::kJobs, "a"), "2");
  EXPECT_EQ(**store_->Get(Table::kAttempts, "a/1"), "att");
  EXPECT_FALSE(store_->Get(Table::kJobs, "gone")->has_value());
  ASSERT_TRUE(store_->Write(WriteBatch()).ok());
}

TEST_P(StoreContract, BinaryValuesRoundTrip) {
  std::string value("\0\xff\x01zero\0", 9);
  ASSERT_TRUE(store_->Put(Table::kMeta, "bin", value).ok());
  EXPECT_EQ(**store_->Get(Table::kMeta, "bin"), value);
}

INSTANTIATE_TEST_SUITE_P(Both, StoreContract, ::testing::Values("memory", "rocksdb"));

TEST(RocksDbStore, WriteCloseReopenRead) {
  const std::string dir = TempDir("mq-reopen");
  {
    auto store = OpenRocksDbStore(dir);
    ASSERT_TRUE(store.ok()) << store.status();
    WriteBatch b;
    for (int i = 0; i < 100; ++i) b.Put(Table::kEvents, "e/" + std::to_string(1000 + i), "v");
    b.Put(Table::kJobs, "j", "record");
    ASSERT_TRUE((*store)->Write(b).ok());
    ASSERT_TRUE((*store)->Delete(Table::kEvents, "e/1000").ok());
  }
  {
    auto store = OpenRocksDbStore(dir);
    ASSERT_TRUE(store.ok()) << store.status();
    EXPECT_EQ(**(*store)->Get(Table::kJobs, "j"), "record");
    EXPECT_EQ((*store)->GetAll(Table::kEvents, "e/")->size(), 99u);
  }
  std::filesystem::remove_all(dir);
}

TEST(RocksDbStore, SecondOpenOfALiveDbIsAClearError) {
  const std::string dir = TempDir("mq-lock");
  auto first = OpenRocksDbStore(dir);
  ASSERT_TRUE(first.ok());
  auto second = OpenRocksDbStore(dir);
  ASSERT_FALSE(second.ok());
  EXPECT_NE(second.status().message().find(dir), std::string::npos) << second.status();
  first->reset();
  std::filesystem::remove_all(dir);
}

TEST(RocksDbStore, DataDirWithoutRoomIsOneClearError) {
  const std::string dir = TempDir("mq-noroom");
  // More free space than any device has: start-up refuses before RocksDB opens anything.
  auto s = OpenRocksDbStore(dir, int64_t{1} << 62);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.status().message().find("data dir " + dir + " has no room"), std::string::npos)
      << s.status();
  EXPECT_NE(s.status().message().find("No space left on device"), std::string::npos) << s.status();
  EXPECT_FALSE(std::filesystem::exists(dir + "/CURRENT"));
  std::filesystem::remove_all(dir);
}

TEST(RocksDbStore, RecoverProvesTheStoreWritesAndKeepsItsData) {
  const std::string dir = TempDir("mq-recover");
  auto store = OpenRocksDbStore(dir);
  ASSERT_TRUE(store.ok()) << store.status();
  ASSERT_TRUE((*store)->Put(Table::kJobs, "j", "record").ok());
  EXPECT_TRUE((*store)->Recover().ok());
  EXPECT_EQ(**(*store)->Get(Table::kJobs, "j"), "record");
  ASSERT_TRUE((*store)->Put(Table::kJobs, "k", "second").ok());
  store->reset();
  std::filesystem::remove_all(dir);
}

TEST(RocksDbStore, UnusableDirectoryIsAClearError) {
  auto s = OpenRocksDbStore("/proc/definitely/not/writable");
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("--data-dir /proc/definitely/not/writable"),
            std::string::npos)
      << s.status();
}

}  // namespace
}  // namespace mq::server
