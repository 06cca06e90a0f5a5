// Conversions between ATen tensors and safetensors records (worker/model/safetensors_writer.h).
// Engine code only (includes ATen; never together with a .pb.h). Pure functions.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "worker/model/safetensors_writer.h"

namespace mq::model {

// Copies `t` (any device) into a record named `name`: I8, I32, I64 and BF16 keep their dtype;
// every other dtype is converted to F32.
TensorData ToTensorData(const std::string& name, const at::Tensor& t);

}  // namespace mq::model
