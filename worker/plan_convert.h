// Conversions between the engine's plain C++ inspection types (worker/model/inspect.h) and
// the mq.v1 protos. Pure functions.
#pragma once

#include "mq/v1/state.pb.h"
#include "worker/model/inspect.h"

namespace mq::worker {

// The inspection a job spec asks for (model path, gang size, bits, group, targets, samples).
model::InspectRequest ToInspectRequest(const mq::v1::JobSpec& spec);
mq::v1::InspectReport ToProto(const model::InspectReport& report);

}  // namespace mq::worker
