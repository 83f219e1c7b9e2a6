// TensorBoard event files for `lockstep train --tensorboard-dir DIR`, written without TensorFlow:
// DIR/events.out.tfevents.<seconds>.<host>.<pid> holds TFRecords (length, masked CRC-32C of the
// length, an Event protobuf, masked CRC-32C of the data). The first Event names the file version
// ("brain.Event:2"); each metrics record then becomes one Event at its step with one scalar
// summary value per numeric key. The protobuf fields are encoded by hand (Event: wall_time 1,
// step 2, file_version 3, summary 5; Summary.Value: tag 1, simple_value 2).
#pragma once
#include <cstdint>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace lockstep::rl {

class TensorBoardWriter {
 public:
  explicit TensorBoardWriter(const std::string& dir);
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;
  // One Event at `step` with every numeric value of `record` except the step keys.
  void write(int64_t step, const nlohmann::json& record);
  const std::string& path() const { return path_; }

 private:
  void write_record(const std::string& event);
  std::string path_;
  std::FILE* f_ = nullptr;
};

struct TensorBoardScalar {
  int64_t step = 0;
  std::string tag;
  float value = 0;
};

// Reads the scalars back (every record's CRCs checked; errors name the file and offset).
std::vector<TensorBoardScalar> read_tensorboard_scalars(const std::string& path);

uint32_t crc32c(const void* data, size_t n);

}  // namespace lockstep::rl
