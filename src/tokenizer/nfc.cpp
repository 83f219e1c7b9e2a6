// NFC per UAX #15: full canonical decomposition, canonical ordering of combining
// marks, then canonical composition. Hangul syllables are handled arithmetically.
#include "tokenizer/nfc.h"

#include <algorithm>
#include <vector>

#include "tokenizer/nfc_tables.h"
#include "tokenizer/utf8.h"

namespace lockstep::nfc {
namespace {

constexpr uint32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr uint32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount;
constexpr uint32_t kSCount = kLCount * kNCount;

// Everything below U+0300 has combining class 0 and quick-check "Yes" (the generator
// asserts it), which makes ASCII and Latin-1 text free.
constexpr uint32_t kFirstInteresting = 0x300;

uint8_t combining_class(uint32_t cp) {
  if (cp < kFirstInteresting) return 0;
  const auto* end = kCombiningClasses + kCombiningClassCount;
  const auto* it = std::lower_bound(kCombiningClasses, end, cp,
                                    [](const CombiningClass& e, uint32_t v) { return e.code_point < v; });
  return it != end && it->code_point == cp ? it->ccc : 0;
}

bool quick_check_not_yes(uint32_t cp) {
  if (cp < kFirstInteresting) return false;
  const auto* end = kQuickCheckNotYes + kQuickCheckNotYesCount;
  const auto* it =
      std::upper_bound(kQuickCheckNotYes, end, cp, [](uint32_t v, const Range& r) { return v < r.first; });
  return it != kQuickCheckNotYes && cp <= (it - 1)->last;
}

void decompose(uint32_t cp, std::vector<uint32_t>& out) {
  if (cp < kFirstInteresting) {
    // Latin-1 letters with accents do decompose; everything else here is itself.
    if (cp < 0xC0) {
      out.push_back(cp);
      return;
    }
  }
  if (cp >= kSBase && cp < kSBase + kSCount) {
    const uint32_t s = cp - kSBase;
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount) out.push_back(kTBase + s % kTCount);
    return;
  }
  const auto* end = kDecompositions + kDecompositionCount;
  const auto* it = std::lower_bound(kDecompositions, end, cp,
                                    [](const Decomposition& e, uint32_t v) { return e.code_point < v; });
  if (it == end || it->code_point != cp) {
    out.push_back(cp);
    return;
  }
  out.insert(out.end(), kDecompositionPool + it->offset, kDecompositionPool + it->offset + it->length);
}

// The primary composite of (first, second), or 0 if there is none.
uint32_t compose(uint32_t first, uint32_t second) {
  if (first >= kLBase && first < kLBase + kLCount && second >= kVBase && second < kVBase + kVCount)
    return kSBase + ((first - kLBase) * kVCount + (second - kVBase)) * kTCount;
  if (first >= kSBase && first < kSBase + kSCount && (first - kSBase) % kTCount == 0 && second > kTBase &&
      second < kTBase + kTCount)
    return first + (second - kTBase);
  const uint64_t key = (uint64_t{first} << 21) | second;
  const auto* end = kCompositions + kCompositionCount;
  const auto* it =
      std::lower_bound(kCompositions, end, key, [](const Composition& e, uint64_t v) { return e.pair < v; });
  return it != end && it->pair == key ? it->composite : 0;
}

}  // namespace

bool quick_check(std::string_view text) {
  uint8_t last = 0;
  size_t pos = 0, length = 0;
  uint32_t cp = 0;
  while (pos < text.size()) {
    if (static_cast<unsigned char>(text[pos]) < 0x80) {
      last = 0;
      ++pos;
      continue;
    }
    if (utf8::next(text, pos, length, cp) != utf8::Step::kOk) return false;
    pos += length;
    if (cp < kFirstInteresting) {
      last = 0;
      continue;
    }
    const uint8_t ccc = combining_class(cp);
    if ((ccc != 0 && last > ccc) || quick_check_not_yes(cp)) return false;
    last = ccc;
  }
  return true;
}

std::string normalize(std::string_view text) {
  std::vector<uint32_t> cps;
  cps.reserve(text.size());
  size_t pos = 0, length = 0;
  uint32_t cp = 0;
  while (pos < text.size()) {
    if (utf8::next(text, pos, length, cp) != utf8::Step::kOk) {
      cp = 0xFFFD;  // callers validate first; never loop on bad input
    }
    pos += length;
    decompose(cp, cps);
  }
  // Canonical ordering: stable-sort each run of non-starters by combining class.
  for (size_t i = 0; i < cps.size();) {
    if (combining_class(cps[i]) == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < cps.size() && combining_class(cps[j]) != 0) ++j;
    std::stable_sort(cps.begin() + i, cps.begin() + j,
                     [](uint32_t a, uint32_t b) { return combining_class(a) < combining_class(b); });
    i = j;
  }
  // Canonical composition: a character joins the last starter unless blocked by an
  // intervening character of class 0 or of a class >= its own.
  std::vector<uint32_t> out;
  out.reserve(cps.size());
  size_t starter = 0;
  bool have_starter = false;
  int last_class = -1;
  for (uint32_t c : cps) {
    const int cls = combining_class(c);
    if (have_starter) {
      const bool adjacent = out.size() == starter + 1;
      if (adjacent || (last_class < cls && last_class != 0)) {
        if (const uint32_t composite = compose(out[starter], c)) {
          out[starter] = composite;
          continue;
        }
      }
    }
    if (cls == 0) {
      starter = out.size();
      have_starter = true;
    }
    last_class = cls;
    out.push_back(c);
  }
  std::string result;
  result.reserve(text.size());
  for (uint32_t c : out) utf8::append(result, c);
  return result;
}

}  // namespace lockstep::nfc
