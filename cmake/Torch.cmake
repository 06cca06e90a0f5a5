# LibTorch from the pip `torch` wheel (DESIGN.md §7).
#
# Include this AFTER find_package(Protobuf) and find_package(gRPC): torch's config defines an
# empty `protobuf::libprotobuf` target when none exists yet. Targets that link torch must never
# include a .pb.h (the wheel ships protobuf 3.13 headers in torch/include).
#
# Defines:
#   MQ_WITH_TORCH        option; OFF skips every torch target (engine, mq-forward, engine tests)
#   MQ_TORCH_PYTHON      the python used to locate the wheel
#   MQ_TORCH_HAS_CUDA    ON when the wheel is a CUDA build (torch.version.cuda is set)
# and the imported target `torch` (link it; it carries includes, -D_GLIBCXX_USE_CXX11_ABI and
# the CUDA libraries of a CUDA wheel).
#
# CUDA wheel quirks handled here:
#  * TorchConfig.cmake of a CUDA wheel runs enable_language(CUDA), find_package(CUDA) and
#    find_package(CUDAToolkit) and fails without a toolkit: we point CMake at nvcc
#    (CMAKE_CUDA_COMPILER, default /usr/local/cuda/bin/nvcc or $CUDA_HOME/bin/nvcc) before
#    find_package(Torch). No GPU is needed to configure or build.
#  * With no architectures given, torch's cuda.cmake would try to detect the GPU and warn; we
#    pass MQ_CUDA_ARCHS through (CMAKE_CUDA_ARCHITECTURES and TORCH_CUDA_ARCH_LIST) unless the
#    caller set them.
#  * cuDNN / cuSPARSELt / cuDSS are optional for consumers; their "not found" messages are
#    harmless (we use none of them).

option(MQ_WITH_TORCH "Build the LibTorch engine targets (mq_engine, mq-forward, engine tests)" ON)

if(NOT MQ_WITH_TORCH)
  message(STATUS "torch: MQ_WITH_TORCH=OFF, engine targets are not built")
  return()
endif()

if(NOT MQ_TORCH_PYTHON)
  if(Python3_EXECUTABLE)
    set(_mq_torch_python_default ${Python3_EXECUTABLE})
  else()
    # The first python3 on PATH (a virtualenv or pyenv one with torch), not a system default.
    find_program(_mq_torch_python_default NAMES python3 python)
  endif()
  set(MQ_TORCH_PYTHON "${_mq_torch_python_default}" CACHE FILEPATH
    "Python interpreter whose torch wheel provides LibTorch")
endif()

if(NOT Torch_DIR)
  execute_process(
    COMMAND ${MQ_TORCH_PYTHON} -c
      "import torch, torch.utils; print(torch.utils.cmake_prefix_path); print(torch.version.cuda or '')"
    OUTPUT_VARIABLE _mq_torch_out
    ERROR_VARIABLE _mq_torch_err
    RESULT_VARIABLE _mq_torch_rc
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _mq_torch_rc EQUAL 0)
    message(FATAL_ERROR
      "MQ_WITH_TORCH=ON but '${MQ_TORCH_PYTHON} -c \"import torch\"' failed: ${_mq_torch_err}"
      "Install the torch wheel (scripts/setup.sh), set MQ_TORCH_PYTHON or Torch_DIR, "
      "or configure with -DMQ_WITH_TORCH=OFF.")
  endif()
  string(REPLACE "\n" ";" _mq_torch_lines "${_mq_torch_out}")
  list(GET _mq_torch_lines 0 _mq_torch_prefix)
  list(LENGTH _mq_torch_lines _mq_torch_nlines)
  set(_mq_torch_cuda "")
  if(_mq_torch_nlines GREATER 1)
    list(GET _mq_torch_lines 1 _mq_torch_cuda)
  endif()
  set(Torch_DIR "${_mq_torch_prefix}/Torch" CACHE PATH "Directory of TorchConfig.cmake")
  set(MQ_TORCH_CUDA_VERSION "${_mq_torch_cuda}" CACHE STRING
    "CUDA version of the torch wheel (empty for a CPU wheel)")
endif()

if(MQ_TORCH_CUDA_VERSION)
  set(MQ_TORCH_HAS_CUDA ON)
  if(NOT CMAKE_CUDA_COMPILER)
    set(_mq_cuda_home "$ENV{CUDA_HOME}")
    if(NOT _mq_cuda_home)
      set(_mq_cuda_home /usr/local/cuda)
    endif()
    find_program(_mq_nvcc nvcc HINTS "${_mq_cuda_home}/bin" /usr/local/cuda/bin)
    if(NOT _mq_nvcc)
      message(FATAL_ERROR
        "torch ${MQ_TORCH_CUDA_VERSION} is a CUDA build; its TorchConfig.cmake needs the CUDA "
        "toolkit (nvcc) to configure, even for CPU-only use. Install it, set CUDA_HOME or "
        "CMAKE_CUDA_COMPILER, or configure with -DMQ_WITH_TORCH=OFF.")
    endif()
    set(CMAKE_CUDA_COMPILER "${_mq_nvcc}" CACHE FILEPATH "nvcc (needed by torch's CMake config)")
  endif()
  # torch's cuda.cmake warns about and then clears CMAKE_CUDA_ARCHITECTURES (it uses
  # TORCH_CUDA_ARCH_LIST). Enable CUDA here with our architectures, hide the variable while
  # torch's config runs, and restore it afterwards for kernels/.
  if(DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(_mq_cuda_archs "${CMAKE_CUDA_ARCHITECTURES}")
  else()
    set(_mq_cuda_archs "${MQ_CUDA_ARCHS}")
  endif()
  set(CMAKE_CUDA_ARCHITECTURES "${_mq_cuda_archs}")
  enable_language(CUDA)
  unset(CMAKE_CUDA_ARCHITECTURES)
  if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    # "90" -> "9.0", "90;100" -> "9.0;10.0" (torch's format).
    set(TORCH_CUDA_ARCH_LIST "")
    foreach(_mq_arch IN LISTS MQ_CUDA_ARCHS)
      string(REGEX REPLACE "^([0-9]+)([0-9])[a-z]?$" "\\1.\\2" _mq_arch_dot "${_mq_arch}")
      list(APPEND TORCH_CUDA_ARCH_LIST "${_mq_arch_dot}")
    endforeach()
  endif()
else()
  set(MQ_TORCH_HAS_CUDA OFF)
endif()

find_package(Torch REQUIRED)
if(MQ_TORCH_HAS_CUDA)
  set(CMAKE_CUDA_ARCHITECTURES "${_mq_cuda_archs}")
endif()
message(STATUS "torch: ${Torch_DIR} (CUDA: ${MQ_TORCH_HAS_CUDA} ${MQ_TORCH_CUDA_VERSION})")
