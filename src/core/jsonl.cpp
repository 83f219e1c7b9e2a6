#include "core/jsonl.h"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iostream>

#include "core/error.h"
#include "core/json_parse.h"

namespace lockstep {

std::vector<JsonlRecord> read_jsonl(const std::string& path) {
  std::ifstream file;
  std::istream* in = &std::cin;
  if (path != "-") {
    file.open(path);
    LS_CHECK(file, path, ": cannot open the input file");
    in = &file;
  }
  std::vector<JsonlRecord> out;
  std::string line;
  int64_t number = 0;
  while (std::getline(*in, line)) {
    ++number;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    JsonlRecord r;
    r.line = number;
    r.value = parse_json(line, path + ":" + std::to_string(number));
    LS_CHECK(r.value.is_object(), path, ":", number, ": expected a JSON object");
    out.push_back(std::move(r));
  }
  return out;
}

std::vector<int32_t> read_token_ids(const JsonlRecord& record, const std::string& path, const std::string& key,
                                    int64_t vocab_size) {
  const auto& v = record.value;
  LS_CHECK(v.contains(key), path, ":", record.line, ": missing field '", key, "'");
  LS_CHECK(v[key].is_array(), path, ":", record.line, ": field '", key, "' must be a list of token ids");
  std::vector<int32_t> ids;
  ids.reserve(v[key].size());
  for (size_t i = 0; i < v[key].size(); ++i) {
    const auto& e = v[key][i];
    LS_CHECK(e.is_number_integer(), path, ":", record.line, ": ", key, "[", i, "] must be an integer, got ",
             e.dump());
    int64_t id = e.get<int64_t>();
    LS_CHECK(id >= 0 && id < vocab_size, path, ":", record.line, ": ", key, "[", i, "] = ", id,
             " is out of range (the model's vocab_size is ", vocab_size, ")");
    ids.push_back(int32_t(id));
  }
  return ids;
}

std::string format_floats(const float* values, size_t n) {
  std::string s = "[";
  char buf[32];
  for (size_t i = 0; i < n; ++i) {
    // NaN and infinity are not JSON, and a result that overflowed must not pass as one.
    LS_CHECK(std::isfinite(values[i]), "value ", i, " of ", n, " is not finite (", values[i],
             "): the computation overflowed, so nothing is written for it");
    std::snprintf(buf, sizeof buf, "%.9g", double(values[i]));
    if (i) s += ",";
    s += buf;
  }
  return s + "]";
}

std::string format_ints(const std::vector<int32_t>& values) {
  std::string s = "[";
  for (size_t i = 0; i < values.size(); ++i) {
    if (i) s += ",";
    s += std::to_string(values[i]);
  }
  return s + "]";
}

JsonlWriter::JsonlWriter(const std::string& path) {
  if (path != "-") file_ = std::make_unique<AtomicFile>(path);
}

void JsonlWriter::write_line(const std::string& line) {
  if (file_) {
    file_->write(line + "\n");
    return;
  }
  std::fputs(line.c_str(), stdout);
  std::fputc('\n', stdout);
  LS_CHECK(!std::ferror(stdout), "<stdout>: write failed");
}

void JsonlWriter::close() {
  if (file_) return file_->commit();
  LS_CHECK(std::fflush(stdout) == 0 && !std::ferror(stdout), "<stdout>: write failed (", std::strerror(errno), ")");
}

}  // namespace lockstep
