#include "worker/device_info.h"

#include <dlfcn.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <charconv>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <thread>

#include "absl/strings/str_cat.h"

namespace mq::worker {
namespace {

// The few CUDA driver API entry points we need, resolved with dlsym.
struct CudaDriver {
  using InitFn = int (*)(unsigned int);
  using CountFn = int (*)(int*);
  using GetFn = int (*)(int*, int);
  using NameFn = int (*)(char*, int, int);
  using MemFn = int (*)(size_t*, int);
  InitFn init = nullptr;
  CountFn count = nullptr;
  GetFn get = nullptr;
  NameFn name = nullptr;
  MemFn total_mem = nullptr;
};

absl::Status ProbeCuda(int ordinal, DeviceInfo& info) {
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    return absl::FailedPreconditionError(absl::StrCat(
        "--device = ", info.device, ": no CUDA driver on this machine (libcuda.so.1: ", dlerror(),
        "); use --device cpu"));
  }
  CudaDriver d;
  d.init = reinterpret_cast<CudaDriver::InitFn>(dlsym(lib, "cuInit"));
  d.count = reinterpret_cast<CudaDriver::CountFn>(dlsym(lib, "cuDeviceGetCount"));
  d.get = reinterpret_cast<CudaDriver::GetFn>(dlsym(lib, "cuDeviceGet"));
  d.name = reinterpret_cast<CudaDriver::NameFn>(dlsym(lib, "cuDeviceGetName"));
  d.total_mem = reinterpret_cast<CudaDriver::MemFn>(dlsym(lib, "cuDeviceTotalMem_v2"));
  if (!d.init || !d.count || !d.get || !d.name || !d.total_mem) {
    return absl::FailedPreconditionError("libcuda.so.1 lacks the driver API mq needs");
  }
  if (int rc = d.init(0); rc != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("--device = ", info.device, ": cuInit failed with CUDA error ", rc));
  }
  int count = 0;
  d.count(&count);
  if (ordinal >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("--device = ", info.device, ": this machine has ", count, " GPU(s)"));
  }
  int dev = 0;
  d.get(&dev, ordinal);
  char name[256] = {0};
  d.name(name, sizeof(name) - 1, dev);
  size_t bytes = 0;
  d.total_mem(&bytes, dev);
  info.device_name = name;
  info.device_memory_bytes = static_cast<int64_t>(bytes);
  return absl::OkStatus();
}

// The first line of `path` as a byte count; nullopt when absent, "max" or not a number.
std::optional<int64_t> ReadLimit(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  if (!in || !std::getline(in, line)) return std::nullopt;
  int64_t v = 0;
  auto [ptr, ec] = std::from_chars(line.data(), line.data() + line.size(), v);
  if (ec != std::errc() || v <= 0) return std::nullopt;
  return v;
}

// The process's cgroup v2 path ("0::/kubepods/..."), empty when none is listed.
std::string UnifiedGroup(const std::string& proc_cgroup) {
  std::ifstream in(proc_cgroup);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("0::", 0) == 0) return line.substr(3);
  }
  return "";
}

}  // namespace

int64_t HostMemoryLimit(int64_t physical, const std::string& cgroup_root,
                        const std::string& proc_cgroup) {
  int64_t limit = physical;
  auto lower = [&](std::optional<int64_t> v) {
    if (v && *v < limit) limit = *v;  // v1's "no limit" is a huge number: never lower
  };
  const std::string group = UnifiedGroup(proc_cgroup);
  if (!group.empty() && group != "/") lower(ReadLimit(cgroup_root + group + "/memory.max"));
  lower(ReadLimit(cgroup_root + "/memory.max"));
  lower(ReadLimit(cgroup_root + "/memory/memory.limit_in_bytes"));
  return limit;
}

absl::StatusOr<DeviceInfo> ProbeDevice(const std::string& device, const std::string& scratch_dir) {
  DeviceInfo info;
  info.device = device;
  info.cpu_cores = static_cast<int>(std::thread::hardware_concurrency());
  info.host_memory_bytes = HostMemoryLimit(static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) *
                                           static_cast<int64_t>(sysconf(_SC_PAGESIZE)));
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  info.hostname = host;
  struct statvfs fs {};
  if (!scratch_dir.empty() && statvfs(scratch_dir.c_str(), &fs) == 0) {
    info.scratch_free_bytes = static_cast<int64_t>(fs.f_bavail) * static_cast<int64_t>(fs.f_frsize);
  }
  if (device == "cpu") return info;
  if (device.rfind("cuda:", 0) == 0) {
    int ordinal = -1;
    const char* begin = device.data() + 5;
    const char* end = device.data() + device.size();
    auto [ptr, ec] = std::from_chars(begin, end, ordinal);
    if (ec == std::errc() && ptr == end && begin != end && ordinal >= 0) {
      if (absl::Status s = ProbeCuda(ordinal, info); !s.ok()) return s;
      return info;
    }
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--device = \"", device, "\": must be cpu or cuda:N (N = 0, 1, ...)"));
}

void DefaultCudaAllocatorConfig() {
  if (std::getenv("PYTORCH_CUDA_ALLOC_CONF") == nullptr &&
      std::getenv("PYTORCH_ALLOC_CONF") == nullptr) {
    ::setenv("PYTORCH_CUDA_ALLOC_CONF", kDefaultCudaAllocConf, /*overwrite=*/0);
  }
}

}  // namespace mq::worker
