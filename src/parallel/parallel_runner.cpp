#include "parallel/parallel_runner.h"

#include <algorithm>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "kernels/canonical.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/log_softmax.h"
#include "parallel/parallel_backward.h"
#include "parallel/shard_plan.h"
#include "parallel/weight_sync.h"

namespace lockstep {

namespace {
constexpr int kStageTag = (1 << 20) + 17;  // the residual stream, stage to stage

void round_if_bf16(ModelWeights& local, const ShardLayout& layout, Precision precision) {
  if (precision != Precision::bfloat16) return;
  for (auto& [name, t] : local_named(local, layout)) cpu::round_to_bf16(t->data<float>(), t->numel());
}
}  // namespace

ParallelRunner::ParallelRunner(dist::Communicator& world, const ShardLayout& layout, ModelWeights local,
                               Precision precision)
    : model_(world, layout, std::move(local), precision) {
  const Topology& topo = layout.topo;
  if (topo.dp > 1 && topo.tp % (topo.ep * topo.etp) == 0) {
    replicas_ = topo.dp;
    replica_comm_ = make_group(world, topo, GroupKind::MP);
    result_comm_ = replica_comm_.get();
    const std::vector<int> members = topo.group_ranks(GroupKind::MP, world.rank());
    const int root = topo.rank_of(0, layout.coords.dp, topo.pp - 1);
    result_root_ = int(std::find(members.begin(), members.end(), root) - members.begin());
    LS_CHECK(result_root_ < int(members.size()), "parallel runner: rank ", root, " is not in its replica's group");
  } else {
    result_comm_ = &world;
    result_root_ = topo.rank_of(0, 0, topo.pp - 1);
  }
}

std::vector<std::string> ParallelRunner::gather_from_replicas(const std::string& blob) const {
  dist::Communicator& world = *model_.context().world;
  const Topology& topo = layout().topo;
  const uint64_t mine = blob.size();
  std::vector<uint64_t> sizes(world.size());
  world.all_gather_n(&mine, sizes.data(), 1);
  const uint64_t width = *std::max_element(sizes.begin(), sizes.end());
  std::string padded = blob;
  padded.resize(width);
  std::string all(width * world.size(), '\0');
  world.all_gather(padded.data(), all.data(), width);
  // Every rank of a replica holds the same blob: take each replica's first rank's.
  std::vector<std::string> out;
  for (int r = 0; r < replicas_; ++r) {
    const int from = replicas_ > 1 ? topo.rank_of(0, r, 0) : 0;
    out.push_back(all.substr(size_t(from) * width, sizes[from]));
  }
  return out;
}

void ParallelRunner::allocate_kv(int64_t num_pages, int64_t page_size) {
  cache_ = KvCache(layout().local_cache_config(config()), num_pages, page_size);
}

void ParallelRunner::check_batch(const ForwardBatch& batch) const {
  const auto& c = config();
  LS_CHECK(batch.positions.size() == batch.tokens.size() && batch.page_tables.size() == batch.tokens.size(),
           "forward batch: tokens, positions and page tables must have the same length");
  for (size_t t = 0; t < batch.tokens.size(); ++t) {
    LS_CHECK(batch.tokens[t] >= 0 && batch.tokens[t] < c.vocab_size, "token id ", batch.tokens[t],
             " is out of range: the model's vocab_size is ", c.vocab_size);
    LS_CHECK(batch.positions[t] >= 0 && batch.positions[t] < model_.rope_table().max_positions, "position ",
             batch.positions[t], " is beyond max_position_embeddings (", model_.rope_table().max_positions, ")");
  }
}

std::vector<float> ParallelRunner::forward_hidden(const ForwardBatch& batch) {
  check_batch(batch);
  const ParallelContext& ctx = model_.context();
  const ShardLayout& s = ctx.layout;
  const ModelWeights& w = model_.weights();
  const int64_t T = batch.size(), H = config().hidden_size;
  const dist::RowRange rows = ctx.local_rows(T);
  std::vector<float> x(rows.size() * H);
  if (s.first_stage)
    x = ctx.embed_rows(batch.tokens.data(), T, w.embed.data<float>(), config().vocab_size, H);
  else
    ctx.pp->recv_n(x.data(), x.size(), s.coords.pp - 1, kStageTag);
  for (int64_t l = 0; l < s.num_layers; ++l) model_.layer_forward(l, x, batch, cache_);
  if (!s.last_stage) {
    ctx.pp->send_n(x.data(), x.size(), s.coords.pp + 1, kStageTag);
    return {};
  }
  std::vector<float> normed(x.size());
  cpu::rmsnorm(x.data(), w.final_norm.data<float>(), normed.data(), rows.size(), H, float(config().rms_norm_eps),
               precision() == Precision::bfloat16);
  if (precision() == Precision::bfloat16) cpu::round_to_bf16(normed.data(), int64_t(normed.size()));
  return ctx.gather_rows(normed, T, H);
}

std::vector<float> ParallelRunner::full_logits(const std::vector<float>& hidden,
                                               const std::vector<int64_t>& rows) const {
  const ParallelContext& ctx = model_.context();
  const int64_t H = config().hidden_size, V = config().vocab_size, M = int64_t(rows.size());
  std::vector<float> picked(M * H);
  for (int64_t i = 0; i < M; ++i) std::copy_n(hidden.data() + rows[i] * H, H, picked.data() + i * H);
  const int tp = layout().topo.tp;
  const int64_t VL = layout().vocab.size();
  std::vector<float> local(M * VL);
  // The column form computes each logit by the one dot procedure, whatever the slice.
  cpu::linear(picked.data(), model_.weights().lm_head.data<float>(), local.data(), M, VL, H);
  if (tp == 1) return local;
  // Every TP rank's slice padded to the widest (chunk_range) width, all-gathered.
  const int64_t width = canonical_chunk(V) * (kTMax / tp);
  std::vector<float> padded(M * width, 0.0f), all(size_t(tp) * M * width);
  for (int64_t i = 0; i < M; ++i) std::copy_n(local.data() + i * VL, VL, padded.data() + i * width);
  ctx.tp->all_gather_n(padded.data(), all.data(), size_t(M * width));
  std::vector<float> full(M * V);
  for (int r = 0; r < tp; ++r) {
    const dist::RowRange cols = chunk_range(V, tp, r);
    for (int64_t i = 0; i < M; ++i)
      std::copy_n(all.data() + (int64_t(r) * M + i) * width, cols.size(), full.data() + i * V + cols.begin);
  }
  return full;
}

std::vector<SampleResult> ParallelRunner::forward_sample(const ForwardBatch& batch,
                                                         const std::vector<SampleRequest>& requests) {
  for (const auto& r : requests)
    LS_CHECK(r.row >= 0 && r.row < batch.size(), "forward_sample: row ", r.row, " is outside the batch of ",
             batch.size(), " tokens");
  std::vector<float> hidden = forward_hidden(batch);
  std::vector<SampleResult> out(requests.size());
  if (requests.empty()) return out;
  if (layout().last_stage) {
    std::vector<int64_t> rows;
    for (const auto& r : requests) rows.push_back(r.row);
    const std::vector<float> logits = full_logits(hidden, rows);
    if (result_comm_->rank() == result_root_) {
      const int64_t V = config().vocab_size;
      for (size_t i = 0; i < requests.size(); ++i) out[i] = sample_logits_row(logits.data() + i * V, V, requests[i]);
    }
  }
  result_comm_->broadcast(out.data(), out.size() * sizeof(SampleResult), result_root_);
  return out;
}

std::vector<float> ParallelRunner::forward_logprobs(const ForwardBatch& batch, const std::vector<int32_t>& targets) {
  LS_CHECK(targets.size() == batch.tokens.size(), "forward_logprobs: one target per token expected");
  for (int32_t t : targets)
    LS_CHECK(t < config().vocab_size, "forward_logprobs: target ", t, " is out of range: the model's vocab_size is ",
             config().vocab_size);
  std::vector<float> hidden = forward_hidden(batch);
  std::vector<float> out(targets.size(), std::numeric_limits<float>::quiet_NaN());
  std::vector<int64_t> rows;
  for (size_t t = 0; t < targets.size(); ++t)
    if (targets[t] >= 0) rows.push_back(int64_t(t));
  if (rows.empty()) return out;
  if (layout().last_stage) {
    const std::vector<float> logits = full_logits(hidden, rows);
    const int64_t V = config().vocab_size;
    for (size_t i = 0; i < rows.size(); ++i)
      cpu::log_softmax_gather(logits.data() + int64_t(i) * V, &targets[rows[i]], &out[rows[i]], 1, V);
  }
  result_comm_->broadcast_n(out.data(), out.size(), result_root_);
  return out;
}

void ParallelRunner::load_weights(const ModelWeights& weights) {
  LS_CHECK(weights.config.to_json() == config().to_json(),
           "parallel runner: load_weights needs weights of the same config as the running model");
  ModelWeights local = slice_local_weights(weights, layout());
  round_if_bf16(local, layout(), precision());
  model_.weights() = std::move(local);
}

void ParallelRunner::load_weight_bucket(const std::vector<WeightPiece>& pieces) {
  const auto shapes = ModelWeights::expected_shapes(config());
  const std::vector<ShardPiece> held = rank_pieces(config(), layout());
  const auto local = local_named(model_.weights(), layout());
  std::multimap<std::string, size_t> by_name;  // global name -> index into held/local
  for (size_t i = 0; i < held.size(); ++i) by_name.emplace(held[i].name, i);
  std::vector<bool> touched(held.size(), false);
  for (const WeightPiece& p : pieces) {
    auto shape = shapes.find(p.name);
    LS_CHECK(shape != shapes.end(), "weight bucket: '", p.name, "' is not a tensor of this model");
    LS_CHECK(
        p.value.dtype() == DType::f32 && p.value.shape() == box_shape(p.box) && p.box.size() == shape->second.size(),
        "weight bucket: '", p.name, "' box ", box_str(p.box), " needs f32 values of shape ",
        shape_str(box_shape(p.box)), " inside ", shape_str(shape->second));
    for (size_t d = 0; d < p.box.size(); ++d)
      LS_CHECK(p.box[d].begin >= 0 && p.box[d].begin <= p.box[d].end && p.box[d].end <= shape->second[d],
               "weight bucket: box ", box_str(p.box), " of '", p.name, "' is outside its shape ",
               shape_str(shape->second));
    auto [first, last] = by_name.equal_range(p.name);
    for (auto it = first; it != last; ++it)
      if (copy_intersection(p.value, p.box, *local[it->second].second, held[it->second].box) > 0)
        touched[it->second] = true;
  }
  if (precision() == Precision::bfloat16)
    for (size_t i = 0; i < held.size(); ++i)
      if (touched[i]) cpu::round_to_bf16(local[i].second->data<float>(), local[i].second->numel());
}

ModelWeights ParallelRunner::export_weights() const {
  dist::Communicator& world = *model_.context().world;
  // The weight sync into a whole model on every rank: pieces by (name, box), so a tied
  // lm_head slice (the embedding's name) needs no special case. Only reads the shards.
  auto& local = const_cast<ModelWeights&>(model_.weights());
  ModelWeights full = ModelWeights::random(config(), 0, Precision::float32);  // shapes; overwritten below
  stream_weights(world, config(), layout(), local_named(local, layout()),
                 whole_model_layout(config(), world.size(), world.rank()),
                 [&](std::vector<WeightPiece>&& bucket) { apply_weight_pieces(full, bucket); }, {});
  return full;
}

std::unique_ptr<ParallelRunner> make_parallel_runner(dist::Communicator& world, const ResolvedTopology& topo,
                                                     const ModelWeights& full, Precision precision) {
  const ShardLayout layout = ShardLayout::make(full.config, topo.topo, topo.layer_split, world.rank());
  ModelWeights local = slice_local_weights(full, layout);
  round_if_bf16(local, layout, precision);
  return std::make_unique<ParallelRunner>(world, layout, std::move(local), precision);
}

std::unique_ptr<ParallelRunner> load_parallel_runner(dist::Communicator& world, const std::string& model_dir,
                                                     const ModelConfig& cfg, const ResolvedTopology& topo,
                                                     Precision precision) {
  auto src = open_checkpoint_for(model_dir, cfg, topo.topo);
  const ShardLayout layout = ShardLayout::make(cfg, topo.topo, topo.layer_split, world.rank());
  return std::make_unique<ParallelRunner>(world, layout, load_local_weights(*src, cfg, layout, precision), precision);
}

}  // namespace lockstep
