// mq-client: the command-line interface to mq-coordinator.
//
// Exit codes: 0 success; 1 the request failed or the job ended FAILED/CANCELLED (one line on
// stderr says why); 2 bad command line.

#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "client/table.h"
#include "client/verify.h"
#include "common/channel.h"
#include "common/flags.h"
#include "common/names.h"
#include "common/util.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "mq/v1/job_service.grpc.pb.h"

namespace {

using mq::IsTerminal;
using mq::JobStateName;
using mq::MethodName;
using mq::client::Bytes;
using mq::client::Table;

constexpr char kUsage[] =
    R"(usage: mq-client [--coordinator HOST:PORT] [--timeout SECONDS] [security] COMMAND [ARGS]

commands:
  submit --model DIR --output DIR [--method gptq|awq|awq-gptq|rtn] [--bits 4]
         [--group-size N] [--dataset PATH] [--tokenizer PATH] [--num-calibration-samples N]
         [--max-sequence-length N] [--seed N] [--gang-size K] [--min-expert-tokens N]
         [--rare-expert-rtn] [--awq-grid N] [--awq-tokens N] [--eval-samples N]
         [--eval-dataset PATH] [--max-kl X] [--max-ppl-ratio R] [--wait] [--json] ...
                                                  submit a quantization job, print its id
  eval --model DIR --reference DIR --dataset PATH [--samples N] [--max-kl X]
       [--max-ppl-ratio R] [--wait] [--json] ...  measure a checkpoint (any tool's) against
                                                  its original as a job of its own
  status JOB [--json]                             a job with its plan, attempts and history
  list [--state STATE]... [--limit N] [--json]    jobs, newest first: every live one and the
                                                  ended ones the coordinator keeps in memory
                                                  (--retain-ended-jobs; status finds the rest)
  watch JOB [--json]                              follow a job until it ends (a line per
                                                  event, e.g. each committed layer)
  cancel JOB [--reason TEXT] [--json]             cancel a queued or running job
  resume JOB [--json]                             queue a FAILED or CANCELLED job again
  inspect MODEL_DIR [--gang-size N] [--json]      check a checkpoint and estimate a job
  workers [--json]                                registered workers
  health                                          is the coordinator serving?
  verify OUTPUT_DIR|s3://B/P [--json]             re-check a finished output against its
                                                  manifest (sizes, SHA-256); no coordinator

The coordinator defaults to $MQ_COORDINATOR, else 127.0.0.1:50051.

security (each defaults to the environment variable shown):
  --tls-ca FILE           CA that signed the coordinator's certificate ($MQ_TLS_CA;
                          default: the system's roots)
  --tls-server-name NAME  name in the coordinator's certificate, if not the address's host
                          ($MQ_TLS_SERVER_NAME)
  --tls-cert FILE --tls-key FILE  client certificate (mTLS) ($MQ_TLS_CERT, $MQ_TLS_KEY)
  --token-file FILE       bearer token from `mq-coordinator add-token` ($MQ_TOKEN_FILE;
                          or the token itself in $MQ_TOKEN)
  --insecure              plaintext, no token: only for a coordinator run with --insecure
                          ($MQ_INSECURE=1)
Run `mq-client COMMAND --help` for a command's options.
)";

struct Global {
  std::string coordinator;
  int64_t timeout_s = 30;
  bool json = false;
  mq::ChannelSecurity security;
  std::string token_file;
};

// Thrown-free error path: print one line and return the exit code.
int Fail(const std::string& message, int code = 1) {
  std::fprintf(stderr, "mq-client: %s\n", message.c_str());
  return code;
}

int RpcFail(const std::string& what, const grpc::Status& s, const Global& g) {
  std::string code;
  // A refused handshake looks like an unreachable coordinator; say where to look.
  const std::string tls_hint = g.security.insecure
                                   ? ""
                                   : "; with TLS, check --tls-ca (and --tls-server-name) match the "
                                     "coordinator's certificate";
  switch (s.error_code()) {
    case grpc::StatusCode::UNAVAILABLE:
      return Fail(what + ": coordinator " + g.coordinator + " unavailable (" + s.error_message() +
                  ")" + tls_hint);
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return Fail(what + ": no answer within the deadline (" + s.error_message() + ")" + tls_hint);
    case grpc::StatusCode::INVALID_ARGUMENT:
      code = "invalid argument";
      break;
    case grpc::StatusCode::NOT_FOUND:
      code = "not found";
      break;
    case grpc::StatusCode::ALREADY_EXISTS:
      code = "already exists";
      break;
    case grpc::StatusCode::FAILED_PRECONDITION:
      code = "not possible now";
      break;
    case grpc::StatusCode::UNAUTHENTICATED:
      code = "not authenticated";
      break;
    case grpc::StatusCode::PERMISSION_DENIED:
      code = "permission denied";
      break;
    default:
      code = "error " + std::to_string(static_cast<int>(s.error_code()));
  }
  return Fail(what + ": " + code + ": " + s.error_message());
}

// Pretty JSON, or one line per message (`compact`, for streams of updates).
std::string Json(const google::protobuf::Message& m, bool compact = false) {
  std::string out;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = !compact;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, options);
  return out;
}

std::string Absolute(const std::string& path) {
  if (path.empty() || path.rfind("file://", 0) == 0 || path.find("://") != std::string::npos) {
    return path;
  }
  std::error_code ec;
  auto abs = std::filesystem::absolute(path, ec);
  return ec ? path : abs.lexically_normal().string();
}

class Client {
 public:
  explicit Client(Global g) : g_(std::move(g)) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    // Retry UNAVAILABLE on the idempotent calls (SubmitJob carries an idempotency key).
    args.SetServiceConfigJSON(R"({"methodConfig":[{"name":[{"service":"mq.v1.JobService"}],
      "retryPolicy":{"maxAttempts":5,"initialBackoff":"0.2s","maxBackoff":"2s",
      "backoffMultiplier":2,"retryableStatusCodes":["UNAVAILABLE"]}}]})");
    auto channel = mq::SecureChannel(g_.coordinator, g_.security, args);
    if (!channel.ok()) {
      error_ = std::string(channel.status().message());
      return;
    }
    channel_ = *channel;
    stub_ = mq::v1::JobService::NewStub(channel_);
  }

  // Why the channel could not be made (unreadable certificate, ...), or empty.
  const std::string& error() const { return error_; }

  std::unique_ptr<grpc::ClientContext> Ctx(int64_t seconds = 0) const {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->set_deadline(std::chrono::system_clock::now() +
                      std::chrono::seconds(seconds ? seconds : g_.timeout_s));
    return ctx;
  }

  mq::v1::JobService::Stub& stub() { return *stub_; }
  std::shared_ptr<grpc::Channel> channel() { return channel_; }
  const Global& global() const { return g_; }

 private:
  Global g_;
  std::string error_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<mq::v1::JobService::Stub> stub_;
};

// --- printing -------------------------------------------------------------------------------

void PrintProblems(const mq::v1::InspectReport& r) {
  if (r.problems_size() == 0) return;
  std::cout << "\nProblems (" << r.problems_size() << "):\n";
  for (const auto& p : r.problems()) std::cout << "  " << p.where() << ": " << p.message() << "\n";
}

// " + 1 MTP", or what of the declared MTP layers the checkpoint lacks.
std::string MtpLayers(const mq::v1::ModelSummary& s) {
  const int declared = s.num_nextn_predict_layers();
  if (declared == 0) return "";
  // Plans stored before the count existed do not say; show what the config declares.
  const int present = s.has_num_mtp_layers_present() ? s.num_mtp_layers_present() : declared;
  if (present == declared) return absl::StrCat(" + ", declared, " MTP");
  if (present == 0) {
    return absl::StrCat(" + ", declared,
                        " MTP declared in config.json but absent (no model.layers.",
                        s.num_hidden_layers(), ".* tensors; left out of the job)");
  }
  return absl::StrCat(" + ", declared, " MTP declared in config.json, ", present,
                      " present in the checkpoint");
}

void PrintNotes(const mq::v1::InspectReport& r) {
  if (r.notes_size() == 0) return;
  std::cout << "\nNotes (" << r.notes_size() << "):\n";
  for (const auto& n : r.notes()) std::cout << "  " << n.where() << ": " << n.message() << "\n";
}

void PrintReport(const mq::v1::InspectReport& r, bool with_layers) {
  const auto& s = r.summary();
  std::cout << "Model:        " << s.architecture() << " (" << s.model_type() << "), "
            << s.weight_format() << " weights\n"
            << "Layers:       " << s.num_hidden_layers() << " (" << s.first_k_dense_replace()
            << " dense, " << s.num_hidden_layers() - s.first_k_dense_replace() << " MoE)"
            << MtpLayers(s) << "\n"
            << "Experts:      " << s.n_routed_experts() << " routed (top-"
            << s.num_experts_per_tok() << ", " << s.n_group() << " groups, top-" << s.topk_group()
            << " groups), " << s.n_shared_experts() << " shared, width "
            << s.moe_intermediate_size() << "\n"
            << "Hidden:       " << s.hidden_size() << ", heads " << s.num_attention_heads()
            << ", q/kv LoRA " << s.q_lora_rank() << "/" << s.kv_lora_rank() << "\n"
            << "Checkpoint:   " << s.num_shards() << " shards, " << s.num_tensors() << " tensors, "
            << Bytes(s.checkpoint_bytes()) << "\n";
  if (r.problems_size() == 0 && r.layers_size() > 0) {
    const auto& e = r.estimate();
    std::cout << "\nEstimate (gang of " << r.ranks_size() << "):\n"
              << "  GPU memory per rank:   " << Bytes(e.gpu_bytes_per_rank()) << "\n"
              << "  host memory per rank:  " << Bytes(e.host_bytes_per_rank()) << "\n"
              << "  scratch per rank:      " << Bytes(e.scratch_bytes_per_rank()) << "\n"
              << "  output:                " << Bytes(e.output_bytes()) << "\n"
              << "  calibration tokens:    " << e.calibration_tokens() << "\n"
              << "  tokens per expert:     " << e.tokens_per_expert() << "\n";
    if (e.dispatch_rounds() > 0) {
      std::cout << "  dispatch rounds:       " << e.dispatch_rounds() << " per MoE layer\n";
    }
    if (e.checkpoint_every() == 1) {
      std::cout << "  hidden states saved:   after every layer (a resume replays none)\n";
    } else if (e.checkpoint_every() > 1) {
      char resume[32];
      std::snprintf(resume, sizeof(resume), "%.0f s", e.resume_replay_seconds());
      std::cout << "  hidden states saved:   every " << e.checkpoint_every()
                << " layers (a resume replays at most " << e.checkpoint_every() - 1
                << (e.checkpoint_every() == 2 ? " layer" : " layers") << ", ~" << resume
                << " projected)\n";
    }
    if (e.expert_passes() > 0) {
      // How the settings came about: the planning worker's flags, or the plan's choice for its
      // device (plans from before settings were planned have neither: nothing is printed).
      const std::string device =
          e.device_memory_bytes() > 0
              ? "chosen by the plan for " + Bytes(e.device_memory_bytes()) + " of device memory"
              : "chosen by the plan (device memory unknown: the fallback)";
      auto origin = [&](bool chosen, const char* flag) {
        return chosen ? device : std::string("given (mq-worker ") + flag + ")";
      };
      std::cout << "  experts per pass:      "
                << (e.experts_per_pass() > 0 ? std::to_string(e.experts_per_pass()) : "all") << " ("
                << e.expert_passes() << " pass" << (e.expert_passes() == 1 ? "" : "es")
                << " per MoE layer), " << origin(e.experts_per_pass_chosen(), "--experts-per-pass")
                << "\n"
                << "  dispatch tokens:       "
                << (e.dispatch_tokens() > 0 ? std::to_string(e.dispatch_tokens()) : "all") << ", "
                << origin(e.dispatch_tokens_chosen(), "--dispatch-tokens") << "\n";
    }
    if (e.preload_next_layer()) {
      std::cout << "  next layer's weights:  loaded onto the device while a layer solves\n";
    }
    if (e.total_seconds() > 0) {
      char per_layer[32];
      std::snprintf(per_layer, sizeof(per_layer), "%.1f s", e.seconds_per_layer());
      std::cout << "  time (projected):      "
                << mq::client::Duration(static_cast<int64_t>(e.total_seconds() * 1000)) << " ("
                << per_layer << "/layer) with one H200 per rank, GPTQ, from measured stage rates\n";
    }
    Table ranks({"RANK", "EXPERTS", "SEQUENCES", "GPU", "HOST"});
    for (const auto& rk : r.ranks()) {
      ranks.Add(
          {std::to_string(rk.rank()),
           rk.num_experts()
               ? absl::StrCat(rk.first_expert(), "..", rk.first_expert() + rk.num_experts() - 1)
               : "-",
           std::to_string(rk.num_sequences()), Bytes(rk.gpu_bytes()), Bytes(rk.host_bytes())});
    }
    std::cout << "\n" << ranks.Render();
    if (with_layers) {
      Table layers({"LAYER", "KIND", "QUANTIZED", "INPUT", "OUTPUT"});
      for (const auto& l : r.layers()) {
        std::string kind = l.kind() == mq::v1::LAYER_KIND_DENSE ? "dense"
                           : l.kind() == mq::v1::LAYER_KIND_MOE ? "moe"
                                                                : "mtp";
        layers.Add({std::to_string(l.index()), kind, std::to_string(l.num_quantized_linears()),
                    Bytes(l.input_bytes()), Bytes(l.output_bytes())});
      }
      std::cout << "\n" << layers.Render();
    }
    PrintNotes(r);
  }
  PrintProblems(r);
}

std::string Seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f s", s);
  return buf;
}

bool IsAwq(mq::v1::Method method) {
  return method == mq::v1::METHOD_AWQ || method == mq::v1::METHOD_AWQ_GPTQ;
}

// What the AWQ mappings of some layer reports add up to.
struct AwqTotals {
  int entries = 0;
  int64_t scaled = 0;        // mappings that did not keep s = 1
  double alpha_sum = 0;      // their chosen alphas, summed
  double loss_identity = 0;  // output error with s = 1 (plain RTN) ...
  double loss_chosen = 0;    // ... and with the chosen scales
  int64_t routing_changed = 0, routing_tokens = 0;

  void Add(const mq::v1::LayerStats& st) {
    for (const mq::v1::AwqMapping& m : st.awq()) {
      ++entries;
      const int64_t n = std::max(0, m.mappings() - m.identity_chosen());
      scaled += n;
      alpha_sum += m.alpha() * n;  // an entry's alpha is the mean over its scaled mappings
      loss_identity += m.loss_identity();
      loss_chosen += m.loss_chosen();
      routing_changed += m.routing_changed_tokens();
      routing_tokens += m.routing_tokens();
    }
  }

  // "alpha 0.45, loss -62%": the mean chosen alpha over the mappings that did not keep s = 1
  // ("-" when every one did), and the chosen scales' output error against plain RTN's; "-"
  // without entries.
  std::string Summary() const {
    if (entries == 0) return "-";
    char alpha[32] = "-";
    if (scaled > 0) std::snprintf(alpha, sizeof(alpha), "%.2f", alpha_sum / scaled);
    std::string out = absl::StrCat("alpha ", alpha);
    if (loss_identity > 0) {
      double change = std::round(100.0 * (loss_chosen / loss_identity - 1.0));
      if (change == 0) change = 0;  // not "-0%"
      char loss[32];
      std::snprintf(loss, sizeof(loss), "%.0f%%", change);
      absl::StrAppend(&out, ", loss ", loss);
    }
    return out;
  }
};

// "plan 1, quantize 2, finalize 1 (finalize: 1 of at most 3 counted)": attempts by phase, and
// how many of the current phase's count against spec.max_attempts (infrastructure failures and
// attempts before a resume do not).
std::string Attempts(const mq::v1::JobRecord& j,
                     const google::protobuf::RepeatedPtrField<mq::v1::AttemptRecord>& attempts) {
  if (j.attempt() == 0) {
    return absl::StrCat("none yet (at most ", j.spec().max_attempts(), " counted per phase)");
  }
  std::vector<std::pair<std::string, int>> phases;  // in the order they first ran
  for (const auto& a : attempts) {
    auto it = std::find_if(phases.begin(), phases.end(),
                           [&a](const auto& p) { return p.first == a.phase(); });
    if (it == phases.end()) it = phases.insert(phases.end(), {a.phase(), 0});
    ++it->second;
  }
  std::vector<std::string> parts;
  for (const auto& [phase, n] : phases) parts.push_back(absl::StrCat(phase, " ", n));
  // A phase that succeeded gives the next one a fresh budget: nothing counted yet.
  const int counted = std::max(0, j.attempt() - j.attempt_base());
  const std::string phase =
      counted == 0 || attempts.empty() ? "next phase" : attempts.rbegin()->phase();
  return absl::StrCat(parts.empty() ? absl::StrCat(j.attempt()) : absl::StrJoin(parts, ", "), " (",
                      phase, ": ", counted, " of at most ", j.spec().max_attempts(), " counted)");
}

// The evaluation's settings and results (status): what it runs on, what it measured, the gate.
void PrintQuality(const mq::v1::JobRecord& j) {
  const mq::v1::EvalSpec& e = j.spec().eval();
  const bool eval_job = !e.candidate_uri().empty();
  if (!eval_job && e.num_samples() == 0) {
    std::cout << "Evaluation:   off (--eval-samples 0)\n";
    return;
  }
  std::cout << "Evaluation:   " << e.num_samples() << " sequences of at most "
            << e.max_sequence_length() << " tokens from "
            << (e.dataset_uri().empty() ? "the calibration dataset, held out (not used by "
                                          "calibration)"
                                        : e.dataset_uri());
  if (e.has_max_kl() || e.has_max_ppl_ratio()) {
    std::vector<std::string> limits;
    if (e.has_max_kl()) limits.push_back(absl::StrCat("max KL ", e.max_kl()));
    if (e.has_max_ppl_ratio()) {
      limits.push_back(absl::StrCat("max perplexity ratio ", e.max_ppl_ratio()));
    }
    std::cout << "; gate: " << absl::StrJoin(limits, ", ");
  }
  std::cout << "\n";
  if (!j.has_quality()) return;
  const mq::v1::QualityReport& q = j.quality();
  if (!q.not_measured().empty()) {
    std::cout << "Quality:      not measured: " << q.not_measured() << "\n";
  } else {
    const double ratio =
        q.perplexity_reference() > 0 ? q.perplexity_candidate() / q.perplexity_reference() : 0;
    int worst = -1;
    double worst_error = 0;
    for (const mq::v1::LayerQuality& l : q.layers()) {
      if (l.relative_error() >= worst_error) {
        worst = l.layer();
        worst_error = l.relative_error();
      }
    }
    char buf[512];
    std::snprintf(buf, sizeof(buf),
                  "Quality:      KL(original || %s) mean %.5f, p99 %.4f, max %.4f nats; top-1 "
                  "agreement %.2f%%\n"
                  "              perplexity %.4f (original) -> %.4f (x%.4f)\n",
                  eval_job ? "model" : "quantized", q.kl_mean(), q.kl_p99(), q.kl_max(),
                  100 * q.top1_agreement(), q.perplexity_reference(), q.perplexity_candidate(),
                  ratio);
    std::cout << buf;
    if (worst >= 0) {
      std::snprintf(buf, sizeof(buf), "%.4f at layer %d (last layer %.4f)", worst_error, worst,
                    q.layers(q.layers_size() - 1).relative_error());
      std::cout << "              hidden-state error: largest " << buf << "\n";
    }
    std::cout << "              on " << q.source() << " (" << q.positions() << " positions, "
              << Seconds(q.seconds()) << ")\n";
  }
  if (!q.gate().empty()) std::cout << "Gate:         " << q.gate() << "\n";
}

void PrintJob(const mq::v1::JobRecord& j,
              const google::protobuf::RepeatedPtrField<mq::v1::AttemptRecord>& attempts) {
  const auto& s = j.spec();
  const bool eval_job = !s.eval().candidate_uri().empty();
  std::cout << "Job:          " << j.job_id() << "\n"
            << "Owner:        " << (j.owner().empty() ? "(none recorded)" : j.owner()) << "\n"
            << "State:        " << JobStateName(j.state()) << "\n"
            << "Message:      " << j.message() << "\n";
  if (eval_job) {
    std::cout << "Kind:         evaluation (measures a checkpoint; writes nothing)\n"
              << "Model:        " << s.eval().candidate_uri() << "\n"
              << "Reference:    " << s.model_uri() << "\n";
  } else {
    std::cout << "Model:        " << s.model_uri() << "\n"
              << "Output:       " << s.output_uri() << "\n"
              << "Method:       " << MethodName(s.method()) << " " << s.bits() << "-bit, group "
              << (s.group_size() == -1 ? std::string("per-channel")
                                       : std::to_string(s.group_size()))
              << (s.symmetric() ? ", symmetric" : ", asymmetric")
              << (s.act_order() && s.method() != mq::v1::METHOD_RTN ? ", act-order" : "")
              << (s.tf32_update() ? ", TF32 update" : "") << ", gang size " << s.gang_size()
              << "\n";
  }
  PrintQuality(j);
  if (IsAwq(s.method()) && !eval_job) {
    std::cout << "AWQ:          grid " << s.awq().grid()
              << (s.awq().grid() == 0 ? " (only s = 1)" : " over alpha (and s = 1)")
              << ", scale search on up to " << s.awq().max_tokens() << " tokens per layer\n";
  }
  std::cout << "Attempts:     " << Attempts(j, attempts) << "\n"
            << "Created:      " << mq::client::Time(j.created_at_ms()) << "\n";
  if (j.finished_at_ms()) {
    std::cout << "Finished:     " << mq::client::Time(j.finished_at_ms()) << " (after "
              << mq::client::Duration(j.finished_at_ms() - j.created_at_ms()) << ")\n";
  }
  const mq::v1::JobProgress& p = j.progress();
  if (j.uncounted_attempts()) {
    std::cout << "Uncounted:    " << j.uncounted_attempts()
              << " attempt(s) ended by infrastructure (not counted)\n";
  }
  if (p.layers_total()) {
    std::cout << "Progress:     layer " << p.layers_committed() << " of " << p.layers_total()
              << " committed";
    if (p.gang_size()) std::cout << ", gang size " << p.gang_size();
    if (p.eta_seconds() > 0 && !IsTerminal(j.state())) {
      std::cout << ", ETA " << mq::client::Duration(static_cast<int64_t>(p.eta_seconds() * 1000));
    }
    if (p.seconds_per_layer() > 0) std::cout << " (" << Seconds(p.seconds_per_layer()) << "/layer)";
    std::cout << "\n";
  }
  if (p.has_last_layer()) {
    const mq::v1::LayerStats& l = p.last_layer();
    std::cout << "Last layer:   step " << l.step() << " (layer " << l.layer() << "): load "
              << Seconds(l.load_seconds()) << ", forward " << Seconds(l.forward_seconds())
              << (s.method() == mq::v1::METHOD_RTN ? ", round (RTN) " + Seconds(l.solve_seconds())
                  : s.method() == mq::v1::METHOD_AWQ
                      ? ", AWQ search and round " + Seconds(l.solve_seconds())
                      : ", hessian " + Seconds(l.hessian_seconds()) + ", solve " +
                            Seconds(l.solve_seconds()))
              << ", propagate " << Seconds(l.propagate_seconds()) << ", write "
              << Seconds(l.write_seconds())
              << (l.exchange_seconds() > 0 ? " (exchange " + Seconds(l.exchange_seconds()) + ")"
                                           : std::string())
              << "\n"
              << "Tokens/expert: min " << l.expert_tokens_min() << ", median "
              << l.expert_tokens_median() << ", max " << l.expert_tokens_max() << "\n";
    if (l.dispatch_rounds() > 0) {
      std::cout << "Dispatch:     " << l.dispatch_rounds() << " round"
                << (l.dispatch_rounds() == 1 ? "" : "s") << ", " << l.expert_passes()
                << " expert pass" << (l.expert_passes() == 1 ? "" : "es") << "\n";
    }
    if (l.device_peak_reserved_bytes() > 0) {
      std::cout << "GPU memory:   peak " << Bytes(l.device_peak_allocated_bytes())
                << " in tensors, " << Bytes(l.device_peak_reserved_bytes())
                << " held by the allocator";
      if (l.device_alloc_retries() > 0) {
        std::cout << ", " << l.device_alloc_retries()
                  << " allocations retried after releasing its cache (the card was full)";
      }
      std::cout << "\n";
    }
  }
  if (p.layers_committed() || p.fallbacks() || p.rare_experts()) {
    std::cout << "Fallbacks:    " << p.fallbacks() << "\n"
              << "Rare experts: " << p.rare_experts() << "\n";
  }
  if (!j.manifest_sha256().empty()) {
    std::cout << "Manifest:     sha256 " << j.manifest_sha256() << "\n"
              << "Output:       " << j.output_files() << " files, " << Bytes(j.output_bytes())
              << "\n";
  }
  if (!j.progress().stage().empty()) {
    std::cout << "Stage:        " << j.progress().stage() << "\n";
  }
  if (!j.missing_capability().empty()) {
    std::cout << "Missing:      " << j.missing_capability() << "\n";
  }
}

void PrintEvent(const mq::v1::JobEvent& e) {
  std::cout << mq::client::Time(e.time_ms()) << "  " << e.kind() << "  " << e.message();
  // Who caused it, when a client did (workers are named in the message; the coordinator's own
  // events carry no name).
  if (!e.principal().empty() && e.principal() != "mq-coordinator" && e.worker_id().empty()) {
    std::cout << "  (by " << e.principal() << ")";
  }
  std::cout << "\n";
}

// --- commands -------------------------------------------------------------------------------

int ParseOrFail(mq::Flags& flags, int argc, char** argv, int first, const char* usage) {
  bool help = false;
  flags.Bool("help", &help, "show this help");
  if (absl::Status s = flags.Parse(argc, argv, first); !s.ok()) {
    return Fail(std::string(s.message()), 2);
  }
  if (help) {
    std::cout << usage << "\n" << flags.Usage();
    return 0;
  }
  return -1;
}

int WaitForJob(Client& c, const std::string& job_id, bool json, bool print_events);

// Global options may also follow the command; main() already applied them.
void AcceptGlobalFlags(mq::Flags& f) {
  static std::string ignored;
  static bool ignored_bool;
  f.String("coordinator", &ignored, "coordinator HOST:PORT");
  f.String("timeout", &ignored, "RPC deadline in seconds");
  for (const char* name : {"tls-ca", "tls-cert", "tls-key", "tls-server-name", "token-file"}) {
    f.String(name, &ignored, "see mq-client --help");
  }
  f.Bool("insecure", &ignored_bool, "see mq-client --help");
}

// A number flag's value: InvalidArgument naming the flag and `allowed` when it does not parse.
absl::StatusOr<double> ParseNumber(const std::string& command, const std::string& flag,
                                   const std::string& value, const std::string& allowed) {
  char* end = nullptr;
  const double d = std::strtod(value.c_str(), &end);
  if (value.empty() || end == value.c_str() || *end != '\0') {
    return absl::InvalidArgumentError(
        absl::StrCat(command, ": --", flag, " = \"", value, "\": must be ", allowed));
  }
  return d;
}

// The evaluation flags of submit and eval (spec.eval).
struct EvalFlags {
  int64_t samples = 0;
  int64_t seqlen = 0;
  std::string dataset;
  std::string max_kl;
  std::string max_ppl_ratio;
};

void AddEvalFlags(mq::Flags& f, EvalFlags* e, const std::string& samples_flag,
                  const std::string& samples_help) {
  f.Int(samples_flag, &e->samples, samples_help);
  f.String("max-kl", &e->max_kl,
           "quality gate: the job FAILS when the mean per-token KL(original || quantized) "
           "exceeds this (nats)");
  f.String("max-ppl-ratio", &e->max_ppl_ratio,
           "quality gate: the job FAILS when perplexity(quantized) / perplexity(original) "
           "exceeds this");
}

// Fills spec.eval from the flags that were given (the coordinator applies the defaults).
absl::Status FillEvalSpec(const std::string& command, const mq::Flags& f, const EvalFlags& e,
                          const std::string& samples_flag, mq::v1::EvalSpec* spec) {
  if (f.Given(samples_flag)) spec->set_num_samples(e.samples);
  spec->set_max_sequence_length(e.seqlen);
  spec->set_dataset_uri(Absolute(e.dataset));
  if (!e.max_kl.empty()) {
    absl::StatusOr<double> v = ParseNumber(command, "max-kl", e.max_kl, "a number >= 0");
    if (!v.ok()) return v.status();
    spec->set_max_kl(*v);
  }
  if (!e.max_ppl_ratio.empty()) {
    absl::StatusOr<double> v =
        ParseNumber(command, "max-ppl-ratio", e.max_ppl_ratio, "a number > 0");
    if (!v.ok()) return v.status();
    spec->set_max_ppl_ratio(*v);
  }
  return absl::OkStatus();
}

// Sends `request` and prints the job id (or JSON); with `wait`, follows the job to its end.
int SubmitAndMaybeWait(Client& c, const mq::v1::SubmitJobRequest& request, bool json, bool wait,
                       const std::string& command) {
  mq::v1::SubmitJobResponse response;
  auto ctx = c.Ctx(60);
  grpc::Status s = c.stub().SubmitJob(ctx.get(), request, &response);
  if (!s.ok()) return RpcFail(command, s, c.global());
  if (json && !wait) {
    std::cout << Json(response) << "\n";
  } else if (!json) {
    std::cout << response.job().job_id() << "\n";
  }
  if (!wait) return 0;
  return WaitForJob(c, response.job().job_id(), json, /*print_events=*/false);
}

int Submit(Client& c, int argc, char** argv, int first) {
  std::string model, output, method = "gptq", dataset, tokenizer, targets = "routed-experts",
                             scale_search, key;
  int64_t bits = 4, group_size = 128, gang = 1, samples = 0, seqlen = 0, seed = 0, priority = 0,
          max_attempts = 0, min_expert_tokens = 0, awq_grid = 0, awq_tokens = 0;
  std::string damping;
  bool wait = false, no_act_order = false, mtp = false, rare_rtn = false, tf32 = false,
       json = c.global().json;
  std::vector<std::string> ignore;
  EvalFlags eval;
  mq::Flags f;
  f.String("model", &model, "input checkpoint directory (HF layout)");
  f.String("output", &output, "output directory");
  f.String("method", &method,
           "gptq (default), awq (AWQ scales, then RTN), awq-gptq (AWQ scales, then GPTQ) or rtn");
  f.Int("bits", &bits, "weight bits (4)");
  f.Int("group-size", &group_size, "32, 64, 128 (default) or -1 for per-channel");
  f.Int("gang-size", &gang, "workers that run the job together (default 1)");
  f.String("dataset", &dataset, "calibration data (JSONL)");
  f.String("tokenizer", &tokenizer, "tokenizer.json (default: the model's)");
  f.Int("num-calibration-samples", &samples, "calibration sequences (default 512)");
  f.Int("max-sequence-length", &seqlen, "tokens per sequence (default 4096)");
  f.Int("seed", &seed, "shuffle seed (default 0)");
  f.Int("min-expert-tokens", &min_expert_tokens,
        "rows below which an expert's Hessian is topped up (default 16; -1: off)");
  f.Bool("rare-expert-rtn", &rare_rtn, "quantize those rare experts with RTN instead");
  f.Int("awq-grid", &awq_grid,
        "AWQ: alphas i/N for i = 0..N besides s = 1 (default 20; 0: only s = 1; at most 100)");
  f.Int("awq-tokens", &awq_tokens,
        "AWQ: calibration tokens cached per layer for the scale search (default 32768)");
  f.String("targets", &targets,
           "routed-experts (default) or all-linear (inputs not a multiple of the group: BF16)");
  f.Repeated("ignore", &ignore, "regex of module names to leave unquantized (repeatable)");
  f.String("scale-search", &scale_search, "mse (default) or minmax");
  f.String("damping", &damping, "GPTQ relative damping in (0, 1] (default 0.01)");
  f.Bool("no-act-order", &no_act_order, "GPTQ: keep the original column order");
  f.Bool("tf32-update", &tf32,
         "GPTQ on GPU workers: the solve's lazy update in TF32 on the tensor cores (default "
         "true; --tf32-update=false: fp32)");
  f.Bool("include-mtp", &mtp, "also quantize the MTP layer's experts");
  f.Int("priority", &priority, "higher runs first (default 0)");
  f.Int("max-attempts", &max_attempts, "attempts before giving up (default 3)");
  AddEvalFlags(f, &eval, "eval-samples",
               "sequences the finished output is evaluated on against the original (default "
               "16; 0: no evaluation)");
  f.String("eval-dataset", &eval.dataset,
           "dataset of those sequences (default: calibration-dataset sequences that calibration "
           "did not use)");
  f.Int("eval-max-sequence-length", &eval.seqlen,
        "tokens per evaluated sequence (default: --max-sequence-length)");
  f.String("idempotency-key", &key, "makes repeated submits return the same job");
  f.Bool("wait", &wait, "wait until the job ends; exit 1 unless it SUCCEEDED");
  f.Bool("json", &json, "print JSON");
  AcceptGlobalFlags(f);
  if (int rc = ParseOrFail(f, argc, argv, first,
                           "usage: mq-client submit --model DIR --output DIR [options]");
      rc >= 0) {
    return rc;
  }
  if (!f.positional().empty()) return Fail("submit: unexpected argument " + f.positional()[0], 2);
  if (model.empty()) return Fail("submit: --model DIR is required", 2);
  if (output.empty()) return Fail("submit: --output DIR is required", 2);

  mq::v1::SubmitJobRequest request;
  mq::v1::JobSpec* spec = request.mutable_spec();
  spec->set_model_uri(Absolute(model));
  spec->set_output_uri(Absolute(output));
  static const std::map<std::string, mq::v1::Method> kMethods = {
      {"gptq", mq::v1::METHOD_GPTQ},
      {"awq", mq::v1::METHOD_AWQ},
      {"awq-gptq", mq::v1::METHOD_AWQ_GPTQ},
      {"rtn", mq::v1::METHOD_RTN}};
  if (!kMethods.count(method)) {
    return Fail("submit: --method = \"" + method + "\": must be gptq, awq, awq-gptq or rtn", 2);
  }
  spec->set_method(kMethods.at(method));
  // Sent only when given; the coordinator checks the values and the method they go with (a grid
  // beyond int32 is clamped, not wrapped into range).
  if (f.Given("awq-grid")) {
    spec->mutable_awq()->set_grid(static_cast<int32_t>(std::clamp<int64_t>(
        awq_grid, std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max())));
  }
  if (f.Given("awq-tokens")) spec->mutable_awq()->set_max_tokens(awq_tokens);
  spec->set_bits(static_cast<int32_t>(bits));
  spec->set_group_size(static_cast<int32_t>(group_size));
  spec->set_gang_size(static_cast<int32_t>(gang));
  if (targets == "routed-experts") {
    spec->set_targets(mq::v1::TARGET_SET_ROUTED_EXPERTS);
  } else if (targets == "all-linear") {
    spec->set_targets(mq::v1::TARGET_SET_ALL_LINEAR);
  } else {
    return Fail("submit: --targets = \"" + targets + "\": must be routed-experts or all-linear", 2);
  }
  if (scale_search.empty()) {
    // The coordinator's default (mse).
  } else if (scale_search == "minmax") {
    spec->set_scale_search(mq::v1::SCALE_SEARCH_MINMAX);
  } else if (scale_search == "mse") {
    spec->set_scale_search(mq::v1::SCALE_SEARCH_MSE);
  } else {
    return Fail("submit: --scale-search = \"" + scale_search + "\": must be minmax or mse", 2);
  }
  if (!damping.empty()) {
    absl::StatusOr<double> d = ParseNumber("submit", "damping", damping, "a number in (0, 1]");
    if (!d.ok()) return Fail(std::string(d.status().message()), 2);
    spec->set_damping(*d);
  }
  if (absl::Status s = FillEvalSpec("submit", f, eval, "eval-samples", spec->mutable_eval());
      !s.ok()) {
    return Fail(std::string(s.message()), 2);
  }
  for (const auto& re : ignore) spec->add_ignore(re);
  spec->set_symmetric(true);
  spec->set_act_order(!no_act_order);
  if (f.Given("tf32-update")) spec->set_tf32_update(tf32);
  spec->set_include_mtp(mtp);
  spec->set_priority(static_cast<int32_t>(priority));
  spec->set_max_attempts(static_cast<int32_t>(max_attempts));
  mq::v1::CalibrationSpec* cal = spec->mutable_calibration();
  cal->set_dataset_uri(Absolute(dataset));
  cal->set_tokenizer_uri(Absolute(tokenizer));
  cal->set_num_samples(samples);
  cal->set_max_sequence_length(seqlen);
  cal->set_seed(static_cast<uint64_t>(seed));
  cal->set_min_expert_tokens(min_expert_tokens);
  cal->set_rare_expert_rtn(rare_rtn);
  // A key of our own makes the client's retries safe even when the user gave none.
  request.set_idempotency_key(key.empty() ? mq::NewId("c-") : key);
  return SubmitAndMaybeWait(c, request, json, wait, "submit");
}

// An evaluation job: --model (e.g. another tool's W4A16 output) measured against --reference.
int Eval(Client& c, int argc, char** argv, int first) {
  std::string model, reference, tokenizer, key;
  int64_t seed = 0, priority = 0, max_attempts = 0;
  bool wait = false, json = c.global().json;
  EvalFlags eval;
  mq::Flags f;
  f.String("model", &model, "the checkpoint measured (FP8, BF16 or compressed-tensors W4A16)");
  f.String("reference", &reference, "the original it is measured against (same architecture)");
  f.String("dataset", &eval.dataset, "sequences (JSONL text, chat messages or input_ids)");
  f.String("tokenizer", &tokenizer, "tokenizer.json (default: the reference's)");
  AddEvalFlags(f, &eval, "samples", "sequences evaluated (default 16)");
  f.Int("max-sequence-length", &eval.seqlen, "tokens per sequence (default 4096)");
  f.Int("seed", &seed, "shuffle seed choosing the sequences (default 0)");
  f.Int("priority", &priority, "higher runs first (default 0)");
  f.Int("max-attempts", &max_attempts, "attempts before giving up (default 3)");
  f.String("idempotency-key", &key, "makes repeated submits return the same job");
  f.Bool("wait", &wait, "wait until the job ends; exit 1 unless it SUCCEEDED");
  f.Bool("json", &json, "print JSON");
  AcceptGlobalFlags(f);
  if (int rc = ParseOrFail(
          f, argc, argv, first,
          "usage: mq-client eval --model DIR --reference DIR --dataset PATH [options]");
      rc >= 0) {
    return rc;
  }
  if (!f.positional().empty()) return Fail("eval: unexpected argument " + f.positional()[0], 2);
  if (model.empty()) return Fail("eval: --model DIR (the checkpoint measured) is required", 2);
  if (reference.empty()) return Fail("eval: --reference DIR (the original) is required", 2);
  if (eval.dataset.empty()) return Fail("eval: --dataset PATH is required", 2);
  mq::v1::SubmitJobRequest request;
  mq::v1::JobSpec* spec = request.mutable_spec();
  spec->set_model_uri(Absolute(reference));
  spec->mutable_eval()->set_candidate_uri(Absolute(model));
  if (absl::Status s = FillEvalSpec("eval", f, eval, "samples", spec->mutable_eval()); !s.ok()) {
    return Fail(std::string(s.message()), 2);
  }
  spec->mutable_calibration()->set_tokenizer_uri(Absolute(tokenizer));
  spec->mutable_calibration()->set_seed(static_cast<uint64_t>(seed));
  spec->set_priority(static_cast<int32_t>(priority));
  spec->set_max_attempts(static_cast<int32_t>(max_attempts));
  request.set_idempotency_key(key.empty() ? mq::NewId("c-") : key);
  return SubmitAndMaybeWait(c, request, json, wait, "eval");
}

int WaitForJob(Client& c, const std::string& job_id, bool json, bool print_events) {
  // Reconnects if the coordinator restarts while we wait; gives up after repeated failures.
  int64_t next_seq = 0;
  int failures = 0;
  mq::v1::JobRecord last;
  while (true) {
    grpc::ClientContext ctx;
    ctx.set_wait_for_ready(true);
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::hours(24 * 30));
    mq::v1::WatchJobRequest request;
    request.set_job_id(job_id);
    auto reader = c.stub().WatchJob(&ctx, request);
    mq::v1::WatchJobResponse update;
    while (reader->Read(&update)) {
      failures = 0;
      last = update.job();
      for (const auto& e : update.events()) {
        if (e.seq() < next_seq) continue;
        next_seq = e.seq() + 1;
        // The final state is said once, after the loop (on stderr when the job did not succeed).
        if (e.kind() == "state" && IsTerminal(e.state())) continue;
        if (print_events && !json) {
          PrintEvent(e);
        } else if (!json && (e.kind() == "state" || e.kind() == "layer_committed" ||
                             e.kind() == "finalized" || e.kind() == "evaluated")) {
          PrintEvent(e);  // submit --wait: one line per state change and committed layer
        }
        std::cout << std::flush;
      }
      if (json && print_events) std::cout << Json(update, true) << "\n" << std::flush;
    }
    grpc::Status s = reader->Finish();
    if (IsTerminal(last.state())) break;
    if (s.error_code() == grpc::StatusCode::NOT_FOUND ||
        s.error_code() == grpc::StatusCode::INVALID_ARGUMENT) {
      return RpcFail("watch", s, c.global());
    }
    if (++failures > 60) return RpcFail("watch", s, c.global());
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
  if (json && !print_events) {
    mq::v1::GetJobRequest get;
    get.set_job_id(job_id);
    mq::v1::GetJobResponse full;
    auto ctx = c.Ctx();
    if (c.stub().GetJob(ctx.get(), get, &full).ok()) std::cout << Json(full) << "\n";
  } else if (!json && last.state() == mq::v1::JOB_STATE_SUCCEEDED) {
    std::cout << job_id << " " << JobStateName(last.state()) << ": " << last.message() << "\n";
  }
  if (last.state() == mq::v1::JOB_STATE_SUCCEEDED) return 0;
  return Fail(
      absl::StrCat("job ", job_id, " ended ", JobStateName(last.state()), ": ", last.message()));
}

int Status(Client& c, int argc, char** argv, int first) {
  bool json = c.global().json;
  mq::Flags f;
  f.Bool("json", &json, "print JSON");
  AcceptGlobalFlags(f);
  if (int rc = ParseOrFail(f, argc, argv, first, "usage: mq-client status JOB [--json]"); rc >= 0) {
    return rc;
  }
  if (f.positional().size() != 1) return Fail("status: give exactly one job id", 2);
  mq::v1::GetJobRequest request;
  request.set_job_id(f.positional()[0]);
  request.set_include_events(true);
  mq::v1::GetJobResponse response;
  auto ctx = c.Ctx();
  grpc::Status s = c.stub().GetJob(ctx.get(), request, &response);
  if (!s.ok()) return RpcFail("status", s, c.global());
  if (json) {
    std::cout << Json(response) << "\n";
    return 0;
  }
  PrintJob(response.job(), response.attempts());
  if (response.job().has_plan() && response.job().plan().has_summary()) {
    std::cout << "\n";
    PrintReport(response.job().plan(), /*with_layers=*/false);
  }
  if (response.attempts_size()) {
    Table t({"ATTEMPT", "PHASE", "STATE", "WORKERS", "STARTED", "ENDED", "MESSAGE"});
    for (const auto& a : response.attempts()) {
      std::string state = mq::v1::AttemptState_Name(a.state()).substr(14);
      t.Add({std::to_string(a.attempt()), a.phase(), state, absl::StrJoin(a.worker_ids(), ","),
             mq::client::Time(a.started_at_ms()), mq::client::Time(a.ended_at_ms()), a.message()});
    }
    std::cout << "\n" << t.Render();
  }
  if (response.layers_size()) {
    const bool awq = IsAwq(response.job().spec().method());
    Table t({"STEP", "LAYER", "STATE", "ATTEMPT", "RANKS", "FILES", "SECONDS", "TOKENS/EXPERT",
             "FALLBACKS", "RARE", "ERROR", "AWQ"});
    AwqTotals committed_awq;  // over the committed layers
    for (const auto& l : response.layers()) {
      int files = 0, fallbacks = 0, rare = 0, linears = 0;
      double seconds = 0, error = 0;
      AwqTotals layer_awq;
      for (const auto& r : l.reports()) {
        layer_awq.Add(r.stats());
        if (l.committed()) committed_awq.Add(r.stats());
        files += r.files_size();
        fallbacks += r.stats().fallbacks();
        rare += r.stats().rare_experts();
        linears += r.stats().quantized_linears();
        error += r.stats().mean_relative_error() * r.stats().quantized_linears();
        const auto& st = r.stats();
        seconds =
            std::max(seconds, st.load_seconds() + st.forward_seconds() + st.hessian_seconds() +
                                  st.solve_seconds() + st.propagate_seconds() + st.write_seconds());
      }
      const auto& r0 = l.reports_size() ? l.reports(0).stats() : mq::v1::LayerStats();
      char err[32];
      std::snprintf(err, sizeof(err), "%.4f", linears ? error / linears : 0.0);
      if (response.job().spec().method() == mq::v1::METHOD_RTN ||
          response.job().spec().method() == mq::v1::METHOD_AWQ) {
        // Measured against Hessians, which RTN and AWQ (RTN of the scaled weights) have none of.
        std::snprintf(err, sizeof(err), "-");
      }
      t.Add({std::to_string(l.step()), std::to_string(l.layer()),
             l.committed() ? "committed" : "pending", std::to_string(l.attempt()),
             absl::StrCat(l.reports_size(), "/", l.world_size()), std::to_string(files),
             Seconds(seconds),
             absl::StrCat(r0.expert_tokens_min(), "/", r0.expert_tokens_median(), "/",
                          r0.expert_tokens_max()),
             std::to_string(fallbacks), std::to_string(rare), err,
             awq ? layer_awq.Summary() : "-"});
    }
    std::cout << "\n" << t.Render();
    if (awq && committed_awq.routing_tokens > 0) {
      char share[32];
      std::snprintf(share, sizeof(share), "%.2f%%",
                    100.0 * committed_awq.routing_changed / committed_awq.routing_tokens);
      std::cout << "\nAWQ routing change from folding: " << committed_awq.routing_changed << " of "
                << committed_awq.routing_tokens << " tokens (" << share << ")\n";
    }
  }
  if (response.events_size()) {
    std::cout << "\nHistory:\n";
    for (const auto& e : response.events()) PrintEvent(e);
  }
  return 0;
}

int List(Client& c, int argc, char** argv, int first) {
  bool json = c.global().json;
  std::vector<std::string> states;
  int64_t limit = 100;
  mq::Flags f;
  f.Bool("json", &json, "print JSON");
  f.Repeated("state", &states, "only jobs in this state (repeatable)");
  f.Int("limit", &limit, "at most this many jobs (default 100)");
  AcceptGlobalFlags(f);
  if (int rc = ParseOrFail(f, argc, argv, first, "usage: mq-client list [--state S] [--json]");
      rc >= 0) {
    return rc;
  }
  if (!f.positional().empty()) return Fail("list: unexpected argument " + f.positional()[0], 2);
  mq::v1::ListJobsRequest request;
  for (std::string st : states) {
    for (char& ch : st) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    mq::v1::JobState value;
    if (!mq::v1::JobState_Parse("JOB_STATE_" + st, &value) ||
        value == mq::v1::JOB_STATE_UNSPECIFIED) {
      return Fail("list: --state = \"" + st +
                      "\": must be queued, planning, running, finalizing, succeeded, failed or "
                      "cancelled",
                  2);
    }
    request.add_states(value);
  }
  if (limit < 1 || limit > 1000) return Fail("list: --limit must be between 1 and 1000", 2);
  request.set_page_size(static_cast<int32_t>(limit));
  mq::v1::ListJobsResponse response;
  auto ctx = c.Ctx();
  grpc::Status s = c.stub().ListJobs(ctx.get(), request, &response);
  if (!s.ok()) return RpcFail("list", s, c.global());
  if (json) {
    std::cout << Json(response) << "\n";
    return 0;
  }
  Table t({"JOB", "STATE", "METHOD", "MODEL", "CREATED", "MESSAGE"});
  for (const auto& j : response.jobs()) {
    std::string msg = j.message();
    if (msg.size() > 60) msg = msg.substr(0, 57) + "...";
    t.Add({j.job_id(), JobStateName(j.state()), MethodName(j.spec().method()), j.spec().model_uri(),
           mq::client::Time(j.created_at_ms()), msg});
  }
  std::cout << t.Render();
  return 0;
}

int Watch(Client& c, int argc, char** argv, int first) {
  bool json = c.global().json;
  mq::Flags f;
  f.Bool("json", &json, "print one JSON object per update");
  AcceptGlobalFlags(f);
  if (int rc = ParseOrFail(f, argc, argv, first, "usage: mq-client watch JOB [--json]"); rc >= 0) {
    return rc;
  }
  if (f.positional().size() != 1) return Fail("watch: give exactly one job id", 2);
  return WaitForJob(c, f.positional()[0], json, /*print_events=*/true);
}

int CancelOrResume(Client& c, int argc, char** argv, int first, bool cancel) {
  bool json = c.global().json;
  std::string reason;
  mq::Flags f;
  f.Bool("json", &json, "print JSON");
  if (cancel) f.String("reason", &reason, "recorded in the job's history");
  AcceptGlobalFlags(f);
  const char* usage = cancel ? "usage: mq-client cancel JOB [--reason TEXT] [--json]"
                             : "usage: mq-client resume JOB [--json]";
  if (int rc = ParseOrFail(f, argc, argv, first, usage); rc >= 0) return rc;
  const char* name = cancel ? "cancel" : "resume";
  if (f.positional().size() != 1) return Fail(std::string(name) + ": give exactly one job id", 2);
  mq::v1::JobRecord job;
  grpc::Status s;
  auto ctx = c.Ctx();
  if (cancel) {
    mq::v1::CancelJobRequest request;
    request.set_job_id(f.positional()[0]);
    request.set_reason(reason);
    mq::v1::CancelJobResponse response;
    s = c.stub().CancelJob(ctx.get(), request, &response);
    job = response.job();
  } else {
    mq::v1::ResumeJobRequest request;
    request.set_job_id(f.positional()[0]);
    mq::v1::ResumeJobResponse response;
    s = c.stub().ResumeJob(ctx.get(), request, &response);
    job = response.job();
  }
  if (!s.ok()) return RpcFail(name, s, c.global());
  if (json) {
    std::cout << Json(job) << "\n";
  } else {
    std::cout << job.job_id() << " " << JobStateName(job.state()) << ": " << job.message() << "\n";
  }
  return 0;
}

int Inspect(Client& c, int argc, char** argv, int first) {
  bool json = c.global().json, all_linear = false, mtp = false, layers = false;
  int64_t gang = 1, group_size = 128, samples = 0, seqlen = 0;
  mq::Flags f;
  f.Bool("json", &json, "print JSON");
  f.Int("gang-size", &gang, "plan for this many workers (default 1)");
  f.Int("group-size", &group_size, "32, 64, 128 (default) or -1");
  f.Int("num-calibration-samples", &samples, "calibration sequences (default 512)");
  f.Int("max-sequence-length", &seqlen, "tokens per sequence (default 4096)");
  f.Bool("all-linear", &all_linear, "plan quantizing every linear layer");
  f.Bool("include-mtp", &mtp, "plan the MTP layer too");
  f.Bool("layers", &layers, "print the per-layer plan");
  AcceptGlobalFlags(f);
  if (int rc = ParseOrFail(f, argc, argv, first,
                           "usage: mq-client inspect MODEL_DIR [--gang-size N] [--json]");
      rc >= 0) {
    return rc;
  }
  if (f.positional().size() != 1) return Fail("inspect: give exactly one model directory", 2);
  mq::v1::InspectModelRequest request;
  request.set_model_uri(Absolute(f.positional()[0]));
  request.set_gang_size(static_cast<int32_t>(gang));
  request.set_group_size(static_cast<int32_t>(group_size));
  request.set_targets(all_linear ? mq::v1::TARGET_SET_ALL_LINEAR
                                 : mq::v1::TARGET_SET_ROUTED_EXPERTS);
  request.set_include_mtp(mtp);
  request.set_num_samples(samples);
  request.set_max_sequence_length(seqlen);
  mq::v1::InspectModelResponse response;
  auto ctx = c.Ctx(std::max<int64_t>(c.global().timeout_s, 120));
  grpc::Status s = c.stub().InspectModel(ctx.get(), request, &response);
  if (!s.ok()) return RpcFail("inspect", s, c.global());
  if (json) {
    std::cout << Json(response) << "\n";
  } else {
    PrintReport(response.report(), layers);
  }
  if (response.report().problems_size() > 0) {
    return Fail(absl::StrCat("inspect: ", request.model_uri(), " has ",
                             response.report().problems_size(), " problem",
                             response.report().problems_size() == 1 ? "" : "s"));
  }
  return 0;
}

int Workers(Client& c, int argc, char** argv, int first) {
  bool json = c.global().json;
  mq::Flags f;
  f.Bool("json", &json, "print JSON");
  AcceptGlobalFlags(f);
  if (int rc = ParseOrFail(f, argc, argv, first, "usage: mq-client workers [--json]"); rc >= 0) {
    return rc;
  }
  mq::v1::ListWorkersResponse response;
  auto ctx = c.Ctx();
  grpc::Status s = c.stub().ListWorkers(ctx.get(), mq::v1::ListWorkersRequest(), &response);
  if (!s.ok()) return RpcFail("workers", s, c.global());
  if (json) {
    std::cout << Json(response) << "\n";
    return 0;
  }
  Table t({"WORKER", "NAME", "STATE", "DEVICE", "GPU MEMORY", "HOST MEMORY", "HEARTBEAT", "JOB"});
  for (const auto& w : response.workers()) {
    const auto& caps = w.worker().capabilities();
    std::string state = mq::v1::WorkerState_Name(w.state()).substr(13);
    std::string device =
        caps.device() + (caps.device_name().empty() ? "" : " " + caps.device_name());
    t.Add({w.worker().worker_id(), w.worker().name(), state, device,
           caps.device_memory_bytes() ? Bytes(caps.device_memory_bytes()) : "-",
           Bytes(caps.host_memory_bytes()),
           mq::client::Duration(w.last_heartbeat_age_ms()) + " ago",
           w.job_id().empty() ? "-" : w.job_id()});
  }
  std::cout << t.Render();
  return 0;
}

int Health(Client& c, int argc, char** argv, int first) {
  mq::Flags f;
  AcceptGlobalFlags(f);
  if (int rc = ParseOrFail(f, argc, argv, first, "usage: mq-client health"); rc >= 0) return rc;
  auto stub = grpc::health::v1::Health::NewStub(c.channel());
  grpc::health::v1::HealthCheckRequest request;
  grpc::health::v1::HealthCheckResponse response;
  auto ctx = c.Ctx();
  grpc::Status s = stub->Check(ctx.get(), request, &response);
  if (!s.ok()) return RpcFail("health", s, c.global());
  if (response.status() != grpc::health::v1::HealthCheckResponse::SERVING) {
    return Fail("health: coordinator " + c.global().coordinator + " is not serving");
  }
  std::cout << "SERVING\n";
  return 0;
}

absl::Status ParseTimeout(const std::string& value, int64_t* seconds) {
  char* end = nullptr;
  long t = std::strtol(value.c_str(), &end, 10);
  if (end == value.c_str() || *end || t < 1 || t > 86400) {
    return absl::InvalidArgumentError("--timeout = \"" + value + "\": must be 1..86400 seconds");
  }
  *seconds = t;
  return absl::OkStatus();
}

// Global options taking a value, and where each goes.
std::string* GlobalValue(Global& g, const std::string& name, std::string* timeout) {
  if (name == "coordinator") return &g.coordinator;
  if (name == "timeout") return timeout;
  if (name == "tls-ca") return &g.security.ca_file;
  if (name == "tls-cert") return &g.security.cert_file;
  if (name == "tls-key") return &g.security.key_file;
  if (name == "tls-server-name") return &g.security.server_name;
  if (name == "token-file") return &g.token_file;
  return nullptr;
}

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

}  // namespace

int main(int argc, char** argv) {
  // gRPC's own log lines (TLS handshake errors, ...) would repeat, out of order, what the
  // one-line failure below says.
  gpr_set_log_function([](gpr_log_func_args*) {});
  Global g;
  g.coordinator = Env("MQ_COORDINATOR").empty() ? "127.0.0.1:50051" : Env("MQ_COORDINATOR");
  g.security.ca_file = Env("MQ_TLS_CA");
  g.security.cert_file = Env("MQ_TLS_CERT");
  g.security.key_file = Env("MQ_TLS_KEY");
  g.security.server_name = Env("MQ_TLS_SERVER_NAME");
  g.token_file = Env("MQ_TOKEN_FILE");
  g.security.insecure = Env("MQ_INSECURE") == "1";
  std::string timeout;
  // Global options come before the command, and may follow it too (the command's parser
  // accepts and ignores them).
  int command_at = 0;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0) {
      if (command_at == 0) command_at = i;
      continue;
    }
    std::string name = a.substr(2), value;
    bool has_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    if (name == "help" && command_at == 0) {
      std::cout << kUsage;
      return 0;
    }
    if (name == "json") {
      g.json = true;
      continue;
    }
    if (name == "insecure") {
      g.security.insecure = true;
      continue;
    }
    std::string* target = GlobalValue(g, name, &timeout);
    if (!target) {
      if (command_at == 0) return Fail("unknown option --" + name + " (see mq-client --help)", 2);
      continue;  // the command's own option
    }
    if (!has_value) {
      if (i + 1 >= argc) return Fail("option --" + name + " needs a value", 2);
      value = argv[++i];
    }
    *target = value;
  }
  if (command_at == 0) {
    std::cerr << kUsage;
    return 2;
  }
  if (!timeout.empty()) {
    if (absl::Status s = ParseTimeout(timeout, &g.timeout_s); !s.ok()) {
      return Fail(std::string(s.message()), 2);
    }
  }
  const int i = command_at;
  const std::string command = argv[i];
  // Needs no coordinator.
  if (command == "verify") return mq::client::VerifyCommand(argc, argv, i + 1);
  if (g.coordinator.find(':') == std::string::npos) {
    return Fail("--coordinator = \"" + g.coordinator + "\": must be HOST:PORT", 2);
  }
  if (!g.security.insecure) {
    if (!g.token_file.empty()) {
      auto token = mq::ReadTokenFile("token-file", g.token_file);
      if (!token.ok()) return Fail(std::string(token.status().message()), 2);
      g.security.token = *token;
    } else {
      g.security.token = Env("MQ_TOKEN");
    }
  }
  const int first = i + 1;
  Client client(g);
  if (!client.error().empty()) return Fail(client.error(), 2);
  if (command == "submit") return Submit(client, argc, argv, first);
  if (command == "eval") return Eval(client, argc, argv, first);
  if (command == "status") return Status(client, argc, argv, first);
  if (command == "list") return List(client, argc, argv, first);
  if (command == "watch") return Watch(client, argc, argv, first);
  if (command == "cancel") return CancelOrResume(client, argc, argv, first, true);
  if (command == "resume") return CancelOrResume(client, argc, argv, first, false);
  if (command == "inspect") return Inspect(client, argc, argv, first);
  if (command == "workers") return Workers(client, argc, argv, first);
  if (command == "health") return Health(client, argc, argv, first);
  return Fail("unknown command \"" + command +
                  "\": must be submit, eval, status, list, watch, cancel, resume, inspect, "
                  "workers, health or verify",
              2);
}
