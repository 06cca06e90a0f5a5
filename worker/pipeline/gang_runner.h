// The gang pipeline's per-rank runner (gang_pipeline.h), shared by the files that implement its
// stages: gang_pipeline.cc (load, dispatch, Hessians, solve, propagate, write, resume) and
// gang_awq.cc (AWQ's scale search and folding). Internal to worker/pipeline: include it only
// from those files.
//
// For torch code only (includes ATen; never include together with a .pb.h, DESIGN.md §7).
// Threading: a Runner belongs to the thread that calls Run(); only WriteStep and the prefetch
// run beside it (see their comments).
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <chrono>
#include <future>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "worker/model/checkpoint_reader.h"
#include "worker/model/config.h"
#include "worker/model/deepseek_v3.h"
#include "worker/model/tensor_io.h"
#include "worker/pipeline/gang.h"
#include "worker/pipeline/gang_pipeline.h"
#include "worker/pipeline/host_transfers.h"
#include "worker/pipeline/layer_staging.h"
#include "worker/pipeline/output.h"
#include "worker/pipeline/step_profile.h"
#include "worker/quant/gptq.h"
#include "worker/quant/hessian.h"
#include "worker/quant/layer_tools.h"

namespace mq::pipeline::gang_internal {

using Clock = std::chrono::steady_clock;
using quant::GptqResult;
using quant::HessianAccumulator;
using quant::HessianGroup;

inline double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Waits for the work queued on `device` (a one-element device-to-host copy on the current
// stream), so that stage times are charged to the stage that queued the work.
inline void SyncDevice(const at::Device& device) {
  if (device.is_cuda()) at::zeros({1}, at::TensorOptions().device(device)).cpu();
}

// Rows of a weight its error statistic (StepStats.mean_relative_error) is estimated on
// (HessianErrorTraces): for a DeepSeek-V3 layer's 768 expert linears all rows are ~250 TFLOP of
// float64 products (>= 3.7 s at an H200's fp64 peak), 128 rows ~14 TFLOP.
inline constexpr int64_t kErrorStatRows = 128;

#define MQ_RETURN_IF_ERROR(expr)           \
  do {                                     \
    absl::Status _st = (expr);             \
    if (!_st.ok()) return _st;             \
  } while (0)

// Torch exceptions (bad shapes, out of memory) become statuses at this file's boundary.
template <typename Fn>
auto Guarded(const std::string& what, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const c10::OutOfMemoryError& e) {
    return absl::ResourceExhaustedError(absl::StrCat(
        what, ": out of device memory (lower mq-worker --dispatch-tokens or --experts-per-pass, "
              "or the calibration size): ", e.what_without_backtrace()));
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat(what, ": ", e.what_without_backtrace()));
  } catch (const std::bad_alloc& e) {
    return absl::ResourceExhaustedError(absl::StrCat(what, ": out of host memory"));
  }
}


// Memory: the hidden states of the rank's tokens (a step's input and output, and the residual
// after attention) live in host memory, page-locked when the compute device is a GPU, and go to
// the device one chunk at a time; the device holds only the MoE block's token-sized tensors (u
// and the routed output). At 512 x 4096 calibration tokens one such tensor is ~30 GB.
struct Chunk {
  at::Tensor ids;     // int64 [b, s] on the compute device
  at::Tensor hidden;  // [b, s, H] compute dtype, on the host: this step's input
};

// Per-layer inputs of the MoE block for the rank's tokens.
struct MoeInput {
  std::vector<at::Tensor> residual;  // per chunk, h after attention [b, s, H], on the host
  at::Tensor u;                      // [T, H] normalised, every chunk's tokens concatenated
  at::Tensor topk_indices, topk_weights;  // [T, k] on the host (int64, fp32)
};

// Rows sent to expert owners (origin side) and received from every rank (owner side).
struct Dispatch {
  // On the compute device: the token (row of u) and routing weight of each sent row.
  at::Tensor send_tokens;                   // int64 [S]
  at::Tensor send_weights;                  // fp32 [S]
  std::vector<int64_t> send_expert_counts;  // [E]: sent rows per expert (send order = experts asc)
  std::vector<int64_t> send_counts, recv_counts;  // per rank
  at::Tensor recv_rows;     // [R, H] compute dtype, grouped by source rank
  at::Tensor recv_order;    // int64 [R]: received rows ordered by (expert, source, token)
  std::vector<int64_t> recv_expert_counts;  // [E]
  // On the compute device, for a dispatch of every routed entry of its tokens (not a pass's):
  // the tokens (rows of u) in the order of combine_entries' columns, and [k, T] positions in
  // send order of each token's k rows, by ascending expert. Undefined otherwise.
  at::Tensor combine_tokens;   // int64 [T]
  at::Tensor combine_entries;  // int64 [k, T]
};

// One dispatch round's routed (token, expert) entries on the host, sorted by expert once, so that
// each expert pass sends a slice of them: the entries of expert e are [starts[e], starts[e] +
// counts[e]) of the sorted order, in token order.
struct RoutedEntries {
  at::Tensor experts;  // int64 [n]: the entries' experts, token by token (k per token)
  at::Tensor order;    // int64 [n]: the entry (index into experts) at each sorted position
  at::Tensor tokens;   // int64 [n]: sorted entries' tokens (rows of u)
  at::Tensor weights;  // fp32 [n]: sorted entries' routing weights
  std::vector<int64_t> counts, starts;  // [E]
  at::Tensor source_counts;             // int64 [gang size, E]: every rank's counts
};

// How the MoE block's routed rows are dispatched, the same on every rank (rank 0's settings).
// Dispatch rounds bound the rows held at once: calibration sequence i (global index) belongs to
// round i mod rounds, so each round takes a slice of every rank's tokens, and the rows an
// expert's owner receives in a round (and their order) do not depend on the gang size.
// Expert passes bound the Hessians held at once: a rank's own experts, per_pass at a time; with
// several rounds, each pass dispatches only the rows of the experts in that pass.
struct DispatchPlan {
  int64_t rounds = 1;
  int per_pass = 1;  // own experts per pass
  int passes = 1;    // passes every rank runs (the largest expert range needs this many)
  bool preload = false;  // GangPipelineOptions::preload_next_layer
};

// What is left of a step once its layer has been propagated: its files and hidden-state
// checkpoint to write, then its report. Host memory only, so it can finish on another thread
// while the next step uses the device.
struct StepWrite {
  StepOutput out;
  // Solved tensors of this rank (packed), and the AWQ-folded unquantized tensors it writes.
  std::vector<model::TensorData> tensors;
  std::vector<std::string> plain;          // unquantized tensors of the layer this rank writes
  // The step's output hidden states, per chunk (host tensors, read in place by the write
  // thread); empty when the step writes no checkpoint.
  std::vector<at::Tensor> hidden;
  bool checkpoint = false;  // the step writes a hidden-state checkpoint (the cadence's)
};

class AwqSmoother;

class Runner {
 public:
  Runner(const GangPipelineOptions& o, Gang& gang, model::CheckpointReader& reader,
         model::DeepseekV3Config config, model::GlobalWeights globals)
      : o_(o),
        gang_(gang),
        reader_(reader),
        config_(std::move(config)),
        globals_(std::move(globals)),
        transfers_(o.device, o.overlap_transfers),
        staging_(o.device),
        side_(o.device) {}
  // The prefetch and preload threads read through reader_ (and the preload uses side_); the
  // reader outlives the runner, so it must not keep serving staged copies.
  ~Runner() {
    StopPrefetch();
    if (preload_.valid()) preload_.wait();
    staging_.Unstage(reader_);
  }

  absl::StatusOr<GangPipelineResult> Run();

 private:
  friend class AwqSmoother;  // gang_awq.cc: AWQ's stage uses the dispatch and the gang

  int OwnerOf(int expert) const {
    const int e = config_.n_routed_experts, k = gang_.size();
    for (int r = 0; r < k; ++r) {
      if (expert < static_cast<int64_t>(e) * (r + 1) / k) return r;
    }
    return k - 1;
  }
  int FirstExpert(int rank) const {
    return static_cast<int>(static_cast<int64_t>(config_.n_routed_experts) * rank / gang_.size());
  }
  bool Owns(const std::string& name) const {
    int e = 0;
    return !model::RoutedExpertOf(name, &e) || OwnerOf(e) == gang_.rank();
  }
  // The MLP `mlp`'s linear inputs over `rows` in blocks of at most o_.max_batch_tokens rows, for
  // the hooks only (Hessians; model::RunMlpInputs): bounds the activations held at once.
  void RunRowBlocks(const std::string& prefix, const model::MlpWeights& mlp, const at::Tensor& rows,
                    const model::ForwardHooks& hooks) const;
  // The shapes of chunks_' hidden states ([sequences, tokens, hidden], from their ids), for
  // HostTransfers::AllocateHost.
  std::vector<std::vector<int64_t>> ChunkShapes() const;
  // A CUDA `t` in page-locked host memory without waiting: the copy is queued on the current
  // stream, so the bytes are valid only after the next SyncDevice. Host tensors: `t`,
  // contiguous.
  at::Tensor ToHostQueued(const at::Tensor& t) const;
  // A host `t` on the device without waiting: copied through page-locked memory on the current
  // stream (torch's host allocator keeps that buffer until the copy is done), so the host goes
  // on queuing the next dispatch while the device works. Off CUDA, t.to(device).
  at::Tensor ToDeviceQueued(const at::Tensor& t) const;
  at::Tensor Positions(int64_t seq) const {
    return at::arange(seq, at::TensorOptions().dtype(at::kLong).device(o_.device));
  }
  void Progress(const std::string& stage, double f) const {
    if (o_.on_progress) o_.on_progress(stage, f);
  }
  // The job's GPTQ options with the grid every solve and rounding uses (the format's group
  // size, 4-bit symmetric).
  quant::GptqOptions SolveOptions() const {
    quant::GptqOptions gptq = o_.gptq;
    gptq.grid.group_size = o_.format.group_size;
    gptq.grid.bits = 4;
    gptq.grid.symmetric = true;
    return gptq;
  }
  absl::Status CheckCancelled() const {
    if (o_.cancelled && o_.cancelled()) return absl::CancelledError("assignment cancelled");
    return absl::OkStatus();
  }

  absl::Status Embed();
  absl::Status EnterLayer(int layer);  // MTP input transform when `layer` is an MTP layer
  // This rank's weights of `layer` on the device: with plan_.preload on side_ (every layer's
  // weights then come from the side stream's pool, so the device holds at most two layers' of
  // them), otherwise on the current stream.
  absl::StatusOr<model::LayerWeights> Load(int layer);
  // The weights of `layer` from StartPreload when it preloaded that layer (waiting for it), else
  // Load(layer); *preloaded says which. A preload that failed (device memory) is reported as a
  // warning and the layer is loaded again here.
  absl::StatusOr<model::LayerWeights> TakeLoaded(int layer, bool* preloaded);
  // With plan_.preload: loads `layer` on another thread (Load on side_) while the step goes on.
  // Called when nothing queued on the compute stream uses memory freed since the last device
  // synchronization (side_'s contract).
  void StartPreload(int layer);
  absl::StatusOr<MoeInput> Attention(const model::LayerWeights& w, const model::ForwardHooks& h);
  // The routed entries of the tokens (rows of in.u) listed in `tokens` (int64, ascending, on the
  // host; undefined = all), sorted by expert, and every rank's counts (a gang collective).
  absl::StatusOr<RoutedEntries> SortEntries(const MoeInput& in, const at::Tensor& tokens);
  // Sends the rows of `r`'s entries to their experts' owners, only the experts `in_pass` accepts
  // (null = all).
  absl::StatusOr<Dispatch> DispatchEntries(const MoeInput& in, const RoutedEntries& r,
                                           const std::vector<bool>* in_pass);
  // Sends every routed row of the tokens `tokens` (as SortEntries) to its expert's owner, with
  // what the token-by-token combine needs.
  absl::StatusOr<Dispatch> DispatchRows(const MoeInput& in, const at::Tensor& tokens = {});
  // The first row of in.u of each of this rank's sequences [lo_, hi_), and the rows' end.
  std::vector<int64_t> SequenceRows() const;
  // Rows of in.u (int64, ascending, on the host) per dispatch round of the Hessian passes:
  // sequence i in round i mod rounds, i counted over the gang, so that any gang sums the
  // Hessians in the same pieces.
  std::vector<at::Tensor> RoundTokens() const;
  // The propagation's dispatch rounds (as many): this rank's sequences in `rounds` consecutive
  // runs, each (first row of in.u, rows). A round's output is finished and sent to the host
  // before the next round, so one round's worth of rows is on the device, not all of them.
  std::vector<std::pair<int64_t, int64_t>> RoundRanges() const;
  // Whether routed expert e is solved in pass p by its owner, for every expert.
  std::vector<bool> PassExperts(int p) const;
  // Agrees on the dispatch settings (rank 0's), once per run.
  absl::Status AgreeDispatchPlan();
  // Owner side: every own expert over its received rows; returns outputs in received order
  // (undefined when !want_outputs). Experts [first, last) only (default: all). in_place: the
  // outputs are written over d.recv_rows (returned), for a dispatch whose rows are not used
  // again.
  at::Tensor RunExperts(const model::LayerWeights& w, const Dispatch& d,
                        const model::ForwardHooks& hooks, bool want_outputs, int first = 0,
                        int last = std::numeric_limits<int>::max(), bool in_place = false);
  // Returns the expert outputs to their tokens' ranks and adds them, weighted, to `out` (rows
  // [first_row, first_row + out.size(0)) of in.u, which hold every token of `d`).
  absl::Status CombineInto(const Dispatch& d, const at::Tensor& expert_out, at::Tensor& out,
                           int64_t first_row);
  // The MoE block's output for the rows [first_row, first_row + out.size(0)) of in.u (whole
  // sequences), whose routed part is `out`: plus the shared experts, plus the residual (from
  // the host), into those sequences of `next` (host, by chunk; complete after transfers_.Wait()).
  void FinishRows(const model::LayerWeights& w, const MoeInput& in, const at::Tensor& out,
                  int64_t first_row, const std::vector<at::Tensor>& next,
                  const model::ForwardHooks& hooks);
  // Next hidden states with `overrides` (quantized weights); reuses `cached` when given.
  absl::StatusOr<std::vector<at::Tensor>> Propagate(const model::LayerWeights& w,
                                                    const model::WeightOverrides& overrides,
                                                    const MoeInput* cached_in,
                                                    const Dispatch* cached_d);
  absl::StatusOr<StepWrite> QuantizeStep(int step, int layer);
  // Finishes `profile` of `layer`'s step into o_.profile_prefix's files (a warning when that
  // fails: a profile never fails the job).
  void WriteProfile(StepProfile& profile, int layer) const;
  // With o_.prefetch_next_layer: reads the tensors of `layer` that this rank loads into the page
  // cache on another thread (the previous prefetch is waited for first), or, Staging(), copies
  // them into staging_ (after the staged copies of the layer before were unstaged).
  void StartPrefetch(int layer);
  // Whether the prefetch stages the next layer (GangPipelineOptions::stage_next_layer).
  bool Staging() const;
  void StopPrefetch();
  // The checkpoint's tensor names of `layer` ("model.layers.<layer>."), sorted.
  std::span<const std::string> LayerNames(int layer) const;
  // The mapped checkpoint pages of `layer`'s tensors leave the resident set
  // (CheckpointReader::Release): nothing is lost, a later read maps them again.
  void ReleaseLayerPages(int layer) const;
  // Writes the step's files and checkpoint, then reports it (o_.on_step). Touches no device
  // tensor and no member that a running step changes, so it may run beside the next step.
  absl::Status WriteStep(StepWrite w);
  absl::Status Replay(int step, int layer, const FileSetReader& committed);
  std::string CheckpointPath(int step) const;
  std::vector<at::Tensor> HiddenStates() const;
  // Writes step `step`'s checkpoint (atomically) from the host tensors, without copying them. The
  // older ones stay until the step is reported (RemoveCheckpointsBefore): a resume before that
  // may need them.
  absl::Status SaveCheckpoint(int step, const std::vector<at::Tensor>& hidden);
  // Removes this rank's checkpoints of steps before `step`.
  void RemoveCheckpointsBefore(int step) const;
  // Loads step `step`'s checkpoint into chunks_ (whose ids must have the step's shape): false
  // when this rank has none or it is damaged (on_warning says why).
  absl::StatusOr<bool> LoadCheckpoint(int step);
  // Steps (ascending) of the checkpoints this rank has in the scratch directory for its slice.
  std::vector<int> CheckpointSteps() const;
  // Agrees on the hidden-state checkpoint cadence (rank 0's forced value or the cost model's),
  // once per run.
  absl::Status AgreeCheckpointCadence();
  // Start of a resumed attempt (start_step > 0): the newest checkpoint every rank can use, then
  // the replay of the committed steps after it (or of every committed step, from the
  // embeddings).
  absl::Status Resume(GangPipelineResult* result);
  // AWQ (gang_awq.cc): chooses the scales of layer `w`'s smoothing mappings on a subset of the
  // calibration sequences and folds them into `w` (its tensors replaced). The folded tensors
  // the output keeps unquantized go to `folded` (tensor name -> CPU tensor as stored), the
  // mappings' report to `stats`. `quantized` lists the layer's quantized linears (every
  // rank's). A collective: every rank calls it for the same layer.
  absl::Status SmoothLayer(model::LayerWeights& w, const std::set<std::string>& quantized,
                           std::map<std::string, at::Tensor>* folded, StepStats* stats);
  // Replaces the unquantized tensors of `w` (norms, router, unquantized linears this rank holds)
  // by the committed ones, which AWQ folded: a replay then runs the layer as written.
  absl::Status UseCommittedTensors(model::LayerWeights& w, const FileSetReader& committed);
  absl::StatusOr<std::vector<GptqResult>> Solve(const std::vector<at::Tensor>& ws,
                                                const HessianAccumulator* acc, bool force_rtn,
                                                at::Tensor* h_out);

  const GangPipelineOptions& o_;
  Gang& gang_;
  model::CheckpointReader& reader_;
  model::DeepseekV3Config config_;
  model::GlobalWeights globals_;
  std::vector<Chunk> chunks_;
  int64_t lo_ = 0, hi_ = 0;  // this rank's sequences [lo, hi)
  DispatchPlan plan_;
  bool in_mtp_ = false;
  std::vector<int> layers_;  // the pipeline's layers, by step
  int checkpoint_every_ = 1;  // steps per hidden-state checkpoint (AgreeCheckpointCadence)
  // The hidden states' copies between host and device. Every method that returns or stores
  // host tensors it downloaded waits for them before it returns.
  HostTransfers transfers_;
  StageMarks marks_;  // the running step's stage, for a profile
  std::future<int64_t> prefetch_;  // the bytes it staged
  std::atomic<bool> stop_prefetch_{false};
  LayerStaging staging_;  // the prefetch's copies of the next layer
  SideStream side_;  // the preload's stream
  std::future<absl::StatusOr<model::LayerWeights>> preload_;
  int preload_layer_ = -1;  // the layer preload_ loads
};

}  // namespace mq::pipeline::gang_internal
