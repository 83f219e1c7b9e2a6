// Writing a small text file (configs, indexes, markers) with every step checked: a failed
// open or write is an error naming the path, never a silent loss.
#pragma once
#include <string>

namespace lockstep {

void write_text_file(const std::string& path, const std::string& text);

}  // namespace lockstep
