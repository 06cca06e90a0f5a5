// Conversions between ATen tensors and safetensors records (worker/model/safetensors_writer.h).
// Engine code only (includes ATen; never together with a .pb.h). Pure functions.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "absl/status/statusor.h"
#include "worker/model/checkpoint_reader.h"
#include "worker/model/safetensors_writer.h"

namespace mq::model {

// Copies `t` (any device) into a record named `name`: I8, I32, I64 and BF16 keep their dtype;
// every other dtype is converted to F32.
TensorData ToTensorData(const std::string& name, const at::Tensor& t);

// A TensorData that refers to `t`'s memory instead of copying it (t stays alive while the result
// does). `t` must be a contiguous CPU tensor of a dtype ToTensorData keeps (I8, I32, I64, BF16,
// F32) that nobody changes while the result is in use; anything else is copied as
// ToTensorData does.
TensorData ToTensorDataView(const std::string& name, const at::Tensor& t);

// A CPU tensor copied from a mapped view: F32, F16, BF16, I8, I32, I64 and BOOL keep their
// dtype. InvalidArgument naming the tensor for any other dtype.
absl::StatusOr<at::Tensor> FromTensorView(const TensorView& view);

}  // namespace mq::model
