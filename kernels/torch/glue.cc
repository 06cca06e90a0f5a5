#include "kernels/torch/glue.h"

#include <map>
#include <mutex>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

#if MQ_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace mq::kernels::glue {

std::string Sizes(const at::Tensor& t) {
  return t.defined() ? absl::StrCat("[", absl::StrJoin(t.sizes(), ", "), "]") : "undefined";
}

absl::Status Check(const at::Tensor& t, const std::string& name, at::ScalarType dtype,
                   at::IntArrayRef sizes, const c10::Device& device) {
  if (!t.defined()) return absl::InvalidArgumentError(absl::StrCat(name, " is undefined"));
  if (t.scalar_type() != dtype) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " has dtype ", std::string(c10::toString(t.scalar_type())), ": must be ",
                     std::string(c10::toString(dtype))));
  }
  if (t.sizes() != sizes) {
    return absl::InvalidArgumentError(absl::StrCat(name, " has shape ", Sizes(t), ": must be [",
                                                   absl::StrJoin(sizes, ", "), "]"));
  }
  if (t.device() != device) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " is on ", t.device().str(), ": must be on ", device.str()));
  }
  if (!t.is_contiguous()) {
    return absl::InvalidArgumentError(absl::StrCat(name, " must be contiguous"));
  }
  return absl::OkStatus();
}

absl::Status SupportedOn(const c10::Device& device, const char* kernels,
                         absl::Status (*is_supported)(int)) {
  if (!device.is_cuda()) {
    return absl::FailedPreconditionError(
        absl::StrCat("device ", device.str(), ": ", kernels, " run on CUDA devices only"));
  }
#if MQ_WITH_CUDA
  const int index = device.has_index() ? device.index() : c10::cuda::current_device();
#else
  const int index = device.has_index() ? device.index() : 0;
#endif
  static std::mutex mu;
  static auto* cache = new std::map<std::pair<absl::Status (*)(int), int>, absl::Status>();
  const std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find({is_supported, index});
  if (it == cache->end())
    it = cache->emplace(std::make_pair(is_supported, index), is_supported(index)).first;
  return it->second;
}

}  // namespace mq::kernels::glue
