// The bucketed, resharding weight sync (docs/parallel.md): the trainer's shards (layout A)
// stream to the rollout engine's shards (layout B, any topology over the same world, e.g. a
// whole model per rank) by global name, one bucket at a time, so no rank ever holds the
// whole model for a sync.
//
// The stream:
//   buckets  every global tensor in global-name order (checkpoint/audit.h), cut into row
//            bands of at most `bucket_bytes` fp32 bytes of the full tensors: a tensor that
//            does not fit the rest of a bucket starts a new one, and a tensor larger than a
//            bucket is split into bands of whole rows (dimension 0), each band a bucket of
//            its own (a band holds at least one row, so a bucket smaller than one row still
//            works, at one row per bucket).
//   senders  each (global name, box) piece of layout A is contributed once: by the lowest
//            rank that holds it, and not at all when another piece of the same tensor
//            contains it (a tied lm_head slice inside the embedding), like gather_full.
//   exchange one all_to_all_v per bucket: rank s sends rank d exactly the intersections of
//            its contributed pieces with the bucket's bands and with d's layout-B pieces.
//   loading  each rank assembles, per band, the parts of its layout-B pieces inside the band
//            (every element checked to arrive exactly once) and hands them to `load_bucket`
//            (e.g. rollout::Engine::load_weight_bucket).
// Memory per rank and bucket: what it sends (its contributions, once per rank that needs
// them), what it receives (at most one bucket: its layout-B pieces are disjoint), and the
// assembled pieces (the same amount); with `audit`, rank 0 also receives the bucket's full
// bands to fingerprint them (the trainer side of `--audit-weight-sync`).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/audit.h"
#include "dist/communicator.h"
#include "model/runner.h"
#include "parallel/shard_plan.h"

namespace lockstep {

struct WeightSyncOptions {
  int64_t bucket_bytes = int64_t(64) << 20;  // fp32 bytes of full tensors per bucket
  bool audit = false;                        // rank 0 fingerprints every full tensor as it passes
};

struct WeightSyncStats {
  int64_t buckets = 0;
  int64_t bytes_sent = 0, bytes_received = 0;  // this rank's payload over the whole sync
  int64_t peak_bytes = 0;  // this rank's largest buffers of one bucket (send + receive + assembled + audit)
  double seconds = 0;
  // World rank 0 with options.audit: hash/shape/dtype/norm of every full tensor, in
  // global-name order, computed exactly as audit_checkpoint does (streamed band by band).
  std::vector<TensorAudit> audit;
};

// One row band of a global tensor in a bucket: box = rows [begin, end) x every other dim.
struct SyncBand {
  std::string name;
  Box box;
};
// The buckets of a model (the same on every rank); bucket_bytes >= 1.
std::vector<std::vector<SyncBand>> plan_weight_buckets(const ModelConfig& cfg, int64_t bucket_bytes);

// The layout of a whole model on one rank of a world of `world_size` (a single-rank rollout
// engine run identically on every rank).
ShardLayout whole_model_layout(const ModelConfig& cfg, int world_size, int rank);

// Streams this rank's trainer shards (`source`: local_named(local, source_layout), in
// rank_pieces order) to the engine layout `dest_layout` of this rank, calling load_bucket
// once per bucket with this rank's pieces (possibly none). Every rank must call it with
// layouts of the same two topologies. Collective over world.
WeightSyncStats stream_weights(dist::Communicator& world, const ModelConfig& cfg, const ShardLayout& source_layout,
                               const std::vector<std::pair<std::string, Tensor*>>& source,
                               const ShardLayout& dest_layout,
                               const std::function<void(std::vector<WeightPiece>&&)>& load_bucket,
                               const WeightSyncOptions& options);

}  // namespace lockstep
