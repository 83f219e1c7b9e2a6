#include "tokenizer/utf8.h"

namespace lockstep::utf8 {

Step next(std::string_view text, size_t pos, size_t& length, uint32_t& code_point) {
  const auto* p = reinterpret_cast<const unsigned char*>(text.data()) + pos;
  const size_t avail = text.size() - pos;
  const unsigned char lead = p[0];
  if (lead < 0x80) {
    length = 1;
    code_point = lead;
    return Step::kOk;
  }
  size_t need = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (lead >= 0xC2 && lead <= 0xDF) {
    need = 2;
    code_point = lead & 0x1F;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    need = 3;
    code_point = lead & 0x0F;
    if (lead == 0xE0) lo = 0xA0;       // no overlong forms
    if (lead == 0xED) hi = 0x9F;       // no surrogates
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    need = 4;
    code_point = lead & 0x07;
    if (lead == 0xF0) lo = 0x90;       // no overlong forms
    if (lead == 0xF4) hi = 0x8F;       // nothing above U+10FFFF
  } else {
    length = 1;
    return Step::kInvalid;
  }
  for (size_t i = 1; i < need; ++i) {
    if (i >= avail) {
      length = i;
      return Step::kIncomplete;
    }
    const unsigned char c = p[i];
    const bool ok = i == 1 ? (c >= lo && c <= hi) : (c >= 0x80 && c <= 0xBF);
    if (!ok) {
      length = i;
      return Step::kInvalid;
    }
    code_point = (code_point << 6) | (c & 0x3F);
  }
  length = need;
  return Step::kOk;
}

size_t first_invalid(std::string_view text) {
  size_t pos = 0, length = 0;
  uint32_t cp = 0;
  while (pos < text.size()) {
    // ASCII fast path, eight bytes at a time.
    while (pos + 8 <= text.size()) {
      uint64_t word;
      __builtin_memcpy(&word, text.data() + pos, 8);
      if (word & 0x8080808080808080ULL) break;
      pos += 8;
    }
    if (pos >= text.size()) break;
    if (next(text, pos, length, cp) != Step::kOk) return pos;
    pos += length;
  }
  return std::string_view::npos;
}

std::string repair(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  size_t pos = 0, length = 0;
  uint32_t cp = 0;
  while (pos < text.size()) {
    const Step step = next(text, pos, length, cp);
    if (step == Step::kOk) {
      out.append(text.substr(pos, length));
    } else {
      out.append(kReplacement);
    }
    pos += length;
  }
  return out;
}

size_t emittable_prefix(std::string_view text) {
  size_t pos = 0, length = 0;
  uint32_t cp = 0;
  while (pos < text.size()) {
    if (next(text, pos, length, cp) == Step::kIncomplete) return pos;
    pos += length;
  }
  return text.size();
}

void append(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

}  // namespace lockstep::utf8
