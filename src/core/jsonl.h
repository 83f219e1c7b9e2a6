// JSON Lines in and out: one object per line, errors that name the file and line.
#pragma once
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/atomic_file.h"

namespace lockstep {

struct JsonlRecord {
  int64_t line = 0;  // 1-based line number in the input
  nlohmann::json value;
};

// Reads every non-empty line of `path` ("-" for stdin) as a JSON object.
std::vector<JsonlRecord> read_jsonl(const std::string& path);

// Reads a list of token ids from record field `key`; checks each is an integer in [0, vocab).
std::vector<int32_t> read_token_ids(const JsonlRecord& record, const std::string& path, const std::string& key,
                                    int64_t vocab_size);

// fp32 values printed with %.9g, which round-trips every float exactly.
std::string format_floats(const float* values, size_t n);
std::string format_ints(const std::vector<int32_t>& values);

// Output sink: a file (written whole through AtomicFile), or stdout for "-". close() must
// end every successful run: it checks the last flush and puts the file in place.
class JsonlWriter {
 public:
  explicit JsonlWriter(const std::string& path);
  void write_line(const std::string& line);
  void close();

 private:
  std::unique_ptr<AtomicFile> file_;  // null for stdout
};

}  // namespace lockstep
