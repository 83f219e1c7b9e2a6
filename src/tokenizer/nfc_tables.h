// NFC data tables (generated into nfc_tables.cpp by gen_nfc_tables.py). All arrays are
// sorted by their first field for binary search.
#pragma once
#include <cstddef>
#include <cstdint>

namespace lockstep::nfc {

struct CombiningClass {
  uint32_t code_point;
  uint8_t ccc;  // canonical combining class, non-zero
};
struct Decomposition {
  uint32_t code_point;
  uint32_t offset;  // into kDecompositionPool: the full canonical decomposition
  uint32_t length;
};
struct Composition {
  uint64_t pair;  // first << 21 | second
  uint32_t composite;
};
struct Range {
  uint32_t first, last;
};

extern const CombiningClass kCombiningClasses[];
extern const size_t kCombiningClassCount;
extern const Decomposition kDecompositions[];
extern const size_t kDecompositionCount;
extern const uint32_t kDecompositionPool[];
extern const Composition kCompositions[];
extern const size_t kCompositionCount;
extern const Range kQuickCheckNotYes[];  // code points whose NFC_QC is No or Maybe
extern const size_t kQuickCheckNotYesCount;

}  // namespace lockstep::nfc
