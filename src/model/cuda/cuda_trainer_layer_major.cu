// The GPU trainer's layer-major step (CudaTrainer::step_grads_layer_major; train_memory.h's
// MicroBatchOrder::layer_major): a step of M micro-batches with one buffer of the model's
// gradients. Every micro-batch's forward and head run first (each keeps its layer inputs and
// its residual gradient); then each layer's backward over the micro-batches, last layer first,
// each recomputed from its input; then the embedding's.
//
// Each part (the head, a layer, the embedding) sums its micro-batches' gradients by the
// pairwise tree over their index (rule 8 of docs/numerics.md), folded in place as the leaves
// come: leaf 0 and every node holding it live in the gradient buffer itself, any other node in
// the scratch level of its first leaf's lowest set bit (no two pending nodes share a level),
// and a parent is its left child += its right child, the batch-major tree's adds: the same bits.
#include <algorithm>
#include <bit>
#include <vector>

#include "model/cuda/cuda_trainer_impl.h"
#include "train/train_memory.h"

namespace lockstep::cuda_model {

namespace {

using Spans = std::vector<std::pair<float*, int64_t>>;

// Layer l's gradient buffers (pointer, floats) in kLayerBuffers' order.
Spans layer_spans(const ModelConfig& c, const DeviceLayerFloats& g, int64_t l) {
  Spans out;
  for (auto [buffer, field] : kLayerBuffers)
    if (const int64_t n = device_buffer_floats(c, buffer, l); n > 0) out.emplace_back(g.*field, n);
  return out;
}

// Layer l's gradients laid out in a scratch level of `floats` floats.
DeviceLayerFloats carve_layer(const ModelConfig& c, float* level, int64_t floats, int64_t l) {
  int64_t used = 0;
  return layer_floats(c, l, [&](DeviceBuffer buffer) {
    float* p = level + used;
    used += device_buffer_floats(c, buffer, l);
    LS_CHECK(used <= floats, "layer-major tree: layer ", l, " needs more than a level's ", floats, " floats");
    return p;
  });
}

// One part's pairwise tree over the micro-batches. slot -1 is the gradient buffer; slot k >= 0
// scratch level k.
class PartTree {
 public:
  // Where leaf j's gradients go.
  static int slot_of(int64_t j) { return j == 0 ? -1 : std::countr_zero(uint64_t(j)); }

  // Leaf j (in slot_of(j)) is written: folds every node it completes. add(left, right) adds
  // slot right's part into slot left's.
  template <typename Add>
  void push(int64_t j, Add add) {
    stack_.push_back({0, slot_of(j)});
    while (stack_.size() >= 2 && stack_[stack_.size() - 1].first == stack_[stack_.size() - 2].first) {
      const int right = stack_.back().second;
      stack_.pop_back();
      add(stack_.back().second, right);
      ++stack_.back().first;
    }
  }
  // The whole tree is folded into the gradient buffer.
  bool done() const { return stack_.size() == 1 && stack_.front().second == -1; }

 private:
  std::vector<std::pair<int, int>> stack_;  // (level, slot) of the pending nodes
};

}  // namespace

void CudaTrainer::step_grads_layer_major(const std::vector<std::vector<std::vector<int32_t>>>& micro_batches,
                                         bool want_entropy, const UpstreamFn& upstream, DeviceFloats* grads) {
  const auto& c = c_;
  const int64_t M = int64_t(micro_batches.size()), NL = c.num_hidden_layers;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  cudaStream_t st = r_.stream_;
  LS_CHECK(M >= 1 && std::has_single_bit(uint64_t(M)),
           "layer-major step: the micro-batch count must be a power of two, got ", M);
  LS_CHECK(upstream && grads, "layer-major step: training only (an upstream and a gradient buffer)");
  LS_CHECK(!c.tie_word_embeddings,
           "layer-major step: a tied lm_head's gradient joins the embedding's per micro-batch (batch-major only)");
  std::vector<Batch> batches;
  batches.reserve(size_t(M));
  int64_t T_max = 0, pages_max = 0;
  for (const auto& mb : micro_batches) {
    batches.push_back(prepare_batch(mb));
    T_max = std::max(T_max, batches.back().T);
    pages_max = std::max<int64_t>(pages_max, batches.back().packed.num_pages);
  }
  r_.step_arena_.reset();
  recomputed_layers_ = kRecomputeAll;
  check_fits(T_max, M, kRecomputeAll, true, true, MicroBatchOrder::layer_major);
  const TrainMemory plan = cuda_train_memory(c, T_max, M, kRecomputeAll, MicroBatchOrder::layer_major);
  r_.step_arena_.prepare(plan.logits + plan.tree_levels + plan.activations);

  const cuda::DeviceKvLayer kv = step_kv(pages_max);
  r_.reserve(T_max, 1);
  for (Batch& b : batches) allocate_batch(b);
  float* logits = alloc<float>(T_max * V);
  PhaseClock clock(st);
  // The scratch levels, each the largest part's size.
  const int levels = std::countr_zero(uint64_t(M));
  const int64_t level_floats = int64_t(largest_gradient_unit(c));
  std::vector<float*> level(static_cast<size_t>(levels));
  for (auto& p : level) p = alloc<float>(level_floats);
  const auto add_spans = [&](const Spans& left, const Spans& right) {
    for (size_t i = 0; i < left.size(); ++i) cuda::add_inplace(left[i].first, right[i].first, left[i].second, st);
  };

  // ---- Forward and head of each micro-batch; the head's tree (lm_head, then the final norm).
  const auto head_spans = [&](int slot) -> Spans {
    if (slot < 0) return {{grads->lm_head, V * H}, {grads->final_norm, H}};
    return {{level[size_t(slot)], V * H}, {level[size_t(slot)] + V * H, H}};
  };
  BackwardScratch s = scratch(T_max);
  PartTree head_tree;
  for (int64_t j = 0; j < M; ++j) {
    Batch& b = batches[size_t(j)];
    const cuda::DeviceSlots slots = upload(b);
    forward(b, slots, kv, nullptr, nullptr);
    clock.lap("forward");
    const Spans to = head_spans(PartTree::slot_of(j));
    head(b, j, want_entropy, upstream, logits, nullptr, to[0].first, to[1].first, &s, clock);
    head_tree.push(j, [&](int left, int right) { add_spans(head_spans(left), head_spans(right)); });
    clock.lap("head_backward");
  }
  LS_CHECK(head_tree.done(), "layer-major step: the head's tree did not fold");

  // ---- Layers, last first, each over the micro-batches.
  CudaRunner::Workspace train_ws = train_workspace(T_max);
  for (int64_t l = NL - 1; l >= 0; --l) {
    const auto target = [&](int slot) {
      return slot < 0 ? grads->layers[size_t(l)] : carve_layer(c, level[size_t(slot)], level_floats, l);
    };
    PartTree tree;
    for (int64_t j = 0; j < M; ++j) {
      Batch& b = batches[size_t(j)];
      // The runner stages every upload in one pinned buffer: the last one's copy must be done.
      LS_CUDA_CHECK(cudaStreamSynchronize(st));
      const cuda::DeviceSlots slots = upload(b);
      backward_layer(b, l, slots, train_ws, kv, target(PartTree::slot_of(j)), s, clock, KeptLayer{});
      tree.push(j, [&](int left, int right) {
        add_spans(layer_spans(c, target(left), l), layer_spans(c, target(right), l));
      });
    }
    LS_CHECK(tree.done(), "layer-major step: layer ", l, "'s tree did not fold");
  }

  // ---- The embedding's rows of each micro-batch, and their tree.
  const auto embed_of = [&](int slot) { return slot < 0 ? grads->embed : level[size_t(slot)]; };
  PartTree embed_tree;
  for (int64_t j = 0; j < M; ++j) {
    embedding_backward(batches[size_t(j)], embed_of(PartTree::slot_of(j)), nullptr, clock);
    embed_tree.push(j, [&](int left, int right) { cuda::add_inplace(embed_of(left), embed_of(right), V * H, st); });
  }
  LS_CHECK(embed_tree.done(), "layer-major step: the embedding's tree did not fold");
  LS_CUDA_CHECK(cudaStreamSynchronize(st));
  r_.step_arena_.reset();
}

}  // namespace lockstep::cuda_model
