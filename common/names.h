// Display names of mq.v1 enums shared by the coordinator's messages and the client's output.
// Pure functions; safe from any thread.
#pragma once

#include <string>

#include "mq/v1/state.pb.h"

namespace mq {

// JOB_STATE_FAILED -> "FAILED".
std::string JobStateName(mq::v1::JobState state);
// True for SUCCEEDED, FAILED and CANCELLED.
bool IsTerminal(mq::v1::JobState state);
// METHOD_GPTQ (or unspecified) -> "gptq", METHOD_AWQ -> "awq", METHOD_AWQ_GPTQ -> "awq-gptq",
// METHOD_RTN -> "rtn".
std::string MethodName(mq::v1::Method method);

}  // namespace mq
