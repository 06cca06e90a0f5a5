#include "server/scheduling/gang.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace mq::server {
namespace {

bool Offers(const WorkerView& w, const std::string& capability) {
  return std::find(w.capabilities.begin(), w.capabilities.end(), capability) !=
         w.capabilities.end();
}

void SortByAge(std::vector<const WorkerView*>& ws) {
  std::sort(ws.begin(), ws.end(), [](const WorkerView* a, const WorkerView* b) {
    if (a->registered_at_ms != b->registered_at_ms) {
      return a->registered_at_ms < b->registered_at_ms;
    }
    return a->worker_id < b->worker_id;
  });
}

}  // namespace

std::optional<std::vector<std::string>> PickGang(const std::vector<WorkerView>& workers,
                                                 const std::string& capability, int count) {
  if (count <= 0) return std::nullopt;
  std::vector<const WorkerView*> eligible;
  for (const WorkerView& w : workers) {
    if (w.alive && w.idle && Offers(w, capability)) eligible.push_back(&w);
  }
  if (static_cast<int>(eligible.size()) < count) return std::nullopt;
  SortByAge(eligible);
  std::vector<std::string> out;
  for (int i = 0; i < count; ++i) out.push_back(eligible[i]->worker_id);
  return out;
}

bool AnyWorkerOffers(const std::vector<WorkerView>& workers, const std::string& capability) {
  return std::any_of(workers.begin(), workers.end(),
                     [&](const WorkerView& w) { return w.alive && Offers(w, capability); });
}

namespace {

// The largest `reported` (bytes; <= 0: unknown) among the alive workers offering `capability`,
// when every one of them reports it.
template <typename Reported>
std::optional<int64_t> LargestReported(const std::vector<WorkerView>& workers,
                                       const std::string& capability, Reported reported) {
  std::optional<int64_t> largest;
  for (const WorkerView& w : workers) {
    if (!w.alive || !Offers(w, capability)) continue;
    const int64_t bytes = reported(w);
    if (bytes <= 0) return std::nullopt;
    largest = std::max(largest.value_or(0), bytes);
  }
  return largest;
}

}  // namespace

std::optional<int64_t> LargestDeviceMemory(const std::vector<WorkerView>& workers,
                                           const std::string& capability) {
  return LargestReported(workers, capability,
                         [](const WorkerView& w) { return w.device_memory_bytes; });
}

std::optional<int64_t> LargestHostMemory(const std::vector<WorkerView>& workers,
                                         const std::string& capability) {
  // A CPU worker's host memory is its device: its plan budgets it already.
  return LargestReported(workers, capability, [](const WorkerView& w) {
    return w.device_memory_bytes > 0 ? w.host_memory_bytes : int64_t{0};
  });
}

GangDecision DecideGang(const std::vector<WorkerView>& workers, const GangRequest& request) {
  GangDecision d;
  const int k = std::max(1, request.gang_size);
  std::vector<const WorkerView*> candidates;
  for (const WorkerView& w : workers) {
    if (!w.alive || !Offers(w, request.capability)) continue;
    ++d.capable;
    if (!w.idle) continue;
    if (w.gang_address.empty()) {
      ++d.without_address;
      continue;
    }
    candidates.push_back(&w);
  }
  SortByAge(candidates);
  d.available = static_cast<int>(candidates.size());
  if (d.available >= k) {
    for (int i = 0; i < k; ++i) d.workers.push_back(candidates[i]->worker_id);
    return d;
  }
  if (d.capable < k && request.waited_ms >= request.gang_wait_ms && d.available >= 1) {
    for (const WorkerView* w : candidates) d.workers.push_back(w->worker_id);
    d.shrunk = true;
    return d;
  }
  d.waiting = absl::StrCat(d.available, " of ", k, " workers available (", d.capable,
                           " alive with capability \"", request.capability, "\"");
  if (d.without_address > 0) {
    absl::StrAppend(&d.waiting, ", ", d.without_address, " idle without a gang address");
  }
  d.waiting += ")";
  if (d.capable < k) {
    absl::StrAppend(&d.waiting, "; a smaller gang forms once the job has waited ",
                    request.gang_wait_ms / 1000.0, " s");
  }
  return d;
}

}  // namespace mq::server
