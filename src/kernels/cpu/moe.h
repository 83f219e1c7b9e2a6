// Mixture-of-experts routing and expert compute (docs/numerics.md, rule 4).
#pragma once
#include <cstdint>
#include <vector>

namespace lockstep::cpu {

// For each token: softmax over the router logits in fp32, the top k by value (ties to the
// lower expert id), optionally renormalised to sum to 1. Outputs are [T, k], in selection
// order (descending probability).
void route_topk(const float* router_logits, int64_t T, int64_t E, int64_t k, bool normalize,
                int32_t* expert_ids, float* weights);

// Tokens routed to each expert, in ascending token order: per expert the token indices and
// the slot (0..k-1) of that expert in the token's selection.
struct ExpertAssignment {
  std::vector<std::vector<int32_t>> tokens;
  std::vector<std::vector<int32_t>> slots;
};
ExpertAssignment assign_tokens(const int32_t* expert_ids, int64_t T, int64_t k, int64_t E);

// assign_tokens as flat rows (the GPU trainer's MoE backward): the (token, slot) pairs grouped by
// expert, tokens ascending in each group (group e at rows [offsets[e], offsets[e + 1])), with
// each row's token and pair index t k + slot; and each token's rows in ascending expert id
// (order[t k + j]), the order in which its experts' input gradients are added.
struct ExpertRows {
  std::vector<int32_t> row_token, row_pair, offsets, order;
};
ExpertRows expert_rows(const int32_t* expert_ids, int64_t T, int64_t k, int64_t E);

// Where each of `rows`' rows sits in another placement of the same pairs, `placed_pair[p]`
// the pair at row p there (the GPU forward's expert assignment, whose order within an expert
// is its own): the GPU trainer gathers a kept layer's forward rows into the backward's order.
std::vector<int32_t> rows_in_placement(const ExpertRows& rows, const int32_t* placed_pair);

// One SwiGLU MLP over rows x[T, H]: gate/up [I, H] (column form), down [H, I] (canonical
// row form over I). Each row's result depends only on that row. With round_bf16, every
// intermediate is rounded to bf16 (the bfloat16 recipe).
void swiglu_mlp(const float* x, const float* gate_w, const float* up_w, const float* down_w, float* out, int64_t T,
                int64_t H, int64_t I, bool round_bf16);

// out[t] = sum over the token's k experts, in ascending expert id, of weight * expert_out
// (fp32). expert_out is [T, k, H] indexed by selection slot.
void combine_experts(const int32_t* expert_ids, const float* weights, const float* expert_out, float* out, int64_t T,
                     int64_t H, int64_t k);

// Full MoE block: route, run each expert on its tokens, combine per token in ascending
// expert id as an fp32 sum of weight * expert output. expert weights are per-expert pointers.
void moe_forward(const float* x, const float* router_w, const float* const* gate_w, const float* const* up_w,
                 const float* const* down_w, float* out, int64_t T, int64_t H, int64_t I, int64_t E, int64_t k,
                 bool normalize, bool round_bf16, float* router_logits_out = nullptr);

}  // namespace lockstep::cpu
