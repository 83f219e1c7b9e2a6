// File names read from a checkpoint index (model.safetensors.index.json's weight_map, the
// sharded index's "files"): untrusted text that must stay inside the checkpoint directory.
#pragma once
#include <string>

namespace lockstep {

// `dir`/`name` when `name` is a plain relative path inside `dir`: not empty, not absolute,
// no "." or ".." component. Otherwise throws Error naming `where` and the entry.
std::string file_in_checkpoint(const std::string& dir, const std::string& name, const std::string& where);

}  // namespace lockstep
