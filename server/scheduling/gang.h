// Pure scheduling policies (no I/O, no clocks): which workers run a piece of work.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace mq::server {

// What the policy knows of one worker.
struct WorkerView {
  std::string worker_id;
  bool alive = false;
  bool idle = false;
  std::vector<std::string> capabilities;
  int64_t registered_at_ms = 0;
};

// Picks `count` alive, idle workers that offer `capability`, oldest registration first (ties
// by id), so the choice is deterministic. nullopt when fewer are available.
std::optional<std::vector<std::string>> PickGang(const std::vector<WorkerView>& workers,
                                                 const std::string& capability, int count);

// True when any alive worker offers `capability` (busy or not).
bool AnyWorkerOffers(const std::vector<WorkerView>& workers, const std::string& capability);

}  // namespace mq::server
