#include "worker/plan_convert.h"

#include <string>

namespace mq::worker {

model::InspectRequest ToInspectRequest(const mq::v1::JobSpec& spec) {
  model::InspectRequest r;
  const std::string& uri = spec.model_uri();
  r.model_dir = uri.rfind("file://", 0) == 0 ? uri.substr(7) : uri;
  r.gang_size = spec.gang_size() > 0 ? spec.gang_size() : 1;
  r.bits = spec.bits() > 0 ? spec.bits() : 4;
  r.group_size = spec.group_size() == -1 ? 0 : (spec.group_size() > 0 ? spec.group_size() : 128);
  r.all_linear = spec.targets() == mq::v1::TARGET_SET_ALL_LINEAR;
  r.include_mtp = spec.include_mtp();
  if (spec.calibration().num_samples() > 0) {
    r.num_calibration_samples = spec.calibration().num_samples();
  }
  if (spec.calibration().max_sequence_length() > 0) {
    r.max_sequence_length = spec.calibration().max_sequence_length();
  }
  return r;
}

mq::v1::InspectReport ToProto(const model::InspectReport& in) {
  mq::v1::InspectReport out;
  const model::ModelSummary& s = in.summary;
  mq::v1::ModelSummary* o = out.mutable_summary();
  o->set_model_type(s.model_type);
  o->set_architecture(s.architecture);
  o->set_weight_format(s.weight_format);
  o->set_num_hidden_layers(s.num_hidden_layers);
  o->set_first_k_dense_replace(s.first_k_dense_replace);
  o->set_num_nextn_predict_layers(s.num_nextn_predict_layers);
  o->set_hidden_size(s.hidden_size);
  o->set_intermediate_size(s.intermediate_size);
  o->set_moe_intermediate_size(s.moe_intermediate_size);
  o->set_n_routed_experts(s.n_routed_experts);
  o->set_n_shared_experts(s.n_shared_experts);
  o->set_num_experts_per_tok(s.num_experts_per_tok);
  o->set_n_group(s.n_group);
  o->set_topk_group(s.topk_group);
  o->set_num_attention_heads(s.num_attention_heads);
  o->set_q_lora_rank(s.q_lora_rank);
  o->set_kv_lora_rank(s.kv_lora_rank);
  o->set_qk_nope_head_dim(s.qk_nope_head_dim);
  o->set_qk_rope_head_dim(s.qk_rope_head_dim);
  o->set_v_head_dim(s.v_head_dim);
  o->set_vocab_size(s.vocab_size);
  o->set_num_shards(s.num_shards);
  o->set_num_tensors(s.num_tensors);
  o->set_num_parameters(s.num_parameters);
  o->set_checkpoint_bytes(s.checkpoint_bytes);
  o->set_num_mtp_layers_present(s.num_mtp_layers_present);
  for (const model::Problem& p : in.problems) {
    mq::v1::Problem* q = out.add_problems();
    q->set_where(p.where);
    q->set_message(p.message);
  }
  for (const model::Problem& p : in.notes) {
    mq::v1::Problem* q = out.add_notes();
    q->set_where(p.where);
    q->set_message(p.message);
  }
  for (const model::LayerPlan& l : in.layers) {
    mq::v1::LayerPlan* q = out.add_layers();
    q->set_index(l.index);
    q->set_kind(l.kind == model::LayerKind::kDense ? mq::v1::LAYER_KIND_DENSE
                : l.kind == model::LayerKind::kMoe ? mq::v1::LAYER_KIND_MOE
                                                   : mq::v1::LAYER_KIND_MTP);
    q->set_num_quantized_linears(l.num_quantized_linears);
    q->set_input_bytes(l.input_bytes);
    q->set_output_bytes(l.output_bytes);
  }
  for (const model::RankPlan& r : in.ranks) {
    mq::v1::RankPlan* q = out.add_ranks();
    q->set_rank(r.rank);
    q->set_first_expert(r.first_expert);
    q->set_num_experts(r.num_experts);
    q->set_num_sequences(r.num_sequences);
    q->set_gpu_bytes(r.gpu_bytes);
    q->set_host_bytes(r.host_bytes);
  }
  const model::ResourceEstimate& e = in.estimate;
  mq::v1::ResourceEstimate* q = out.mutable_estimate();
  q->set_gpu_bytes_per_rank(e.gpu_bytes_per_rank);
  q->set_host_bytes_per_rank(e.host_bytes_per_rank);
  q->set_output_bytes(e.output_bytes);
  q->set_scratch_bytes_per_rank(e.scratch_bytes_per_rank);
  q->set_calibration_tokens(e.calibration_tokens);
  q->set_tokens_per_expert(e.tokens_per_expert);
  q->set_dispatch_rounds(e.dispatch_rounds);
  q->set_seconds_per_layer(e.seconds_per_layer);
  q->set_total_seconds(e.total_seconds);
  q->set_checkpoint_every(e.checkpoint_every);
  q->set_preload_next_layer(e.preload_next_layer);
  q->set_resume_replay_seconds(e.resume_replay_seconds);
  q->set_experts_per_pass(e.experts_per_pass);
  q->set_dispatch_tokens(e.dispatch_tokens);
  q->set_experts_per_pass_chosen(e.experts_per_pass_chosen);
  q->set_dispatch_tokens_chosen(e.dispatch_tokens_chosen);
  q->set_expert_passes(e.expert_passes);
  q->set_device_memory_bytes(e.device_memory_bytes);
  return out;
}

}  // namespace mq::worker
