// The safetensors reader and writer: round trips, sharded checkpoints, and clear errors
// (never a crash) on damaged files, including a mutation fuzz of headers.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "checkpoint/safetensors.h"
#include "core/error.h"
#include "core/philox.h"

namespace lockstep {
namespace {

namespace fs = std::filesystem;

fs::path temp_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("lockstep_test_" + name + "_" + std::to_string(::getpid()));
  fs::create_directories(p);
  return p;
}

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::shared_ptr<void> bytes_of(const std::string& s) {
  auto* buf = new char[s.size() + 1];
  std::memcpy(buf, s.data(), s.size());
  return std::shared_ptr<void>(buf, [](void* p) { delete[] static_cast<char*>(p); });
}

// A file made of a given header and `data_bytes` bytes of payload.
std::string make_file(const std::string& header, size_t data_bytes) {
  std::string s(8, '\0');
  uint64_t n = header.size();
  std::memcpy(s.data(), &n, 8);
  return s + header + std::string(data_bytes, '\x01');
}

std::string parse_error(const std::string& file) {
  try {
    SafetensorsReader::from_bytes(bytes_of(file), file.size(), "test.safetensors");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// The writer puts every tensor at a multiple of its element size; a file that does not
// (the format allows it) is read through an aligned copy with the same values.
TEST(Safetensors, TensorsAreAlignedForTypedAccess) {
  auto dir = temp_dir("aligned");
  std::map<std::string, Tensor> tensors;
  tensors["a.bf16"] = Tensor::zeros({3}, DType::bf16);  // 6 bytes: would misalign what follows
  Tensor ids = Tensor::zeros({2}, DType::i64);
  ids.data<int64_t>()[0] = -5, ids.data<int64_t>()[1] = int64_t(1) << 40;
  tensors["b.i64"] = ids;
  tensors["c.f32"] = Tensor::zeros({1}, DType::f32);
  write_safetensors((dir / "x.safetensors").string(), tensors, {});
  auto r = SafetensorsReader::open((dir / "x.safetensors").string());
  for (const auto& n : r.names())
    EXPECT_EQ(reinterpret_cast<uintptr_t>(r.get(n).raw()) % dtype_size(r.get(n).dtype()), 0u) << n;
  EXPECT_EQ(r.get("b.i64").data<int64_t>()[1], int64_t(1) << 40);

  // By hand: an i64 at data offset 2, after a 2-byte bf16 (header padded to 8 bytes).
  std::string header =
      R"({"a":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]},"b":{"dtype":"I64","shape":[1],"data_offsets":[2,10]}})";
  while ((8 + header.size()) % 8 != 0) header.push_back(' ');
  std::string file = make_file(header, 0);
  const int64_t value = 0x0102030405060708;
  file += std::string(2, '\0') + std::string(reinterpret_cast<const char*>(&value), 8);
  auto m = SafetensorsReader::from_bytes(bytes_of(file), file.size(), "misaligned.safetensors");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(m.get("b").raw()) % 8, 0u);
  EXPECT_EQ(m.get("b").data<int64_t>()[0], value);
}

// A header nested past the JSON depth limit is an error naming the file, at any depth.
TEST(Safetensors, DeeplyNestedHeaderIsAnError) {
  for (int depth : {513, 10000, 1000000}) {
    const std::string header = "{\"a\": " + std::string(depth, '[') + std::string(depth, ']') + "}";
    EXPECT_EQ(parse_error(make_file(header, 0)).rfind("test.safetensors: safetensors header: JSON nests deeper", 0), 0u)
        << depth;
  }
}

TEST(Safetensors, WriteReadRoundTripAllDtypes) {
  auto dir = temp_dir("roundtrip");
  std::map<std::string, Tensor> tensors;
  Tensor f = Tensor::zeros({2, 3}, DType::f32);
  for (int i = 0; i < 6; ++i) f.data<float>()[i] = float(i) * 0.5f - 1.0f;
  tensors["a.f32"] = f;
  tensors["b.bf16"] = f.to_dtype(DType::bf16);
  Tensor ids = Tensor::zeros({4}, DType::i64);
  for (int i = 0; i < 4; ++i) ids.data<int64_t>()[i] = 1000 + i;
  tensors["c.i64"] = ids;
  write_safetensors((dir / "x.safetensors").string(), tensors, {{"format", "pt"}});
  auto r = SafetensorsReader::open((dir / "x.safetensors").string());
  EXPECT_EQ(r.names().size(), 3u);
  EXPECT_EQ(r.metadata().at("format"), "pt");
  EXPECT_EQ(std::memcmp(r.get("a.f32").raw(), f.raw(), f.nbytes()), 0);
  EXPECT_EQ(r.get("b.bf16").dtype(), DType::bf16);
  Tensor back = r.get("b.bf16").to_f32();
  EXPECT_EQ(std::memcmp(back.raw(), f.raw(), f.nbytes()), 0);  // these values are exact in bf16
  EXPECT_EQ(r.get("c.i64").data<int64_t>()[3], 1003);
  // Writing what was read gives the same bytes.
  std::map<std::string, Tensor> again;
  for (const auto& n : r.names()) again[n] = r.get(n);
  write_safetensors((dir / "y.safetensors").string(), again, {{"format", "pt"}});
  EXPECT_EQ(read_all(dir / "x.safetensors"), read_all(dir / "y.safetensors"));
  fs::remove_all(dir);
}

// A streamed write (one tensor's bytes at a time, from a pointer or the scratch buffer) is the
// file write_safetensors makes of the same tensors; a source that fills the scratch with the
// wrong size, and a name given twice, are refused naming the tensor.
TEST(Safetensors, StreamedWriteIsTheSameFile) {
  auto dir = temp_dir("streamed");
  std::map<std::string, Tensor> tensors;
  Tensor f = Tensor::zeros({3, 5}, DType::f32);
  for (int i = 0; i < 15; ++i) f.data<float>()[i] = float(i) * 0.25f - 2.0f;
  tensors["z.f32"] = f;
  tensors["m.bf16"] = f.to_dtype(DType::bf16);
  tensors["a.i64"] = Tensor::zeros({7}, DType::i64);
  tensors["a.i64"].data<int64_t>()[6] = -9;
  tensors["k.f32"] = Tensor::zeros({1}, DType::f32);
  write_safetensors((dir / "whole.safetensors").string(), tensors, {{"step", "3"}});
  // Entries in another order than the names'; odd ones come through the scratch buffer.
  std::vector<SafetensorsEntry> entries;
  std::vector<const Tensor*> data;
  for (auto it = tensors.rbegin(); it != tensors.rend(); ++it) {
    entries.push_back({it->first, it->second.dtype(), it->second.shape()});
    data.push_back(&it->second);
  }
  std::vector<size_t> asked;
  write_safetensors((dir / "streamed.safetensors").string(), entries,
                    [&](size_t i, std::vector<std::byte>& scratch) -> const void* {
                      asked.push_back(i);
                      if (i % 2 == 0) return data[i]->raw();
                      scratch.resize(data[i]->nbytes());
                      std::memcpy(scratch.data(), data[i]->raw(), scratch.size());
                      return scratch.data();
                    },
                    {{"step", "3"}});
  EXPECT_EQ(read_all(dir / "whole.safetensors"), read_all(dir / "streamed.safetensors"));
  EXPECT_EQ(asked.size(), entries.size());  // each tensor once
  const auto error_of = [&](const std::vector<SafetensorsEntry>& e, const SafetensorsSource& source) {
    try {
      write_safetensors((dir / "bad.safetensors").string(), e, source);
    } catch (const Error& err) {
      return std::string(err.what());
    }
    return std::string("no error");
  };
  const std::string short_fill = error_of(entries, [&](size_t i, std::vector<std::byte>& scratch) -> const void* {
    scratch.resize(data[i]->nbytes() - 1);
    return scratch.data();
  });
  EXPECT_NE(short_fill.find("came as"), std::string::npos) << short_fill;
  EXPECT_NE(short_fill.find("bad.safetensors"), std::string::npos) << short_fill;
  EXPECT_FALSE(fs::exists(dir / "bad.safetensors"));  // nothing left under the name
  std::vector<SafetensorsEntry> twice = {entries[0], entries[1], entries[0]};
  const std::string dup = error_of(twice, [&](size_t, std::vector<std::byte>&) -> const void* { return nullptr; });
  EXPECT_NE(dup.find("'" + entries[0].name + "' is named twice"), std::string::npos) << dup;
  fs::remove_all(dir);
}

// Tensors stored in another dtype (store_as), converted as they are written: the file write_safetensors
// makes of the converted tensors (f32 -> bf16 rounded; a tensor already in the dtype as is).
TEST(Safetensors, WriteAsConvertsEachTensorAsWritten) {
  auto dir = temp_dir("write_as");
  std::map<std::string, Tensor> tensors, converted;
  for (int k = 0; k < 3; ++k) {
    Tensor f = Tensor::zeros({4, int64_t(3 + k)}, DType::f32);
    for (int64_t i = 0; i < f.numel(); ++i) f.data<float>()[i] = 1.0f / float(i + 3 + k) - 0.3f;
    tensors["t" + std::to_string(k)] = f;
    converted["t" + std::to_string(k)] = f.to_dtype(DType::bf16);
  }
  tensors["already"] = converted["already"] = converted["t0"].clone();
  write_safetensors((dir / "as.safetensors").string(), tensors, {{"format", "pt"}}, DType::bf16);
  write_safetensors((dir / "converted.safetensors").string(), converted, {{"format", "pt"}});
  EXPECT_EQ(read_all(dir / "as.safetensors"), read_all(dir / "converted.safetensors"));
  EXPECT_EQ(SafetensorsReader::open((dir / "as.safetensors").string()).get("t1").dtype(), DType::bf16);
  fs::remove_all(dir);
}

TEST(Safetensors, ShardedIndexIsFollowed) {
  auto dir = temp_dir("sharded");
  Tensor a = Tensor::zeros({3}, DType::f32), b = Tensor::zeros({2}, DType::f32);
  a.data<float>()[1] = 7.0f;
  b.data<float>()[0] = -2.0f;
  write_safetensors((dir / "model-00001-of-00002.safetensors").string(), {{"a", a}});
  write_safetensors((dir / "model-00002-of-00002.safetensors").string(), {{"b", b}});
  std::ofstream(dir / "model.safetensors.index.json")
      << R"({"metadata":{},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}})";
  auto r = SafetensorsReader::open(dir.string());
  EXPECT_EQ(r.get("a").data<float>()[1], 7.0f);
  EXPECT_EQ(r.get("b").data<float>()[0], -2.0f);
  // An index that names a tensor its file does not hold.
  std::ofstream(dir / "model.safetensors.index.json")
      << R"({"weight_map":{"a":"model-00001-of-00002.safetensors","zz":"model-00002-of-00002.safetensors"}})";
  try {
    SafetensorsReader::open(dir.string());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("zz"), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
}

TEST(Safetensors, DamagedFilesGiveClearErrors) {
  EXPECT_NE(parse_error("abc").find("truncated"), std::string::npos);
  std::string ok_header = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  EXPECT_EQ(parse_error(make_file(ok_header, 8)), "");
  EXPECT_NE(parse_error(make_file(ok_header, 4)).find("past the end"), std::string::npos);
  EXPECT_NE(parse_error(make_file(ok_header, 8).substr(0, 20)).find("past the end"), std::string::npos);
  EXPECT_NE(parse_error(make_file(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8)).find("need 12"),
            std::string::npos);
  EXPECT_NE(parse_error(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                  R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                  12))
                .find("overlapping"),
            std::string::npos);
  // An empty tensor between two overlapping ones must not hide the overlap.
  EXPECT_NE(parse_error(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                  R"("e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},)"
                                  R"("b":{"dtype":"F32","shape":[2],"data_offsets":[6,14]}})",
                                  14))
                .find("tensors 'a' and 'b' have overlapping"),
            std::string::npos);
  // Empty tensors anywhere, even at another tensor's offsets, are fine.
  EXPECT_EQ(parse_error(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                  R"("e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},)"
                                  R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                                  16)),
            "");
  EXPECT_NE(parse_error(make_file(R"({"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", 8)).find("dtype"),
            std::string::npos);
  EXPECT_NE(parse_error(make_file("{not json", 0)).find("not valid JSON"), std::string::npos);
  EXPECT_NE(parse_error(make_file(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8)).find("shape"),
            std::string::npos);
}

TEST(Safetensors, WrongShapeAndMissingTensorAreNamed) {
  std::string file = make_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8);
  auto r = SafetensorsReader::from_bytes(bytes_of(file), file.size(), "m.safetensors");
  try {
    r.get_f32("w", {3});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'w' has shape [2], expected [3]"), std::string::npos) << e.what();
  }
  try {
    r.get("v");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("missing tensor 'v'"), std::string::npos) << e.what();
  }
}

// Mutation fuzz: flip, insert and delete bytes of a valid file (header and length field);
// the parser must either accept the file or throw lockstep::Error, never crash or read out
// of bounds (CI runs this under AddressSanitizer).
TEST(Safetensors, MutationFuzzNeverCrashes) {
  std::string base = make_file(
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]},)"
      R"("b":{"dtype":"F32","shape":[3],"data_offsets":[8,20]}})",
      20);
  int accepted = 0, rejected = 0;
  for (uint64_t iter = 0; iter < 3000; ++iter) {
    std::string f = base;
    int mutations = 1 + int(philox_uniform(99, iter, 0) * 4);
    for (int m = 0; m < mutations; ++m) {
      float kind = philox_uniform(99, iter, 1 + m * 3);
      size_t pos = size_t(philox_uniform(99, iter, 2 + m * 3) * float(f.size()));
      char byte = char(int(philox_uniform(99, iter, 3 + m * 3) * 256));
      if (f.empty()) break;
      pos = std::min(pos, f.size() - 1);
      if (kind < 0.5f) f[pos] = byte;
      else if (kind < 0.7f) f.insert(f.begin() + pos, byte);
      else if (kind < 0.9f) f.erase(f.begin() + pos);
      else f.resize(pos);
    }
    try {
      auto r = SafetensorsReader::from_bytes(bytes_of(f), f.size(), "fuzz");
      for (const auto& n : r.names()) {
        const Tensor& t = r.get(n);
        volatile uint8_t sink = 0;
        for (size_t i = 0; i < t.nbytes(); ++i) sink = sink ^ static_cast<const uint8_t*>(t.raw())[i];
      }
      ++accepted;
    } catch (const Error&) {
      ++rejected;
    }
  }
  EXPECT_GT(rejected, 100);
  EXPECT_GT(accepted, 0);
}

}  // namespace
}  // namespace lockstep
