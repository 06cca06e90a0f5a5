// The next layer's tensors copied into host memory ahead of its load.
//
// While a step computes, the prefetch thread copies the tensors the next step loads out of the
// checkpoint (its page cache, or its disk) into slabs of host memory, page-locked on a GPU, and
// the reader serves them from there (CheckpointReader::Stage). Loading the layer is then one
// direct host-to-device transfer per tensor, with no copy into a staging buffer on the step's
// critical path. Each copied tensor's mapped pages leave the resident set at once, so the host
// holds about one layer's bytes either way: the slabs (worker/model/plan.h PlanPinnedSlabs, the
// tensors in name order) instead of the mapped pages. The slabs are kept and reused by the next
// layer whose tensors pack into the same slab sizes (every MoE layer of a model).
//
// A tensor that cannot be staged (its read is not intact, the slabs cannot be allocated) is left
// to the reader as it is: the load reads it from the checkpoint, and reports a damaged read
// there (when the slabs cannot be allocated, the layer's pages are read ahead instead, as
// without staging). The bytes the load sees are the same either way.
//
// For torch code only (includes ATen). Threading: Stage on one thread at a time; Unstage after
// that Stage returned, when nothing copies from the staged memory any more.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "worker/model/checkpoint_reader.h"

namespace mq::pipeline {

// Reads the tensors `names` of `reader` into the page cache and maps them (model::TouchTensor),
// stopping between tensors once `stop` is set. A hint: a tensor that cannot be read is left to
// its load, which reports it.
void ReadAhead(model::CheckpointReader& reader, const std::vector<std::string>& names,
               const std::atomic<bool>& stop);

class LayerStaging {
 public:
  // Allocates a slab of `bytes` (throws when it cannot).
  using Allocate = std::function<at::Tensor(int64_t bytes)>;
  // Page-locked slabs on a CUDA device; ordinary host memory otherwise. `allocate` replaces the
  // slabs' allocation (tests).
  explicit LayerStaging(at::Device device, Allocate allocate = nullptr);
  LayerStaging(const LayerStaging&) = delete;
  LayerStaging& operator=(const LayerStaging&) = delete;

  // Copies `names` (tensors of `reader`, in this order) into the slabs and stages them in the
  // reader; stops between tensors once `stop` is set. Returns how many bytes were staged.
  int64_t Stage(model::CheckpointReader& reader, const std::vector<std::string>& names,
                const std::atomic<bool>& stop);
  // The reader reads what Stage staged from the checkpoint again; the slabs stay for the next
  // Stage.
  void Unstage(model::CheckpointReader& reader);
  // Bytes of the slabs held.
  int64_t slab_bytes() const;

 private:
  at::Device device_;
  Allocate allocate_;
  std::vector<std::shared_ptr<at::Tensor>> slabs_;
  std::vector<std::string> staged_;
};

}  // namespace mq::pipeline
