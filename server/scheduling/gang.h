// Pure scheduling policies (no I/O, no clocks): which workers run a piece of work.
#pragma once

#include <cstdint>
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
  // HOST:PORT the worker serves a gang rendezvous on as rank 0; empty when it cannot.
  std::string gang_address;
  // Device memory in bytes (0: a CPU worker, or not reported).
  int64_t device_memory_bytes = 0;
  // The worker's host memory in bytes (0: not reported).
  int64_t host_memory_bytes = 0;
};

// Picks `count` alive, idle workers that offer `capability`, oldest registration first (ties
// by id), so the choice is deterministic. nullopt when fewer are available.
std::optional<std::vector<std::string>> PickGang(const std::vector<WorkerView>& workers,
                                                 const std::string& capability, int count);

// True when any alive worker offers `capability` (busy or not).
bool AnyWorkerOffers(const std::vector<WorkerView>& workers, const std::string& capability);

// The most device memory among the alive workers offering `capability`, when EVERY one of them
// reports its device memory (GPU workers); nullopt when none offers it or any is a CPU worker or
// did not report (their memory is then not a device limit this policy can judge).
std::optional<int64_t> LargestDeviceMemory(const std::vector<WorkerView>& workers,
                                           const std::string& capability);

// The most host memory among the alive GPU workers offering `capability`, when every one of
// them reports it; nullopt when none offers it, any is a CPU worker (its plan already budgets
// host memory as its device) or any did not report.
std::optional<int64_t> LargestHostMemory(const std::vector<WorkerView>& workers,
                                         const std::string& capability);

// A planned job waiting for a gang of quantize workers.
struct GangRequest {
  // e.g. "quantize:gptq".
  std::string capability;
  // Desired gang size K (spec.gang_size), >= 1.
  int gang_size = 1;
  // How long the job has waited for a gang, and how long it waits before it settles for a
  // smaller one (only when fewer than K capable workers are alive at all).
  int64_t waited_ms = 0;
  int64_t gang_wait_ms = 0;
};

struct GangDecision {
  // The gang by rank (rank 0 first); empty means keep waiting.
  std::vector<std::string> workers;
  // True when the gang is smaller than requested.
  bool shrunk = false;
  // Candidates: alive, idle, capable workers with a gang address.
  int available = 0;
  // Alive workers offering the capability, busy or idle.
  int capable = 0;
  // Alive, idle, capable workers without a gang address (never candidates).
  int without_address = 0;
  // Why the job waits (empty when a gang was formed).
  std::string waiting;
};

// Rules, in order:
//  1. candidates = alive, idle, offering the capability, with a non-empty gang_address;
//  2. >= K candidates: the first K in PickGang's order;
//  3. fewer than K capable workers alive (busy or idle), waited >= gang_wait_ms and >= 1
//     candidate: every candidate (a smaller gang);
//  4. otherwise wait.
GangDecision DecideGang(const std::vector<WorkerView>& workers, const GangRequest& request);

}  // namespace mq::server
