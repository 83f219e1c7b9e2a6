#include "core/text_file.h"

#include <fstream>

#include "core/error.h"

namespace lockstep {

void write_text_file(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  LS_CHECK(f, path, ": cannot open for writing");
  f << text;
  f.close();
  LS_CHECK(f.good(), path, ": write failed");
}

}  // namespace lockstep
