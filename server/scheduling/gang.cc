#include "server/scheduling/gang.h"

#include <algorithm>

namespace mq::server {
namespace {

bool Offers(const WorkerView& w, const std::string& capability) {
  return std::find(w.capabilities.begin(), w.capabilities.end(), capability) !=
         w.capabilities.end();
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
  std::sort(eligible.begin(), eligible.end(), [](const WorkerView* a, const WorkerView* b) {
    if (a->registered_at_ms != b->registered_at_ms) {
      return a->registered_at_ms < b->registered_at_ms;
    }
    return a->worker_id < b->worker_id;
  });
  std::vector<std::string> out;
  for (int i = 0; i < count; ++i) out.push_back(eligible[i]->worker_id);
  return out;
}

bool AnyWorkerOffers(const std::vector<WorkerView>& workers, const std::string& capability) {
  return std::any_of(workers.begin(), workers.end(),
                     [&](const WorkerView& w) { return w.alive && Offers(w, capability); });
}

}  // namespace mq::server
