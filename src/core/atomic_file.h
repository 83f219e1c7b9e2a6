// An output file written whole or not at all: the bytes go to a temporary file beside the
// target, every write, flush and close is checked, and a rename puts it in place. The
// target must be absent or a regular file (check_replaceable).
#pragma once
#include <cstdio>
#include <string>

namespace lockstep {

class AtomicFile {
 public:
  explicit AtomicFile(const std::string& path);
  ~AtomicFile();  // without commit(): the temporary file is removed, the target untouched
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t bytes);
  void write(const std::string& text) { write(text.data(), text.size()); }
  // Flushes, syncs and closes the temporary file, then renames it over the target.
  void commit();

 private:
  std::string path_, tmp_;
  std::FILE* f_ = nullptr;
};

}  // namespace lockstep
