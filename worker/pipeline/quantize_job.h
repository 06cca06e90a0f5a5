// The worker's entry points into the quantize pipeline, in plain types so that the RPC layer
// (which includes protobuf headers) never includes torch (DESIGN.md §7).
//
// Threading: one assignment at a time per process; callbacks run on the calling thread.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/data/calibration.h"
#include "worker/pipeline/types.h"

namespace mq::pipeline {

// A job's spec as the pipeline needs it (the RPC layer fills it from mq.v1.JobSpec; defaults
// are already applied by the coordinator).
struct QuantizeJobSpec {
  std::string job_id;  // the output directory is claimed for this job (output.h, ownership)
  std::string model_dir;
  std::string output_dir;
  std::string method = "gptq";  // "gptq", "rtn", "awq" or "awq-gptq"
  int group_size = 128;         // 32, 64, 128, or -1 = per output channel
  bool symmetric = true;
  bool act_order = true;
  bool tf32_update = false;             // GangPipelineOptions::gptq_batch.tf32_update
  std::string scale_search = "minmax";  // or "mse"
  double damping = 0.01;
  std::string targets = "routed_experts";  // or "all_linear"
  std::vector<std::string> ignore;
  bool include_mtp = false;
  // Calibration.
  std::string dataset;
  std::string tokenizer;  // empty: the model directory's tokenizer.json or tiktoken.model
  int64_t num_samples = 512;
  int64_t max_sequence_length = 4096;
  uint64_t seed = 0;
  int64_t min_expert_tokens = 16;
  bool rare_expert_rtn = false;
  // AWQ (methods awq and awq-gptq): grid points (0 = only s = 1) and cached tokens per layer.
  int awq_grid = 20;
  int64_t awq_max_tokens = 32768;
  // Evaluation (evaluate_job.h): sequences (0 = none), their dataset (empty: held-out sequences
  // of the calibration dataset), tokens per sequence, the gate, and for an evaluation job the
  // candidate checkpoint (empty: the job's output).
  int64_t eval_samples = 0;
  std::string eval_dataset;
  int64_t eval_max_sequence_length = 0;
  std::optional<double> max_kl;
  std::optional<double> max_ppl_ratio;
  std::string candidate_dir;
};

// Problems with a job's inputs that the checkpoint inspection does not see: the calibration
// dataset (and tokenizer), the output location (new, empty, or already spec.job_id's),
// unsupported settings. Each is (where, what). Writes nothing but a missing output directory.
std::vector<std::pair<std::string, std::string>> CheckQuantizeInputs(const QuantizeJobSpec& spec);

// The calibration dataset's selection for `spec` (its dataset, tokenizer, samples, length limit,
// seed and length filter). The tokenizer is spec.tokenizer or the model directory's.
absl::StatusOr<data::CalibrationSpec> JobCalibrationSpec(const QuantizeJobSpec& spec);

// Samples spec.dataset holds (data::CountCalibrationSamples: lines or rows, not tokenized).
absl::StatusOr<int64_t> DatasetSamples(const QuantizeJobSpec& spec);

// Claims spec.output_dir for spec.job_id (the owner marker; idempotent for the same job).
// FailedPrecondition naming the owning job or the entries found when it belongs to someone else.
absl::Status ClaimOutput(const QuantizeJobSpec& spec);

struct QuantizeAssignmentInput {
  QuantizeJobSpec spec;
  int rank = 0;
  int world_size = 1;
  std::string rendezvous;              // HOST:PORT served by rank 0
  std::string gang_key;                // unique per attempt, e.g. "<job>/<attempt>"
  std::string rendezvous_secret;       // the attempt's (GangOptions::secret); never logged
  std::string local_host = "127.0.0.1";  // this worker's gang address host
  int start_step = 0;
  int total_steps = 0;
  std::vector<OutputFileInfo> committed_files;
  std::string scratch_dir;  // this job's scratch folder on this worker
  std::string device = "cpu";  // "cpu" or "cuda:N"
  int64_t join_timeout_ms = 120000;  // gang rendezvous
  int64_t experts_per_pass = 16;     // routed experts whose Hessians are held at once (0 = all)
  int64_t dispatch_tokens = 65536;   // gang-wide tokens an MoE block dispatches at once (0 = all)
  int64_t checkpoint_every = 0;  // GangPipelineOptions::checkpoint_every (0 = the cost model's)
  int cpu_threads = 0;  // intra-op threads for host tensor work (0: 4 on CUDA, all cores on CPU)
  bool overlap_writes = true;  // GangPipelineOptions::overlap_writes
  bool prefetch_next_layer = true;  // GangPipelineOptions::prefetch_next_layer
  bool stage_next_layer = true;     // false: GangPipelineOptions::Staging::kOff (true: kAuto)
  bool overlap_transfers = true;    // GangPipelineOptions::overlap_transfers
  bool preload_next_layer = false;  // GangPipelineOptions::preload_next_layer
  // GangPipelineOptions::profile_layers, written as <profile_dir>/mq-profile-<job>-layer<L>-...
  std::vector<int> profile_layers;
  std::string profile_dir;
  std::function<absl::Status(const StepOutput&)> on_step;
  std::function<void(const std::string&, double)> on_progress;
  std::function<void(const std::string&)> on_warning;  // GangPipelineOptions::on_warning
  std::function<bool()> cancelled;
};

struct QuantizeAssignmentResult {
  int steps_run = 0;
  int steps_replayed = 0;
  int resumed_from_step = -1;  // GangPipelineResult::resumed_from_step
  int checkpoint_every = 1;    // GangPipelineResult::checkpoint_every
};

// Claims the output directory (ClaimOutput), loads the calibration set and runs this rank's part
// of the pipeline. UNAVAILABLE means the gang broke (infrastructure); DATA_LOSS means committed
// files are damaged (CorruptFilesOf names them); other errors are the job's.
absl::StatusOr<QuantizeAssignmentResult> RunQuantizeAssignment(const QuantizeAssignmentInput& in);

struct FinalizeAssignmentResult {
  std::string manifest_sha256;
  int files = 0;
  int64_t total_bytes = 0;
  int removed_files = 0;
  VerifyCounts verified;
};

// Removes the hidden-state checkpoints of every job but `keep_job` from `scratch_dir` (job folders
// the pipeline created: hidden-step*.safetensors files, then the empty folder). Best effort.
void RemoveScratchExcept(const std::string& scratch_dir, const std::string& keep_job);

// Finalizes the output (output.h FinalizeOutputDir): claims and locks the directory, verifies
// every committed file, writes the remaining files, calls `publish` (may be empty) before the
// manifest, and writes the manifest only when it returned OK. UNAVAILABLE when another
// finalization holds the directory; DATA_LOSS naming the damaged committed files
// (CorruptFilesOf); `publish`'s status when it refused.
absl::StatusOr<FinalizeAssignmentResult> RunFinalizeAssignment(
    const QuantizeJobSpec& spec, const std::vector<OutputFileInfo>& committed_files,
    int total_steps, std::function<absl::Status()> publish = {});

}  // namespace mq::pipeline
