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
