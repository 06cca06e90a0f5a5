#include "worker/device_info.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

namespace mq::worker {
namespace {

namespace fs = std::filesystem;

class HostMemoryLimitTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ =
        fs::path(::testing::TempDir()) /
        ("cgroup-" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::remove_all(root_);
    fs::create_directories(root_);
  }
  void Write(const std::string& rel, const std::string& text) {
    fs::create_directories((root_ / rel).parent_path());
    std::ofstream(root_ / rel) << text;
  }
  int64_t Limit(int64_t physical) {
    return HostMemoryLimit(physical, root_.string(), (root_ / "proc-cgroup").string());
  }
  fs::path root_;
};

constexpr int64_t kGiB = int64_t{1} << 30;

TEST_F(HostMemoryLimitTest, PhysicalWhenNoGroupLimitsIt) {
  EXPECT_EQ(Limit(128 * kGiB), 128 * kGiB);                        // nothing to read
  Write("memory.max", "max\n");                                    // v2 without a limit
  Write("memory/memory.limit_in_bytes", "9223372036854771712\n");  // v1 without a limit
  EXPECT_EQ(Limit(128 * kGiB), 128 * kGiB);
}

TEST_F(HostMemoryLimitTest, AContainersV2LimitOfItsOwnGroup) {
  Write("proc-cgroup", "0::/kubepods/pod1/worker\n");
  Write("kubepods/pod1/worker/memory.max", std::to_string(96 * kGiB) + "\n");
  Write("memory.max", "max\n");
  EXPECT_EQ(Limit(2048 * kGiB), 96 * kGiB);
  // A limit above the machine's memory changes nothing.
  Write("kubepods/pod1/worker/memory.max", std::to_string(4096 * kGiB) + "\n");
  EXPECT_EQ(Limit(2048 * kGiB), 2048 * kGiB);
}

TEST_F(HostMemoryLimitTest, TheMountedRootsLimitWithACgroupNamespace) {
  Write("proc-cgroup", "0::/\n");
  Write("memory.max", std::to_string(64 * kGiB) + "\n");
  EXPECT_EQ(Limit(128 * kGiB), 64 * kGiB);
}

TEST_F(HostMemoryLimitTest, V1Limit) {
  Write("proc-cgroup", "9:memory:/\n8:pids:/\n");
  Write("memory/memory.limit_in_bytes", std::to_string(32 * kGiB) + "\n");
  EXPECT_EQ(Limit(128 * kGiB), 32 * kGiB);
}

TEST_F(HostMemoryLimitTest, GarbageIsIgnored) {
  Write("proc-cgroup", "0::/g\n");
  Write("g/memory.max", "lots\n");
  Write("memory.max", "-5\n");
  Write("memory/memory.limit_in_bytes", "\n");
  EXPECT_EQ(Limit(128 * kGiB), 128 * kGiB);
}

TEST(ProbeDevice, ReportsTheHostMemoryLimitOnThisMachine) {
  absl::StatusOr<DeviceInfo> info = ProbeDevice("cpu", "");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_GT(info->host_memory_bytes, 0);
  EXPECT_EQ(info->host_memory_bytes,
            HostMemoryLimit(static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE)));
}

}  // namespace
}  // namespace mq::worker
