// Canonical reductions over the token stream for the backward (docs/numerics.md, rule 9).
// Weight gradients sum over the tokens of a micro-batch: the packed stream of T tokens is cut
// into kTMax = 8 chunks of canonical_chunk(T) tokens (zero-padded); each chunk is summed in
// ascending token order in fp32 and the 8 partials are combined by the pairwise tree. A
// sequence-parallel rank holding a power-of-two run of chunks computes that run's subtree and
// the cross-rank step completes the tree, so every split gives the same bits.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/canonical.h"

namespace lockstep::cpu {

// Row offsets of the canonical chunks: chunk c holds rows [rows[c], rows[c + 1]).
struct TokenChunks {
  int64_t rows[kTMax + 1] = {};
};

// The chunks of a dense stream of T tokens, `rows_per_token` rows each (e.g. heads).
TokenChunks token_chunks(int64_t T, int64_t rows_per_token = 1);

// The chunks of a sorted subset of a stream of T tokens (an expert's tokens): row i belongs
// to the chunk of its token's position token_index[i] in the stream.
TokenChunks token_chunks_of(const int32_t* token_index, int64_t rows, int64_t T);

// out[i] = tree over the chunks [0, num_chunks) of (sum over the chunk's rows r, ascending, of
// a[r, i] * b[r, i]); `chunk_rows` has num_chunks + 1 offsets relative to a and b. With
// b == nullptr the products are a[r, i] alone. Parallel over i only.
void column_sum_chunked(const float* a, const float* b, float* out, int64_t n, const int64_t* chunk_rows,
                        int num_chunks);

}  // namespace lockstep::cpu
