// UTF-8 validation and repair, following the Unicode "maximal subpart" rule so that
// replacement matches Rust's String::from_utf8_lossy (what HF decode uses).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace lockstep::utf8 {

enum class Step { kOk, kInvalid, kIncomplete };

// Examines the sequence starting at text[pos]. On kOk, `length` is its byte length and
// `code_point` its value; on kInvalid, `length` is the maximal invalid subpart (>= 1);
// on kIncomplete, the text ends inside a sequence that is valid so far.
Step next(std::string_view text, size_t pos, size_t& length, uint32_t& code_point);

// Offset of the first invalid or truncated sequence, or npos when `text` is valid.
size_t first_invalid(std::string_view text);

// `text` with every maximal invalid subpart replaced by U+FFFD.
std::string repair(std::string_view text);

// Length of the longest prefix that does not end inside an incomplete sequence, i.e.
// everything that can be emitted now without waiting for more bytes.
size_t emittable_prefix(std::string_view text);

void append(std::string& out, uint32_t code_point);

inline constexpr std::string_view kReplacement = "\xEF\xBF\xBD";

}  // namespace lockstep::utf8
