// Deterministic collectives (docs/numerics.md, rules 1, 7, 8): reductions that finish
// the canonical pairwise tree across ranks, so a value reduced over T ranks has the same
// bits as the single-rank tree8 over the 8 canonical chunk partials.
//
// Every rank holds the partial of its own power-of-two run of tree leaves (rank r of T
// owns leaves [r*L/T, (r+1)*L/T) and has already summed them with pairwise_tree); the
// collective sums the T rank partials by the pairwise tree over ranks in rank order:
//   T=2: p0+p1   T=4: (p0+p1)+(p2+p3)   T=8: ((p0+p1)+(p2+p3))+((p4+p5)+(p6+p7)).
// No collective uses the backend's own sum (MPI_SUM / ncclSum order is unspecified): they
// move partials with all_to_all_v / all_gather and add locally in tree order.
//
// Volume: the all-reduces are an all-to-all of slices (reduce-scatter) plus an all-gather,
// 2(T-1)/T x bytes per rank, the same as a ring all-reduce; small inputs take one
// all-gather instead (fewer steps, same bits).
//
// Buffers are host memory (communicators with device_buffers() are refused for now).
#pragma once
#include <cstddef>
#include <cstdint>

#include "dist/communicator.h"

namespace lockstep::dist {

// ---- tensor / sequence parallel (T = comm.size() must be 1, 2, 4 or 8) -------------------

// In place: partials_inout[i] (this rank's subtree partial) becomes the full tree over all
// ranks' partials, on every rank.
void canonical_all_reduce(Communicator& comm, float* partials_inout, int64_t n);

// Rows of a token dimension of n_rows owned by SP rank r of T: whole canonical chunks
// (chunk = ceil(n_rows / 8) rows; rank r owns chunks [r*8/T, (r+1)*8/T)), clamped to n_rows,
// so the last ranks may own fewer (or zero) rows when n_rows is not a multiple of 8.
struct RowRange {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
};
RowRange sp_row_range(int64_t n_rows, int tp_size, int tp_rank);

// The SP reduce-scatter (rule 7): `partials` is this rank's [n_rows, row_len] subtree
// partial of a row-parallel output; `out` receives sp_row_range(n_rows, T, rank) rows of
// the full tree sum ([range.size(), row_len]). Each rank receives the T partials of its
// rows by all-to-all and combines them in tree order: the same bits as
// canonical_all_reduce for those rows.
void canonical_reduce_scatter(Communicator& comm, const float* partials, int64_t n_rows,
                              int64_t row_len, float* out);

// The SP all-gather (leaving an SP region): `local` holds this rank's
// sp_row_range(n_rows, T, rank) rows of row_bytes bytes each; `out` receives all n_rows rows
// in order. Bytes only, so it moves activations of any dtype.
void sp_all_gather(Communicator& comm, const void* local, int64_t n_rows, size_t row_bytes,
                   void* out);
inline void sp_all_gather(Communicator& comm, const float* local, int64_t n_rows,
                          int64_t row_len, float* out) {
  sp_all_gather(comm, static_cast<const void*>(local), n_rows, row_len * sizeof(float),
                static_cast<void*>(out));
}

// Vocab-parallel log-softmax: each rank holds, per row, the (max, sum of exp(x - max)) of
// its vocab subtree; in place, every rank gets the tree combine over ranks using
// combine_maxsum (dist/maxsum.h), the same function and order as the single-rank kernel.
void canonical_all_reduce_maxsum(Communicator& comm, float* max_inout, float* sum_inout,
                                 int64_t n);

// ---- data parallel (T = comm.size() any power of two) -----------------------------------

// Gradient all-reduce over DP ranks (rule 8): rank r holds the pairwise-tree sum of its
// contiguous power-of-two run of canonical micro-batches; in place, every rank gets the
// pairwise tree over ranks in rank order, which completes the micro-batch tree.
void tree_all_reduce(Communicator& comm, float* partials_inout, int64_t n);

// The DP reduce-scatter form (for a sharded optimizer): rank r receives the tree sum of
// elements [flat_slice(n, T, r)) into out.
RowRange flat_slice(int64_t n, int size, int rank);  // ceil(n/T) per rank, clamped
void tree_reduce_scatter(Communicator& comm, const float* partials, int64_t n, float* out);

// ---- building block ---------------------------------------------------------------------

// In place over `count` (a power of two) blocks of `len` floats laid out block-major:
// block 0 becomes the pairwise tree of all blocks, element by element. Same order as
// pairwise_tree in kernels/canonical.h.
void pairwise_tree_blocks(float* blocks, int count, int64_t len);

}  // namespace lockstep::dist
