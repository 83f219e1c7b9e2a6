#include "core/text_file.h"

#include "core/atomic_file.h"

namespace lockstep {

void write_text_file(const std::string& path, const std::string& text) {
  AtomicFile f(path);
  f.write(text);
  f.commit();
}

}  // namespace lockstep
