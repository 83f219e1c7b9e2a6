// GPT-2 style byte-level alphabet: every byte maps to one printable code point, so
// vocab entries are UTF-8 strings of those code points.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace lockstep::byte_level {

// Code point standing for `byte`.
uint32_t code_point_of(uint8_t byte);
// UTF-8 text of the code point standing for `byte`.
const std::string& char_of(uint8_t byte);
// Converts raw bytes to their byte-level string.
std::string encode(std::string_view bytes);
// Converts a byte-level string back to raw bytes; returns false if it contains a code
// point outside the alphabet or invalid UTF-8.
bool decode(std::string_view text, std::string& bytes);

}  // namespace lockstep::byte_level
