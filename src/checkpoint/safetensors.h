// safetensors files: a memory-mapped reader (single file or sharded with
// model.safetensors.index.json) and a writer.
#pragma once
#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace lockstep {

// Tensors of one or more safetensors files, by name. Views share the file mappings.
class SafetensorsReader {
 public:
  // `path` is a .safetensors file, a model.safetensors.index.json, or a directory holding
  // either model.safetensors or model.safetensors.index.json.
  static SafetensorsReader open(const std::string& path);
  // Parses one file from memory (used by the fuzz tests); `where` names it in errors.
  static SafetensorsReader from_bytes(std::shared_ptr<void> bytes, size_t size, const std::string& where);

  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  // The tensor as stored; errors name the tensor and the file.
  const Tensor& get(const std::string& name) const;
  // The tensor converted to f32, checked against the expected shape.
  Tensor get_f32(const std::string& name, const Shape& expected_shape) const;
  std::vector<std::string> names() const;
  const std::string& file_of(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  void add_file(std::shared_ptr<void> bytes, size_t size, const std::string& where);
  std::map<std::string, Tensor> tensors_;
  std::map<std::string, std::string> files_;
  std::map<std::string, std::string> metadata_;
};

// Writes tensors (any dtype, cpu) to one safetensors file, names in sorted order. store_as:
// each tensor stored in that dtype (f32 -> bf16 rounds to nearest even), converted as its turn
// comes: one converted tensor on the host at a time, not a converted copy of the model.
void write_safetensors(const std::string& path, const std::map<std::string, Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {},
                       std::optional<DType> store_as = std::nullopt);

// One tensor of a streamed write: its bytes come from the writer's source when their turn comes.
struct SafetensorsEntry {
  std::string name;
  DType dtype;
  Shape shape;
};
// Entry i's bytes (numel * dtype size): a pointer to them, or `scratch` resized and filled.
using SafetensorsSource = std::function<const void*(size_t i, std::vector<std::byte>& scratch)>;
// The same file as write_safetensors of tensors with these names, dtypes and shapes, one
// tensor at a time: state held elsewhere (on the GPU) needs one tensor's bytes on the host, not
// the file's. Names must be unique.
void write_safetensors(const std::string& path, const std::vector<SafetensorsEntry>& entries,
                       const SafetensorsSource& source, const std::map<std::string, std::string>& metadata = {});

}  // namespace lockstep
