#include "checkpoint/index_path.h"

#include <filesystem>

#include "core/error.h"

namespace lockstep {

std::string file_in_checkpoint(const std::string& dir, const std::string& name, const std::string& where) {
  const std::filesystem::path p(name);
  LS_CHECK(!name.empty() && name.find('\0') == std::string::npos, where, ": file name '", name,
           "' is empty or holds a NUL");
  LS_CHECK(p.is_relative(), where, ": file name '", name, "' is absolute; it must name a file inside ", dir);
  for (const auto& part : p)
    LS_CHECK(part != ".." && part != ".", where, ": file name '", name, "' has a '", part.string(),
             "' component; it must name a file inside ", dir);
  LS_CHECK(name.back() != '/', where, ": file name '", name, "' names a directory");
  return (std::filesystem::path(dir) / p).string();
}

}  // namespace lockstep
