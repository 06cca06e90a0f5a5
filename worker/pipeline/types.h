// Plain records the layer pipeline reports (no torch, no protobuf: the worker's RPC layer
// converts them to mq.v1 messages). Value types, no shared state.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace mq::pipeline {

// What stat() says of a file: any change to its content or metadata through the file system
// changes its ctime, which no caller can set back.
struct FileStamp {
  uint64_t device = 0, inode = 0;
  int64_t mtime_ns = 0, ctime_ns = 0;
  bool operator==(const FileStamp&) const = default;
};

struct OutputFileInfo {
  std::string name;  // relative to the output directory
  int64_t size = 0;
  std::string sha256;  // lowercase hex
  // The file's stamp when its bytes were last read back from storage and matched `sha256`
  // (ReadBackCommitted); none when they were not.
  std::optional<FileStamp> verified;
};

// What a verification of committed files (VerifyFiles) read.
struct VerifyCounts {
  int hashed_files = 0;
  int64_t hashed_bytes = 0;
  int stamped_files = 0;  // verified by an unchanged stamp, not read again
};

struct RareExpertInfo {
  int expert = 0;
  int64_t routed_tokens = 0;
  std::string treatment;  // "topped_up" or "rtn"
};

// One AWQ smoothing mapping, or several folded into one entry (mirrors mq.v1.AwqMapping).
struct AwqMappingInfo {
  std::string smooth;  // the smoothed module ("...mlp.experts.*.up_proj" for a folded entry)
  int balance_layers = 0;
  int mappings = 1;
  int identity_chosen = 0;  // of `mappings`, those that kept s = 1
  double alpha = 0;         // mean chosen alpha over the others (0 when none)
  double loss_identity = 0, loss_chosen = 0;  // summed over `mappings`
  int64_t rows = 0;
  int64_t routing_changed_tokens = 0, routing_tokens = 0;  // the MoE mapping only
};

// What one rank measured for one step (mirrors mq.v1.LayerStats).
struct StepStats {
  double load_seconds = 0, forward_seconds = 0, hessian_seconds = 0, solve_seconds = 0,
         propagate_seconds = 0, write_seconds = 0;
  double exchange_seconds = 0;  // of the above, in the gang's collectives
  bool preloaded = false;  // the layer's weights were loaded while the step before solved
  // Checkpoint bytes of the layer that its load read from copies staged while the step before
  // computed (layer_staging.h).
  int64_t staged_bytes = 0;
  // Routed tokens per expert over the whole gang (every rank reports the same values).
  int64_t expert_tokens_min = 0, expert_tokens_median = 0, expert_tokens_max = 0;
  // The gang's dispatch rounds and expert passes of an MoE layer (0 for a dense layer).
  int dispatch_rounds = 0, expert_passes = 0;
  int quantized_linears = 0;  // solved by this rank
  int fallbacks = 0;
  std::vector<RareExpertInfo> rare;  // this rank's experts
  // Mean over this rank's solved linears with tokens of tr(ΔHΔᵀ)/tr(WHWᵀ), each on at most
  // 128 evenly spaced rows of the weight (gang_runner.h kErrorStatRows).
  double mean_relative_error = 0;
  std::vector<AwqMappingInfo> awq;   // AWQ jobs: the mappings this rank chose scales for
  // torch's caching allocator over the step (CUDA; 0 elsewhere): peak bytes in tensors, peak
  // bytes held from the driver, allocations retried after releasing the allocator's cache.
  int64_t device_peak_allocated_bytes = 0, device_peak_reserved_bytes = 0;
  int64_t device_alloc_retries = 0;
};

struct StepOutput {
  int step = 0;
  int layer = 0;
  std::vector<OutputFileInfo> files;  // this rank's (none when it holds no tensor of the layer)
  StepStats stats;
};

// Output files found corrupt (missing, or size or SHA-256 not what was committed) travel as a
// DATA_LOSS status whose payload lists their names (relative to the output directory); the
// worker's RPC layer reports them as CompleteAssignmentRequest.corrupt_files.
absl::Status CorruptFilesError(const std::string& message, const std::vector<std::string>& files);
// The names a CorruptFilesError carries; empty for any other status.
std::vector<std::string> CorruptFilesOf(const absl::Status& status);

}  // namespace mq::pipeline
