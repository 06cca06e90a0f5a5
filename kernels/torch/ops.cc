// Torch glue for kernels/ (see kernels/torch/ops.h). The only file of kernels/ that sees ATen.
#include "kernels/torch/ops.h"

#include <ATen/ATen.h>

#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

#if MQ_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace mq::kernels {
namespace {

std::string Sizes(const at::Tensor& t) {
  return t.defined() ? absl::StrCat("[", absl::StrJoin(t.sizes(), ", "), "]") : "undefined";
}

// InvalidArgument unless `t` is a contiguous tensor of `dtype` and `sizes` on `device`.
absl::Status Check(const at::Tensor& t, const std::string& name, at::ScalarType dtype,
                   at::IntArrayRef sizes, const c10::Device& device) {
  if (!t.defined()) return absl::InvalidArgumentError(absl::StrCat(name, " is undefined"));
  if (t.scalar_type() != dtype) {
    return absl::InvalidArgumentError(absl::StrCat(name, " has dtype ",
                                                   std::string(c10::toString(t.scalar_type())),
                                                   ": must be ", std::string(c10::toString(dtype))));
  }
  if (t.sizes() != sizes) {
    return absl::InvalidArgumentError(absl::StrCat(name, " has shape ", Sizes(t), ": must be [",
                                                   absl::StrJoin(sizes, ", "), "]"));
  }
  if (t.device() != device) {
    return absl::InvalidArgumentError(absl::StrCat(name, " is on ", t.device().str(),
                                                   ": must be on ", device.str()));
  }
  if (!t.is_contiguous()) {
    return absl::InvalidArgumentError(absl::StrCat(name, " must be contiguous"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status GptqTorchSupported(const c10::Device& device) {
  if (!device.is_cuda()) {
    return absl::FailedPreconditionError(
        absl::StrCat("device ", device.str(), ": the GPTQ kernels run on CUDA devices only"));
  }
  return GptqIsSupported(device.index() < 0 ? 0 : device.index());
}

absl::Status GptqSolveBatched(const at::Tensor& wt, const std::vector<at::Tensor>& u,
                              const std::vector<at::Tensor>& perm, const at::Tensor& scales_t,
                              const at::Tensor& zeros_t, const at::Tensor& codes_t, int bits,
                              int64_t group_size, GptqUpdateMath math) {
  if (!wt.defined() || wt.dim() != 3) {
    return absl::InvalidArgumentError(absl::StrCat("wt has shape ", Sizes(wt), ": must be [B, I, O]"));
  }
  const int64_t B = wt.size(0), I = wt.size(1), O = wt.size(2);
  const c10::Device device = wt.device();
  if (!device.is_cuda()) {
    return absl::InvalidArgumentError(absl::StrCat("wt is on ", device.str(), ": must be on CUDA"));
  }
  if (absl::Status s = Check(wt, "wt", at::kFloat, {B, I, O}, device); !s.ok()) return s;
  if (group_size <= 0 || I <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("group_size = ", group_size, ": must be > 0"));
  }
  const int64_t G = (I + group_size - 1) / group_size;
  if (static_cast<int64_t>(u.size()) != B || static_cast<int64_t>(perm.size()) != B) {
    return absl::InvalidArgumentError(absl::StrCat("u has ", u.size(), " and perm ", perm.size(),
                                                   " tensors: each must have B = ", B));
  }
  std::vector<const float*> u_ptr(B);
  std::vector<const int32_t*> perm_ptr(B);
  for (int64_t b = 0; b < B; ++b) {
    if (absl::Status s = Check(u[b], absl::StrCat("u[", b, "]"), at::kFloat, {I, I}, device); !s.ok()) {
      return s;
    }
    if (absl::Status s = Check(perm[b], absl::StrCat("perm[", b, "]"), at::kInt, {I}, device);
        !s.ok()) {
      return s;
    }
    u_ptr[b] = u[b].data_ptr<float>();
    perm_ptr[b] = perm[b].data_ptr<int32_t>();
  }
  if (absl::Status s = Check(scales_t, "scales_t", at::kFloat, {B, G, O}, device); !s.ok()) return s;
  if (zeros_t.defined()) {
    if (absl::Status s = Check(zeros_t, "zeros_t", at::kFloat, {B, G, O}, device); !s.ok()) return s;
  }
  if (absl::Status s = Check(codes_t, "codes_t", at::kChar, {B, I, O}, device); !s.ok()) return s;
  if (B == 0) return absl::OkStatus();
#if MQ_WITH_CUDA
  const c10::cuda::CUDAGuard guard(device);
  GptqSolveArgs args;
  args.batch = B;
  args.rows = O;
  args.cols = I;
  args.group_size = group_size;
  args.bits = bits;
  args.wt = wt.data_ptr<float>();
  args.u = u_ptr.data();
  args.perm = perm_ptr.data();
  args.scales_t = scales_t.data_ptr<float>();
  args.zeros_t = zeros_t.defined() ? zeros_t.data_ptr<float>() : nullptr;
  args.codes_t = codes_t.data_ptr<int8_t>();
  args.update_math = math;
  const size_t bytes = GptqSolveWorkspaceBytes(args);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(bytes)}, wt.options().dtype(at::kByte));
  return LaunchGptqSolve(args, workspace.data_ptr(), bytes,
                         c10::cuda::getCurrentCUDAStream(device.index()).stream());
#else
  (void)bits;
  (void)math;
  return absl::UnimplementedError(
      "mq was built without CUDA: reconfigure with -DMQ_ENABLE_CUDA=ON on a machine with nvcc");
#endif
}

}  // namespace mq::kernels
