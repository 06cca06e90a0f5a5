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
  std::string model_dir;              // directory with config.json, index and shards
  int gang_size = 1;                  // number of workers (ranks) the job will use, >= 1
  int bits = 4;
  int group_size = 128;               // 0 = per-channel
  bool all_linear = false;            // false: routed experts only (default target set)
  bool include_mtp = false;           // also plan the MTP layer(s) at index num_hidden_layers
  int64_t num_calibration_samples = 512;
  int64_t max_sequence_length = 4096;
};

// One thing wrong with the checkpoint. Inspection collects every problem it finds.
struct Problem {
  std::string where;    // file name or tensor name the problem is about ("config.json", ...)
  std::string message;  // what is wrong and what was expected
};

struct ModelSummary {
  std::string model_type;            // "deepseek_v3"
  std::string architecture;          // "DeepseekV3ForCausalLM"
  std::string weight_format;         // "fp8" (F8_E4M3 + weight_scale_inv) or "bf16"
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
  int64_t q_lora_rank = 0;           // 0 when the config has q_lora_rank null
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;
  int64_t vocab_size = 0;
  int num_shards = 0;
  int64_t num_tensors = 0;
  int64_t num_parameters = 0;        // elements over all tensors (scales included)
  int64_t checkpoint_bytes = 0;      // sum of tensor data bytes over all shards
};

enum class LayerKind { kDense, kMoe, kMtp };

struct LayerPlan {
  int index = 0;
  LayerKind kind = LayerKind::kDense;
  int num_quantized_linears = 0;     // linears the job quantizes in this layer
  int64_t input_bytes = 0;           // checkpoint bytes of this layer's tensors
  int64_t output_bytes = 0;          // bytes this layer will occupy in the output
};

// Routed experts [first_expert, first_expert + num_experts) are owned by `rank`.
struct RankPlan {
  int rank = 0;
  int first_expert = 0;
  int num_experts = 0;
  int64_t num_sequences = 0;         // calibration sequences held by this rank
  int64_t gpu_bytes = 0;             // peak device memory estimate for this rank
  int64_t host_bytes = 0;            // peak host memory estimate for this rank
};

struct ResourceEstimate {
  int64_t gpu_bytes_per_rank = 0;    // max over ranks
  int64_t host_bytes_per_rank = 0;   // max over ranks
  int64_t output_bytes = 0;          // whole output checkpoint
  int64_t scratch_bytes_per_rank = 0;  // hidden-state checkpoints kept per rank
  int64_t calibration_tokens = 0;
  double tokens_per_expert = 0;      // mean routed tokens each expert sees per layer
};

struct InspectReport {
  ModelSummary summary;
  std::vector<Problem> problems;     // empty means the checkpoint is usable for the request
  std::vector<LayerPlan> layers;     // empty when problems prevent planning
  std::vector<RankPlan> ranks;
  ResourceEstimate estimate;

  bool ok() const { return problems.empty(); }
};

// Inspects `request.model_dir`. Never throws and never crashes on bad input: every problem,
// including unreadable files and malformed JSON, is reported in `problems`.
InspectReport InspectCheckpoint(const InspectRequest& request);

}  // namespace mq::model
