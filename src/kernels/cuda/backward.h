// The backward kernels of the GPU trainer, fp32 gradients (docs/numerics.md, rules 8-11).
//
// Each kernel is the GPU form of its CPU reference in src/kernels/cpu/*_backward.h, with the
// same reduction procedure per output element (the linears with a bf16 operand excepted: they
// run on tensor cores, outer_sum_chunked_tc, with the CUDA-core form as their reference): weight gradients are the
// canonical token-chunk tree (each chunk summed in ascending rows from 0, the chunk partials combined by the pairwise
// tree), input gradients of a linear are canonical over N, and every row-wise sum is the CPU's
// dot procedure (8 lanes by index mod 8, ascending, tree8). nvcc runs without contraction
// (--fmad=false), so where an op has no transcendental function (the linears, RMSNorm, RoPE,
// the embedding, the column sums) the GPU gives the CPU's bits exactly; where it has one
// (exp, log: SwiGLU, the softmaxes, attention) it differs from the CPU by the functions' last
// bits and is still one fixed function of its inputs. No atomics, no split chosen by size: a
// launch shape changes which thread computes an element, never how.
//
// Inputs that the forward keeps in bf16 (activations, weights) are read as bf16 and widened
// exactly on load; gradients are fp32. All pointers are device pointers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cpu/reduce_backward.h"
#include "kernels/cuda/attention.h"  // AttentionKernel
#include "kernels/cuda/ops.h"

namespace lockstep::cuda {

// Offsets of up to 8 consecutive canonical chunks of a summed dimension: chunk c holds rows
// [rows[c], rows[c + 1]); `count` (a power of two <= 8) chunks, combined by the pairwise tree.
struct ChunkBounds {
  int64_t rows[9] = {};
  int count = 8;
};
// The CPU's chunks (cpu::token_chunks, token_chunks_of) as launch arguments.
ChunkBounds chunk_bounds(const cpu::TokenChunks& chunks);
// The 8 canonical chunks of T tokens, rows_per_token rows each (cpu::token_chunks).
ChunkBounds token_chunk_bounds(int64_t T, int64_t rows_per_token = 1);

// How outer_sum_chunked tiles its outputs (the tests check that every tile gives the same bits).
enum class OuterTile { k4x4, k1x1 };

// out[i, k] (overwritten) for i < I, k < K = tree over the chunks of (sum over the chunk's s,
// ascending, of g[i * g_row + s * g_col] * m[s * K + k]): cpu linear_backward's outer_sum_rows.
template <typename TG, typename TM>
void outer_sum_chunked(const TG* g, int64_t g_row, int64_t g_col, const TM* m, int64_t K, const ChunkBounds& bounds,
                       float* out, int64_t I, cudaStream_t s, OuterTile tile = OuterTile::k4x4);

// How outer_sum_chunked_tc tiles its outputs (rows x columns per block; the same bits).
enum class TcTile { k64x128, k128x64 };

// outer_sum_chunked for a bf16 m on tensor cores: each g value is split exactly into bf16
// hi + lo (16 significand bits, each product exact), each chunk summed in k16 steps of its rows
// from its first (mma of hi, then of lo), the partials folded by the pairwise tree. Not the
// CPU's bits (the tensor cores add in their own order); within 2^-16 of the fp32 sum's terms.
void outer_sum_chunked_tc(const float* g, int64_t g_row, int64_t g_col, const bf16_t* m, int64_t K,
                          const ChunkBounds& bounds, float* out, int64_t I, cudaStream_t s,
                          TcTile tile = TcTile::k64x128);
// The same bits with the chunks summed in parallel blocks, each partial stored in `workspace`
// (bounds.count * I * K floats) and folded by fold_chunk_partials: for few outputs over many
// rows (the router's weight gradient: 32 blocks of 1024-row chunks otherwise).
void outer_sum_chunk_parallel_tc(const float* g, int64_t g_row, int64_t g_col, const bf16_t* m, int64_t K,
                                 const ChunkBounds& bounds, float* out, int64_t I, float* workspace,
                                 int64_t workspace_floats, cudaStream_t s);
// out[j] = the pairwise tree of partials[c * n + j] over c < count (TreeFold's order).
void fold_chunk_partials(const float* partials, float* out, int64_t n, int count, cudaStream_t s);

// One product of a grouped outer sum (an expert's): out[i, k] for i < I, outer_sum_chunked_tc's
// sum over `bounds` of g[i * g_row + s * g_col] * m[s * K + k]; g fp32 (G = float) or split by
// split_hi_lo (G = bf16_t, SplitOuterSumGroup below).
template <typename G>
struct OuterSumGroupOf {
  const G* g = nullptr;
  const bf16_t* m = nullptr;
  float* out = nullptr;
  int64_t I = 0;
  ChunkBounds bounds;
};
using OuterSumGroup = OuterSumGroupOf<float>;
// outer_sum_chunked_tc of each of `count` groups (a device array; every group's I <= max_I and
// its bounds valid) in one launch, each group's bits those of its own call; the groups share
// g_row, g_col and K.
void outer_sum_grouped_tc(const OuterSumGroup* groups, int count, int64_t max_I, int64_t g_row, int64_t g_col,
                          int64_t K, cudaStream_t s, TcTile tile = TcTile::k64x128);

// g split in place for outer_sum_split_tc: each 32 bytes of 8 fp32 values become their 8 bf16
// hi = bf16(v), then their 8 lo = bf16(v - hi) (n a multiple of 8, x 16-byte aligned).
void split_hi_lo(float* x, int64_t n, cudaStream_t s);

// How outer_sum_split_tc tiles its outputs (every tile gives the same bits): 128 x 128 outputs a
// block, the chunk tree's pending subtrees in shared memory (short chunks: the experts'); or
// 128 x 256, the subtrees in a workspace slot of each block, one block an SM looping over the
// tiles (long chunks: a third less operand traffic a MMA), or 256 x 128 the same way;
// wgmma128x256 is the 128 x 256 tile on warpgroup MMAs (outer_sum_split_wgmma.cu, one problem a
// launch). automatic: wgmma 128 x 256 where a workspace is given and the chunks average 256
// rows or more.
// wgmma128x128: the experts' grouped wgmma tile on one problem (chunks in pairs, the pending
// tree on chip, no workspace). tma128x256, tma128x128: those two tiles warp-specialized, loaded
// by TMA (outer_sum_split_tma.cu); they take the bf16 operand (outer_sum_split_tma_applies) and
// hand anything else to the wgmma tile of their size. automatic takes the TMA tiles where they
// apply and it would take a large tile (a workspace, chunks of 256 rows or more): 128 x 256 for
// input gradients over chunks of 4096 rows or more, else 128 x 128.
enum class SplitTile { automatic, k128x128, k128x256, k256x128, wgmma128x256, wgmma128x128, tma128x256, tma128x128 };
// How the fp32 gradient g enters the MMAs: exact (split by split_hi_lo, each k16 step the MMA
// of hi then of lo: the products of the fp32 g), or rounded to bf16 (packed by pack_bf16_rows,
// one MMA a step: half the MMAs and half the operand bytes; the trainer's choice,
// docs/numerics.md, "bfloat16 recipe"). Every tile gives the same bits for each.
enum class GradientOperand { exact_hi_lo, bf16 };
// Floats of the workspace the 128 x 256 tile needs on the current device (one slot an SM).
int64_t outer_sum_split_workspace_floats();

// outer_sum_chunked_tc of a g that split_hi_lo has split (g_row and g_col count g's fp32
// elements): the same bits, with both operands copied to shared memory by cp.async; with
// GradientOperand::bf16, of g rounded to bf16, g packed by pack_bf16_rows (its rows of g_row or
// g_col values, whichever is not 1). It takes
// weight gradients (g_row 1; g_col and I multiples of 8) and input gradients (g_col 1; g_row and
// every chunk bound multiples of 8), K a multiple of 8 and 16-byte aligned operands. A
// workspace serves one launch at a time.
bool outer_sum_split_tc_supported(int64_t g_row, int64_t g_col, int64_t K, const ChunkBounds& bounds, int64_t I);
void outer_sum_split_tc(const bf16_t* g_split, int64_t g_row, int64_t g_col, const bf16_t* m, int64_t K,
                        const ChunkBounds& bounds, float* out, int64_t I, cudaStream_t s, float* workspace = nullptr,
                        SplitTile tile = SplitTile::automatic, GradientOperand operand = GradientOperand::exact_hi_lo);

// OuterSumGroup of a split (or packed) g; every group supported as outer_sum_split_tc_supported says.
using SplitOuterSumGroup = OuterSumGroupOf<bf16_t>;
// (tile automatic: the small one, the groups' chunks being unknown on the host; the wgmma tiles
// take no groups.)
void outer_sum_split_grouped_tc(const SplitOuterSumGroup* groups, int count, int64_t max_I, int64_t g_row,
                                int64_t g_col, int64_t K, cudaStream_t s, float* workspace = nullptr,
                                SplitTile tile = SplitTile::automatic,
                                GradientOperand operand = GradientOperand::exact_hi_lo);
// The buffers a grouped launch reads (one or two for each operand, unused ones null): every
// group's g starts at a whole row of one g span (rows of g_pitch fp32 elements), its m at a
// whole row of one m span (rows of K bf16). Rows: the span's rows a map may read (weight
// gradients: summed rows; input gradients: g's output rows); reads past them give zeros.
struct SplitSpans {
  const bf16_t* g[2] = {nullptr, nullptr};
  int64_t g_rows[2] = {0, 0};
  const bf16_t* m[2] = {nullptr, nullptr};
  int64_t m_rows[2] = {0, 0};
};
// outer_sum_split_grouped_tc on warpgroup MMAs, 128 x 128 outputs a block with the chunk tree's
// pending levels on chip (the experts' short chunks), the groups read from host memory: they
// travel as the kernel's parameters, kMaxWgmmaGroups a launch. Each group's bits are those of
// its own outer_sum_split_tc call.
// Given the buffers the groups lie in (spans), the TMA form of that tile runs where every group
// takes it (outer_sum_split_tma_applies). parts > 1: outputs summed over runs of the groups as
// in outer_sum_split_tma_grouped, which every group must then take.
constexpr int kMaxWgmmaGroups = 256;
void outer_sum_split_grouped_wgmma(const SplitOuterSumGroup* host_groups, int count, int64_t max_I, int64_t g_row,
                                   int64_t g_col, int64_t K, cudaStream_t s,
                                   GradientOperand operand = GradientOperand::exact_hi_lo,
                                   const SplitSpans* spans = nullptr, int parts = 1);

// dW [N, K] (overwritten) = token-chunk tree of dy[r, n] * x[r, k] (cpu::linear_weight_grad).
template <typename TX>
void linear_weight_grad(const float* dy, const TX* x, float* dW, int64_t N, int64_t K, const ChunkBounds& chunks,
                        cudaStream_t s);
// dx [T, K] (overwritten) = sum over n of dy[t, n] W[n, k], canonical over N: 8 chunks of
// canonical_chunk(N) (cpu::linear_input_grad).
template <typename TW>
void linear_input_grad(const float* dy, const TW* w, float* dx, int64_t T, int64_t N, int64_t K, cudaStream_t s);

// linear_weight_grad and linear_input_grad of a bf16 linear whose dy [T, N] nothing reads
// afterwards: dy is split (or packed) in place and both run as outer_sum_split_tc where its
// shapes allow (workspace: outer_sum_split_workspace_floats() floats, or null), else as the two
// calls. The same bits either way. GradientOperand::bf16: the gradients of dy rounded to bf16
// (round_to_bf16 then the two calls where the split kernels do not take the shapes).
void linear_grads_consuming_dy(float* dy, const bf16_t* x, const bf16_t* w, float* dW, float* dx, int64_t T, int64_t N,
                               int64_t K, const ChunkBounds& chunks, float* workspace, cudaStream_t s,
                               GradientOperand operand = GradientOperand::exact_hi_lo);
// Whether linear_grads_consuming_dy runs the split kernels at these shapes: then a dy packed
// already (GradientOperand::bf16) may go to linear_grads_of_packed_dy instead.
bool linear_grads_take_split(int64_t T, int64_t N, int64_t K, const ChunkBounds& chunks);
// linear_grads_consuming_dy with GradientOperand::bf16 of a dy [T, N] that pack_bf16_rows' layout
// holds already (where linear_grads_take_split).
void linear_grads_of_packed_dy(const bf16_t* dy_packed, const bf16_t* x, const bf16_t* w, float* dW, float* dx,
                               int64_t T, int64_t N, int64_t K, const ChunkBounds& chunks, float* workspace,
                               cudaStream_t s);
// x[i] = bf16(x[i]) (round to nearest even) in place: fp32 values with bf16's bits.
// pack_bf16_rows: each row of x [rows, cols] (cols a multiple of 8, x 16-byte aligned) becomes
// its bf16 values at the front of its own bytes: element (r, c) at bf16 index 2 cols r + c.
void round_to_bf16(float* x, int64_t n, cudaStream_t s);
void pack_bf16_rows(float* x, int64_t rows, int64_t cols, cudaStream_t s);
// g [rows, cols] made the split kernels' operand in place: split_hi_lo or pack_bf16_rows.
void to_gradient_operand(float* g, int64_t rows, int64_t cols, GradientOperand operand, cudaStream_t s);

// out[i] (overwritten) = tree over the chunks of (sum over the chunk's rows of a[r, i] * b[r, i])
// (cpu::column_sum_chunked; b == nullptr sums a alone).
void column_sum_chunked(const float* a, const float* b, float* out, int64_t n, const ChunkBounds& bounds,
                        cudaStream_t s);

// 1 / rms of each row of x [rows, n] by the forward's own procedure, so the backward
// differentiates the values the forward made: kNormThreads-strided sums and the block sum of
// the hidden-state norms (threads = 256), or the lane-strided warp sum of q_norm/k_norm
// (threads = 32).
void inverse_rms_rows(const bf16_t* x, float* inv, int64_t rows, int64_t n, float eps, int threads, cudaStream_t s);

// cpu::rmsnorm_backward given the forward's inv per row: dx overwritten; dw (when not null)
// the token-chunk tree of dout * r(x * inv) with `chunks` in rows, its chunk partials in
// dw_partials (chunks.count * n floats). The backward's own sum dot(w * dout, x) is the CPU's
// dot procedure. add_to_dx: dx += the gradient (add_inplace's addition, without its pass over
// a scratch copy), for a residual stream's gradient.
void rmsnorm_backward(const bf16_t* x, const float* inv, const float* w, const float* dout, float* dx, float* dw,
                      float* dw_partials, int64_t rows, int64_t n, bool round_normed, const ChunkBounds& chunks,
                      cudaStream_t s, bool add_to_dx = false);

// rmsnorm_backward's weight gradient alone, x's row r at (r / x_heads) x_pitch + (r % x_heads) n
// (heads read in place from the qkv rows); the rows are chunks.rows[chunks.count].
void rmsnorm_weight_grad(const bf16_t* x, int64_t x_heads, int64_t x_pitch, const float* inv, const float* dout,
                         float* dw, float* dw_partials, int64_t n, bool round_normed, const ChunkBounds& chunks,
                         cudaStream_t s);
// The weight gradient in blocks of 8 columns (4x the rows a tile) where 32-column blocks would
// leave SMs idle (q_norm: 4 column blocks x 8 chunks). The same bits. On by default: the 8-layer
// step 1.5 ms faster on the H100 (notes/gpu-trainer.md, session 23).
void set_rmsnorm_narrow_dw_blocks(bool on);
bool rmsnorm_narrow_dw_blocks();

// The backward of qk_norm_rope_store for the q (or k) heads in one pass: rope_backward on dq
// [T, heads, head_dim] in place, inverse_rms_rows (threads 32) of the projection (row t of
// `proj` at t proj_pitch, the heads contiguous) into inv [T * heads], and rmsnorm_backward's
// dx into d_proj; the bits of those three calls. The weight gradient is rmsnorm_weight_grad's.
bool qk_norm_rope_backward_supported(int64_t head_dim);
void qk_norm_rope_backward(float* dq, const bf16_t* proj, int64_t proj_pitch, const int32_t* positions,
                           const float* rope_cos, const float* rope_sin, const float* w, float* inv, float* d_proj,
                           int64_t T, int64_t heads, int64_t head_dim, float eps, cudaStream_t s);

// How a kernel writes gradient rows that only the split outer sums read: fp32, or rounded to
// bf16 and packed (the bits of the fp32 rows then pack_bf16_rows, without the second pass).
enum class RowsOut { fp32, packed_bf16 };

// cpu::swiglu_backward for gate/up read from gu [R, 2I] (each row's gate, then up, as the
// forward's gate_up GEMM writes them): dgate, dup [R, I] overwritten.
template <typename TG>
void swiglu_backward(const TG* gu, const float* dout, float* dgate, float* dup, int64_t R, int64_t I, cudaStream_t s,
                     RowsOut rows_out = RowsOut::fp32);

// cpu::rope_backward in place on dx [T, heads, head_dim] with the runner's rotary table
// (cos/sin [max_positions, head_dim / 2]).
void rope_backward(float* dx, const int32_t* positions, const float* rope_cos, const float* rope_sin, int64_t T,
                   int64_t heads, int64_t head_dim, cudaStream_t s);

// cpu::embedding_backward over the tokens grouped by id: the host lists, for each id used
// (`used` ids, ascending), its tokens in ascending order (tokens_by_id, starts [used + 1]) and
// each one's canonical chunk is that of its position among the T tokens. Rows of dtable [V, H]
// that no token uses are zeroed.
void embedding_backward(const int32_t* used_ids, const int32_t* starts, const int32_t* tokens_by_id, int64_t used,
                        const float* dout, float* dtable, int64_t T, int64_t V, int64_t H, cudaStream_t s);

// x += y (fp32, n elements).
void add_inplace(float* x, const float* y, int64_t n, cudaStream_t s);

// cpu::paged_attention_backward over the bf16 cache and the forward's bf16 q and output:
// every sequence whole; seq_tokens lists each sequence's tokens by position, sequence s's at
// [seq_first[s], seq_first[s + 1]) (seq s as slots.seq_of_token numbers them). `lse_ws`,
// `delta_ws`: T * heads floats of scratch. dq [T, heads, D], dk, dv [T, kv_heads, D] overwritten.
void paged_attention_backward(const bf16_t* q, const bf16_t* out, const float* dout, const DeviceKvLayer& kv,
                              const DeviceSlots& slots, const int32_t* seq_first, const int32_t* seq_tokens, int64_t T,
                              int64_t heads, float scale, float* lse_ws, float* delta_ws, float* dq, float* dk,
                              float* dv, cudaStream_t s);

// The same gradients on tensor cores (attention_backward_tc.cu: flash-attention-2's
// recomputation, P, dS and dout rounded to bf16 as MMA operands; head_dim 16, 32, 64 or 128):
// one fixed procedure per element over its own sequence, not the CUDA-core kernels' bits.
// num_seqs and max_seq_len (host) size the grid: sequences of seq_first, the longest's tokens.
// dout_ws: T * heads * head_dim bf16 (dout rounded once for the MMAs). `kernel`: mma.sync, or
// warpgroup MMA (attention_backward_wgmma.cu; head_dim 64 and 128, what automatic takes
// there): the same bits, the choice is for tests and measurements. lse_given: lse_ws holds the
// forward's log-sum-exp of each query row (flash_attention's lse) and is only read; else the
// first kernel computes it there in a pass of its own over the KV blocks.
bool attention_backward_tc_supported(int64_t head_dim);
// Room for the dS tiles of a backward (bf16): given one of at least attention_ds_elems, the
// warpgroup-MMA kernels with the forward's lse compute dk and dv first, keep dS there, and
// make dq from it (one MMA a block instead of three, the same bits); else dq recomputes them.
struct AttentionDsScratch {
  bf16_t* tiles = nullptr;
  int64_t elems = 0;
};
// The elements the dS tiles of num_seqs sequences of at most max_seq_len tokens take: a
// 64 x 64 tile for each query tile and key tile at or before it, of each sequence and head.
int64_t attention_ds_elems(int64_t num_seqs, int64_t max_seq_len, int64_t heads);
// The warpgroup-MMA dk/dv kernel with its softmax overlapping its MMAs (P made while dP's
// MMAs run, dS while dv's run; each accumulator's k16 steps in the same order): the same bits.
void set_attention_dkv_overlap(bool on);
bool attention_dkv_overlap();
void paged_attention_backward_tc(const bf16_t* q, const bf16_t* out, const float* dout, const DeviceKvLayer& kv,
                                 const DeviceSlots& slots, const int32_t* seq_first, const int32_t* seq_tokens,
                                 int64_t T, int64_t heads, int64_t num_seqs, int64_t max_seq_len, float scale,
                                 float* lse_ws, float* delta_ws, bf16_t* dout_ws, float* dq, float* dk, float* dv,
                                 cudaStream_t s, AttentionKernel kernel = AttentionKernel::automatic,
                                 bool lse_given = false, AttentionDsScratch ds = {});

// cpu::route_topk_backward with the probabilities recomputed as the GPU router computes them.
void route_topk_backward(const float* router_logits, const int32_t* expert_ids, const float* weights,
                         const float* dweights, float* dlogits, int64_t T, int64_t E, int64_t k, bool normalize,
                         cudaStream_t s);

// The MoE block's backward around the experts' GEMMs (cpu::moe_backward's steps). The
// (token, slot) pairs are taken as rows grouped by expert, tokens ascending within a group
// (the host sorts them: the experts' weight-gradient trees need that order); row r is token
// row_token[r], slot pair row_pair[r] = token * k + slot.
// dst[r] = src[index[r]] for rows of H bf16.
void gather_rows(const bf16_t* src, const int32_t* index, bf16_t* dst, int64_t rows, int64_t H, cudaStream_t s);
// Per row: dweights[pair] = dot(dout[token], y[pair]) (the expert output's weight gradient,
// the CPU's dot procedure) and dy_rows[r] = weights[pair] * dout[token]. With order
// (add_rows_in_order's, k rows a token) the rows run token by token, each token's dout read
// once: the same bits.
void expert_output_backward(const float* dout, const bf16_t* y, const float* weights, const int32_t* row_token,
                            const int32_t* row_pair, float* dweights, float* dy_rows, int64_t rows, int64_t H,
                            cudaStream_t s, RowsOut rows_out = RowsOut::fp32, const int32_t* order = nullptr,
                            int64_t k = 0);
// Whether the trainer runs expert_output_backward token by token (off until it has run on a
// GPU: notes/gpu-trainer.md, session 25). The same bits either way.
void set_expert_output_by_token(bool on);
bool expert_output_by_token();
// dh[t] += rows[order[t * k + j]] for j = 0..k-1 in that order (the token's experts in
// ascending id). With second_rows (else null), each row is rows[r] + second_rows[r] first: the
// experts' input gradient in its two parts (gate's and up's), added as add_inplace adds them.
void add_rows_in_order(float* dh, const float* rows, const float* second_rows, const int32_t* order, int64_t T,
                       int64_t k, int64_t H, cudaStream_t s);

// Per row: lse[r] = the canonical log-normaliser of logits[r] (log_softmax_gather's, same bits).
void log_normalizer_rows(const float* logits, float* lse, int64_t R, int64_t V, cudaStream_t s);
// out[r] = logits[r, targets[r]] - lse[r] (NaN where the target is < 0): log_softmax_gather's
// bits from log_normalizer_rows' lse, without a second pass over the rows.
void gather_log_probs(const float* logits, const float* lse, const int32_t* targets, float* out, int64_t R, int64_t V,
                      cudaStream_t s);
// cpu::log_softmax_gather_backward given the rows' lse; dentropy/entropy may be null.
void log_softmax_gather_backward(const float* logits, const float* lse, const int32_t* targets, const float* dlogp,
                                 const float* dentropy, const float* entropy, float* dlogits, int64_t R, int64_t V,
                                 cudaStream_t s);
// log_softmax_gather_backward's d logits rounded to bf16 and packed in place over the logits, in
// one pass (pack_bf16_rows' layout): the operand linear_grads_of_packed_dy takes. The same bits
// as the two calls; V a multiple of 8, logits 16-byte aligned.
void log_softmax_gather_backward_packed(float* logits, const float* lse, const int32_t* targets, const float* dlogp,
                                        const float* dentropy, const float* entropy, int64_t R, int64_t V,
                                        cudaStream_t s);
// cpu::softmax_entropy given the rows' lse.
void softmax_entropy(const float* logits, const float* lse, float* entropy, int64_t R, int64_t V, cudaStream_t s);

}  // namespace lockstep::cuda
