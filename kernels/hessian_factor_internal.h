// Private to kernels/: the argument check shared by the CPU reference and the GPU launcher of the
// Hessian factorisation (hessian_factor_host.cc defines it).
#pragma once

#include "absl/status/status.h"
#include "mq/kernels/hessian_factor.h"

namespace mq::kernels {

// InvalidArgument naming the argument for n outside [1, 2^31) or a null `a` / `u`.
absl::Status ValidateInverseFactorArgs(const InverseFactorArgs& args);

}  // namespace mq::kernels
