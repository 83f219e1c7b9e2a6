// The one way lockstep parses JSON it did not write itself (files, JSONL lines, requests,
// headers): nesting is bounded before any parse, so no input can exhaust the stack of the
// recursive code that later walks, copies or prints the value.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace lockstep {

// Deeper than any real config, header or request (Python's json module stops near 1000
// levels, OpenAI tool schemas use tens), shallow enough for a thread's stack.
inline constexpr int kMaxJsonDepth = 512;

// Throws Error "<where>: JSON nests deeper than 512 levels (line L, column C)" when the
// arrays and objects of `text` nest deeper than `max_depth`. Linear and non-recursive.
void check_json_depth(std::string_view text, const std::string& where, int max_depth = kMaxJsonDepth);

// check_json_depth, then the parse; a syntax error throws Error "<where>: not valid JSON (...)".
nlohmann::json parse_json(std::string_view text, const std::string& where);
nlohmann::ordered_json parse_ordered_json(std::string_view text, const std::string& where);

// Reads the whole file at `path` and parses it as above; errors name the path.
nlohmann::json read_json_file(const std::string& path);

}  // namespace lockstep
