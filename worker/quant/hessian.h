// GPTQ input Hessian accumulation (DESIGN.md §4): H = (2/N)·Σ x xᵀ over the N calibration tokens
// a linear layer sees, accumulated in fp32.
//
// Σ xxᵀ is symmetric, so a wide accumulator computes only its lower half: the columns are cut
// into panels of `panel` columns, and each Add multiplies panel i's columns with columns
// [0, end of panel i) — one rectangular GEMM per panel, (P+1)/2P of the full product's work for
// P panels (62.5% at 7168 columns and the default panel). The upper half is mirrored from the
// lower when the sum is read (sum, Finalize, Merge of this accumulator into another).
//
// For torch code only (includes ATen; never include together with a .pb.h, DESIGN.md §7).
// Threading: one owner; every call on an object, the const ones included (reading the sum may
// refresh its mirrored half), from one thread at a time. Durability: in memory only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mq::quant {

class HessianAccumulator {
 public:
  // Columns per panel of the lower-half accumulation by default: large enough that every
  // panel's GEMM fills an H100/H200 with tiles, small enough to save a third of the work at the
  // experts' 7168 columns.
  static constexpr int64_t kDefaultPanel = 1792;

  // An empty accumulator (Σ xxᵀ = 0, N = 0) for inputs of `in_features` (> 0) columns, kept as
  // fp32 [in, in] on `device`. Inputs narrower than two panels are multiplied whole; `panel`
  // (> 0; tests use small ones) sets the panel width.
  explicit HessianAccumulator(int64_t in_features, c10::Device device = c10::kCPU,
                              int64_t panel = kDefaultPanel);

  // Adds the rows of `x` ([..., in_features]; the leading dimensions are flattened to tokens;
  // any floating dtype, any device — moved to the accumulator's device) to Σ xxᵀ and N. fp32 and
  // fp64 inputs are multiplied in fp32 (on CUDA this follows torch's TF32 setting for fp32
  // matmuls, off by default); bf16/fp16 inputs on CUDA use a tensor-core GEMM with fp32 output
  // (each product is exact, accumulation in fp32); on CPU they are widened to fp32 first. Zero
  // rows add nothing but count as tokens. Non-finite values are not checked here (that would
  // cost a device sync per call): they make Finalize fail. InvalidArgument naming the input for
  // a wrong last dimension or a non-float dtype.
  absl::Status Add(const at::Tensor& x);

  // Adds another accumulator's Σ xxᵀ and N (shards of the same layer's tokens).
  // InvalidArgument when in_features differ.
  absl::Status Merge(const HessianAccumulator& other);
  // Same, for a raw shard received from elsewhere (e.g. after an all-reduce): `sum` fp32-able
  // [in, in], `tokens` >= 0.
  absl::Status MergeSum(const at::Tensor& sum, int64_t tokens);

  int64_t in_features() const { return in_features_; }
  int64_t tokens() const { return tokens_; }
  // Σ xxᵀ, fp32 [in, in] (a reference to the live accumulator; clone to keep; the next Add
  // changes it).
  const at::Tensor& sum() const;

  // H = (2/N)·Σ xxᵀ (fp32 [in, in], a new tensor); all zeros when N = 0 (GPTQ then falls back to
  // RTN and says so). InvalidArgument "hessian of N tokens contains NaN or Inf" when the sum is
  // not finite (non-finite calibration inputs, or fp32 overflow).
  absl::StatusOr<at::Tensor> Finalize() const;

 private:
  // Copies the lower half's panels onto the upper half when an Add left it stale.
  void Mirror() const;

  int64_t in_features_;
  int64_t panel_;  // == in_features_ when the product is taken whole
  int64_t tokens_ = 0;
  // Only the lower half (panel rows × the columns up to the panel's end) is accumulated; the
  // rest is valid while `mirrored_` holds (a lazily refreshed view of the symmetric sum).
  mutable at::Tensor sum_;
  mutable bool mirrored_ = true;
};

}  // namespace mq::quant
