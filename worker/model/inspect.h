// Checkpoint inspection: reads config.json, model.safetensors.index.json and the safetensors
// headers of a DeepseekV3 HF checkpoint (never the tensor data), checks every tensor the model
// needs, and computes the job plan and a resource estimate.
//
// Plain C++ (no proto, no torch) so both the worker's RPC layer and tests can call it.
// Stateless; safe to call from any thread.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mq::model {

// What the user asked for; the plan and estimate depend on it.
struct InspectRequest {
  std::string model_dir;  // directory with config.json, index and shards
  int gang_size = 1;      // number of workers (ranks) the job will use, >= 1
  int bits = 4;
  int group_size = 128;      // 0 = per-channel
  bool all_linear = false;   // false: routed experts only (default target set)
  bool include_mtp = false;  // also plan the MTP layer(s) at index num_hidden_layers
  int64_t num_calibration_samples = 512;
  int64_t max_sequence_length = 4096;
  // Routed experts a rank solves at once (mq-worker --experts-per-pass; 0 = all of its experts;
  // kChooseSetting = the plan chooses it for device_memory_bytes): bounds the Hessians and solve
  // buffers held together, so it enters the GPU estimate.
  int64_t experts_per_pass = 16;
  // Calibration tokens over the gang whose routed rows a layer dispatches at once (mq-worker
  // --dispatch-tokens; 0 = all; kChooseSetting = chosen by the plan): bounds the routed rows
  // held, so it enters the GPU estimate.
  int64_t dispatch_tokens = 65536;
  // Steps per hidden-state checkpoint (mq-worker --checkpoint-every; 0 = chosen by the cost
  // model, plan.h ChooseCheckpointCadence): sets the scratch estimate and the resume cost.
  int64_t checkpoint_every = 0;
  // The next layer's weights may be loaded onto the device while a layer solves (mq-worker
  // --preload-next-layer): the plan turns it on where it fits the device (plan.h).
  bool preload_next_layer = true;
  // Memory of the device each rank computes on, which chosen settings must fit (plan.h
  // ChooseSettings): the planning worker's GPU, or its host memory when it computes on the CPU
  // (device_is_host). 0 = unknown: chosen settings are then kFallbackExpertsPerPass and
  // kFallbackDispatchTokens.
  int64_t device_memory_bytes = 0;
  // The ranks compute on the CPU: their device working set is host memory too (plan.h host(r)).
  bool device_is_host = false;
};

// experts_per_pass / dispatch_tokens value that asks the plan to choose (mq-worker's default,
// "auto" on its command line).
inline constexpr int64_t kChooseSetting = -1;

// One thing wrong with the checkpoint. Inspection collects every problem it finds.
struct Problem {
  std::string where;    // file name or tensor name the problem is about ("config.json", ...)
  std::string message;  // what is wrong and what was expected
};

struct ModelSummary {
  std::string model_type;     // "deepseek_v3"
  std::string architecture;   // "DeepseekV3ForCausalLM"
  std::string weight_format;  // "fp8" (F8_E4M3 + weight_scale_inv) or "bf16"
  int num_hidden_layers = 0;
  int first_k_dense_replace = 0;
  int num_nextn_predict_layers = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t moe_intermediate_size = 0;
  int n_routed_experts = 0;
  int n_shared_experts = 0;
  int num_experts_per_tok = 0;
  int n_group = 0;
  int topk_group = 0;
  int num_attention_heads = 0;
  int64_t q_lora_rank = 0;  // 0 when the config has q_lora_rank null
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;
  int64_t vocab_size = 0;
  int num_shards = 0;
  int64_t num_tensors = 0;
  int64_t num_parameters = 0;    // elements over all tensors (scales included)
  int64_t checkpoint_bytes = 0;  // sum of tensor data bytes over all shards
  // MTP layers (of num_nextn_predict_layers) with any "model.layers.<N>.*" tensor in the index;
  // transformers saves a config that declares MTP without its weights.
  int num_mtp_layers_present = 0;
};

enum class LayerKind { kDense, kMoe, kMtp };

struct LayerPlan {
  int index = 0;
  LayerKind kind = LayerKind::kDense;
  int num_quantized_linears = 0;  // linears the job quantizes in this layer
  int64_t input_bytes = 0;        // checkpoint bytes of this layer's tensors
  int64_t output_bytes = 0;       // bytes this layer will occupy in the output
};

// Routed experts [first_expert, first_expert + num_experts) are owned by `rank`.
struct RankPlan {
  int rank = 0;
  int first_expert = 0;
  int num_experts = 0;
  int64_t num_sequences = 0;  // calibration sequences held by this rank
  int64_t gpu_bytes = 0;      // peak device memory estimate for this rank
  int64_t host_bytes = 0;     // peak host memory estimate for this rank
};

struct ResourceEstimate {
  int64_t gpu_bytes_per_rank = 0;      // max over ranks
  int64_t host_bytes_per_rank = 0;     // max over ranks
  int64_t output_bytes = 0;            // whole output checkpoint
  int64_t scratch_bytes_per_rank = 0;  // hidden-state checkpoints kept per rank
  int64_t calibration_tokens = 0;
  double tokens_per_expert = 0;  // mean routed tokens each expert sees per layer
  int64_t dispatch_rounds = 0;   // of each MoE layer (plan.h; 0 without MoE layers)
  int checkpoint_every = 1;      // steps per hidden-state checkpoint (plan.h)
  double resume_replay_seconds = 0;  // at most, replaying steps after the newest checkpoint
  // The settings the job's ranks run with (0 = all), as the request gave them or as the plan
  // chose them (plan.h ChooseSettings), and the expert passes of the rank with the most experts
  // (0 without MoE layers).
  int64_t experts_per_pass = 0;
  int64_t dispatch_tokens = 0;
  bool experts_per_pass_chosen = false;
  bool dispatch_tokens_chosen = false;
  int64_t expert_passes = 0;
  int64_t device_memory_bytes = 0;  // the request's: what chosen settings were fitted to
  // The ranks load the next layer's weights onto the device while a layer solves (plan.h).
  bool preload_next_layer = false;
  double seconds_per_layer = 0;  // projected quantize time per planned layer (plan.h)
  double total_seconds = 0;      // projected quantize phase
};

struct InspectReport {
  ModelSummary summary;
  std::vector<Problem> problems;  // empty means the checkpoint is usable for the request
  // Where the plan departs from the request without failing it (same shape as a problem):
  // linears the job leaves unquantized because their input width is not a multiple of the
  // group size.
  std::vector<Problem> notes;
  std::vector<LayerPlan> layers;  // empty when problems prevent planning
  std::vector<RankPlan> ranks;
  ResourceEstimate estimate;

  bool ok() const { return problems.empty(); }
};

// Inspects `request.model_dir`. Never throws and never crashes on bad input: every problem,
// including unreadable files and malformed JSON, is reported in `problems`.
//
// Inputs: config.json; model.safetensors.index.json (or, without an index, a single
// model.safetensors); the header of every shard the index names (tensor data is never read).
// The expected inventory is worker/model/plan.h ExpectedInventory for the config; MTP layers
// are checked when the checkpoint has any "model.layers.<N>.*" tensor for them.
//
// Problems, in this order; `where` first, then `message` (stable text, tests match substrings):
//   request.<field>        "<field> = <value>: must be <rule>", e.g. "gang_size = 0: must be >= 1",
//                          "group_size = 96: must be 0 (per-channel), 32, 64 or 128",
//                          "gang_size = 512: must be <= n_routed_experts = 256 (every rank owns
//                          at least one expert)", "experts_per_pass = -2: must be >= 0
//                          (0 = all) or -1 (chosen by the plan)" (dispatch_tokens alike),
//                          "include_mtp is set but config.json
//                          \"num_nextn_predict_layers\" = 0 (no MTP layers)",
//                          "group_size = 128: the routed experts' mlp.experts.*.down_proj has
//                          96 input columns, not a multiple of 128 (...): use group_size 32 or
//                          -1 (per channel)" (plan.h PartialGroupLinears)
//   request.model_dir      "\"<dir>\" does not exist" | "\"<dir>\" is not a directory"
//   config.json            "missing file: config.json is not in the model directory", or one
//                          problem per config issue in config.h's format, e.g.
//                          "\"n_group\" = 3 must divide \"n_routed_experts\" = 64"
//   model.safetensors.index.json
//                          "missing file: neither model.safetensors.index.json nor
//                          model.safetensors is in the model directory", "invalid JSON: ...",
//                          "duplicate key \"k\" in object \"weight_map\"", "\"weight_map\" is
//                          missing (...)", "\"weight_map\".\"<t>\" = 7: must be a shard file
//                          name (string), found integer", "\"weight_map\" maps N tensors to shard
//                          \"../x\": shard names must be plain file names in the model directory"
//   <shard file>           "missing shard: file not found; N tensors mapped to it are unavailable"
//                          "unreadable shard: <safetensors.h error>; N tensors mapped to it are
//                          unavailable" (tensors of such a shard are not reported one by one)
//   <tensor>               "missing tensor: model.safetensors.index.json maps it to <shard>, which
//                          does not contain it"
//   <tensor>               "tensor not in index: present in shard <s> but
//                          model.safetensors.index.json maps it to <other shard>"
//   model.layers.<N>       "missing MTP layer: request.include_mtp is set but the checkpoint has
//                          no \"model.layers.<N>.*\" tensors (config.json
//                          \"num_nextn_predict_layers\" = 1)"
//   <tensor>               inventory, in inventory order (only when config.json has no problems):
//                          "missing tensor: expected shape [a, b]"
//                          "shape [a, b]: expected [c, d]"
//                          "dtype X: expected F16, BF16, F32 or F64" (norms, embeddings, bias;
//                          the router adds " (the router weight must never be FP8)")
//                          "dtype X: expected F8_E4M3 (with weight_scale_inv) or F16, BF16, F32
//                          or F64" (linears)
//   <weight>_scale_inv     "missing tensor: F8_E4M3 weight \"<weight>\" needs an F32
//                          weight_scale_inv of shape [a, b]"
//                          "dtype X: expected F32 for the weight_scale_inv of F8_E4M3 weight
//                          \"<weight>\""
//                          "shape [a, b]: expected [c, d] = ceil([O, I] / 128) for the
//                          weight_scale_inv of F8_E4M3 weight \"<weight>\""
//                          A "missing tensor" whose tensor is in a shard but not in the index
//                          ends with "; present in shard <s> but not listed in
//                          model.safetensors.index.json" (and is not reported again below).
//   <tensor>               "unexpected tensor: weight_scale_inv for \"<weight>\", which is BF16,
//                          not F8_E4M3"
//                          "unexpected tensor: not part of the DeepseekV3 inventory for this
//                          config.json (in shard <s>)"
//   <tensor>               "tensor not in index: present in shard <s> but
//                          model.safetensors.index.json does not list it"
//
// Summary: config values (whatever parsed), shard/tensor/parameter/byte counts over the
// readable shards, weight_format "fp8" when any indexed tensor is F8_E4M3, else "bf16".
// Plan (layers, ranks, estimate; see plan.h PlanJob for the formulas) is filled whenever
// config.json and the request have no problems, even if tensors are missing (missing tensors
// count 0 input bytes); otherwise it is left empty. With the plan come its notes, one per
// non-expert linear kind left unquantized (plan.h PartialGroupLinears): where
// "model.layers.*.<module>", message "left unquantized (BF16, in quantization_config.ignore):
// <W> input columns are not a multiple of group_size <G>".
InspectReport InspectCheckpoint(const InspectRequest& request);

}  // namespace mq::model
