// `lockstep grad` end to end on the fixture: seq0 and seq2 in, loss and gradients out,
// compared with the Hugging Face float64 reference; bad input fails with a clear message.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "../model/test_helpers.h"
#include "core/jsonl.h"

namespace lockstep {
namespace {

using testing::fixture_model_dir;
using testing::golden;
using testing::golden_ids;

std::string temp_path(const std::string& name) { return ::testing::TempDir() + "lockstep_grad_cli_" + name; }

void write_file(const std::string& path, const std::string& text) {
  std::ofstream f(path);
  f << text;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// Runs `lockstep grad` and returns the exit status; stderr goes to `err`.
int run_grad(const std::string& input, const std::string& output, const std::string& err,
             const std::string& extra = "") {
  std::string cmd = std::string(LOCKSTEP_BINARY) + " grad --model " + fixture_model_dir() + " --input " + input +
                    " --output " + output + " " + extra + " 2> " + err;
  int status = std::system(cmd.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(GradCli, MatchesHfGradients) {
  std::string input = temp_path("in.jsonl"), output = temp_path("out.safetensors"), err = temp_path("err.txt");
  write_file(input, "{\"input_ids\":" + format_ints(golden_ids("seq0.input_ids")) +
                        "}\n{\"input_ids\":" + format_ints(golden_ids("seq2.input_ids")) + "}\n");
  ASSERT_EQ(run_grad(input, output, err), 0) << read_file(err);
  SafetensorsReader out = SafetensorsReader::open(output);
  const Tensor& loss = out.get("loss");
  EXPECT_EQ(loss.ndim(), 0);
  EXPECT_EQ(loss.dtype(), DType::f32);
  double ref_loss = golden().get("grad_loss").data<double>()[0];
  EXPECT_NEAR(loss.data<float>()[0], ref_loss, 1e-5 * std::abs(ref_loss));
  int tensors = 0;
  double worst = 0;
  for (const auto& name : golden().names()) {
    if (name.rfind("grad.", 0) != 0) continue;
    ++tensors;
    ASSERT_TRUE(out.contains(name)) << name;
    const Tensor& g = out.get(name);
    const Tensor& ref = golden().get(name);
    ASSERT_EQ(g.dtype(), DType::f32) << name;
    ASSERT_EQ(g.shape(), ref.shape()) << name;
    double diff = 0, scale = 0;
    for (int64_t i = 0; i < ref.numel(); ++i) {
      diff = std::max(diff, std::abs(double(g.data<float>()[i]) - ref.data<double>()[i]));
      scale = std::max(scale, std::abs(ref.data<double>()[i]));
    }
    EXPECT_LE(diff, 1e-4 * scale + 1e-7) << name;
    worst = std::max(worst, diff / (scale + 1e-30));
  }
  EXPECT_GT(tensors, 0);
  EXPECT_EQ(int(out.names().size()), tensors + 1);  // loss + every parameter, nothing else
  std::printf("lockstep grad: %d gradients, worst relative error %.3g\n", tensors, worst);
}

void expect_failure(const std::string& name, const std::string& input_text, const std::string& expected_message,
                    const std::string& extra = "") {
  std::string input = temp_path(name + ".jsonl"), output = temp_path(name + ".safetensors"),
              err = temp_path(name + ".err");
  write_file(input, input_text);
  EXPECT_NE(run_grad(input, output, err, extra), 0) << name;
  std::string message = read_file(err);
  EXPECT_NE(message.find(expected_message), std::string::npos) << name << ": stderr was: " << message;
}

TEST(GradCli, BadInputFailsClearly) {
  expect_failure("short", "{\"input_ids\":[1,2,3]}\n{\"input_ids\":[7]}\n", "at least 2");
  expect_failure("vocab", "{\"input_ids\":[1,2,100000]}\n", "100000");
  expect_failure("missing", "{\"tokens\":[1,2]}\n", "input_ids");
  expect_failure("empty", "", "no sequences");
  expect_failure("dtype", "{\"input_ids\":[1,2,3]}\n", "float16", "--dtype float16");
  // The GPU trainer runs the bfloat16 recipe on one GPU: other requests are refused first.
  expect_failure("cuda_dtype", "{\"input_ids\":[1,2,3]}\n", "bfloat16 recipe only", "--device cuda");
  expect_failure("cuda_topology", "{\"input_ids\":[1,2,3]}\n", "one GPU",
                 "--device cuda --dtype bfloat16 --tensor-model-parallel-size 2");
  expect_failure("device", "{\"input_ids\":[1,2,3]}\n", "cpu", "--device tpu");
  expect_failure("recompute_cpu", "{\"input_ids\":[1,2,3]}\n", "the flag is for --device cuda",
                 "--recompute-num-layers 1");
  expect_failure("recompute_range", "{\"input_ids\":[1,2,3]}\n",
                 "expected -1 (as few as the memory allows) or a count >= 0, got -3", "--recompute-num-layers -3");
}

}  // namespace
}  // namespace lockstep
