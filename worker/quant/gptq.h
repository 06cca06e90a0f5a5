// GPTQ (Frantar et al. 2022) as specified in DESIGN.md §4, without the reference's bugs
// (docs/REFERENCE-MOE-QUANT.md §2.3, §2.4, §2.6):
//
//  1. Dead inputs: columns with diag(H) == 0 get diagonal 1 (row/column otherwise zero) and their
//     weight column is zeroed (the layer never sees that input).
//  2. Grid: scales/zero points of every group are computed ONCE from the weight (dead columns
//     zeroed) in ORIGINAL column order (grid.h; min-max or MSE search); column j is always
//     quantized with the scale of its original group j / G, whatever the processing order — so
//     the output needs no g_idx and `actorder` stays null on disk.
//  3. Damping: H += λ·I with λ = rel_damp · mean(diag(H)) (after step 1).
//  4. Act-order: columns processed in order of descending diag(H) (stable sort, so ties keep
//     the original order); H is permuted accordingly.
//  5. U = upper Cholesky factor of H⁻¹ (by default computed in float64, then used in fp32).
//  6. Columns processed in blocks of block_size (128) with lazy batch updates: inside a block
//     each column's error (w − dequant(q)) is propagated to the block's later columns through
//     the rows of U scaled by 1/U_jj, and after the block to all later columns with one GEMM.
//     The error is measured against the bf16-rounded dequantized value, i.e. exactly what a
//     loader reconstructs.
//  7. Failures are never silent and never produce NaN: a Cholesky failure raises the damping
//     geometrically (rel_damp · damp_growth^k, k = 1..max_damp_retries) and reports
//     kRaisedDamping; if every try fails, or H is zero (no calibration tokens), the result is
//     exactly QuantizeRtn(original weight) and reports kRtn with the reason. Non-finite inputs
//     are errors.
//
// Weights that read the same input (gate_proj and up_proj of one MLP) share ONE Hessian: use
// QuantizeGptqShared, or PrepareHessian once and QuantizeGptq(w, prepared) for each weight. The
// Hessian work (dead columns, damping, permutation, factorisation) depends on H alone and the
// caller's H is never modified, so shared and separate calls give bit-identical results.
//
// For torch code only (includes ATen; never include together with a .pb.h, DESIGN.md §7).
// Threading: pure functions over immutable inputs, no shared state; a PreparedHessian may be used
// from several threads at once. Tensors may be CPU or CUDA; work runs on the weight's device.
// CUDA fp32 GEMMs follow torch's TF32 setting (off by default).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/quant/grid.h"

namespace mq::quant {

enum class Fallback {
  kNone,           // GPTQ at the requested damping
  kRaisedDamping,  // GPTQ, but only after raising the damping (see damping / rel_damp)
  kRtn,            // round-to-nearest on the original weight (see fallback_reason)
};
// "none", "raised_damping", "rtn".
std::string FallbackName(Fallback fallback);

struct GptqOptions {
  GridOptions grid;                // bits, group size, symmetric, scale search (grid.h)
  bool act_order = true;           // process columns by descending diag(H)
  int64_t block_size = 128;        // > 0; columns per lazy-batch block
  double rel_damp = 0.01;          // > 0; λ = rel_damp · mean(diag(H))
  int max_damp_retries = 4;        // >= 0 extra Cholesky tries, each with λ × damp_growth
  double damp_growth = 10.0;       // > 1
  bool fp64_factorization = true;  // compute U in float64 (robust; the loop stays fp32)
};

// InvalidArgument naming the field, its value and what is allowed.
absl::Status ValidateGptqOptions(const GptqOptions& options);

// What GPTQ derives from a Hessian alone (shared by every weight that reads the same input).
struct PreparedHessian {
  int64_t in_features = 0;
  at::Tensor perm;  // int64 [I]: perm[t] = original column processed t-th
  at::Tensor dead;  // bool [I]: diag(H) == 0
  // fp32 [I, I]: upper Cholesky factor of the permuted, damped H⁻¹ with each row divided by its
  // diagonal; undefined when fallback == kRtn.
  at::Tensor u;
  // true: `u` holds instead the feedback matrix R of the Cholesky-feedback form
  // (kernels/include/mq/kernels/gptq.h), which only QuantizeGptqBatched's fused CUDA solve reads
  // (PrepareHessiansBatched with HessianFactorization::kCholeskyFeedback).
  bool feedback_form = false;
  int64_t dead_columns = 0;
  double mean_diag = 0;  // mean(diag(H)) after the dead-column fix
  double damping = 0;    // λ actually added to the diagonal
  double rel_damp = 0;   // λ / mean_diag
  int damp_retries = 0;  // Cholesky tries that failed before the one used
  Fallback fallback = Fallback::kNone;
  std::string fallback_reason;  // empty for kNone
};

// Validates `h` ([I, I], I > 0, floating point, finite, no negative diagonal entry) and prepares
// it. InvalidArgument naming the problem (e.g. "hessian contains NaN or Inf") otherwise.
// A zero H or an H that no tried damping makes factorisable is not an error: the result says
// kRtn and why.
absl::StatusOr<PreparedHessian> PrepareHessian(const at::Tensor& h, const GptqOptions& options);

struct GptqResult {
  QuantizedWeight weight;  // codes, bf16 scales, zero points (asym), bf16 dequantized weight
  Fallback fallback = Fallback::kNone;
  std::string fallback_reason;
  double damping = 0;   // absolute λ used (0 for kRtn)
  double rel_damp = 0;  // λ / mean(diag(H)) used (0 for kRtn)
  int damp_retries = 0;
  int64_t dead_columns = 0;
};

// GPTQ of `w` ([O, I], any float dtype, finite) with a prepared Hessian of I columns.
// InvalidArgument for bad options, a bad weight (shape, dtype, NaN/Inf) or mismatching I.
absl::StatusOr<GptqResult> QuantizeGptq(const at::Tensor& w, const PreparedHessian& prepared,
                                        const GptqOptions& options);
// PrepareHessian(h) then QuantizeGptq(w, prepared).
absl::StatusOr<GptqResult> QuantizeGptq(const at::Tensor& w, const at::Tensor& h,
                                        const GptqOptions& options);
// Several weights reading the same input (e.g. gate_proj and up_proj): ONE preparation (one
// damping, one permutation), results in the order of `weights`.
absl::StatusOr<std::vector<GptqResult>> QuantizeGptqShared(const std::vector<at::Tensor>& weights,
                                                           const at::Tensor& h,
                                                           const GptqOptions& options);

// Relative output error ‖(W − Q)Xᵀ‖² / ‖WXᵀ‖² for calibration inputs `x` ([N, I]), computed in
// float64. 0 when both are 0; +inf when only the denominator is. InvalidArgument on shape
// mismatch.
absl::StatusOr<double> RelativeOutputError(const at::Tensor& w, const at::Tensor& q,
                                           const at::Tensor& x);
// The same through a Hessian: tr((W − Q) H (W − Q)ᵀ) / tr(W H Wᵀ) (H in original column order).
absl::StatusOr<double> RelativeHessianError(const at::Tensor& w, const at::Tensor& q,
                                            const at::Tensor& h);

// The two traces of RelativeHessianError, tr((W − Q) H (W − Q)ᵀ) and tr(W H Wᵀ), as a float64
// tensor [2] on the weight's device, queued without waiting for the device (no host sync), over
// at most `max_rows` rows of W and Q: all rows when W has no more (then the traces are exact),
// otherwise `max_rows` evenly spaced ones (rows ⌊i·O/max_rows⌋), whose ratio estimates the
// relative error at a fraction of the cost (O·I² per trace for all rows). max_rows <= 0: all
// rows. RelativeErrorOf turns the traces into the ratio. InvalidArgument on shape mismatch.
absl::StatusOr<at::Tensor> HessianErrorTraces(const at::Tensor& w, const at::Tensor& q,
                                              const at::Tensor& h, int64_t max_rows = 0);
// num / den; 0 when both are 0, +inf when only den is.
double RelativeErrorOf(double num, double den);

}  // namespace mq::quant
