// The expected DeepseekV3 tensor inventory (FORMATS.md §2.2, generalized to any config) and
// the job plan / resource estimate derived from it.
//
// Pure functions with no shared state; safe to call from any thread.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "worker/model/config.h"
#include "worker/model/dtype.h"
#include "worker/model/inspect.h"

namespace mq::model {

// How a tensor may be stored, and how the job treats it.
enum class TensorRole {
  kEmbedding,   // embed_tokens, lm_head, MTP shared_head.head: 16/32/64-bit float
  kNorm,        // RMSNorm weights: 16/32/64-bit float
  kLinear,      // nn.Linear weight: F8_E4M3 + weight_scale_inv, or 16/32/64-bit float
  kRouter,      // mlp.gate.weight: 16/32/64-bit float, never FP8
  kRouterBias,  // mlp.gate.e_score_correction_bias: 16/32/64-bit float
};

struct ExpectedTensor {
  std::string name;            // full name, e.g. "model.layers.3.mlp.experts.7.up_proj.weight"
  std::vector<int64_t> shape;  // [out, in] for linears
  TensorRole role = TensorRole::kNorm;
  int layer = -1;              // decoder layer index; -1 for model-level tensors
  bool routed_expert = false;  // mlp.experts.{e}.*: always quantized
  // Quantized when the request sets all_linear (attention, dense MLP, shared experts). False for
  // routed experts (always quantized), the router, lm_head and MTP eh_proj (never quantized).
  bool quantized_with_all_linear = false;
  // Linears that read the same activation share one Hessian; they carry the same `input_id`
  // (e.g. "3.attn" for q_a_proj and kv_a_proj_with_mqa, "3.expert.5" for gate/up of expert 5).
  std::string input_id;
};

// Every tensor a checkpoint for `config` must contain, except the FP8 `weight_scale_inv`
// companions (those follow the stored dtype of each linear). Order: model.embed_tokens.weight,
// layers 0 .. num_hidden_layers + num_mtp_layers - 1 (each: input_layernorm, attention,
// post_attention_layernorm, MLP; MTP layers then embed_tokens, enorm, hnorm, eh_proj,
// shared_head.norm, shared_head.head), model.norm.weight, lm_head.weight (omitted when
// tie_word_embeddings). Per layer:
//   attention with q_lora_rank > 0: q_a_proj [q_lora, H], q_a_layernorm [q_lora],
//     q_b_proj [heads*(nope+rope), q_lora]; with q_lora_rank 0: q_proj [heads*(nope+rope), H];
//     then kv_a_proj_with_mqa [kv_lora+rope, H], kv_a_layernorm [kv_lora],
//     kv_b_proj [heads*(nope+v), kv_lora], o_proj [H, heads*v].
//   dense layers (config.IsMoeLayer false): mlp.{gate,up}_proj [I, H], mlp.down_proj [H, I].
//   MoE layers: mlp.gate.weight [E, H], mlp.gate.e_score_correction_bias [E] (noaux_tc only),
//     mlp.experts.{e}.{gate,up}_proj [I_e, H] and down_proj [H, I_e] for e < E, and when
//     n_shared_experts > 0 mlp.shared_experts.{gate,up}_proj [I_e*S, H], down_proj [H, I_e*S].
//   MTP extras: embed_tokens [V, H], enorm [H], hnorm [H], eh_proj [H, 2H],
//     shared_head.norm [H], shared_head.head [V, H].
// `num_mtp_layers` (0 .. num_nextn_predict_layers) says how many MTP layers to include.
std::vector<ExpectedTensor> ExpectedInventory(const DeepseekV3Config& config, int num_mtp_layers);

// A kind of linear (the same in every layer that has it) whose input width is not a multiple of
// the group size: group quantization would leave a short last group, which compressed-tensors
// (transformers) and vLLM refuse ("tensor column shape must be divisible by the given
// group_size").
struct PartialGroupLinear {
  // Module name after "model.layers.<L>.", routed experts as "mlp.experts.*.<proj>", e.g.
  // "self_attn.kv_b_proj".
  std::string module;
  int64_t in_features = 0;
  bool routed_expert = false;
};

// The linear kinds of `config` that a job quantizes (routed experts always; attention, dense MLP
// and shared experts with `all_linear`) whose input width is not a multiple of `group_size`, in
// inventory order (attention, dense MLP, routed experts, shared experts). Empty when
// group_size <= 0 (per-channel). A job leaves the non-expert ones unquantized (BF16, in
// quantization_config.ignore) and refuses routed experts (vLLM runs all of a layer's experts
// with one scheme).
std::vector<PartialGroupLinear> PartialGroupLinears(const DeepseekV3Config& config,
                                                    int64_t group_size, bool all_linear);

// "<p>.weight" -> "<p>.weight_scale_inv".
std::string ScaleInvName(std::string_view weight_name);
// [ceil(out/128), ceil(in/128)] for an FP8 weight of shape [out, in] (128x128 blocks).
std::vector<int64_t> ScaleInvShape(const std::vector<int64_t>& weight_shape);

// What the checkpoint actually stores for a tensor (from its safetensors header).
struct StoredTensor {
  DType dtype = DType::kBF16;
  int64_t num_bytes = 0;
};
using StoredTensors = std::map<std::string, StoredTensor, std::less<>>;

struct JobPlan {
  std::vector<LayerPlan> layers;
  std::vector<RankPlan> ranks;
  ResourceEstimate estimate;
  // Where the plan's settings do not fit the device (ChooseSettings below); inspection reports
  // them as notes.
  std::vector<Problem> notes;
};

// Attention scores are materialized for this many heads at a time (the eager path: CPU, or a GPU
// without a fused kernel for the shapes).
inline constexpr int64_t kAttentionHeadsPerChunk = 16;
// Tokens per forward call of the pipeline (GangPipelineOptions::max_batch_tokens): the per-chunk
// temporaries scale with it, not with the calibration set.
inline constexpr int64_t kForwardBatchTokens = 16384;
// Routing runs the router's product on blocks of kRouterBlockRows rows (a token's scores do not
// depend on how many tokens are routed with it) and the rest on segments of kRouterSegmentRows
// rows, so its fp32 temporaries do not grow with the calibration set.
inline constexpr int64_t kRouterBlockRows = 4096;
inline constexpr int64_t kRouterSegmentRows = 16 * kRouterBlockRows;
// Token-sized bf16 tensors of hidden width in host memory: a step's input (also read by the write
// thread for its checkpoint), the residual after attention, and the step's output.
inline constexpr int64_t kHiddenCopiesOnHost = 3;
// The CUDA context, library workspaces and the caching allocator's slack. First fitted (5 GiB) to
// the peaks nvidia-smi showed for one full-width DeepSeek-V3 layer on one H200 with fixed settings
// (bench/RESULTS.md, 2026-12-05); since the worker's allocator keeps what the card has, the
// estimate is held against torch's peak in tensors with the settings the plan chooses: with
// 5 GiB it was +8.6% (H100, 512 x 4096), +8.8% (H200, 512 x 4096), +11.1% (H100, 128 x 4096)
// and +10.7% (H100, 64 x 1024) above it (bench/RESULTS.md, 2026-12-06, seventh session); 4 GiB
// brings all four within +7..+10%.
inline constexpr int64_t kDeviceOverheadBytes = int64_t{4} << 30;  // 4 GiB

// Host memory the worker process holds whatever the job (libraries, the CUDA context's host
// side, allocator arenas) and the pinned staging buffers of host-to-device copies (64 MiB each,
// kept by torch's pinned allocator; a few are in flight). Against the worker's peak resident set
// (bench/run_layer_quant_gpu.sh), 2 GiB gave +5.0% (H100, 512 x 4096), +5.9% (H200), +8.8% (H100,
// 128 x 4096) and +11.5% (H100, 64 x 1024); 1.5 GiB gives +4.5% to +9.6%.
inline constexpr int64_t kHostOverheadBytes = int64_t{3} << 29;     // 1.5 GiB
inline constexpr int64_t kPinnedStagingBytes = int64_t{256} << 20;  // 4 x 64 MiB

// Page-locked host memory for a sequence of tensors (a step's hidden states, one tensor per
// forward call) is allocated in slabs, because torch's pinned allocator rounds every allocation up
// to a power of two (a DeepSeek-V3 call of 16,384 tokens, 224 MiB, would take 256 MiB: +14%).
// PlanPinnedSlabs packs the tensors in order, each at a kPinnedAlignment-aligned offset: into
// slabs of kPinnedSlabBytes while what is left fills one, then into one slab of the smallest power
// of two that holds the rest (a tensor larger than kPinnedSlabBytes alone in a slab of the next
// power of two). For 128 such calls: 14 slabs of 9 calls and one of 512 MiB, 28.5 GiB for 28.
inline constexpr int64_t kPinnedSlabBytes = int64_t{2} << 30;  // 2 GiB
inline constexpr int64_t kPinnedAlignment = 4096;
struct PinnedSlab {
  int64_t bytes = 0;             // a power of two
  int64_t first = 0, count = 0;  // the tensors it holds: [first, first + count)
  std::vector<int64_t> offsets;  // of those tensors, in bytes from the slab's start
};
std::vector<PinnedSlab> PlanPinnedSlabs(const std::vector<int64_t>& tensor_bytes);
// The sum of the slabs' bytes.
int64_t PinnedSlabsBytes(const std::vector<int64_t>& tensor_bytes);

// Share of the device's memory chosen settings leave free (fragmentation, what the estimate
// misses): the estimate must fit in (1 - kDeviceMemoryMargin) * device memory.
inline constexpr double kDeviceMemoryMargin = 0.05;
// Chosen settings when the device's memory is unknown (request.device_memory_bytes = 0).
inline constexpr int64_t kFallbackExpertsPerPass = 16;
inline constexpr int64_t kFallbackDispatchTokens = 65536;

// Stage rates of the quantize pipeline: they turn a plan into a projected time
// (ResourceEstimate::seconds_per_layer, total_seconds), for one H200 per rank. Per token, per
// expert, the layer file and the checkpoint: one H200 (2026-12-06, bench/RESULTS.md, "One H200:
// the job measured on the card it is planned for"): the steady-state layer (the second of three
// full-width DeepSeek-V3 MoE layers, GPTQ with the TF32 update, the real 512 x 4096 calibration
// tokens, gang of one, the plan's 4 expert passes and 4 dispatch rounds; forward 3.3 + Hessians
// 2.9 + propagation 3.8 s over 2,097,152 tokens; solve 6.9 s over 256 experts).
inline constexpr double kLoadBytesPerSecond = 8.4e9;  // checkpoint bytes onto the device
// The same from copies staged in page-locked memory while the layer before computed
// (worker/pipeline/layer_staging.h; every layer after the first on a GPU): 11.5 GB in 0.28-0.30 s
// on one H100 (2026-12-06, bench/RESULTS.md), which the H200's PCIe 5 link shares.
inline constexpr double kStagedLoadBytesPerSecond = 3.8e10;
inline constexpr double kSecondsPerToken = 4.8e-6;       // forward + Hessians + propagation
inline constexpr double kSolveSecondsPerExpert = 0.027;  // batched GPTQ of gate, up and down
// A layer file: SHA-256 while writing, fsync, read back by ranges (6.36 GB in 7.7-8.3 s).
inline constexpr double kWriteBytesPerSecond = 0.8e9;
// A hidden-state checkpoint: per-chunk SHA-256 on 8 threads, write, fsync (mq-bench-checkpoint
// on the H200 machine's disk: 7.52 GB in 5.43 s; 15.03 GB in 8.74 s on a faster H100 machine's).
inline constexpr double kCheckpointWriteBytesPerSecond = 1.38e9;

// Hidden-state checkpoints. A rank's checkpoint of step s holds its hidden states after step s
// (bf16, tokens(r) * H * 2 bytes: ~30 GB for DeepSeek-V3 at 512 x 4096 on one rank). They are
// written every `every` steps: after the steps s with (s + 1) % every == 0, never after the last
// step (the job is done once every step is reported). The embeddings serve as the free
// checkpoint before step 0. A resume at step t loads the newest checkpoint c < t that every rank
// has and can use and replays steps c + 1 .. t - 1 with the committed weights, so it replays at
// most every - 1 steps (all of t's predecessors when no checkpoint is usable). A rank keeps its
// newest checkpoint until a newer one is durable and the newer one's step is reported (in a gang,
// a peer lost between its own and that report leaves a resume only the embeddings): at most two
// per rank are on disk at once.
// Cost model, for the rank with the most tokens (T) and routed experts (X, 0 without MoE layers):
//   write  = T * H * 2 / kCheckpointWriteBytesPerSecond      (seconds to write one checkpoint)
//   layer  = T * kSecondsPerToken + X * kSolveSecondsPerExpert   (a layer's compute without its
//            load, so the share below errs toward fewer checkpoints)
//   every  = the smallest K >= 1 with write / K <= kCheckpointShareOfLayer * layer, at most the
//            number of steps (every = steps writes none); a forced value (mq-worker
//            --checkpoint-every) replaces it, also capped at the number of steps
//   replay = T * kSecondsPerToken * kReplayShareOfTokenSeconds   (per replayed step, plus its
//            load)
//   resume <= (every - 1) * replay
// DeepSeek-V3 at 512 x 4096 with GPTQ: every 43 steps on one H200 (write 21.8 s, layer 17.0 s)
// and on 8 (write 2.7 s, layer 2.1 s), one checkpoint in its 61 steps; a resume replays at most
// 42 steps (~5.0 min on one H200, ~38 s on 8). The share bounds what checkpoints add to a job (at
// most 3% of its layers' time, less where the layer's compute hides the write) against what a
// resume replays: with 10%, the same write would checkpoint every 13 layers (four 21.8 s writes
// instead of one in a one-GPU DeepSeek-V3 job) to save replaying at most 30 more layers after a
// crash.
inline constexpr double kCheckpointShareOfLayer = 0.03;
// The forward share of kSecondsPerToken: a replayed step runs attention and the experts once
// with the committed weights (no Hessians). Of the 10.0 s per layer that rate was fitted to
// (forward 3.3, Hessians 2.9, propagation 3.8 at 512 x 4096 tokens), forward and propagation
// are 7.1 s.
inline constexpr double kReplayShareOfTokenSeconds = 7.1 / 10.0;

struct CheckpointCadence {
  int every = 1;              // steps per checkpoint (see above)
  int checkpoints = 0;        // written over the job: (steps - 1) / every
  int64_t bytes = 0;          // one checkpoint of the largest rank
  double write_seconds = 0;   // of one checkpoint
  double layer_seconds = 0;   // the layer compute the checkpoint's share is measured against
  double replay_seconds = 0;  // per replayed step (without its load)
  double resume_seconds = 0;  // at most, replaying from the newest checkpoint
};

// The cadence for a job of `steps` pipeline steps whose largest rank holds `tokens` calibration
// tokens and `experts` routed experts (0 without MoE layers), hidden width `hidden_size`.
// `forced_every` > 0 sets `every` (capped at steps); 0 (or less) chooses it by the cost model.
// The plan and the pipeline both call this.
CheckpointCadence ChooseCheckpointCadence(int64_t tokens, int64_t hidden_size, int64_t experts,
                                          int steps, int64_t forced_every);

// Whether step `step` (0-based) of `steps` writes a hidden-state checkpoint with cadence `every`.
bool IsCheckpointStep(int step, int steps, int every);

// Plans the job. `request` must be valid (gang_size in [1, n_routed_experts], bits 4, group
// size 0/32/64/128, samples and sequence length >= 1) and `config` free of problems. `stored`
// holds every tensor of the checkpoint (absent tensors just count as 0 input bytes).
//
// Planned layers: 0 .. num_hidden_layers-1, plus the MTP layers (kind kMtp) when
// request.include_mtp. MTP layers are neither planned nor counted in the output otherwise.
//
// Quantized linears of a layer: every routed expert's gate/up/down; with all_linear also the
// attention projections, the dense MLP and the shared experts, except those whose input width is
// not a multiple of the group size (PartialGroupLinears: written BF16). Never the router,
// embeddings, lm_head, norms, or the MTP eh_proj / shared_head.
//
// LayerPlan.input_bytes = stored bytes of "model.layers.<L>.*" (scales included).
// Output bytes of a tensor (FORMATS.md §4.1, group G, G = 0 meaning one group per row):
//   quantized [O, I]: O*ceil(I/8)*4 (I32 weight_packed; = O*I/2 when I % 8 == 0)
//                     + O*ceil(I/G)*2 (BF16 weight_scale) + 16 (I64 weight_shape [2]).
//   anything else: elements * 2 (BF16) when stored as F8_E4M3 or absent; otherwise stored bytes
//                  (F32 norms/biases stay F32, BF16 stays BF16). weight_scale_inv is dropped.
// LayerPlan.output_bytes sums that over the layer's expected tensors.
//
// Ranks: routed experts in contiguous ranges, E / gang each, the first E % gang ranks one more;
// calibration sequences split the same way. tokens(r) = num_sequences(r) * max_sequence_length.
// Over the planned layers, with H = hidden, I_e = moe_intermediate_size, S = max_sequence_length:
//   replicated = max over layers of 2 * elements of the layer's tensors other than routed experts
//   experts(r) = num_experts(r) * 3 * I_e * H * 2                   (bf16, 0 without MoE layers)
//   T(r) = tokens(r) * H * 2 (one bf16 token-sized tensor)
//   chunk(r) = min(tokens(r), max(S, kForwardBatchTokens)) tokens per forward call, whose
//              attention temporaries are chunk(r) * attention_bytes, attention_bytes =
//              2 * (2 * q_lora_rank + 4 * heads * (qk_nope + qk_rope) + heads * (qk_nope + v)
//                   + 2 * heads * v + 4 * H)      (q, query, key, padded value, kv, output)
//              + S^2 * min(heads, kAttentionHeadsPerChunk) * 4 (fp32 scores of the eager path)
//   routing(r) = min(tokens(r), kRouterSegmentRows) * n_routed_experts * 4 * 4
//                + min(tokens(r), kRouterBlockRows) * H * 4  (fp32 router scores and their copies
//                for one segment, one block's fp32 input; 0 without MoE layers)
//   dispatch(r) = routed rows held during one dispatch round of the MoE block (0 without MoE
//                 layers), bf16, with k = num_experts_per_tok,
//                 rounds = dispatch_tokens > 0 ? clamp(ceil(samples * S / dispatch_tokens),
//                                                      1, samples) : 1,
//                 rows(r) = ceil(num_sequences(r) / rounds) * S * k and
//                 recv(r) = ceil(ceil(samples / rounds) * S * k * num_experts(r)
//                                / n_routed_experts):
//                 gang > 1: (rows(r) + recv(r)) * H * 2  (sent rows, and received rows that
//                                                      the experts' outputs overwrite)
//                 gang = 1: rows(r) * H * 2             (rows, overwritten by the outputs)
//   solve(r) = the working set of one pass of P = min(experts_per_pass or all, num_experts(r))
//              experts (gate/up share [H,H]; down [I_e,I_e]):
//                P * (H^2 + I_e^2) * 4 * 2       (fp32 Hessian accumulators + their factors)
//                + min(4 GiB, P * (H^2 + I_e^2) * 8)   (fp64 factorisation chunk)
//                + 2 * P * I_e * H * 18          (batched solve of the gate/up class: fp32 copy,
//                                                  transposed copy, original copy, codes, grids)
//              + with all_linear: max over layers of the sum, over distinct input_id of the
//                quantized non-expert linears, of in_dim^2 * 4
//   The step's phases hold, besides the weights, u (one T) and:
//     attention:   attention temporaries of one chunk
//     experts:     dispatch(r) + the pass's fp32 Hessian accumulators P * (H^2 + I_e^2) * 4
//     solve:       solve(r) (+ dispatch(r) with one round: its rows are kept for propagation)
//     routing:     routing(r)
//     propagation: one dispatch round's routed output, ceil(num_sequences(r) / rounds) * S * H * 2
//                  (all of T(r) with one round) + dispatch(r)
//     and with preload, the next layer's replicated + experts(r) in every phase after attention
//   gpu(r) = replicated + experts(r) + T(r) + max over the phases
//            + kDeviceOverheadBytes (context, workspaces, allocator slack)
//   preload (estimate.preload_next_layer): request.preload_next_layer, a GPU of known memory,
//            more than one planned layer, and gpu(r) with preload <= (1 - kDeviceMemoryMargin) *
//            device_memory_bytes on every rank with the chosen settings (the settings are chosen
//            without it: preloading never costs an expert pass or a dispatch round)
//   host(r) = what the worker process holds in host memory during a step (resident set):
//             T(r) * kHiddenCopiesOnHost  the hidden states, which live in host memory: the
//                                     step's input (also what the writing thread checkpoints),
//                                     the residual after attention and the step's output; on a
//                                     GPU page-locked, one tensor per forward call of
//                                     max(1, kForwardBatchTokens / S) sequences, packed into
//                                     PlanPinnedSlabs' slabs (kHiddenCopiesOnHost - 1 for a
//                                     plan of one layer: its step is not propagated)
//             + out(r) * 2            the layer file's tensors: the step's being written, the
//                                     next step's as its linears are solved
//             + in(r) + rewritten(r)  mapped checkpoint pages (page cache the kernel may
//                                     reclaim), resident while mapped: one layer's, as it loads
//                                     or as the prefetch reads it ahead (a layer's pages are
//                                     released once it is loaded), and the previous layer's
//                                     tensors its write reads again; in(r) alone for a plan of
//                                     one layer. On a GPU in(r) is at least staged(r): the
//                                     prefetch copies the next layer into page-locked slabs
//                                     (worker/pipeline/layer_staging.h), which replace its
//                                     mapped pages: max over layers of PinnedSlabsBytes of the
//                                     tensors the rank loads, in name order
//             (for one full-width DeepSeek-V3 layer on one H200 this is +1.0% and +2.1% over the
//             worker's peak resident set at 512 x 4096 and 128 x 4096, bench/RESULTS.md)
//             + samples * S * 4 + tokens(r) * 8   calibration ids: the whole set (int32) and the
//                                     rank's sequences (int64)
//             + tokens(r) * k * 32    routing on the host: top-k indices (int64) and weights
//                                     (fp32), the dispatch rows (int64), and every dispatch
//                                     round's entries sorted by expert for the expert passes
//                                     (int64 token, fp32 weight); 0 without MoE layers
//             + kPinnedStagingBytes + kHostOverheadBytes
//             + gpu(r) - kDeviceOverheadBytes when request.device_is_host (the device's working
//               set is host memory then)
//     in(r) = max over layers of (stored bytes of the layer's tensors other than routed experts
//             + the layer's routed experts' stored bytes * num_experts(r) / n_routed_experts)
//     rewritten(r) = rank 0: max over layers of the stored bytes of the layer's tensors other
//             than routed experts (what the write may read again); 0 for the other ranks
//     out(r) = max over layers of (rank 0: output bytes of the layer's tensors other than routed
//             experts; others 0) + the routed experts' output bytes * num_experts(r) /
//             n_routed_experts, where on a GPU (not request.device_is_host) a quantized linear's
//             weight_packed and weight_scale each count as the next power of two of their bytes
//             (page-locked copies from the device, rounded by the pinned-memory allocator)
//   scratch(r) = tokens(r) * H * 2 * min(2, checkpoints) (bf16 hidden-state checkpoints: the
//                newest and the next one being written; checkpoints = ChooseCheckpointCadence's
//                over the planned layers, with request.checkpoint_every)
// estimate: gpu/host/scratch = max over ranks; output_bytes = model-level tensors (embeddings,
// model.norm, lm_head) + sum of layer output_bytes; calibration_tokens = samples * S;
// tokens_per_expert = samples * S * num_experts_per_tok / n_routed_experts;
// dispatch_rounds = rounds above (0 without MoE layers); experts_per_pass, dispatch_tokens and
// the *_chosen flags as ChooseSettings made them; expert_passes = ceil(E_max / P) with P =
// experts_per_pass or E_max (0 without MoE layers), E_max = the most experts a rank owns;
// checkpoint_every and
// resume_replay_seconds = ChooseCheckpointCadence's every and resume_seconds for the largest
// rank's tokens and experts.
// Time, per planned layer on the slowest rank (ranks work in parallel):
//   compute = input_bytes / gang / kLoadBytesPerSecond (the first layer; the others, staged, at
//             kStagedLoadBytesPerSecond on a GPU, and not at all with preload: they load while
//             the layer before solves) + tokens(r) * kSecondsPerToken
//             + experts(r) * kSolveSecondsPerExpert (MoE layers)
//   write   = output_bytes / gang / kWriteBytesPerSecond + (the layer's step writes a
//             checkpoint ? tokens(r) * H * 2 / kCheckpointWriteBytesPerSecond : 0)
// A layer's write overlaps the next layer's compute: total_seconds = sum over layers of
// max(compute, write of the layer before) + the last layer's write; seconds_per_layer =
// total_seconds / layers. A projection for one H200 per rank and GPTQ: other cards, methods,
// storage and gang communication change it.
// All sums saturate at INT64_MAX instead of overflowing.
JobPlan PlanJob(const DeepseekV3Config& config, const InspectRequest& request,
                const StoredTensors& stored);

// Settings a request leaves to the plan (experts_per_pass / dispatch_tokens = kChooseSetting)
// are chosen for the device, M = request.device_memory_bytes, within PlanJob:
//   candidates, with E_max the most experts a rank owns and T = samples * S:
//     passes n = 1, 2, ..., E_max, each with P(n) = ceil(E_max / n) experts per pass (the most
//     even split into n passes; n = 1 is written 0 = all), skipping P(n) that give fewer passes;
//     rounds m = 1, 2, ..., samples, each with D(m) = ceil(T / m) tokens per round (m = 1 is
//     written 0 = all);
//     a setting the request gives is the only candidate for it.
//   chosen: the first candidate, in order of fewer passes, then fewer rounds (each pass solves a
//   batch; each round is another exchange), whose gpu_bytes_per_rank <= (1 - kDeviceMemoryMargin)
//   * M. When none fits, the candidate that holds least (most passes, most rounds) and a note
//   naming the estimate and M; with given settings that do not fit, the same note. M = 0: the
//   chosen settings are kFallbackExpertsPerPass and kFallbackDispatchTokens.
//   Without MoE layers neither setting matters: chosen settings are 0 (all).
// The result depends only on the config, the request and the stored sizes (deterministic).

// Rounds in which an MoE layer dispatches the routed rows of `tokens` calibration tokens in
// `sequences` sequences: ceil(tokens / dispatch_tokens), between 1 and `sequences` (a round holds
// whole sequences); 1 when dispatch_tokens <= 0. The plan and the pipeline both count this way.
int64_t DispatchRounds(int64_t tokens, int64_t sequences, int64_t dispatch_tokens);

}  // namespace mq::model
