// Kernel-level profiles of chosen pipeline steps (mq-worker --profile-steps), for benchmarks:
// where a step's time goes on the device, stage by stage, and which kernels take it.
//
// A profile records the calling thread's torch operators and, on a CUDA device, the device's
// kernels and copies (torch's Kineto profiler, CUPTI). The step marks its stages (StageMarks);
// Finish writes the Chrome trace (open it in chrome://tracing or Perfetto) and returns a text
// summary: per stage its wall time and the time the device was busy inside it (the union of the
// kernel and copy intervals, so concurrent streams are not counted twice), then the kernels by
// total device time, then each stage's largest kernels (a kernel belongs to the stage during
// whose wall time it started), then each stage's idle device time by what the host was running
// meanwhile. A stage whose device time is far below its wall time waits on the host; the idle
// table says on which call: each idle piece is charged to the outermost and innermost host
// interval running then (a torch operator and, on a GPU, the CUDA runtime call inside it, e.g.
// "aten::item > cudaStreamSynchronize"), or to host code outside any operator (mq's own).
//
// For torch code only (includes ATen; never include together with a .pb.h, DESIGN.md §7).
// Threading: one profile at a time per process; Start, the marks and Finish on one thread.
#pragma once

#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace mq::pipeline {

// One interval of a profile, as the summary reads it.
struct ProfiledInterval {
  // A StageMarks stage, a device kernel or copy, a host operator.
  enum class Kind { kStage, kDevice, kHost };
  Kind kind = Kind::kHost;
  std::string name;
  int64_t start_ns = 0, end_ns = 0;
};

// How the summary reads one profiler event: a device event (`on_device`) is a kernel or copy,
// except the device-side span of a stage's annotation (CUPTI reports one per "mq::" range,
// from its first kernel to its last, gaps included), which is dropped (nullopt); a user-scope
// host event named "mq::<stage>" is that stage (`*stage` = "<stage>"); anything else is a host
// operator.
std::optional<ProfiledInterval::Kind> KindOfEvent(const std::string& name, bool on_device,
                                                  bool user_scope, std::string* stage);

// The summary text of `intervals` (see the file comment); `top` kernels are listed for the
// step, up to 8 for each stage.
std::string SummarizeProfile(const std::vector<ProfiledInterval>& intervals, int top);

class StepProfile {
 public:
  // Starts recording (device kernels too when `device` is CUDA). FAILED_PRECONDITION when a
  // profile is already running in this process.
  static absl::StatusOr<std::unique_ptr<StepProfile>> Start(const at::Device& device);
  ~StepProfile();  // stops a profile that was not finished, discarding it
  StepProfile(const StepProfile&) = delete;
  StepProfile& operator=(const StepProfile&) = delete;

  // Stops recording, writes the Chrome trace to `trace_path` (through `trace_path`.tmp, which a
  // failed write removes) and returns the summary.
  absl::StatusOr<std::string> Finish(const std::string& trace_path, int top = 25);

 private:
  StepProfile() = default;
  bool running_ = false;
};

// Named stages of a step in the profile; nothing when no profile runs. Begin ends the previous
// stage.
class StageMarks {
 public:
  // `name`: a string literal "mq::<stage>" (the summary lists the stage as <stage>).
  void Begin(const char* name);
  void End() { scope_.reset(); }

 private:
  std::optional<at::RecordFunction> scope_;
};

}  // namespace mq::pipeline
