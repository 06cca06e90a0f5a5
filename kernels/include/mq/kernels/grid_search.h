// MSE scale (grid) search: per-(row, group) quantization scales, and zero points when
// asymmetric, chosen among shrunk min-max candidates (worker/quant/grid.h, "MSE grid search").
//
// Layout (row-major, no padding):
//   w            fp32 [rows, cols]
//   scales       fp32 [rows, G]  output, G = ceil(cols / group_size); > 0 and bf16-exact
//   zero_points  fp32 [rows, G]  output (asymmetric only), integral in [qmin, qmax]
// Group g of a row is columns [g·group_size, (g+1)·group_size), the last one shorter when
// group_size does not divide cols. qmin = -2^(bits-1), qmax = 2^(bits-1) - 1.
//
// Per (row, group), with mn = min(min(w), 0) and mx = max(max(w), 0) over the group, and for
// k = 0 .. n_points-1 (all fp32 with IEEE division and round-to-nearest-even, no FMA):
//   p_k = float(1 - k·(1 - min_shrink) / (n_points - 1))            (computed in double)
//   symmetric:  s_k = R(max(-mn, mx) / ((qmax - qmin) / 2) · p_k),  z_k = 0
//   asymmetric: lo = mn·p_k, hi = mx·p_k,  s_k = R((hi - lo) / (qmax - qmin)),
//               z_k = clamp(rint(qmin - lo / s_k), qmin, qmax)
//   where R rounds to bf16 and replaces a zero or subnormal result by 2^-7;
//   loss_k = Σ_columns |bf16((q - z_k)·s_k) - w|^norm,  q = clamp(rint(w / s_k + z_k), qmin, qmax)
//   (the per-element term in fp32: e·e when norm == 2, otherwise powf(e, norm) on the CPU and
//   e^⌊norm⌋ · 2^((norm − ⌊norm⌋)·log2 e) from the approximate base-2 log and exponential on CUDA,
//   under 1e-6 relative from powf; CUDA quantizes w·(1/s_k) for w / s_k, which moves a code only
//   at a rounding midpoint, where both codes are equally far from w).
// The output is the candidate of smallest loss; ties keep the smaller k (larger p), and k = 0
// (plain min-max) is the starting point, so a NaN or infinite loss never displaces it.
//
// Determinism and agreement: the candidates (s_k, z_k) are bit-identical between the CPU
// reference, the CUDA kernel and worker/quant's CPU ATen path. The losses are not: the CPU
// reference sums the fp32 terms in double in column order, the CUDA kernel sums them in fp32 in
// a tree order (per thread, then across the warp / block), and CUDA's power differs from the
// host's powf (above). So when two candidates' losses are within rounding (~1e-6 relative) of
// each other, the paths can choose different ones; each result is deterministic for a given input
// and path. (ATen's CUDA ops divide by a scalar as a multiply by its reciprocal, so candidate
// scales computed that way can also differ by one bf16 step at a rounding boundary; these functions
// always divide.)
//
// This header compiles without CUDA: cudaStream_t is only forward-declared.
#pragma once

#include <cstdint>

#include "absl/status/status.h"

struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace mq::kernels {

struct GridSearchConfig {
  int64_t group_size = 128;  // > 0 columns per group (per-channel: group_size = cols)
  int bits = 4;              // 2..8
  bool symmetric = true;     // false: asymmetric, with zero points
  int n_points = 80;         // >= 2 candidates
  double min_shrink = 0.2;   // in (0, 1]: p of the last candidate
  double norm = 2.4;         // > 0: exponent of the per-element error
};

struct GridSearchArgs {
  const float* w = nullptr;
  int64_t rows = 0;  // >= 0
  int64_t cols = 0;  // >= 0, < 2^31
  GridSearchConfig config;
  float* scales = nullptr;       // [rows, G]
  float* zero_points = nullptr;  // [rows, G] when asymmetric; must be null when symmetric
};

// ceil(cols / group_size): the output's second dimension (0 for cols == 0 or group_size <= 0).
constexpr int64_t GridSearchGroups(int64_t cols, int64_t group_size) {
  return cols > 0 && group_size > 0 ? (cols + group_size - 1) / group_size : 0;
}

// InvalidArgument naming the argument, its value and what is allowed; OK for a valid empty
// matrix (rows or cols 0, pointers then unchecked).
absl::Status ValidateGridSearchArgs(const GridSearchArgs& args);

// CPU reference (host pointers). `num_threads` <= 0 picks a count from the size (at most
// hardware_concurrency and 16); 1 runs on the calling thread only. Results do not depend on the
// thread count. Thread-safe: keeps no state. InvalidArgument as ValidateGridSearchArgs.
absl::Status GridSearchCpu(const GridSearchArgs& args, int num_threads = 0);

// True when this build contains the CUDA kernel (MQ_ENABLE_CUDA=ON).
bool GridSearchCudaBuilt();

// OK when the CUDA kernel can run on `device`: any architecture this binary holds code for
// (SASS, or PTX the driver can compile). FailedPrecondition naming the device and what is missing
// otherwise; Unimplemented when mq was built without CUDA.
absl::Status GridSearchIsSupported(int device);

// Enqueues the search on `stream` (device pointers of the current device). Returns after the
// launch; the caller synchronizes before reading the outputs and keeps `w` alive until then.
// Any group_size works: groups of up to 256 columns take one warp each with the group in
// registers, groups of up to 8192 columns one 256-thread block each with the group in
// registers, longer groups one block each reading the group from memory per candidate.
// InvalidArgument as ValidateGridSearchArgs; Internal with the CUDA error text when the launch
// fails; Unimplemented without CUDA. Does not call GridSearchIsSupported (call it once per device
// up front).
absl::Status LaunchGridSearch(const GridSearchArgs& args, cudaStream_t stream);

}  // namespace mq::kernels
