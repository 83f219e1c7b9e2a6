#include "rl/text_lines.h"

#include <zlib.h>

#include <filesystem>

#include "core/error.h"

namespace lockstep::rl {

std::vector<std::string> read_text_lines(const std::string& path) {
  LS_CHECK(std::filesystem::is_regular_file(path), path, ": file not found");
  gzFile f = gzopen(path.c_str(), "rb");
  LS_CHECK(f, path, ": cannot open the file");
  std::vector<std::string> lines;
  std::string current;
  char buf[1 << 16];
  for (;;) {
    const int n = gzread(f, buf, sizeof buf);
    if (n < 0) {
      int code = 0;
      const std::string why = gzerror(f, &code);
      gzclose(f);
      fail(path, ": cannot read the file (", why, ")");
    }
    if (n == 0) break;
    for (int i = 0; i < n; ++i) {
      if (buf[i] == '\n') {
        if (!current.empty() && current.back() == '\r') current.pop_back();
        lines.push_back(std::move(current));
        current.clear();
      } else {
        current += buf[i];
      }
    }
  }
  // A truncated gzip stream reads as a short file without an error from gzread: check the end.
  int code = 0;
  const std::string why = gzerror(f, &code);
  gzclose(f);
  LS_CHECK(code == Z_OK || code == Z_STREAM_END, path, ": cannot read the file (", why, ")");
  if (!current.empty()) lines.push_back(std::move(current));
  return lines;
}

}  // namespace lockstep::rl
