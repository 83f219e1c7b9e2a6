// Writes that fail or would destroy something: an output that is the input (through "./",
// "dir/..", a symlink or a hard link), a special file in the output's place, an output into
// the input model, and a full disk. Each is refused with a non-zero exit and the input (or
// whatever was at the output path) is left exactly as it was.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>

#include "../error_of.h"
#include "core/atomic_file.h"
#include "run_command.h"

namespace lockstep {
namespace {

namespace fs = std::filesystem;
using testing::error_of;
using testing::run_shell;

const std::string kModel = std::string(LOCKSTEP_FIXTURES) + "/hf-tiny-qwen3-moe";
const std::string kTokenizer = std::string(LOCKSTEP_FIXTURES) + "/qwen3-tokenizer";

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

class OutputSafety : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("lockstep_output_safety_" + std::to_string(::getpid()));
    fs::create_directories(dir_ / "sub");
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string at(const std::string& name) const { return (dir_ / name).string(); }
  // `lockstep <args>` run in the temporary directory, bounded in time.
  testing::CommandResult lockstep(const std::string& args) const {
    return run_shell("cd '" + dir_.string() + "' && timeout 20 " + LOCKSTEP_BINARY + " " + args);
  }
  fs::path dir_;
};

// Every JSONL command, with its input named five ways as its output.
TEST_F(OutputSafety, AnOutputThatIsTheInputIsRefused) {
  const std::string commands[] = {"score --model " + kModel, "generate --model " + kModel + " --max-new-tokens 1",
                                  "tokenize --model " + kTokenizer + " --decode", "reward --rm-type math"};
  const std::string input = "{\"input_ids\": [1, 2], \"response\": \"1\", \"label\": \"1\"}\n";
  std::ofstream(at("in.jsonl")) << input;
  fs::create_symlink(at("in.jsonl"), at("link.jsonl"));
  fs::create_hard_link(at("in.jsonl"), at("hard.jsonl"));
  for (const auto& command : commands) {
    for (const char* output : {"in.jsonl", "./in.jsonl", "sub/../in.jsonl", "link.jsonl", "hard.jsonl"}) {
      const auto r = lockstep(command + " --input in.jsonl --output " + output);
      EXPECT_EQ(r.status, 1) << command << " > " << output << ": " << r.output;
      EXPECT_NE(r.output.find("is the same file as the input"), std::string::npos) << r.output;
      EXPECT_EQ(read_all(at("in.jsonl")), input) << command << " > " << output;
    }
  }
}

// A symlink, FIFO or directory in the output's place is refused at once and left as it was.
TEST_F(OutputSafety, SpecialFilesAreNeverReplaced) {
  std::ofstream(at("in.jsonl")) << "{\"input_ids\": [1, 2]}\n";
  std::ofstream(at("target.txt")) << "keep";
  fs::create_symlink(at("target.txt"), at("link.jsonl"));
  ASSERT_EQ(::mkfifo(at("fifo.jsonl").c_str(), 0600), 0);
  for (const char* output : {"link.jsonl", "fifo.jsonl", "sub"}) {
    const auto r = lockstep("score --model " + kModel + " --input in.jsonl --output " + output);
    EXPECT_EQ(r.status, 1) << output << ": " << r.output;
    EXPECT_NE(r.output.find("an output is written only over a regular file"), std::string::npos) << r.output;
  }
  EXPECT_TRUE(fs::is_symlink(at("link.jsonl")));
  EXPECT_EQ(read_all(at("target.txt")), "keep");
  EXPECT_TRUE(fs::is_fifo(at("fifo.jsonl")));
  // A regular file is replaced whole.
  std::ofstream(at("out.jsonl")) << "old";
  EXPECT_EQ(lockstep("score --model " + kModel + " --input in.jsonl --output out.jsonl").status, 0);
  EXPECT_EQ(read_all(at("out.jsonl")).rfind("{\"logprobs\":[", 0), 0u);
}

// convert, audit and grad never write into (or around) their own input model.
TEST_F(OutputSafety, NothingIsWrittenIntoTheInputModel) {
  fs::copy(kModel, at("model"));
  const std::string before = read_all(at("model/model.safetensors"));
  std::ofstream(at("in.jsonl")) << "{\"input_ids\": [1, 2]}\n";
  for (const std::string args :
       {"convert --input model --output model", "convert --input model --output ./model/sharded",
        "convert --input model --output .", "audit --model model --output model/audit.txt",
        "audit --model model --output model/../model/config.json",
        "grad --model model --input in.jsonl --output model/model.safetensors"}) {
    const auto r = lockstep(args);
    EXPECT_EQ(r.status, 1) << args << ": " << r.output;
    EXPECT_NE(r.output.find("an output is never written into its own input"), std::string::npos) << r.output;
  }
  EXPECT_EQ(read_all(at("model/model.safetensors")), before);
  EXPECT_FALSE(fs::exists(at("model/audit.txt")));
  EXPECT_FALSE(fs::exists(at("model/sharded")));
}

// A full disk (stdout on /dev/full) is a non-zero exit naming the failed write.
TEST_F(OutputSafety, AFailedWriteIsAnError) {
  std::ofstream(at("in.jsonl")) << "{\"input_ids\": [1, 2], \"text\": \"a\"}\n";
  for (const std::string& args : {"score --model " + kModel + " --input in.jsonl", "audit --model " + kModel,
                                 "tokenize --model " + kTokenizer + " --input in.jsonl"}) {
    // The subshell keeps stderr on the pipe while stdout goes to the full device.
    const auto r =
        run_shell("cd '" + dir_.string() + "' && (timeout 20 " + LOCKSTEP_BINARY + " " + args + " > /dev/full)");
    EXPECT_EQ(r.status, 1) << args << ": " << r.output;
    EXPECT_NE(r.output.find("write failed"), std::string::npos) << args << ": " << r.output;
  }
}

TEST_F(OutputSafety, AnUncommittedFileLeavesTheTargetUntouched) {
  std::ofstream(at("out.txt")) << "old";
  {
    AtomicFile f(at("out.txt"));
    f.write("new but abandoned");
  }
  EXPECT_EQ(read_all(at("out.txt")), "old");
  EXPECT_FALSE(fs::exists(at("out.txt.tmp")));
  AtomicFile f(at("out.txt"));
  f.write("new");
  f.commit();
  EXPECT_EQ(read_all(at("out.txt")), "new");
  EXPECT_NE(error_of([&] { f.commit(); }), "");
}

}  // namespace
}  // namespace lockstep
