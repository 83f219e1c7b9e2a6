#include "core/atomic_file.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "core/error.h"
#include "core/output_path.h"

namespace lockstep {

AtomicFile::AtomicFile(const std::string& path) : path_(path), tmp_(path + ".tmp") {
  check_replaceable(path_);
  check_replaceable(tmp_);
  f_ = std::fopen(tmp_.c_str(), "wb");
  LS_CHECK(f_, tmp_, ": cannot open for writing (", std::strerror(errno), ")");
}

AtomicFile::~AtomicFile() {
  if (!f_) return;
  std::fclose(f_);
  std::remove(tmp_.c_str());
}

void AtomicFile::write(const void* data, size_t bytes) {
  LS_CHECK(f_, path_, ": write after commit");
  LS_CHECK(std::fwrite(data, 1, bytes, f_) == bytes, tmp_, ": write failed (", std::strerror(errno), ")");
}

void AtomicFile::commit() {
  LS_CHECK(f_, path_, ": committed twice");
  const bool flushed = std::fflush(f_) == 0 && ::fsync(fileno(f_)) == 0;
  const int err = errno;
  const bool closed = std::fclose(f_) == 0;
  f_ = nullptr;
  if (!flushed || !closed) {
    std::remove(tmp_.c_str());
    fail(tmp_, ": write failed (", std::strerror(flushed ? errno : err), "); ", path_, " is unchanged");
  }
  check_replaceable(path_);  // again: it may have changed while we wrote
  std::error_code ec;
  std::filesystem::rename(tmp_, path_, ec);
  if (ec) {
    std::remove(tmp_.c_str());
    fail(path_, ": cannot rename the finished file into place (", ec.message(), ")");
  }
}

}  // namespace lockstep
