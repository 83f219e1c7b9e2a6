// Writing a small text file (configs, indexes, markers, reports) with every step checked: a
// failed open, write or close is an error naming the path, never a silent loss; the file
// appears whole or not at all (AtomicFile).
#pragma once
#include <string>

namespace lockstep {

void write_text_file(const std::string& path, const std::string& text);

}  // namespace lockstep
