// Torch glue for kernels/ (see kernels/torch/ops.h). The only file of kernels/ that sees ATen.
#include "kernels/torch/ops.h"

#include <ATen/ATen.h>

#include <string>

#include "absl/strings/str_cat.h"
#include "kernels/torch/glue.h"

#if MQ_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace mq::kernels {
using glue::Check;
using glue::Sizes;

absl::Status GptqTorchSupported(const c10::Device& device) {
  return glue::SupportedOn(device, "the GPTQ kernels", GptqIsSupported);
}

absl::Status GptqSolveBatched(const at::Tensor& wt, const std::vector<at::Tensor>& u,
                              const std::vector<at::Tensor>& perm, const at::Tensor& scales_t,
                              const at::Tensor& zeros_t, const at::Tensor& codes_t, int bits,
                              int64_t group_size, GptqUpdateMath math, const at::Tensor& w0) {
  if (!wt.defined() || wt.dim() != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("wt has shape ", Sizes(wt), ": must be [B, I, O]"));
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
    if (absl::Status s = Check(u[b], absl::StrCat("u[", b, "]"), at::kFloat, {I, I}, device);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = Check(perm[b], absl::StrCat("perm[", b, "]"), at::kInt, {I}, device);
        !s.ok()) {
      return s;
    }
    u_ptr[b] = u[b].data_ptr<float>();
    perm_ptr[b] = perm[b].data_ptr<int32_t>();
  }
  if (absl::Status s = Check(scales_t, "scales_t", at::kFloat, {B, G, O}, device); !s.ok())
    return s;
  if (zeros_t.defined()) {
    if (absl::Status s = Check(zeros_t, "zeros_t", at::kFloat, {B, G, O}, device); !s.ok())
      return s;
  }
  if (absl::Status s = Check(codes_t, "codes_t", at::kChar, {B, I, O}, device); !s.ok()) return s;
  if (w0.defined()) {
    if (absl::Status s = Check(w0, "w0", at::kFloat, {B, I, O}, device); !s.ok()) return s;
  }
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
  args.w0 = w0.defined() ? w0.data_ptr<float>() : nullptr;
  const size_t bytes = GptqSolveWorkspaceBytes(args);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, wt.options().dtype(at::kByte));
  return LaunchGptqSolve(args, workspace.data_ptr(), bytes,
                         c10::cuda::getCurrentCUDAStream(device.index()).stream());
#else
  (void)bits;
  (void)math;
  return absl::UnimplementedError(
      "mq was built without CUDA: reconfigure with -DMQ_ENABLE_CUDA=ON on a machine with nvcc");
#endif
}

absl::Status InverseFactorTorchSupported(const c10::Device& device) {
  return glue::SupportedOn(device, "the Hessian factorisation kernels", InverseFactorIsSupported);
}

absl::Status InverseFactor(const at::Tensor& a, FactorForm form, at::Tensor* u,
                           at::Tensor* status) {
  if (!a.defined() || a.dim() != 2 || a.size(0) != a.size(1)) {
    return absl::InvalidArgumentError(absl::StrCat("a has shape ", Sizes(a), ": must be [n, n]"));
  }
  if (a.scalar_type() != at::kDouble && a.scalar_type() != at::kFloat) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a has dtype ", std::string(c10::toString(a.scalar_type())), ": must be Double or Float"));
  }
  if (!a.is_cuda()) {
    return absl::InvalidArgumentError(
        absl::StrCat("a is on ", a.device().str(), ": must be on CUDA"));
  }
  if (!a.is_contiguous()) return absl::InvalidArgumentError("a must be contiguous");
#if MQ_WITH_CUDA
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t n = a.size(0);
  const FactorDtype dtype =
      a.scalar_type() == at::kDouble ? FactorDtype::kFloat64 : FactorDtype::kFloat32;
  size_t bytes = 0;
  if (absl::Status s = InverseFactorWorkspaceBytes(n, dtype, &bytes); !s.ok()) return s;
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, a.options().dtype(at::kByte));
  *u = at::empty({n, n}, a.options().dtype(at::kFloat));
  *status = at::empty({}, a.options().dtype(at::kInt));
  InverseFactorArgs args;
  args.n = n;
  args.dtype = dtype;
  args.form = form;
  args.a = a.data_ptr();
  args.u = u->data_ptr<float>();
  args.status = status->data_ptr<int32_t>();
  return LaunchInverseFactor(args, workspace.data_ptr(), bytes,
                             c10::cuda::getCurrentCUDAStream(a.device().index()).stream());
#else
  (void)form;
  (void)u;
  (void)status;
  return absl::UnimplementedError(
      "mq was built without CUDA: reconfigure with -DMQ_ENABLE_CUDA=ON on a machine with nvcc");
#endif
}

}  // namespace mq::kernels
