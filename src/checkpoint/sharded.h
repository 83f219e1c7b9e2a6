// Sharded checkpoints (docs/parallel.md): every tensor is stored as pieces, each a box
// (a [begin, end) range per dimension) of one global (Hugging Face) name, so any topology
// can read what any other wrote by copying the intersections of the boxes it needs.
//
// Layout of a sharded checkpoint directory:
//   config.json (and any other non-weight files of the source model, copied as is)
//   lockstep_sharded.json   the index: format, topology, layer split, and per global name
//                           its shape, dtype and pieces {file, box}
//   rank00000.safetensors   one file per rank of the writing topology; each piece is stored
//   rank00001.safetensors   under its global name, in the source dtype (bytes unchanged), and
//   ...                     __metadata__ repeats the topology, the rank and each piece's box
// A piece held by several ranks (replicated parameters) is written once, by the lowest rank.
//
// This file also gives one read interface over Hugging Face directories and sharded
// checkpoints (CheckpointSource), used by weight loading, `lockstep convert` and audit.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace lockstep {

struct Span {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
  bool operator==(const Span&) const = default;
};
using Box = std::vector<Span>;  // one span per dimension

Box full_box(const Shape& shape);
Shape box_shape(const Box& box);
std::string box_str(const Box& box);  // "[0:32, 0:64]"

// The box `box` of `t` (host, any dtype) as a new tensor of the same dtype.
Tensor slice_tensor(const Tensor& t, const Box& box);
// Copies the elements of src (holding `src_box` of some tensor) that fall inside `dst_box`
// into dst (holding `dst_box` of the same tensor). Same dtype. Returns the elements copied.
int64_t copy_intersection(const Tensor& src, const Box& src_box, Tensor& dst, const Box& dst_box);

// Read access to a checkpoint by global name, whatever its storage.
class CheckpointSource {
 public:
  virtual ~CheckpointSource() = default;
  virtual std::string describe() const = 0;  // its path and kind, for messages
  virtual std::vector<std::string> names() const = 0;  // sorted
  virtual bool contains(const std::string& name) const = 0;
  virtual Shape shape(const std::string& name) const = 0;
  virtual DType dtype(const std::string& name) const = 0;
  // The box of a tensor, in its stored dtype. Errors name the tensor and the box.
  virtual Tensor read(const std::string& name, const Box& box) const = 0;
  Tensor read_full(const std::string& name) const { return read(name, full_box(shape(name))); }
};

constexpr const char* kShardedIndexFile = "lockstep_sharded.json";
constexpr const char* kShardedFormat = "lockstep-sharded-v1";

bool is_sharded_checkpoint(const std::string& dir);
// A Hugging Face directory (model.safetensors or its index) or a sharded checkpoint.
// A sharded checkpoint is checked on open: every rank file's metadata must agree with the
// index (topology, rank, boxes, shapes, dtypes) and each tensor's pieces must tile it.
std::unique_ptr<CheckpointSource> open_checkpoint(const std::string& dir);

// What a sharded checkpoint says about how it was written.
struct ShardedInfo {
  std::string topology;               // e.g. "tp2_sp_pp2_ep2_etp1_dp1"
  std::vector<int64_t> layer_split;   // layers per pipeline stage
  int num_files = 0;
};
ShardedInfo read_sharded_info(const std::string& dir);

// One piece a rank holds: a global name and its box.
struct ShardPiece {
  std::string name;
  Box box;
};

// Writes `src` as a sharded checkpoint: per_rank[r] lists the pieces rank r holds. Pieces
// contained in another piece of the same name are dropped (written once); the rest must
// tile each tensor. Copies the non-weight files of `copy_files_from` (config.json, ...).
void write_sharded_checkpoint(const CheckpointSource& src, const std::string& out_dir,
                              const std::string& topology_name, const std::vector<int64_t>& layer_split,
                              const std::vector<std::vector<ShardPiece>>& per_rank,
                              const std::string& copy_files_from);
// Writes every tensor of `src` whole, in its stored dtype, to out_dir/model.safetensors,
// and copies the non-weight files of `copy_files_from`.
void write_hf_checkpoint(const CheckpointSource& src, const std::string& out_dir,
                         const std::string& copy_files_from);

}  // namespace lockstep
