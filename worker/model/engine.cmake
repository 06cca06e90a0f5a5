# mq_engine: the LibTorch DeepSeek-V3 forward (deepseek_v3*.cc), included from the end of
# worker/model/CMakeLists.txt. Torch targets never include a .pb.h (DESIGN.md §7).
if(MQ_WITH_TORCH)
  mq_library(mq_engine
    SOURCES
      ${CMAKE_CURRENT_LIST_DIR}/deepseek_v3.cc
      ${CMAKE_CURRENT_LIST_DIR}/deepseek_v3_load.cc
      ${CMAKE_CURRENT_LIST_DIR}/packed_int4.cc
      ${CMAKE_CURRENT_LIST_DIR}/tensor_io.cc
    DEPS mq_model mq_checkpoint mq_safetensors_writer mq_kernels_torch torch absl::status
      absl::statusor absl::strings)
endif()
