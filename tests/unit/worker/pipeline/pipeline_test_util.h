// Helpers shared by the gang pipeline's unit tests.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "worker/model/config.h"
#include "worker/pipeline/gang_pipeline.h"

namespace mq::pipeline::testing {

// `count` calibration sequences of `length` token ids below `vocab`, from a seeded generator.
inline std::vector<std::vector<int32_t>> RandomSamples(int count, int length, int vocab,
                                                       uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::vector<int32_t>> samples;
  for (int i = 0; i < count; ++i) {
    std::vector<int32_t> s(static_cast<size_t>(length));
    for (int32_t& t : s) t = static_cast<int32_t>(rng() % static_cast<uint32_t>(vocab));
    samples.push_back(s);
  }
  return samples;
}

// Options for the gang pipeline over the generated checkpoint `model`: every layer a step
// (PipelineLayers), output to `out` with its scratch at out + "-scratch", group size 32 (the
// test models' experts are 32 or 64 wide) and `samples`; the rest as GangPipelineOptions has it.
inline GangPipelineOptions PipelineOptions(const std::string& model, const std::string& out,
                                           std::vector<std::vector<int32_t>> samples) {
  absl::StatusOr<model::DeepseekV3Config> config =
      model::LoadDeepseekV3Config(model + "/config.json");
  EXPECT_TRUE(config.ok()) << config.status();
  GangPipelineOptions o;
  o.model_dir = model;
  o.output_dir = out;
  o.scratch_dir = out + "-scratch";
  o.format.group_size = 32;
  if (config.ok()) o.total_steps = static_cast<int>(PipelineLayers(*config, o.format).size());
  o.samples = std::move(samples);
  return o;
}

}  // namespace mq::pipeline::testing
