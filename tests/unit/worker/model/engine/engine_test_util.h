// Helpers shared by the engine tests: generated checkpoints and tensor comparisons.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstdlib>
#include <string>
#include <vector>

namespace mq::model::testing {

// Path of mq-gen-model: $MQ_GEN_MODEL, else $MQ_BUILD_DIR/tests/tools/mq-gen-model.
inline std::string GenModelPath() {
  if (const char* p = std::getenv("MQ_GEN_MODEL"); p != nullptr && *p != '\0') return p;
  const char* build = std::getenv("MQ_BUILD_DIR");
  return std::string(build != nullptr ? build : ".") + "/tests/tools/mq-gen-model";
}

// Runs mq-gen-model --output <fresh temp dir> flags...; returns the directory ("" on failure,
// with a test failure recorded).
//
// No std::filesystem here: the torch wheel's libtorch.so exports its own copies of several
// std::filesystem functions, which bind ahead of libstdc++'s in every torch-linked binary, and
// its std::filesystem::remove_all crashes (null call) on a non-empty directory.
inline std::string GenerateModel(const std::string& name, const std::vector<std::string>& flags) {
  std::string pattern = ::testing::TempDir() + "/mq_engine_" + name + "_XXXXXX";
  if (mkdtemp(pattern.data()) == nullptr) {
    ADD_FAILURE() << "mkdtemp " << pattern << " failed";
    return "";
  }
  const std::string dir = pattern;
  std::string cmd = GenModelPath() + " --output '" + dir + "'";
  for (const std::string& f : flags) cmd += " " + f;
  if (std::system(cmd.c_str()) != 0) {
    ADD_FAILURE() << "failed: " << cmd << " (set MQ_BUILD_DIR or MQ_GEN_MODEL)";
    return "";
  }
  return dir;
}

// ||a - b|| / ||b|| in double precision (on the CPU).
inline double RelErr(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor x = a.to(at::kCPU, at::kDouble);
  at::Tensor y = b.to(at::kCPU, at::kDouble);
  return ((x - y).norm() / y.norm()).item<double>();
}

}  // namespace mq::model::testing
