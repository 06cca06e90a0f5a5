// Quality of a candidate checkpoint (e.g. mq's W4A16 output) against a reference checkpoint (the
// original) of the same DeepSeek-V3 architecture, measured on token sequences by running both
// models layer by layer in one process: the measurement core of a job's evaluation (DESIGN.md
// §9) and of `mq-eval-local`.
//
// Procedure: embed the ids with each model's embedding; for each decoder layer i = 0..L-1 (MTP
// layers excluded) load the reference's layer i, run it on the reference hidden states, drop it;
// load the candidate's layer i, run it on the candidate hidden states, drop it; then
//   relative_error_i = ‖h_cand,i − h_ref,i‖ / ‖h_ref,i‖
// with h_·,i the output of decoder layer i (before the final norm) over every position of every
// sequence (Frobenius norms, float64). Last, each model's final norm and lm_head give its logits,
// and next_token.h's definitions give KL, top-1 agreement and perplexities (positions 0..n-2).
// Each model sees only its own hidden states: errors compound through the layers as in the real
// quantized model. Either checkpoint may be FP8, BF16/F32 or compressed-tensors pack-quantized
// (LoadTensor, deepseek_v3.h).
//
// Memory: both models' globals (embedding, final norm, lm_head), one decoder layer, the two
// models' hidden states [n, seq, H] and one batch of logits per model. Deterministic for given
// inputs, device, dtype and batch size (a different batch size changes float rounding only).
//
// For engine code only (includes ATen; never together with a .pb.h, DESIGN.md §7). Threading:
// one call at a time per reader (the engine may use intra-op threads). Writes no files.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/eval/next_token.h"
#include "worker/model/checkpoint_reader.h"
#include "worker/model/config.h"

namespace mq::eval {

struct CompareOptions {
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;  // compute dtype of both models: kFloat or kBFloat16
  int64_t batch_size = 8;             // sequences per forward call (> 0)
  // Called after each decoder layer with (layers done, layers in all); a non-OK status stops the
  // comparison with that status (e.g. a cancelled job). Empty: no calls.
  std::function<absl::Status(int, int)> on_layer;
};

// OK when the two configs describe the same architecture (every shape- or routing-determining
// field equal); InvalidArgument naming the first differing field and both values otherwise.
absl::Status CheckSameArchitecture(const model::DeepseekV3Config& reference,
                                   const model::DeepseekV3Config& candidate);

// Runs the procedure above on `sequences` (each an integer 1-D tensor of >= 2 ids below the
// vocabulary size, lengths may differ; any device). Sequences are batched by length (stable sort,
// longest first, at most batch_size of one length per forward call), which changes float
// rounding only. InvalidArgument for bad ids, options or differing architectures; the engine's
// load and forward errors (naming the checkpoint: "reference: ..." or "candidate: ..."); the
// status of options.on_layer when it stopped the run.
absl::StatusOr<QualityReport> CompareModels(model::CheckpointReader& reference,
                                            const model::DeepseekV3Config& reference_config,
                                            model::CheckpointReader& candidate,
                                            const model::DeepseekV3Config& candidate_config,
                                            const std::vector<at::Tensor>& sequences,
                                            const CompareOptions& options = {});
// The same on the rows of `input_ids` (integer [n, seq], n >= 1, seq >= 2).
absl::StatusOr<QualityReport> CompareModels(model::CheckpointReader& reference,
                                            const model::DeepseekV3Config& reference_config,
                                            model::CheckpointReader& candidate,
                                            const model::DeepseekV3Config& candidate_config,
                                            const at::Tensor& input_ids,
                                            const CompareOptions& options = {});

// CompareModels on two checkpoint directories (config.json + safetensors).
absl::StatusOr<QualityReport> CompareCheckpoints(const std::string& reference_dir,
                                                 const std::string& candidate_dir,
                                                 const std::vector<at::Tensor>& sequences,
                                                 const CompareOptions& options = {});
absl::StatusOr<QualityReport> CompareCheckpoints(const std::string& reference_dir,
                                                 const std::string& candidate_dir,
                                                 const at::Tensor& input_ids,
                                                 const CompareOptions& options = {});

// The report as JSON: {"sequences", "sequence_length", "positions", "kl": {"mean", "p99",
// "max"}, "top1_agreement", "nll": {"reference", "candidate"}, "perplexity": {"reference",
// "candidate"}, "layers": [{"layer", "relative_error"}, ...]}; doubles at full precision.
nlohmann::json QualityReportJson(const QualityReport& report);

}  // namespace mq::eval
