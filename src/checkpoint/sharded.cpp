#include "checkpoint/sharded.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "checkpoint/index_path.h"
#include "checkpoint/safetensors.h"
#include "core/error.h"
#include "core/json_parse.h"
#include "core/text_file.h"

namespace lockstep {

namespace fs = std::filesystem;
using nlohmann::json;

Box full_box(const Shape& shape) {
  Box b;
  for (int64_t d : shape) b.push_back({0, d});
  return b;
}

Shape box_shape(const Box& box) {
  Shape s;
  for (const Span& sp : box) s.push_back(sp.size());
  return s;
}

std::string box_str(const Box& box) {
  std::string s = "[";
  for (size_t i = 0; i < box.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(box[i].begin) + ":" + std::to_string(box[i].end);
  }
  return s + "]";
}

namespace {

json box_to_json(const Box& box) {
  json j = json::array();
  for (const Span& s : box) j.push_back({s.begin, s.end});
  return j;
}

Box box_from_json(const json& j, const std::string& where) {
  LS_CHECK(j.is_array(), where, ": box must be an array of [begin, end] pairs");
  Box b;
  for (const auto& p : j) {
    LS_CHECK(p.is_array() && p.size() == 2 && p[0].is_number_integer() && p[1].is_number_integer(), where,
             ": box entry must be [begin, end], got ", p.dump());
    b.push_back({p[0].get<int64_t>(), p[1].get<int64_t>()});
  }
  return b;
}

bool box_contains(const Box& outer, const Box& inner) {
  if (outer.size() != inner.size()) return false;
  for (size_t d = 0; d < outer.size(); ++d)
    if (inner[d].begin < outer[d].begin || inner[d].end > outer[d].end) return false;
  return true;
}

bool box_within(const Box& box, const Shape& shape) {
  if (box.size() != shape.size()) return false;
  for (size_t d = 0; d < box.size(); ++d)
    if (box[d].begin < 0 || box[d].begin > box[d].end || box[d].end > shape[d]) return false;
  return true;
}

int64_t box_volume(const Box& box) {
  int64_t v = 1;
  for (const Span& s : box) v *= std::max<int64_t>(0, s.size());
  return v;
}

// Copies every regular file of `from` except weights and indexes into `to`.
void copy_side_files(const std::string& from, const std::string& to) {
  for (const auto& e : fs::directory_iterator(from)) {
    if (!e.is_regular_file()) continue;
    const std::string name = e.path().filename().string();
    if (name.ends_with(".safetensors") || name == "model.safetensors.index.json" || name == kShardedIndexFile)
      continue;
    fs::copy_file(e.path(), fs::path(to) / name, fs::copy_options::overwrite_existing);
  }
}

std::string rank_file_name(int rank) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "rank%05d.safetensors", rank);
  return buf;
}

// ---- Hugging Face directory ----------------------------------------------------------------

class HfSource final : public CheckpointSource {
 public:
  explicit HfSource(const std::string& dir) : dir_(dir), reader_(SafetensorsReader::open(dir)) {}
  std::string describe() const override { return dir_ + " (Hugging Face safetensors)"; }
  std::vector<std::string> names() const override { return reader_.names(); }
  bool contains(const std::string& name) const override { return reader_.contains(name); }
  Shape shape(const std::string& name) const override { return reader_.get(name).shape(); }
  DType dtype(const std::string& name) const override { return reader_.get(name).dtype(); }
  Tensor read(const std::string& name, const Box& box) const override {
    const Tensor& t = reader_.get(name);
    LS_CHECK(box_within(box, t.shape()), dir_, ": tensor '", name, "' of shape ", shape_str(t.shape()),
             " has no box ", box_str(box));
    return slice_tensor(t, box);
  }

 private:
  std::string dir_;
  SafetensorsReader reader_;
};

// ---- sharded checkpoint --------------------------------------------------------------------

struct PieceRef {
  int file = 0;
  Box box;
};
struct ShardedTensor {
  Shape shape;
  DType dtype = DType::f32;
  std::vector<PieceRef> pieces;
};

class ShardedSource final : public CheckpointSource {
 public:
  explicit ShardedSource(const std::string& dir);
  std::string describe() const override { return dir_ + " (lockstep sharded, " + info_.topology + ")"; }
  std::vector<std::string> names() const override {
    std::vector<std::string> out;
    for (const auto& [n, t] : tensors_) out.push_back(n);
    return out;
  }
  bool contains(const std::string& name) const override { return tensors_.count(name) != 0; }
  Shape shape(const std::string& name) const override { return get(name).shape; }
  DType dtype(const std::string& name) const override { return get(name).dtype; }
  Tensor read(const std::string& name, const Box& box) const override {
    const ShardedTensor& t = get(name);
    LS_CHECK(box_within(box, t.shape), dir_, ": tensor '", name, "' of shape ", shape_str(t.shape),
             " has no box ", box_str(box));
    Tensor out = Tensor::zeros(box_shape(box), t.dtype);
    int64_t copied = 0;
    for (const PieceRef& p : t.pieces) copied += copy_intersection(files_[p.file].get(name), p.box, out, box);
    LS_CHECK(copied == box_volume(box), dir_, ": tensor '", name, "': its pieces cover ", copied, " of the ",
             box_volume(box), " elements of box ", box_str(box));
    return out;
  }
  const ShardedInfo& info() const { return info_; }

 private:
  const ShardedTensor& get(const std::string& name) const {
    auto it = tensors_.find(name);
    LS_CHECK(it != tensors_.end(), dir_, ": sharded checkpoint has no tensor '", name, "'");
    return it->second;
  }
  std::string dir_;
  ShardedInfo info_;
  std::vector<SafetensorsReader> files_;
  std::map<std::string, ShardedTensor> tensors_;
};

json read_index(const std::string& dir) {
  const fs::path path = fs::path(dir) / kShardedIndexFile;
  const json j = read_json_file(path.string());
  LS_CHECK(j.is_object() && j.value("format", "") == kShardedFormat, path.string(), ": expected \"format\": \"",
           kShardedFormat, "\"");
  for (const char* key : {"topology", "files", "tensors", "pipeline_layer_split"})
    LS_CHECK(j.contains(key), path.string(), ": missing field '", key, "'");
  return j;
}

ShardedInfo info_from_index(const json& j, const std::string& where) {
  ShardedInfo info;
  LS_CHECK(j["topology"].is_string(), where, ": 'topology' must be a string");
  info.topology = j["topology"].get<std::string>();
  for (const auto& v : j["pipeline_layer_split"]) {
    LS_CHECK(v.is_number_integer(), where, ": 'pipeline_layer_split' must hold integers");
    info.layer_split.push_back(v.get<int64_t>());
  }
  LS_CHECK(j["files"].is_array(), where, ": 'files' must be an array");
  info.num_files = int(j["files"].size());
  return info;
}

ShardedSource::ShardedSource(const std::string& dir) : dir_(dir) {
  const std::string where = (fs::path(dir) / kShardedIndexFile).string();
  json index = read_index(dir);
  info_ = info_from_index(index, where);
  std::vector<std::string> file_names;
  for (const auto& f : index["files"]) {
    LS_CHECK(f.is_string(), where, ": 'files' must hold file names");
    file_names.push_back(f.get<std::string>());
    const std::string file = file_in_checkpoint(dir, file_names.back(), where + ": files");
    LS_CHECK(!fs::is_directory(file), where, ": files: '", file_names.back(), "' is a directory");
    files_.push_back(SafetensorsReader::open(file));
  }
  std::map<std::string, int> file_index;
  for (size_t i = 0; i < file_names.size(); ++i) file_index[file_names[i]] = int(i);

  // Every rank file must say it belongs to this topology and is the rank its name says.
  for (size_t i = 0; i < files_.size(); ++i) {
    const auto& md = files_[i].metadata();
    const std::string fwhere = (fs::path(dir) / file_names[i]).string();
    auto topo = md.find("lockstep.topology");
    LS_CHECK(topo != md.end(), fwhere, ": __metadata__ has no 'lockstep.topology' (not a lockstep shard)");
    LS_CHECK(topo->second == info_.topology, fwhere, ": written for topology ", topo->second, " but ",
             kShardedIndexFile, " says ", info_.topology, ": the directory mixes shards of two checkpoints");
  }

  LS_CHECK(index["tensors"].is_object(), where, ": 'tensors' must be an object");
  for (auto it = index["tensors"].begin(); it != index["tensors"].end(); ++it) {
    const std::string& name = it.key();
    const json& e = it.value();
    const std::string twhere = where + ": tensor '" + name + "'";
    LS_CHECK(e.contains("shape") && e.contains("dtype") && e.contains("pieces"), twhere,
             ": needs shape, dtype and pieces");
    ShardedTensor t;
    t.shape = e["shape"].get<Shape>();
    t.dtype = dtype_from_name(e["dtype"].get<std::string>(), twhere);
    int64_t covered = 0;
    for (const auto& p : e["pieces"]) {
      PieceRef ref;
      const std::string file = p.at("file").get<std::string>();
      auto f = file_index.find(file);
      LS_CHECK(f != file_index.end(), twhere, ": piece in '", file, "', which is not listed in 'files'");
      ref.file = f->second;
      ref.box = box_from_json(p.at("box"), twhere);
      LS_CHECK(box_within(ref.box, t.shape), twhere, ": piece box ", box_str(ref.box), " does not fit its shape ",
               shape_str(t.shape));
      const SafetensorsReader& r = files_[ref.file];
      LS_CHECK(r.contains(name), twhere, ": ", file, " does not hold it");
      const Tensor& stored = r.get(name);
      LS_CHECK(stored.shape() == box_shape(ref.box) && stored.dtype() == t.dtype, twhere, ": ", file, " holds ",
               dtype_name(stored.dtype()), shape_str(stored.shape()), " but the index says ", dtype_name(t.dtype),
               shape_str(box_shape(ref.box)), " (box ", box_str(ref.box), ")");
      auto md = r.metadata().find("lockstep.box." + name);
      LS_CHECK(md != r.metadata().end() && md->second == box_to_json(ref.box).dump(), twhere, ": ", file,
               " records box ", md == r.metadata().end() ? std::string("(none)") : md->second,
               " but the index says ", box_str(ref.box));
      covered += box_volume(ref.box);
      t.pieces.push_back(ref);
    }
    LS_CHECK(covered == shape_numel(t.shape), twhere, ": its pieces hold ", covered, " elements but the shape ",
             shape_str(t.shape), " has ", shape_numel(t.shape), " (pieces must tile the tensor)");
    tensors_[name] = std::move(t);
  }
}

}  // namespace

Tensor slice_tensor(const Tensor& t, const Box& box) {
  Tensor out = Tensor::zeros(box_shape(box), t.dtype());
  copy_intersection(t, full_box(t.shape()), out, box);
  return out;
}

int64_t copy_intersection(const Tensor& src, const Box& src_box, Tensor& dst, const Box& dst_box) {
  LS_CHECK(src.dtype() == dst.dtype(), "copy_intersection: dtypes differ");
  const size_t nd = src_box.size();
  LS_CHECK(dst_box.size() == nd && src.ndim() == int(nd) && dst.ndim() == int(nd),
           "copy_intersection: rank mismatch");
  Box in(nd);
  for (size_t d = 0; d < nd; ++d) {
    in[d].begin = std::max(src_box[d].begin, dst_box[d].begin);
    in[d].end = std::min(src_box[d].end, dst_box[d].end);
    if (in[d].end <= in[d].begin) return 0;
  }
  const size_t es = dtype_size(src.dtype());
  if (nd == 0) {
    std::memcpy(dst.raw(), src.raw(), es);
    return 1;
  }
  // Row-major strides of both tensors, in elements.
  std::vector<int64_t> ss(nd, 1), ds(nd, 1);
  for (size_t d = nd - 1; d > 0; --d) {
    ss[d - 1] = ss[d] * src_box[d].size();
    ds[d - 1] = ds[d] * dst_box[d].size();
  }
  const int64_t run = in[nd - 1].size();
  std::vector<int64_t> idx(nd);
  for (size_t d = 0; d < nd; ++d) idx[d] = in[d].begin;
  int64_t copied = 0;
  const auto* s = static_cast<const uint8_t*>(src.raw());
  auto* o = static_cast<uint8_t*>(dst.raw());
  while (true) {
    int64_t so = 0, doff = 0;
    for (size_t d = 0; d < nd; ++d) {
      so += (idx[d] - src_box[d].begin) * ss[d];
      doff += (idx[d] - dst_box[d].begin) * ds[d];
    }
    std::memcpy(o + doff * es, s + so * es, size_t(run) * es);
    copied += run;
    // Odometer over every dimension but the last.
    int d = int(nd) - 2;
    for (; d >= 0; --d) {
      if (++idx[d] < in[d].end) break;
      idx[d] = in[d].begin;
    }
    if (d < 0) break;
  }
  return copied;
}

bool is_sharded_checkpoint(const std::string& dir) { return fs::exists(fs::path(dir) / kShardedIndexFile); }

std::unique_ptr<CheckpointSource> open_checkpoint(const std::string& dir) {
  LS_CHECK(fs::is_directory(dir), dir, ": not a checkpoint directory");
  if (is_sharded_checkpoint(dir)) return std::make_unique<ShardedSource>(dir);
  return std::make_unique<HfSource>(dir);
}

ShardedInfo read_sharded_info(const std::string& dir) {
  return info_from_index(read_index(dir), (fs::path(dir) / kShardedIndexFile).string());
}

void write_sharded_checkpoint(const CheckpointSource& src, const std::string& out_dir,
                              const std::string& topology_name, const std::vector<int64_t>& layer_split,
                              const std::vector<std::vector<ShardPiece>>& per_rank,
                              const std::string& copy_files_from) {
  fs::create_directories(out_dir);
  // Keep a piece only if no other piece of that name (of any rank) contains it, and
  // identical pieces only at their lowest rank.
  std::map<std::string, std::vector<std::pair<int, Box>>> by_name;
  for (size_t r = 0; r < per_rank.size(); ++r)
    for (const ShardPiece& p : per_rank[r])
      if (box_volume(p.box) > 0) by_name[p.name].push_back({int(r), p.box});
  std::vector<std::map<std::string, Tensor>> files(per_rank.size());
  std::vector<std::map<std::string, std::string>> metadata(per_rank.size());
  json tensors = json::object();
  for (const auto& [name, pieces] : by_name) {
    LS_CHECK(src.contains(name), src.describe(), ": has no tensor '", name, "'");
    json entry = {{"shape", src.shape(name)}, {"dtype", dtype_name(src.dtype(name))}, {"pieces", json::array()}};
    for (size_t i = 0; i < pieces.size(); ++i) {
      const auto& [rank, box] = pieces[i];
      bool dropped = false;
      for (size_t j = 0; j < pieces.size() && !dropped; ++j) {
        if (i == j || !box_contains(pieces[j].second, box)) continue;
        dropped = !(pieces[j].second == box) || j < i;  // strictly inside, or an earlier duplicate
      }
      if (dropped) continue;
      files[rank][name] = src.read(name, box);
      metadata[rank]["lockstep.box." + name] = box_to_json(box).dump();
      entry["pieces"].push_back({{"file", rank_file_name(rank)}, {"box", box_to_json(box)}});
    }
    tensors[name] = entry;
  }
  json index = {{"format", kShardedFormat},
                {"topology", topology_name},
                {"pipeline_layer_split", layer_split},
                {"files", json::array()},
                {"tensors", tensors}};
  for (size_t r = 0; r < per_rank.size(); ++r) {
    metadata[r]["lockstep.topology"] = topology_name;
    metadata[r]["lockstep.rank"] = std::to_string(r);
    write_safetensors((fs::path(out_dir) / rank_file_name(int(r))).string(), files[r], metadata[r]);
    index["files"].push_back(rank_file_name(int(r)));
  }
  write_text_file((fs::path(out_dir) / kShardedIndexFile).string(), index.dump(1) + "\n");
  copy_side_files(copy_files_from, out_dir);
  // Read it back: the checks of open_checkpoint (tiling, metadata) hold for what we wrote.
  ShardedSource check(out_dir);
  for (const auto& [name, pieces] : by_name)
    LS_CHECK(check.contains(name), out_dir, ": tensor '", name, "' missing after writing");
}

void write_hf_checkpoint(const CheckpointSource& src, const std::string& out_dir,
                         const std::string& copy_files_from) {
  fs::create_directories(out_dir);
  std::map<std::string, Tensor> all;
  for (const std::string& name : src.names()) all[name] = src.read_full(name);
  write_safetensors((fs::path(out_dir) / "model.safetensors").string(), all);
  copy_side_files(copy_files_from, out_dir);
}

}  // namespace lockstep
