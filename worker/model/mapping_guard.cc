#include "worker/model/mapping_guard.h"

#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <limits>
#include <mutex>
#include <utility>

#include "absl/strings/str_cat.h"

namespace mq::model {
namespace {

constexpr uint64_t kIntact = std::numeric_limits<uint64_t>::max();

// One guarded mapping. `begin` != 0 publishes the slot to the handler (release after the other
// fields are set); `damaged_from` is the lowest file offset a fault replaced with zeros.
struct Slot {
  std::atomic<uintptr_t> begin{0};
  std::atomic<uintptr_t> end{0};  // one past the last mapped page
  std::atomic<uint64_t> damaged_from{kIntact};
  std::atomic<bool> taken{false};
};

Slot g_slots[kMaxGuardedMappings];
std::atomic<uint64_t> g_faults{0};
uintptr_t g_page = 4096;

// Names of the mapped files, by slot; never read by the handler.
std::mutex g_names_mu;
struct Names {
  std::string path;
  std::string kind;
  uint64_t size = 0;
};
Names g_names[kMaxGuardedMappings];

struct sigaction g_previous;
std::once_flag g_install_once;

// Hands a fault that is not ours to whatever handled SIGBUS before us.
void Chain(int sig, siginfo_t* info, void* context) {
  if (g_previous.sa_flags & SA_SIGINFO) {
    if (g_previous.sa_sigaction != nullptr) {
      g_previous.sa_sigaction(sig, info, context);
      return;
    }
  } else if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN) {
    g_previous.sa_handler(sig);
    return;
  }
  // Default action: restore it; returning re-runs the faulting access, which now kills the
  // process with SIGBUS as if no handler had been installed.
  struct sigaction dfl;
  std::memset(&dfl, 0, sizeof(dfl));
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  ::sigaction(SIGBUS, &dfl, nullptr);
}

// Async-signal-safe: atomics, mmap (a plain system call) and nothing else.
void OnSigbus(int sig, siginfo_t* info, void* context) {
  const int saved_errno = errno;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
  for (Slot& slot : g_slots) {
    const uintptr_t begin = slot.begin.load(std::memory_order_acquire);
    if (begin == 0 || addr < begin) continue;
    const uintptr_t end = slot.end.load(std::memory_order_acquire);
    if (addr >= end) continue;
    const uintptr_t page = addr & ~(g_page - 1);
    // Zero pages from the faulting one to the end of the mapping: later reads of the lost part
    // do not fault again, and the mapping stays one range for munmap.
    void* repaired = ::mmap(reinterpret_cast<void*>(page), end - page, PROT_READ,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (repaired == MAP_FAILED) break;  // cannot repair: not survivable
    const uint64_t offset = page - begin;
    uint64_t seen = slot.damaged_from.load(std::memory_order_relaxed);
    while (offset < seen &&
           !slot.damaged_from.compare_exchange_weak(seen, offset, std::memory_order_release)) {
    }
    g_faults.fetch_add(1, std::memory_order_relaxed);
    errno = saved_errno;
    return;
  }
  errno = saved_errno;
  Chain(sig, info, context);
}

void Install() {
  g_page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_sigaction = OnSigbus;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGBUS, &sa, &g_previous);
}

}  // namespace

int RegisterMapping(const void* base, uint64_t size, std::string path, std::string kind) {
  std::call_once(g_install_once, Install);
  if (base == nullptr || size == 0) return -1;
  for (int i = 0; i < kMaxGuardedMappings; ++i) {
    bool expected = false;
    if (!g_slots[i].taken.compare_exchange_strong(expected, true)) continue;
    {
      std::lock_guard<std::mutex> lock(g_names_mu);
      g_names[i] = Names{std::move(path), std::move(kind), size};
    }
    const uintptr_t begin = reinterpret_cast<uintptr_t>(base);
    const uintptr_t end = (begin + size + g_page - 1) & ~(g_page - 1);
    g_slots[i].damaged_from.store(kIntact, std::memory_order_relaxed);
    g_slots[i].end.store(end, std::memory_order_release);
    g_slots[i].begin.store(begin, std::memory_order_release);
    return i;
  }
  return -1;
}

void UnregisterMapping(int handle) {
  if (handle < 0 || handle >= kMaxGuardedMappings) return;
  Slot& slot = g_slots[handle];
  slot.begin.store(0, std::memory_order_release);
  slot.end.store(0, std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(g_names_mu);
    g_names[handle] = Names();
  }
  slot.taken.store(false, std::memory_order_release);
}

absl::Status CheckMappedRead(const void* data, uint64_t len, std::string_view what) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(data);
  for (int i = 0; i < kMaxGuardedMappings; ++i) {
    const Slot& slot = g_slots[i];
    const uintptr_t begin = slot.begin.load(std::memory_order_acquire);
    if (begin == 0 || addr < begin || addr >= slot.end.load(std::memory_order_acquire)) continue;
    const uint64_t damaged = slot.damaged_from.load(std::memory_order_acquire);
    if (damaged == kIntact || (addr - begin) + len <= damaged) return absl::OkStatus();
    Names names;
    {
      std::lock_guard<std::mutex> lock(g_names_mu);
      names = g_names[i];
    }
    struct stat st;
    const std::string now = ::stat(names.path.c_str(), &st) == 0
                                ? absl::StrCat(st.st_size, " bytes on disk now")
                                : absl::StrCat("cannot stat it now: ", std::strerror(errno));
    return absl::DataLossError(absl::StrCat(
        names.kind.empty() ? "" : names.kind + " ", names.path,
        " shrank or became unreadable while reading ", std::string(what), " (mapped ", names.size,
        " bytes at open, ", now, "; the read failed at byte ", damaged, " of the file)"));
  }
  return absl::OkStatus();
}

uint64_t GuardedMappingFaults() { return g_faults.load(std::memory_order_relaxed); }

}  // namespace mq::model
