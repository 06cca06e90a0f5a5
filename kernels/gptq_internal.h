// Private to kernels/: argument checks shared by the GPTQ CPU reference and the launcher.
#pragma once

#include "absl/status/status.h"
#include "mq/kernels/gptq.h"

namespace mq::kernels {

// InvalidArgument naming the argument for bad sizes or null pointers (OK for batch == 0).
absl::Status ValidateGptqSolveArgs(const GptqSolveArgs& args);

}  // namespace mq::kernels
