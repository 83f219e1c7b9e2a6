// The CUDA ModelRunner's class, shared by the runner (cuda_runner.cu) and the GPU trainer
// (cuda_trainer.cu), which recomputes layers with the runner's own op set and weights.
// Included by CUDA sources only.
#pragma once
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <set>
#include <unordered_map>

#include "core/device_memory.h"
#include "core/dtype.h"
#include "core/philox.h"
#include "kernels/cpu/rope.h"
#include "kernels/cpu/sampling.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/backward.h"  // gather_rows
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/decode_layers.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/top_n.h"
#include "model/cuda/cuda_runner.h"
#include "model/cuda/step_arena.h"
#include "model/layer.h"

namespace lockstep {
struct DeviceSegment;  // model/device_layout.h
}  // namespace lockstep

namespace lockstep::cuda_model {

using cuda::bf16_t;
using cuda::GemmArgs;
using cuda::GemmOut;

// Device allocations owned by one object; freed together.
class DeviceArena {
 public:
  template <typename T>
  T* alloc(int64_t n) {
    owned_.push_back(device_alloc(Device::cuda, size_t(std::max<int64_t>(n, 1)) * sizeof(T)));
    return static_cast<T*>(owned_.back().get());
  }
  void clear() { owned_.clear(); }

 private:
  std::vector<std::shared_ptr<void>> owned_;
};

struct DeviceLayer {
  bf16_t* qkv = nullptr;  // [q_dim + 2 kv_dim, H]
  bf16_t* o = nullptr;    // [H, q_dim]
  float *input_norm = nullptr, *post_norm = nullptr, *q_norm = nullptr, *k_norm = nullptr;
  bool is_moe = false;
  bf16_t* router = nullptr;   // [E, H]
  bf16_t* gate_up = nullptr;  // [E, 2I, H]: per expert the gate rows, then the up rows
  bf16_t* down = nullptr;     // [E, H, I]
};

// Host pinned staging: the engine's per-step metadata (one upload a step), the trainer's
// kept layers' routing and expert rows.
class PinnedInts {
 public:
  ~PinnedInts() {
    if (p_) cudaFreeHost(p_);
  }
  // At least n ints; a larger buffer replaces the old one once `readers` (the stream whose
  // copies read it) is done with it.
  int32_t* reserve(size_t n, cudaStream_t readers) {
    if (n > cap_) {
      if (p_) {
        LS_CUDA_CHECK(cudaStreamSynchronize(readers));
        cudaFreeHost(p_);
        p_ = nullptr;
      }
      LS_CUDA_CHECK(cudaMallocHost(&p_, n * sizeof(int32_t)));
      cap_ = n;
    }
    return p_;
  }

 private:
  int32_t* p_ = nullptr;
  size_t cap_ = 0;
};

inline std::vector<uint16_t> to_bf16_bits(const float* x, int64_t n) {
  std::vector<uint16_t> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out[size_t(i)] = f32_to_bf16(x[i]);
  return out;
}

inline cuda::DecodeShape decode_shape_of(const ModelConfig& c) {
  cuda::DecodeShape s;
  s.hidden = c.hidden_size;
  s.heads = c.num_attention_heads;
  s.kv_heads = c.num_key_value_heads;
  s.head_dim = c.head_dim;
  s.experts = c.num_experts;
  s.experts_per_token = c.num_experts_per_tok;
  s.intermediate = c.moe_intermediate_size;
  return s;
}

class CudaRunner final : public ModelRunner {
  // The GPU trainer (cuda_trainer.cu, cuda_layer_backward.h, cuda_train_state.cu) runs this runner's layers on its
  // weights.
  friend class CudaTrainer;
  friend struct CudaLayerBackwardOps;
  friend void runner_segment_ptr(CudaRunner& r, const DeviceSegment& s, bf16_t** matrix, float** norm);

 public:
  explicit CudaRunner(const ModelConfig& config) : config_(config) {
    LS_CHECK(cuda_available(), "--device cuda: no CUDA device is available");
    LS_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    const auto& c = config_;
    LS_CHECK(c.head_dim % 2 == 0, "head_dim must be even for the rotary embedding");
    cpu::RopeTable rope =
        cpu::RopeTable::build(c.head_dim, std::max<int64_t>(c.max_position_embeddings, 1), c.rope_theta);
    max_positions_ = rope.max_positions;
    rope_cos_ = const_.alloc<float>(int64_t(rope.cos.size()));
    rope_sin_ = const_.alloc<float>(int64_t(rope.sin.size()));
    upload(rope_cos_, rope.cos.data(), rope.cos.size() * 4);
    upload(rope_sin_, rope.sin.data(), rope.sin.size() * 4);
    allocate_weights();
    one_launch_decode_ = one_launch_decode_applies();
    if (one_launch_decode_) {
      decode_x_mid_ = const_.alloc<bf16_t>(c.hidden_size);
      decode_barrier_ = const_.alloc<uint32_t>(1);
    }
  }
  ~CudaRunner() override {
    cudaStreamSynchronize(stream_);
    drop_graphs();
    cudaStreamDestroy(stream_);
  }

  const ModelConfig& config() const override { return config_; }
  Device device() const override { return Device::cuda; }
  Precision precision() const override { return Precision::bfloat16; }
  cudaStream_t stream() const { return stream_; }
  // Copies on the runner's stream (synchronous unless named async).
  void upload(void* dst, const void* src, size_t bytes) {
    LS_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
    LS_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  void upload_async(void* dst, const void* src, size_t bytes) {
    // Pageable source: the copy is staged before the call returns, so src may go away.
    LS_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
  }
  void download(void* dst, const void* src, size_t bytes) {
    LS_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    LS_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  // A tied lm_head follows the embedding (the trainer's step updated the embedding).
  void copy_embedding_to_head() {
    LS_CUDA_CHECK(cudaMemcpyAsync(lm_head_, embed_, size_t(config_.vocab_size * config_.hidden_size) * 2,
                                  cudaMemcpyDeviceToDevice, stream_));
  }

  void allocate_kv(int64_t num_pages, int64_t page_size) override {
    LS_CHECK(num_pages > 0 && page_size > 0, "allocate_kv: num_pages and page_size must be positive, got ", num_pages,
             " and ", page_size);
    // The kernels index cache slots (page * page_size + offset) in 32 bits.
    LS_CHECK(num_pages * page_size < (int64_t(1) << 31), "allocate_kv: ", num_pages, " pages of ", page_size,
             " positions exceed 2^31 cache slots");
    LS_CUDA_CHECK(cudaStreamSynchronize(stream_));
    drop_graphs();
    kv_arena_.clear();
    kv_.clear();
    step_arena_.release_if_idle();  // the engine's pages come first
    num_pages_ = num_pages;
    page_size_ = page_size;
    const int64_t n = num_pages * page_size * config_.num_key_value_heads * config_.head_dim;
    for (int64_t l = 0; l < config_.num_hidden_layers; ++l) {
      cuda::DeviceKvLayer layer;
      layer.k = kv_arena_.alloc<bf16_t>(n);
      layer.v = kv_arena_.alloc<bf16_t>(n);
      LS_CUDA_CHECK(cudaMemsetAsync(layer.k, 0, size_t(n) * 2, stream_));
      LS_CUDA_CHECK(cudaMemsetAsync(layer.v, 0, size_t(n) * 2, stream_));
      layer.page_size = page_size;
      layer.kv_heads = config_.num_key_value_heads;
      layer.head_dim = config_.head_dim;
      kv_.push_back(layer);
    }
    if (one_launch_decode_) upload_decode_layers();
  }

  std::vector<SampleResult> forward_sample(const ForwardBatch& batch,
                                           const std::vector<SampleRequest>& requests) override {
    const int64_t R = int64_t(requests.size()), V = config_.vocab_size;
    for (const auto& r : requests) {
      LS_CHECK(r.row >= 0 && r.row < batch.size(), "forward_sample: request row ", r.row, " is outside the batch of ",
               batch.size(), " tokens");
      check_top_logprobs_count(r.top_logprobs);
    }
    forward(batch, R);
    std::vector<int32_t> rows(static_cast<size_t>(R));
    std::vector<cuda::DeviceSampleParams> params(static_cast<size_t>(R));
    for (int64_t i = 0; i < R; ++i) {
      const auto& r = requests[size_t(i)];
      rows[size_t(i)] = int32_t(r.row);
      params[size_t(i)] = {r.temperature, philox_uniform(r.seed, r.stream, r.position), -1};
    }
    upload_async(ws_.rows, rows.data(), rows.size() * 4);
    upload_async(ws_.sample_params, params.data(), params.size() * sizeof(cuda::DeviceSampleParams));
    compute_logits(ws_.rows, R);
    cuda::sample_rows(ws_.logits, ws_.sample_params, ws_.sampled_tokens, ws_.sampled_logprobs, R, V, ws_.sample_ws,
                      stream_);
    std::vector<int32_t> tokens(static_cast<size_t>(R));
    std::vector<float> logprobs(static_cast<size_t>(R));
    download(tokens.data(), ws_.sampled_tokens, tokens.size() * 4);
    download(logprobs.data(), ws_.sampled_logprobs, logprobs.size() * 4);
    std::vector<SampleResult> out(static_cast<size_t>(R));
    std::vector<float> row;
    bool forced = false;
    for (int64_t i = 0; i < R; ++i) {
      const auto& r = requests[size_t(i)];
      out[size_t(i)] = {tokens[size_t(i)], logprobs[size_t(i)]};
      if (r.temperature != 0.0f && ((r.top_k > 0 && r.top_k < V) || r.top_p < 1.0f)) {
        // Truncated sampling needs a sort of the row: the token is drawn on the host from the
        // device logits; its log-prob comes from the device's canonical log-softmax below,
        // so it has the same bits as the trainer's score of that token.
        row.resize(size_t(V));
        download(row.data(), ws_.logits + i * V, size_t(V) * 4);
        params[size_t(i)].forced =
            cpu::sample_row(row.data(), V, r.temperature, r.top_k, r.top_p, params[size_t(i)].u).token;
        forced = true;
      }
    }
    if (forced) {
      upload_async(ws_.sample_params, params.data(), params.size() * sizeof(cuda::DeviceSampleParams));
      cuda::sample_rows(ws_.logits, ws_.sample_params, ws_.sampled_tokens, ws_.sampled_logprobs, R, V, ws_.sample_ws,
                        stream_);
      download(tokens.data(), ws_.sampled_tokens, tokens.size() * 4);
      download(logprobs.data(), ws_.sampled_logprobs, logprobs.size() * 4);
      for (int64_t i = 0; i < R; ++i)
        if (params[size_t(i)].forced >= 0) out[size_t(i)] = {tokens[size_t(i)], logprobs[size_t(i)]};
    }
    add_top_logprobs(requests, out);
    return out;
  }

  // The rows that ask for top log-probs get them from the log-softmax their token was drawn from
  // (computed on the device in place of the logits, so the sampled token's entry is its log-prob
  // bit for bit), picked on the device; a step without such rows costs nothing more.
  void add_top_logprobs(const std::vector<SampleRequest>& requests, std::vector<SampleResult>& out) {
    static_assert(cuda::kMaxTopN == kMaxTopLogprobs, "the device top-n holds every top_logprobs count");
    const int64_t R = int64_t(requests.size()), V = config_.vocab_size;
    if (std::none_of(requests.begin(), requests.end(), [](const SampleRequest& r) { return r.top_logprobs > 0; }))
      return;
    std::vector<int32_t> counts(static_cast<size_t>(R));
    for (int64_t i = 0; i < R; ++i) counts[size_t(i)] = int32_t(std::min<int64_t>(requests[size_t(i)].top_logprobs, V));
    upload_async(ws_.top_counts, counts.data(), counts.size() * 4);
    cuda::sampled_log_softmax_rows(ws_.logits, ws_.sample_params, ws_.sample_ws, R, V, stream_);
    cuda::top_n_rows(ws_.logits, ws_.top_counts, ws_.top_tokens, ws_.top_values, R, V, stream_);
    std::vector<int32_t> tokens(static_cast<size_t>(R * kMaxTopLogprobs));
    std::vector<float> values(tokens.size());
    download(tokens.data(), ws_.top_tokens, tokens.size() * 4);
    download(values.data(), ws_.top_values, values.size() * 4);
    for (int64_t i = 0; i < R; ++i) {
      SampleResult& o = out[size_t(i)];
      o.num_top = counts[size_t(i)];
      for (int32_t k = 0; k < o.num_top; ++k)
        o.top[k] = {tokens[size_t(i * kMaxTopLogprobs + k)], values[size_t(i * kMaxTopLogprobs + k)]};
    }
  }

  std::vector<float> forward_logprobs(const ForwardBatch& batch, const std::vector<int32_t>& targets) override {
    LS_CHECK(targets.size() == batch.tokens.size(), "forward_logprobs: one target per token expected, got ",
             targets.size(), " for ", batch.tokens.size(), " tokens");
    std::vector<int32_t> rows, row_targets;
    for (size_t t = 0; t < targets.size(); ++t) {
      LS_CHECK(targets[t] < config_.vocab_size, "forward_logprobs: target ", targets[t], " is out of range");
      if (targets[t] >= 0) {
        rows.push_back(int32_t(t));
        row_targets.push_back(targets[t]);
      }
    }
    const int64_t slice = kLogitRows;
    forward(batch, std::min<int64_t>(int64_t(rows.size()), slice));
    std::vector<float> out(targets.size(), std::numeric_limits<float>::quiet_NaN());
    std::vector<float> got;
    for (size_t b = 0; b < rows.size(); b += size_t(slice)) {
      const int64_t n = std::min<int64_t>(slice, int64_t(rows.size() - b));
      upload_async(ws_.rows, rows.data() + b, size_t(n) * 4);
      upload_async(ws_.targets, row_targets.data() + b, size_t(n) * 4);
      compute_logits(ws_.rows, n);
      cuda::log_softmax_gather(ws_.logits, ws_.targets, ws_.row_logprobs, n, config_.vocab_size, stream_);
      got.resize(size_t(n));
      download(got.data(), ws_.row_logprobs, size_t(n) * 4);
      for (int64_t i = 0; i < n; ++i) out[size_t(rows[b + size_t(i)])] = got[size_t(i)];
    }
    return out;
  }

  void load_weights(const ModelWeights& w) override {
    const auto& c = config_;
    LS_CHECK(w.config.hidden_size == c.hidden_size && w.config.num_hidden_layers == c.num_hidden_layers &&
                 w.config.vocab_size == c.vocab_size && w.config.num_experts == c.num_experts,
             "load_weights: the weights' config differs from the runner's");
    const int64_t H = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim();
    upload_bf16(embed_, w.embed.data<float>(), c.vocab_size * H);
    upload_bf16(lm_head_, w.lm_head.data<float>(), c.vocab_size * H);
    upload(final_norm_, w.final_norm.data<float>(), size_t(H) * 4);
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const auto& L = w.layers[size_t(l)];
      auto& D = layers_[size_t(l)];
      LS_CHECK(L.is_moe == D.is_moe, "load_weights: layer ", l, " MoE/dense kind differs from the config");
      upload_bf16(D.qkv, L.q_proj.data<float>(), qd * H);
      upload_bf16(D.qkv + qd * H, L.k_proj.data<float>(), kvd * H);
      upload_bf16(D.qkv + (qd + kvd) * H, L.v_proj.data<float>(), kvd * H);
      upload_bf16(D.o, L.o_proj.data<float>(), H * qd);
      upload(D.input_norm, L.input_norm.data<float>(), size_t(H) * 4);
      upload(D.post_norm, L.post_attention_norm.data<float>(), size_t(H) * 4);
      upload(D.q_norm, L.q_norm.data<float>(), size_t(c.head_dim) * 4);
      upload(D.k_norm, L.k_norm.data<float>(), size_t(c.head_dim) * 4);
      if (D.is_moe) {
        const int64_t I = c.moe_intermediate_size;
        upload_bf16(D.router, L.router.data<float>(), c.num_experts * H);
        for (int64_t e = 0; e < c.num_experts; ++e) {
          const auto& X = L.experts[size_t(e)];
          upload_bf16(D.gate_up + e * 2 * I * H, X.gate.data<float>(), I * H);
          upload_bf16(D.gate_up + e * 2 * I * H + I * H, X.up.data<float>(), I * H);
          upload_bf16(D.down + e * H * I, X.down.data<float>(), H * I);
        }
      } else {
        const int64_t I = c.intermediate_size;
        upload_bf16(D.gate_up, L.dense.gate.data<float>(), I * H);
        upload_bf16(D.gate_up + I * H, L.dense.up.data<float>(), I * H);
        upload_bf16(D.down, L.dense.down.data<float>(), H * I);
      }
    }
    LS_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  // The weights as the runner holds them: bf16 matrices widened to f32, fp32 norms as they are.
  ModelWeights export_weights() const override {
    const auto& c = config_;
    ModelWeights w;
    w.config = c;
    w.layers.resize(size_t(c.num_hidden_layers));
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      w.layers[size_t(l)].is_moe = layers_[size_t(l)].is_moe;
      if (layers_[size_t(l)].is_moe) w.layers[size_t(l)].experts.resize(size_t(c.num_experts));
    }
    const auto shapes = ModelWeights::expected_shapes(c);
    for (auto& [name, t] : w.named()) *t = Tensor::zeros(shapes.at(name), DType::f32);
    const int64_t H = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim();
    download_bf16(w.embed, embed_, 0);
    if (c.tie_word_embeddings)
      w.lm_head = w.embed;
    else
      download_bf16(w.lm_head, lm_head_, 0);
    download_f32(w.final_norm, final_norm_);
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      auto& L = w.layers[size_t(l)];
      const auto& D = layers_[size_t(l)];
      download_bf16(L.q_proj, D.qkv, 0);
      download_bf16(L.k_proj, D.qkv, qd * H);
      download_bf16(L.v_proj, D.qkv, (qd + kvd) * H);
      download_bf16(L.o_proj, D.o, 0);
      download_f32(L.input_norm, D.input_norm);
      download_f32(L.post_attention_norm, D.post_norm);
      download_f32(L.q_norm, D.q_norm);
      download_f32(L.k_norm, D.k_norm);
      if (D.is_moe) {
        const int64_t I = c.moe_intermediate_size;
        download_bf16(L.router, D.router, 0);
        for (int64_t e = 0; e < c.num_experts; ++e) {
          auto& X = L.experts[size_t(e)];
          download_bf16(X.gate, D.gate_up, e * 2 * I * H);
          download_bf16(X.up, D.gate_up, e * 2 * I * H + I * H);
          download_bf16(X.down, D.down, e * H * I);
        }
      } else {
        const int64_t I = c.intermediate_size;
        download_bf16(L.dense.gate, D.gate_up, 0);
        download_bf16(L.dense.up, D.gate_up, I * H);
        download_bf16(L.dense.down, D.down, 0);
      }
    }
    return w;
  }

  void randomize(uint64_t seed) {
    const auto& c = config_;
    const int64_t H = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim();
    const float a = 0.02f * std::sqrt(3.0f);  // uniform with std 0.02
    uint64_t s = seed * 1000003ull;
    cuda::fill_random_bf16(embed_, c.vocab_size * H, ++s, a, 0.0f, stream_);
    cuda::fill_random_bf16(lm_head_, c.vocab_size * H, ++s, a, 0.0f, stream_);
    cuda::fill_random_f32(final_norm_, H, ++s, 0.1f, 1.0f, stream_);
    for (auto& D : layers_) {
      cuda::fill_random_bf16(D.qkv, (qd + 2 * kvd) * H, ++s, a, 0.0f, stream_);
      cuda::fill_random_bf16(D.o, H * qd, ++s, a, 0.0f, stream_);
      cuda::fill_random_f32(D.input_norm, H, ++s, 0.1f, 1.0f, stream_);
      cuda::fill_random_f32(D.post_norm, H, ++s, 0.1f, 1.0f, stream_);
      cuda::fill_random_f32(D.q_norm, c.head_dim, ++s, 0.1f, 1.0f, stream_);
      cuda::fill_random_f32(D.k_norm, c.head_dim, ++s, 0.1f, 1.0f, stream_);
      const int64_t E = D.is_moe ? c.num_experts : 1, I = D.is_moe ? c.moe_intermediate_size : c.intermediate_size;
      if (D.is_moe) cuda::fill_random_bf16(D.router, E * H, ++s, a, 0.0f, stream_);
      cuda::fill_random_bf16(D.gate_up, E * 2 * I * H, ++s, a, 0.0f, stream_);
      cuda::fill_random_bf16(D.down, E * H * I, ++s, a, 0.0f, stream_);
    }
    LS_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

 private:
  static constexpr int64_t kLogitRows = 1024;      // logits are made in slices of this many rows
  static constexpr int64_t kGraphMaxTokens = 512;  // steps up to this size replay CUDA graphs

  struct Workspace {
    int64_t tokens = 0, logit_rows = 0;
    bf16_t *x = nullptr, *h = nullptr, *qkv = nullptr, *q = nullptr, *attn = nullptr, *gu = nullptr, *act = nullptr,
           *y = nullptr;
    // The attention block's output and the MLP's input: x and h when only the layer's output
    // matters (inference), their own buffers when the backward reads them (training).
    bf16_t *mid = nullptr, *h_mlp = nullptr;
    float* router_logits = nullptr;
    // Training: each query row's log-sum-exp from the forward's attention (the backward's
    // normaliser, so it need not walk the KV blocks once more for it); null: not kept.
    float* lse = nullptr;
    float* split = nullptr;  // per-chunk partials of small row-form GEMMs (gemm.h)
    int64_t split_floats = 0;
    int32_t *ids = nullptr, *counts = nullptr, *group_rows = nullptr, *gather = nullptr, *scatter = nullptr;
    float* expert_weights = nullptr;
    // Training, a kept MoE layer: the experts' [gate | up] rows stay in gu and their SwiGLU in
    // act (rows in scatter's order), for the backward to read instead of recomputing them.
    bool keep_gate_up = false;
    // Training, a kept MoE layer: the experts' input rows gathered once (scatter's order), so
    // the [gate | up] GEMM reads them contiguously by TMA and the backward reads them in place.
    bf16_t* x_rows = nullptr;
    int32_t* meta = nullptr;  // tokens | positions | seq_of_token | page tables
    int64_t meta_cap = 0;
    int32_t *rows = nullptr, *targets = nullptr, *sampled_tokens = nullptr;
    float *logits = nullptr, *row_logprobs = nullptr, *sampled_logprobs = nullptr;
    float* sample_ws = nullptr;  // cuda::sample_rows scratch
    cuda::DeviceSampleParams* sample_params = nullptr;
    int32_t *top_counts = nullptr, *top_tokens = nullptr;  // top log-probs: per row, [rows, kMaxTopN]
    float* top_values = nullptr;
  };

  // dst (an f32 tensor) = the bf16 values at src + offset, widened exactly.
  void download_bf16(Tensor& dst, const bf16_t* src, int64_t offset) const {
    std::vector<uint16_t> bits(static_cast<size_t>(dst.numel()));
    LS_CUDA_CHECK(cudaMemcpyAsync(bits.data(), src + offset, bits.size() * 2, cudaMemcpyDeviceToHost, stream_));
    LS_CUDA_CHECK(cudaStreamSynchronize(stream_));
    float* out = dst.data<float>();
    for (size_t i = 0; i < bits.size(); ++i) out[i] = bf16_to_f32(bits[i]);
  }
  void download_f32(Tensor& dst, const float* src) const {
    LS_CUDA_CHECK(cudaMemcpyAsync(dst.data<float>(), src, size_t(dst.numel()) * 4, cudaMemcpyDeviceToHost, stream_));
    LS_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  void upload_bf16(bf16_t* dst, const float* src, int64_t n) {
    auto bits = to_bf16_bits(src, n);
    upload(dst, bits.data(), bits.size() * 2);
  }

  void allocate_weights() {
    const auto& c = config_;
    const int64_t H = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim();
    embed_ = weights_.alloc<bf16_t>(c.vocab_size * H);
    lm_head_ = weights_.alloc<bf16_t>(c.vocab_size * H);
    final_norm_ = weights_.alloc<float>(H);
    layers_.resize(size_t(c.num_hidden_layers));
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      auto& D = layers_[size_t(l)];
      D.is_moe = c.is_moe_layer(l);
      D.qkv = weights_.alloc<bf16_t>((qd + 2 * kvd) * H);
      D.o = weights_.alloc<bf16_t>(H * qd);
      D.input_norm = weights_.alloc<float>(H);
      D.post_norm = weights_.alloc<float>(H);
      D.q_norm = weights_.alloc<float>(c.head_dim);
      D.k_norm = weights_.alloc<float>(c.head_dim);
      const int64_t E = D.is_moe ? c.num_experts : 1, I = D.is_moe ? c.moe_intermediate_size : c.intermediate_size;
      if (D.is_moe) D.router = weights_.alloc<bf16_t>(E * H);
      D.gate_up = weights_.alloc<bf16_t>(E * 2 * I * H);
      D.down = weights_.alloc<bf16_t>(E * H * I);
    }
  }

  void reserve(int64_t T, int64_t logit_rows) {
    const auto& c = config_;
    if (T > ws_.tokens) {
      LS_CUDA_CHECK(cudaStreamSynchronize(stream_));
      drop_graphs();
      act_arena_.clear();
      step_arena_.release_if_idle();
      ws_.logit_rows = 0;
      const int64_t H = c.hidden_size, D = c.head_dim, nq = c.num_attention_heads, nkv = c.num_key_value_heads;
      const int64_t k = c.num_experts_per_tok, E = std::max<int64_t>(c.num_experts, 1);
      const int64_t rows = std::max(T * k, T);  // expert rows, or the dense MLP's rows
      const int64_t I = std::max(c.moe_intermediate_size, c.intermediate_size);
      ws_.x = act_arena_.alloc<bf16_t>(T * H);
      ws_.h = act_arena_.alloc<bf16_t>(T * H);
      ws_.qkv = act_arena_.alloc<bf16_t>(T * (nq + 2 * nkv) * D);
      ws_.q = act_arena_.alloc<bf16_t>(T * nq * D);
      ws_.attn = act_arena_.alloc<bf16_t>(T * nq * D);
      ws_.router_logits = act_arena_.alloc<float>(T * E);
      ws_.ids = act_arena_.alloc<int32_t>(T * k);
      ws_.expert_weights = act_arena_.alloc<float>(T * k);
      ws_.counts = act_arena_.alloc<int32_t>(cuda::assign_workspace_ints(rows, E));
      ws_.group_rows = act_arena_.alloc<int32_t>(E + 1);
      ws_.gather = act_arena_.alloc<int32_t>(rows);
      ws_.scatter = act_arena_.alloc<int32_t>(rows);
      ws_.gu = act_arena_.alloc<bf16_t>(rows * 2 * I);
      ws_.act = act_arena_.alloc<bf16_t>(rows * I);
      ws_.y = act_arena_.alloc<bf16_t>(rows * H);
      ws_.split_floats = 8 * std::min<int64_t>(rows, 1024) * H;
      ws_.split = act_arena_.alloc<float>(ws_.split_floats);
      ws_.mid = ws_.x;
      ws_.h_mlp = ws_.h;
      ws_.tokens = T;
    }
    if (logit_rows > ws_.logit_rows) {
      logit_arena_.clear();
      step_arena_.release_if_idle();
      ws_.rows = logit_arena_.alloc<int32_t>(logit_rows);
      ws_.targets = logit_arena_.alloc<int32_t>(logit_rows);
      ws_.sampled_tokens = logit_arena_.alloc<int32_t>(logit_rows);
      ws_.logits = logit_arena_.alloc<float>(logit_rows * config_.vocab_size);
      ws_.row_logprobs = logit_arena_.alloc<float>(logit_rows);
      ws_.sampled_logprobs = logit_arena_.alloc<float>(logit_rows);
      ws_.sample_params = logit_arena_.alloc<cuda::DeviceSampleParams>(logit_rows);
      ws_.sample_ws = logit_arena_.alloc<float>(cuda::sample_workspace_floats(logit_rows));
      ws_.top_counts = logit_arena_.alloc<int32_t>(logit_rows);
      ws_.top_tokens = logit_arena_.alloc<int32_t>(logit_rows * cuda::kMaxTopN);
      ws_.top_values = logit_arena_.alloc<float>(logit_rows * cuda::kMaxTopN);
      ws_.logit_rows = logit_rows;
    }
  }

  // Checks the batch, uploads its metadata and returns the device slots.
  // The KV pool is the engine's (allocate_kv) or, for the trainer, its own of `num_pages`
  // pages of `page_size` positions.
  cuda::DeviceSlots upload_batch(const ForwardBatch& batch) {
    LS_CHECK(!kv_.empty(), "forward: allocate_kv must be called before the first forward");
    return upload_batch(batch, num_pages_, page_size_);
  }
  cuda::DeviceSlots upload_batch(const ForwardBatch& batch, int64_t num_pages, int64_t page_size) {
    const int64_t T = batch.size();
    LS_CHECK(batch.positions.size() == size_t(T) && batch.page_tables.size() == size_t(T),
             "forward batch: tokens, positions and page tables must have the same length");
    std::unordered_map<const int32_t*, int32_t> seq_index;
    std::vector<const int32_t*> tables;
    std::vector<int64_t> pages_used;
    std::vector<int32_t> seq_of(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) {
      LS_CHECK(batch.tokens[t] >= 0 && batch.tokens[t] < config_.vocab_size, "token id ", batch.tokens[t],
               " is out of range: the model's vocab_size is ", config_.vocab_size);
      LS_CHECK(batch.positions[t] >= 0 && batch.positions[t] < max_positions_, "position ", batch.positions[t],
               " is beyond max_position_embeddings (", max_positions_, ")");
      LS_CHECK(batch.page_tables[t] != nullptr, "forward batch: token ", t, " has no page table");
      auto [it, fresh] = seq_index.emplace(batch.page_tables[t], int32_t(tables.size()));
      if (fresh) {
        tables.push_back(batch.page_tables[t]);
        pages_used.push_back(0);
      }
      seq_of[size_t(t)] = it->second;
      pages_used[size_t(it->second)] =
          std::max<int64_t>(pages_used[size_t(it->second)], batch.positions[t] / page_size + 1);
    }
    const int64_t S = int64_t(tables.size());
    int64_t stride = 1;
    for (int64_t p : pages_used) stride = std::max(stride, p);
    // Layout: tokens | positions | seq_of_token | table stride | tile count | tiles (room for
    // T) | page tables. Every offset a kernel sees depends on T only (graph replay).
    const int64_t tiles_at = 3 * T + 2, tables_at = tiles_at + 2 * T;
    const int64_t total = tables_at + S * stride;
    int32_t* host = pinned_.reserve(size_t(total), stream_);
    std::copy(batch.tokens.begin(), batch.tokens.end(), host);
    std::copy(batch.positions.begin(), batch.positions.end(), host + T);
    std::copy(seq_of.begin(), seq_of.end(), host + 2 * T);
    host[3 * T] = int32_t(stride);
    // Attention tiles: runs of consecutive tokens of one sequence, cut every `per_tile` tokens.
    const int64_t per_tile = cuda::attention_tile_tokens(config_.num_attention_heads / config_.num_key_value_heads);
    int32_t n_tiles = 0;
    for (int64_t t = 0; t < T; ++t) {
      const bool extend =
          t > 0 && seq_of[size_t(t)] == seq_of[size_t(t - 1)] && host[tiles_at + 2 * (n_tiles - 1) + 1] < per_tile;
      if (extend) {
        ++host[tiles_at + 2 * (n_tiles - 1) + 1];
      } else {
        host[tiles_at + 2 * n_tiles] = int32_t(t);
        host[tiles_at + 2 * n_tiles + 1] = 1;
        ++n_tiles;
      }
    }
    host[3 * T + 1] = n_tiles;
    // Longest first: a tile walks the KV blocks up to its last position, and a block's rows do
    // not depend on which block runs them, so the tiles that walk the most start first and no
    // long one is left to run alone at the end.
    auto* tiles = reinterpret_cast<std::array<int32_t, 2>*>(host + tiles_at);
    const auto blocks = [&](const std::array<int32_t, 2>& tile) {
      return batch.positions[tile[0] + tile[1] - 1] / cuda::kAttentionKvBlock;
    };
    std::stable_sort(tiles, tiles + n_tiles, [&](const auto& a, const auto& b) { return blocks(a) > blocks(b); });
    int32_t* flat = host + tables_at;
    for (int64_t s = 0; s < S; ++s)
      for (int64_t p = 0; p < stride; ++p) {
        int32_t page = p < pages_used[size_t(s)] ? tables[size_t(s)][p] : 0;
        LS_CHECK(page >= 0 && page < num_pages, "page table entry ", page, " is outside the KV pool of ", num_pages,
                 " pages");
        flat[s * stride + p] = page;
      }
    if (total > ws_.meta_cap) {
      LS_CUDA_CHECK(cudaStreamSynchronize(stream_));
      drop_graphs();
      meta_arena_.clear();
      ws_.meta_cap = std::max<int64_t>(total, 2 * ws_.meta_cap);
      ws_.meta = meta_arena_.alloc<int32_t>(ws_.meta_cap);
    }
    LS_CUDA_CHECK(cudaMemcpyAsync(ws_.meta, host, size_t(total) * 4, cudaMemcpyHostToDevice, stream_));
    cuda::DeviceSlots slots;
    slots.positions = ws_.meta + T;
    slots.seq_of_token = ws_.meta + 2 * T;
    slots.table_stride = ws_.meta + 3 * T;
    slots.page_tables = ws_.meta + tables_at;
    slots.num_tiles = ws_.meta + 3 * T + 1;
    slots.tiles = ws_.meta + tiles_at;
    // Graph-sized steps launch T tile slots (an upper bound); larger ones the exact count.
    slots.max_tiles = T <= kGraphMaxTokens ? T : n_tiles;
    return slots;
  }

  // The forward up to the final norm; hidden states land in ws_.h.
  void forward(const ForwardBatch& batch, int64_t logit_rows) {
    const int64_t T = batch.size();
    reserve(std::max<int64_t>(T, 1), std::max<int64_t>(logit_rows, 1));
    cuda::DeviceSlots slots = upload_batch(batch);
    if (T == 0) return;
    // Small steps (decode) replay a CUDA graph of the whole forward: every size and pointer
    // in it depends on T only; the step's contents come through the metadata upload above.
    // A size is captured the second time it is seen, after an eager run set everything up.
    if (T > kGraphMaxTokens) return run_forward(T, slots);
    auto it = graphs_.find(T);
    if (it == graphs_.end()) {
      if (!seen_sizes_.insert(T).second) {
        cudaGraph_t graph = nullptr;
        cudaGraphExec_t exec = nullptr;
        LS_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
        try {
          run_forward(T, slots);
        } catch (...) {
          cudaStreamEndCapture(stream_, &graph);
          if (graph) cudaGraphDestroy(graph);
          throw;
        }
        LS_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
        LS_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
        cudaGraphDestroy(graph);
        it = graphs_.emplace(T, exec).first;
      } else {
        return run_forward(T, slots);
      }
    }
    LS_CUDA_CHECK(cudaGraphLaunch(it->second, stream_));
  }

  void drop_graphs() {
    for (auto& [t, exec] : graphs_) cudaGraphExecDestroy(exec);
    graphs_.clear();
    seen_sizes_.clear();
  }

  // Steps of one token run every layer in one launch (decode_layers.h) when the model allows
  // it; LOCKSTEP_ONE_LAUNCH_DECODE=0 takes the per-op kernels instead (the tests and the
  // benchmark compare the two paths: the same bits).
  bool one_launch_decode_applies() const {
    const char* env = std::getenv("LOCKSTEP_ONE_LAUNCH_DECODE");
    return !(env && std::strcmp(env, "0") == 0) && one_launch_decode_supported(config_);
  }
  void upload_decode_layers() {
    std::vector<cuda::DecodeLayerWeights> host(layers_.size());
    for (size_t l = 0; l < layers_.size(); ++l) {
      const DeviceLayer& L = layers_[l];
      host[l] = {L.qkv, L.o, L.router, L.gate_up, L.down, L.input_norm, L.post_norm, L.q_norm, L.k_norm, kv_[l]};
    }
    decode_arena_.clear();
    decode_layers_ = decode_arena_.alloc<cuda::DecodeLayerWeights>(int64_t(host.size()));
    upload(decode_layers_, host.data(), host.size() * sizeof(host[0]));
  }
  void run_decode_layers(const cuda::DeviceSlots& slots) {
    cuda::DecodeLayersArgs a;
    a.layers = decode_layers_;
    a.num_layers = int(layers_.size());
    a.shape = decode_shape_of(config_);
    a.normalize_topk = config_.norm_topk_prob;
    a.eps = float(config_.rms_norm_eps);
    a.scale = 1.0f / std::sqrt(float(config_.head_dim));
    a.rope_cos = rope_cos_;
    a.rope_sin = rope_sin_;
    a.slots = slots;
    a.x = ws_.x;
    a.x_mid = decode_x_mid_;
    a.qkv = ws_.qkv;
    a.q = ws_.q;
    a.attn = ws_.attn;
    a.gu = ws_.gu;
    a.y = ws_.y;
    a.router_logits = ws_.router_logits;
    a.barrier = decode_barrier_;
    cuda::decode_layers(a, stream_);
  }

  void run_forward(int64_t T, const cuda::DeviceSlots& slots) {
    const auto& c = config_;
    const int64_t H = c.hidden_size;
    const float eps = float(c.rms_norm_eps);
    cuda::embedding(ws_.meta, embed_, ws_.x, T, H, stream_);
    if (T == 1 && one_launch_decode_) {
      run_decode_layers(slots);
      cuda::rmsnorm(ws_.x, final_norm_, ws_.h, T, H, eps, stream_);
      return;
    }
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      LayerOps ops{*this, ws_, kv_[size_t(l)], slots, T};
      layer_forward(ops, layers_[size_t(l)]);
    }
    cuda::rmsnorm(ws_.x, final_norm_, ws_.h, T, H, eps, stream_);
  }

  // The CUDA op set of layer_forward.h on one rank: bf16 activations between kernels, the
  // contract's cast points in the kernels' epilogues; the norms, q/k-norm + RoPE + K/V store
  // and the residual adds fused where the op allows.
  struct LayerOps {
    using Layer = DeviceLayer;
    CudaRunner& r;
    Workspace& w;  // the step's buffers (ws_, or the trainer's, which keep mid and h_mlp)
    const cuda::DeviceKvLayer& kv;
    const cuda::DeviceSlots& slots;
    int64_t T;
    const ModelConfig& c = r.config_;
    int64_t H = c.hidden_size, D = c.head_dim, nq = c.num_attention_heads, nkv = c.num_key_value_heads;
    float eps = float(c.rms_norm_eps);

    void input_norm(const Layer& L) { cuda::rmsnorm(w.x, L.input_norm, w.h, T, H, eps, r.stream_); }
    void qkv(const Layer& L) { r.linear(w.h, L.qkv, w.qkv, T, (nq + 2 * nkv) * D, H); }
    void qk_norm_rope_kv_write(const Layer& L) {
      cuda::qk_norm_rope_store(w.qkv, L.q_norm, L.k_norm, r.rope_cos_, r.rope_sin_, w.q, kv, slots, T, nq, nkv, D, eps,
                               r.stream_);
    }
    void attention() {
      cuda::paged_attention(w.q, w.attn, kv, slots, T, nq, 1.0f / std::sqrt(float(D)), r.stream_, w.lse);
    }
    // mid = x + o_proj(attn); the MLP's residual then accumulates in x (a copy of mid when
    // mid has its own buffer).
    void o_proj_residual(const Layer& L) {
      r.row_linear_residual(w, w.attn, L.o, w.x, w.mid, T, H, nq * D);
      if (w.mid != w.x)
        LS_CUDA_CHECK(cudaMemcpyAsync(w.x, w.mid, size_t(T * H) * 2, cudaMemcpyDeviceToDevice, r.stream_));
    }
    void post_attention_norm(const Layer& L) { cuda::rmsnorm(w.mid, L.post_norm, w.h_mlp, T, H, eps, r.stream_); }
    void moe_residual(const Layer& L) { r.moe(w, L, T); }
    void dense_mlp_residual(const Layer& L) { r.dense_mlp(w, L, T); }
  };

  // The GEMM in[M, K] . W[N, K]^T with dense row-major operands; the caller sets the output.
  static GemmArgs dense_gemm(const bf16_t* in, const bf16_t* w, int64_t M, int64_t N, int64_t K) {
    return {.A = in, .lda = K, .W = w, .ldw = K, .M = M, .N = N, .K = K, .ldo = N};
  }

  // out[T, N] = bf16(in . W^T), column form.
  void linear(const bf16_t* in, const bf16_t* w, bf16_t* out, int64_t T, int64_t N, int64_t K) {
    GemmArgs g = dense_gemm(in, w, T, N, K);
    g.out_kind = GemmOut::bf16;
    g.out_bf16 = out;
    cuda::gemm(g, stream_);
  }

  // out = bf16(resid + bf16(in . W^T)), canonical row form over K (out may be resid).
  void row_linear_residual(Workspace& ws, const bf16_t* in, const bf16_t* w, const bf16_t* resid, bf16_t* out,
                           int64_t T, int64_t N, int64_t K) {
    GemmArgs g = dense_gemm(in, w, T, N, K);
    g.chunks = 8;
    g.split_workspace = ws.split;
    g.split_workspace_floats = ws.split_floats;
    g.out_kind = GemmOut::bf16_residual;
    g.out_bf16 = out;
    g.resid = resid;
    cuda::gemm(g, stream_);
  }

  // The experts' [gate | up] GEMM of `rows` rows (row r reads a[gather[r]]), grouped by
  // expert as group_rows says, into out [rows, 2I] bf16: the forward's, and the trainer's
  // recomputation of it.
  GemmArgs expert_gate_up_args(const DeviceLayer& L, const bf16_t* a, const int32_t* gather, const int32_t* group_rows,
                               int64_t rows, bf16_t* out) const {
    const int64_t H = config_.hidden_size, E = config_.num_experts, I = config_.moe_intermediate_size;
    return {.A = a,
            .lda = H,
            .a_gather = gather,
            .W = L.gate_up,
            .ldw = H,
            .w_group_stride = 2 * I * H,
            .M = rows,
            .N = 2 * I,
            .K = H,
            .group_rows = group_rows,
            .groups = int(E),
            .out_kind = GemmOut::bf16,
            .out_bf16 = out,
            .ldo = 2 * I,
            .rows_hint = std::max<int64_t>(1, rows / E)};
  }

  void moe(Workspace& ws, const DeviceLayer& L, int64_t T) {
    const auto& c = config_;
    const int64_t H = c.hidden_size, E = c.num_experts, k = c.num_experts_per_tok, I = c.moe_intermediate_size;
    GemmArgs r = dense_gemm(ws.h_mlp, L.router, T, E, H);  // router logits in fp32
    r.out_kind = GemmOut::f32;
    r.out_f32 = ws.router_logits;
    cuda::gemm(r, stream_);
    cuda::route_and_assign(ws.router_logits, ws.ids, ws.expert_weights, T, E, k, c.norm_topk_prob, ws.counts,
                           ws.group_rows, ws.gather, ws.scatter, stream_);
    const int64_t rows = T * k, hint = std::max<int64_t>(1, rows / E);
    GemmArgs gu = expert_gate_up_args(L, ws.h_mlp, ws.gather, ws.group_rows, rows, ws.gu);
    // Large steps: SwiGLU in the GEMM's epilogue, the activations straight out (notes v8).
    const bool fused_swiglu = !ws.keep_gate_up && cuda::gemm_takes_swiglu(gu);
    if (fused_swiglu) {
      gu.out_kind = GemmOut::bf16_swiglu;
      gu.out_bf16 = ws.act;
      gu.ldo = I;
    }
    // The gathered cp.async kernel runs at ~400 TFLOP/s, the TMA kernel on contiguous rows ~570
    // (notes/gpu-trainer.md, session 23); the same bits.
    if (ws.x_rows != nullptr && !fused_swiglu) {
      cuda::gather_rows(ws.h_mlp, ws.gather, ws.x_rows, rows, H, stream_);
      gu.A = ws.x_rows;
      gu.a_gather = nullptr;
    }
    cuda::gemm(gu, stream_);
    // The down projection, canonical row form over I, scattered to token * k + slot; at small
    // steps SwiGLU of the [gate | up] rows as the kernel loads them.
    GemmArgs dn{.A = ws.gu,
                .lda = 2 * I,
                .a_swiglu_up = I,
                .W = L.down,
                .ldw = I,
                .w_group_stride = H * I,
                .M = rows,
                .N = H,
                .K = I,
                .chunks = 8,
                .group_rows = ws.group_rows,
                .groups = int(E),
                .group_rows_settled = true,  // written by route_and_assign, which gate_up waited for
                .out_kind = GemmOut::bf16,
                .out_bf16 = ws.y,
                .ldo = H,
                .out_scatter = ws.scatter,
                .rows_hint = hint,
                .split_workspace = ws.split,
                .split_workspace_floats = ws.split_floats};
    // Unless gate_up wrote the activations or the down kernel applies SwiGLU as it loads A,
    // the SwiGLU kernel makes them.
    const bool swiglu_on_load = !fused_swiglu && !ws.keep_gate_up && cuda::gemm_small_step(dn);
    if (!fused_swiglu && !swiglu_on_load) cuda::swiglu(ws.gu, ws.act, rows, I, stream_);
    if (!swiglu_on_load) {
      dn.A = ws.act;
      dn.lda = I;
      dn.a_swiglu_up = 0;
    }
    cuda::gemm(dn, stream_);
    cuda::combine_experts_residual(ws.ids, ws.expert_weights, ws.y, ws.x, T, H, k, stream_);
  }

  void dense_mlp(Workspace& ws, const DeviceLayer& L, int64_t T) {
    const int64_t H = config_.hidden_size, I = config_.intermediate_size;
    linear(ws.h_mlp, L.gate_up, ws.gu, T, 2 * I, H);
    cuda::swiglu(ws.gu, ws.act, T, I, stream_);
    row_linear_residual(ws, ws.act, L.down, ws.mid, ws.x, T, H, I);
  }

  // fp32 logits [n, V] of the final hidden rows listed in `rows` (device).
  void compute_logits(const int32_t* rows, int64_t n) { compute_logits(ws_.h, rows, n, ws_.logits); }
  void compute_logits(const bf16_t* hidden, const int32_t* rows, int64_t n, float* out) {
    GemmArgs g = dense_gemm(hidden, lm_head_, n, config_.vocab_size, config_.hidden_size);
    g.a_gather = rows;
    g.out_kind = GemmOut::f32;
    g.out_f32 = out;
    cuda::gemm(g, stream_);
  }

  ModelConfig config_;
  cudaStream_t stream_ = nullptr;
  int64_t max_positions_ = 0;
  DeviceArena const_, weights_, kv_arena_, act_arena_, logit_arena_, meta_arena_;
  // The trainer's step buffers (CudaTrainer), kept between its steps; released when the
  // engine's own buffers grow.
  StepArena step_arena_;
  float *rope_cos_ = nullptr, *rope_sin_ = nullptr;
  bf16_t *embed_ = nullptr, *lm_head_ = nullptr;
  float* final_norm_ = nullptr;
  std::vector<DeviceLayer> layers_;
  std::vector<cuda::DeviceKvLayer> kv_;
  int64_t num_pages_ = 0, page_size_ = 0;
  Workspace ws_;
  PinnedInts pinned_;
  PinnedInts train_pinned_;  // the trainer's: kept layers' routing and expert rows (CudaTrainer)
  std::map<int64_t, cudaGraphExec_t> graphs_;
  std::set<int64_t> seen_sizes_;
  bool one_launch_decode_ = false;
  DeviceArena decode_arena_;
  cuda::DecodeLayerWeights* decode_layers_ = nullptr;
  bf16_t* decode_x_mid_ = nullptr;
  uint32_t* decode_barrier_ = nullptr;
};

}  // namespace lockstep::cuda_model
