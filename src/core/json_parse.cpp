#include "core/json_parse.h"

#include <fstream>
#include <sstream>

#include "core/error.h"

namespace lockstep {
namespace {

template <typename Json>
Json parse_checked(std::string_view text, const std::string& where) {
  check_json_depth(text, where);
  try {
    return Json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::exception& e) {  // parse_error, or out_of_range for a number like 1e999
    fail(where, ": not valid JSON (", e.what(), ")");
  }
}

}  // namespace

void check_json_depth(std::string_view text, const std::string& where, int max_depth) {
  int depth = 0;
  bool in_string = false, escaped = false;
  int64_t line = 1;
  size_t line_start = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '\n') line += 1, line_start = i + 1;
    if (in_string) {
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth)
        fail(where, ": JSON nests deeper than ", max_depth, " levels (line ", line, ", column ", i - line_start + 1,
             ")");
    } else if (c == ']' || c == '}') {
      --depth;  // unbalanced text is the parser's to report
    }
  }
}

nlohmann::json parse_json(std::string_view text, const std::string& where) {
  return parse_checked<nlohmann::json>(text, where);
}

nlohmann::ordered_json parse_ordered_json(std::string_view text, const std::string& where) {
  return parse_checked<nlohmann::ordered_json>(text, where);
}

nlohmann::json read_json_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  LS_CHECK(in, path, ": cannot open");
  std::ostringstream text;
  text << in.rdbuf();
  LS_CHECK(!in.bad(), path, ": read failed");
  return parse_json(text.str(), path);
}

}  // namespace lockstep
