#include "tokenizer/nfc.h"

namespace lockstep::nfc {
bool quick_check(std::string_view) { return true; }
std::string normalize(std::string_view text) { return std::string(text); }
}  // namespace lockstep::nfc
