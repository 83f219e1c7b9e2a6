#include "train/train_memory.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace lockstep {

namespace {

double layer_parameter_count(const ModelConfig& c, int64_t l) {
  const double H = double(c.hidden_size), qd = double(c.q_dim()), kd = double(c.kv_dim());
  const bool moe = c.is_moe_layer(l);
  const double E = moe ? double(c.num_experts) : 1.0;
  const double I = moe ? double(c.moe_intermediate_size) : double(c.intermediate_size);
  return (qd + 2 * kd) * H + H * qd + 2 * H + 2 * double(c.head_dim) + (moe ? E * H : 0.0) + E * 3 * I * H;
}

// The plan is close to what the step allocates; the headroom covers the allocator's rounding.
double usable_bytes(double available_bytes) {
  return available_bytes - std::max(double(int64_t(1) << 30), 0.03 * available_bytes);
}

bool g_keep_expert_input_rows = false;
bool g_keep_attention_ds = true;

}  // namespace

void set_keep_expert_input_rows(bool on) { g_keep_expert_input_rows = on; }

bool keep_expert_input_rows() { return g_keep_expert_input_rows; }

void set_keep_attention_ds(bool on) { g_keep_attention_ds = on; }

bool keep_attention_ds() { return g_keep_attention_ds; }

double attention_ds_scratch_bytes(const ModelConfig& c, int64_t tokens) {
  const double tiles = double((tokens + 63) / 64);
  const double bytes = double(c.num_attention_heads) * (tiles * (tiles + 1) / 2) * 64 * 64 * 2;
  return std::min(bytes, double(int64_t(1) << 30));
}

double trainer_parameter_count(const ModelConfig& c) {
  double n = 2 * double(c.vocab_size) * double(c.hidden_size) + double(c.hidden_size);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) n += layer_parameter_count(c, l);
  return n;
}

double largest_gradient_unit(const ModelConfig& c) {
  double n = double(c.vocab_size) * double(c.hidden_size) + double(c.hidden_size);  // the head's
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) n = std::max(n, layer_parameter_count(c, l));
  return n;
}

void check_recompute_num_layers(int64_t recompute_num_layers, bool on_cuda) {
  LS_CHECK(recompute_num_layers >= -1,
           "--recompute-num-layers: expected -1 (as few as the memory allows) or a count >= 0, got ",
           recompute_num_layers);
  LS_CHECK(recompute_num_layers == kRecomputeAuto || on_cuda,
           "--recompute-num-layers: the CPU trainer recomputes every layer; the flag is for --device cuda");
}

int64_t kept_layer_count(const ModelConfig& c, int64_t recomputed_layers) {
  LS_CHECK(recomputed_layers >= 0, "kept_layer_count: a recomputed-layer count >= 0, got ", recomputed_layers);
  return std::max<int64_t>(0, c.num_hidden_layers - std::min(recomputed_layers, c.num_hidden_layers));
}

MicroBatchOrder micro_batch_order(const ModelConfig& c, int64_t tokens, int64_t micro_batches, bool gradients_held,
                                  double available_bytes) {
  if (micro_batches <= 1 || c.tie_word_embeddings) return MicroBatchOrder::batch_major;
  const double all = cuda_train_memory(c, tokens, micro_batches, kRecomputeAll).step_bytes(gradients_held);
  return all <= usable_bytes(available_bytes) ? MicroBatchOrder::batch_major : MicroBatchOrder::layer_major;
}

int64_t recomputed_layer_count(const ModelConfig& c, int64_t tokens, int64_t micro_batches,
                               int64_t recompute_num_layers, bool gradients_held, double available_bytes) {
  const int64_t layers = c.num_hidden_layers;
  if (recompute_num_layers != kRecomputeAuto) {
    check_recompute_num_layers(recompute_num_layers, true);
    return std::min(recompute_num_layers, layers);
  }
  const double usable = usable_bytes(available_bytes);
  const double all = cuda_train_memory(c, tokens, micro_batches, layers).step_bytes(gradients_held);
  const double per_layer = kept_layer_bytes(c, tokens);
  if (usable <= all) return layers;
  return layers - std::min<int64_t>(layers, int64_t((usable - all) / per_layer));
}

double kept_layer_bytes(const ModelConfig& c, int64_t tokens) {
  const double H = double(c.hidden_size), qd = double(c.q_dim()), kd = double(c.kv_dim());
  const double k = double(std::max<int64_t>(c.num_experts_per_tok, 1)), E = double(std::max<int64_t>(c.num_experts, 1));
  const double t = double(tokens), rows = t * k, I = c.num_experts > 0 ? double(c.moe_intermediate_size) : 0.0;
  // h, qkv, q, attn, mid, h_mlp, y, the experts' input rows (keep_expert_input_rows), their
  // [gate | up] rows and SwiGLU (bf16); router logits, ids, expert weights, the rows' order, the attention's
  // log-sum-exp; K and V pages.
  return (3 * t * H + t * (qd + 2 * kd) + 2 * t * qd + (keep_expert_input_rows() ? 2 : 1) * rows * H + rows * 3 * I) *
             2 +
         (t * E + 3 * rows + t * double(c.num_attention_heads)) * 4 + 2 * (2 * t / 64 + 1) * 64 * kd * 2;
}

TrainMemory cuda_train_memory(const ModelConfig& c, int64_t tokens, int64_t micro_batches, int64_t recomputed_layers,
                              MicroBatchOrder order) {
  const double H = double(c.hidden_size), V = double(c.vocab_size), NL = double(c.num_hidden_layers);
  const double qd = double(c.q_dim()), kd = double(c.kv_dim());
  const double k = double(std::max<int64_t>(c.num_experts_per_tok, 1)), E = double(std::max<int64_t>(c.num_experts, 1));
  const double I = double(std::max(c.moe_intermediate_size, c.intermediate_size));
  const double heads = double(std::max(c.num_attention_heads, c.num_key_value_heads));
  const double t = double(tokens), rows = t * k, params = trainer_parameter_count(c);
  double norms = H;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) norms += 2 * H + 2 * double(c.head_dim);
  TrainMemory m;
  m.weights = (params - norms) * 2 + norms * 4;
  m.optimizer = 3 * params * 4;
  const double levels = std::log2(double(std::max<int64_t>(micro_batches, 1)));
  const bool layer_major = order == MicroBatchOrder::layer_major;
  m.gradients = (layer_major ? 1 : levels + 1) * params * 4;
  m.tree_levels = layer_major ? levels * largest_gradient_unit(c) * 4 : 0.0;
  m.logits = t * V * 4 + 8 * t * 4;
  // Kept layer inputs, the head's rows, the step's KV pages (a page of 64 positions a block,
  // rounded up per sequence: at most one more per 64 tokens), the residual gradient.
  m.activations = NL * t * H * 2 + 4 * t * H * 2 + 2 * (2 * t / 64 + 1) * 64 * kd * 2 + t * H * 4;
  // The backward's scratch (CudaTrainer::scratch) and the runner's workspace for t tokens.
  m.activations +=
      (3 * t * H + 3 * t * qd + 3 * t * kd + 3 * t * heads + t * k + t * E + 3 * rows * H + 3 * rows * I) * 4 +
      (2 * t * qd + t * kd + rows * H + rows * 3 * I) * 2 + 4 * rows * 4 + 8 * std::max(H, double(c.head_dim)) * 4;
  m.activations += (2 * t * H + t * (qd + 2 * kd) + 2 * t * qd + rows * 3 * I + rows * H) * 2 +
                   (t * E + 2 * t * k + t * heads) * 4 + 8 * std::min(rows, 1024.0) * H * 4;
  // The large-tile outer sums' workspace: 256 KB an SM, bounded here by 256 SMs.
  m.activations += 256.0 * 256 * 1024;
  if (keep_attention_ds()) m.activations += attention_ds_scratch_bytes(c, tokens);
  if (layer_major) {
    // The other micro-batches' layer inputs, final-norm input and output, residual gradient.
    m.activations += double(std::max<int64_t>(micro_batches, 1) - 1) * ((NL + 2) * t * H * 2 + t * H * 4);
  } else {
    m.activations += double(kept_layer_count(c, recomputed_layers)) * kept_layer_bytes(c, tokens);
  }
  return m;
}

}  // namespace lockstep
