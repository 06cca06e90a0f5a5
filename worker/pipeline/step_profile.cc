#include "worker/pipeline/step_profile.h"

#include <torch/csrc/autograd/profiler_kineto.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace mq::pipeline {

namespace {

std::atomic<bool> profiling{false};

constexpr char kStagePrefix[] = "mq::";

using Span = std::pair<int64_t, int64_t>;

// Disjoint, sorted union of `spans`.
std::vector<Span> Union(std::vector<Span> spans) {
  std::sort(spans.begin(), spans.end());
  std::vector<Span> out;
  for (const Span& s : spans) {
    if (s.second <= s.first) continue;
    if (!out.empty() && s.first <= out.back().second) {
      out.back().second = std::max(out.back().second, s.second);
    } else {
      out.push_back(s);
    }
  }
  return out;
}

// Length of the part of [lo, hi) that `merged` (disjoint, sorted) covers.
int64_t Covered(const std::vector<Span>& merged, int64_t lo, int64_t hi) {
  auto it = std::upper_bound(merged.begin(), merged.end(), Span{lo, INT64_MAX});
  if (it != merged.begin()) --it;
  int64_t covered = 0;
  for (; it != merged.end() && it->first < hi; ++it) {
    covered += std::max<int64_t>(0, std::min(hi, it->second) - std::max(lo, it->first));
  }
  return covered;
}

double Seconds(int64_t ns) { return static_cast<double>(ns) * 1e-9; }

// Kernels or copies listed per stage.
constexpr int kStageTop = 8;

// Count and time per name: calls and device time per kernel or copy, or gaps and idle time per
// host cause.
struct NamedTotals {
  std::map<std::string, std::pair<int64_t, int64_t>> calls;  // name -> count, total ns
  int64_t total_ns = 0;

  void Add(const ProfiledInterval& i) { Add(i.name, 1, i.end_ns - i.start_ns); }
  void Add(const std::string& name, int64_t count, int64_t ns) {
    auto& k = calls[name];
    k.first += count;
    k.second += ns;
    total_ns += ns;
  }
  // The `top` names by total time: seconds, count, share of total_ns, name (its first
  // `width` characters).
  void AppendTop(int top, std::string* out, size_t width = 100) const {
    std::vector<std::pair<int64_t, std::string>> ranked;
    for (const auto& [name, k] : calls) ranked.emplace_back(k.second, name);
    std::sort(ranked.rbegin(), ranked.rend());
    for (int n = 0; n < top && n < static_cast<int>(ranked.size()); ++n) {
      const auto& [ns, name] = ranked[n];
      absl::StrAppend(
          out, absl::StrFormat("%10.3f %8d %5.1f%%  %s\n", Seconds(ns), calls.at(name).first,
                               total_ns > 0 ? 100.0 * ns / total_ns : 0.0, name.substr(0, width)));
    }
  }
};

// Host-side causes shown per stage.
constexpr int kIdleTop = 6;

// What the host ran while the device idled inside a stage: idle time and gaps per cause.
struct IdleCauses {
  NamedTotals causes;                       // cause -> gaps it appears in, idle ns
  std::map<std::string, int64_t> last_gap;  // cause -> the last gap counted for it
  int64_t gaps = 0;

  void Add(const std::string& cause, int64_t ns, int64_t gap) {
    auto [it, fresh] = last_gap.try_emplace(cause, gap);
    const bool new_gap = fresh || it->second != gap;
    it->second = gap;
    causes.Add(cause, new_gap ? 1 : 0, ns);
  }
};

// Text for the segment of an idle gap during which `active` (start, index into `host`) host
// intervals run: the outermost (earliest start) and the innermost (latest start).
std::string CauseOf(const std::set<std::pair<int64_t, size_t>>& active,
                    const std::vector<const ProfiledInterval*>& host) {
  if (active.empty()) return "(host code outside torch operators and CUDA calls)";
  const std::string& outer = host[active.begin()->second]->name;
  const std::string& inner = host[active.rbegin()->second]->name;
  if (active.size() == 1 || outer == inner) return outer.substr(0, 100);
  return absl::StrCat(outer.substr(0, 60), " > ", inner.substr(0, 60));
}

// Per stage (stage_spans sorted and disjoint), the device's idle gaps inside it (its wall time
// minus `busy`) split at every host interval's start and end, each piece charged to what the
// host was running then (CauseOf).
std::map<std::string, IdleCauses> AttributeIdle(
    const std::vector<ProfiledInterval>& intervals, const std::vector<Span>& busy,
    const std::vector<std::pair<Span, std::string>>& stage_spans) {
  struct Gap {
    int64_t lo, hi;
    const std::string* stage;
  };
  std::vector<Gap> gaps;
  for (const auto& [span, name] : stage_spans) {
    int64_t at = span.first;
    auto it = std::upper_bound(busy.begin(), busy.end(), Span{span.first, INT64_MAX});
    if (it != busy.begin()) --it;
    for (; it != busy.end() && it->first < span.second; ++it) {
      if (it->second <= at) continue;
      if (it->first > at) gaps.push_back({at, it->first, &name});
      at = it->second;
    }
    if (at < span.second) gaps.push_back({at, span.second, &name});
  }
  std::vector<const ProfiledInterval*> host;
  std::vector<std::pair<int64_t, size_t>> starts, ends;
  for (const ProfiledInterval& i : intervals) {
    if (i.kind != ProfiledInterval::Kind::kHost || i.end_ns <= i.start_ns) continue;
    starts.emplace_back(i.start_ns, host.size());
    ends.emplace_back(i.end_ns, host.size());
    host.push_back(&i);
  }
  std::sort(starts.begin(), starts.end());
  std::sort(ends.begin(), ends.end());
  std::set<std::pair<int64_t, size_t>> active;
  size_t si = 0, ei = 0;
  // Applies every start, then every end, at or before t: what remains runs over [t, next).
  auto advance = [&](int64_t t) {
    for (; si < starts.size() && starts[si].first <= t; ++si) active.insert(starts[si]);
    for (; ei < ends.size() && ends[ei].first <= t; ++ei) {
      active.erase({host[ends[ei].second]->start_ns, ends[ei].second});
    }
  };
  std::map<std::string, IdleCauses> by_stage;
  for (size_t g = 0; g < gaps.size(); ++g) {
    IdleCauses& causes = by_stage[*gaps[g].stage];
    ++causes.gaps;
    int64_t t = gaps[g].lo;
    advance(t);
    while (t < gaps[g].hi) {
      int64_t next = gaps[g].hi;
      if (si < starts.size()) next = std::min(next, starts[si].first);
      if (ei < ends.size()) next = std::min(next, ends[ei].first);
      causes.Add(CauseOf(active, host), next - t, static_cast<int64_t>(g));
      t = next;
      advance(t);
    }
  }
  return by_stage;
}

}  // namespace

std::optional<ProfiledInterval::Kind> KindOfEvent(const std::string& name, bool on_device,
                                                  bool user_scope, std::string* stage) {
  const bool marked = name.rfind(kStagePrefix, 0) == 0;
  if (on_device) {
    if (marked) return std::nullopt;
    return ProfiledInterval::Kind::kDevice;
  }
  if (user_scope && marked) {
    *stage = name.substr(sizeof(kStagePrefix) - 1);
    return ProfiledInterval::Kind::kStage;
  }
  return ProfiledInterval::Kind::kHost;
}

std::string SummarizeProfile(const std::vector<ProfiledInterval>& intervals, int top) {
  std::vector<Span> device;
  int64_t first = INT64_MAX, last = INT64_MIN;
  for (const ProfiledInterval& i : intervals) {
    first = std::min(first, i.start_ns);
    last = std::max(last, i.end_ns);
    if (i.kind == ProfiledInterval::Kind::kDevice) device.emplace_back(i.start_ns, i.end_ns);
  }
  if (intervals.empty()) return "empty profile\n";
  const std::vector<Span> busy = Union(device);
  const int64_t busy_all = Covered(busy, first, last);
  std::string out =
      absl::StrFormat("profiled %.3f s, device busy %.3f s (%.1f%%)\n", Seconds(last - first),
                      Seconds(busy_all), last > first ? 100.0 * busy_all / (last - first) : 0.0);
  // Stages by name, in order of first appearance.
  std::vector<std::string> order;
  std::map<std::string, std::pair<int64_t, int64_t>> stages;  // wall, device busy
  for (const ProfiledInterval& i : intervals) {
    if (i.kind != ProfiledInterval::Kind::kStage) continue;
    auto [it, fresh] = stages.try_emplace(i.name, 0, 0);
    if (fresh) order.push_back(i.name);
    it->second.first += i.end_ns - i.start_ns;
    it->second.second += Covered(busy, i.start_ns, i.end_ns);
  }
  if (!order.empty()) {
    absl::StrAppend(
        &out, absl::StrFormat("%-28s %10s %10s %10s\n", "stage", "wall s", "device s", "idle s"));
    for (const std::string& name : order) {
      const auto [wall, on] = stages[name];
      absl::StrAppend(&out, absl::StrFormat("%-28s %10.3f %10.3f %10.3f\n", name, Seconds(wall),
                                            Seconds(on), Seconds(wall - on)));
    }
  }
  // Kernels and copies by total time: the whole step, then each stage's (a kernel counts in the
  // stage whose wall time holds its start; one queued near a stage's end may start in the next).
  std::vector<std::pair<Span, std::string>> stage_spans;
  for (const ProfiledInterval& i : intervals) {
    if (i.kind == ProfiledInterval::Kind::kStage) {
      stage_spans.push_back({{i.start_ns, i.end_ns}, i.name});
    }
  }
  std::sort(stage_spans.begin(), stage_spans.end());
  auto stage_of = [&](int64_t start) -> const std::string* {
    auto it = std::upper_bound(stage_spans.begin(), stage_spans.end(),
                               std::pair<Span, std::string>{{start, INT64_MAX}, ""});
    if (it == stage_spans.begin()) return nullptr;
    --it;
    return start < it->first.second ? &it->second : nullptr;
  };
  NamedTotals all;
  std::map<std::string, NamedTotals> by_stage;
  for (const ProfiledInterval& i : intervals) {
    if (i.kind != ProfiledInterval::Kind::kDevice) continue;
    all.Add(i);
    if (const std::string* stage = stage_of(i.start_ns)) by_stage[*stage].Add(i);
  }
  if (!all.calls.empty()) {
    absl::StrAppend(&out, absl::StrFormat("%10s %8s %6s  %s\n", "device s", "calls", "share",
                                          "kernel or copy"));
    all.AppendTop(top, &out);
  }
  for (const std::string& name : order) {
    auto it = by_stage.find(name);
    if (it == by_stage.end()) continue;
    absl::StrAppend(&out, "\n", name, ": its ",
                    std::min<size_t>(kStageTop, it->second.calls.size()),
                    " largest kernels or copies (share of the stage's kernel time)\n");
    it->second.AppendTop(kStageTop, &out);
  }
  // Where the device waited on the host: each stage's idle time by the host calls running then.
  const std::map<std::string, IdleCauses> idle = AttributeIdle(intervals, busy, stage_spans);
  for (const std::string& name : order) {
    auto it = idle.find(name);
    if (it == idle.end() || it->second.causes.total_ns == 0) continue;
    const IdleCauses& c = it->second;
    absl::StrAppend(&out, "\n", name,
                    absl::StrFormat(": device idle %.3f s in %d gap%s, by what the host ran then "
                                    "(outermost > innermost call)\n",
                                    Seconds(c.causes.total_ns), c.gaps, c.gaps == 1 ? "" : "s"));
    c.causes.AppendTop(kIdleTop, &out, std::string::npos);  // CauseOf bounds its text
  }
  return out;
}

absl::StatusOr<std::unique_ptr<StepProfile>> StepProfile::Start(const at::Device& device) {
  bool expected = false;
  if (!profiling.compare_exchange_strong(expected, true)) {
    return absl::FailedPreconditionError("a profile is already running in this process");
  }
  using torch::profiler::impl::ActivityType;
  std::set<ActivityType> activities{ActivityType::CPU};
  if (device.is_cuda()) activities.insert(ActivityType::CUDA);
  const torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
  try {
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
  } catch (const c10::Error& e) {
    profiling = false;
    return absl::InternalError(absl::StrCat("starting the profiler: ", e.what_without_backtrace()));
  }
  std::unique_ptr<StepProfile> p(new StepProfile());
  p->running_ = true;
  return p;
}

StepProfile::~StepProfile() {
  if (!running_) return;
  try {
    torch::autograd::profiler::disableProfiler();
  } catch (const c10::Error&) {
  }
  profiling = false;
}

absl::StatusOr<std::string> StepProfile::Finish(const std::string& trace_path, int top) {
  if (!running_) return absl::FailedPreconditionError("the profile was already finished");
  running_ = false;
  std::unique_ptr<torch::autograd::profiler::ProfilerResult> result;
  try {
    result = torch::autograd::profiler::disableProfiler();
  } catch (const c10::Error& e) {
    profiling = false;
    return absl::InternalError(absl::StrCat("stopping the profiler: ", e.what_without_backtrace()));
  }
  profiling = false;
  std::vector<ProfiledInterval> intervals;
  for (const torch::autograd::profiler::KinetoEvent& e : result->events()) {
    ProfiledInterval i;
    i.name = e.name();
    const std::optional<ProfiledInterval::Kind> kind =
        KindOfEvent(i.name, e.deviceType() == c10::DeviceType::CUDA,
                    e.scope() == static_cast<uint8_t>(at::RecordScope::USER_SCOPE), &i.name);
    if (!kind) continue;
    i.kind = *kind;
    i.start_ns = static_cast<int64_t>(e.startNs());
    i.end_ns = static_cast<int64_t>(e.endNs());
    intervals.push_back(std::move(i));
  }
  // Kineto writes <path>.tmp and renames it to <path>; a write that fails (a full disk) raises
  // nothing, leaves the temporary file and no trace: that is an error, and the partial file goes.
  const std::string partial = trace_path + ".tmp";
  try {
    result->save(trace_path);
  } catch (const c10::Error& e) {
    ::unlink(partial.c_str());
    return absl::InternalError(
        absl::StrCat("writing the trace ", trace_path, ": ", e.what_without_backtrace()));
  }
  if (::access(trace_path.c_str(), F_OK) != 0) {
    ::unlink(partial.c_str());
    return absl::InternalError(
        absl::StrCat("writing the trace ", trace_path, " failed (is its disk full?)"));
  }
  return SummarizeProfile(intervals, top);
}

void StageMarks::Begin(const char* name) {
  scope_.reset();
  scope_.emplace(at::RecordScope::USER_SCOPE);
  if (scope_->isActive()) {
    scope_->before(std::string_view(name), c10::ArrayRef<const c10::IValue>{});
  }
}

}  // namespace mq::pipeline
