// AWQ's numerics (DESIGN.md §9): the per-channel statistics, the candidate scales of the grid
// search, the fake quantization a candidate is judged by, and the folding of a chosen scale
// into the checkpoint. The layer pipeline (worker/pipeline/gang_awq.cc) decides which modules
// form a mapping and how a candidate's loss is measured over the gang.
//
// A mapping smooths one module (a norm, or an up_proj) by 1/s and scales its balance linears'
// input columns by s, so the network computes the same function while the quantized balance
// weights see W·s: channels with large activations get finer steps. For a candidate s the
// balance weights are replaced by Q(W·s)/s (Q = RTN on the job's grid) and the parent block's
// output is compared with the original's on cached calibration inputs.
//
//   x_mean[c] = Σ|x[:, c]| / N                       (fp32 statistics, summed in fp64)
//   w_mean[c] = mean over the rows of every balance weight of |W[r, c]| / max |W[r, group(c)]|
//   s(α)      = max(x_mean^α / (w_mean^(1−α) + 1e-4), 1e-4), divided by √(max s · min s),
//               rounded to bf16
//
// Candidates: s ≡ 1 (plain RTN, always first, so ties keep it) and α = i/grid, i = 0..grid.
//
// For torch code only (includes ATen; never include together with a .pb.h, DESIGN.md §7).
// Threading: pure functions, no shared state; tensors on any device, results on the input's.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/quant/grid.h"

namespace mq::quant {

struct AwqOptions {
  int grid = 20;                 // candidates: s ≡ 1, then α = i / grid, i = 0..grid (0: s ≡ 1 only)
  int64_t max_tokens = 32768;    // calibration tokens (whole gang) cached per layer for the search
};

// The α of each candidate, in order: -1 stands for s ≡ 1, then i / grid for i = 0..grid
// (grid 0: s ≡ 1 alone).
std::vector<double> AwqCandidateAlphas(int grid);

// Σ|x| per input column of x [N, I] (any float dtype) as fp64 [I].
at::Tensor AbsColumnSum(const at::Tensor& x);

// Σ over rows of |W| / (the row's max |W| within the column's group) for w [O, I], as fp64
// [I]; rows whose group is all zero add 0. `group_size` as GridOptions (0 = per channel).
at::Tensor NormalizedWeightColumnSum(const at::Tensor& w, int64_t group_size);

// The candidate scale for α (α < 0: ones) from the means, fp32 [I] on x_mean's device, each
// value rounded to bf16. The formula runs in fp64 and the rounding absorbs differences in the
// statistics' last bits (another summation order, e.g. another gang size).
at::Tensor AwqScale(const at::Tensor& x_mean, const at::Tensor& w_mean, double alpha);

// Q(W·s)/s in fp32 for w [O, I] and s [I]: the weight a candidate's loss sees.
absl::StatusOr<at::Tensor> FakeQuantizeScaled(const at::Tensor& w, const at::Tensor& s,
                                              const GridOptions& grid);

// Folding, in fp32 and rounded once to `stored` (the dtype the output keeps the tensor in),
// returned in the tensor's own dtype:
//   a smoothing norm's γ / s, a balance weight's columns × s, an up_proj's rows / s.
at::Tensor DivideBy(const at::Tensor& gamma, const at::Tensor& s, at::ScalarType stored);
at::Tensor ScaleColumns(const at::Tensor& w, const at::Tensor& s, at::ScalarType stored);
at::Tensor DivideRows(const at::Tensor& w, const at::Tensor& s, at::ScalarType stored);

// Σ (a − b)² in fp64.
double SquaredError(const at::Tensor& a, const at::Tensor& b);

}  // namespace mq::quant
