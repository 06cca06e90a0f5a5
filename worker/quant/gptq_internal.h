// Pieces of PrepareHessian shared with the batched solve (gptq_batched.cc). Not a public API.
// For torch code only (includes ATen). Pure functions.
#pragma once

#include <ATen/ATen.h>

#include "absl/status/statusor.h"
#include "worker/quant/gptq.h"

namespace mq::quant::internal {

// PrepareHessian's validation and dead-column fix, without factorising: fills `p` (all but the
// factor) and returns the permuted, dead-fixed H in the work dtype (fp64 or fp32), undefined when
// `p.fallback` is kRtn (a zero H). InvalidArgument as PrepareHessian.
absl::StatusOr<at::Tensor> PrepareUpToFactor(const at::Tensor& h, const GptqOptions& options,
                                             PreparedHessian& p);

}  // namespace mq::quant::internal
