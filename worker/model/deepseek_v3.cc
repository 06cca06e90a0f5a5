// DeepSeek-V3 forward (see deepseek_v3.h). Every numbered step mirrors a line of transformers'
// modeling_deepseek_v3.py (5.x) so that the two agree op for op in fp32.

#include "worker/model/deepseek_v3.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "worker/model/deepseek_v3_internal.h"
#include "worker/model/plan.h"

namespace mq::model {
namespace {

using internal::GuardTorch;
using internal::StatusException;

constexpr double kPi = 3.14159265358979323846;

// Scores per attention chunk (fp32 elements); bounds the [heads, seq, seq] score tensor.
constexpr int64_t kMaxScoreElements = int64_t{1} << 28;

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// The weight used for linear `name`: the override when there is one, else `loaded`.
at::Tensor WeightFor(const std::string& name, const at::Tensor& loaded, const ForwardHooks& hooks) {
  if (hooks.weight_overrides != nullptr) {
    auto it = hooks.weight_overrides->find(name);
    if (it != hooks.weight_overrides->end()) {
      const at::Tensor& o = it->second;
      if (o.sizes() != loaded.sizes()) {
        throw StatusException(absl::InvalidArgumentError(
            absl::StrCat("weight override \"", name, "\" has shape ", ShapeString(o.sizes()),
                         ", expected ", ShapeString(loaded.sizes()))));
      }
      if (o.device() == loaded.device() && o.scalar_type() == loaded.scalar_type()) return o;
      return o.to(loaded.device(), loaded.scalar_type());
    }
  }
  return loaded;
}

// x2d [tokens, in] -> [tokens, out], with the hook and the override of `name`.
at::Tensor Linear(const std::string& name, const at::Tensor& x2d, const at::Tensor& weight,
                  const ForwardHooks& hooks) {
  if (hooks.on_linear_input) hooks.on_linear_input(name, x2d);
  return at::linear(x2d, WeightFor(name, weight, hooks));
}

// down_proj's input of the MLP on x2d.
at::Tensor MlpActivation(const std::string& prefix, const MlpWeights& mlp, const at::Tensor& x2d,
                         const ForwardHooks& hooks) {
  at::Tensor gate = Linear(prefix + "gate_proj", x2d, mlp.gate_proj, hooks);
  at::Tensor up = Linear(prefix + "up_proj", x2d, mlp.up_proj, hooks);
  return at::silu(gate) * up;
}

at::Tensor RunMlp(const std::string& prefix, const MlpWeights& mlp, const at::Tensor& x2d,
                  const ForwardHooks& hooks) {
  return Linear(prefix + "down_proj", MlpActivation(prefix, mlp, x2d, hooks), mlp.down_proj,
                hooks);
}

// Interleaved-pair rotation (transformers' apply_rotary_pos_emb_interleave): pairs
// (x[2j], x[2j+1]) rotate by angle j; the result is de-interleaved ([rotated evens | rotated
// odds]), which leaves q·k unchanged because q and k use the same order.
at::Tensor ApplyRopeInterleaved(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t d = x.size(-1);
  at::Tensor x1 = x.slice(-1, 0, d, 2);
  at::Tensor x2 = x.slice(-1, 1, d, 2);
  return at::cat({x1 * cos - x2 * sin, x2 * cos + x1 * sin}, -1);
}

// Fused causal attention on CUDA (scaled_dot_product_attention: flash, memory-efficient or
// cuDNN kernels, no materialized scores), one sequence of all heads per call. v is zero-padded to
// q's head width when narrower (DeepSeek-V3: 192 vs 128), which flash kernels require and which
// leaves the first dv output columns exact; the padding is sliced off. Returns an undefined
// tensor when no fused kernel takes these shapes (the caller then runs the eager path, whose
// memory the plan bounds).
at::Tensor AttendFused(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       double scale) {
  const int64_t dq = q.size(3), dv = v.size(3);
  at::Tensor vp = dv < dq ? at::constant_pad_nd(v, {0, dq - dv}) : v;
  constexpr int64_t kMath = 0;  // sdp::SDPBackend::math
  const int64_t backend = at::_fused_sdp_choice(q.narrow(0, 0, 1), k.narrow(0, 0, 1),
                                                vp.narrow(0, 0, 1), {}, 0.0, /*is_causal=*/true,
                                                scale);
  if (backend <= kMath) return at::Tensor();
  // [b, nh, s, dv] laid out as [b, s, nh, dv]: the o_proj input it becomes is then a view.
  at::Tensor out = at::empty({q.size(0), q.size(2), q.size(1), dv}, q.options()).transpose(1, 2);
  for (int64_t i = 0; i < q.size(0); ++i) {
    at::Tensor o = at::scaled_dot_product_attention(q.narrow(0, i, 1), k.narrow(0, i, 1),
                                                    vp.narrow(0, i, 1), {}, 0.0,
                                                    /*is_causal=*/true, scale);
    out.narrow(0, i, 1).copy_(o.narrow(-1, 0, dv));
  }
  return out;
}

// Attention: on CUDA the fused path above; otherwise (and when no fused kernel fits) eager:
// softmax(q·kᵀ·scale + causal mask) in fp32, cast back, times v, as transformers' eager
// attention computes it. q, k [b, nh, s, dq], v [b, nh, s, dv] -> [b, nh, s, dv]. The eager path
// runs per batch row and chunk of heads so that the score tensor stays below kMaxScoreElements.
at::Tensor Attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  if (q.is_cuda() && q.size(0) > 0 && q.size(2) > 0) {
    at::Tensor fused = AttendFused(q, k, v, scale);
    if (fused.defined()) return fused;
  }
  const int64_t b = q.size(0), nh = q.size(1), s = q.size(2), dv = v.size(3);
  at::Tensor out = at::empty({b, nh, s, dv}, q.options());
  at::Tensor masked =
      at::ones({s, s}, at::TensorOptions().dtype(at::kBool).device(q.device())).triu(1);
  const int64_t chunk = std::clamp<int64_t>(kMaxScoreElements / std::max<int64_t>(s * s, 1), 1, nh);
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t h0 = 0; h0 < nh; h0 += chunk) {
      const int64_t n = std::min(chunk, nh - h0);
      at::Tensor qi = q[i].narrow(0, h0, n);
      at::Tensor ki = k[i].narrow(0, h0, n);
      at::Tensor vi = v[i].narrow(0, h0, n);
      at::Tensor scores = at::matmul(qi, ki.transpose(-1, -2)) * scale;
      scores.masked_fill_(masked, -std::numeric_limits<double>::infinity());
      at::Tensor probs = at::softmax(scores, -1, at::kFloat).to(q.scalar_type());
      out[i].narrow(0, h0, n).copy_(at::matmul(probs, vi));
    }
  }
  return out;
}

// cos/sin [B, 1, s, dr/2] in `dtype` for positions [B, s] (transformers'
// DeepseekV3RotaryEmbedding: fp32 angles, times attention_factor, cast to the hidden dtype).
std::pair<at::Tensor, at::Tensor> RopeCosSin(const DeepseekV3Config& config,
                                             const at::Tensor& positions, at::ScalarType dtype) {
  RopeParameters rope = ComputeRopeParameters(config);
  at::Tensor inv_freq = rope.inv_freq.to(positions.device());
  at::Tensor freqs = positions.unsqueeze(-1).to(at::kFloat) * inv_freq;
  at::Tensor cos = (freqs.cos() * rope.attention_factor).to(dtype).unsqueeze(1);
  at::Tensor sin = (freqs.sin() * rope.attention_factor).to(dtype).unsqueeze(1);
  return {cos, sin};
}

double YarnGetMscale(double scale, double mscale) {
  if (scale <= 1) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

// Every linear of a layer that is loaded: module name -> weight.
std::vector<std::pair<std::string, const at::Tensor*>> LayerLinears(const LayerWeights& w) {
  std::vector<std::pair<std::string, const at::Tensor*>> out;
  const std::string attn = w.prefix + "self_attn.";
  auto add = [&](std::string name, const at::Tensor& t) {
    if (t.defined()) out.emplace_back(std::move(name), &t);
  };
  auto add_mlp = [&](const std::string& prefix, const MlpWeights& m) {
    add(prefix + "gate_proj", m.gate_proj);
    add(prefix + "up_proj", m.up_proj);
    add(prefix + "down_proj", m.down_proj);
  };
  add(attn + "q_proj", w.q_proj);
  add(attn + "q_a_proj", w.q_a_proj);
  add(attn + "q_b_proj", w.q_b_proj);
  add(attn + "kv_a_proj_with_mqa", w.kv_a_proj_with_mqa);
  add(attn + "kv_b_proj", w.kv_b_proj);
  add(attn + "o_proj", w.o_proj);
  add_mlp(w.prefix + "mlp.", w.mlp);
  add(w.prefix + "mlp.gate", w.gate);
  for (size_t e = 0; e < w.experts.size(); ++e) {
    add_mlp(absl::StrCat(w.prefix, "mlp.experts.", e, "."), w.experts[e]);
  }
  add_mlp(w.prefix + "mlp.shared_experts.", w.shared_experts);
  return out;
}

absl::Status CheckOverrides(const LayerWeights& w, const ForwardHooks& hooks) {
  if (hooks.weight_overrides == nullptr) return absl::OkStatus();
  std::map<std::string, const at::Tensor*> linears;
  for (auto& [name, t] : LayerLinears(w)) linears.emplace(name, t);
  for (const auto& [name, t] : *hooks.weight_overrides) {
    if (!absl::StartsWith(name, w.prefix)) continue;
    auto it = linears.find(name);
    if (it == linears.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("weight override \"", name, "\": layer ", w.layer,
                       " has no loaded linear of that name (use module names such as \"", w.prefix,
                       "self_attn.o_proj\", without \".weight\")"));
    }
    if (!t.defined() || !at::isFloatingType(t.scalar_type())) {
      return absl::InvalidArgumentError(
          absl::StrCat("weight override \"", name, "\": must be a defined float tensor"));
    }
    if (t.sizes() != it->second->sizes()) {
      return absl::InvalidArgumentError(absl::StrCat("weight override \"", name, "\" has shape ",
                                                     ShapeString(t.sizes()), ", expected ",
                                                     ShapeString(it->second->sizes())));
    }
  }
  return absl::OkStatus();
}

// positions [s] or [b, s] -> int64 [B, s] on `device` (B = 1 or b).
absl::StatusOr<at::Tensor> NormalizePositions(const at::Tensor& positions, int64_t b, int64_t s,
                                              at::Device device) {
  if (!positions.defined() || !at::isIntegralType(positions.scalar_type(), /*includeBool=*/false)) {
    return absl::InvalidArgumentError("positions: must be an integer tensor [seq] or [batch, seq]");
  }
  at::Tensor p = positions;
  if (p.dim() == 1) p = p.unsqueeze(0);
  if (p.dim() != 2 || p.size(1) != s || (p.size(0) != 1 && p.size(0) != b)) {
    return absl::InvalidArgumentError(absl::StrCat("positions has shape ",
                                                   ShapeString(positions.sizes()), ", expected [",
                                                   s, "] or [", b, ", ", s, "]"));
  }
  return p.to(device, at::kLong);
}

absl::Status CheckHidden(const at::Tensor& hidden, int64_t h, at::Device device,
                         at::ScalarType dtype, const char* what) {
  if (!hidden.defined() || hidden.dim() != 3 || hidden.size(2) != h) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " has shape ",
                     hidden.defined() ? ShapeString(hidden.sizes()) : std::string("(undefined)"),
                     ", expected [batch, seq, ", h, "]"));
  }
  if (hidden.device() != device || hidden.scalar_type() != dtype) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " is ", c10::toString(hidden.scalar_type()), " on ", hidden.device().str(),
        ", expected ", c10::toString(dtype), " on ", device.str(), " (the weights')"));
  }
  return absl::OkStatus();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Building blocks.

at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::ScalarType input_dtype = x.scalar_type();
  at::Tensor h = x.to(at::kFloat);
  at::Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(variance + eps);
  return weight * h.to(input_dtype);
}

RopeParameters ComputeRopeParameters(const DeepseekV3Config& config) {
  const int64_t dim = config.qk_rope_head_dim;
  const double base = config.rope_theta;
  const at::TensorOptions f32 = at::TensorOptions().dtype(at::kFloat);
  RopeParameters out;
  if (!config.rope_scaling.has_value()) {
    // inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    out.inv_freq = 1.0 / at::pow(base, at::arange(0, dim, 2, f32) / dim);
    out.attention_factor = 1.0;
    return out;
  }
  const RopeScalingConfig& y = *config.rope_scaling;
  const double factor = y.factor;
  // attention_factor: mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are
  // non-zero, else mscale(factor, 1).
  if (y.mscale != 0 && y.mscale_all_dim != 0) {
    out.attention_factor =
        YarnGetMscale(factor, y.mscale) / YarnGetMscale(factor, y.mscale_all_dim);
  } else {
    out.attention_factor = YarnGetMscale(factor, 1.0);
  }
  const double beta_fast = y.beta_fast != 0 ? y.beta_fast : 32.0;
  const double beta_slow = y.beta_slow != 0 ? y.beta_slow : 1.0;
  const double original = static_cast<double>(y.original_max_position_embeddings);
  auto correction_dim = [&](double rotations) {
    return (static_cast<double>(dim) * std::log(original / (rotations * 2 * kPi))) /
           (2 * std::log(base));
  };
  double low = std::max(std::floor(correction_dim(beta_fast)), 0.0);
  double high = std::min(std::ceil(correction_dim(beta_slow)), static_cast<double>(dim - 1));
  if (low == high) high += 0.001;  // prevent a singular ramp
  at::Tensor pos_freqs = at::pow(base, at::arange(0, dim, 2, f32) / dim);
  at::Tensor inv_freq_extrapolation = 1.0 / pos_freqs;
  at::Tensor inv_freq_interpolation = 1.0 / (factor * pos_freqs);
  at::Tensor ramp = at::clamp((at::arange(dim / 2, f32) - low) / (high - low), 0, 1);
  at::Tensor extrapolation_factor = 1 - ramp;
  out.inv_freq = inv_freq_interpolation * (1 - extrapolation_factor) +
                 inv_freq_extrapolation * extrapolation_factor;
  return out;
}

double SoftmaxScale(const DeepseekV3Config& config) {
  double scale = std::pow(static_cast<double>(config.q_head_dim()), -0.5);
  if (config.rope_scaling.has_value() && config.rope_scaling->mscale_all_dim != 0) {
    const double m =
        YarnGetMscale(config.rope_scaling->factor, config.rope_scaling->mscale_all_dim);
    scale = scale * m * m;
  }
  return scale;
}

// The router's product runs on row blocks of kRouterBlockRows (plan.h; the last one padded with
// zeros), so a token's scores do not depend on how many tokens are routed with it: BLAS
// libraries pick kernels, and with them summation orders, by matrix shape, and a score that
// moved in its last bit could break a near-tie between two experts differently on a rank that
// routes fewer tokens (a gang of 4 against one GPU). See bench/RESULTS.md. The rest of routing
// runs on segments of kRouterSegmentRows rows.
namespace {

Routing RouteSegment(const LayerWeights& w, const at::Tensor& x, const at::Tensor& gate) {
  const DeepseekV3Config& c = w.config;
  std::vector<at::Tensor> blocks;
  for (int64_t r = 0; r < x.size(0); r += kRouterBlockRows) {
    const int64_t n = std::min(kRouterBlockRows, x.size(0) - r);
    at::Tensor rows = x.slice(0, r, r + n).to(at::kFloat);
    if (n < kRouterBlockRows) rows = at::constant_pad_nd(rows, {0, 0, 0, kRouterBlockRows - n});
    blocks.push_back(at::linear(rows, gate).slice(0, 0, n));
  }
  at::Tensor logits = blocks.empty() ? at::linear(x.to(at::kFloat), gate) : at::cat(blocks);
  blocks.clear();
  at::Tensor scores = logits.sigmoid();
  at::Tensor choice = scores + w.e_score_correction_bias;
  const int64_t t = x.size(0);
  const int64_t experts = c.n_routed_experts;
  const int64_t groups = c.n_group;
  const int64_t per_group = experts / groups;
  // Group score = sum of the two largest biased scores of the group; keep topk_group groups.
  at::Tensor group_scores = std::get<0>(choice.view({t, groups, per_group}).topk(2, -1)).sum(-1);
  at::Tensor group_idx =
      std::get<1>(at::topk(group_scores, c.topk_group, -1, /*largest=*/true, /*sorted=*/false));
  at::Tensor group_mask = at::zeros_like(group_scores).scatter_(1, group_idx, 1);
  at::Tensor score_mask =
      group_mask.unsqueeze(-1).expand({t, groups, per_group}).reshape({t, experts});
  choice = choice.masked_fill(score_mask.logical_not(), -std::numeric_limits<double>::infinity());
  Routing r;
  r.topk_indices =
      std::get<1>(at::topk(choice, c.num_experts_per_tok, -1, /*largest=*/true, /*sorted=*/false));
  at::Tensor weights = scores.gather(1, r.topk_indices);
  if (c.norm_topk_prob) weights = weights / (weights.sum(-1, /*keepdim=*/true) + 1e-20);
  r.topk_weights = weights * c.routed_scaling_factor;
  return r;
}

}  // namespace

Routing RouteTokens(const LayerWeights& w, const at::Tensor& x, const ForwardHooks& hooks) {
  const std::string name = w.prefix + "mlp.gate";
  if (hooks.on_linear_input) hooks.on_linear_input(name, x);
  at::Tensor gate = WeightFor(name, w.gate, hooks).to(at::kFloat);  // fp32
  if (x.size(0) <= kRouterSegmentRows) return RouteSegment(w, x, gate);
  std::vector<at::Tensor> indices, weights;
  for (int64_t r = 0; r < x.size(0); r += kRouterSegmentRows) {
    Routing s = RouteSegment(w, x.slice(0, r, std::min(x.size(0), r + kRouterSegmentRows)), gate);
    indices.push_back(std::move(s.topk_indices));
    weights.push_back(std::move(s.topk_weights));
  }
  return Routing{at::cat(indices), at::cat(weights)};
}

at::Tensor RunAttention(const LayerWeights& w, const at::Tensor& x, const at::Tensor& positions,
                        const ForwardHooks& hooks) {
  const DeepseekV3Config& c = w.config;
  const int64_t b = x.size(0), s = x.size(1), h = x.size(2);
  const int64_t nh = c.num_attention_heads;
  const int64_t dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim;
  const int64_t rkv = c.kv_lora_rank;
  const double eps = c.rms_norm_eps;
  const std::string attn = w.prefix + "self_attn.";
  at::Tensor x2 = x.reshape({b * s, h});

  // Queries: q_proj, or q_b_proj(q_a_layernorm(q_a_proj(x))); [b, nh, s, dn + dr].
  at::Tensor q;
  if (c.q_lora_rank > 0) {
    at::Tensor qa = Linear(attn + "q_a_proj", x2, w.q_a_proj, hooks);
    q = Linear(attn + "q_b_proj", RmsNorm(qa, w.q_a_layernorm, eps), w.q_b_proj, hooks);
  } else {
    q = Linear(attn + "q_proj", x2, w.q_proj, hooks);
  }
  q = q.view({b, s, nh, dn + dr}).transpose(1, 2);
  at::Tensor q_rot = q.narrow(-1, dn, dr);

  // Latent kv and the shared rope key.
  at::Tensor compressed = Linear(attn + "kv_a_proj_with_mqa", x2, w.kv_a_proj_with_mqa, hooks);
  at::Tensor kv_nope = RmsNorm(compressed.narrow(-1, 0, rkv), w.kv_a_layernorm, eps);
  at::Tensor k_rot = compressed.narrow(-1, rkv, dr).reshape({b, 1, s, dr});

  auto [cos, sin] = RopeCosSin(c, positions, x.scalar_type());
  // The rotated part is written back into q, which then is the query (no concatenated copy).
  q_rot.copy_(ApplyRopeInterleaved(q_rot, cos, sin));
  k_rot = ApplyRopeInterleaved(k_rot, cos, sin);
  const at::Tensor& query = q;

  at::Tensor kv = Linear(attn + "kv_b_proj", kv_nope.contiguous(), w.kv_b_proj, hooks)
                      .view({b, s, nh, dn + dv})
                      .transpose(1, 2);
  at::Tensor k_nope = kv.narrow(-1, 0, dn);
  at::Tensor value = kv.narrow(-1, dn, dv);
  at::Tensor key = at::cat({k_nope, k_rot.expand({b, nh, s, dr})}, -1);

  at::Tensor out = Attend(query, key, value, SoftmaxScale(c));
  out = out.transpose(1, 2).reshape({b * s, nh * dv});
  return Linear(attn + "o_proj", out, w.o_proj, hooks).view({b, s, h});
}

at::Tensor RunMlpRows(const std::string& prefix, const MlpWeights& mlp, const at::Tensor& x2d,
                      const ForwardHooks& hooks) {
  return RunMlp(prefix, mlp, x2d, hooks);
}

void RunMlpInputs(const std::string& prefix, const MlpWeights& mlp, const at::Tensor& x2d,
                  const ForwardHooks& hooks) {
  const at::Tensor act = MlpActivation(prefix, mlp, x2d, hooks);
  if (hooks.on_linear_input) hooks.on_linear_input(prefix + "down_proj", act);
}

at::Tensor RunMlpBlock(const LayerWeights& w, const at::Tensor& x, const ForwardHooks& hooks) {
  const int64_t b = x.size(0), s = x.size(1), h = x.size(2);
  at::Tensor x2 = x.reshape({b * s, h});
  if (!w.is_moe) return RunMlp(w.prefix + "mlp.", w.mlp, x2, hooks).view({b, s, h});

  const DeepseekV3Config& c = w.config;
  const int64_t k = c.num_experts_per_tok;
  Routing r = RouteTokens(w, x2, hooks);
  // Group (token, slot) pairs by expert, tokens ascending within an expert.
  at::Tensor flat = r.topk_indices.reshape({-1});
  at::Tensor order = at::argsort(flat, /*stable=*/true);
  at::Tensor counts = at::bincount(flat, {}, c.n_routed_experts).cpu();
  at::Tensor tokens = at::floor_divide(order, k);
  at::Tensor slot_weights = r.topk_weights.reshape({-1}).index_select(0, order);
  const int64_t* count = counts.data_ptr<int64_t>();

  at::Tensor out = at::zeros_like(x2);
  int64_t offset = 0;
  for (int64_t e = 0; e < c.n_routed_experts; ++e) {
    const int64_t n = count[e];
    if (n == 0) continue;
    const MlpWeights& expert = w.experts[e];
    if (!expert.defined()) {
      throw StatusException(absl::FailedPreconditionError(
          absl::StrCat("layer ", w.layer, ": ", n, " token(s) routed to expert ", e,
                       ", which was not loaded (LayerLoadOptions expert range)")));
    }
    at::Tensor tok = tokens.narrow(0, offset, n);
    at::Tensor y = RunMlp(absl::StrCat(w.prefix, "mlp.experts.", e, "."), expert,
                          x2.index_select(0, tok), hooks);
    // Weighted in fp32 (the routing weights' dtype), then cast and accumulated.
    y = y * slot_weights.narrow(0, offset, n).unsqueeze(1);
    out.index_add_(0, tok, y.to(out.scalar_type()));
    offset += n;
  }
  if (w.shared_experts.defined()) {
    out = out + RunMlp(w.prefix + "mlp.shared_experts.", w.shared_experts, x2, hooks);
  }
  return out.view({b, s, h});
}

// ---------------------------------------------------------------------------------------------
// Layer and model.

absl::StatusOr<at::Tensor> RunLayer(const LayerWeights& w, const at::Tensor& hidden,
                                    const at::Tensor& positions, const ForwardHooks& hooks) {
  if (auto st = CheckHidden(hidden, w.config.hidden_size, w.device, w.dtype, "hidden"); !st.ok()) {
    return st;
  }
  absl::StatusOr<at::Tensor> pos =
      NormalizePositions(positions, hidden.size(0), hidden.size(1), w.device);
  if (!pos.ok()) return pos.status();
  if (auto st = CheckOverrides(w, hooks); !st.ok()) return st;
  return GuardTorch(absl::StrCat("layer ", w.layer), [&]() -> absl::StatusOr<at::Tensor> {
    const double eps = w.config.rms_norm_eps;
    at::Tensor x = RmsNorm(hidden, w.input_layernorm, eps);
    at::Tensor h = hidden + RunAttention(w, x, *pos, hooks);
    x = RmsNorm(h, w.post_attention_layernorm, eps);
    return h + RunMlpBlock(w, x, hooks);
  });
}

absl::StatusOr<at::Tensor> Embed(const GlobalWeights& g, const at::Tensor& input_ids) {
  if (!input_ids.defined() || input_ids.dim() != 2 ||
      !at::isIntegralType(input_ids.scalar_type(), /*includeBool=*/false)) {
    return absl::InvalidArgumentError(
        "input_ids: must be an integer tensor [batch, seq] (int64 or int32)");
  }
  return GuardTorch("embedding", [&]() -> absl::StatusOr<at::Tensor> {
    at::Tensor ids = input_ids.to(g.device, at::kLong);
    if (ids.numel() > 0) {
      const int64_t lo = ids.min().item<int64_t>();
      const int64_t hi = ids.max().item<int64_t>();
      if (lo < 0 || hi >= g.config.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("input_ids: values must be in [0, ", g.config.vocab_size,
                         ") (vocab_size), found [", lo, ", ", hi, "]"));
      }
    }
    return at::embedding(g.embed_tokens, ids);
  });
}

absl::StatusOr<at::Tensor> FinalNorm(const GlobalWeights& g, const at::Tensor& hidden) {
  if (auto st = CheckHidden(hidden, g.config.hidden_size, g.device, g.dtype, "hidden"); !st.ok()) {
    return st;
  }
  return GuardTorch("final norm", [&]() -> absl::StatusOr<at::Tensor> {
    return RmsNorm(hidden, g.norm, g.config.rms_norm_eps);
  });
}

absl::StatusOr<at::Tensor> LmHead(const GlobalWeights& g, const at::Tensor& normed,
                                  const ForwardHooks& hooks) {
  if (auto st = CheckHidden(normed, g.config.hidden_size, g.device, g.dtype, "normed"); !st.ok()) {
    return st;
  }
  return GuardTorch("lm_head", [&]() -> absl::StatusOr<at::Tensor> {
    const int64_t b = normed.size(0), s = normed.size(1);
    return Linear("lm_head", normed.reshape({b * s, normed.size(2)}), g.lm_head, hooks)
        .view({b, s, g.lm_head.size(0)});
  });
}

absl::StatusOr<ModelOutput> RunModel(CheckpointReader& reader, const DeepseekV3Config& config,
                                     const at::Tensor& input_ids, const RunModelOptions& options) {
  absl::StatusOr<GlobalWeights> globals =
      LoadGlobals(reader, config, options.device, options.dtype);
  if (!globals.ok()) return globals.status();
  absl::StatusOr<at::Tensor> hidden = Embed(*globals, input_ids);
  if (!hidden.ok()) return hidden.status();
  const int64_t seq = input_ids.size(1);
  at::Tensor positions =
      at::arange(seq, at::TensorOptions().dtype(at::kLong).device(options.device)).unsqueeze(0);

  ModelOutput out;
  if (options.keep_hidden_states) out.hidden_states.push_back(*hidden);
  for (int layer = 0; layer < config.num_hidden_layers; ++layer) {
    absl::StatusOr<at::Tensor> next;
    {
      absl::StatusOr<LayerWeights> weights =
          LoadLayer(reader, config, layer, options.device, options.dtype);
      if (!weights.ok()) return weights.status();
      next = RunLayer(*weights, *hidden, positions, options.hooks);
    }  // the layer's weights are released here
    if (!next.ok()) return next.status();
    hidden = *std::move(next);
    if (options.keep_hidden_states && layer + 1 < config.num_hidden_layers) {
      out.hidden_states.push_back(*hidden);
    }
  }
  absl::StatusOr<at::Tensor> normed = FinalNorm(*globals, *hidden);
  if (!normed.ok()) return normed.status();
  if (options.keep_hidden_states) out.hidden_states.push_back(*normed);
  absl::StatusOr<at::Tensor> logits = LmHead(*globals, *normed, options.hooks);
  if (!logits.ok()) return logits.status();
  out.logits = *std::move(logits);
  return out;
}

}  // namespace mq::model
