#include "worker/quant/awq.h"

#include <ATen/ATen.h>

#include <cmath>

#include "worker/quant/rtn.h"

namespace mq::quant {

std::vector<double> AwqCandidateAlphas(int grid) {
  std::vector<double> alphas = {-1.0};
  for (int i = 0; grid > 0 && i <= grid; ++i) alphas.push_back(static_cast<double>(i) / grid);
  return alphas;
}

at::Tensor AbsColumnSum(const at::Tensor& x) {
  return x.to(at::kFloat).abs().sum(0, /*keepdim=*/false, at::kDouble);
}

at::Tensor NormalizedWeightColumnSum(const at::Tensor& w, int64_t group_size) {
  const int64_t rows = w.size(0), in = w.size(1);
  const int64_t g = EffectiveGroupSize(in, group_size), groups = NumGroups(in, group_size);
  at::Tensor a = w.to(at::kFloat).abs();
  at::Tensor padded = groups * g == in ? a : at::constant_pad_nd(a, {0, groups * g - in});
  at::Tensor group_max = padded.view({rows, groups, g}).amax(-1);              // [O, groups]
  at::Tensor per_column = ExpandGroups(group_max, in, group_size);             // [O, I]
  at::Tensor ratio = at::where(per_column > 0, a / per_column.clamp_min(1e-30), at::zeros_like(a));
  return ratio.sum(0, /*keepdim=*/false, at::kDouble);
}

at::Tensor AwqScale(const at::Tensor& x_mean, const at::Tensor& w_mean, double alpha) {
  if (alpha < 0) return at::ones(x_mean.sizes(), x_mean.options().dtype(at::kFloat));
  const at::Tensor x = x_mean.to(at::kDouble), w = w_mean.to(x.device(), at::kDouble);
  at::Tensor s = (x.pow(alpha) / (w.pow(1.0 - alpha) + 1e-4)).clamp_min(1e-4);
  s = s / (s.max() * s.min()).sqrt();
  // Rounded to bf16: statistics that differ only in their last bits (another summation order,
  // e.g. another gang size) then give the same scale, hence the same codes.
  return s.to(at::kBFloat16).to(at::kFloat);
}

absl::StatusOr<at::Tensor> FakeQuantizeScaled(const at::Tensor& w, const at::Tensor& s,
                                              const GridOptions& grid) {
  const at::Tensor sf = s.to(w.device(), at::kFloat);
  absl::StatusOr<QuantizedWeight> q = QuantizeRtn(w.to(at::kFloat) * sf.unsqueeze(0), grid);
  if (!q.ok()) return q.status();
  return q->dequantized.to(at::kFloat) / sf.unsqueeze(0);
}

at::Tensor DivideBy(const at::Tensor& gamma, const at::Tensor& s, at::ScalarType stored) {
  const at::Tensor sf = s.to(gamma.device(), at::kFloat);
  return (gamma.to(at::kFloat) / sf).to(stored).to(gamma.scalar_type());
}

at::Tensor ScaleColumns(const at::Tensor& w, const at::Tensor& s, at::ScalarType stored) {
  const at::Tensor sf = s.to(w.device(), at::kFloat);
  return (w.to(at::kFloat) * sf.unsqueeze(0)).to(stored).to(w.scalar_type());
}

at::Tensor DivideRows(const at::Tensor& w, const at::Tensor& s, at::ScalarType stored) {
  const at::Tensor sf = s.to(w.device(), at::kFloat);
  return (w.to(at::kFloat) / sf.unsqueeze(1)).to(stored).to(w.scalar_type());
}

double SquaredError(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0) return 0.0;
  return (a.to(at::kFloat) - b.to(at::kFloat)).square().sum(at::kDouble).item<double>();
}

}  // namespace mq::quant
