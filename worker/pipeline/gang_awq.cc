// AWQ's stage of the gang pipeline (gang_runner.h, DESIGN.md §9): per decoder layer, before
// its weights are quantized, choose one scale per smoothing mapping on cached calibration
// inputs and fold it into the layer, so the checkpoint needs no extra step to load.
//
// Mappings (a smoothed module, its balance linears, where the loss is measured):
//   input_layernorm          → q_a_proj (q_proj), kv_a_proj_with_mqa   attention output
//   q_a_layernorm            → q_b_proj                                q_b_proj output
//   kv_a_layernorm           → kv_b_proj                               kv_b_proj output
//   post_attention_layernorm → dense MLP gate_proj, up_proj            MLP output
//   post_attention_layernorm → router + every routed and shared
//                              expert's gate_proj and up_proj (one s)  MoE block output
//   up_proj (each MLP)       → its down_proj                           down_proj output
// A mapping runs when at least one of its balance linears is quantized; the others (the
// router, unquantized linears) are scaled too, exactly, so the function is unchanged up to the
// rounding of the stored tensors. A candidate replaces the quantized balance weights by
// Q(W·s)/s and nothing else, and is judged by the summed squared error of the parent's output
// against the original's. s ≡ 1 is the first candidate, so a mapping keeps the plain RTN
// weights unless a scale does strictly better; then nothing is folded at all.
//
// Inputs are the calibration sequences of an evenly spaced subset (gang-independent: the
// same sequences whatever the gang size) of about max_tokens tokens. Replicated mappings sum
// their statistics and losses over the gang (fp64), so every rank picks the same α; an expert's
// up_proj → down_proj mapping is chosen by its owner from the rows it received, in global
// token order. The MoE loss combines the experts as the block does, with the original
// routing. The folded router and norm are measured against the original routing on the same
// tokens (routing_changed_tokens).
#include <algorithm>
#include <cmath>
#include <functional>

#include "absl/strings/str_cat.h"
#include "worker/pipeline/gang_runner.h"
#include "worker/quant/awq.h"
#include "worker/quant/layer_tools.h"

namespace mq::pipeline::gang_internal {
namespace {

// The dtype the output keeps an unquantized float tensor in (quant::PlainTensor).
constexpr at::ScalarType kStored = at::kBFloat16;

using LossFn = std::function<absl::StatusOr<double>(const at::Tensor& s)>;

struct Choice {
  at::Tensor s;  // undefined: s ≡ 1 kept
  double alpha = -1;
  double loss_identity = 0, loss_chosen = 0;
};

}  // namespace

class AwqSmoother {
 public:
  AwqSmoother(Runner& r, model::LayerWeights& w, const std::set<std::string>& quantized,
              std::map<std::string, at::Tensor>* folded, StepStats* stats)
      : r_(r), w_(w), quantized_(quantized), folded_(folded), stats_(stats) {}

  absl::Status Run() {
    MQ_RETURN_IF_ERROR(Forward());
    MQ_RETURN_IF_ERROR(Attention());
    if (!w_.is_moe) return DenseMlp();
    return Moe();
  }

 private:
  std::string P(const std::string& rest) const { return w_.prefix + rest; }
  bool Quantized(const std::string& m) const { return quantized_.count(m) > 0; }
  bool AnyQuantized(const std::vector<std::string>& ms) const {
    return std::any_of(ms.begin(), ms.end(), [&](const std::string& m) { return Quantized(m); });
  }
  at::Tensor Weight(const std::string& m) const { return quant::WeightOf(w_, m); }
  quant::GridOptions Grid() const { return r_.SolveOptions().grid; }

  // The subset's sequences of every chunk (indices into the chunk's batch), gang-independent:
  // sequence floor(j·n/m) for j = 0..m−1, m the number whose mean length reaches max_tokens.
  std::vector<at::Tensor> SubsetRows() const {
    const int64_t n = static_cast<int64_t>(r_.o_.samples.size());
    int64_t total = 0;
    for (const std::vector<int32_t>& s : r_.o_.samples) total += static_cast<int64_t>(s.size());
    const double mean = static_cast<double>(total) / n;
    const int64_t m = std::clamp<int64_t>(
        static_cast<int64_t>(std::ceil(r_.o_.awq.max_tokens / mean)), 1, n);
    std::vector<bool> in(n, false);
    for (int64_t j = 0; j < m; ++j) in[j * n / m] = true;
    std::vector<at::Tensor> rows;
    int64_t seq = r_.lo_;
    for (const Chunk& c : r_.chunks_) {
      std::vector<int64_t> mine;
      for (int64_t b = 0; b < c.hidden.size(0); ++b, ++seq) {
        if (in[seq]) mine.push_back(b);
      }
      rows.push_back(at::tensor(mine, at::kLong).to(r_.o_.device));
    }
    return rows;
  }

  // The subset through the layer's attention with the original weights: x, attention output,
  // residual and the MoE/MLP input u; inputs of q_b_proj and kv_b_proj kept.
  absl::Status Forward() {
    return Guarded(where(), [&]() -> absl::Status {
      model::ForwardHooks capture;
      capture.on_linear_input = [&](const std::string& m, const at::Tensor& x) {
        if (m == P("self_attn.q_b_proj") || m == P("self_attn.kv_b_proj")) {
          inputs_[m].push_back(x.clone());
        }
      };
      std::vector<at::Tensor> us;
      const std::vector<at::Tensor> rows = SubsetRows();
      for (size_t i = 0; i < r_.chunks_.size(); ++i) {
        if (rows[i].numel() == 0) continue;
        at::Tensor hidden =
            r_.chunks_[i].hidden.index_select(0, rows[i].to(at::kCPU)).to(r_.o_.device);
        at::Tensor pos = r_.Positions(hidden.size(1)).unsqueeze(0);
        at::Tensor x = model::RmsNorm(hidden, w_.input_layernorm, r_.config_.rms_norm_eps);
        at::Tensor attn = model::RunAttention(w_, x, pos, capture);
        at::Tensor h = hidden + attn;
        us.push_back(model::RmsNorm(h, w_.post_attention_layernorm, r_.config_.rms_norm_eps)
                         .reshape({-1, h.size(2)}));
        x_.push_back(x);
        pos_.push_back(pos);
        attn_.push_back(attn);
        h_.push_back(h.reshape({-1, h.size(2)}));
      }
      u_ = Cat(us, r_.config_.hidden_size,
               at::TensorOptions().dtype(r_.o_.dtype).device(r_.o_.device));
      return absl::OkStatus();
    });
  }

  std::string where() const { return absl::StrCat("layer ", w_.layer, " AWQ"); }

  static at::Tensor Cat(const std::vector<at::Tensor>& parts, int64_t columns,
                        const at::TensorOptions& options) {
    return parts.empty() ? at::empty({0, columns}, options) : at::cat(parts, 0);
  }

  // Summed over the gang in fp64 (every rank gets the same values).
  absl::StatusOr<double> GangSum(double v) {
    at::Tensor t = at::full({1}, v, at::kDouble);
    MQ_RETURN_IF_ERROR(r_.gang_.AllReduceSum(t));
    return t.item<double>();
  }

  // The grid search of one mapping. x_sum/rows: Σ|x| per input channel and its row count;
  // w_sum/w_rows: Σ|W|/groupmax over every balance weight's rows (both already gang-wide when
  // the mapping is replicated). rows == 0 keeps s ≡ 1 without evaluating anything.
  absl::StatusOr<Choice> Choose(const at::Tensor& x_sum, int64_t rows, const at::Tensor& w_sum,
                                int64_t w_rows, const LossFn& loss) {
    Choice best;
    if (rows == 0 || w_rows == 0) return best;
    const at::Tensor x_mean = x_sum / static_cast<double>(rows);
    const at::Tensor w_mean = w_sum / static_cast<double>(w_rows);
    double best_loss = 0;
    bool first = true;
    for (double alpha : quant::AwqCandidateAlphas(r_.o_.awq.grid)) {
      const at::Tensor s = quant::AwqScale(x_mean, w_mean, alpha).to(r_.o_.device);
      absl::StatusOr<double> l = Guarded(where(), [&] { return loss(s); });
      if (!l.ok()) return l.status();
      if (first) {
        best.loss_identity = best.loss_chosen = best_loss = *l;
        first = false;
        continue;
      }
      if (std::isfinite(*l) && *l < best_loss) {
        best_loss = *l;
        best.s = s;
        best.alpha = alpha;
        best.loss_chosen = *l;
      }
    }
    return best;
  }

  void Report(const std::string& smooth, int balance, const Choice& c, int64_t rows) {
    AwqMappingInfo info;
    info.smooth = smooth;
    info.balance_layers = balance;
    info.identity_chosen = c.s.defined() ? 0 : 1;
    info.alpha = c.s.defined() ? c.alpha : 0;
    info.loss_identity = c.loss_identity;
    info.loss_chosen = c.loss_chosen;
    info.rows = rows;
    stats_->awq.push_back(info);
  }

  // Replaces module `m`'s tensor by `value`; an unquantized one (every one with
  // awq_fold_only) is also kept, as stored, for the output.
  void Replace(const std::string& m, const at::Tensor& value) {
    *quant::ModuleTensor(w_, m) = value;
    if (!Quantized(m) || r_.o_.awq_fold_only) {
      (*folded_)[m + ".weight"] = value.to(at::kCPU).to(kStored).contiguous();
    }
  }
  // Folds s into a mapping: the smoothed norm (γ / s) or up_proj (rows / s), and the balance
  // linears' columns (× s). Quantized balance weights keep the compute dtype (they are
  // rounded by the quantizer); everything else is rounded as stored.
  void Fold(const std::string& smooth, bool smooth_is_linear,
            const std::vector<std::string>& balance, const at::Tensor& s) {
    const at::Tensor t = *quant::ModuleTensor(w_, smooth);
    const at::ScalarType stored = Quantized(smooth) ? t.scalar_type() : kStored;
    Replace(smooth, smooth_is_linear ? quant::DivideRows(t, s, stored)
                                     : quant::DivideBy(t, s, stored));
    for (const std::string& b : balance) {
      const at::Tensor wb = *quant::ModuleTensor(w_, b);
      if (!wb.defined()) continue;
      Replace(b, quant::ScaleColumns(wb, s, Quantized(b) ? wb.scalar_type() : kStored));
    }
  }

  // Overrides Q(W·s)/s for the quantized members of `balance`. They share s, so their rows are
  // quantized together, up to kBatchElements at a time: one grid search over many experts'
  // weights instead of one per weight (grids are per row, so the result is the same).
  absl::StatusOr<model::WeightOverrides> Candidate(const std::vector<std::string>& balance,
                                                   const at::Tensor& s) const {
    constexpr int64_t kBatchElements = int64_t{1} << 28;
    model::WeightOverrides o;
    std::vector<std::string> batch;
    int64_t elements = 0;
    auto flush = [&]() -> absl::Status {
      if (batch.empty()) return absl::OkStatus();
      std::vector<at::Tensor> ws;
      for (const std::string& b : batch) ws.push_back(Weight(b));
      absl::StatusOr<at::Tensor> q =
          quant::FakeQuantizeScaled(ws.size() == 1 ? ws[0] : at::cat(ws, 0), s, Grid());
      if (!q.ok()) return q.status();
      int64_t row = 0;
      for (size_t i = 0; i < batch.size(); ++i) {
        o[batch[i]] = q->narrow(0, row, ws[i].size(0)).to(r_.o_.device, r_.o_.dtype);
        row += ws[i].size(0);
      }
      batch.clear();
      elements = 0;
      return absl::OkStatus();
    };
    for (const std::string& b : balance) {
      if (!Quantized(b)) continue;
      const int64_t n = Weight(b).numel();
      if (elements > 0 && elements + n > kBatchElements) MQ_RETURN_IF_ERROR(flush());
      batch.push_back(b);
      elements += n;
    }
    MQ_RETURN_IF_ERROR(flush());
    return o;
  }

  // Σ|W|/groupmax over the rows of the balance weights present on this rank.
  at::Tensor WeightSum(const std::vector<std::string>& balance, int64_t in, int64_t* rows) const {
    at::Tensor sum = at::zeros({in}, at::TensorOptions().dtype(at::kDouble).device(r_.o_.device));
    for (const std::string& b : balance) {
      const at::Tensor wb = Weight(b);
      if (!wb.defined()) continue;
      sum += quant::NormalizedWeightColumnSum(wb, r_.o_.format.group_size);
      *rows += wb.size(0);
    }
    return sum;
  }

  // Chooses and folds one mapping whose statistics and loss are summed over the gang.
  // `shared`: balance linears every rank holds (their statistics counted once, on rank 0);
  // `own`: this rank's routed experts' (the MoE mapping); `local_loss`: this rank's part of
  // the loss. Rank 0 reports the mapping with `balance_layers`.
  absl::StatusOr<Choice> GangMapping(
      const std::string& smooth, bool smooth_is_linear, const std::vector<std::string>& shared,
      const std::vector<std::string>& own, const at::Tensor& x2d,
      const std::function<absl::StatusOr<double>(const model::WeightOverrides&)>& local_loss,
      int balance_layers) {
    at::Tensor x_sum = quant::AbsColumnSum(x2d);
    at::Tensor rows = at::full({1}, x2d.size(0), at::kLong);
    int64_t own_rows = 0, shared_rows = 0;
    at::Tensor w_sum = WeightSum(own, x2d.size(1), &own_rows);
    if (r_.gang_.rank() == 0) w_sum = w_sum + WeightSum(shared, x2d.size(1), &shared_rows);
    at::Tensor w_rows = at::full({1}, own_rows + shared_rows, at::kLong);
    MQ_RETURN_IF_ERROR(r_.gang_.AllReduceSum(x_sum));
    MQ_RETURN_IF_ERROR(r_.gang_.AllReduceSum(rows));
    MQ_RETURN_IF_ERROR(r_.gang_.AllReduceSum(w_sum));
    MQ_RETURN_IF_ERROR(r_.gang_.AllReduceSum(w_rows));
    std::vector<std::string> balance = shared;
    balance.insert(balance.end(), own.begin(), own.end());
    absl::StatusOr<Choice> c =
        Choose(x_sum, rows.item<int64_t>(), w_sum, w_rows.item<int64_t>(),
               [&](const at::Tensor& s) -> absl::StatusOr<double> {
                 absl::StatusOr<model::WeightOverrides> o = Candidate(balance, s);
                 if (!o.ok()) return o.status();
                 absl::StatusOr<double> l = local_loss(*o);
                 if (!l.ok()) return l.status();
                 return GangSum(*l);
               });
    if (!c.ok()) return c.status();
    if (c->s.defined()) Fold(smooth, smooth_is_linear, balance, c->s);
    if (r_.gang_.rank() == 0) Report(smooth, balance_layers, *c, rows.item<int64_t>());
    return c;
  }

  // A mapping of replicated linears only, when one of them is quantized.
  absl::Status Replicated(const std::string& smooth, bool smooth_is_linear,
                          const std::vector<std::string>& balance, const at::Tensor& x2d,
                          const std::function<absl::StatusOr<double>(
                              const model::WeightOverrides&)>& local_loss) {
    if (!AnyQuantized(balance)) return absl::OkStatus();
    return GangMapping(smooth, smooth_is_linear, balance, {}, x2d, local_loss,
                       static_cast<int>(balance.size()))
        .status();
  }

  // A linear's own loss Σ(x Wᵀ − x W'ᵀ)² over its captured inputs x [rows, in]: as the
  // quadratic form Σ((W − W') G) ∘ (W − W') with G = xᵀx (fp64) when that is cheaper (more rows
  // than input features), else directly against the reference output computed once.
  std::function<absl::StatusOr<double>(const model::WeightOverrides&)> LinearLoss(
      const std::string& m, const at::Tensor& x2d) const {
    const at::Tensor w = Weight(m);
    if (x2d.size(0) > x2d.size(1)) {
      const at::Tensor xd = x2d.to(at::kDouble);
      const at::Tensor gram = xd.t().mm(xd);
      const at::Tensor wd = w.to(at::kDouble);
      return [m, gram, wd](const model::WeightOverrides& o) -> absl::StatusOr<double> {
        const at::Tensor d = wd - o.at(m).to(at::kDouble);
        return (d.mm(gram) * d).sum().item<double>();
      };
    }
    const at::Tensor ref = at::linear(x2d, w);
    return [m, x2d, ref, w](const model::WeightOverrides& o) -> absl::StatusOr<double> {
      return quant::SquaredError(ref, at::linear(x2d, o.at(m).to(w.scalar_type())));
    };
  }

  absl::Status Attention() {
    const std::string q = r_.config_.q_lora_rank > 0 ? "self_attn.q_a_proj" : "self_attn.q_proj";
    const auto options = at::TensorOptions().dtype(r_.o_.dtype).device(r_.o_.device);
    std::vector<at::Tensor> xs;
    for (const at::Tensor& x : x_) xs.push_back(x.reshape({-1, x.size(2)}));
    const at::Tensor x2d = Cat(xs, r_.config_.hidden_size, options);
    MQ_RETURN_IF_ERROR(Replicated(
        P("input_layernorm"), false, {P(q), P("self_attn.kv_a_proj_with_mqa")}, x2d,
        [&](const model::WeightOverrides& o) -> absl::StatusOr<double> {
          model::ForwardHooks hooks;
          hooks.weight_overrides = &o;
          double sum = 0;
          for (size_t i = 0; i < x_.size(); ++i) {
            sum += quant::SquaredError(attn_[i], model::RunAttention(w_, x_[i], pos_[i], hooks));
          }
          return sum;
        }));
    for (const auto& [norm, linear] :
         {std::pair<std::string, std::string>{"self_attn.q_a_layernorm", "self_attn.q_b_proj"},
          {"self_attn.kv_a_layernorm", "self_attn.kv_b_proj"}}) {
      if (!Weight(P(linear)).defined()) continue;  // no q-LoRA
      const at::Tensor in = Cat(inputs_[P(linear)], Weight(P(linear)).size(1), options);
      MQ_RETURN_IF_ERROR(Replicated(P(norm), false, {P(linear)}, in, LinearLoss(P(linear), in)));
    }
    return absl::OkStatus();
  }

  // A replicated MLP's up_proj → down_proj mapping on its captured down_proj inputs.
  absl::Status UpDown(const std::string& mlp, const at::Tensor& down_in) {
    return Replicated(mlp + "up_proj", true, {mlp + "down_proj"}, down_in,
                      LinearLoss(mlp + "down_proj", down_in));
  }

  absl::Status DenseMlp() {
    const std::string mlp = P("mlp.");
    if (!AnyQuantized({mlp + "gate_proj", mlp + "up_proj", mlp + "down_proj"})) {
      return absl::OkStatus();
    }
    at::Tensor down_in;
    model::ForwardHooks capture;
    capture.on_linear_input = [&](const std::string& m, const at::Tensor& x) {
      if (m == mlp + "down_proj") down_in = x.clone();
    };
    const at::Tensor ref = model::RunMlpRows(mlp, w_.mlp, u_, capture);
    if (!down_in.defined()) down_in = at::empty({0, w_.mlp.down_proj.size(1)}, u_.options());
    MQ_RETURN_IF_ERROR(Replicated(
        P("post_attention_layernorm"), false, {mlp + "gate_proj", mlp + "up_proj"}, u_,
        [&](const model::WeightOverrides& o) -> absl::StatusOr<double> {
          model::ForwardHooks hooks;
          hooks.weight_overrides = &o;
          return quant::SquaredError(ref, model::RunMlpRows(mlp, w_.mlp, u_, hooks));
        }));
    return UpDown(mlp, down_in);
  }

  // The routed part of the MoE block on the subset (this rank's tokens), experts run with
  // `hooks`.
  absl::StatusOr<at::Tensor> Routed(const Dispatch& d, const model::ForwardHooks& hooks) {
    at::Tensor out = at::zeros_like(u_);
    MQ_RETURN_IF_ERROR(
        r_.CombineInto(d, r_.RunExperts(w_, d, hooks, /*want_outputs=*/true), out, 0));
    return out;
  }

  absl::Status Moe() {
    const int first = r_.FirstExpert(r_.gang_.rank()), last = r_.FirstExpert(r_.gang_.rank() + 1);
    const std::string shared = P("mlp.shared_experts.");
    const bool has_shared = w_.shared_experts.defined();
    // Balance linears of the post-attention mapping present on this rank (the router and the
    // shared experts on every rank, counted for the statistics on rank 0 only).
    std::vector<std::string> own_gate_up, replicated_gate_up = {P("mlp.gate")};
    if (has_shared) {
      replicated_gate_up.push_back(shared + "gate_proj");
      replicated_gate_up.push_back(shared + "up_proj");
    }
    for (int e = first; e < last; ++e) {
      own_gate_up.push_back(absl::StrCat(w_.prefix, "mlp.experts.", e, ".gate_proj"));
      own_gate_up.push_back(absl::StrCat(w_.prefix, "mlp.experts.", e, ".up_proj"));
    }
    // Any quantized balance linear anywhere in the gang (the selection is the same on every
    // rank: quantized_ lists every rank's experts).
    bool mapped = AnyQuantized(replicated_gate_up);
    for (int e = 0; e < r_.config_.n_routed_experts && !mapped; ++e) {
      mapped = Quantized(absl::StrCat(w_.prefix, "mlp.experts.", e, ".gate_proj")) ||
               Quantized(absl::StrCat(w_.prefix, "mlp.experts.", e, ".up_proj"));
    }

    // Reference: the original block on the subset, expert and shared down_proj inputs kept.
    MoeInput in;
    in.u = u_;
    model::Routing routing = model::RouteTokens(w_, u_);
    in.topk_indices = routing.topk_indices.to(at::kCPU).contiguous();
    in.topk_weights = routing.topk_weights.to(at::kCPU).contiguous();
    absl::StatusOr<Dispatch> d = r_.DispatchRows(in);
    if (!d.ok()) return d.status();
    std::map<std::string, at::Tensor> down_in;
    model::ForwardHooks capture;
    capture.on_linear_input = [&](const std::string& m, const at::Tensor& x) {
      if (quant::EndsWith(m, ".down_proj")) down_in[m] = x.clone();
    };
    absl::StatusOr<at::Tensor> routed = Guarded(where(), [&] { return Routed(*d, capture); });
    if (!routed.ok()) return routed.status();
    at::Tensor ref = *routed;
    if (has_shared) {
      ref = ref + model::RunMlpRows(shared, w_.shared_experts, u_, capture);
    }

    if (mapped) {
      absl::StatusOr<Choice> c = GangMapping(
          P("post_attention_layernorm"), false, replicated_gate_up, own_gate_up, u_,
          [&](const model::WeightOverrides& o) -> absl::StatusOr<double> {
            model::ForwardHooks hooks;
            hooks.weight_overrides = &o;
            absl::StatusOr<at::Tensor> y = Routed(*d, hooks);
            if (!y.ok()) return y.status();
            at::Tensor out = *y;
            if (has_shared) out = out + model::RunMlpRows(shared, w_.shared_experts, u_, hooks);
            return quant::SquaredError(ref, out);
          },
          static_cast<int>(replicated_gate_up.size()) + 2 * r_.config_.n_routed_experts);
      if (!c.ok()) return c.status();
      const int64_t changed = c->s.defined() ? RoutingChanged(routing.topk_indices) : 0;
      at::Tensor counts = at::tensor(std::vector<int64_t>{changed, u_.size(0)}, at::kLong);
      MQ_RETURN_IF_ERROR(r_.gang_.AllReduceSum(counts));
      if (r_.gang_.rank() == 0) {
        stats_->awq.back().routing_changed_tokens = counts[0].item<int64_t>();
        stats_->awq.back().routing_tokens = counts[1].item<int64_t>();
      }
    }
    // Shared experts' up_proj → down_proj (replicated), then each own expert's (local).
    if (has_shared) {
      auto it = down_in.find(shared + "down_proj");
      const at::Tensor x = it != down_in.end() ? it->second
                                               : at::empty({0, w_.shared_experts.down_proj.size(1)},
                                                           u_.options());
      MQ_RETURN_IF_ERROR(UpDown(shared, x));
    }
    AwqMappingInfo experts;
    experts.smooth = absl::StrCat(w_.prefix, "mlp.experts.*.up_proj");
    experts.balance_layers = 1;
    experts.mappings = 0;
    double alpha_sum = 0;
    for (int e = first; e < last; ++e) {
      const std::string mlp = absl::StrCat(w_.prefix, "mlp.experts.", e, ".");
      if (!Quantized(mlp + "down_proj")) continue;
      ++experts.mappings;
      auto it = down_in.find(mlp + "down_proj");
      if (it == down_in.end()) {  // no calibration row reached it
        ++experts.identity_chosen;
        continue;
      }
      const at::Tensor& x = it->second;
      int64_t w_rows = 0;
      const at::Tensor w_sum = WeightSum({mlp + "down_proj"}, x.size(1), &w_rows);
      const auto loss = LinearLoss(mlp + "down_proj", x);
      absl::StatusOr<Choice> c = Choose(
          quant::AbsColumnSum(x), x.size(0), w_sum, w_rows,
          [&](const at::Tensor& s) -> absl::StatusOr<double> {
            absl::StatusOr<model::WeightOverrides> o = Candidate({mlp + "down_proj"}, s);
            if (!o.ok()) return o.status();
            return loss(*o);
          });
      if (!c.ok()) return c.status();
      experts.loss_identity += c->loss_identity;
      experts.loss_chosen += c->loss_chosen;
      experts.rows += x.size(0);
      if (c->s.defined()) {
        Fold(mlp + "up_proj", true, {mlp + "down_proj"}, c->s);
        alpha_sum += c->alpha;
      } else {
        ++experts.identity_chosen;
      }
    }
    if (experts.mappings > 0) {
      const int chosen = experts.mappings - experts.identity_chosen;
      experts.alpha = chosen > 0 ? alpha_sum / chosen : 0;
      stats_->awq.push_back(experts);
    }
    return absl::OkStatus();
  }

  // Tokens of the subset (this rank's) whose selected expert set differs between the original
  // routing and the folded norm and router as stored.
  int64_t RoutingChanged(const at::Tensor& original) {
    std::vector<at::Tensor> us;
    for (const at::Tensor& h : h_) {
      us.push_back(model::RmsNorm(h, w_.post_attention_layernorm, r_.config_.rms_norm_eps));
    }
    if (us.empty()) return 0;
    const model::Routing folded = model::RouteTokens(w_, at::cat(us, 0));
    const at::Tensor a = std::get<0>(original.sort(-1));
    const at::Tensor b = std::get<0>(folded.topk_indices.to(original.device()).sort(-1));
    return (a != b).any(-1).sum().item<int64_t>();
  }

  Runner& r_;
  model::LayerWeights& w_;
  const std::set<std::string>& quantized_;
  std::map<std::string, at::Tensor>* folded_;
  StepStats* stats_;
  // The subset, per chunk with subset sequences: attention input (normed), positions,
  // attention output, and the residual after attention [tokens, H]; u_ = every chunk's MLP
  // input [tokens, H].
  std::vector<at::Tensor> x_, pos_, attn_, h_;
  at::Tensor u_;
  std::map<std::string, std::vector<at::Tensor>> inputs_;  // q_b_proj / kv_b_proj inputs
};

absl::Status Runner::SmoothLayer(model::LayerWeights& w, const std::set<std::string>& quantized,
                                 std::map<std::string, at::Tensor>* folded, StepStats* stats) {
  AwqSmoother smoother(*this, w, quantized, folded, stats);
  return smoother.Run();
}

absl::Status Runner::UseCommittedTensors(model::LayerWeights& w, const FileSetReader& committed) {
  const std::vector<std::string> quantized = quant::QuantizedLinears(config_, w.layer, o_.format);
  std::vector<std::string> modules = {w.prefix + "input_layernorm",
                                      w.prefix + "post_attention_layernorm",
                                      w.prefix + "self_attn.q_a_layernorm",
                                      w.prefix + "self_attn.kv_a_layernorm", w.prefix + "mlp.gate"};
  for (const std::string& m : quant::LayerLinears(config_, w.layer)) {
    if (std::find(quantized.begin(), quantized.end(), m) == quantized.end()) modules.push_back(m);
  }
  for (const std::string& m : modules) {
    at::Tensor* slot = quant::ModuleTensor(w, m);
    if (slot == nullptr || !slot->defined() || !committed.Has(m + ".weight")) continue;
    absl::StatusOr<model::TensorView> v = committed.Get(m + ".weight");
    if (!v.ok()) return v.status();
    absl::StatusOr<at::Tensor> t = model::FromTensorView(*v);
    if (!t.ok()) return t.status();
    if (t->sizes() != slot->sizes()) {
      return absl::DataLossError(
          absl::StrCat("committed tensor ", m, ".weight has another shape than the model's"));
    }
    *slot = t->to(slot->device(), slot->scalar_type());
  }
  return absl::OkStatus();
}

}  // namespace mq::pipeline::gang_internal
