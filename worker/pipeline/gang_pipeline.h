// The quantize job's layer pipeline, run by every rank of a gang (DESIGN.md §3).
//
// Each rank holds a contiguous slice of the calibration sequences and a contiguous range of
// every MoE layer's routed experts. For each pipeline step (decoder layers in order, then MTP
// layers when they are quantized), every rank:
//   1. loads the layer (its own experts only) and runs its sequences through attention;
//   2. routes its tokens and sends each (token, expert) row to the expert's owner (all-to-all),
//      all at once or in rounds of at most max_dispatch_tokens tokens over the gang (then again
//      for each pass of experts, each round carrying only that pass's experts' rows);
//   3. accumulates Hessians: owners from the rows they received (in global token order, so a
//      routed expert's Hessian does not depend on the gang size), every rank for the replicated
//      linears (attention, dense MLP, shared experts) from its own tokens, then all-reduced;
//      experts that saw fewer than `min_expert_tokens` rows gang-wide are topped up with the
//      owner's own tokens (outputs not propagated) or quantized with RTN;
//   4. solves: owners their experts, replicated linears round-robin over ranks (each result is
//      broadcast so every rank propagates with the same weights); an RTN job skips step 3 (no
//      Hessians: its layer stats report 0 Hessian seconds and no output error) and rounds each
//      weight here (its "solve" seconds);
//   5. propagates: the layer again with the quantized weights (expert rows dispatched and their
//      outputs returned and combined), giving the next step's input;
//   6. writes its tensors (rank 0 also the layer's unquantized non-expert tensors) to one file,
//      every `checkpoint_every` steps checkpoints its hidden states in the scratch directory
//      (worker/model/plan.h ChooseCheckpointCadence: the cadence, its cost model and the resume
//      cost), and reports the step; by default on a second thread while the next step runs
//      (overlap_writes).
// A resumed attempt starts at `start_step`: from the newest hidden-state checkpoint of a step
// before it that every rank has and can use for its slice (found with one all-reduce over the
// steps, then one per checkpoint tried), replaying the committed steps after that one with the
// committed (dequantized) weights; without such a checkpoint, by replaying every committed step
// from the embeddings. A checkpoint of an MTP step holds the MTP layer's input form (one token
// fewer per sequence): loading it restores that form, and replaying into the first MTP step
// applies the MTP transform as the uninterrupted run did. Nothing committed is re-quantized.
//
// For torch code only (includes ATen; never include together with a .pb.h, DESIGN.md §7).
// Threading: one call per process at a time; on_progress and cancelled run on the calling
// thread, on_step on the writing thread with overlap_writes (on the calling thread otherwise).
// Durability: files and checkpoints are written atomically (temp + fsync + rename) before a
// step is reported.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/model/plan.h"
#include "worker/pipeline/gang.h"
#include "worker/pipeline/output.h"
#include "worker/pipeline/types.h"
#include "worker/quant/awq.h"
#include "worker/quant/compressed_tensors.h"
#include "worker/quant/gptq.h"
#include "worker/quant/gptq_batched.h"
#include "worker/quant/local_pipeline.h"

namespace mq::pipeline {

struct GangPipelineOptions {
  std::string model_dir;
  std::string output_dir;
  std::string scratch_dir;  // this job's hidden-state checkpoints (created if missing)
  GangOptions gang;
  int start_step = 0;
  int total_steps = 0;  // must equal PipelineLayers(...).size()
  std::vector<OutputFileInfo> committed_files;  // of steps [0, start_step)
  std::vector<std::vector<int32_t>> samples;    // the whole calibration set, same on every rank
  quant::QuantMethod method = quant::QuantMethod::kGptq;
  quant::CompressedTensorsOptions format;
  quant::GptqOptions gptq;
  // How CUDA devices run the batched expert solves (the job's tf32_update; the rest defaults).
  quant::GptqBatchOptions gptq_batch;
  quant::AwqOptions awq;  // methods kAwq and kAwqGptq
  // Tests of AWQ's folding: scales chosen and folded as usual, then nothing quantized; the
  // step files hold every tensor of the layer folded, in bf16 (not a servable output: the
  // finalization would still describe quantized linears).
  bool awq_fold_only = false;
  int64_t min_expert_tokens = 16;  // <= 0: no rare-expert treatment
  bool rare_expert_rtn = false;
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;  // compute dtype: kFloat or kBFloat16
  // Tokens per forward call (sequences of equal length batch; a longer sequence is one call). It
  // bounds the device's per-chunk temporaries (the attention's projections: ~390 KB per token for
  // DeepSeek-V3, i.e. ~6 GB at this default).
  int64_t max_batch_tokens = model::kForwardBatchTokens;
  // Own experts whose Hessians are held (and solved in one batch) at once; 0 = all of them.
  int64_t max_experts_per_pass = 0;
  // Calibration tokens, over the whole gang, whose routed rows an MoE block dispatches at once
  // (0 = all): the layer's tokens go in ceil(tokens / this) rounds, sequence i in round
  // i mod rounds, bounding the rows each rank holds (sent, received and expert outputs). The
  // result does not depend on the gang size for a given value. Rank 0's value, and its
  // max_experts_per_pass, apply to the whole gang.
  int64_t max_dispatch_tokens = 0;
  // Step s's files, checkpoint and report on another thread while step s + 1 runs (at most one
  // step in flight, reports in step order); false: each step is written and reported before the
  // next one starts. The outputs are the same either way.
  bool overlap_writes = true;
  // On a CUDA device, the hidden states' host<->device copies run on a copy stream beside the
  // compute stream (host_transfers.h): the next chunk's upload and the last chunk's download
  // overlap the current chunk's kernels. false: every copy waits. The outputs are the same
  // either way.
  bool overlap_transfers = true;
  // Kernel-level profiles (step_profile.h) of the steps of these layers, written to
  // profile_prefix + "-layer<L>-rank<R>.json" (Chrome trace) and ".txt" (summary); a name that
  // exists already gets a "-2", "-3", ... before its extension instead. Empty: none.
  std::set<int> profile_layers;
  std::string profile_prefix;
  // While a step computes, a second thread reads the next step's tensors that this rank loads
  // into the page cache (a hint: nothing changes but where the load's bytes come from).
  bool prefetch_next_layer = true;
  // With prefetch_next_layer and without the preload, the prefetch copies those tensors into
  // host memory (page-locked on a GPU; layer_staging.h) and the next step's load reads the
  // copies: its host copy leaves the critical path. kAuto: on a CUDA device only (on the CPU it
  // is one more copy). The outputs are the same either way.
  enum class Staging { kAuto, kOn, kOff };
  Staging stage_next_layer = Staging::kAuto;
  // While a step solves, another thread loads the next step's weights onto the device (a second
  // CUDA stream on a GPU), so the next step starts without its load. The job's plan turns it on
  // where the device has room for two layers' weights (plan.h); rank 0's value applies to the
  // whole gang. The outputs are the same either way.
  bool preload_next_layer = false;
  // Steps per hidden-state checkpoint: 0 = the cost model's choice (plan.h
  // ChooseCheckpointCadence, from the gang's largest rank's tokens and experts); n > 0 = every
  // n steps (n >= total_steps: none). Rank 0's value applies to the whole gang.
  int64_t checkpoint_every = 0;
  // Called after a step's files and checkpoint are durable; must return once the coordinator
  // accepted the report (an error stops the pipeline and is returned). With overlap_writes it
  // runs on the writing thread, beside the next step's on_progress calls.
  std::function<absl::Status(const StepOutput&)> on_step;
  std::function<void(const std::string& stage, double fraction)> on_progress;
  // Something went wrong that the pipeline worked around (e.g. a damaged hidden-state checkpoint
  // was not used); for the worker's log and the job's progress. Runs on the calling thread.
  std::function<void(const std::string& message)> on_warning;
  std::function<bool()> cancelled;
};

struct GangPipelineResult {
  int steps_run = 0;
  int steps_replayed = 0;
  // A resumed attempt: the step whose hidden-state checkpoint it started from (-1: replayed
  // from the embeddings, or not resumed).
  int resumed_from_step = -1;
  int checkpoint_every = 1;  // the cadence the gang used
};

// The checkpoint layers the pipeline processes, in order: decoder layers 0..L−1, then the MTP
// layers when format.mtp is kQuantize (matching the plan's layers).
std::vector<int> PipelineLayers(const model::DeepseekV3Config& config,
                                const quant::CompressedTensorsOptions& format);

// Runs steps [start_step, total_steps). Errors: INVALID_ARGUMENT for bad options, UNAVAILABLE
// when the gang broke (a peer vanished: retry with another attempt), CANCELLED when
// `cancelled` returned true, and the engine's, reader's and writer's errors.
absl::StatusOr<GangPipelineResult> RunGangPipeline(const GangPipelineOptions& options);

}  // namespace mq::pipeline
