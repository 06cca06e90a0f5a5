// Helpers shared by the gang pipeline's unit tests.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

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

}  // namespace mq::pipeline::testing
