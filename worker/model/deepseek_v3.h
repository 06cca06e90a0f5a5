// DeepSeek-V3 forward pass in LibTorch (FORMATS.md §3), layer at a time, with hooks that expose
// every linear layer's input and let callers substitute weights (e.g. dequantized GPTQ results).
//
// Numerics follow transformers' DeepseekV3ForCausalLM (5.x, eager attention) op for op:
// RMSNorm in fp32 then cast then weight multiply; MLA in the naive (non-absorbed) form; RoPE only
// on the rope parts, interleaved pairs; softmax in fp32; router in fp32 (its weight and
// e_score_correction_bias are kept in fp32 whatever the compute dtype); routed expert outputs
// weighted in fp32, cast to the compute dtype and summed in ascending expert order. On the CPU
// the result matches transformers to < 2e-7 relative in fp32 and bit for bit in bf16
// (tests/interop/test_forward.py).
//
// For engine code only: this header includes ATen and must never be included together with a
// .pb.h (DESIGN.md §7). The RPC layer converts to and from plain structs.
//
// Threading: every function is reentrant and keeps no global state. LayerWeights and
// GlobalWeights are immutable after loading; several threads may run the same weights at once
// (hooks are then called concurrently, so they must synchronise themselves). Durability: nothing
// here writes files.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/model/checkpoint_reader.h"
#include "worker/model/config.h"

namespace mq::model {

// ---------------------------------------------------------------------------------------------
// Hooks.

// Called with a linear layer's module name and its input, as a 2-D [tokens, in] tensor in the
// compute dtype on the compute device, just before the product. Names are the checkpoint's
// module names (the weight name without ".weight"), e.g. "model.layers.3.self_attn.q_a_proj",
// "model.layers.3.mlp.experts.17.gate_proj", "model.layers.3.mlp.gate" (the router; its input
// is the compute-dtype tensor, the product itself runs in fp32) and "lm_head". gate_proj and
// up_proj are called separately with the same input. A routed expert is called only with the
// tokens routed to it (ascending token order), and not at all when it received none. The tensor
// is only valid during the call: clone it to keep it.
using LinearInputHook = std::function<void(const std::string& linear, const at::Tensor& input)>;

// Weights used instead of the loaded ones, by module name as above (no ".weight" suffix), shape
// [out, in] equal to the checkpoint's; any float dtype and device (converted on use, so passing
// them already in the compute dtype and device avoids a copy per call).
using WeightOverrides = std::map<std::string, at::Tensor>;

struct ForwardHooks {
  LinearInputHook on_linear_input;                    // empty = no callback
  const WeightOverrides* weight_overrides = nullptr;  // not owned; nullptr = none
};

// ---------------------------------------------------------------------------------------------
// Weights.

struct MlpWeights {      // SiLU-gated MLP: down(silu(gate(x)) * up(x)); undefined tensors = absent
  at::Tensor gate_proj;  // [I, H]
  at::Tensor up_proj;    // [I, H]
  at::Tensor down_proj;  // [H, I]
  bool defined() const { return gate_proj.defined(); }
};

// One decoder layer's weights, owned; dropping the struct releases their memory.
struct LayerWeights {
  DeepseekV3Config config;
  int layer = 0;
  std::string prefix;  // "model.layers.{layer}."
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;  // compute dtype of every tensor but the router's

  at::Tensor input_layernorm;           // [H]
  at::Tensor post_attention_layernorm;  // [H]
  // Attention. q_lora_rank > 0: q_a_proj, q_a_layernorm, q_b_proj; otherwise q_proj.
  at::Tensor q_proj;              // [nh*(dn+dr), H]
  at::Tensor q_a_proj;            // [rq, H]
  at::Tensor q_a_layernorm;       // [rq]
  at::Tensor q_b_proj;            // [nh*(dn+dr), rq]
  at::Tensor kv_a_proj_with_mqa;  // [rkv+dr, H]
  at::Tensor kv_a_layernorm;      // [rkv]
  at::Tensor kv_b_proj;           // [nh*(dn+dv), rkv]
  at::Tensor o_proj;              // [H, nh*dv]

  bool is_moe = false;
  MlpWeights mlp;  // dense layers only
  // MoE layers only.
  at::Tensor gate;                     // router [E, H], always fp32
  at::Tensor e_score_correction_bias;  // [E], always fp32
  std::vector<MlpWeights> experts;     // size E; entries outside the loaded range are undefined
  MlpWeights shared_experts;           // undefined when n_shared_experts == 0
};

// Embedding, final norm and lm_head.
struct GlobalWeights {
  DeepseekV3Config config;
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;
  at::Tensor embed_tokens;  // [V, H]
  at::Tensor norm;          // [H]
  at::Tensor lm_head;       // [V, H] (the embedding when tie_word_embeddings and it is absent)
};

struct LayerLoadOptions {
  // Routed experts [expert_begin, expert_end) are loaded (expert parallelism); -1 = all.
  int expert_begin = 0;
  int expert_end = -1;
};

// Reads tensor `name` and returns it on `device` as `dtype` (a fresh copy, never a view of the
// mapping). F32/BF16/F16 are converted directly; F8_E4M3 weights are dequantized with their
// `_scale_inv` by LoadAsBf16 (worker/model/fp8.h: fp32 math, one rounding to bf16) and then
// converted. A "<module>.weight" that is absent while "<module>.weight_packed" exists is a
// compressed-tensors pack-quantized linear (a W4A16 checkpoint; modules in its `ignore` list keep
// a plain ".weight" and are read as stored): its weight_packed/weight_scale/weight_shape (and
// weight_zero_point when asymmetric) are dequantized on `device` by DequantizePackedInt4
// (packed_int4.h: bf16, bit-exact with compressed-tensors) and converted. NOT_FOUND for a missing
// tensor; INVALID_ARGUMENT naming the tensor for a non-float dtype, a shape different from
// `expected_shape` (when given; weight_shape for a packed linear), inconsistent packed tensors or
// a weight_g_idx (group act-order, not supported).
absl::StatusOr<at::Tensor> LoadTensor(CheckpointReader& reader, const std::string& name,
                                      at::Device device, at::ScalarType dtype,
                                      const std::vector<int64_t>* expected_shape = nullptr);

// Loads decoder layer `layer` (0 <= layer < num_hidden_layers + num_nextn_predict_layers; for an
// MTP layer only its decoder block is loaded) with every shape checked against `config`.
// `dtype` must be kFloat or kBFloat16. Errors: INVALID_ARGUMENT for a bad layer, dtype, expert
// range or config (e.g. fewer than 2 experts per group), UNIMPLEMENTED for a router other than
// sigmoid + noaux_tc, and LoadTensor's errors.
absl::StatusOr<LayerWeights> LoadLayer(CheckpointReader& reader, const DeepseekV3Config& config,
                                       int layer, at::Device device, at::ScalarType dtype,
                                       const LayerLoadOptions& options = {});

// Loads model.embed_tokens, model.norm and lm_head (shape-checked).
absl::StatusOr<GlobalWeights> LoadGlobals(CheckpointReader& reader, const DeepseekV3Config& config,
                                          at::Device device, at::ScalarType dtype);

// ---------------------------------------------------------------------------------------------
// Forward.

// Runs one decoder layer: h + MLA(RMSNorm(h)), then + MLP/MoE(RMSNorm(.)). `hidden` is
// [batch, seq, H] on the weights' device in their dtype; `positions` is int64 [seq] or
// [batch, seq] (any device), the rotary position of each token; attention is causal over the
// sequence (no padding mask). Returns the next hidden state, same shape and dtype.
// Errors: INVALID_ARGUMENT naming the argument for a wrong shape/dtype/device, a weight override
// of this layer that names no linear of it or has the wrong shape, or an expert that is routed to
// but not loaded (FAILED_PRECONDITION); RESOURCE_EXHAUSTED when the device runs out of memory.
absl::StatusOr<at::Tensor> RunLayer(const LayerWeights& weights, const at::Tensor& hidden,
                                    const at::Tensor& positions, const ForwardHooks& hooks = {});

// Embeds int64/int32 token ids [batch, seq] (values in [0, vocab)) -> [batch, seq, H].
absl::StatusOr<at::Tensor> Embed(const GlobalWeights& globals, const at::Tensor& input_ids);

// Final RMSNorm -> [batch, seq, H] (transformers' last hidden state).
absl::StatusOr<at::Tensor> FinalNorm(const GlobalWeights& globals, const at::Tensor& hidden);

// lm_head on an already normalised hidden state -> logits [batch, seq, V] (hook "lm_head").
absl::StatusOr<at::Tensor> LmHead(const GlobalWeights& globals, const at::Tensor& normed,
                                  const ForwardHooks& hooks = {});

struct RunModelOptions {
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;  // kFloat or kBFloat16
  bool keep_hidden_states = true;
  ForwardHooks hooks;
};

struct ModelOutput {
  at::Tensor logits;  // [batch, seq, V], compute dtype, on the compute device
  // transformers' output_hidden_states convention, num_hidden_layers + 1 entries: [0] is the
  // embedding output, [i] the output of decoder layer i-1 for i < L, and [L] the output of the
  // last layer AFTER the final norm (transformers overwrites the last entry with
  // last_hidden_state). Empty unless keep_hidden_states.
  std::vector<at::Tensor> hidden_states;
};

// Whole forward (MTP layers excluded): loads the globals, then each layer in turn, runs it and
// drops it, so at most one layer's weights are resident. Position ids are 0..seq-1 per row.
absl::StatusOr<ModelOutput> RunModel(CheckpointReader& reader, const DeepseekV3Config& config,
                                     const at::Tensor& input_ids,
                                     const RunModelOptions& options = {});

// ---------------------------------------------------------------------------------------------
// Building blocks, exposed for the calibration pipeline and tests. They expect valid inputs
// (RunLayer checks them) and throw c10::Error otherwise.

// transformers' DeepseekV3RMSNorm: w * (x.float() * rsqrt(mean(x²) + eps)).to(x.dtype).
at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps);

// Rotary inverse frequencies [qk_rope_head_dim / 2] (fp32) and the cos/sin multiplier
// ("attention_factor"): default RoPE, or YaRN when config.rope_scaling is set (transformers'
// _compute_yarn_parameters with truncate = true).
struct RopeParameters {
  at::Tensor inv_freq;
  double attention_factor = 1.0;
};
RopeParameters ComputeRopeParameters(const DeepseekV3Config& config);

// Softmax scale: q_head_dim^-0.5, times mscale(factor, mscale_all_dim)² when rope_scaling has a
// non-zero mscale_all_dim (transformers' yarn_apply_mscale).
double SoftmaxScale(const DeepseekV3Config& config);

// Router (noaux_tc): for x [tokens, H], the selected experts [tokens, k] (int64) and their
// weights [tokens, k] (fp32, normalised when norm_topk_prob, times routed_scaling_factor).
struct Routing {
  at::Tensor topk_indices;
  at::Tensor topk_weights;
};
Routing RouteTokens(const LayerWeights& weights, const at::Tensor& x,
                    const ForwardHooks& hooks = {});

// Attention block on the normalised input [batch, seq, H] -> [batch, seq, H] (before the
// residual add).
at::Tensor RunAttention(const LayerWeights& weights, const at::Tensor& x,
                        const at::Tensor& positions, const ForwardHooks& hooks = {});

// SiLU-gated MLP on rows x2d [tokens, H] -> [tokens, H] (hooks named prefix + "gate_proj" etc.,
// e.g. prefix "model.layers.3.mlp.experts.17."): one routed expert, the shared experts or a
// dense MLP, exactly as inside RunMlpBlock.
at::Tensor RunMlpRows(const std::string& prefix, const MlpWeights& mlp, const at::Tensor& x2d,
                      const ForwardHooks& hooks = {});

// RunMlpRows for callers that only collect linear inputs (Hessians): the same hook calls
// (gate_proj's and up_proj's input x2d, down_proj's input silu(gate(x2d)) * up(x2d)), without
// the down_proj product (a third of the MLP's work) and without a result.
void RunMlpInputs(const std::string& prefix, const MlpWeights& mlp, const at::Tensor& x2d,
                  const ForwardHooks& hooks);

// MLP block (dense MLP or MoE) on the normalised input [batch, seq, H] -> [batch, seq, H].
at::Tensor RunMlpBlock(const LayerWeights& weights, const at::Tensor& x,
                       const ForwardHooks& hooks = {});

}  // namespace mq::model
