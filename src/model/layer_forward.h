// The Qwen3-MoE decoder layer, written once over a backend's op set: the CPU model
// (model/qwen3_moe.cpp, over a parallel context) and the CUDA runner
// (model/cuda/cuda_runner.cu) both run this sequence, so a step of the layer cannot be
// added, dropped or reordered on one backend alone.
//
// An op set is a struct bound to one layer's step (its residual stream x, its buffers and
// its batch) with these members, each one step of the layer with the contract's cast
// points inside it (docs/numerics.md, rule 5); a backend may fuse an op's parts into one
// kernel, never move work across ops:
//   Layer                       the backend's weights of one decoder layer (`is_moe`)
//   input_norm(L)               h = input_layernorm(x), entering the tensor-parallel region
//   qkv(L)                      q, k, v = h W^T, column-parallel by heads
//   qk_norm_rope_kv_write(L)    q_norm/k_norm, RoPE; K/V written to the paged cache
//   attention()                 attn = paged attention of q over the cache
//   o_proj_residual(L)          x += o_proj(attn), row-parallel, canonical over q_dim
//   post_attention_norm(L)      h = post_attention_layernorm(x)
//   moe_residual(L)             x += the MoE block of h (route, experts, combine)
//   dense_mlp_residual(L)       x += the dense SwiGLU MLP of h, row-parallel
#pragma once

namespace lockstep {

template <class Ops>
void layer_forward(Ops& ops, const typename Ops::Layer& L) {
  ops.input_norm(L);
  ops.qkv(L);
  ops.qk_norm_rope_kv_write(L);
  ops.attention();
  ops.o_proj_residual(L);
  ops.post_attention_norm(L);
  if (L.is_moe)
    ops.moe_residual(L);
  else
    ops.dense_mlp_residual(L);
}

}  // namespace lockstep
