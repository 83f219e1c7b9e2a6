// Backward of the row-wise and element-wise ops of elementwise.h. The bf16 cast points of the
// bfloat16 recipe are straight-through (identity) in the backward; gradients are fp32.
#pragma once
#include <cstdint>

#include "kernels/cpu/reduce_backward.h"

namespace lockstep::cpu {

// RMSNorm out = w * r(x * inv), inv = 1/sqrt(dot(x, x)/n + eps), r = bf16 rounding when
// round_normed (else identity). Given dout [rows, n]:
//   dx (overwritten) = inv * (w*dout) - x * inv^3 * dot(w*dout, x) / n    (per row, fixed dot)
//   dw (overwritten, when not null) = sum over rows of dout * r(x*inv): the token-chunk tree
//   with `chunks` in row units (token_chunks(T, rows_per_token)).
void rmsnorm_backward(const float* x, const float* w, const float* dout, float* dx, float* dw, int64_t rows,
                      int64_t n, float eps, bool round_normed, const TokenChunks& chunks);

// out = silu(gate) * up: dgate = dout * up * s * (1 + gate * (1 - s)), dup = dout * silu(gate)
// with s = sigmoid(gate). Overwrites dgate and dup.
void swiglu_backward(const float* gate, const float* up, const float* dout, float* dgate, float* dup, int64_t n);

// dtable [V, H] (overwritten) for out[t] = table[ids[t]]: each row is the token-chunk tree over
// the tokens with that id (chunks of canonical_chunk(T) positions, ascending tokens in a
// chunk); rows no token uses are zero. No scatter-add in thread order.
void embedding_backward(const int32_t* ids, const float* dout, float* dtable, int64_t T, int64_t V, int64_t H);
// The rows [row_begin, row_begin + rows) of the same dtable (a vocab-parallel slice), each
// with the bits embedding_backward gives it; ids outside the slice are skipped (ids must
// still be in [0, V)).
void embedding_backward_rows(const int32_t* ids, const float* dout, float* dtable_rows, int64_t T, int64_t V,
                             int64_t row_begin, int64_t rows, int64_t H);

}  // namespace lockstep::cpu
