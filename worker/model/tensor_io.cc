#include "worker/model/tensor_io.h"

#include <cstring>
#include <memory>

#include "absl/strings/str_cat.h"

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

TensorData ToTensorDataView(const std::string& name, const at::Tensor& t) {
  DType dtype;
  switch (t.scalar_type()) {
    case at::kChar: dtype = DType::kI8; break;
    case at::kInt: dtype = DType::kI32; break;
    case at::kLong: dtype = DType::kI64; break;
    case at::kBFloat16: dtype = DType::kBF16; break;
    case at::kFloat: dtype = DType::kF32; break;
    default: return ToTensorData(name, t);
  }
  if (!t.device().is_cpu() || !t.is_contiguous()) return ToTensorData(name, t);
  TensorData d;
  d.name = name;
  d.dtype = dtype;
  d.shape.assign(t.sizes().begin(), t.sizes().end());
  auto owner = std::make_shared<at::Tensor>(t);
  d.view = static_cast<const uint8_t*>(owner->data_ptr());
  d.view_size = owner->nbytes();
  d.owner = std::move(owner);
  return d;
}

absl::StatusOr<at::Tensor> FromTensorView(const TensorView& view) {
  at::ScalarType type;
  switch (view.dtype) {
    case DType::kF32: type = at::kFloat; break;
    case DType::kF16: type = at::kHalf; break;
    case DType::kBF16: type = at::kBFloat16; break;
    case DType::kI8: type = at::kChar; break;
    case DType::kI32: type = at::kInt; break;
    case DType::kI64: type = at::kLong; break;
    case DType::kBool: type = at::kBool; break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor \"", view.name, "\": dtype ", std::string(DTypeName(view.dtype)),
          " cannot be read as a torch tensor (F32, F16, BF16, I8, I32, I64 or BOOL)"));
  }
  at::Tensor t = at::empty(view.shape, at::TensorOptions().dtype(type));
  if (t.nbytes() != view.num_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("tensor \"", view.name, "\": ", view.num_bytes,
                                                   " bytes for ", t.nbytes(), " expected"));
  }
  std::memcpy(t.data_ptr(), view.data, view.num_bytes);
  if (absl::Status s = CheckTensorRead(view); !s.ok()) return s;
  return t;
}

}  // namespace mq::model
