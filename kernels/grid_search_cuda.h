// Private to kernels/: the raw CUDA entry points of grid_search.cu, free of absl so that nvcc
// never sees absl headers. grid_search_host.cc checks the arguments and wraps the results in
// absl::Status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mq::kernels::detail {

struct GridSearchRawArgs {
  const float* w;
  int64_t rows, cols, group_size;
  int bits;
  bool symmetric;
  int n_points;
  double min_shrink, norm;
  float* scales;
  float* zero_points;  // null when symmetric
};

// Launches the search on `stream` (arguments already validated, rows and cols > 0).
cudaError_t LaunchGridSearchRaw(const GridSearchRawArgs& args, cudaStream_t stream);

// cudaSuccess when this binary holds code (SASS or JIT-able PTX) of the grid search kernels for
// `device`; the CUDA error otherwise (cudaErrorNoKernelImageForDevice...). Restores the caller's
// current device.
cudaError_t CheckGridSearchImage(int device);

}  // namespace mq::kernels::detail
