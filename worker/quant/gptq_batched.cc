#include "worker/quant/gptq_batched.h"

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <algorithm>
#include <map>
#include <optional>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/torch/ops.h"
#include "worker/quant/gptq_internal.h"
#include "worker/quant/rtn.h"
#include "worker/quant/validate.h"

namespace mq::quant {
namespace {

absl::Status Prefixed(const absl::Status& s, const std::string& prefix) {
  return absl::Status(s.code(), absl::StrCat(prefix, s.message()));
}

// One factorisation attempt, enqueued without a host sync on the current stream: the
// normalized fp32 upper factor of A⁻¹ (PreparedHessian::u) and a bool device scalar saying
// whether it is valid. `a` (damped, in the work dtype) may be overwritten.
std::pair<at::Tensor, at::Tensor> Factor(at::Tensor& a, HessianFactorization how, bool kernels) {
  if (how == HessianFactorization::kCholeskyFeedback) {
    at::Tensor r, status;
    absl::Status s = kernels::InverseFactor(a, kernels::FactorForm::kCholeskyFeedback, &r, &status);
    if (s.ok()) return {r, status.eq(0)};
    // The kernels were checked up front; a launch error here is not a matrix without a factor.
    TORCH_CHECK(false, "Cholesky-feedback factorisation: ", s.ToString());
  }
  auto normalized = [](const at::Tensor& upper) {
    return upper.div(upper.diagonal().unsqueeze(1)).to(at::kFloat).contiguous();
  };
  if (how == HessianFactorization::kInverseCholesky) {
    auto [lower, info] = at::linalg_cholesky_ex(a, /*upper=*/false, /*check_errors=*/false);
    at::Tensor inverse = at::cholesky_inverse(lower, /*upper=*/false);
    auto [upper, info2] = at::linalg_cholesky_ex(inverse, /*upper=*/true, /*check_errors=*/false);
    at::Tensor ok = info.eq(0)
                        .logical_and(info2.eq(0))
                        .logical_and(at::isfinite(upper).all())
                        .logical_and(upper.diagonal().min().gt(0));
    return {normalized(upper), ok};
  }
  if (kernels) {
    at::Tensor u, status;
    if (kernels::InverseFactor(a, kernels::FactorForm::kInverseUpper, &u, &status).ok()) {
      return {u, status.eq(0)};
    }
    // A launch error leaves this attempt to the ATen path below (same result up to rounding).
  }
  at::Tensor reversed = a.flip({0, 1});
  auto [lower, info] = at::linalg_cholesky_ex(reversed, /*upper=*/false, /*check_errors=*/false);
  at::Tensor eye = at::eye(a.size(0), a.options());
  at::Tensor inv = at::linalg_solve_triangular(lower, eye, /*upper=*/false);
  at::Tensor upper = inv.flip({0, 1});
  at::Tensor ok =
      info.eq(0).logical_and(at::isfinite(upper).all()).logical_and(upper.diagonal().min().gt(0));
  return {normalized(upper), ok};
}

// Factorises a chunk of Hessians (CUDA, one device), one host sync per damping round. The
// factorisations of a round are spread over `batch.factor_streams` streams of the device's pool,
// ordered after the current stream's work and joined back into it.
void FactorChunk(std::vector<PreparedHessian*>& ps, std::vector<at::Tensor>& permuted,
                 const GptqOptions& options, const GptqBatchOptions& batch) {
  const size_t n = ps.size();
  if (n == 0) return;
  const c10::Device device = permuted[0].device();
  HessianFactorization how = batch.factorization;
  const bool supported = kernels::InverseFactorTorchSupported(device).ok();
  if (how == HessianFactorization::kCholeskyFeedback &&
      !(supported && options.block_size == kernels::kGptqBlock &&
        kernels::GptqTorchSupported(device).ok())) {
    how = HessianFactorization::kReversedCholesky;
  }
  const bool kernels =
      batch.factor_kernels && how == HessianFactorization::kReversedCholesky && supported;
  // Device-generic stream API (c10/core): no CUDA headers in this file.
  const c10::impl::DeviceGuardImplInterface* impl = c10::impl::getDeviceGuardImpl(device.type());
  const c10::Stream main = impl->getStream(device);
  std::vector<c10::Stream> side;
  for (int i = 0; batch.factor_streams > 1 && i < batch.factor_streams; ++i) {
    side.push_back(impl->getStreamFromGlobalPool(device, /*isHighPriority=*/false));
  }
  std::vector<at::Tensor> upper(n);
  std::vector<double> rel(n, options.rel_damp);
  std::vector<bool> done(n, false);
  for (int attempt = 0; attempt <= options.max_damp_retries; ++attempt) {
    std::vector<size_t> pending;
    std::vector<at::Tensor> oks;
    c10::Event ready(device.type());
    if (!side.empty()) ready.record(main);
    for (size_t k = 0; k < n; ++k) {
      if (done[k]) continue;
      if (attempt > 0) rel[k] *= options.damp_growth;
      std::optional<c10::StreamGuard> on_side;
      if (!side.empty()) {
        const c10::Stream& s = side[pending.size() % side.size()];
        ready.block(s);
        on_side.emplace(s);
      }
      at::Tensor damped = permuted[k].clone();
      damped.diagonal().add_(rel[k] * ps[k]->mean_diag);
      auto [u, ok] = Factor(damped, how, kernels);
      if (on_side) {
        // Used on the main stream from here on: the allocator must not reuse them before.
        impl->recordDataPtrOnStream(u.storage().data_ptr(), main);
        impl->recordDataPtrOnStream(ok.storage().data_ptr(), main);
      }
      upper[k] = u;
      pending.push_back(k);
      oks.push_back(ok);
    }
    for (const c10::Stream& s : side) {
      c10::Event joined(device.type());
      joined.record(s);
      joined.block(main);
    }
    if (pending.empty()) break;
    at::Tensor ok_host = at::stack(oks).cpu();  // the round's one sync
    for (size_t j = 0; j < pending.size(); ++j) {
      const size_t k = pending[j];
      if (ok_host[j].item<bool>()) {
        done[k] = true;
        ps[k]->damp_retries = attempt;
      } else {
        upper[k] = at::Tensor();
      }
    }
  }
  for (size_t k = 0; k < n; ++k) {
    PreparedHessian& p = *ps[k];
    if (!done[k]) {
      p.fallback = Fallback::kRtn;
      p.fallback_reason = absl::StrCat("cholesky of the damped hessian failed for rel_damp ",
                                       options.rel_damp, " to ", rel[k], " (",
                                       options.max_damp_retries + 1, " tries): round-to-nearest");
      continue;
    }
    p.rel_damp = rel[k];
    p.damping = rel[k] * p.mean_diag;
    if (p.damp_retries > 0) {
      p.fallback = Fallback::kRaisedDamping;
      p.fallback_reason =
          absl::StrCat("cholesky failed at rel_damp ", options.rel_damp, "; succeeded at ", rel[k],
                       " after ", p.damp_retries, " retries");
    }
    p.u = upper[k];
    p.feedback_form = how == HessianFactorization::kCholeskyFeedback;
  }
}

}  // namespace

absl::StatusOr<std::vector<PreparedHessian>> PrepareHessiansBatched(
    const std::vector<at::Tensor>& hessians, const GptqOptions& options,
    const GptqBatchOptions& batch) {
  if (absl::Status s = ValidateGptqOptions(options); !s.ok()) return s;
  std::vector<PreparedHessian> out(hessians.size());
  // Chunks of at most ~4 GiB of work-dtype copies keep the peak memory bounded.
  const int64_t elem = options.fp64_factorization ? 8 : 4;
  constexpr int64_t kChunkBytes = int64_t{4} << 30;
  std::vector<PreparedHessian*> chunk;
  std::vector<at::Tensor> permuted;
  int64_t chunk_bytes = 0;
  auto flush = [&] {
    if (!chunk.empty()) FactorChunk(chunk, permuted, options, batch);
    chunk.clear();
    permuted.clear();
    chunk_bytes = 0;
  };
  for (size_t k = 0; k < hessians.size(); ++k) {
    const at::Tensor& h = hessians[k];
    if (!h.defined() || !h.is_cuda()) {
      absl::StatusOr<PreparedHessian> p = PrepareHessian(h, options);
      if (!p.ok()) return Prefixed(p.status(), absl::StrCat("hessians[", k, "]: "));
      out[k] = *std::move(p);
      continue;
    }
    absl::StatusOr<at::Tensor> hp = internal::PrepareUpToFactor(h, options, out[k]);
    if (!hp.ok()) return Prefixed(hp.status(), absl::StrCat("hessians[", k, "]: "));
    if (!hp->defined()) continue;  // kRtn: zero Hessian
    const int64_t bytes = elem * hp->numel();
    if (!chunk.empty() && chunk_bytes + bytes > kChunkBytes) flush();
    chunk.push_back(&out[k]);
    permuted.push_back(*std::move(hp));
    chunk_bytes += bytes;
  }
  flush();
  return out;
}

namespace {

// The fused CUDA solve of weights `idx` (one shape, one device, none kRtn).
absl::Status SolveOnCuda(const std::vector<at::Tensor>& weights,
                         const std::vector<int64_t>& hessian_of,
                         const std::vector<PreparedHessian>& prepared,
                         const std::vector<size_t>& idx, const GptqOptions& options,
                         const GptqBatchOptions& batch, std::vector<GptqResult>& results) {
  const int64_t B = static_cast<int64_t>(idx.size());
  const at::Tensor& first = weights[idx[0]];
  const int64_t O = first.size(0), I = first.size(1);
  const at::Device device = first.device();
  const GridOptions& go = options.grid;
  const int64_t G = NumGroups(I, go.group_size);
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);

  // Device copies of each Hessian's factor and permutation, shared by the weights that use it.
  std::map<int64_t, std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>> factors;
  std::vector<at::Tensor> u(B), perm32(B), perm64(B);
  at::Tensor w = at::empty({B, O, I}, f32);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t h = hessian_of[idx[b]];
    auto it = factors.find(h);
    if (it == factors.end()) {
      const PreparedHessian& p = prepared[h];
      at::Tensor p64 = p.perm.to(device, at::kLong);
      it = factors
               .emplace(h,
                        std::make_tuple(p.u.to(device, at::kFloat).contiguous(), p64.to(at::kInt),
                                        p64, p.dead_columns > 0 ? p.dead.to(device) : at::Tensor()))
               .first;
    }
    u[b] = std::get<0>(it->second);
    perm32[b] = std::get<1>(it->second);
    perm64[b] = std::get<2>(it->second);
    at::Tensor wb = w[b];
    wb.copy_(weights[idx[b]]);
    if (std::get<3>(it->second).defined())
      wb.masked_fill_(std::get<3>(it->second).unsqueeze(0), 0.0);
  }
  // Grids row by row (a grid is per row and group), in slices that bound the MSE temporaries.
  at::Tensor flat = w.view({B * O, I});
  at::Tensor scales = at::empty({B * O, G}, f32);
  at::Tensor zeros = go.symmetric ? at::Tensor() : at::empty({B * O, G}, f32);
  const int64_t slice = std::max<int64_t>(1, (int64_t{1} << 28) / (I * 4));
  for (int64_t r = 0; r < B * O; r += slice) {
    const int64_t n = std::min(slice, B * O - r);
    Grid g = ComputeGrid(flat.narrow(0, r, n), go);
    scales.narrow(0, r, n).copy_(g.scales);
    if (zeros.defined()) zeros.narrow(0, r, n).copy_(g.zero_points);
  }
  at::Tensor scales_t = scales.view({B, O, G}).transpose(1, 2).contiguous();
  at::Tensor zeros_t =
      zeros.defined() ? zeros.view({B, O, G}).transpose(1, 2).contiguous() : at::Tensor();
  at::Tensor index = at::stack(perm64).unsqueeze(1).expand({B, O, I});
  at::Tensor wt = w.gather(2, index).transpose(1, 2).contiguous();  // [B, I, O]
  flat.reset();
  w.reset();
  const bool feedback = prepared[hessian_of[idx[0]]].feedback_form;
  at::Tensor w0 = feedback ? wt.clone() : at::Tensor();
  at::Tensor codes_t = at::empty({B, I, O}, f32.dtype(at::kChar));
  if (absl::Status s = kernels::GptqSolveBatched(
          wt, u, perm32, scales_t, zeros_t, codes_t, go.bits, EffectiveGroupSize(I, go.group_size),
          batch.tf32_update ? kernels::GptqUpdateMath::kTf32 : kernels::GptqUpdateMath::kFp32, w0);
      !s.ok()) {
    return s;
  }
  wt.reset();
  w0.reset();
  at::Tensor codes = at::empty({B, O, I}, codes_t.options());
  codes.scatter_(2, index, codes_t.transpose(1, 2));
  at::Tensor scales3 = scales.view({B, O, G});
  at::Tensor zeros3 = zeros.defined() ? zeros.view({B, O, G}) : at::Tensor();
  for (int64_t b = 0; b < B; ++b) {
    const PreparedHessian& p = prepared[hessian_of[idx[b]]];
    Grid grid{scales3[b], zeros3.defined() ? zeros3[b] : at::Tensor()};
    GptqResult& r = results[idx[b]];
    r.weight = MakeQuantizedWeight(codes[b], grid, go);
    r.fallback = p.fallback;
    r.fallback_reason = p.fallback_reason;
    r.damping = p.damping;
    r.rel_damp = p.rel_damp;
    r.damp_retries = p.damp_retries;
    r.dead_columns = p.dead_columns;
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<GptqResult>> QuantizeGptqBatched(
    const std::vector<at::Tensor>& weights, const std::vector<int64_t>& hessian_of,
    const std::vector<PreparedHessian>& prepared, const GptqOptions& options,
    const GptqBatchOptions& batch) {
  if (absl::Status s = ValidateGptqOptions(options); !s.ok()) return s;
  if (!(batch.max_batch_bytes > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_batch_bytes = ", batch.max_batch_bytes, ": must be > 0"));
  }
  if (hessian_of.size() != weights.size()) {
    return absl::InvalidArgumentError(absl::StrCat("hessian_of has ", hessian_of.size(),
                                                   " entries: must have one per weight (",
                                                   weights.size(), ")"));
  }
  for (size_t k = 0; k < weights.size(); ++k) {
    const std::string prefix = absl::StrCat("weights[", k, "]: ");
    if (hessian_of[k] < 0 || hessian_of[k] >= static_cast<int64_t>(prepared.size())) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, "hessian_of = ", hessian_of[k],
                                                     ": must be in [0, ", prepared.size(), ")"));
    }
    if (absl::Status s = ValidateWeight(weights[k], "weight"); !s.ok()) return Prefixed(s, prefix);
    const PreparedHessian& p = prepared[hessian_of[k]];
    if (weights[k].size(1) != p.in_features) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, "weight has shape ", SizesString(weights[k]), ": must have ",
                       p.in_features, " input columns like hessian ", hessian_of[k]));
    }
  }
  std::vector<GptqResult> results(weights.size());
  // Classes (device, shape, factor form) of CUDA weights the fused kernels take; everything else
  // loops QuantizeGptq.
  std::map<std::tuple<int64_t, int64_t, int64_t, bool>, std::vector<size_t>> classes;
  for (size_t k = 0; k < weights.size(); ++k) {
    const at::Tensor& w = weights[k];
    const PreparedHessian& p = prepared[hessian_of[k]];
    const bool fused = batch.use_kernels && w.is_cuda() && p.fallback != Fallback::kRtn &&
                       options.block_size == kernels::kGptqBlock && p.u.defined() &&
                       kernels::GptqTorchSupported(w.device()).ok();
    if (fused) {
      classes[{w.device().index(), w.size(0), w.size(1), p.feedback_form}].push_back(k);
      continue;
    }
    if (p.feedback_form && p.fallback != Fallback::kRtn) {
      return absl::FailedPreconditionError(absl::StrCat(
          "weights[", k, "] on ", w.device().str(), ": hessian ", hessian_of[k],
          " was prepared in the Cholesky-feedback form, which only the fused CUDA solve reads "
          "(CUDA weights on the hessian's device, block_size ",
          kernels::kGptqBlock, ")"));
    }
    absl::StatusOr<GptqResult> r = QuantizeGptq(w, p, options);
    if (!r.ok()) return Prefixed(r.status(), absl::StrCat("weights[", k, "]: "));
    results[k] = *std::move(r);
  }
  for (const auto& [key, members] : classes) {
    // Bytes per weight element in flight: the fp32 copy, its transpose, codes, grids; plus the
    // original copy w0 in the feedback form.
    const int64_t per_matrix = (std::get<3>(key) ? 18 : 14) * std::get<1>(key) * std::get<2>(key);
    const size_t chunk =
        static_cast<size_t>(std::max<int64_t>(1, batch.max_batch_bytes / per_matrix));
    for (size_t begin = 0; begin < members.size(); begin += chunk) {
      std::vector<size_t> idx(members.begin() + begin,
                              members.begin() + std::min(members.size(), begin + chunk));
      if (absl::Status s = SolveOnCuda(weights, hessian_of, prepared, idx, options, batch, results);
          !s.ok()) {
        return s;
      }
    }
    for (size_t k : members) {
      if (!AllFinite(results[k].weight.dequantized)) {
        return absl::InternalError(
            absl::StrCat("weights[", k, "]: GPTQ produced a non-finite dequantized weight"));
      }
    }
  }
  return results;
}

absl::StatusOr<std::vector<GptqResult>> QuantizeGptqBatched(const std::vector<at::Tensor>& weights,
                                                            const std::vector<int64_t>& hessian_of,
                                                            const std::vector<at::Tensor>& hessians,
                                                            const GptqOptions& options,
                                                            const GptqBatchOptions& batch) {
  absl::StatusOr<std::vector<PreparedHessian>> prepared =
      PrepareHessiansBatched(hessians, options, batch);
  if (!prepared.ok()) return prepared.status();
  return QuantizeGptqBatched(weights, hessian_of, *prepared, options, batch);
}

}  // namespace mq::quant
