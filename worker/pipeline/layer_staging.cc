#include "worker/pipeline/layer_staging.h"

#include <cstring>
#include <exception>
#include <utility>

#include "worker/model/plan.h"

namespace mq::pipeline {

void ReadAhead(model::CheckpointReader& reader, const std::vector<std::string>& names,
               const std::atomic<bool>& stop) {
  for (const std::string& n : names) {
    if (stop) return;
    absl::StatusOr<model::TensorView> v = reader.Get(n);
    if (v.ok()) model::TouchTensor(*v);
  }
}

LayerStaging::LayerStaging(at::Device device, Allocate allocate)
    : device_(device), allocate_(std::move(allocate)) {
  if (!allocate_) {
    const bool page_locked = device.is_cuda();
    allocate_ = [page_locked](int64_t bytes) {
      return at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(page_locked));
    };
  }
}

int64_t LayerStaging::Stage(model::CheckpointReader& reader, const std::vector<std::string>& names,
                            const std::atomic<bool>& stop) {
  std::vector<model::TensorView> views;
  std::vector<int64_t> bytes;
  for (const std::string& n : names) {
    absl::StatusOr<model::TensorView> v = reader.Get(n);
    if (!v.ok()) continue;  // the load reports it
    bytes.push_back(static_cast<int64_t>(v->num_bytes));
    views.push_back(*std::move(v));
  }
  const std::vector<model::PinnedSlab> plan = model::PlanPinnedSlabs(bytes);
  // The slabs of the layer before when they have the same sizes and nothing else holds them.
  bool reuse = slabs_.size() == plan.size();
  for (size_t s = 0; reuse && s < plan.size(); ++s) {
    reuse = slabs_[s].use_count() == 1 && slabs_[s]->numel() == plan[s].bytes;
  }
  if (!reuse) {
    slabs_.clear();
    try {
      for (const model::PinnedSlab& slab : plan) {
        slabs_.push_back(std::make_shared<at::Tensor>(allocate_(slab.bytes)));
      }
    } catch (const std::exception&) {
      // No page-locked memory for the slabs (host memory, a locked-memory limit): the load reads
      // the checkpoint, whose pages are at least read ahead as without staging.
      slabs_.clear();
      ReadAhead(reader, names, stop);
      return 0;
    }
  }
  int64_t staged = 0;
  for (size_t s = 0; s < plan.size(); ++s) {
    uint8_t* base = slabs_[s]->data_ptr<uint8_t>();
    for (int64_t i = plan[s].first; i < plan[s].first + plan[s].count; ++i) {
      if (stop) return staged;
      const model::TensorView& v = views[i];
      uint8_t* copy = base + plan[s].offsets[i - plan[s].first];
      model::PrefetchTensor(v);
      if (v.num_bytes > 0) std::memcpy(copy, v.data, v.num_bytes);
      if (!model::CheckTensorRead(v).ok()) continue;  // the load reads it again and reports it
      model::TensorView staged_view = v;
      staged_view.data = copy;
      staged_view.owner = std::shared_ptr<const void>(slabs_[s], copy);
      staged_view.page_locked = device_.is_cuda();
      reader.Stage(std::move(staged_view));
      staged_.push_back(v.name);
      staged += static_cast<int64_t>(v.num_bytes);
      reader.Release(v.name);  // the copy replaces the mapped pages
    }
  }
  return staged;
}

void LayerStaging::Unstage(model::CheckpointReader& reader) {
  for (const std::string& n : staged_) reader.Unstage(n);
  staged_.clear();
}

int64_t LayerStaging::slab_bytes() const {
  int64_t bytes = 0;
  for (const std::shared_ptr<at::Tensor>& s : slabs_) bytes += s->numel();
  return bytes;
}

}  // namespace mq::pipeline
