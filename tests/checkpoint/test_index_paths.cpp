// Paths read from checkpoint indexes: every entry must name a regular file inside the
// checkpoint directory; anything else (absolute, "..", a directory, a FIFO) is an error
// naming the index, and never a hang.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "../error_of.h"
#include "checkpoint/index_path.h"
#include "checkpoint/safetensors.h"
#include "checkpoint/sharded.h"
#include "core/error.h"

namespace lockstep {
namespace {

namespace fs = std::filesystem;

const char* const kOutsideNames[] = {
    "/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors", "..", ".", "./a.safetensors", "", "sub/"};

using testing::error_of;

class IndexPaths : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() / ("lockstep_index_paths_" + std::to_string(::getpid()));
    dir_ = root_ / "model";
    fs::create_directories(dir_ / "sub");
    write_safetensors((root_ / "outside.safetensors").string(), {{"a", Tensor::zeros({2}, DType::f32)}});
    write_safetensors((dir_ / "a.safetensors").string(), {{"a", Tensor::zeros({2}, DType::f32)}});
  }
  void TearDown() override { fs::remove_all(root_); }
  void write_hf_index(const std::string& file) {
    std::ofstream(dir_ / "model.safetensors.index.json") << nlohmann::json{{"weight_map", {{"a", file}}}}.dump();
  }
  fs::path root_, dir_;
};

TEST_F(IndexPaths, OnlyPlainRelativeNamesResolve) {
  EXPECT_EQ(file_in_checkpoint("m", "a.safetensors", "idx"), "m/a.safetensors");
  EXPECT_EQ(file_in_checkpoint("m", "sub/b.safetensors", "idx"), "m/sub/b.safetensors");
  for (const char* name : kOutsideNames)
    EXPECT_EQ(error_of([&] { file_in_checkpoint("m", name, "idx"); }).rfind("idx: file name '", 0), 0u) << name;
}

TEST_F(IndexPaths, HfWeightMapStaysInsideTheModel) {
  write_hf_index("a.safetensors");
  EXPECT_EQ(SafetensorsReader::open(dir_.string()).names().size(), 1u);
  for (const char* name : kOutsideNames) {
    write_hf_index(name);
    const std::string err = error_of([&] { SafetensorsReader::open(dir_.string()); });
    EXPECT_NE(err.find("model.safetensors.index.json: weight_map: file name '"), std::string::npos) << name << err;
  }
  write_hf_index("sub");  // a directory inside the model
  EXPECT_NE(error_of([&] { SafetensorsReader::open(dir_.string()); }).find("not a regular file"), std::string::npos);
}

TEST_F(IndexPaths, ShardedFilesStayInsideTheCheckpoint) {
  for (const char* name : kOutsideNames) {
    std::ofstream(dir_ / kShardedIndexFile) << nlohmann::json{
        {"format", kShardedFormat},
        {"topology", "tp1"},
        {"pipeline_layer_split", nlohmann::json::array()},
        {"tensors", nlohmann::json::object()},
        {"files", nlohmann::json::array({name})}}.dump();
    const std::string err = error_of([&] { open_checkpoint(dir_.string()); });
    EXPECT_NE(err.find(std::string(kShardedIndexFile) + ": files: file name '"), std::string::npos) << name << err;
  }
}

// A FIFO named by the index (or given directly) is refused at once; it used to block in
// open() forever. The read runs in a child that an alarm ends, so a regression fails, not hangs.
TEST_F(IndexPaths, FifoIsRefusedWithoutBlocking) {
  ASSERT_EQ(::mkfifo((dir_ / "pipe.safetensors").c_str(), 0600), 0);
  fs::create_symlink(dir_ / "pipe.safetensors", dir_ / "link.safetensors");
  for (const char* target : {"pipe.safetensors", "link.safetensors"}) {
    write_hf_index(target);
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      ::alarm(10);
      const std::string err = error_of([&] { SafetensorsReader::open(dir_.string()); });
      ::_exit(err.find("not a regular file") != std::string::npos ? 0 : 1);
    }
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << target << " status " << status;
  }
}

}  // namespace
}  // namespace lockstep
