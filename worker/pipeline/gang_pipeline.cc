#include "worker/pipeline/gang_pipeline.h"

#include "worker/pipeline/gang_runner.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <future>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <utility>
#include <vector>

#include <c10/core/CachingDeviceAllocator.h>

#include "absl/strings/str_cat.h"
#include "common/path_policy.h"
#include "worker/model/checkpoint_reader.h"
#include "worker/model/config.h"
#include "worker/model/deepseek_v3.h"
#include "worker/model/fp8.h"
#include "worker/model/plan.h"
#include "worker/model/safetensors_writer.h"
#include "worker/model/tensor_io.h"
#include "worker/pipeline/moe_combine.h"
#include "worker/quant/gptq_batched.h"
#include "worker/quant/hessian.h"
#include "worker/quant/layer_tools.h"
#include "worker/quant/pack.h"
#include "worker/quant/rtn.h"

namespace mq::pipeline {
namespace gang_internal {
namespace {

// Device bytes of one chunk of rows gathered by CombinePerToken in CombineInto.
constexpr int64_t kCombineChunkBytes = int64_t{256} << 20;

// torch's caching allocator on a CUDA `device` (device-generic API, no CUDA headers); zeros and
// no-ops elsewhere. Peaks count from the last ResetDevicePeaks; retries since the process began.
// Statistics only: an allocator that cannot give them reads as zeros and never fails the step.
struct DeviceMemory {
  int64_t peak_allocated = 0, peak_reserved = 0, retries = 0;
};

void ResetDevicePeaks(const at::Device& device) {
  if (!device.is_cuda()) return;
  try {
    c10::getDeviceAllocator(device.type())->resetPeakStats(device.index());
  } catch (const std::exception&) {
  }
}

DeviceMemory ReadDeviceMemory(const at::Device& device) {
  if (!device.is_cuda()) return {};
  try {
    const c10::CachingDeviceAllocator::DeviceStats s =
        c10::getDeviceAllocator(device.type())->getDeviceStats(device.index());
    constexpr auto kAll = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    return {s.allocated_bytes[kAll].peak, s.reserved_bytes[kAll].peak, s.num_alloc_retries};
  } catch (const std::exception&) {
    return {};
  }
}

}  // namespace

void Runner::StartPrefetch(int layer) {
  if (!o_.prefetch_next_layer) return;
  if (prefetch_.valid()) prefetch_.wait();
  std::vector<std::string> names;
  for (const std::string& n : LayerNames(layer)) {
    if (Owns(n)) names.push_back(n);
  }
  // Get runs on the prefetch thread too: for a staged remote checkpoint it is the fetch.
  prefetch_ = std::async(std::launch::async, [this, names = std::move(names)]() -> int64_t {
    if (Staging()) return staging_.Stage(reader_, names, stop_prefetch_);
    ReadAhead(reader_, names, stop_prefetch_);
    return 0;
  });
}

bool Runner::Staging() const {
  using S = GangPipelineOptions::Staging;
  return o_.prefetch_next_layer && !plan_.preload &&
         (o_.stage_next_layer == S::kOn ||
          (o_.stage_next_layer == S::kAuto && o_.device.is_cuda()));
}

void Runner::StopPrefetch() {
  stop_prefetch_ = true;
  if (prefetch_.valid()) prefetch_.wait();
}

absl::Status Runner::Embed() {
  const int64_t n = static_cast<int64_t>(o_.samples.size()), k = gang_.size();
  in_mtp_ = false;
  lo_ = n * gang_.rank() / k;
  hi_ = n * (gang_.rank() + 1) / k;
  chunks_.clear();
  for (int64_t i = lo_; i < hi_;) {
    const int64_t len = static_cast<int64_t>(o_.samples[i].size());
    int64_t j = i;
    while (j < hi_ && static_cast<int64_t>(o_.samples[j].size()) == len &&
           (j - i + 1) * len <= std::max<int64_t>(o_.max_batch_tokens, len)) {
      ++j;
    }
    at::Tensor ids = at::empty({j - i, len}, at::kLong);
    for (int64_t r = i; r < j; ++r) {
      for (int64_t c = 0; c < len; ++c) ids[r - i][c] = static_cast<int64_t>(o_.samples[r][c]);
    }
    Chunk chunk;
    chunk.ids = ids.to(o_.device);
    chunks_.push_back(std::move(chunk));
    i = j;
  }
  std::vector<at::Tensor> hidden = transfers_.AllocateHost(ChunkShapes(), o_.dtype);
  for (size_t c = 0; c < chunks_.size(); ++c) {
    absl::StatusOr<at::Tensor> e = model::Embed(globals_, chunks_[c].ids);
    if (!e.ok()) return e.status();
    transfers_.DownloadInto(*e, hidden[c]);
    chunks_[c].hidden = hidden[c];
  }
  transfers_.Wait();
  return absl::OkStatus();
}

absl::Status Runner::EnterLayer(int layer) {
  if (layer < config_.num_hidden_layers || in_mtp_) return absl::OkStatus();
  std::vector<at::Tensor> ids, hidden;
  for (const Chunk& c : chunks_) {
    ids.push_back(c.ids);
    hidden.push_back(c.hidden.to(o_.device));
  }
  absl::StatusOr<std::vector<at::Tensor>> in =
      quant::MtpInputs(reader_, config_, globals_, layer, ids, hidden);
  if (!in.ok()) return in.status();
  // The MTP layer sees one token fewer; its ids keep the shifted-in positions for bookkeeping.
  for (Chunk& c : chunks_) c.ids = c.ids.slice(1, 0, c.ids.size(1) - 1);
  hidden = transfers_.AllocateHost(ChunkShapes(), o_.dtype);
  for (size_t i = 0; i < chunks_.size(); ++i) {
    transfers_.DownloadInto((*in)[i].to(o_.dtype), hidden[i]);
    chunks_[i].hidden = hidden[i];
  }
  transfers_.Wait();
  in_mtp_ = true;
  return absl::OkStatus();
}

absl::StatusOr<model::LayerWeights> Runner::Load(int layer) {
  model::LayerLoadOptions lo;
  lo.expert_begin = FirstExpert(gang_.rank());
  lo.expert_end = FirstExpert(gang_.rank() + 1);
  if (!plan_.preload) return model::LoadLayer(reader_, config_, layer, o_.device, o_.dtype, lo);
  auto on_side = [&]() -> absl::StatusOr<model::LayerWeights> {
    absl::StatusOr<model::LayerWeights> w = absl::UnknownError("not run");
    side_.Run([&] { w = model::LoadLayer(reader_, config_, layer, o_.device, o_.dtype, lo); });
    return w;
  };
  return Guarded(absl::StrCat("loading layer ", layer), on_side);
}

void Runner::StartPreload(int layer) {
  if (preload_.valid()) preload_.wait();
  preload_layer_ = layer;
  preload_ = std::async(std::launch::async, [this, layer] { return Load(layer); });
}

absl::StatusOr<model::LayerWeights> Runner::TakeLoaded(int layer, bool* preloaded) {
  *preloaded = false;
  if (!preload_.valid()) return Load(layer);
  absl::StatusOr<model::LayerWeights> w = preload_.get();
  if (preload_layer_ != layer) return Load(layer);  // not the one asked for (not expected)
  *preloaded = w.ok();
  if (w.ok()) return w;
  if (o_.on_warning) {
    o_.on_warning(absl::StrCat("preloading layer ", layer, " failed (", w.status().message(),
                               "): loading it now"));
  }
  return Load(layer);
}

absl::StatusOr<MoeInput> Runner::Attention(const model::LayerWeights& w,
                                           const model::ForwardHooks& hooks) {
  return Guarded(absl::StrCat("layer ", w.layer, " attention"), [&]() -> absl::StatusOr<MoeInput> {
    MoeInput in;
    int64_t tokens = 0;
    for (const Chunk& c : chunks_) tokens += c.hidden.size(0) * c.hidden.size(1);
    in.u = at::empty({tokens, config_.hidden_size},
                     at::TensorOptions().dtype(o_.dtype).device(o_.device));
    int64_t row = 0;
    HostTransfers::Uploads up = transfers_.Upload(HiddenStates());
    in.residual = transfers_.AllocateHost(ChunkShapes(), o_.dtype);
    for (size_t i = 0; i < chunks_.size(); ++i) {
      const at::Tensor& chunk = chunks_[i].hidden;
      const int64_t b = chunk.size(0), s = chunk.size(1), hd = chunk.size(2);
      at::Tensor hidden = up.Next();
      at::Tensor x = model::RmsNorm(hidden, w.input_layernorm, config_.rms_norm_eps);
      at::Tensor h = hidden + model::RunAttention(w, x, Positions(s).unsqueeze(0), hooks);
      in.u.narrow(0, row, b * s)
          .copy_(model::RmsNorm(h, w.post_attention_layernorm, config_.rms_norm_eps)
                     .reshape({b * s, hd}));
      transfers_.DownloadInto(h, in.residual[i]);
      row += b * s;
    }
    model::Routing r = model::RouteTokens(w, in.u, hooks);
    in.topk_indices = r.topk_indices.to(at::kCPU).contiguous();
    in.topk_weights = r.topk_weights.to(at::kCPU).contiguous();
    transfers_.Wait();
    return in;
  });
}

absl::StatusOr<RoutedEntries> Runner::SortEntries(const MoeInput& in, const at::Tensor& tokens) {
  const int64_t e_count = config_.n_routed_experts, k = config_.num_experts_per_tok;
  const int size = gang_.size();
  RoutedEntries r;
  // (token, expert) entries of the selected tokens, token by token.
  at::Tensor flat = in.topk_indices;
  at::Tensor weights = in.topk_weights;
  at::Tensor token_of = at::arange(flat.size(0), at::kLong);
  if (tokens.defined()) {
    flat = flat.index_select(0, tokens);
    weights = weights.index_select(0, tokens);
    token_of = tokens;
  }
  r.experts = flat.reshape({-1}).contiguous();
  weights = weights.reshape({-1});
  token_of = token_of.repeat_interleave(k);
  const at::Tensor counts = at::bincount(r.experts, {}, e_count);
  r.counts.assign(counts.data_ptr<int64_t>(), counts.data_ptr<int64_t>() + e_count);
  r.starts.assign(static_cast<size_t>(e_count), 0);
  for (int64_t e = 1; e < e_count; ++e) r.starts[e] = r.starts[e - 1] + r.counts[e - 1];
  // The entries by expert, in token order within each (a stable counting sort: O(entries)).
  r.order = at::empty({r.experts.size(0)}, at::kLong);
  {
    std::vector<int64_t> next = r.starts;
    const int64_t* fe = r.experts.data_ptr<int64_t>();
    int64_t* o = r.order.data_ptr<int64_t>();
    for (int64_t i = 0; i < r.experts.size(0); ++i) o[next[fe[i]]++] = i;
  }
  r.tokens = token_of.index_select(0, r.order);
  r.weights = weights.index_select(0, r.order);
  // Every rank learns every rank's rows per expert (one row of E counts to each rank), which
  // gives the received rows' layout: by source rank, then expert, then token.
  at::Tensor all_counts = counts.unsqueeze(0).expand({size, e_count}).contiguous();
  absl::StatusOr<at::Tensor> from =
      gang_.AllToAllRows(all_counts, std::vector<int64_t>(size, 1), std::vector<int64_t>(size, 1));
  if (!from.ok()) return from.status();
  r.source_counts = from->cpu().contiguous();  // [size, E]
  return r;
}

absl::StatusOr<Dispatch> Runner::DispatchEntries(const MoeInput& in, const RoutedEntries& r,
                                                 const std::vector<bool>* in_pass) {
  const int64_t e_count = config_.n_routed_experts;
  const int size = gang_.size();
  auto taken = [&](int64_t e) { return in_pass == nullptr || (*in_pass)[e]; };
  Dispatch d;
  at::Tensor send_tokens = r.tokens, send_weights = r.weights;
  if (in_pass) {  // the pass's experts' ranges of the sorted entries, still by expert
    std::vector<at::Tensor> tokens, weights;
    for (int64_t e = 0; e < e_count; ++e) {
      if (!taken(e) || r.counts[e] == 0) continue;
      tokens.push_back(r.tokens.narrow(0, r.starts[e], r.counts[e]));
      weights.push_back(r.weights.narrow(0, r.starts[e], r.counts[e]));
    }
    send_tokens = tokens.empty() ? r.tokens.narrow(0, 0, 0) : at::cat(tokens);
    send_weights = weights.empty() ? r.weights.narrow(0, 0, 0) : at::cat(weights);
  }
  // Both on the compute device from here on (the rows' gather and the combine use them there),
  // copied without waiting for the work queued before them: the host prepares the next round
  // (or pass) while the device runs this one.
  d.send_tokens = ToDeviceQueued(send_tokens);
  d.send_weights = ToDeviceQueued(send_weights);
  d.send_expert_counts.assign(static_cast<size_t>(e_count), 0);
  d.send_counts.assign(size, 0);
  for (int64_t e = 0; e < e_count; ++e) {
    if (!taken(e)) continue;
    d.send_expert_counts[e] = r.counts[e];
    d.send_counts[OwnerOf(e)] += r.counts[e];
  }
  const int64_t* sc = r.source_counts.data_ptr<int64_t>();
  const int first = FirstExpert(gang_.rank()), last = FirstExpert(gang_.rank() + 1);
  d.recv_counts.assign(size, 0);
  d.recv_expert_counts.assign(e_count, 0);
  std::vector<int64_t> start(static_cast<size_t>(size) * e_count, 0);  // of (source, expert)
  int64_t row = 0;
  for (int s = 0; s < size; ++s) {
    for (int e = first; e < last; ++e) {
      if (!taken(e)) continue;
      start[static_cast<size_t>(s) * e_count + e] = row;
      row += sc[s * e_count + e];
      d.recv_counts[s] += sc[s * e_count + e];
      d.recv_expert_counts[e] += sc[s * e_count + e];
    }
  }
  // Received rows ordered by (expert, source, token): each expert's rows in global token order.
  d.recv_order = at::empty({row}, at::kLong);
  int64_t* ro = d.recv_order.data_ptr<int64_t>();
  for (int e = first; e < last; ++e) {
    if (!taken(e)) continue;
    for (int s = 0; s < size; ++s) {
      const int64_t b = start[static_cast<size_t>(s) * e_count + e];
      for (int64_t i = 0; i < sc[s * e_count + e]; ++i) *ro++ = b + i;
    }
  }
  // The rows (the gang moves them to its backend's device).
  at::Tensor rows = in.u.index_select(0, d.send_tokens.to(in.u.device()));
  absl::StatusOr<at::Tensor> recv = gang_.AllToAllRows(rows, d.send_counts, d.recv_counts);
  if (!recv.ok()) return recv.status();
  d.recv_rows = recv->to(o_.device, o_.dtype);
  return d;
}

absl::StatusOr<Dispatch> Runner::DispatchRows(const MoeInput& in, const at::Tensor& tokens) {
  absl::StatusOr<RoutedEntries> r = SortEntries(in, tokens);
  if (!r.ok()) return r.status();
  absl::StatusOr<Dispatch> d = DispatchEntries(in, *r, nullptr);
  if (!d.ok()) return d.status();
  const int64_t k = config_.num_experts_per_tok;
  if (k > 0) {  // every entry of the selected tokens: the combine goes by token
    d->combine_tokens =
        ToDeviceQueued(tokens.defined() ? tokens : at::arange(r->experts.size(0) / k, at::kLong));
    d->combine_entries = ToDeviceQueued(CombineEntries(r->experts, r->order, k));
  }
  return d;
}

std::vector<int64_t> Runner::SequenceRows() const {
  std::vector<int64_t> first_row{0};
  for (const Chunk& c : chunks_) {
    for (int64_t b = 0; b < c.hidden.size(0); ++b) {
      first_row.push_back(first_row.back() + c.hidden.size(1));
    }
  }
  return first_row;
}

std::vector<at::Tensor> Runner::RoundTokens() const {
  const std::vector<int64_t> first_row = SequenceRows();
  std::vector<std::vector<int64_t>> rows(plan_.rounds);
  for (int64_t s = 0; s + 1 < static_cast<int64_t>(first_row.size()); ++s) {
    std::vector<int64_t>& r = rows[(lo_ + s) % plan_.rounds];
    for (int64_t row = first_row[s]; row < first_row[s + 1]; ++row) r.push_back(row);
  }
  std::vector<at::Tensor> out;
  for (std::vector<int64_t>& r : rows) {
    out.push_back(at::tensor(r, at::kLong));
  }
  return out;
}

std::vector<std::pair<int64_t, int64_t>> Runner::RoundRanges() const {
  const std::vector<int64_t> first_row = SequenceRows();
  const int64_t n = hi_ - lo_, rounds = plan_.rounds;
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t r = 0; r < rounds; ++r) {
    const int64_t a = first_row[r * n / rounds], b = first_row[(r + 1) * n / rounds];
    out.emplace_back(a, b - a);
  }
  return out;
}

std::vector<bool> Runner::PassExperts(int p) const {
  std::vector<bool> in(config_.n_routed_experts);
  for (int e = 0; e < config_.n_routed_experts; ++e) {
    in[e] = (e - FirstExpert(OwnerOf(e))) / plan_.per_pass == p;
  }
  return in;
}

absl::Status Runner::AgreeDispatchPlan() {
  at::Tensor settings = at::tensor(
      std::vector<int64_t>{o_.max_experts_per_pass, o_.max_dispatch_tokens, o_.preload_next_layer},
      at::kLong);
  MQ_RETURN_IF_ERROR(gang_.Broadcast(settings, 0));
  const int64_t per_pass = settings[0].item<int64_t>(), dispatch_tokens = settings[1].item<int64_t>();
  plan_.preload = settings[2].item<int64_t>() != 0;
  const int64_t e = config_.n_routed_experts, k = gang_.size();
  const int64_t most_own = (e + k - 1) / k;  // experts of the largest range
  const int64_t whole = std::max<int64_t>(1, most_own);
  plan_.per_pass = static_cast<int>(per_pass > 0 ? std::min(per_pass, whole) : whole);
  plan_.passes = static_cast<int>((most_own + plan_.per_pass - 1) / plan_.per_pass);
  int64_t total = 0;
  for (const std::vector<int32_t>& s : o_.samples) total += static_cast<int64_t>(s.size());
  plan_.rounds = model::DispatchRounds(total, static_cast<int64_t>(o_.samples.size()),
                                       dispatch_tokens);
  return absl::OkStatus();
}

at::Tensor Runner::RunExperts(const model::LayerWeights& w, const Dispatch& d,
                              const model::ForwardHooks& hooks, bool want_outputs, int first,
                              int last, bool in_place) {
  at::Tensor out;
  if (want_outputs) out = in_place ? d.recv_rows : at::empty_like(d.recv_rows);
  at::Tensor order = ToDeviceQueued(d.recv_order);
  // An expert's received rows are ascending positions (by source, then token); when they are
  // one run of consecutive rows (always in a gang of one), the expert reads and writes that
  // slice in place instead of gathering and scattering.
  const int64_t* ro = d.recv_order.data_ptr<int64_t>();
  int64_t offset = 0;
  for (int64_t e = 0; e < config_.n_routed_experts; ++e) {
    const int64_t n = d.recv_expert_counts[e];
    if (n == 0) continue;
    if (e < first || e >= last) {
      offset += n;
      continue;
    }
    const bool run = ro[offset + n - 1] - ro[offset] == n - 1;
    at::Tensor idx = order.narrow(0, offset, n);
    const std::string prefix = absl::StrCat(w.prefix, "mlp.experts.", e, ".");
    at::Tensor rows = run ? d.recv_rows.narrow(0, ro[offset], n) : d.recv_rows.index_select(0, idx);
    if (want_outputs) {
      at::Tensor y = model::RunMlpRows(prefix, w.experts[e], rows, hooks);
      if (run) {
        out.narrow(0, ro[offset], n).copy_(y);
      } else {
        out.index_copy_(0, idx, y);
      }
    } else {  // Hessians only: no down_proj product
      model::RunMlpInputs(prefix, w.experts[e], rows, hooks);
    }
    offset += n;
  }
  return out;
}

absl::Status Runner::CombineInto(const Dispatch& d, const at::Tensor& expert_out, at::Tensor& out,
                                 int64_t first_row) {
  absl::StatusOr<at::Tensor> back =
      gang_.AllToAllRows(expert_out, d.recv_counts, d.send_counts);
  if (!back.ok()) return back.status();
  // As the single-process MoE block: each expert's outputs (compute dtype) weighted in fp32,
  // cast, accumulated in ascending expert order (a token's experts all come in one dispatch).
  at::Tensor y_all = back->to(o_.device, o_.dtype);
  if (d.combine_entries.defined() && y_all.scalar_type() == out.scalar_type()) {
    const at::Tensor tokens = first_row == 0 ? d.combine_tokens : d.combine_tokens - first_row;
    CombinePerToken(y_all, d.send_weights, tokens, d.combine_entries, out, kCombineChunkBytes);
  } else {
    const at::Tensor tokens = first_row == 0 ? d.send_tokens : d.send_tokens - first_row;
    CombinePerExpert(y_all, d.send_weights, tokens, d.send_expert_counts, out);
  }
  return absl::OkStatus();
}

void Runner::FinishRows(const model::LayerWeights& w, const MoeInput& in, const at::Tensor& out,
                        int64_t first_row, const std::vector<at::Tensor>& next,
                        const model::ForwardHooks& hooks) {
  // The chunks' pieces inside the rows: whole sequences, so each piece is a range of a chunk's
  // sequences, consecutive in its host tensors.
  const int64_t last_row = first_row + out.size(0);
  std::vector<at::Tensor> residual, into;
  std::vector<int64_t> piece_row;
  int64_t row = 0;
  for (size_t i = 0; i < in.residual.size(); ++i) {
    const at::Tensor& h = in.residual[i];
    const int64_t len = h.size(1), lo = std::max(row, first_row);
    const int64_t hi = std::min(row + h.size(0) * len, last_row);
    if (lo < hi) {
      residual.push_back(h.narrow(0, (lo - row) / len, (hi - lo) / len));
      into.push_back(next[i].narrow(0, (lo - row) / len, (hi - lo) / len));
      piece_row.push_back(lo);
    }
    row += h.size(0) * len;
  }
  HostTransfers::Uploads up = transfers_.Upload(residual);
  for (size_t j = 0; j < residual.size(); ++j) {
    const int64_t t = residual[j].size(0) * residual[j].size(1);
    at::Tensor y = out.narrow(0, piece_row[j] - first_row, t);
    if (w.shared_experts.defined()) {
      y = y + model::RunMlpRows(w.prefix + "mlp.shared_experts.", w.shared_experts,
                                in.u.narrow(0, piece_row[j], t), hooks);
    }
    transfers_.DownloadInto(up.Next() + y.view(residual[j].sizes()), into[j]);
  }
}

absl::StatusOr<std::vector<at::Tensor>> Runner::Propagate(const model::LayerWeights& w,
                                                          const model::WeightOverrides& overrides,
                                                          const MoeInput* cached_in,
                                                          const Dispatch* cached_d) {
  model::ForwardHooks hooks;
  hooks.weight_overrides = &overrides;
  std::vector<at::Tensor> next = transfers_.AllocateHost(ChunkShapes(), o_.dtype);
  if (!w.is_moe) {
    HostTransfers::Uploads up = transfers_.Upload(HiddenStates());
    for (size_t i = 0; i < chunks_.size(); ++i) {
      absl::StatusOr<at::Tensor> y =
          model::RunLayer(w, up.Next(), Positions(chunks_[i].hidden.size(1)), hooks);
      if (!y.ok()) return y.status();
      transfers_.DownloadInto(*y, next[i]);
    }
    transfers_.Wait();
    return next;
  }
  MoeInput fresh_in;
  if (!cached_in) {
    absl::StatusOr<MoeInput> attended = Attention(w, hooks);
    if (!attended.ok()) return attended.status();
    fresh_in = *std::move(attended);
    cached_in = &fresh_in;
  }
  const std::string where = absl::StrCat("layer ", w.layer, " experts");
  // One dispatch round at a time: its routed output (rows [first, first + rows) of in.u, the
  // round's tokens) is combined, finished and sent to the host before the next round, so the
  // device holds one round's output, not all the tokens'.
  auto round_into_next = [&](const Dispatch& d, int64_t first, int64_t rows) {
    return Guarded(where, [&]() -> absl::Status {
      at::Tensor out = at::zeros({rows, cached_in->u.size(1)}, cached_in->u.options());
      // The experts' outputs replace their rows: the round's rows are not used again.
      at::Tensor y = RunExperts(w, d, hooks, /*want_outputs=*/true, 0,
                                std::numeric_limits<int>::max(), /*in_place=*/true);
      MQ_RETURN_IF_ERROR(CombineInto(d, y, out, first));
      FinishRows(w, *cached_in, out, first, next, hooks);
      return absl::OkStatus();
    });
  };
  if (cached_d) {
    MQ_RETURN_IF_ERROR(round_into_next(*cached_d, 0, cached_in->u.size(0)));
  } else {
    for (const auto& [first, rows] : RoundRanges()) {
      absl::StatusOr<Dispatch> d =
          DispatchRows(*cached_in, at::arange(first, first + rows, at::kLong));
      if (!d.ok()) return d.status();
      MQ_RETURN_IF_ERROR(round_into_next(*d, first, rows));
    }
  }
  transfers_.Wait();
  return next;
}

absl::StatusOr<std::vector<GptqResult>> Runner::Solve(const std::vector<at::Tensor>& ws,
                                                      const HessianAccumulator* acc,
                                                      bool force_rtn, at::Tensor* h_out) {
  const int64_t tokens = acc ? acc->tokens() : 0;
  const quant::GptqOptions gptq = SolveOptions();
  if (tokens > 0) {
    absl::StatusOr<at::Tensor> h = acc->Finalize();
    if (!h.ok()) return h.status();
    *h_out = *std::move(h);
  }
  if (quant::UsesHessians(o_.method) && tokens > 0 && !force_rtn) {
    return quant::QuantizeGptqShared(ws, *h_out, gptq);
  }
  std::vector<GptqResult> results;
  for (const at::Tensor& w : ws) {
    absl::StatusOr<quant::QuantizedWeight> q = quant::QuantizeRtn(w, gptq.grid);
    if (!q.ok()) return q.status();
    GptqResult r;
    r.weight = *std::move(q);
    if (quant::UsesHessians(o_.method)) {
      r.fallback = quant::Fallback::kRtn;
      r.fallback_reason = force_rtn ? "rare expert: RTN requested (rare_expert_rtn)"
                                    : "no calibration tokens reached this linear";
    }
    results.push_back(std::move(r));
  }
  return results;
}

absl::StatusOr<StepWrite> Runner::QuantizeStep(int step, int layer) {
  StepWrite result;
  StepOutput& out = result.out;
  out.step = step;
  out.layer = layer;
  StepStats& st = out.stats;
  const std::string where = absl::StrCat("layer ", layer, " (step ", step + 1, "/",
                                         o_.total_steps, ")");
  Clock::time_point t = Clock::now();
  const double exchange0 = gang_.exchange_seconds();
  ResetDevicePeaks(o_.device);
  const int64_t retries0 = ReadDeviceMemory(o_.device).retries;
  Progress(where + ": loading", 0);
  marks_.Begin("mq::load");
  MQ_RETURN_IF_ERROR(EnterLayer(layer));
  // A staging prefetch is finished first: the load then reads every staged copy, none of the
  // same bytes from the checkpoint again.
  if (Staging() && prefetch_.valid()) prefetch_.wait();
  absl::StatusOr<model::LayerWeights> loaded = TakeLoaded(layer, &st.preloaded);
  if (!loaded.ok()) return loaded.status();
  model::LayerWeights& w = *loaded;
  SyncDevice(o_.device);
  st.load_seconds = Since(t);
  // The layer is on the device: its checkpoint pages leave the resident set now, not after its
  // write (which maps again only the few tensors it writes unquantized). The prefetch that read
  // them ahead is finished first, so that it cannot map them back. Its staged copies are no
  // longer read (the device copies are complete), so the next layer's may take their memory.
  const int64_t staged = prefetch_.valid() ? prefetch_.get() : 0;
  if (Staging()) {
    st.staged_bytes = staged;
    staging_.Unstage(reader_);
  }
  ReleaseLayerPages(layer);
  // The next layer's bytes come from storage while this one computes.
  if (step + 1 < static_cast<int>(layers_.size())) StartPrefetch(layers_[step + 1]);

  // What is quantized, split into replicated groups (every rank) and own expert groups.
  std::vector<std::string> quantized = quant::QuantizedLinears(config_, layer, o_.format);
  // AWQ first: its scales are folded into `w`, and everything below quantizes the folded layer
  // (RTN of W·s, or GPTQ with the Hessians of the smoothed inputs).
  std::map<std::string, at::Tensor> folded;
  double awq_seconds = 0;
  if (quant::UsesAwq(o_.method)) {
    t = Clock::now();
    Progress(where + ": AWQ scale search", 0.05);
    marks_.Begin("mq::awq");
    MQ_RETURN_IF_ERROR(
        SmoothLayer(w, std::set<std::string>(quantized.begin(), quantized.end()), &folded, &st));
    SyncDevice(o_.device);
    awq_seconds = Since(t);
    MQ_RETURN_IF_ERROR(CheckCancelled());
    if (o_.awq_fold_only) quantized.clear();  // every tensor written as folded, unquantized
  }
  std::vector<std::string> replicated, own_experts;
  for (const std::string& m : quantized) {
    int e = 0;
    if (!model::RoutedExpertOf(m, &e)) {
      replicated.push_back(m);
    } else if (OwnerOf(e) == gang_.rank()) {
      own_experts.push_back(m);
    }
  }
  const std::vector<HessianGroup> rep_groups = quant::GroupLinears(replicated);
  const std::vector<HessianGroup> exp_groups = quant::GroupLinears(own_experts);
  // RTN rounds each weight on its own: no Hessians, no calibration forward for them.
  const bool rtn = !quant::UsesHessians(o_.method);
  std::map<std::string, std::unique_ptr<HessianAccumulator>> acc;
  for (const HessianGroup& g : rtn ? std::vector<HessianGroup>() : rep_groups) {
    acc[g.members[0]] =
        std::make_unique<HessianAccumulator>(quant::WeightOf(w, g.members[0]).size(1), o_.device);
  }
  absl::Status hook_status;
  double hessian_seconds = 0;
  model::ForwardHooks collect;
  collect.on_linear_input = [&](const std::string& linear, const at::Tensor& x) {
    auto it = acc.find(linear);
    if (it == acc.end() || !hook_status.ok()) return;
    const Clock::time_point h0 = Clock::now();
    absl::Status a = it->second->Add(x);
    hessian_seconds += Since(h0);
    if (!a.ok()) hook_status = a;
  };

  // Pass 1: original weights; Hessians.
  t = Clock::now();
  Progress(where + ": calibration forward", 0.1);
  marks_.Begin("mq::forward");
  MoeInput moe_in;
  Dispatch dispatch;
  std::vector<int64_t> gang_counts;
  if (w.is_moe) {
    absl::StatusOr<MoeInput> attended = Attention(w, collect);
    if (!attended.ok()) return attended.status();
    moe_in = *std::move(attended);
    if (plan_.rounds == 1) {  // one dispatch, kept for every pass (and the propagation)
      absl::StatusOr<Dispatch> dispatched = DispatchRows(moe_in);
      if (!dispatched.ok()) return dispatched.status();
      dispatch = *std::move(dispatched);
    }
    at::Tensor counts =
        at::bincount(moe_in.topk_indices.reshape({-1}), {}, config_.n_routed_experts);
    MQ_RETURN_IF_ERROR(gang_.AllReduceSum(counts));
    gang_counts.assign(counts.data_ptr<int64_t>(), counts.data_ptr<int64_t>() + counts.numel());
    std::vector<int64_t> sorted = gang_counts;
    std::sort(sorted.begin(), sorted.end());
    st.expert_tokens_min = sorted.front();
    st.expert_tokens_max = sorted.back();
    st.expert_tokens_median = sorted[sorted.size() / 2];
    st.dispatch_rounds = static_cast<int>(plan_.rounds);
    st.expert_passes = plan_.passes;
    // The shared experts' inputs, only where one of their linears is quantized (all-linear
    // targets): with routed experts only, the pass would feed no accumulator.
    const std::string shared = w.prefix + "mlp.shared_experts.";
    const auto first_shared = acc.lower_bound(shared);
    const bool shared_hessians =
        first_shared != acc.end() && first_shared->first.rfind(shared, 0) == 0;
    absl::Status s = Guarded(where + " shared experts", [&]() -> absl::Status {
      if (w.shared_experts.defined() && shared_hessians) {
        RunRowBlocks(shared, w.shared_experts, moe_in.u, collect);
      }
      return absl::OkStatus();
    });
    MQ_RETURN_IF_ERROR(s);
  } else if (!rep_groups.empty() && !rtn) {
    HostTransfers::Uploads up = transfers_.Upload(HiddenStates());
    for (const Chunk& c : chunks_) {
      absl::StatusOr<at::Tensor> y =
          model::RunLayer(w, up.Next(), Positions(c.hidden.size(1)), collect);
      if (!y.ok()) return y.status();
    }
  }
  MQ_RETURN_IF_ERROR(hook_status);
  // Rare experts (gang-wide count below the threshold): topped up with this rank's own tokens
  // (outputs dropped) when their Hessians are accumulated, or RTN.
  std::set<int> rare_experts;
  if (w.is_moe && o_.min_expert_tokens > 0) {
    for (const HessianGroup& g : exp_groups) {
      int e = 0;
      model::RoutedExpertOf(g.members[0], &e);
      if (gang_counts[e] >= o_.min_expert_tokens || rare_experts.count(e)) continue;
      rare_experts.insert(e);
      st.rare.push_back({e, gang_counts[e], o_.rare_expert_rtn || rtn ? "rtn" : "topped_up"});
    }
  }
  // Replicated Hessians: summed over the gang.
  for (const HessianGroup& g : rtn ? std::vector<HessianGroup>() : rep_groups) {
    HessianAccumulator& a = *acc[g.members[0]];
    const Clock::time_point h0 = Clock::now();
    at::Tensor sum = a.sum().clone();
    at::Tensor tokens = at::full({1}, a.tokens(), at::kLong);
    MQ_RETURN_IF_ERROR(gang_.AllReduceSum(sum));
    MQ_RETURN_IF_ERROR(gang_.AllReduceSum(tokens));
    auto merged = std::make_unique<HessianAccumulator>(a.in_features(), o_.device);
    MQ_RETURN_IF_ERROR(merged->MergeSum(sum.to(o_.device), tokens.item<int64_t>()));
    acc[g.members[0]] = std::move(merged);
    hessian_seconds += Since(h0);
  }
  SyncDevice(o_.device);
  st.hessian_seconds = hessian_seconds;
  st.forward_seconds = Since(t) - hessian_seconds;
  const double st_hessian_before_solve = hessian_seconds;
  MQ_RETURN_IF_ERROR(CheckCancelled());
  // The next layer's weights load beside the expert passes, the solve and the propagation (the
  // device was just synchronized: the previous layer's freed weights are no longer used).
  if (plan_.preload && step + 1 < static_cast<int>(layers_.size())) {
    StartPreload(layers_[step + 1]);
  }

  // Solve: own experts, and replicated groups round-robin; replicated results broadcast.
  t = Clock::now();
  Progress(where + (rtn ? ": rounding (RTN)" : ": solving"), 0.4);
  marks_.Begin("mq::solve");
  std::vector<model::TensorData>& tensors = result.tensors;
  std::set<std::string> written_quantized;
  model::WeightOverrides overrides;
  // Each solved linear's error traces (HessianErrorTraces), queued on the device and read once
  // at the end of the stage: no host sync per linear.
  std::vector<at::Tensor> error_traces;
  // Stats, packed tensors and the propagation override of one solved group. The packed tensors'
  // copies to the host are queued too (SyncDevice at the end of the stage completes them).
  auto record = [&](const HessianGroup& g, const std::vector<at::Tensor>& ws,
                    const std::vector<GptqResult>& results, const at::Tensor& h) -> absl::Status {
    for (size_t i = 0; i < g.members.size(); ++i) {
      const GptqResult& r = results[i];
      ++st.quantized_linears;
      if (r.fallback != quant::Fallback::kNone) ++st.fallbacks;
      if (h.defined()) {
        absl::StatusOr<at::Tensor> traces =
            quant::HessianErrorTraces(ws[i], r.weight.dequantized, h, kErrorStatRows);
        if (!traces.ok()) return traces.status();
        error_traces.push_back(*std::move(traces));
      }
      absl::StatusOr<quant::PackedWeight> packed = quant::PackWeight(r.weight);
      if (!packed.ok()) return packed.status();
      const std::string& m = g.members[i];
      tensors.push_back(
          model::ToTensorDataView(m + ".weight_packed", ToHostQueued(packed->weight_packed)));
      tensors.push_back(
          model::ToTensorDataView(m + ".weight_scale", ToHostQueued(packed->weight_scale)));
      tensors.push_back(model::ToTensorData(m + ".weight_shape", packed->weight_shape));
      written_quantized.insert(m);
      // On the GPU the dequantized weight replaces the original in place (nothing reads the
      // original after its solve), so a layer holds one copy of its experts instead of two.
      at::Tensor original = ws[i];
      if (original.is_cuda() && original.device() == o_.device &&
          original.scalar_type() == o_.dtype) {
        original.copy_(r.weight.dequantized);
        overrides[m] = original;
      } else {
        overrides[m] = r.weight.dequantized.to(o_.device, o_.dtype);
      }
    }
    return absl::OkStatus();
  };
  auto solve_group = [&](const HessianGroup& g, bool force_rtn) -> absl::Status {
    std::vector<at::Tensor> ws;
    for (const std::string& m : g.members) ws.push_back(quant::WeightOf(w, m));
    at::Tensor h;
    absl::StatusOr<std::vector<GptqResult>> results =
        Solve(ws, acc[g.members[0]].get(), force_rtn, &h);
    if (!results.ok()) return results.status();
    return record(g, ws, *results, h);
  };
  // Own experts, in passes of at most plan_.per_pass experts (bounding the Hessians held at
  // once): accumulate from the dispatched rows, then one batched solve per pass. With several
  // dispatch rounds every rank takes part in every pass's rounds, own experts in it or not.
  const int first_own = FirstExpert(gang_.rank()), last_own = FirstExpert(gang_.rank() + 1);
  const std::vector<at::Tensor> rounds =
      w.is_moe && plan_.rounds > 1 ? RoundTokens() : std::vector<at::Tensor>();
  std::vector<RoutedEntries> round_entries;  // of `rounds`, made by the first pass that dispatches
  double solve_only = 0;
  for (int p = 0; p < plan_.passes; ++p) {
    const int p0 = std::min(last_own, first_own + p * plan_.per_pass);
    const int p1 = std::min(last_own, p0 + plan_.per_pass);
    std::vector<const HessianGroup*> pass;
    for (const HessianGroup& g : exp_groups) {
      int e = 0;
      model::RoutedExpertOf(g.members[0], &e);
      if (e < p0 || e >= p1) continue;
      pass.push_back(&g);
      if (rtn) continue;
      acc[g.members[0]] = std::make_unique<HessianAccumulator>(
          quant::WeightOf(w, g.members[0]).size(1), o_.device);
    }
    if (rtn) {  // every rank skips the experts' calibration rows alike (no collectives)
      const Clock::time_point s0 = Clock::now();
      for (const HessianGroup* g : pass) MQ_RETURN_IF_ERROR(solve_group(*g, false));
      solve_only += Since(s0);
      continue;
    }
    if (pass.empty() && rounds.empty()) continue;
    const std::vector<bool> in_pass = rounds.empty() ? std::vector<bool>() : PassExperts(p);
    marks_.Begin("mq::expert_hessians");
    absl::Status s = Guarded(where + " experts", [&]() -> absl::Status {
      if (rounds.empty()) {
        RunExperts(w, dispatch, collect, /*want_outputs=*/false, p0, p1);
      }
      // Each round's entries are sorted by expert once a layer; a pass sends its experts' ranges.
      if (round_entries.empty()) {
        for (const at::Tensor& round : rounds) {
          absl::StatusOr<RoutedEntries> r = SortEntries(moe_in, round);
          if (!r.ok()) return r.status();
          r->experts = r->order = at::Tensor();  // only a combine needs them
          round_entries.push_back(*std::move(r));
        }
      }
      for (const RoutedEntries& entries : round_entries) {
        absl::StatusOr<Dispatch> d = DispatchEntries(moe_in, entries, &in_pass);
        if (!d.ok()) return d.status();
        RunExperts(w, *d, collect, /*want_outputs=*/false, p0, p1);
      }
      if (o_.rare_expert_rtn || moe_in.u.size(0) == 0) return absl::OkStatus();
      for (int e : rare_experts) {
        if (e < p0 || e >= p1) continue;
        RunRowBlocks(absl::StrCat(w.prefix, "mlp.experts.", e, "."), w.experts[e], moe_in.u,
                     collect);
      }
      return absl::OkStatus();
    });
    MQ_RETURN_IF_ERROR(s);
    MQ_RETURN_IF_ERROR(hook_status);
    // Every row routed to an own expert anywhere in the gang reached its Hessians exactly once.
    for (const HessianGroup* g : pass) {
      int e = 0;
      model::RoutedExpertOf(g->members[0], &e);
      const int64_t expected =
          gang_counts[e] + (rare_experts.count(e) && !o_.rare_expert_rtn ? moe_in.u.size(0) : 0);
      if (acc[g->members[0]]->tokens() != expected) {
        return absl::InternalError(absl::StrCat(
            where, ": the Hessian of ", g->members[0], " accumulated ",
            acc[g->members[0]]->tokens(), " rows, but ", expected,
            " were routed to it (dispatch rounds ", plan_.rounds, ", pass ", p, ")"));
      }
    }
    const Clock::time_point s0 = Clock::now();
    marks_.Begin("mq::expert_solve");
    // GPTQ groups with tokens go to one batched solve; the rest (RTN) one by one.
    std::vector<const HessianGroup*> batched;
    std::vector<at::Tensor> ws, hs;
    std::vector<int64_t> hessian_of;
    for (const HessianGroup* g : pass) {
      int e = 0;
      model::RoutedExpertOf(g->members[0], &e);
      const bool rtn = o_.rare_expert_rtn && rare_experts.count(e);
      const HessianAccumulator* a = acc[g->members[0]].get();
      if (!quant::UsesHessians(o_.method) || rtn || a->tokens() == 0) {
        MQ_RETURN_IF_ERROR(solve_group(*g, rtn));
        continue;
      }
      absl::StatusOr<at::Tensor> h = a->Finalize();
      if (!h.ok()) return h.status();
      hs.push_back(*std::move(h));
      for (const std::string& m : g->members) {
        ws.push_back(quant::WeightOf(w, m));
        hessian_of.push_back(static_cast<int64_t>(hs.size()) - 1);
      }
      batched.push_back(g);
    }
    if (!batched.empty()) {
      absl::StatusOr<std::vector<GptqResult>> results =
          quant::QuantizeGptqBatched(ws, hessian_of, hs, SolveOptions(), o_.gptq_batch);
      if (!results.ok()) return results.status();
      size_t k = 0;
      for (size_t gi = 0; gi < batched.size(); ++gi) {
        std::vector<at::Tensor> gws;
        std::vector<GptqResult> grs;
        for (size_t i = 0; i < batched[gi]->members.size(); ++i, ++k) {
          gws.push_back(ws[k]);
          grs.push_back(std::move((*results)[k]));
        }
        MQ_RETURN_IF_ERROR(record(*batched[gi], gws, grs, hs[gi]));
      }
    }
    for (const HessianGroup* g : pass) acc.erase(g->members[0]);
    solve_only += Since(s0);
  }
  const Clock::time_point r0 = Clock::now();
  marks_.Begin("mq::replicated_solve");
  for (size_t gi = 0; gi < rep_groups.size(); ++gi) {
    const int solver = static_cast<int>(gi % gang_.size());
    if (solver == gang_.rank()) MQ_RETURN_IF_ERROR(solve_group(rep_groups[gi], false));
    for (const std::string& m : rep_groups[gi].members) {
      at::Tensor deq = solver == gang_.rank()
                           ? overrides[m].to(at::kFloat).contiguous()
                           : at::empty(quant::WeightOf(w, m).sizes(),
                                       at::TensorOptions().dtype(at::kFloat).device(o_.device));
      MQ_RETURN_IF_ERROR(gang_.Broadcast(deq, solver));
      overrides[m] = deq.to(o_.device, o_.dtype);
    }
  }
  acc.clear();
  // The one host sync of the stage's statistics (it also completes the queued copies).
  double err_sum = 0;
  int err_n = 0;
  if (!error_traces.empty()) {
    const at::Tensor traces = at::stack(error_traces).cpu();
    const double* t = traces.data_ptr<double>();
    for (int64_t i = 0; i < traces.size(0); ++i) {
      const double err = quant::RelativeErrorOf(t[2 * i], t[2 * i + 1]);
      if (!std::isfinite(err)) continue;
      err_sum += err;
      ++err_n;
    }
  }
  st.mean_relative_error = err_n > 0 ? err_sum / err_n : 0;
  SyncDevice(o_.device);
  // The experts' forward and Hessian accumulation happened inside this stage: Hessian time.
  solve_only += Since(r0);
  st.solve_seconds = (rtn ? Since(t) : solve_only) + awq_seconds;
  st.hessian_seconds = rtn ? 0.0 : st_hessian_before_solve + std::max(0.0, Since(t) - solve_only);
  MQ_RETURN_IF_ERROR(CheckCancelled());

  // Fault injection (off unless set): a pause inside the layer, between solve and write, so
  // chaos tests can kill a rank mid-layer.
  if (const char* v = std::getenv("MQ_FAULT_MID_LAYER_DELAY_MS")) {
    const int64_t ms = std::atoll(v);
    for (int64_t waited = 0; waited < ms && !(o_.cancelled && o_.cancelled()); waited += 20) {
      ::usleep(20000);
    }
  }

  // Pass 2: quantized propagation (attention reused when nothing replicated was quantized),
  // for the next step: the last step's output hidden states are used by nothing (no checkpoint
  // follows the last step), so its files go to the writer at once.
  t = Clock::now();
  const bool reuse = w.is_moe && rep_groups.empty();
  if (step + 1 < o_.total_steps) {
    Progress(where + ": propagating", 0.7);
    marks_.Begin("mq::propagate");
    absl::StatusOr<std::vector<at::Tensor>> next =
        Propagate(w, overrides, reuse ? &moe_in : nullptr,
                  reuse && plan_.rounds == 1 ? &dispatch : nullptr);
    if (!next.ok()) return next.status();
    for (size_t i = 0; i < chunks_.size(); ++i) chunks_[i].hidden = (*next)[i];
  }
  moe_in = MoeInput();
  dispatch = Dispatch();
  SyncDevice(o_.device);
  st.propagate_seconds = Since(t);
  const DeviceMemory memory = ReadDeviceMemory(o_.device);
  st.device_peak_allocated_bytes = memory.peak_allocated;
  st.device_peak_reserved_bytes = memory.peak_reserved;
  st.device_alloc_retries = memory.retries - retries0;

  // What this rank writes: its solved tensors, and the layer's unquantized tensors it owns.
  for (const std::string& n : LayerNames(layer)) {
    if (quant::EndsWith(n, model::kScaleInvSuffix)) continue;
    if (quant::EndsWith(n, ".weight") && written_quantized.count(n.substr(0, n.size() - 7))) {
      continue;
    }
    int e = 0;
    const bool expert = model::RoutedExpertOf(n, &e);
    if (expert ? OwnerOf(e) != gang_.rank() : gang_.rank() != 0) continue;
    if (!expert && quant::EndsWith(n, ".weight") &&
        std::find(replicated.begin(), replicated.end(), n.substr(0, n.size() - 7)) !=
            replicated.end()) {
      continue;  // a replicated quantized linear: written by its solver
    }
    if (auto f = folded.find(n); f != folded.end()) {
      result.tensors.push_back(model::ToTensorData(n, f->second));  // AWQ folded it
      continue;
    }
    result.plain.push_back(n);
  }
  result.checkpoint = model::IsCheckpointStep(step, o_.total_steps, checkpoint_every_);
  // Already on the host and never changed in place (the next step replaces chunks_' tensors):
  // the write thread reads them as they are, only for a step that checkpoints.
  if (result.checkpoint) result.hidden = HiddenStates();
  st.exchange_seconds = gang_.exchange_seconds() - exchange0;
  marks_.End();
  Progress(where + ": writing", 0.9);
  return result;
}

absl::Status Runner::WriteStep(StepWrite w) {
  const Clock::time_point t = Clock::now();
  for (const std::string& n : w.plain) {
    absl::StatusOr<model::TensorData> d = quant::PlainTensor(reader_, n);
    if (!d.ok()) return d.status();
    w.tensors.push_back(*std::move(d));
  }
  if (!w.tensors.empty()) {
    const std::string name = LayerFileName(w.out.layer, gang_.rank(), gang_.size());
    ReadBackRanges ranges;
    absl::StatusOr<OutputFileInfo> info =
        WriteDescribedSafetensors(o_.output_dir, name, std::move(w.tensors), &ranges);
    if (!info.ok()) return info.status();
    // Read back from the storage now, beside the next layer, so that finalization need not
    // read it again (VerifyFiles trusts an unchanged stamp); range by range on several threads,
    // since the last layer's read-back is on the job's critical path.
    MQ_RETURN_IF_ERROR(ReadBackCommitted(o_.output_dir, &*info, &ranges));
    w.out.files.push_back(*std::move(info));
  }
  // A checkpoint only shortens a resume: one that cannot be written (a full scratch disk) is
  // skipped with a warning, and the older ones stay for a resume to start from.
  bool checkpointed = false;
  if (w.checkpoint) {
    const absl::Status saved = SaveCheckpoint(w.out.step, std::move(w.hidden));
    checkpointed = saved.ok();
    if (!saved.ok() && o_.on_warning) {
      o_.on_warning(absl::StrCat("the hidden-state checkpoint of layer ", w.out.layer, " (step ",
                                 w.out.step + 1, ") was not written (", saved.message(),
                                 "): a resume starts from an older checkpoint"));
    }
  }
  w.out.stats.write_seconds += Since(t);
  if (o_.on_step) MQ_RETURN_IF_ERROR(o_.on_step(w.out));
  // The step is reported: a resume starts after it, so older checkpoints are of no use.
  if (checkpointed) RemoveCheckpointsBefore(w.out.step);
  // The tensors this write read from the checkpoint leave the resident set again.
  ReleaseLayerPages(w.out.layer);
  return absl::OkStatus();
}

std::span<const std::string> Runner::LayerNames(int layer) const {
  const std::string prefix = absl::StrCat("model.layers.", layer, ".");
  const std::vector<std::string>& names = reader_.names();
  const auto first = std::lower_bound(names.begin(), names.end(), prefix);
  auto last = first;
  while (last != names.end() && last->rfind(prefix, 0) == 0) ++last;
  return {first, last};
}

void Runner::ReleaseLayerPages(int layer) const {
  for (const std::string& n : LayerNames(layer)) reader_.Release(n);
}

absl::Status Runner::Replay(int step, int layer, const FileSetReader& committed) {
  MQ_RETURN_IF_ERROR(EnterLayer(layer));
  absl::StatusOr<model::LayerWeights> loaded = Load(layer);
  if (!loaded.ok()) return loaded.status();
  ReleaseLayerPages(layer);  // a resume replaying many layers keeps none of them mapped
  if (quant::UsesAwq(o_.method)) MQ_RETURN_IF_ERROR(UseCommittedTensors(*loaded, committed));
  model::WeightOverrides overrides;
  for (const std::string& m : quant::QuantizedLinears(config_, layer, o_.format)) {
    if (!Owns(m)) continue;  // another rank's expert
    quant::PackedWeight p;
    p.group_size = o_.format.group_size;
    for (auto [suffix, slot] : {std::pair<const char*, at::Tensor*>{".weight_packed", &p.weight_packed},
                                {".weight_scale", &p.weight_scale},
                                {".weight_shape", &p.weight_shape}}) {
      absl::StatusOr<model::TensorView> v = committed.Get(m + suffix);
      if (!v.ok()) return v.status();
      absl::StatusOr<at::Tensor> t = model::FromTensorView(*v);
      if (!t.ok()) return t.status();
      *slot = *std::move(t);
    }
    absl::StatusOr<at::Tensor> deq = quant::DequantizePacked(p);
    if (!deq.ok()) return deq.status();
    overrides[m] = deq->to(o_.device, o_.dtype);
  }
  Progress(absl::StrCat("replaying committed layer ", layer, " (step ", step + 1, ")"), 0);
  absl::StatusOr<std::vector<at::Tensor>> next = Propagate(*loaded, overrides, nullptr, nullptr);
  if (!next.ok()) return next.status();
  for (size_t i = 0; i < chunks_.size(); ++i) chunks_[i].hidden = (*next)[i];
  return absl::OkStatus();
}

std::string Runner::CheckpointPath(int step) const {
  char buf[96];
  std::snprintf(buf, sizeof(buf), "/hidden-step%05d-seq%06lld-%06lld.safetensors", step,
                static_cast<long long>(lo_), static_cast<long long>(hi_));
  return o_.scratch_dir + buf;
}

void Runner::RunRowBlocks(const std::string& prefix, const model::MlpWeights& mlp,
                          const at::Tensor& rows, const model::ForwardHooks& hooks) const {
  const int64_t block = std::max<int64_t>(1, o_.max_batch_tokens);
  for (int64_t r = 0; r < rows.size(0); r += block) {
    model::RunMlpInputs(prefix, mlp, rows.narrow(0, r, std::min(block, rows.size(0) - r)), hooks);
  }
}

void Runner::WriteProfile(StepProfile& profile, int layer) const {
  const std::string base = absl::StrCat(o_.profile_prefix, "-layer", layer, "-rank", gang_.rank());
  // A free name: an existing file (another run's, or not mq's) is never overwritten.
  std::string name = base;
  auto taken = [](const std::string& n) {
    for (const char* suffix : {".json", ".json.tmp", ".txt"}) {
      if (::access((n + suffix).c_str(), F_OK) == 0) return true;
    }
    return false;
  };
  for (int n = 2; taken(name); ++n) {
    name = absl::StrCat(base, "-", n);
  }
  absl::StatusOr<std::string> summary = profile.Finish(name + ".json");
  absl::Status written =
      summary.ok() ? model::WriteFileAtomic(name + ".txt", *summary) : summary.status();
  if (!written.ok() && o_.on_warning) {
    o_.on_warning(absl::StrCat("profile of layer ", layer, ": ", written.message()));
  }
}

at::Tensor Runner::ToDeviceQueued(const at::Tensor& t) const {
  if (!o_.device.is_cuda() || t.device() == o_.device) return t.to(o_.device);
  return t.contiguous().pin_memory().to(o_.device, /*non_blocking=*/true);
}

at::Tensor Runner::ToHostQueued(const at::Tensor& t) const {
  if (!t.is_cuda()) return t.to(at::kCPU).contiguous();
  at::Tensor host = at::empty(t.sizes(), t.options().device(at::kCPU).pinned_memory(true));
  host.copy_(t, /*non_blocking=*/true);
  return host;
}

std::vector<std::vector<int64_t>> Runner::ChunkShapes() const {
  std::vector<std::vector<int64_t>> shapes;
  for (const Chunk& c : chunks_) {
    shapes.push_back({c.ids.size(0), c.ids.size(1), config_.hidden_size});
  }
  return shapes;
}

std::vector<at::Tensor> Runner::HiddenStates() const {
  std::vector<at::Tensor> hidden;
  for (const Chunk& c : chunks_) hidden.push_back(c.hidden);
  return hidden;
}

absl::Status Runner::SaveCheckpoint(int step, const std::vector<at::Tensor>& hidden) {
  std::vector<model::TensorData> chunks;
  for (size_t i = 0; i < hidden.size(); ++i) {
    chunks.push_back(model::ToTensorDataView(absl::StrCat("chunk.", i), hidden[i]));
  }
  return WriteHiddenCheckpoint(CheckpointPath(step), std::move(chunks));
}

void Runner::RemoveCheckpointsBefore(int step) const {
  for (int s : CheckpointSteps()) {
    if (s < step) ::unlink(CheckpointPath(s).c_str());
  }
}

std::vector<int> Runner::CheckpointSteps() const {
  std::vector<int> steps;
  bool exists = false;
  absl::StatusOr<std::vector<std::string>> names = ListDirectory(o_.scratch_dir, &exists);
  if (!names.ok()) return steps;
  for (const std::string& n : *names) {
    int step = -1;
    // Only names this rank writes (its slice, no temporary files): the path must round-trip.
    if (std::sscanf(n.c_str(), "hidden-step%d-", &step) == 1 && step >= 0 &&
        CheckpointPath(step) == o_.scratch_dir + "/" + n) {
      steps.push_back(step);
    }
  }
  std::sort(steps.begin(), steps.end());
  return steps;
}

absl::Status Runner::AgreeCheckpointCadence() {
  at::Tensor forced = at::tensor(std::vector<int64_t>{o_.checkpoint_every}, at::kLong);
  MQ_RETURN_IF_ERROR(gang_.Broadcast(forced, 0));
  // The cost model's inputs for the largest rank, the same on every rank (every rank has every
  // sample, and the slices and expert ranges follow from the gang size).
  const int64_t n = static_cast<int64_t>(o_.samples.size()), k = gang_.size();
  int64_t tokens = 0, experts = 0;
  bool moe = false;
  for (int l : layers_) moe = moe || config_.IsMoeLayer(l);
  for (int64_t r = 0; r < k; ++r) {
    int64_t t = 0;
    for (int64_t i = n * r / k; i < n * (r + 1) / k; ++i) {
      t += static_cast<int64_t>(o_.samples[i].size());
    }
    tokens = std::max(tokens, t);
    if (moe) {
      experts = std::max<int64_t>(experts, FirstExpert(static_cast<int>(r) + 1) -
                                               FirstExpert(static_cast<int>(r)));
    }
  }
  const model::CheckpointCadence c = model::ChooseCheckpointCadence(
      tokens, config_.hidden_size, experts, o_.total_steps, forced.item<int64_t>());
  checkpoint_every_ = c.every;
  return absl::OkStatus();
}

absl::StatusOr<bool> Runner::LoadCheckpoint(int step) {
  const std::string path = CheckpointPath(step);
  // A damaged checkpoint is no checkpoint: the gang then resumes from an older one, or replays
  // the committed (verified) layers from the embeddings.
  auto unusable = [&](const std::string& why) {
    const std::string message = absl::StrCat(
        why, "; not used: the resume starts from an older checkpoint or from the embeddings");
    if (o_.on_warning) o_.on_warning(message);
    Progress(message, 0);
    return false;
  };
  absl::StatusOr<std::unique_ptr<model::SafetensorsFile>> file =
      OpenHiddenCheckpoint(path, chunks_.size());
  if (absl::IsNotFound(file.status())) return false;
  if (!file.ok()) return unusable(std::string(file.status().message()));
  const std::vector<std::vector<int64_t>> shapes = ChunkShapes();
  std::vector<at::Tensor> hidden = transfers_.AllocateHost(shapes, o_.dtype);
  for (size_t i = 0; i < chunks_.size(); ++i) {
    absl::StatusOr<model::TensorView> v = (*file)->Get(absl::StrCat("chunk.", i));
    if (!v.ok()) return unusable(std::string(v.status().message()));
    absl::StatusOr<at::Tensor> t = model::FromTensorView(*v);
    if (!t.ok() || t->sizes().vec() != shapes[i]) {
      return unusable(absl::StrCat("hidden-state checkpoint ", path, " has other shapes"));
    }
    hidden[i].copy_(*t);
  }
  for (size_t i = 0; i < chunks_.size(); ++i) chunks_[i].hidden = hidden[i];
  return true;
}

absl::Status Runner::Resume(GangPipelineResult* result) {
  const std::vector<int>& layers = layers_;
  const int start = o_.start_step;
  // The embeddings' ids: a checkpoint of an MTP step holds one token fewer per sequence.
  std::vector<at::Tensor> ids;
  for (const Chunk& c : chunks_) ids.push_back(c.ids);
  // Which steps before `start` every rank has a checkpoint file for (one all-reduce), then the
  // newest of them that every rank can load (one all-reduce per checkpoint tried).
  const std::vector<int> own = CheckpointSteps();
  at::Tensor have = at::zeros({start}, at::kLong);
  for (int s : own) {
    if (s < start) have[s] = 1;
  }
  MQ_RETURN_IF_ERROR(gang_.AllReduceSum(have));
  const at::Tensor counts = have.cpu().contiguous();
  int from = -1;
  for (int c = start - 1; c >= 0 && from < 0; --c) {
    if (counts.data_ptr<int64_t>()[c] != gang_.size()) continue;
    in_mtp_ = layers[c] >= config_.num_hidden_layers;
    for (size_t i = 0; i < chunks_.size(); ++i) {
      chunks_[i].ids = in_mtp_ ? ids[i].slice(1, 0, ids[i].size(1) - 1) : ids[i];
    }
    absl::StatusOr<bool> loaded = Guarded(absl::StrCat("loading the checkpoint of step ", c + 1),
                                          [&] { return LoadCheckpoint(c); });
    if (!loaded.ok()) return loaded.status();
    at::Tensor all = at::full({1}, *loaded ? 1 : 0, at::kLong);
    MQ_RETURN_IF_ERROR(gang_.AllReduceSum(all));
    if (all.item<int64_t>() == gang_.size()) from = c;
  }
  if (from < 0) MQ_RETURN_IF_ERROR(Embed());  // every rank replays from the embeddings
  // Checkpoints of uncommitted steps (a stopped attempt's) are of no use: the steps run again.
  for (int s : own) {
    if (s >= start) ::unlink(CheckpointPath(s).c_str());
  }
  result->resumed_from_step = from;
  const int replay = start - 1 - from;
  Progress(from >= 0 ? absl::StrCat("resuming from the hidden-state checkpoint of step ", from + 1,
                                    " (layer ", layers[from], "): replaying ", replay,
                                    " committed step", replay == 1 ? "" : "s")
                     : absl::StrCat("resuming without a hidden-state checkpoint every rank can "
                                    "use: replaying ", replay, " committed step",
                                    replay == 1 ? "" : "s", " from the embeddings"),
           0);
  if (replay == 0) return absl::OkStatus();
  absl::StatusOr<std::unique_ptr<FileSetReader>> committed =
      FileSetReader::Open(o_.output_dir, o_.committed_files);
  if (!committed.ok()) return committed.status();
  for (int s = from + 1; s < start; ++s) {
    MQ_RETURN_IF_ERROR(CheckCancelled());
    MQ_RETURN_IF_ERROR(Guarded(absl::StrCat("replaying layer ", layers[s]),
                               [&] { return Replay(s, layers[s], **committed); }));
    ++result->steps_replayed;
  }
  return absl::OkStatus();
}

absl::StatusOr<GangPipelineResult> Runner::Run() {
  GangPipelineResult result;
  layers_ = PipelineLayers(config_, o_.format);
  const std::vector<int>& layers = layers_;
  if (static_cast<int>(layers.size()) != o_.total_steps) {
    return absl::InvalidArgumentError(absl::StrCat(
        "total_steps = ", o_.total_steps, " but the checkpoint and format give ", layers.size(),
        " pipeline layers (the plan does not match this model)"));
  }
  if (o_.start_step < 0 || o_.start_step > o_.total_steps) {
    return absl::InvalidArgumentError(
        absl::StrCat("start_step = ", o_.start_step, ": must be in [0, ", o_.total_steps, "]"));
  }
  MQ_RETURN_IF_ERROR(AgreeDispatchPlan());
  MQ_RETURN_IF_ERROR(AgreeCheckpointCadence());
  result.checkpoint_every = checkpoint_every_;
  MQ_RETURN_IF_ERROR(Embed());
  if (o_.start_step > 0) MQ_RETURN_IF_ERROR(Resume(&result));
  // With overlap_writes, step s is written and reported on another thread while step s + 1
  // runs; at most one write is in flight, so reports stay in step order. Every return below
  // waits for it first (it uses this Runner and the caller's callbacks).
  std::future<absl::Status> writing;
  auto wait_write = [&writing]() -> absl::Status {
    return writing.valid() ? writing.get() : absl::OkStatus();
  };
  for (int s = o_.start_step; s < o_.total_steps; ++s) {
    absl::Status st = CheckCancelled();
    std::unique_ptr<StepProfile> profile;
    if (st.ok() && o_.profile_layers.count(layers[s])) {
      absl::StatusOr<std::unique_ptr<StepProfile>> started = StepProfile::Start(o_.device);
      if (started.ok()) {
        profile = *std::move(started);
      } else if (o_.on_warning) {
        o_.on_warning(absl::StrCat("layer ", layers[s], " is not profiled: ",
                                   started.status().message()));
      }
    }
    // Torch errors anywhere in the step (device out of memory included) fail the job with a
    // status instead of ending the process.
    absl::StatusOr<StepWrite> w =
        st.ok() ? Guarded(absl::StrCat("layer ", layers[s]),
                          [&] { return QuantizeStep(s, layers[s]); })
                : absl::StatusOr<StepWrite>(st);
    if (profile && w.ok()) WriteProfile(*profile, layers[s]);
    // The previous step's write failed first when both failed.
    MQ_RETURN_IF_ERROR(wait_write());
    if (!w.ok()) return w.status();
    auto write = [this, what = absl::StrCat("writing layer ", layers[s]),
                  pending = *std::move(w)]() mutable -> absl::Status {
      return Guarded(what, [&] { return WriteStep(std::move(pending)); });
    };
    if (o_.overlap_writes) {
      writing = std::async(std::launch::async, std::move(write));
    } else {
      MQ_RETURN_IF_ERROR(write());
    }
    ++result.steps_run;
  }
  MQ_RETURN_IF_ERROR(wait_write());
  MQ_RETURN_IF_ERROR(gang_.Barrier());
  // Every step is reported: the last checkpoint is no longer needed.
  RemoveHiddenCheckpoints(o_.scratch_dir);
  return result;
}

}  // namespace gang_internal

std::vector<int> PipelineLayers(const model::DeepseekV3Config& config,
                                const quant::CompressedTensorsOptions& format) {
  std::vector<int> layers;
  for (int l = 0; l < config.num_hidden_layers; ++l) layers.push_back(l);
  if (format.mtp == quant::MtpMode::kQuantize) {
    for (int l = 0; l < config.num_nextn_predict_layers; ++l) {
      layers.push_back(config.num_hidden_layers + l);
    }
  }
  return layers;
}

absl::StatusOr<GangPipelineResult> RunGangPipeline(const GangPipelineOptions& options) {
  if (options.samples.empty()) {
    return absl::InvalidArgumentError("samples: the calibration set is empty");
  }
  for (size_t i = 0; i < options.samples.size(); ++i) {
    if (options.samples[i].size() < 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("samples[", i, "]: ", options.samples[i].size(),
                       " tokens; calibration sequences need at least 2"));
    }
  }
  if (options.dtype != at::kFloat && options.dtype != at::kBFloat16) {
    return absl::InvalidArgumentError("dtype: must be float32 or bfloat16");
  }
  if (static_cast<int64_t>(options.samples.size()) < options.gang.world_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "calibration has ", options.samples.size(), " samples for a gang of ",
        options.gang.world_size, ": every rank needs at least one"));
  }
  MQ_RETURN_IF_ERROR(quant::ValidateCompressedTensorsOptions(options.format));
  MQ_RETURN_IF_ERROR(quant::MakeDirs(options.scratch_dir));
  MQ_RETURN_IF_ERROR(quant::MakeDirs(options.output_dir));
  absl::StatusOr<std::string> config_path = ModelDirFile(options.model_dir, "config.json");
  if (!config_path.ok()) return config_path.status();
  absl::StatusOr<model::DeepseekV3Config> config = model::LoadDeepseekV3Config(*config_path);
  if (!config.ok()) return config.status();
  if (config->compressed_tensors) {
    return absl::FailedPreconditionError(
        "config.json: quantization_config is compressed-tensors (pack-quantized): the checkpoint "
        "is already quantized; quantize the original (FP8 or BF16) checkpoint");
  }
  MQ_RETURN_IF_ERROR(quant::CheckSelectionConsistent(*config, options.format));
  absl::StatusOr<std::unique_ptr<model::CheckpointReader>> reader =
      model::CheckpointReader::Open(options.model_dir);
  if (!reader.ok()) return reader.status();
  absl::StatusOr<model::GlobalWeights> globals =
      model::LoadGlobals(**reader, *config, options.device, options.dtype);
  if (!globals.ok()) return globals.status();
  GangOptions gang_options = options.gang;
  gang_options.device = options.device;
  absl::StatusOr<std::unique_ptr<Gang>> gang = Gang::Join(gang_options);
  if (!gang.ok()) return gang.status();
  gang_internal::Runner runner(options, **gang, **reader, *std::move(config), *std::move(globals));
  return runner.Run();
}

}  // namespace mq::pipeline
