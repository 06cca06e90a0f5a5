#include "worker/model/tensor_io.h"

#include <cstring>

namespace mq::model {

TensorData ToTensorData(const std::string& name, const at::Tensor& t) {
  at::Tensor c = t.to(at::kCPU).contiguous();
  TensorData d;
  d.name = name;
  switch (c.scalar_type()) {
    case at::kChar:
      d.dtype = DType::kI8;
      break;
    case at::kInt:
      d.dtype = DType::kI32;
      break;
    case at::kLong:
      d.dtype = DType::kI64;
      break;
    case at::kBFloat16:
      d.dtype = DType::kBF16;
      break;
    default:
      c = c.to(at::kFloat);
      d.dtype = DType::kF32;
  }
  d.shape.assign(c.sizes().begin(), c.sizes().end());
  d.bytes.resize(c.nbytes());
  std::memcpy(d.bytes.data(), c.data_ptr(), c.nbytes());
  return d;
}

}  // namespace mq::model
