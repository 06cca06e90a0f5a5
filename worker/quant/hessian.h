// GPTQ input Hessian accumulation (DESIGN.md §4): H = (2/N)·Σ x xᵀ over the N calibration tokens
// a linear layer sees, accumulated in fp32.
//
// For torch code only (includes ATen; never include together with a .pb.h, DESIGN.md §7).
// Threading: one owner; Add/Merge mutate the accumulator and must not run concurrently with any
// other call on the same object. Durability: in memory only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mq::quant {

class HessianAccumulator {
 public:
  // An empty accumulator (Σ xxᵀ = 0, N = 0) for inputs of `in_features` (> 0) columns, kept as
  // fp32 [in, in] on `device`.
  explicit HessianAccumulator(int64_t in_features, c10::Device device = c10::kCPU);

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
  // Σ xxᵀ, fp32 [in, in] (a reference to the live accumulator; clone to keep).
  const at::Tensor& sum() const { return sum_; }

  // H = (2/N)·Σ xxᵀ (fp32 [in, in], a new tensor); all zeros when N = 0 (GPTQ then falls back to
  // RTN and says so). InvalidArgument "hessian of N tokens contains NaN or Inf" when the sum is
  // not finite (non-finite calibration inputs, or fp32 overflow).
  absl::StatusOr<at::Tensor> Finalize() const;

 private:
  int64_t in_features_;
  int64_t tokens_ = 0;
  at::Tensor sum_;
};

}  // namespace mq::quant
