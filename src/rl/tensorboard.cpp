#include "rl/tensorboard.h"

#include <unistd.h>

#include <array>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace lockstep::rl {

namespace {

std::array<uint32_t, 256> make_crc32c_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;  // Castagnoli, reflected
    t[i] = c;
  }
  return t;
}

uint32_t masked_crc(const void* data, size_t n) {
  const uint32_t crc = crc32c(data, n);
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) out += char((v & 0x7f) | 0x80), v >>= 7;
  out += char(v);
}

template <typename T>
void put_fixed(std::string& out, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));  // little-endian hosts only (x86-64, aarch64)
  out.append(b, sizeof(T));
}

void put_bytes_field(std::string& out, uint32_t field, const std::string& bytes) {
  put_varint(out, (uint64_t(field) << 3) | 2);
  put_varint(out, bytes.size());
  out += bytes;
}

std::string event_header(int64_t step, double wall_time) {
  std::string e;
  put_varint(e, (1 << 3) | 1);  // wall_time, fixed64
  put_fixed(e, wall_time);
  put_varint(e, (2 << 3) | 0);  // step, varint
  put_varint(e, uint64_t(step));
  return e;
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

uint32_t crc32c(const void* data, size_t n) {
  static const std::array<uint32_t, 256> table = make_crc32c_table();
  const auto* p = static_cast<const unsigned char*>(data);
  uint32_t c = 0xffffffffu;
  for (size_t i = 0; i < n; ++i) c = table[(c ^ p[i]) & 0xff] ^ (c >> 8);
  return c ^ 0xffffffffu;
}

TensorBoardWriter::TensorBoardWriter(const std::string& dir) {
  std::filesystem::create_directories(dir);
  char host[256] = "localhost";
  gethostname(host, sizeof host - 1);
  std::ostringstream name;
  name << "events.out.tfevents." << int64_t(now_seconds()) << "." << host << "." << getpid();
  path_ = (std::filesystem::path(dir) / name.str()).string();
  f_ = std::fopen(path_.c_str(), "wb");
  LS_CHECK(f_, path_, ": cannot open the TensorBoard event file for writing");
  std::string e = event_header(0, now_seconds());
  put_bytes_field(e, 3, "brain.Event:2");
  write_record(e);
}

TensorBoardWriter::~TensorBoardWriter() {
  if (f_) std::fclose(f_);
}

void TensorBoardWriter::write_record(const std::string& event) {
  std::string r;
  put_fixed(r, uint64_t(event.size()));
  put_fixed(r, masked_crc(r.data(), 8));
  r += event;
  put_fixed(r, masked_crc(event.data(), event.size()));
  LS_CHECK(std::fwrite(r.data(), 1, r.size(), f_) == r.size() && std::fflush(f_) == 0, path_, ": write failed");
}

void TensorBoardWriter::write(int64_t step, const nlohmann::json& record) {
  std::string summary;
  for (const auto& [key, value] : record.items()) {
    if (key == "step" || key == "sft_step" || !value.is_number()) continue;
    std::string v;
    put_bytes_field(v, 1, key);
    put_varint(v, (2 << 3) | 5);  // simple_value, fixed32
    put_fixed(v, value.get<float>());
    put_bytes_field(summary, 1, v);
  }
  std::string e = event_header(step, now_seconds());
  put_bytes_field(e, 5, summary);
  write_record(e);
}

namespace {

// A minimal protobuf reader over one message's bytes.
struct Fields {
  const std::string& s;
  size_t i = 0;
  const std::string& where;
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      LS_CHECK(i < s.size(), where, ": truncated protobuf varint");
      const uint8_t b = uint8_t(s[i++]);
      v |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    fail(where, ": protobuf varint too long");
  }
  std::string bytes(size_t n) {
    LS_CHECK(i + n <= s.size(), where, ": truncated protobuf field");
    std::string out = s.substr(i, n);
    i += n;
    return out;
  }
  void skip(uint32_t wire) {
    if (wire == 0)
      varint();
    else if (wire == 1)
      bytes(8);
    else if (wire == 2)
      bytes(size_t(varint()));
    else if (wire == 5)
      bytes(4);
    else
      fail(where, ": unsupported protobuf wire type ", wire);
  }
};

}  // namespace

std::vector<TensorBoardScalar> read_tensorboard_scalars(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  LS_CHECK(f, path, ": cannot open");
  std::string data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<TensorBoardScalar> out;
  size_t off = 0;
  while (off < data.size()) {
    const std::string where = path + ": record at offset " + std::to_string(off);
    LS_CHECK(off + 12 <= data.size(), where, ": truncated header");
    uint64_t len = 0;
    uint32_t len_crc = 0, data_crc = 0;
    std::memcpy(&len, data.data() + off, 8);
    std::memcpy(&len_crc, data.data() + off + 8, 4);
    LS_CHECK(len_crc == masked_crc(data.data() + off, 8), where, ": length CRC mismatch");
    LS_CHECK(off + 12 + len + 4 <= data.size(), where, ": truncated data");
    const std::string event = data.substr(off + 12, size_t(len));
    std::memcpy(&data_crc, data.data() + off + 12 + len, 4);
    LS_CHECK(data_crc == masked_crc(event.data(), event.size()), where, ": data CRC mismatch");
    off += 12 + size_t(len) + 4;
    Fields e{event, 0, where};
    int64_t step = 0;
    std::vector<TensorBoardScalar> values;
    while (e.i < event.size()) {
      const uint64_t key = e.varint();
      const uint32_t field = uint32_t(key >> 3), wire = uint32_t(key & 7);
      if (field == 2 && wire == 0) {
        step = int64_t(e.varint());
      } else if (field == 5 && wire == 2) {
        const std::string summary = e.bytes(size_t(e.varint()));
        Fields s{summary, 0, where};
        while (s.i < summary.size()) {
          const uint64_t skey = s.varint();
          if ((skey >> 3) != 1 || (skey & 7) != 2) {
            s.skip(uint32_t(skey & 7));
            continue;
          }
          const std::string value = s.bytes(size_t(s.varint()));
          Fields v{value, 0, where};
          TensorBoardScalar scalar;
          while (v.i < value.size()) {
            const uint64_t vkey = v.varint();
            if (vkey == ((1 << 3) | 2)) {
              scalar.tag = v.bytes(size_t(v.varint()));
            } else if (vkey == ((2 << 3) | 5)) {
              const std::string b = v.bytes(4);
              std::memcpy(&scalar.value, b.data(), 4);
            } else {
              v.skip(uint32_t(vkey & 7));
            }
          }
          values.push_back(scalar);
        }
      } else {
        e.skip(wire);
      }
    }
    for (auto& v : values) v.step = step, out.push_back(v);
  }
  return out;
}

}  // namespace lockstep::rl
