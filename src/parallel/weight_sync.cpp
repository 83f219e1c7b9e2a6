#include "parallel/weight_sync.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <optional>

#include "core/error.h"
#include "core/timer.h"

namespace lockstep {

namespace {

int64_t box_volume(const Box& b) {
  int64_t v = 1;
  for (const Span& s : b) v *= s.size();
  return v;
}

bool box_contains(const Box& outer, const Box& inner) {
  for (size_t d = 0; d < outer.size(); ++d)
    if (inner[d].begin < outer[d].begin || inner[d].end > outer[d].end) return false;
  return true;
}

std::optional<Box> box_intersection(const Box& a, const Box& b) {
  Box out(a.size());
  for (size_t d = 0; d < a.size(); ++d) {
    out[d] = {std::max(a[d].begin, b[d].begin), std::min(a[d].end, b[d].end)};
    if (out[d].end <= out[d].begin) return std::nullopt;
  }
  return out;
}

// A piece of one rank of a layout: its box and its index in that rank's rank_pieces list.
struct Holder {
  int rank = 0;
  Box box;
  size_t index = 0;
};
using PiecesByName = std::map<std::string, std::vector<Holder>>;

// Every rank's pieces of `topo`, by global name, keeping a piece only when no other kept
// piece makes it redundant: one that contains it (when `across_ranks` or on the same rank),
// or an equal one held earlier (lower rank, or earlier on the same rank).
PiecesByName distinct_pieces(const ModelConfig& cfg, const Topology& topo, const std::vector<int64_t>& split,
                             int world_size, bool across_ranks) {
  PiecesByName all;
  for (int r = 0; r < world_size; ++r) {
    const auto pieces = rank_pieces(cfg, ShardLayout::make(cfg, topo, split, r));
    for (size_t i = 0; i < pieces.size(); ++i) all[pieces[i].name].push_back({r, pieces[i].box, i});
  }
  PiecesByName kept;
  for (auto& [name, list] : all) {
    auto earlier = [](const Holder& q, const Holder& p) {
      return q.rank < p.rank || (q.rank == p.rank && q.index < p.index);
    };
    for (const Holder& p : list) {
      bool redundant = false;
      for (const Holder& q : list) {
        if (&q == &p || (!across_ranks && q.rank != p.rank) || !box_contains(q.box, p.box)) continue;
        if (q.box != p.box || earlier(q, p)) redundant = true;
      }
      if (!redundant) kept[name].push_back(p);
    }
  }
  return kept;
}

// One message part of a bucket: the box `box` of band `band`'s tensor, from the source
// piece `src_index` of rank src to rank dst (into its pieces, or into rank 0's audit band).
struct Segment {
  int src = 0, dst = 0;
  size_t band = 0;
  Box box;
  size_t src_index = 0;
  bool audit = false;
};

// The trainer side of the audit, accumulated band by band in element order (exactly what
// audit_checkpoint computes on the whole tensor).
struct StreamingAudit {
  TensorAudit current;
  double sum_sq = 0;
  void add(const SyncBand& band, const Shape& shape, const Tensor& values, std::vector<TensorAudit>& out) {
    if (band.box[0].begin == 0) {
      current = TensorAudit{band.name, shape, DType::f32, 0xcbf29ce484222325ull, 0.0};
      sum_sq = 0;
    }
    LS_CHECK(current.name == band.name, "weight sync audit: band of '", band.name, "' arrived inside '", current.name,
             "'");
    current.hash = fnv1a64(values.raw(), values.nbytes(), current.hash);
    const float* v = values.data<float>();
    for (int64_t i = 0; i < values.numel(); ++i) sum_sq += double(v[i]) * double(v[i]);
    if (band.box[0].end == shape[0]) {
      current.norm = std::sqrt(sum_sq);
      out.push_back(current);
    }
  }
};

}  // namespace

std::vector<std::vector<SyncBand>> plan_weight_buckets(const ModelConfig& cfg, int64_t bucket_bytes) {
  LS_CHECK(bucket_bytes >= 1, "weight sync: the bucket size must be at least one byte, got ", bucket_bytes);
  std::vector<std::pair<std::string, Shape>> tensors;
  for (auto& [name, shape] : ModelWeights::expected_shapes(cfg)) tensors.emplace_back(name, shape);
  std::sort(tensors.begin(), tensors.end(),
            [](const auto& a, const auto& b) { return global_name_less(a.first, b.first); });
  std::vector<std::vector<SyncBand>> buckets;
  std::vector<SyncBand> current;
  int64_t used = 0;
  auto close = [&] {
    if (!current.empty()) buckets.push_back(std::move(current));
    current.clear();
    used = 0;
  };
  auto band = [](const std::string& name, const Shape& shape, int64_t begin, int64_t end) {
    Box box = full_box(shape);
    box[0] = {begin, end};
    return SyncBand{name, box};
  };
  for (const auto& [name, shape] : tensors) {
    const int64_t rows = shape.at(0);
    const int64_t row_bytes = int64_t(sizeof(float)) * (shape_numel(shape) / rows);
    const int64_t bytes = rows * row_bytes;
    if (used + bytes <= bucket_bytes) {
      current.push_back(band(name, shape, 0, rows));
      used += bytes;
      continue;
    }
    close();
    if (bytes <= bucket_bytes) {
      current.push_back(band(name, shape, 0, rows));
      used = bytes;
      continue;
    }
    // Larger than a bucket: bands of whole rows; the last band may share its bucket.
    const int64_t per = std::max<int64_t>(1, bucket_bytes / row_bytes);
    for (int64_t r = 0; r < rows; r += per) {
      close();
      const int64_t end = std::min(rows, r + per);
      current.push_back(band(name, shape, r, end));
      used = (end - r) * row_bytes;
    }
  }
  close();
  return buckets;
}

ShardLayout whole_model_layout(const ModelConfig& cfg, int world_size, int rank) {
  const Topology topo = Topology::from_world(world_size, 1, false, 1, 1, 1);
  return ShardLayout::make(cfg, topo, {cfg.num_hidden_layers}, rank);
}

WeightSyncStats stream_weights(dist::Communicator& world, const ModelConfig& cfg, const ShardLayout& source_layout,
                               const std::vector<std::pair<std::string, Tensor*>>& source,
                               const ShardLayout& dest_layout,
                               const std::function<void(std::vector<WeightPiece>&&)>& load_bucket,
                               const WeightSyncOptions& options) {
  Timer timer;
  const int W = world.size(), me = world.rank();
  LS_CHECK(source_layout.rank == me && dest_layout.rank == me, "weight sync: the layouts are of rank ",
           source_layout.rank, " and ", dest_layout.rank, ", not of this rank ", me);
  LS_CHECK(source_layout.topo.world_size() == W && dest_layout.topo.world_size() == W, "weight sync: topologies ",
           source_layout.topo.name(), " and ", dest_layout.topo.name(), " must both span the world of ", W, " ranks");
  const std::vector<ShardPiece> mine = rank_pieces(cfg, source_layout);
  LS_CHECK(source.size() == mine.size(), "weight sync: ", source.size(), " source tensors for ", mine.size(),
           " pieces of ", source_layout.topo.name());
  for (size_t i = 0; i < mine.size(); ++i)
    LS_CHECK(source[i].first == mine[i].name && source[i].second->shape() == box_shape(mine[i].box),
             "weight sync: source tensor ", i, " is '", source[i].first, "' ", shape_str(source[i].second->shape()),
             " but the layout's piece is '", mine[i].name, "' ", box_str(mine[i].box));

  const PiecesByName senders = distinct_pieces(cfg, source_layout.topo, source_layout.layer_split, W, true);
  const PiecesByName needs = distinct_pieces(cfg, dest_layout.topo, dest_layout.layer_split, W, false);
  const auto shapes = ModelWeights::expected_shapes(cfg);
  const bool audit_here = options.audit && me == 0;

  WeightSyncStats stats;
  StreamingAudit audit;
  for (const std::vector<SyncBand>& bucket : plan_weight_buckets(cfg, options.bucket_bytes)) {
    // Every part of the bucket, in the same order on every rank.
    std::vector<Segment> segments;
    for (size_t b = 0; b < bucket.size(); ++b) {
      const SyncBand& band = bucket[b];
      auto from = senders.find(band.name);
      auto to = needs.find(band.name);
      LS_CHECK(from != senders.end(), "weight sync: no rank of ", source_layout.topo.name(), " holds '", band.name,
               "'");
      for (const Holder& s : from->second) {
        const auto part = box_intersection(s.box, band.box);
        if (!part) continue;
        if (to != needs.end())
          for (const Holder& d : to->second)
            if (auto x = box_intersection(*part, d.box)) segments.push_back({s.rank, d.rank, b, *x, s.index, false});
        if (options.audit) segments.push_back({s.rank, 0, b, *part, s.index, true});
      }
    }
    // Send and receive buffers (floats), grouped by peer in segment order.
    std::vector<size_t> send_counts(W, 0), recv_counts(W, 0);
    for (const Segment& s : segments) {
      const size_t bytes = size_t(box_volume(s.box)) * sizeof(float);
      if (s.src == me) send_counts[s.dst] += bytes;
      if (s.dst == me) recv_counts[s.src] += bytes;
    }
    const std::vector<size_t> send_displs = dist::displacements(send_counts);
    const std::vector<size_t> recv_displs = dist::displacements(recv_counts);
    std::vector<float> send((send_displs.back() + send_counts.back()) / sizeof(float));
    std::vector<float> recv((recv_displs.back() + recv_counts.back()) / sizeof(float));
    std::vector<size_t> send_at(W), recv_at(W);
    for (int r = 0; r < W; ++r)
      send_at[r] = send_displs[r] / sizeof(float), recv_at[r] = recv_displs[r] / sizeof(float);
    for (const Segment& s : segments) {
      if (s.src != me) continue;
      Tensor window = Tensor::view(box_shape(s.box), DType::f32, send.data() + send_at[s.dst], nullptr);
      copy_intersection(*source[s.src_index].second, mine[s.src_index].box, window, s.box);
      send_at[s.dst] += size_t(box_volume(s.box));
    }
    world.all_to_all_v(send.data(), send_counts, send_displs, recv.data(), recv_counts, recv_displs);

    // This rank's pieces inside each band, and (rank 0, audit) the full bands.
    std::vector<WeightPiece> out;
    std::vector<std::vector<size_t>> out_of_band(bucket.size());
    std::vector<Tensor> full_bands(audit_here ? bucket.size() : 0);
    int64_t assembled_bytes = 0;
    for (size_t b = 0; b < bucket.size(); ++b) {
      const SyncBand& band = bucket[b];
      if (auto to = needs.find(band.name); to != needs.end())
        for (const Holder& d : to->second) {
          if (d.rank != me) continue;
          if (auto part = box_intersection(d.box, band.box)) {
            out_of_band[b].push_back(out.size());
            out.push_back({band.name, *part, Tensor::zeros(box_shape(*part), DType::f32)});
            assembled_bytes += int64_t(out.back().value.nbytes());
          }
        }
      if (audit_here) {
        full_bands[b] = Tensor::zeros(box_shape(band.box), DType::f32);
        assembled_bytes += int64_t(full_bands[b].nbytes());
      }
    }
    std::vector<int64_t> copied(out.size(), 0), audit_copied(full_bands.size(), 0);
    for (const Segment& s : segments) {
      if (s.dst != me) continue;
      const Tensor window = Tensor::view(box_shape(s.box), DType::f32, recv.data() + recv_at[s.src], nullptr);
      recv_at[s.src] += size_t(box_volume(s.box));
      if (s.audit) {
        audit_copied[s.band] += copy_intersection(window, s.box, full_bands[s.band], bucket[s.band].box);
        continue;
      }
      for (size_t o : out_of_band[s.band]) copied[o] += copy_intersection(window, s.box, out[o].value, out[o].box);
    }
    for (size_t o = 0; o < out.size(); ++o)
      LS_CHECK(copied[o] == box_volume(out[o].box), "weight sync: box ", box_str(out[o].box), " of '", out[o].name,
               "' received ", copied[o], " of its ", box_volume(out[o].box), " elements (layouts ",
               source_layout.topo.name(), " -> ", dest_layout.topo.name(), ")");
    for (size_t b = 0; b < full_bands.size(); ++b)
      LS_CHECK(audit_copied[b] == box_volume(bucket[b].box), "weight sync audit: band ", box_str(bucket[b].box),
               " of '", bucket[b].name, "' received ", audit_copied[b], " of its ", box_volume(bucket[b].box),
               " elements");

    const int64_t sent = int64_t(send.size() * sizeof(float)), received = int64_t(recv.size() * sizeof(float));
    stats.bytes_sent += sent;
    stats.bytes_received += received;
    stats.peak_bytes = std::max(stats.peak_bytes, sent + received + assembled_bytes);
    ++stats.buckets;
    send = {};
    recv = {};
    load_bucket(std::move(out));
    for (size_t b = 0; b < full_bands.size(); ++b)
      audit.add(bucket[b], shapes.at(bucket[b].name), full_bands[b], stats.audit);
  }
  stats.seconds = timer.seconds();
  return stats;
}

}  // namespace lockstep
