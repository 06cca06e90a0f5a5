#include "worker/quant/gptq.h"

#include "worker/quant/gptq_internal.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "worker/quant/rtn.h"
#include "worker/quant/validate.h"

namespace mq::quant {
namespace {

// One factorisation attempt: the upper Cholesky factor of A⁻¹, or undefined when A (or A⁻¹, in
// floating point) is not positive definite.
at::Tensor InverseCholeskyUpper(const at::Tensor& a) {
  auto [lower, info] = at::linalg_cholesky_ex(a, /*upper=*/false, /*check_errors=*/false);
  if (info.item<int64_t>() != 0) return at::Tensor();
  at::Tensor inverse = at::cholesky_inverse(lower, /*upper=*/false);
  auto [upper, info2] = at::linalg_cholesky_ex(inverse, /*upper=*/true, /*check_errors=*/false);
  if (info2.item<int64_t>() != 0 || !AllFinite(upper)) return at::Tensor();
  if (!(upper.diagonal().min().item<double>() > 0.0)) return at::Tensor();
  return upper;
}

GptqResult RtnResult(QuantizedWeight weight, const PreparedHessian& prepared) {
  GptqResult result;
  result.weight = std::move(weight);
  result.fallback = Fallback::kRtn;
  result.fallback_reason = prepared.fallback_reason;
  result.dead_columns = prepared.dead_columns;
  return result;
}

}  // namespace

std::string FallbackName(Fallback fallback) {
  switch (fallback) {
    case Fallback::kNone:
      return "none";
    case Fallback::kRaisedDamping:
      return "raised_damping";
    case Fallback::kRtn:
      return "rtn";
  }
  return "unknown";
}

absl::Status ValidateGptqOptions(const GptqOptions& options) {
  if (absl::Status s = ValidateGridOptions(options.grid); !s.ok()) return s;
  if (options.block_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("block_size = ", options.block_size, ": must be > 0"));
  }
  if (!(options.rel_damp > 0.0) || !std::isfinite(options.rel_damp)) {
    return absl::InvalidArgumentError(
        absl::StrCat("rel_damp = ", options.rel_damp, ": must be finite and > 0"));
  }
  if (options.max_damp_retries < 0 || options.max_damp_retries > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_damp_retries = ", options.max_damp_retries, ": must be in [0, 64]"));
  }
  if (!(options.damp_growth > 1.0) || !std::isfinite(options.damp_growth)) {
    return absl::InvalidArgumentError(
        absl::StrCat("damp_growth = ", options.damp_growth, ": must be finite and > 1"));
  }
  return absl::OkStatus();
}

namespace internal {

absl::StatusOr<at::Tensor> PrepareUpToFactor(const at::Tensor& h, const GptqOptions& options,
                                             PreparedHessian& p) {
  if (!h.defined() || h.dim() != 2 || h.size(0) != h.size(1) || h.size(0) == 0) {
    return absl::InvalidArgumentError(absl::StrCat("hessian has shape ",
                                                   h.defined() ? SizesString(h) : "undefined",
                                                   ": must be square [I, I] with I > 0"));
  }
  if (!at::isFloatingType(h.scalar_type())) {
    return absl::InvalidArgumentError(absl::StrCat("hessian has dtype ",
                                                   std::string(c10::toString(h.scalar_type())),
                                                   ": must be a floating-point type"));
  }
  if (!AllFinite(h)) return absl::InvalidArgumentError("hessian contains NaN or Inf");
  const int64_t cols = h.size(0);
  p.in_features = cols;
  const at::ScalarType work = options.fp64_factorization ? at::kDouble : at::kFloat;
  at::Tensor hw = h.to(work).clone();
  at::Tensor diag = hw.diagonal();
  const double min_diag = diag.min().item<double>();
  if (min_diag < 0.0) {
    const int64_t where = diag.argmin().item<int64_t>();
    return absl::InvalidArgumentError(
        absl::StrCat("hessian diagonal entry ", where, " = ", min_diag,
                     ": must be >= 0 (H = (2/N)·Σ x xᵀ is positive semi-definite)"));
  }
  p.dead = diag == 0;
  p.dead_columns = p.dead.sum().item<int64_t>();
  if (p.dead_columns == cols) {
    p.perm = at::arange(cols, h.options().dtype(at::kLong));
    p.fallback = Fallback::kRtn;
    p.fallback_reason =
        "hessian is zero (no calibration tokens reached this layer): round-to-nearest";
    return at::Tensor();
  }
  if (p.dead_columns > 0) {
    hw.masked_fill_(p.dead.unsqueeze(0).logical_or(p.dead.unsqueeze(1)), 0.0);
    diag.masked_fill_(p.dead, 1.0);
  }
  p.mean_diag = diag.mean().item<double>();
  p.perm = options.act_order ? at::argsort(diag, /*stable=*/true, /*dim=*/0, /*descending=*/true)
                             : at::arange(cols, h.options().dtype(at::kLong));
  return hw.index_select(0, p.perm).index_select(1, p.perm);
}

}  // namespace internal

absl::StatusOr<PreparedHessian> PrepareHessian(const at::Tensor& h, const GptqOptions& options) {
  if (absl::Status s = ValidateGptqOptions(options); !s.ok()) return s;
  PreparedHessian p;
  absl::StatusOr<at::Tensor> permuted_or = internal::PrepareUpToFactor(h, options, p);
  if (!permuted_or.ok()) return permuted_or.status();
  if (p.fallback == Fallback::kRtn) return p;
  const at::Tensor permuted = *std::move(permuted_or);

  at::Tensor upper;
  double rel = options.rel_damp;
  for (int attempt = 0; attempt <= options.max_damp_retries; ++attempt) {
    if (attempt > 0) rel *= options.damp_growth;
    at::Tensor damped = permuted.clone();
    damped.diagonal().add_(rel * p.mean_diag);
    upper = InverseCholeskyUpper(damped);
    if (upper.defined()) {
      p.damp_retries = attempt;
      break;
    }
  }
  if (!upper.defined()) {
    p.fallback = Fallback::kRtn;
    p.fallback_reason =
        absl::StrCat("cholesky of the damped hessian failed for rel_damp ", options.rel_damp,
                     " to ", rel, " (", options.max_damp_retries + 1, " tries): round-to-nearest");
    return p;
  }
  p.rel_damp = rel;
  p.damping = rel * p.mean_diag;
  if (p.damp_retries > 0) {
    p.fallback = Fallback::kRaisedDamping;
    p.fallback_reason = absl::StrCat("cholesky failed at rel_damp ", options.rel_damp,
                                     "; succeeded at ", rel, " after ", p.damp_retries, " retries");
  }
  p.u = upper.div(upper.diagonal().unsqueeze(1)).to(at::kFloat);
  return p;
}

absl::StatusOr<GptqResult> QuantizeGptq(const at::Tensor& w, const PreparedHessian& prepared,
                                        const GptqOptions& options) {
  if (absl::Status s = ValidateGptqOptions(options); !s.ok()) return s;
  if (absl::Status s = ValidateWeight(w, "weight"); !s.ok()) return s;
  const int64_t rows = w.size(0);
  const int64_t cols = w.size(1);
  if (cols != prepared.in_features) {
    return absl::InvalidArgumentError(absl::StrCat("weight has shape ", SizesString(w),
                                                   ": must have ", prepared.in_features,
                                                   " input columns like the hessian"));
  }
  if (prepared.feedback_form && prepared.fallback != Fallback::kRtn) {
    return absl::FailedPreconditionError(
        "the hessian was prepared in the Cholesky-feedback form, which only the fused CUDA solve "
        "of QuantizeGptqBatched reads: prepare it with PrepareHessian for this path");
  }
  if (prepared.fallback == Fallback::kRtn) {
    absl::StatusOr<QuantizedWeight> rtn = QuantizeRtn(w, options.grid);
    if (!rtn.ok()) return rtn.status();
    return RtnResult(*std::move(rtn), prepared);
  }

  const at::Device device = w.device();
  const at::Tensor perm = prepared.perm.to(device);
  const at::Tensor u = prepared.u.to(device);
  at::Tensor weight = w.to(at::kFloat).clone();
  if (prepared.dead_columns > 0) weight.masked_fill_(prepared.dead.to(device).unsqueeze(0), 0.0);

  const GridOptions& go = options.grid;
  const Grid grid = ComputeGrid(weight, go);
  const bool asym = grid.zero_points.defined();
  // Per-column scale / zero point of each column's ORIGINAL group, in processing order,
  // transposed like the weight so that every processed column is one contiguous row.
  const at::Tensor scale_t =
      ExpandGroups(grid.scales, cols, go.group_size).index_select(1, perm).t().contiguous();
  const at::Tensor zero_t = asym ? ExpandGroups(grid.zero_points, cols, go.group_size)
                                       .index_select(1, perm)
                                       .t()
                                       .contiguous()
                                 : at::Tensor();
  at::Tensor wt = weight.index_select(1, perm).t().contiguous();  // [I, O], processing order
  at::Tensor codes_t = at::empty_like(wt);
  at::Tensor dq = at::empty({rows}, wt.options());
  const double qmin = static_cast<double>(QMin(go.bits));
  const double qmax = static_cast<double>(QMax(go.bits));

  for (int64_t begin = 0; begin < cols; begin += options.block_size) {
    const int64_t n = std::min(options.block_size, cols - begin);
    const int64_t end = begin + n;
    at::Tensor block = wt.narrow(0, begin, n);  // view: updates land in wt
    at::Tensor u_block = u.narrow(0, begin, n).narrow(1, begin, n);
    at::Tensor err = at::empty({n, rows}, wt.options());
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = begin + i;
      at::Tensor col = block[i];
      at::Tensor q = codes_t[j];
      at::Tensor s = scale_t[j];
      at::div_out(q, col, s);
      if (asym) q.add_(zero_t[j]);
      q.round_().clamp_(qmin, qmax);
      if (asym) {
        at::sub_out(dq, q, zero_t[j]).mul_(s);
      } else {
        at::mul_out(dq, q, s);
      }
      dq.copy_(dq.to(at::kBFloat16));  // the value a loader reconstructs
      at::Tensor e = err[i];
      at::sub_out(e, col, dq);
      if (i + 1 < n) {
        block.narrow(0, i + 1, n - i - 1).addr_(u_block[i].narrow(0, i + 1, n - i - 1), e, 1, -1);
      }
    }
    if (end < cols) {
      wt.narrow(0, end, cols - end)
          .addmm_(u.narrow(0, begin, n).narrow(1, end, cols - end).t(), err, 1, -1);
    }
  }

  at::Tensor codes = at::empty_like(weight);
  codes.index_copy_(1, perm, codes_t.t());
  GptqResult result;
  result.weight = MakeQuantizedWeight(codes, grid, go);
  if (!AllFinite(result.weight.dequantized)) {
    return absl::InternalError("GPTQ produced a non-finite dequantized weight");
  }
  result.fallback = prepared.fallback;
  result.fallback_reason = prepared.fallback_reason;
  result.damping = prepared.damping;
  result.rel_damp = prepared.rel_damp;
  result.damp_retries = prepared.damp_retries;
  result.dead_columns = prepared.dead_columns;
  return result;
}

absl::StatusOr<GptqResult> QuantizeGptq(const at::Tensor& w, const at::Tensor& h,
                                        const GptqOptions& options) {
  absl::StatusOr<PreparedHessian> prepared = PrepareHessian(h, options);
  if (!prepared.ok()) return prepared.status();
  return QuantizeGptq(w, *prepared, options);
}

absl::StatusOr<std::vector<GptqResult>> QuantizeGptqShared(const std::vector<at::Tensor>& weights,
                                                           const at::Tensor& h,
                                                           const GptqOptions& options) {
  absl::StatusOr<PreparedHessian> prepared = PrepareHessian(h, options);
  if (!prepared.ok()) return prepared.status();
  std::vector<GptqResult> results;
  results.reserve(weights.size());
  for (size_t k = 0; k < weights.size(); ++k) {
    absl::StatusOr<GptqResult> r = QuantizeGptq(weights[k], *prepared, options);
    if (!r.ok()) {
      return absl::Status(r.status().code(),
                          absl::StrCat("weights[", k, "]: ", r.status().message()));
    }
    results.push_back(*std::move(r));
  }
  return results;
}

double RelativeErrorOf(double num, double den) {
  if (den == 0.0) return num == 0.0 ? 0.0 : std::numeric_limits<double>::infinity();
  return num / den;
}

namespace {

absl::Status CheckPair(const at::Tensor& w, const at::Tensor& q) {
  if (!w.defined() || !q.defined() || w.dim() != 2 || w.sizes() != q.sizes()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "weight ", w.defined() ? SizesString(w) : "undefined", " and quantized weight ",
        q.defined() ? SizesString(q) : "undefined", " must be 2-D of the same shape"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<double> RelativeOutputError(const at::Tensor& w, const at::Tensor& q,
                                           const at::Tensor& x) {
  if (absl::Status s = CheckPair(w, q); !s.ok()) return s;
  if (!x.defined() || x.dim() != 2 || x.size(1) != w.size(1)) {
    return absl::InvalidArgumentError(absl::StrCat("inputs have shape ",
                                                   x.defined() ? SizesString(x) : "undefined",
                                                   ": must be [N, ", w.size(1), "]"));
  }
  at::Tensor wd = w.to(at::kDouble);
  at::Tensor xd = x.to(wd.device(), at::kDouble);
  at::Tensor delta = wd - q.to(wd.device(), at::kDouble);
  const double num = at::mm(delta, xd.t()).square().sum().item<double>();
  const double den = at::mm(wd, xd.t()).square().sum().item<double>();
  return RelativeErrorOf(num, den);
}

absl::StatusOr<double> RelativeHessianError(const at::Tensor& w, const at::Tensor& q,
                                            const at::Tensor& h) {
  absl::StatusOr<at::Tensor> traces = HessianErrorTraces(w, q, h);
  if (!traces.ok()) return traces.status();
  const at::Tensor t = traces->cpu();
  return RelativeErrorOf(t[0].item<double>(), t[1].item<double>());
}

absl::StatusOr<at::Tensor> HessianErrorTraces(const at::Tensor& w, const at::Tensor& q,
                                              const at::Tensor& h, int64_t max_rows) {
  if (absl::Status s = CheckPair(w, q); !s.ok()) return s;
  if (!h.defined() || h.dim() != 2 || h.size(0) != w.size(1) || h.size(1) != w.size(1)) {
    return absl::InvalidArgumentError(absl::StrCat("hessian has shape ",
                                                   h.defined() ? SizesString(h) : "undefined",
                                                   ": must be [", w.size(1), ", ", w.size(1), "]"));
  }
  at::Tensor ws = w, qs = q;
  const int64_t rows = w.size(0);
  if (max_rows > 0 && rows > max_rows) {
    const at::Tensor pick =
        at::floor_divide(at::arange(max_rows, w.options().dtype(at::kLong)) * rows, max_rows);
    ws = w.index_select(0, pick);
    qs = q.to(w.device()).index_select(0, pick);
  }
  // Both traces from one product: [W − Q; W] H, each row dotted with its own row.
  at::Tensor wd = ws.to(at::kDouble);
  at::Tensor both = at::cat({wd - qs.to(wd.device(), at::kDouble), wd});
  at::Tensor per_row = at::mm(both, h.to(wd.device(), at::kDouble)).mul_(both).sum(1);
  const int64_t n = ws.size(0);
  return at::stack({per_row.narrow(0, 0, n).sum(), per_row.narrow(0, n, n).sum()});
}

}  // namespace mq::quant
