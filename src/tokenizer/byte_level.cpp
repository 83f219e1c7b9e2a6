#include "tokenizer/byte_level.h"

#include "tokenizer/utf8.h"

namespace lockstep::byte_level {
namespace {

struct Tables {
  std::array<uint32_t, 256> code_point{};
  std::array<std::string, 256> text{};
  std::array<int16_t, 512> byte_of{};  // code point -> byte, -1 if unused
};

const Tables& tables() {
  static const Tables t = [] {
    Tables t;
    t.byte_of.fill(-1);
    // Printable Latin-1 bytes stand for themselves; the others (controls, space,
    // DEL, NBSP, soft hyphen) are moved to 256, 257, ... in byte order.
    uint32_t next_extra = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      const uint32_t cp = printable ? static_cast<uint32_t>(b) : next_extra++;
      t.code_point[b] = cp;
      utf8::append(t.text[b], cp);
      t.byte_of[cp] = static_cast<int16_t>(b);
    }
    return t;
  }();
  return t;
}

}  // namespace

uint32_t code_point_of(uint8_t byte) { return tables().code_point[byte]; }

const std::string& char_of(uint8_t byte) { return tables().text[byte]; }

std::string encode(std::string_view bytes) {
  const Tables& t = tables();
  std::string out;
  out.reserve(bytes.size() * 2);
  for (char c : bytes) out += t.text[static_cast<uint8_t>(c)];
  return out;
}

bool decode(std::string_view text, std::string& bytes) {
  const Tables& t = tables();
  bytes.clear();
  size_t pos = 0, length = 0;
  uint32_t cp = 0;
  while (pos < text.size()) {
    if (utf8::next(text, pos, length, cp) != utf8::Step::kOk) return false;
    if (cp >= t.byte_of.size() || t.byte_of[cp] < 0) return false;
    bytes.push_back(static_cast<char>(t.byte_of[cp]));
    pos += length;
  }
  return true;
}

}  // namespace lockstep::byte_level
