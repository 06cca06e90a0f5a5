// The numbers a quality measurement produces (definitions: next_token.h and compare.h), as plain
// structs with no torch or protobuf types, so that both the engine and the worker's RPC layer
// can hold them (DESIGN.md §7).
#pragma once

#include <cstdint>
#include <vector>

namespace mq::eval {

struct NextTokenQuality {
  int64_t positions = 0;  // N
  double kl_mean = 0;
  double kl_p99 = 0;
  double kl_max = 0;
  double top1_agreement = 0;
  double nll_reference = 0;
  double nll_candidate = 0;
  double perplexity_reference = 0;
  double perplexity_candidate = 0;
};

struct LayerError {
  int layer = 0;
  double relative_error = 0;  // ‖h_cand − h_ref‖ / ‖h_ref‖ of the layer's output
};

struct QualityReport {
  int64_t sequences = 0;
  int64_t sequence_length = 0;     // the longest sequence's length
  std::vector<LayerError> layers;  // decoder layers 0..num_hidden_layers-1, in order
  NextTokenQuality next_token;
};

}  // namespace mq::eval
