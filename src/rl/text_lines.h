// Reads a text file line by line, gzip-compressed or not (zlib reads plain files as they are),
// so `--prompt-data F.jsonl` and `F.jsonl.gz` take one path.
#pragma once
#include <string>
#include <vector>

namespace lockstep::rl {

// Every line of `path` without its "\n" (and "\r\n"); errors name the file (missing,
// unreadable, or a corrupt gzip stream).
std::vector<std::string> read_text_lines(const std::string& path);

}  // namespace lockstep::rl
