#include "checkpoint/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>

#include "checkpoint/index_path.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "core/finite.h"
#include "core/json_parse.h"

namespace lockstep {

namespace fs = std::filesystem;

namespace {

struct Mapping {
  void* data = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (data && size) munmap(data, size);
  }
};

std::shared_ptr<void> map_file(const std::string& path, size_t& size) {
  // O_NONBLOCK: opening a FIFO must not wait for a writer; only a regular file is mapped.
  int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  LS_CHECK(fd >= 0, path, ": cannot open (", std::strerror(errno), ")");
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, ": not a regular file (a safetensors file must be one)");
  }
  size = size_t(st.st_size);
  auto m = std::make_shared<Mapping>();
  if (size > 0) {
    void* p = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    ::close(fd);
    LS_CHECK(p != MAP_FAILED, path, ": mmap failed");
    m->data = p;
    m->size = size;
  } else {
    ::close(fd);
  }
  return std::shared_ptr<void>(m, m->data);
}

}  // namespace

SafetensorsReader SafetensorsReader::from_bytes(std::shared_ptr<void> bytes, size_t size, const std::string& where) {
  SafetensorsReader r;
  r.add_file(std::move(bytes), size, where);
  return r;
}

void SafetensorsReader::add_file(std::shared_ptr<void> bytes, size_t size, const std::string& where) {
  const auto* base = static_cast<const uint8_t*>(bytes.get());
  LS_CHECK(size >= 8, where, ": truncated safetensors file (", size, " bytes; expected at least the 8-byte header length)");
  uint64_t header_len = 0;
  std::memcpy(&header_len, base, 8);
  LS_CHECK(header_len <= size - 8, where, ": header length ", header_len, " runs past the end of the file (",
           size, " bytes)");
  const nlohmann::json header =
      parse_json(std::string_view(reinterpret_cast<const char*>(base + 8), header_len), where + ": safetensors header");
  LS_CHECK(header.is_object(), where, ": safetensors header must be a JSON object");
  const size_t data_start = 8 + header_len;
  const size_t data_size = size - data_start;
  struct Span {
    uint64_t begin, end;
    std::string name;
  };
  std::vector<Span> spans;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") {
      if (it->is_object())
        for (auto m = it->begin(); m != it->end(); ++m)
          if (m->is_string()) metadata_[m.key()] = m->get<std::string>();
      continue;
    }
    const auto& info = *it;
    std::string at = where + ": tensor '" + name + "'";
    LS_CHECK(info.is_object(), at, ": entry must be an object");
    LS_CHECK(info.contains("dtype") && info["dtype"].is_string(), at, ": missing string field 'dtype'");
    LS_CHECK(info.contains("shape") && info["shape"].is_array(), at, ": missing list field 'shape'");
    LS_CHECK(info.contains("data_offsets") && info["data_offsets"].is_array() && info["data_offsets"].size() == 2,
             at, ": 'data_offsets' must be a list of two integers");
    DType dtype = dtype_from_name(info["dtype"].get<std::string>(), at);
    Shape shape;
    uint64_t numel = 1;
    for (const auto& d : info["shape"]) {
      LS_CHECK(d.is_number_unsigned() || (d.is_number_integer() && d.get<int64_t>() >= 0), at,
               ": shape entries must be non-negative integers, got ", d.dump());
      uint64_t v = d.get<uint64_t>();
      LS_CHECK(v < (uint64_t(1) << 40) && (v == 0 || numel <= (uint64_t(1) << 48) / v), at, ": shape ",
               info["shape"].dump(), " is too large");
      numel *= v;
      shape.push_back(int64_t(v));
    }
    const auto& off = info["data_offsets"];
    LS_CHECK(off[0].is_number_unsigned() && off[1].is_number_unsigned(), at,
             ": data_offsets must be non-negative integers, got ", off.dump());
    uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    LS_CHECK(begin <= end, at, ": data_offsets ", off.dump(), " are reversed");
    LS_CHECK(end <= data_size, at, ": data_offsets ", off.dump(), " run past the end of the data (", data_size,
             " bytes)");
    uint64_t expected = numel * dtype_size(dtype);
    LS_CHECK(end - begin == expected, at, ": data_offsets span ", end - begin, " bytes but dtype ",
             dtype_name(dtype), " and shape ", shape_str(shape), " need ", expected);
    LS_CHECK(tensors_.count(name) == 0, at, ": appears in more than one file (also in ", files_[name], ")");
    spans.push_back({begin, end, name});
    const uint8_t* at_data = base + data_start + begin;
    tensors_[name] = Tensor::view(shape, dtype, const_cast<uint8_t*>(at_data), bytes);
    // A file whose data does not start at a multiple of the element size (allowed by the
    // format) is read through an aligned copy: typed access to it would be undefined.
    if (reinterpret_cast<uintptr_t>(at_data) % dtype_size(dtype) != 0) tensors_[name] = tensors_[name].clone();
    files_[name] = where;
  }
  // Every tensor that holds bytes must start at or after the end of every earlier one: an
  // empty tensor holds none, so it is skipped rather than compared (it could hide an overlap
  // of its neighbours).
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  const Span* last = nullptr;  // the latest span that holds bytes
  for (const Span& s : spans) {
    if (s.begin == s.end) continue;
    LS_CHECK(!last || s.begin >= last->end, where, ": tensors '", last ? last->name : "", "' and '", s.name,
             "' have overlapping data_offsets");
    last = &s;
  }
}

SafetensorsReader SafetensorsReader::open(const std::string& path_in) {
  fs::path path(path_in);
  if (fs::is_directory(path)) {
    if (fs::exists(path / "model.safetensors.index.json")) {
      path = path / "model.safetensors.index.json";
    } else {
      LS_CHECK(fs::exists(path / "model.safetensors"), path_in,
               ": no model.safetensors or model.safetensors.index.json in this directory");
      path = path / "model.safetensors";
    }
  }
  SafetensorsReader r;
  if (path.filename().string().ends_with(".index.json")) {
    const nlohmann::json index = read_json_file(path.string());
    LS_CHECK(index.contains("weight_map") && index["weight_map"].is_object(), path.string(),
             ": missing object field 'weight_map'");
    std::map<std::string, std::vector<std::string>> by_file;
    for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
      LS_CHECK(it->is_string(), path.string(), ": weight_map['", it.key(), "'] must be a file name");
      by_file[it->get<std::string>()].push_back(it.key());
    }
    for (const auto& [file, names] : by_file) {
      const fs::path shard = file_in_checkpoint(path.parent_path().string(), file, path.string() + ": weight_map");
      size_t size = 0;
      auto bytes = map_file(shard.string(), size);
      r.add_file(bytes, size, shard.string());
      for (const auto& n : names)
        LS_CHECK(r.tensors_.count(n), path.string(), ": weight_map says '", n, "' is in ", file,
                 " but that file does not hold it");
    }
  } else {
    size_t size = 0;
    auto bytes = map_file(path.string(), size);
    r.add_file(bytes, size, path.string());
  }
  return r;
}

const Tensor& SafetensorsReader::get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    std::string where = files_.empty() ? std::string("checkpoint") : files_.begin()->second;
    fail(where, ": missing tensor '", name, "'");
  }
  return it->second;
}

Tensor SafetensorsReader::get_f32(const std::string& name, const Shape& expected_shape) const {
  const Tensor& t = get(name);
  LS_CHECK(t.shape() == expected_shape, files_.at(name), ": tensor '", name, "' has shape ", shape_str(t.shape()),
           ", expected ", shape_str(expected_shape));
  LS_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::bf16 || t.dtype() == DType::f16 || t.dtype() == DType::f64,
           files_.at(name), ": tensor '", name, "' has dtype ", dtype_name(t.dtype()),
           ", expected a floating type (F32, BF16, F16)");
  Tensor f = t.to_f32();
  check_finite(f, files_.at(name), name);
  return f;
}

std::vector<std::string> SafetensorsReader::names() const {
  std::vector<std::string> out;
  for (const auto& [n, t] : tensors_) out.push_back(n);
  return out;
}

const std::string& SafetensorsReader::file_of(const std::string& name) const { return files_.at(name); }

void write_safetensors(const std::string& path, const std::map<std::string, Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata, std::optional<DType> store_as) {
  std::vector<SafetensorsEntry> entries;
  std::vector<const Tensor*> data;
  for (const auto& [name, t] : tensors) {
    LS_CHECK(t.device() == Device::cpu, path, ": tensor '", name, "' must be on the cpu to be written");
    entries.push_back({name, store_as.value_or(t.dtype()), t.shape()});
    data.push_back(&t);
  }
  Tensor converted;  // the tensor being written, kept until the next one's turn
  write_safetensors(
      path, entries,
      [&](size_t i, std::vector<std::byte>&) -> const void* {
        if (data[i]->dtype() == entries[i].dtype) return data[i]->raw();
        converted = data[i]->to_dtype(entries[i].dtype);
        return converted.raw();
      },
      metadata);
}

void write_safetensors(const std::string& path, const std::vector<SafetensorsEntry>& entries,
                       const SafetensorsSource& source, const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  // Names ascending, then data in order of element size (largest first): with the header
  // padded to 8 bytes every tensor starts at a multiple of its element size (as Hugging Face
  // writes).
  std::vector<size_t> order(entries.size());
  std::iota(order.begin(), order.end(), size_t(0));
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return entries[a].name < entries[b].name; });
  for (size_t k = 1; k < order.size(); ++k)
    LS_CHECK(entries[order[k - 1]].name != entries[order[k]].name, path, ": tensor '", entries[order[k]].name,
             "' is named twice");
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return dtype_size(entries[a].dtype) > dtype_size(entries[b].dtype); });
  const auto nbytes = [&](size_t i) { return size_t(shape_numel(entries[i].shape)) * dtype_size(entries[i].dtype); };
  uint64_t offset = 0;
  for (const size_t i : order) {
    header[entries[i].name] = {{"dtype", dtype_name(entries[i].dtype)},
                               {"shape", entries[i].shape},
                               {"data_offsets", {offset, offset + nbytes(i)}}};
    offset += nbytes(i);
  }
  std::string h = header.dump();
  while ((8 + h.size()) % 8 != 0) h.push_back(' ');
  // A temporary file renamed last: a crash never leaves a half-written file under the name.
  AtomicFile out(path);
  const uint64_t len = h.size();
  out.write(&len, 8);
  out.write(h);
  std::vector<std::byte> scratch;
  for (const size_t i : order) {
    const void* bytes = source(i, scratch);
    LS_CHECK(bytes != scratch.data() || scratch.size() == nbytes(i), path, ": tensor '", entries[i].name, "' came as ",
             scratch.size(), " bytes, expected ", nbytes(i));
    out.write(bytes, nbytes(i));
  }
  out.commit();
}

}  // namespace lockstep
