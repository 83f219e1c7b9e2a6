// The bucketed, resharding weight sync (parallel/weight_sync.h): trainer shards at layout A
// stream into an engine runner at layout B (ranks as threads); the engine's exported
// weights must equal the source bit for bit at every pair and bucket size, and the
// streamed trainer-side audit must equal `lockstep audit` of the full weights.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <mutex>

#include "checkpoint/audit.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "dist/thread_communicator.h"
#include "model/runner.h"
#include "model/weights_source.h"
#include "parallel/parallel_backward.h"
#include "parallel/parallel_runner.h"
#include "parallel/weight_sync.h"
#include "parallel_test_util.h"

namespace lockstep {
namespace {

struct Side {
  int tp = 1, pp = 1, ep = 1, etp = 1;
  bool sp = false;
  bool whole = false;  // a single-rank runner on every rank
  std::string name() const {
    if (whole) return "single";
    return "tp" + std::to_string(tp) + (sp ? "sp" : "") + "pp" + std::to_string(pp) + "ep" + std::to_string(ep) +
           "etp" + std::to_string(etp);
  }
};

struct SyncCase {
  int world;
  Side from, to;
};

ModelConfig fixture_config(bool tied) {
  ModelConfig c = ModelConfig::load(ptest::fixture_dir() + "/config.json");
  c.tie_word_embeddings = tied;
  return c;
}

ShardLayout layout_of(const ModelConfig& cfg, const Side& s, int world, int rank) {
  if (s.whole) return whole_model_layout(cfg, world, rank);
  Topology topo = Topology::from_world(world, s.tp, s.sp, s.pp, s.ep, s.etp);
  topo.validate(cfg, world);
  return ShardLayout::make(cfg, topo, pipeline_layer_split(cfg.num_hidden_layers, s.pp), rank);
}

struct SyncResult {
  ModelWeights exported;       // the engine's weights after the sync (world rank 0)
  WeightSyncStats stats;       // world rank 0's
  int64_t max_peak_bytes = 0;  // over ranks
};

// Streams `source` (full weights, sliced to layout A on each rank) into an engine runner at
// layout B that starts from other weights; returns what the engine then holds.
SyncResult run_sync(const ModelWeights& source, const ModelWeights& engine_start, Precision precision,
                    const SyncCase& c, const WeightSyncOptions& options) {
  set_num_threads(1);
  SyncResult result;
  std::mutex mu;
  dist::run_threads(c.world, [&](dist::Communicator& comm) {
    const ModelConfig& cfg = source.config;
    const ShardLayout a = layout_of(cfg, c.from, c.world, comm.rank());
    ModelWeights local = slice_local_weights(source, a);
    const auto named = local_named(local, a);
    std::unique_ptr<ModelRunner> runner;
    ShardLayout b;
    if (c.to.whole) {
      runner = make_cpu_runner(engine_start.clone(), precision);
      b = layout_of(cfg, c.to, c.world, comm.rank());
    } else {
      ResolvedTopology topo;
      topo.topo = layout_of(cfg, c.to, c.world, comm.rank()).topo;
      topo.layer_split = pipeline_layer_split(cfg.num_hidden_layers, c.to.pp);
      auto pr = make_parallel_runner(comm, topo, engine_start, precision);
      b = pr->layout();
      runner = std::move(pr);
    }
    WeightSyncStats stats = stream_weights(
        comm, cfg, a, named, b, [&](std::vector<WeightPiece>&& bucket) { runner->load_weight_bucket(bucket); },
        options);
    ModelWeights exported = runner->export_weights();
    std::lock_guard<std::mutex> lock(mu);
    result.max_peak_bytes = std::max(result.max_peak_bytes, stats.peak_bytes);
    if (comm.rank() == 0) {
      result.exported = std::move(exported);
      result.stats = std::move(stats);
    }
  });
  return result;
}

// The name of the first tensor whose bytes differ, or "" when all are equal.
std::string first_differing_tensor(const ModelWeights& want, const ModelWeights& got) {
  const auto a = want.named(), b = got.named();
  if (a.size() != b.size()) return "(tensor count)";
  for (const auto& [name, t] : a) {
    const Tensor& u = *b.at(name);
    if (u.shape() != t->shape() || std::memcmp(u.raw(), t->raw(), t->nbytes()) != 0) return name;
  }
  return "";
}

std::vector<SyncCase> cases() {
  Side single{.whole = true}, tp2{.tp = 2}, tp4{.tp = 4}, ep2{.ep = 2}, ep4{.ep = 4};
  Side tp2pp2ep2{.tp = 2, .pp = 2, .ep = 2}, tp2sp{.tp = 2, .sp = true}, ep2etp2{.ep = 2, .etp = 2};
  return {
      {2, tp2, single}, {8, tp2pp2ep2, ep4}, {2, ep2, tp2},
      {4, single, tp4}, {4, tp2sp, ep2etp2}, {4, ep4, Side{.pp = 2, .ep = 2}},
  };
}

TEST(WeightSync, ReshardsEveryPairAtEveryBucketSizeBitForBit) {
  for (bool tied : {false, true}) {
    const ModelConfig cfg = fixture_config(tied);
    for (Precision precision : {Precision::float32, Precision::bfloat16}) {
      const ModelWeights source = ModelWeights::random(cfg, 11, precision);
      const ModelWeights start = ModelWeights::random(cfg, 12, precision);
      ASSERT_NE(first_differing_tensor(source, start), "");
      // One row per bucket, smaller than most tensors (which split into row bands), one expert
      // matrix per bucket, the whole model in one bucket.
      for (int64_t bucket : {int64_t(1), int64_t(3000), int64_t(32 * 64 * 4), int64_t(1) << 30}) {
        for (const SyncCase& c : cases()) {
          // Keep it short: the extreme sizes on fewer combinations.
          const bool plain = !tied && precision == Precision::float32, both = tied && precision == Precision::bfloat16;
          if (bucket == 1 && !(plain && c.world == 2)) continue;
          if (bucket == 3000 && !(plain || both)) continue;
          if (bucket == 32 * 64 * 4 && !plain) continue;
          WeightSyncOptions o;
          o.bucket_bytes = bucket;
          o.audit = true;
          const std::string what = c.from.name() + " -> " + c.to.name() + " bucket " + std::to_string(bucket) +
                                   (tied ? " tied " : " ") + precision_name(precision);
          SyncResult r;
          try {
            r = run_sync(source, start, precision, c, o);
          } catch (const std::exception& e) {
            ADD_FAILURE() << what << ": " << e.what();
            continue;
          }
          EXPECT_EQ(first_differing_tensor(source, r.exported), "") << what;
          // The streamed audit is audit_checkpoint of the full weights, field for field.
          const CheckpointAudit full = audit_checkpoint(WeightsSource(source, "source"));
          ASSERT_EQ(r.stats.audit.size(), full.tensors.size()) << what;
          for (size_t i = 0; i < full.tensors.size(); ++i) {
            const TensorAudit &x = full.tensors[i], &y = r.stats.audit[i];
            EXPECT_TRUE(x.name == y.name && x.shape == y.shape && x.dtype == y.dtype && x.hash == y.hash &&
                        x.norm == y.norm)
                << what << ": " << x.name << " vs " << y.name;
          }
          EXPECT_EQ(r.stats.buckets, int64_t(plan_weight_buckets(cfg, bucket).size())) << what;
        }
      }
    }
  }
}

TEST(WeightSync, BucketsCoverEveryTensorOnceInGlobalNameOrderWithinTheLimit) {
  const ModelConfig cfg = fixture_config(false);
  const auto shapes = ModelWeights::expected_shapes(cfg);
  int64_t largest = 0;
  for (const auto& [n, s] : shapes) largest = std::max<int64_t>(largest, shape_numel(s) * 4);
  for (int64_t bucket : {int64_t(1), int64_t(100), largest / 3, largest, int64_t(1) << 30}) {
    const auto buckets = plan_weight_buckets(cfg, bucket);
    std::vector<std::string> order;
    std::map<std::string, int64_t> next_row;
    for (const auto& b : buckets) {
      ASSERT_FALSE(b.empty());
      int64_t bytes = 0;
      for (const SyncBand& band : b) {
        const Shape& shape = shapes.at(band.name);
        ASSERT_EQ(band.box.size(), shape.size());
        for (size_t d = 1; d < shape.size(); ++d) EXPECT_EQ(band.box[d].size(), shape[d]);
        EXPECT_EQ(band.box[0].begin, next_row[band.name]) << band.name;  // rows in order, no gap or overlap
        next_row[band.name] = band.box[0].end;
        if (order.empty() || order.back() != band.name) order.push_back(band.name);
        bytes += shape_numel(box_shape(band.box)) * 4;
      }
      const int64_t one_row = shape_numel(box_shape(b[0].box)) / b[0].box[0].size() * 4;
      EXPECT_TRUE(bytes <= bucket || (b.size() == 1 && b[0].box[0].size() == 1 && one_row > bucket))
          << "bucket of " << bytes << " bytes over the limit " << bucket;
    }
    ASSERT_EQ(order.size(), shapes.size());
    for (size_t i = 1; i < order.size(); ++i) EXPECT_TRUE(global_name_less(order[i - 1], order[i]));
    for (const auto& [n, s] : shapes) EXPECT_EQ(next_row[n], s[0]) << n;
    if (bucket >= (int64_t(1) << 30)) {
      EXPECT_EQ(buckets.size(), 1u);
    }
    if (bucket == 1) {
      EXPECT_GT(buckets.size(), shapes.size());  // tensors split into rows
    }
  }
}

TEST(WeightSync, AnEngineThatMissesATensorIsNamedByTheAudit) {
  const ModelConfig cfg = fixture_config(false);
  const ModelWeights source = ModelWeights::random(cfg, 11, Precision::float32);
  WeightSyncOptions o;
  o.audit = true;
  o.bucket_bytes = 4096;
  const SyncResult r = run_sync(source, ModelWeights::random(cfg, 12, Precision::float32), Precision::float32,
                                {2, Side{.tp = 2}, Side{.ep = 2}}, o);
  ModelWeights engine = r.exported.clone();
  engine.layers[1].experts[3].up.data<float>()[5] += 1.0f;
  CheckpointAudit trainer;
  trainer.source = "trainer";
  trainer.tensors = r.stats.audit;
  EXPECT_FALSE(first_difference(trainer, audit_checkpoint(WeightsSource(r.exported, "engine"))));
  auto diff = first_difference(trainer, audit_checkpoint(WeightsSource(engine, "engine")));
  ASSERT_TRUE(diff);
  EXPECT_NE(diff->find("model.layers.1.mlp.experts.3.up_proj.weight"), std::string::npos) << *diff;
}

TEST(WeightSync, RefusesSourceTensorsThatAreNotTheLayoutsPieces) {
  const ModelConfig cfg = fixture_config(false);
  const ModelWeights full = ModelWeights::random(cfg, 3, Precision::float32);
  set_num_threads(1);
  EXPECT_THROW(dist::run_threads(2,
                                 [&](dist::Communicator& comm) {
                                   const ShardLayout a = layout_of(cfg, Side{.tp = 2}, 2, comm.rank());
                                   ModelWeights whole = full.clone();  // whole tensors, not TP2 slices
                                   const ShardLayout w = whole_model_layout(cfg, 2, comm.rank());
                                   stream_weights(comm, cfg, a, local_named(whole, w), w,
                                                  [](std::vector<WeightPiece>&&) {}, {});
                                 }),
               Error);
}

// Sync time and peak bytes per rank for the fixture model, trainer TP2+PP2+EP2 -> engine EP4
// on 8 ranks (threads), by bucket size (printed for the docs; the equality is the test).
TEST(WeightSync, MeasuresTimeAndPeakBytesPerBucketSize) {
  const ModelConfig cfg = fixture_config(false);
  const ModelWeights source = ModelWeights::random(cfg, 11, Precision::float32);
  const ModelWeights start = ModelWeights::random(cfg, 12, Precision::float32);
  int64_t model_bytes = 0;
  for (const auto& [n, s] : ModelWeights::expected_shapes(cfg)) model_bytes += shape_numel(s) * 4;
  for (int64_t bucket : {int64_t(4096), int64_t(65536), int64_t(1) << 20, int64_t(64) << 20}) {
    WeightSyncOptions o;
    o.bucket_bytes = bucket;
    const SyncResult r =
        run_sync(source, start, Precision::float32, {8, Side{.tp = 2, .pp = 2, .ep = 2}, Side{.ep = 4}}, o);
    EXPECT_EQ(first_differing_tensor(source, r.exported), "");
    // Per bucket a rank sends at most its contributions to each of the 8 ranks, and receives
    // and assembles (and, on rank 0, audits) at most one bucket each.
    EXPECT_LE(r.max_peak_bytes, (8 + 4) * bucket);
    if (bucket * 12 < model_bytes) {
      EXPECT_LT(r.max_peak_bytes, model_bytes);
    }
    std::printf("[ weight sync ] model %lld B, bucket %lld B: %lld buckets, %.4f s (rank 0), peak %lld B/rank\n",
                static_cast<long long>(model_bytes), static_cast<long long>(bucket),
                static_cast<long long>(r.stats.buckets), r.stats.seconds, static_cast<long long>(r.max_peak_bytes));
  }
}

}  // namespace
}  // namespace lockstep
