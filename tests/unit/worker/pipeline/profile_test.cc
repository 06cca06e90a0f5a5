// Step profiles (worker/pipeline/step_profile.h): the summary's arithmetic on hand-made
// intervals (device time as the union of overlapping kernels, per stage), and a real profile of
// a gang pipeline step on the CPU: the trace and summary files, the stages, that an existing
// file of the same name is left alone, and that a full disk leaves a warning and no partial file.
#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "tests/unit/worker/model/engine/engine_test_util.h"
#include "tests/unit/worker/pipeline/pipeline_test_util.h"
#include "worker/model/config.h"
#include "worker/pipeline/gang_pipeline.h"
#include "worker/pipeline/step_profile.h"

namespace mq::pipeline {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using Kind = ProfiledInterval::Kind;

constexpr int64_t kMs = 1000000;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

TEST(StepProfileTest, SummaryCountsOverlappingKernelsOnceAndSplitsByStage) {
  const std::vector<ProfiledInterval> intervals = {
      {Kind::kStage, "forward", 0, 100 * kMs},
      {Kind::kStage, "solve", 100 * kMs, 400 * kMs},
      {Kind::kStage, "solve", 500 * kMs, 600 * kMs},  // a second pass of the same stage
      {Kind::kHost, "aten::mm", 0, 50 * kMs},
      // forward: 10..60 and 40..80 on two streams: 70 ms busy, 90 ms of kernels.
      {Kind::kDevice, "gemm", 10 * kMs, 60 * kMs},
      {Kind::kDevice, "Memcpy HtoD", 40 * kMs, 80 * kMs},
      // solve: 150..250, then 550..560; 300 ms + 100 ms of wall.
      {Kind::kDevice, "gptq_block", 150 * kMs, 250 * kMs},
      {Kind::kDevice, "gemm", 550 * kMs, 560 * kMs},
  };
  const std::string s = SummarizeProfile(intervals, 10);
  // 600 ms profiled, 180 ms busy.
  EXPECT_THAT(s, HasSubstr("profiled 0.600 s, device busy 0.180 s (30.0%)")) << s;
  EXPECT_THAT(s, HasSubstr("forward                           0.100      0.070      0.030")) << s;
  EXPECT_THAT(s, HasSubstr("solve                             0.400      0.110      0.290")) << s;
  // Kernels by total time: gptq_block 100 ms, gemm 60 ms (2 calls), the copy 40 ms.
  const size_t block = s.find("gptq_block"), gemm = s.find("gemm"), copy = s.find("Memcpy");
  ASSERT_NE(block, std::string::npos);
  EXPECT_LT(block, gemm);
  EXPECT_LT(gemm, copy);
  EXPECT_THAT(s, HasSubstr("     0.060        2  30.0%  gemm")) << s;
  EXPECT_EQ(SummarizeProfile({}, 10), "empty profile\n");
}

TEST(StepProfileTest, EachStageListsTheKernelsThatStartedInIt) {
  const std::vector<ProfiledInterval> intervals = {
      {Kind::kStage, "forward", 0, 100 * kMs},
      {Kind::kStage, "solve", 100 * kMs, 400 * kMs},
      {Kind::kStage, "solve", 500 * kMs, 600 * kMs},
      // Queued in forward, run into solve's time: forward's.
      {Kind::kDevice, "gemm", 90 * kMs, 120 * kMs},
      {Kind::kDevice, "Memcpy HtoD", 10 * kMs, 20 * kMs},
      {Kind::kDevice, "gptq_block", 150 * kMs, 250 * kMs},
      {Kind::kDevice, "gemm", 550 * kMs, 560 * kMs},
      {Kind::kDevice, "gptq_block", 560 * kMs, 590 * kMs},
      // Between the two solve spans: in the step's table, in no stage's.
      {Kind::kDevice, "stray", 420 * kMs, 470 * kMs},
  };
  const std::string s = SummarizeProfile(intervals, 10);
  const size_t forward = s.find("\nforward: its 2 largest kernels or copies");
  const size_t solve = s.find("\nsolve: its 2 largest kernels or copies");
  ASSERT_NE(forward, std::string::npos) << s;
  ASSERT_NE(solve, std::string::npos) << s;
  EXPECT_LT(forward, solve);
  const std::string f = s.substr(forward, solve - forward), v = s.substr(solve);
  // forward: gemm 30 ms (75%), the copy 10 ms (25%), in that order.
  EXPECT_THAT(f, HasSubstr("     0.030        1  75.0%  gemm\n     0.010        1  25.0%  Memcpy"))
      << s;
  // solve: gptq_block 130 ms over both spans (2 calls, 92.9%), gemm 10 ms.
  EXPECT_THAT(v,
              HasSubstr("     0.130        2  92.9%  gptq_block\n     0.010        1   7.1%  gemm"))
      << s;
  EXPECT_THAT(s.substr(0, forward), HasSubstr("stray")) << s;
  EXPECT_THAT(s.substr(forward), Not(HasSubstr("stray"))) << s;
}

TEST(StepProfileTest, EachStageChargesItsIdleTimeToTheHostCallsRunningThen) {
  const std::vector<ProfiledInterval> intervals = {
      {Kind::kStage, "hessians", 0, 100 * kMs},
      {Kind::kStage, "solve", 100 * kMs, 200 * kMs},
      {Kind::kDevice, "gemm", 0, 10 * kMs},
      {Kind::kDevice, "gemm", 50 * kMs, 80 * kMs},
      {Kind::kDevice, "gemm", 82 * kMs, 100 * kMs},
      {Kind::kDevice, "gptq_block", 100 * kMs, 200 * kMs},  // solve: never idle
      // Gap 10-50 ms: 30 ms in a sync inside aten::item, 5 ms in aten::item after it, 5 ms in
      // no operator.
      {Kind::kHost, "aten::item", 5 * kMs, 45 * kMs},
      {Kind::kHost, "cudaStreamSynchronize", 10 * kMs, 40 * kMs},
      // Gap 80-82 ms: a sync again, alone, outside the stage's first gap.
      {Kind::kHost, "cudaStreamSynchronize", 79 * kMs, 90 * kMs},
      // Host work while the device is busy is no one's idle time.
      {Kind::kHost, "aten::mm", 150 * kMs, 160 * kMs},
  };
  const std::string s = SummarizeProfile(intervals, 10);
  const size_t at = s.find("\nhessians: device idle 0.042 s in 2 gaps");
  ASSERT_NE(at, std::string::npos) << s;
  EXPECT_THAT(s.substr(at), HasSubstr("     0.030        1  71.4%  aten::item > "
                                      "cudaStreamSynchronize\n"))
      << s;
  EXPECT_THAT(s.substr(at), HasSubstr("     0.005        1  11.9%  aten::item\n")) << s;
  EXPECT_THAT(s.substr(at), HasSubstr("     0.005        1  11.9%  (host code outside torch "
                                      "operators and CUDA calls)\n"))
      << s;
  EXPECT_THAT(s.substr(at), HasSubstr("     0.002        1   4.8%  cudaStreamSynchronize\n")) << s;
  EXPECT_THAT(s, Not(HasSubstr("solve: device idle"))) << s;
  EXPECT_THAT(s, Not(HasSubstr("aten::mm"))) << s;
}

// On a GPU, CUPTI also reports each "mq::" annotation as a device span from its first kernel to its
// last: it is neither a kernel nor busy time (counted as one, a stage's idle gaps would read as
// busy, as a 128 x 4096 layer's expert_solve did on an H200: 12.4 s "busy" of 12.4 s wall).
TEST(StepProfileTest, DeviceSpansOfStageAnnotationsAreDropped) {
  std::string name = "mq::expert_solve";
  EXPECT_EQ(KindOfEvent(name, /*on_device=*/true, /*user_scope=*/true, &name), std::nullopt);
  EXPECT_EQ(KindOfEvent(name, true, false, &name), std::nullopt);
  EXPECT_EQ(name, "mq::expert_solve");
  EXPECT_EQ(KindOfEvent(name, false, true, &name), ProfiledInterval::Kind::kStage);
  EXPECT_EQ(name, "expert_solve");
  std::string kernel = "nvjet_sm90_tss_128x256_64x4_2x1_v_bz_coopA_NTN";
  EXPECT_EQ(KindOfEvent(kernel, true, false, &kernel), ProfiledInterval::Kind::kDevice);
  std::string op = "mq::helper";  // an "mq::" name outside the user scope: a host operator
  EXPECT_EQ(KindOfEvent(op, false, false, &op), ProfiledInterval::Kind::kHost);
  EXPECT_EQ(op, "mq::helper");
  std::string mm = "aten::mm";
  EXPECT_EQ(KindOfEvent(mm, false, true, &mm), ProfiledInterval::Kind::kHost);
}

TEST(StepProfileTest, ProfilesAPipelineStepOnTheCpu) {
  const std::string model = model::testing::GenerateModel(
      "profile", {"--layers 2", "--dense-layers 1", "--hidden 64", "--intermediate 96",
                  "--moe-intermediate 32", "--heads 2", "--vocab 128"});
  ASSERT_FALSE(model.empty());
  GangPipelineOptions o =
      testing::PipelineOptions(model, model + "/out", testing::RandomSamples(4, 16, 128, 5));
  ASSERT_EQ(o.total_steps, 2);
  o.profile_layers = {1};
  o.profile_prefix = model + "/mq-profile-job";
  // Someone else's file under the name the profile would take: left alone.
  const std::string theirs = model + "/mq-profile-job-layer1-rank0.txt";
  std::ofstream(theirs) << "not mq's";
  std::vector<std::string> warnings;
  o.on_warning = [&](const std::string& m) { warnings.push_back(m); };
  // A profile already running in the process: the step runs unprofiled, with a warning.
  {
    absl::StatusOr<std::unique_ptr<StepProfile>> other = StepProfile::Start(at::kCPU);
    ASSERT_TRUE(other.ok()) << other.status();
    EXPECT_EQ(StepProfile::Start(at::kCPU).status().code(), absl::StatusCode::kFailedPrecondition);
    o.output_dir = model + "/out-busy";
    ASSERT_TRUE(RunGangPipeline(o).ok());
    ASSERT_EQ(warnings.size(), 1u);
    EXPECT_THAT(warnings[0], HasSubstr("layer 1 is not profiled: a profile is already running"));
  }
  warnings.clear();
  o.output_dir = model + "/out";
  absl::StatusOr<GangPipelineResult> r = RunGangPipeline(o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(warnings.empty()) << warnings[0];
  EXPECT_EQ(ReadFile(theirs), "not mq's");
  EXPECT_NE(::access((model + "/mq-profile-job-layer1-rank0.json").c_str(), F_OK), 0);
  const std::string summary = ReadFile(model + "/mq-profile-job-layer1-rank0-2.txt");
  EXPECT_THAT(summary, HasSubstr("profiled "));
  for (const char* stage : {"load", "forward", "solve", "expert_hessians", "expert_solve"}) {
    EXPECT_THAT(summary, HasSubstr(std::string("\n") + stage + " ")) << summary;
  }
  // No device: every stage's time is idle, charged to the torch operators the step ran.
  EXPECT_THAT(summary, HasSubstr("\nexpert_solve: device idle ")) << summary;
  EXPECT_THAT(summary, HasSubstr("aten::")) << summary;
  // Layer 0 was not asked for.
  EXPECT_NE(::access((model + "/mq-profile-job-layer0-rank0.txt").c_str(), F_OK), 0);
  const std::string trace = ReadFile(model + "/mq-profile-job-layer1-rank0-2.json");
  EXPECT_THAT(trace, HasSubstr("\"traceEvents\""));
  EXPECT_THAT(trace, HasSubstr("mq::expert_solve"));
}

// The profile directory on a 64 KiB tmpfs (the trace is ~12 MB): the job succeeds, the failed
// profile is one warning, and no partial file is left.
TEST(StepProfileTest, AFullProfileDiskIsAWarningAndLeavesNoPartialFile) {
  const std::string model = model::testing::GenerateModel(
      "profile_full", {"--layers 2", "--dense-layers 1", "--hidden 64", "--intermediate 96",
                       "--moe-intermediate 32", "--heads 2", "--vocab 128"});
  ASSERT_FALSE(model.empty());
  const std::string disk = model + "/disk";
  ASSERT_EQ(::mkdir(disk.c_str(), 0755), 0);
  const std::string mount = "mount -t tmpfs -o size=64k tmpfs '" + disk + "' 2>/dev/null";
  if (std::system(mount.c_str()) != 0) {
    GTEST_SKIP() << "cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)";
  }
  GangPipelineOptions o =
      testing::PipelineOptions(model, model + "/out", testing::RandomSamples(4, 16, 128, 5));
  ASSERT_EQ(o.total_steps, 2);
  o.profile_layers = {1};
  o.profile_prefix = disk + "/mq-profile-job";
  std::vector<std::string> warnings;
  o.on_warning = [&](const std::string& m) { warnings.push_back(m); };
  absl::StatusOr<GangPipelineResult> r = RunGangPipeline(o);
  std::string listing;
  for (const auto& e : std::filesystem::directory_iterator(disk)) {
    listing += e.path().filename().string() + " ";
  }
  const std::string umount = "umount -l '" + disk + "'";
  EXPECT_EQ(std::system(umount.c_str()), 0);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_THAT(warnings[0], HasSubstr("profile of layer 1: writing the trace "));
  EXPECT_THAT(warnings[0], HasSubstr("failed (is its disk full?)"));
  EXPECT_EQ(listing, "");  // neither a partial trace nor a summary
}

}  // namespace
}  // namespace mq::pipeline
