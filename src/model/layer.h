// The Qwen3-MoE decoder layer, forward and backward, written once over a backend's op set:
// the CPU model (model/qwen3_moe.cpp and train/layer_backward.cpp, over a parallel context)
// and the CUDA runner (model/cuda) run these sequences, so a step of the layer cannot be
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
//
// A backward op set is bound to one layer's backward step: its d(layer output) dx, the
// forward's intermediates of the layer (recomputed from the layer input) and the layer's
// gradient buffers. Each member is the backward of the forward op of the same name, run in
// reverse order; weight gradients reduce over the step's canonical token chunks
// (docs/numerics.md, rules 8-10) and the cast points are straight-through:
//   moe_residual_backward(L)        dh = d(MLP input) from dx; router and expert grads
//   dense_mlp_residual_backward(L)  dh from dx; gate/up/down grads
//   post_attention_norm_backward(L) dx += the norm's backward of dh (dx is now d(mid))
//   o_proj_residual_backward(L)     d(attention output); o_proj grad
//   attention_backward()            dq, dk, dv after RoPE, K/V read from the cache
//   qk_norm_rope_backward(L)        d(q, k projections); q_norm/k_norm grads
//   qkv_backward(L)                 q/k/v grads; d(input norm output)
//   input_norm_backward(L)          dx += the input norm's backward (dx is now d(layer input))
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

template <class BackwardOps>
void layer_backward(BackwardOps& ops, const typename BackwardOps::Layer& L) {
  if (L.is_moe)
    ops.moe_residual_backward(L);
  else
    ops.dense_mlp_residual_backward(L);
  ops.post_attention_norm_backward(L);
  ops.o_proj_residual_backward(L);
  ops.attention_backward();
  ops.qk_norm_rope_backward(L);
  ops.qkv_backward(L);
  ops.input_norm_backward(L);
}

}  // namespace lockstep
