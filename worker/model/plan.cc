#include "worker/model/plan.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace mq::model {
namespace {

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

// Saturating arithmetic on non-negative values.
int64_t SatAdd(int64_t a, int64_t b) { return a > kInt64Max - b ? kInt64Max : a + b; }
int64_t SatMul(int64_t a, int64_t b) {
  if (a == 0 || b == 0) return 0;
  return a > kInt64Max / b ? kInt64Max : a * b;
}
int64_t SatMul(std::initializer_list<int64_t> factors) {
  int64_t product = 1;
  for (int64_t f : factors) product = SatMul(product, f);
  return product;
}
int64_t SatAdd(std::initializer_list<int64_t> terms) {
  int64_t sum = 0;
  for (int64_t t : terms) sum = SatAdd(sum, t);
  return sum;
}
int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::string Gib(int64_t bytes) {
  return absl::StrFormat("%.2f GiB", static_cast<double>(bytes) / (int64_t{1} << 30));
}

int64_t Elements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n = SatMul(n, d);
  return n;
}

class InventoryBuilder {
 public:
  explicit InventoryBuilder(std::vector<ExpectedTensor>* out) : out_(out) {}

  void Add(std::string name, std::vector<int64_t> shape, TensorRole role, int layer,
           bool routed_expert = false, bool quantized_with_all_linear = false,
           std::string input_id = "") {
    out_->push_back(ExpectedTensor{std::move(name), std::move(shape), role, layer, routed_expert,
                                   quantized_with_all_linear, std::move(input_id)});
  }
  // A linear quantized with all_linear (attention, dense MLP, shared experts).
  void Linear(std::string name, int64_t out, int64_t in, int layer, std::string input_id) {
    Add(std::move(name), {out, in}, TensorRole::kLinear, layer, false, true, std::move(input_id));
  }

 private:
  std::vector<ExpectedTensor>* out_;
};

void AddLayer(const DeepseekV3Config& c, int layer, InventoryBuilder& b) {
  const std::string p = absl::StrCat("model.layers.", layer, ".");
  const std::string id = absl::StrCat(layer, ".");
  const int64_t h = c.hidden_size;
  const int64_t heads = c.num_attention_heads;
  b.Add(p + "input_layernorm.weight", {h}, TensorRole::kNorm, layer);
  if (c.q_lora_rank > 0) {
    b.Linear(p + "self_attn.q_a_proj.weight", c.q_lora_rank, h, layer, id + "attn");
    b.Add(p + "self_attn.q_a_layernorm.weight", {c.q_lora_rank}, TensorRole::kNorm, layer);
    b.Linear(p + "self_attn.q_b_proj.weight", heads * c.q_head_dim(), c.q_lora_rank, layer,
             id + "q_b");
  } else {
    b.Linear(p + "self_attn.q_proj.weight", heads * c.q_head_dim(), h, layer, id + "attn");
  }
  b.Linear(p + "self_attn.kv_a_proj_with_mqa.weight", c.kv_lora_rank + c.qk_rope_head_dim, h, layer,
           id + "attn");
  b.Add(p + "self_attn.kv_a_layernorm.weight", {c.kv_lora_rank}, TensorRole::kNorm, layer);
  b.Linear(p + "self_attn.kv_b_proj.weight", heads * (c.qk_nope_head_dim + c.v_head_dim),
           c.kv_lora_rank, layer, id + "kv_b");
  b.Linear(p + "self_attn.o_proj.weight", h, heads * c.v_head_dim, layer, id + "o");
  b.Add(p + "post_attention_layernorm.weight", {h}, TensorRole::kNorm, layer);

  if (!c.IsMoeLayer(layer)) {
    const int64_t inter = c.intermediate_size;
    b.Linear(p + "mlp.gate_proj.weight", inter, h, layer, id + "mlp");
    b.Linear(p + "mlp.up_proj.weight", inter, h, layer, id + "mlp");
    b.Linear(p + "mlp.down_proj.weight", h, inter, layer, id + "mlp.down");
    return;
  }
  const int64_t experts = c.n_routed_experts;
  const int64_t moe = c.moe_intermediate_size;
  b.Add(p + "mlp.gate.weight", {experts, h}, TensorRole::kRouter, layer);
  if (c.topk_method == "noaux_tc") {
    b.Add(p + "mlp.gate.e_score_correction_bias", {experts}, TensorRole::kRouterBias, layer);
  }
  for (int e = 0; e < experts; ++e) {
    const std::string ep = absl::StrCat(p, "mlp.experts.", e, ".");
    const std::string eid = absl::StrCat(id, "expert.", e);
    b.Add(ep + "gate_proj.weight", {moe, h}, TensorRole::kLinear, layer, true, false, eid);
    b.Add(ep + "up_proj.weight", {moe, h}, TensorRole::kLinear, layer, true, false, eid);
    b.Add(ep + "down_proj.weight", {h, moe}, TensorRole::kLinear, layer, true, false,
          eid + ".down");
  }
  if (c.n_shared_experts > 0) {
    const int64_t width = moe * c.n_shared_experts;
    b.Linear(p + "mlp.shared_experts.gate_proj.weight", width, h, layer, id + "mlp");
    b.Linear(p + "mlp.shared_experts.up_proj.weight", width, h, layer, id + "mlp");
    b.Linear(p + "mlp.shared_experts.down_proj.weight", h, width, layer, id + "shared.down");
  }
}

void AddMtpExtras(const DeepseekV3Config& c, int layer, InventoryBuilder& b) {
  const std::string p = absl::StrCat("model.layers.", layer, ".");
  const int64_t h = c.hidden_size;
  b.Add(p + "embed_tokens.weight", {c.vocab_size, h}, TensorRole::kEmbedding, layer);
  b.Add(p + "enorm.weight", {h}, TensorRole::kNorm, layer);
  b.Add(p + "hnorm.weight", {h}, TensorRole::kNorm, layer);
  // A linear (FP8 allowed on input) that the job keeps in BF16 (FORMATS.md §4.9).
  b.Add(p + "eh_proj.weight", {h, 2 * h}, TensorRole::kLinear, layer, false, false,
        absl::StrCat(layer, ".eh"));
  b.Add(p + "shared_head.norm.weight", {h}, TensorRole::kNorm, layer);
  b.Add(p + "shared_head.head.weight", {c.vocab_size, h}, TensorRole::kEmbedding, layer);
}

// "model.layers.3.self_attn.kv_b_proj.weight" -> "self_attn.kv_b_proj";
// "model.layers.3.mlp.experts.7.down_proj.weight" -> "mlp.experts.*.down_proj".
std::string ModuleKind(std::string_view name) {
  constexpr std::string_view kLayers = "model.layers.";
  constexpr std::string_view kWeight = ".weight";
  constexpr std::string_view kExperts = "mlp.experts.";
  if (name.substr(0, kLayers.size()) == kLayers) {
    name.remove_prefix(kLayers.size());
    name.remove_prefix(std::min(name.size(), name.find('.') + 1));
  }
  if (name.size() >= kWeight.size() && name.substr(name.size() - kWeight.size()) == kWeight) {
    name.remove_suffix(kWeight.size());
  }
  if (name.substr(0, kExperts.size()) == kExperts) {
    const size_t dot = name.find('.', kExperts.size());
    if (dot != std::string_view::npos) {
      return std::string(kExperts) + "*" + std::string(name.substr(dot));
    }
  }
  return std::string(name);
}

// Quantized by a job: `partial` holds the ModuleKind of the non-expert linears left in BF16.
bool IsQuantized(const ExpectedTensor& t, bool all_linear, const std::set<std::string>& partial) {
  if (t.role != TensorRole::kLinear) return false;
  if (t.routed_expert) return true;
  return all_linear && t.quantized_with_all_linear && partial.count(ModuleKind(t.name)) == 0;
}

// The tensors a quantized linear `t` is written as: weight_packed (I32), weight_scale (BF16)
// and weight_shape (I64 [2]), in bytes.
struct PackedLinearBytes {
  int64_t packed = 0, scale = 0, shape = 16;
};
PackedLinearBytes PackedBytes(const ExpectedTensor& t, const InspectRequest& request) {
  const int64_t out = t.shape[0];
  const int64_t in = t.shape[1];
  const int64_t groups = request.group_size > 0 ? CeilDiv(in, request.group_size) : 1;
  return {SatMul({out, CeilDiv(in, 8), 4}), SatMul({out, groups, 2})};
}

// Output bytes of one expected tensor (see plan.h).
int64_t OutputBytes(const ExpectedTensor& t, const InspectRequest& request,
                    const StoredTensors& stored, const std::set<std::string>& partial) {
  if (IsQuantized(t, request.all_linear, partial)) {
    const PackedLinearBytes b = PackedBytes(t, request);
    return SatAdd({b.packed, b.scale, b.shape});
  }
  int64_t bytes_per_element_x8 = 16;  // BF16
  auto it = stored.find(t.name);
  if (it != stored.end() && DTypeBits(it->second.dtype) >= 16) {
    bytes_per_element_x8 = DTypeBits(it->second.dtype);
  }
  return SatMul(Elements(t.shape), bytes_per_element_x8 / 8);
}

// Smallest power of two >= n (n >= 1).
int64_t PowerOfTwoAtLeast(int64_t n) {
  int64_t p = 1;
  while (p < n && p < (int64_t{1} << 62)) p <<= 1;
  return p;
}

// Host bytes a worker holds for `t` until its layer file is written: OutputBytes, except that on
// a GPU the packed weight and the scales of a quantized linear are page-locked copies, whose
// allocator rounds each up to a power of two.
int64_t HeldOutputBytes(const ExpectedTensor& t, const InspectRequest& request,
                        const StoredTensors& stored, const std::set<std::string>& partial) {
  if (request.device_is_host || !IsQuantized(t, request.all_linear, partial)) {
    return OutputBytes(t, request, stored, partial);
  }
  const PackedLinearBytes b = PackedBytes(t, request);
  return SatAdd({PowerOfTwoAtLeast(b.packed), PowerOfTwoAtLeast(b.scale), b.shape});
}

// Host bytes of one copy of a rank's hidden states: its sequences of `seq` tokens in forward
// calls of max(1, kForwardBatchTokens / seq) sequences (gang_runner.h Chunk), each call's tensor
// [sequences, seq, hidden] bf16; on a GPU page-locked, in PlanPinnedSlabs' slabs.
int64_t HiddenCopyBytes(int64_t sequences, int64_t seq, int64_t hidden, bool pinned) {
  const int64_t exact = SatMul({sequences, seq, hidden, 2});
  if (!pinned || sequences <= 0 || seq <= 0) return exact;
  const int64_t per_call = std::max<int64_t>(1, kForwardBatchTokens / seq);
  std::vector<int64_t> calls(static_cast<size_t>(sequences / per_call),
                             SatMul({per_call, seq, hidden, 2}));
  if (sequences % per_call > 0) calls.push_back(SatMul({sequences % per_call, seq, hidden, 2}));
  return PinnedSlabsBytes(calls);
}

// Splits `total` into `parts` contiguous ranges; the first total % parts get one more.
int64_t ShareOf(int64_t total, int parts, int index) {
  return total / parts + (index < total % parts ? 1 : 0);
}

// The hidden-state checkpoint cadence of `plan` (its ranks and layers set) and what it needs:
// est's scratch_bytes_per_rank, checkpoint_every and resume_replay_seconds (plan.h).
CheckpointCadence PlanCheckpoints(const DeepseekV3Config& config, const InspectRequest& request,
                                  const JobPlan& plan, bool any_moe, ResourceEstimate* est) {
  int64_t tokens = 0, experts = 0;
  for (const RankPlan& rp : plan.ranks) {
    tokens = std::max(tokens, SatMul(rp.num_sequences, request.max_sequence_length));
    experts = std::max<int64_t>(experts, any_moe ? rp.num_experts : 0);
  }
  const CheckpointCadence c =
      ChooseCheckpointCadence(tokens, config.hidden_size, experts,
                              static_cast<int>(plan.layers.size()), request.checkpoint_every);
  est->scratch_bytes_per_rank = SatMul(c.bytes, std::min(2, c.checkpoints));
  est->checkpoint_every = c.every;
  est->resume_replay_seconds = c.resume_seconds;
  return c;
}

}  // namespace

std::string ScaleInvName(std::string_view weight_name) {
  return absl::StrCat(std::string(weight_name), "_scale_inv");
}

std::vector<int64_t> ScaleInvShape(const std::vector<int64_t>& weight_shape) {
  std::vector<int64_t> shape;
  for (int64_t d : weight_shape) shape.push_back(CeilDiv(d, 128));
  return shape;
}

std::vector<PartialGroupLinear> PartialGroupLinears(const DeepseekV3Config& config,
                                                    int64_t group_size, bool all_linear) {
  std::vector<PartialGroupLinear> out;
  if (group_size <= 0) return out;
  // Every expert of a layer has the same shapes: one stands for all (a few thousand tensors
  // instead of tens of thousands for DeepSeek-V3).
  DeepseekV3Config one_expert = config;
  one_expert.n_routed_experts = std::min(config.n_routed_experts, 1);
  std::set<std::string> seen;
  for (const ExpectedTensor& t : ExpectedInventory(one_expert, config.num_nextn_predict_layers)) {
    if (t.role != TensorRole::kLinear) continue;
    if (!t.routed_expert && !(all_linear && t.quantized_with_all_linear)) continue;
    if (t.shape.size() != 2 || t.shape[1] % group_size == 0) continue;
    std::string module = ModuleKind(t.name);
    if (!seen.insert(module).second) continue;
    out.push_back(PartialGroupLinear{std::move(module), t.shape[1], t.routed_expert});
  }
  return out;
}

std::vector<ExpectedTensor> ExpectedInventory(const DeepseekV3Config& config, int num_mtp_layers) {
  std::vector<ExpectedTensor> out;
  InventoryBuilder b(&out);
  b.Add("model.embed_tokens.weight", {config.vocab_size, config.hidden_size},
        TensorRole::kEmbedding, -1);
  const int mtp = std::clamp(num_mtp_layers, 0, config.num_nextn_predict_layers);
  for (int layer = 0; layer < config.num_hidden_layers + mtp; ++layer) {
    AddLayer(config, layer, b);
    if (layer >= config.num_hidden_layers) AddMtpExtras(config, layer, b);
  }
  b.Add("model.norm.weight", {config.hidden_size}, TensorRole::kNorm, -1);
  if (!config.tie_word_embeddings) {
    b.Add("lm_head.weight", {config.vocab_size, config.hidden_size}, TensorRole::kEmbedding, -1);
  }
  return out;
}

JobPlan PlanJob(const DeepseekV3Config& config, const InspectRequest& request,
                const StoredTensors& stored) {
  JobPlan plan;
  const int mtp_layers = request.include_mtp ? config.num_nextn_predict_layers : 0;
  const std::vector<ExpectedTensor> inventory = ExpectedInventory(config, mtp_layers);
  const int num_layers = config.num_hidden_layers + mtp_layers;
  const int64_t h = config.hidden_size;
  const int64_t moe = config.moe_intermediate_size;
  const int64_t seq = request.max_sequence_length;

  std::set<std::string> partial;  // non-expert linears written BF16 (PartialGroupLinears)
  for (const PartialGroupLinear& p :
       PartialGroupLinears(config, request.group_size, request.all_linear)) {
    if (!p.routed_expert) partial.insert(p.module);
  }

  plan.layers.resize(num_layers);
  // Input and output bytes of each layer's routed experts (the rest is every rank's or rank 0's).
  std::vector<int64_t> expert_input(num_layers, 0), expert_output(num_layers, 0);
  // The same as host memory holds it before the write (HeldOutputBytes).
  std::vector<int64_t> layer_held(num_layers, 0), expert_held(num_layers, 0);
  std::vector<int64_t> replicated_elements(num_layers, 0);
  std::vector<std::map<std::string, int64_t>> hessian_inputs(num_layers);  // input_id -> in dim
  // Each layer's stored tensors in name order: (routed expert, or -1 for every rank's, bytes).
  std::vector<std::vector<std::pair<int, int64_t>>> layer_tensors(num_layers);
  bool any_moe = false;
  int64_t output_bytes = 0;
  for (int layer = 0; layer < num_layers; ++layer) {
    LayerPlan& lp = plan.layers[layer];
    lp.index = layer;
    lp.kind = layer >= config.num_hidden_layers ? LayerKind::kMtp
              : config.IsMoeLayer(layer)        ? LayerKind::kMoe
                                                : LayerKind::kDense;
    any_moe = any_moe || config.IsMoeLayer(layer);
    const std::string prefix = absl::StrCat("model.layers.", layer, ".");
    for (auto it = stored.lower_bound(prefix);
         it != stored.end() && std::string_view(it->first).substr(0, prefix.size()) == prefix;
         ++it) {
      lp.input_bytes = SatAdd(lp.input_bytes, it->second.num_bytes);
      if (it->first.find(".mlp.experts.", prefix.size() - 1) != std::string::npos) {
        expert_input[layer] = SatAdd(expert_input[layer], it->second.num_bytes);
      }
      int e = 0;
      layer_tensors[layer].emplace_back(RoutedExpertOf(it->first, &e) ? e : -1,
                                        it->second.num_bytes);
    }
  }
  for (const ExpectedTensor& t : inventory) {
    const int64_t bytes = OutputBytes(t, request, stored, partial);
    output_bytes = SatAdd(output_bytes, bytes);
    if (t.layer < 0) continue;
    LayerPlan& lp = plan.layers[t.layer];
    lp.output_bytes = SatAdd(lp.output_bytes, bytes);
    if (t.routed_expert) expert_output[t.layer] = SatAdd(expert_output[t.layer], bytes);
    const int64_t held = HeldOutputBytes(t, request, stored, partial);
    layer_held[t.layer] = SatAdd(layer_held[t.layer], held);
    if (t.routed_expert) expert_held[t.layer] = SatAdd(expert_held[t.layer], held);
    const bool quantized = IsQuantized(t, request.all_linear, partial);
    if (quantized) ++lp.num_quantized_linears;
    if (!t.routed_expert) {
      replicated_elements[t.layer] = SatAdd(replicated_elements[t.layer], Elements(t.shape));
      if (quantized) hessian_inputs[t.layer][t.input_id] = t.shape[1];
    }
  }

  int64_t replicated_bytes = 0;
  int64_t non_expert_hessian_bytes = 0;
  for (int layer = 0; layer < num_layers; ++layer) {
    replicated_bytes = std::max(replicated_bytes, SatMul(replicated_elements[layer], 2));
    int64_t hessians = 0;
    for (const auto& [id, dim] : hessian_inputs[layer]) {
      hessians = SatAdd(hessians, SatMul({dim, dim, 4}));
    }
    non_expert_hessian_bytes = std::max(non_expert_hessian_bytes, hessians);
  }

  const int gang = request.gang_size;
  const int64_t attention_scores =
      SatMul({seq, seq, std::min<int64_t>(config.num_attention_heads, kAttentionHeadsPerChunk), 4});
  const int64_t heads = config.num_attention_heads;
  const int64_t attention_bytes_per_token =
      2 * (2 * config.q_lora_rank + 4 * heads * config.q_head_dim() +
           heads * (config.qk_nope_head_dim + config.v_head_dim) + 2 * heads * config.v_head_dim +
           4 * h);
  ResourceEstimate& est = plan.estimate;
  const int64_t samples = std::max<int64_t>(1, request.num_calibration_samples);
  const int64_t k = any_moe ? config.num_experts_per_tok : 0;
  int first_expert = 0;
  for (int rank = 0; rank < gang; ++rank) {
    RankPlan rp;
    rp.rank = rank;
    rp.first_expert = first_expert;
    rp.num_experts = static_cast<int>(ShareOf(config.n_routed_experts, gang, rank));
    first_expert += rp.num_experts;
    rp.num_sequences = ShareOf(request.num_calibration_samples, gang, rank);
    plan.ranks.push_back(rp);
  }
  const int64_t square = SatAdd(SatMul(h, h), SatMul(moe, moe));
  // gpu(r) for the two settings (plan.h).
  auto gpu_bytes = [&](const RankPlan& rp, int64_t experts_per_pass, int64_t rounds,
                       bool preload) {
    const int64_t tokens = SatMul(rp.num_sequences, seq);
    const int64_t token_tensor = SatMul({tokens, h, 2});
    const int64_t experts = any_moe ? rp.num_experts : 0;
    const int64_t expert_weights = SatMul({experts, 3, moe, h, 2});
    const int64_t chunk_tokens = std::min(tokens, std::max(seq, kForwardBatchTokens));
    const int64_t attention =
        SatAdd(SatMul(chunk_tokens, attention_bytes_per_token), attention_scores);
    // Routing, one segment of rows at a time: the fp32 scores and their copies, and one row
    // block's fp32 input.
    const int64_t routing =
        any_moe
            ? SatAdd(SatMul({std::min(tokens, kRouterSegmentRows), config.n_routed_experts, 4, 4}),
                     SatMul({std::min(tokens, kRouterBlockRows), h, 4}))
            : 0;
    // The propagation's routed output, one dispatch round's rows at a time.
    const int64_t round_output = SatMul({CeilDiv(rp.num_sequences, rounds), seq, h, 2});
    // Routed rows of the MoE block.
    int64_t dispatch = 0;
    if (experts > 0) {
      const int64_t seqs_per_round = CeilDiv(rp.num_sequences, rounds);
      const int64_t rows = SatMul({seqs_per_round, seq, k});
      const int64_t all_rows = SatMul({CeilDiv(samples, rounds), seq, k, experts});
      const int64_t recv =
          all_rows / config.n_routed_experts + (all_rows % config.n_routed_experts != 0 ? 1 : 0);
      const int64_t held = gang > 1 ? SatAdd(rows, recv) : rows;
      dispatch = SatMul({held, h, 2});
    }
    // One pass of the batched solve.
    const int64_t pass =
        experts_per_pass > 0 ? std::min<int64_t>(experts_per_pass, experts) : experts;
    const int64_t solve =
        SatAdd({SatMul({pass, square, 4, 2}), std::min(int64_t{4} << 30, SatMul({pass, square, 8})),
                SatMul({2, pass, moe, h, 18}), non_expert_hessian_bytes});
    const int64_t hessians = SatMul({pass, square, 4});
    const int64_t after_attention = std::max(
        {SatAdd(dispatch, hessians),
         SatAdd(solve, rounds == 1 ? dispatch : 0),  // one round's dispatch is kept throughout
         SatAdd(round_output, dispatch)});
    // A preloaded next layer is on the device from the expert passes on.
    const int64_t weights = SatAdd(replicated_bytes, expert_weights);
    const int64_t phase =
        std::max({attention, routing, SatAdd(after_attention, preload ? weights : 0)});
    return SatAdd({weights, token_tensor, phase, kDeviceOverheadBytes});
  };
  const int64_t calibration_tokens = SatMul(samples, seq);
  auto peak = [&](int64_t experts_per_pass, int64_t dispatch_tokens) {
    const int64_t rounds = DispatchRounds(calibration_tokens, samples, dispatch_tokens);
    int64_t most = 0;
    for (const RankPlan& rp : plan.ranks) {
      most = std::max(most, gpu_bytes(rp, experts_per_pass, rounds, /*preload=*/false));
    }
    return most;
  };

  // Host memory without the device's working set (plan.h host(r)).
  std::vector<int64_t> host_base;
  // A job of one step neither propagates (no output copy of the hidden states) nor prefetches.
  const bool several = plan.layers.size() > 1;
  for (const RankPlan& rp : plan.ranks) {
    const int64_t tokens = SatMul(rp.num_sequences, seq);
    int64_t in = 0, out = 0, rewritten = 0, staged = 0;
    for (int layer = 0; layer < num_layers; ++layer) {
      std::vector<int64_t> loaded;  // the tensors this rank loads, as the prefetch stages them
      for (const auto& [expert, bytes] : layer_tensors[layer]) {
        if (expert < 0 ||
            (expert >= rp.first_expert && expert < rp.first_expert + rp.num_experts)) {
          loaded.push_back(bytes);
        }
      }
      staged = std::max(staged, PinnedSlabsBytes(loaded));
      const int64_t n = std::max(1, config.n_routed_experts);
      const int64_t own_in = SatMul(expert_input[layer], rp.num_experts) / n;
      const int64_t own_out = SatMul(expert_held[layer], rp.num_experts) / n;
      const int64_t others_in = plan.layers[layer].input_bytes - expert_input[layer];
      in = std::max(in, SatAdd(others_in, own_in));
      if (rp.rank == 0) rewritten = std::max(rewritten, others_in);
      const int64_t others = rp.rank == 0 ? layer_held[layer] - expert_held[layer] : 0;
      out = std::max(out, SatAdd(others, own_out));
    }
    host_base.push_back(SatAdd(
        {SatMul(HiddenCopyBytes(rp.num_sequences, seq, h, !request.device_is_host),
                several ? kHiddenCopiesOnHost : kHiddenCopiesOnHost - 1),
         SatMul(out, 2),
         several ? SatAdd(request.device_is_host ? in : std::max(in, staged), rewritten) : in,
         SatMul({samples, seq, 4}), SatMul(tokens, 8), SatMul({tokens, k, 32}), kPinnedStagingBytes,
         kHostOverheadBytes}));
  }

  // The settings (plan.h ChooseSettings).
  int64_t most_experts = 0;
  for (const RankPlan& rp : plan.ranks) {
    most_experts = std::max<int64_t>(most_experts, rp.num_experts);
  }
  if (!any_moe) most_experts = 0;
  const bool choose_pass = request.experts_per_pass == kChooseSetting;
  const bool choose_dispatch = request.dispatch_tokens == kChooseSetting;
  int64_t experts_per_pass = choose_pass ? 0 : request.experts_per_pass;
  int64_t dispatch_tokens = choose_dispatch ? 0 : request.dispatch_tokens;
  const int64_t memory = request.device_memory_bytes;
  // On the CPU the device's working set shares host memory with the rest of host(r).
  int64_t budget = static_cast<int64_t>(static_cast<double>(memory) * (1.0 - kDeviceMemoryMargin));
  if (request.device_is_host) {
    for (int64_t base : host_base) budget = std::max<int64_t>(0, std::min(budget, memory - base));
  }
  if (any_moe && memory == 0) {
    if (choose_pass) experts_per_pass = kFallbackExpertsPerPass;
    if (choose_dispatch) dispatch_tokens = kFallbackDispatchTokens;
  } else if (any_moe && (choose_pass || choose_dispatch)) {
    // Candidates: experts per pass for 1, 2, ... passes; tokens per round for 1, 2, ... rounds.
    std::vector<int64_t> passes;
    if (choose_pass) {
      for (int64_t n = 1; n <= std::max<int64_t>(1, most_experts); ++n) {
        const int64_t per_pass = CeilDiv(std::max<int64_t>(1, most_experts), n);
        if (CeilDiv(std::max<int64_t>(1, most_experts), per_pass) < n) continue;
        passes.push_back(n == 1 ? 0 : per_pass);
      }
    } else {
      passes.push_back(experts_per_pass);
    }
    auto tokens_for = [&](int64_t rounds) {
      return rounds == 1 ? int64_t{0} : CeilDiv(calibration_tokens, rounds);
    };
    bool found = false;
    for (int64_t per_pass : passes) {
      // Fewest rounds that fit with this pass size (more rounds never hold more).
      int64_t lo = 1, hi = choose_dispatch ? samples : 1;
      const int64_t given = dispatch_tokens;
      auto tokens = [&](int64_t rounds) { return choose_dispatch ? tokens_for(rounds) : given; };
      if (peak(per_pass, tokens(hi)) > budget) continue;
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (peak(per_pass, tokens(mid)) <= budget) {
          hi = mid;
        } else {
          lo = mid + 1;
        }
      }
      experts_per_pass = per_pass;
      dispatch_tokens = tokens(lo);
      found = true;
      break;
    }
    if (!found) {
      experts_per_pass = passes.back();
      if (choose_dispatch) dispatch_tokens = tokens_for(samples);
    }
  }
  const int64_t rounds = DispatchRounds(calibration_tokens, samples, dispatch_tokens);
  est.dispatch_rounds = any_moe ? rounds : 0;
  est.experts_per_pass = experts_per_pass;
  est.dispatch_tokens = dispatch_tokens;
  est.experts_per_pass_chosen = choose_pass;
  est.dispatch_tokens_chosen = choose_dispatch;
  est.device_memory_bytes = memory;
  est.expert_passes =
      most_experts == 0
          ? 0
          : CeilDiv(most_experts,
                    experts_per_pass > 0 ? std::min(experts_per_pass, most_experts) : most_experts);

  // The next layer's weights are preloaded where the chosen settings leave room for them on
  // every rank (plan.h).
  bool preload = request.preload_next_layer && !request.device_is_host && memory > 0 &&
                 plan.layers.size() > 1;
  for (const RankPlan& rp : plan.ranks) {
    preload = preload && gpu_bytes(rp, experts_per_pass, rounds, true) <= budget;
  }
  est.preload_next_layer = preload;
  for (RankPlan& rp : plan.ranks) {
    rp.gpu_bytes = gpu_bytes(rp, experts_per_pass, rounds, preload);
    rp.host_bytes = host_base[rp.rank];
    if (request.device_is_host) {
      rp.host_bytes = SatAdd(rp.host_bytes, rp.gpu_bytes - kDeviceOverheadBytes);
    }
    est.gpu_bytes_per_rank = std::max(est.gpu_bytes_per_rank, rp.gpu_bytes);
    est.host_bytes_per_rank = std::max(est.host_bytes_per_rank, rp.host_bytes);
  }
  if (memory > 0 && est.gpu_bytes_per_rank > budget) {
    const auto setting = [](int64_t v, bool chosen) {
      return absl::StrCat(v == 0 ? std::string("0 (all)") : absl::StrCat(v),
                          chosen ? " (the least memory the plan can choose)" : " (as given)");
    };
    plan.notes.push_back(Problem{
        "estimate.gpu_bytes_per_rank",
        absl::StrCat("the estimate of ", Gib(est.gpu_bytes_per_rank),
                     " per rank with experts_per_pass = ", setting(experts_per_pass, choose_pass),
                     " and dispatch_tokens = ", setting(dispatch_tokens, choose_dispatch),
                     " exceeds the ", Gib(budget), " a rank may use of the ", Gib(memory),
                     " device planned for (",
                     static_cast<int>(100 * (1 - kDeviceMemoryMargin) + 0.5), "%",
                     request.device_is_host ? ", less the rest of the host memory estimate" : "",
                     "): a larger gang, fewer calibration samples or shorter sequences need less "
                     "per rank")});
  }
  // Projected time (plan.h): the rank with the most tokens and experts sets the pace.
  int64_t max_tokens = 0, max_experts = 0;
  for (const RankPlan& rp : plan.ranks) {
    max_tokens = std::max(max_tokens, SatMul(rp.num_sequences, seq));
    max_experts = std::max<int64_t>(max_experts, rp.num_experts);
  }
  const CheckpointCadence cadence = PlanCheckpoints(config, request, plan, any_moe, &est);
  double total = 0, previous_write = 0;
  for (size_t i = 0; i < plan.layers.size(); ++i) {
    const LayerPlan& lp = plan.layers[i];
    // A preloaded layer's load overlapped the layer before it; on a GPU a staged one is only
    // transfers to the device.
    const double rate =
        i > 0 && !request.device_is_host ? kStagedLoadBytesPerSecond : kLoadBytesPerSecond;
    const double load = preload && i > 0 ? 0.0 : static_cast<double>(lp.input_bytes) / gang / rate;
    const double compute =
        load + static_cast<double>(max_tokens) * kSecondsPerToken +
        (lp.kind == LayerKind::kDense ? 0.0
                                      : static_cast<double>(max_experts) * kSolveSecondsPerExpert);
    total += std::max(compute, previous_write);
    const bool checkpoint =
        IsCheckpointStep(static_cast<int>(i), static_cast<int>(plan.layers.size()), cadence.every);
    previous_write =
        static_cast<double>(lp.output_bytes) / gang / kWriteBytesPerSecond +
        (checkpoint ? static_cast<double>(cadence.bytes) / kCheckpointWriteBytesPerSecond : 0.0);
  }
  total += previous_write;
  est.total_seconds = plan.layers.empty() ? 0 : total;
  est.seconds_per_layer = plan.layers.empty() ? 0 : total / plan.layers.size();
  est.output_bytes = output_bytes;
  est.calibration_tokens = SatMul(request.num_calibration_samples, seq);
  est.tokens_per_expert = static_cast<double>(request.num_calibration_samples) *
                          static_cast<double>(seq) * config.num_experts_per_tok /
                          config.n_routed_experts;
  return plan;
}

CheckpointCadence ChooseCheckpointCadence(int64_t tokens, int64_t hidden_size, int64_t experts,
                                          int steps, int64_t forced_every) {
  CheckpointCadence c;
  const int most = std::max(1, steps);
  c.bytes = SatMul({std::max<int64_t>(0, tokens), std::max<int64_t>(0, hidden_size), 2});
  c.write_seconds = static_cast<double>(c.bytes) / kCheckpointWriteBytesPerSecond;
  c.layer_seconds = static_cast<double>(std::max<int64_t>(0, tokens)) * kSecondsPerToken +
                    static_cast<double>(std::max<int64_t>(0, experts)) * kSolveSecondsPerExpert;
  c.replay_seconds =
      static_cast<double>(std::max<int64_t>(0, tokens)) * kSecondsPerToken *
      kReplayShareOfTokenSeconds;
  if (forced_every > 0) {
    c.every = static_cast<int>(std::min<int64_t>(forced_every, most));
  } else if (c.layer_seconds <= 0) {
    c.every = c.write_seconds > 0 ? most : 1;  // nothing to amortise against
  } else {
    // Smallest K with write / K <= share * layer; computed in double, capped before the cast.
    const double k = std::ceil(c.write_seconds / (kCheckpointShareOfLayer * c.layer_seconds));
    c.every = static_cast<int>(std::clamp(k, 1.0, static_cast<double>(most)));
  }
  c.checkpoints = steps >= 1 ? (steps - 1) / c.every : 0;
  c.resume_seconds = (c.every - 1) * c.replay_seconds;
  return c;
}

bool IsCheckpointStep(int step, int steps, int every) {
  return every >= 1 && step >= 0 && step + 1 < steps && (step + 1) % every == 0;
}

int64_t DispatchRounds(int64_t tokens, int64_t sequences, int64_t dispatch_tokens) {
  if (dispatch_tokens <= 0) return 1;
  // Written so that tokens near INT64_MAX (saturated products) cannot overflow.
  const int64_t rounds = tokens / dispatch_tokens + (tokens % dispatch_tokens != 0 ? 1 : 0);
  return std::clamp<int64_t>(rounds, 1, std::max<int64_t>(1, sequences));
}

std::vector<PinnedSlab> PlanPinnedSlabs(const std::vector<int64_t>& tensor_bytes) {
  auto aligned = [](int64_t b) {
    return SatMul(CeilDiv(std::max<int64_t>(b, 1), kPinnedAlignment), kPinnedAlignment);
  };
  int64_t left = 0;
  for (int64_t b : tensor_bytes) left = SatAdd(left, aligned(b));
  std::vector<PinnedSlab> slabs;
  const int64_t n = static_cast<int64_t>(tensor_bytes.size());
  for (int64_t i = 0; i < n;) {
    PinnedSlab slab;
    slab.first = i;
    slab.bytes = left >= kPinnedSlabBytes
                     ? std::max(kPinnedSlabBytes, PowerOfTwoAtLeast(aligned(tensor_bytes[i])))
                     : PowerOfTwoAtLeast(left);
    int64_t used = 0;
    while (i < n && used + aligned(tensor_bytes[i]) <= slab.bytes) {
      slab.offsets.push_back(used);
      used += aligned(tensor_bytes[i]);
      left -= aligned(tensor_bytes[i]);
      ++i;
    }
    slab.count = i - slab.first;
    slabs.push_back(std::move(slab));
  }
  return slabs;
}

int64_t PinnedSlabsBytes(const std::vector<int64_t>& tensor_bytes) {
  int64_t bytes = 0;
  for (const PinnedSlab& s : PlanPinnedSlabs(tensor_bytes)) bytes = SatAdd(bytes, s.bytes);
  return bytes;
}

}  // namespace mq::model
