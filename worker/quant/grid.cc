#include "worker/quant/grid.h"

#include <ATen/ATen.h>

#include <cfloat>
#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/torch/grid_ops.h"

namespace mq::quant {
namespace {

// torch.finfo(torch.bfloat16).eps: what compressed-tensors substitutes for a zero scale.
constexpr double kBf16Eps = 0.0078125;

// Rounds fp32 scales to bf16 (round-to-nearest-even) and replaces zero/subnormal ones by eps.
at::Tensor RoundScales(const at::Tensor& raw) {
  at::Tensor s = raw.to(at::kBFloat16).to(at::kFloat);
  return at::where(s < FLT_MIN, at::full({}, kBf16Eps, s.options()), s);
}

// One candidate grid for weights grouped as wg [O, ng, G], given per-group min (<= 0) and max
// (>= 0), with the range shrunk by `shrink`.
Grid CandidateGrid(const at::Tensor& mn, const at::Tensor& mx, double shrink,
                   const GridOptions& options) {
  const double qmin = static_cast<double>(QMin(options.bits));
  const double qmax = static_cast<double>(QMax(options.bits));
  Grid grid;
  if (options.symmetric) {
    at::Tensor raw = at::maximum(mn.neg(), mx).div((qmax - qmin) / 2.0);
    if (shrink != 1.0) raw = raw.mul(shrink);
    grid.scales = RoundScales(raw);
  } else {
    at::Tensor lo = shrink != 1.0 ? mn.mul(shrink) : mn;
    at::Tensor hi = shrink != 1.0 ? mx.mul(shrink) : mx;
    grid.scales = RoundScales(hi.sub(lo).div(qmax - qmin));
    grid.zero_points = lo.div(grid.scales).neg().add(qmin).round().clamp(qmin, qmax);
  }
  return grid;
}

}  // namespace

std::string ScaleSearchName(ScaleSearch search) {
  return search == ScaleSearch::kMse ? "mse" : "minmax";
}

absl::StatusOr<ScaleSearch> ParseScaleSearch(const std::string& name) {
  if (name == "minmax") return ScaleSearch::kMinMax;
  if (name == "mse") return ScaleSearch::kMse;
  return absl::InvalidArgumentError(
      absl::StrCat("scale_search = \"", name, "\": must be \"minmax\" or \"mse\""));
}

absl::Status ValidateGridOptions(const GridOptions& options) {
  if (options.bits < 2 || options.bits > 8) {
    return absl::InvalidArgumentError(absl::StrCat("bits = ", options.bits, ": must be in [2, 8]"));
  }
  if (options.group_size < 0) {
    return absl::InvalidArgumentError(absl::StrCat("group_size = ", options.group_size,
                                                   ": must be positive, or 0 for per-channel"));
  }
  if (options.scale_search == ScaleSearch::kMse) {
    if (options.mse_grid_points < 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("mse_grid_points = ", options.mse_grid_points, ": must be >= 2"));
    }
    if (!(options.mse_min_shrink > 0.0 && options.mse_min_shrink <= 1.0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("mse_min_shrink = ", options.mse_min_shrink, ": must be in (0, 1]"));
    }
    if (!(options.mse_norm > 0.0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("mse_norm = ", options.mse_norm, ": must be > 0"));
    }
  }
  return absl::OkStatus();
}

int64_t EffectiveGroupSize(int64_t in_features, int64_t group_size) {
  return group_size > 0 ? group_size : in_features;
}

int64_t NumGroups(int64_t in_features, int64_t group_size) {
  const int64_t g = EffectiveGroupSize(in_features, group_size);
  return g > 0 ? (in_features + g - 1) / g : 0;
}

Grid ComputeGrid(const at::Tensor& w, const GridOptions& options) {
  const int64_t rows = w.size(0);
  const int64_t cols = w.size(1);
  const int64_t g = EffectiveGroupSize(cols, options.group_size);
  const int64_t groups = NumGroups(cols, options.group_size);
  // MSE search on a CUDA tensor: one kernel (kernels/grid_search.cu) instead of ~n_points rounds
  // of ATen ops. Same candidates; only near-tied losses may pick a different one (grid_search.h).
  if (options.scale_search == ScaleSearch::kMse && w.is_cuda() && rows > 0 && cols > 0 &&
      kernels::GridSearchTorchSupported(w.device()).ok()) {
    kernels::GridSearchConfig config;
    config.group_size = g;
    config.bits = options.bits;
    config.symmetric = options.symmetric;
    config.n_points = options.mse_grid_points;
    config.min_shrink = options.mse_min_shrink;
    config.norm = options.mse_norm;
    Grid grid;
    const absl::Status s = kernels::GridSearchMse(w.to(at::kFloat).contiguous(), config,
                                                  &grid.scales, &grid.zero_points);
    TORCH_CHECK(s.ok(), "ComputeGrid: MSE grid search kernel: ", s.ToString());
    return grid;
  }
  at::Tensor wf = w.to(at::kFloat);
  // Zero padding of the last, short group changes nothing: min is clipped to <= 0 and max to
  // >= 0 anyway, and a zero quantizes and dequantizes to exactly zero (zp is integral).
  if (groups * g != cols) wf = at::constant_pad_nd(wf, {0, groups * g - cols}, 0.0);
  at::Tensor wg = wf.reshape({rows, groups, g});
  at::Tensor mn = at::amin(wg, {-1}).clamp_max(0.0);
  at::Tensor mx = at::amax(wg, {-1}).clamp_min(0.0);

  Grid best = CandidateGrid(mn, mx, 1.0, options);
  if (options.scale_search == ScaleSearch::kMinMax) return best;

  auto loss_of = [&](const Grid& grid) {
    at::Tensor s = grid.scales.unsqueeze(-1);
    at::Tensor z = grid.zero_points.defined() ? grid.zero_points.unsqueeze(-1) : at::Tensor();
    at::Tensor dq = DequantizeCodes(QuantizeCodes(wg, s, z, options.bits), s, z).to(at::kFloat);
    return dq.sub_(wg).abs_().pow_(options.mse_norm).sum({-1});
  };
  at::Tensor best_loss = loss_of(best);
  const int n = options.mse_grid_points;
  for (int k = 1; k < n; ++k) {
    const double shrink = 1.0 - k * (1.0 - options.mse_min_shrink) / (n - 1);
    Grid candidate = CandidateGrid(mn, mx, shrink, options);
    at::Tensor loss = loss_of(candidate);
    at::Tensor better = loss < best_loss;  // strict: ties keep the larger shrink factor
    best_loss = at::where(better, loss, best_loss);
    best.scales = at::where(better, candidate.scales, best.scales);
    if (best.zero_points.defined()) {
      best.zero_points = at::where(better, candidate.zero_points, best.zero_points);
    }
  }
  return best;
}

at::Tensor ExpandGroups(const at::Tensor& per_group, int64_t in_features, int64_t group_size) {
  const int64_t g = EffectiveGroupSize(in_features, group_size);
  at::Tensor index = at::arange(in_features, per_group.options().dtype(at::kLong))
                         .div(g, /*rounding_mode=*/"floor");
  return per_group.index_select(1, index);
}

at::Tensor QuantizeCodes(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero_point,
                         int bits) {
  at::Tensor x = w.to(at::kFloat).div(scale);
  if (zero_point.defined()) x.add_(zero_point);
  return x.round_().clamp_(static_cast<double>(QMin(bits)), static_cast<double>(QMax(bits)));
}

at::Tensor DequantizeCodes(const at::Tensor& codes, const at::Tensor& scale,
                           const at::Tensor& zero_point) {
  // Through int32 so that a code rounded from a small negative value (-0.0 as a float) is +0,
  // as compressed-tensors' integer codes are: the sign of a zero is part of bit-exactness.
  at::Tensor d = codes.to(at::kInt).to(at::kFloat);
  if (zero_point.defined()) d = d.sub(zero_point.to(at::kInt).to(at::kFloat));
  return d.mul(scale.to(at::kFloat)).to(at::kBFloat16);
}

QuantizedWeight MakeQuantizedWeight(const at::Tensor& codes, const Grid& grid,
                                    const GridOptions& options) {
  const int64_t cols = codes.size(1);
  QuantizedWeight q;
  q.bits = options.bits;
  q.group_size = options.group_size;
  q.codes = codes.to(at::kChar);
  q.scales = grid.scales.to(at::kBFloat16);
  at::Tensor zero_full;
  if (grid.zero_points.defined()) {
    q.zero_points = grid.zero_points.to(at::kChar);
    zero_full = ExpandGroups(grid.zero_points, cols, options.group_size);
  }
  q.dequantized =
      DequantizeCodes(codes, ExpandGroups(grid.scales, cols, options.group_size), zero_full);
  return q;
}

bool AllFinite(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  if (!at::isFloatingType(t.scalar_type())) return true;
  return at::isfinite(t).all().item<bool>();
}

}  // namespace mq::quant
