#include "core/output_path.h"

#include <filesystem>
#include <system_error>

#include "core/error.h"

namespace lockstep {

namespace fs = std::filesystem;

namespace {

// The path with ".", ".." and every symlink of its existing part resolved.
fs::path resolved(const std::string& path) {
  std::error_code ec;
  fs::path p = fs::weakly_canonical(fs::absolute(path), ec);
  return ec ? fs::absolute(path).lexically_normal() : p;
}

bool same_file(const std::string& a, const std::string& b) {
  std::error_code ec;
  if (fs::equivalent(a, b, ec) && !ec) return true;  // hard links and symlinks to one inode
  return resolved(a) == resolved(b);
}

}  // namespace

void check_output_differs(const std::string& output, const std::vector<std::string>& inputs, const std::string& flag) {
  if (output.empty() || output == "-") return;
  for (const auto& input : inputs) {
    if (input.empty() || input == "-") continue;
    LS_CHECK(!same_file(output, input), flag, " ", output, " is the same file as the input ", input,
             ": writing it would destroy the input");
  }
}

void check_output_outside(const std::string& output, const std::string& dir, const std::string& flag) {
  if (output.empty() || output == "-") return;
  if (dir.empty()) return;
  const fs::path out = resolved(output), in = resolved(dir);
  auto within = [](fs::path p, const fs::path& outer) {
    for (; p.has_relative_path(); p = p.parent_path())
      if (p == outer) return true;
    return false;
  };
  LS_CHECK(!same_file(output, dir) && !within(out, in) && !within(in, out), flag, " ", output, " overlaps the input ",
           dir, ": an output is never written into its own input");
}

void check_replaceable(const std::string& path) {
  std::error_code ec;
  const fs::file_status st = fs::symlink_status(path, ec);
  if (ec || st.type() == fs::file_type::not_found || st.type() == fs::file_type::regular) return;
  const char* kind = st.type() == fs::file_type::symlink     ? "a symlink"
                     : st.type() == fs::file_type::directory ? "a directory"
                     : st.type() == fs::file_type::fifo      ? "a FIFO"
                     : st.type() == fs::file_type::socket    ? "a socket"
                                                             : "a device or other special file";
  fail(path, ": is ", kind, "; an output is written only over a regular file (remove it or choose another path)");
}

}  // namespace lockstep
