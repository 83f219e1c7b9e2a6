// lockstep generate end to end: per-request errors beside normally served requests (bit for
// bit as in the engine alone), the exit status, and the log-probs against lockstep score.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/philox.h"
#include "rollout_test_helpers.h"

namespace lockstep::testing {
namespace {

std::string temp_path(const std::string& name) { return ::testing::TempDir() + "lockstep_rollout_" + name; }

void write_file(const std::string& path, const std::vector<std::string>& lines) {
  std::ofstream f(path);
  for (const auto& l : lines) f << l << "\n";
}

std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream f(path);
  std::vector<std::string> out;
  for (std::string l; std::getline(f, l);) out.push_back(l);
  return out;
}

int run(const std::string& args) {
  std::string cmd = std::string(LOCKSTEP_BINARY) + " " + args + " 2>/dev/null";
  int status = std::system(cmd.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// The floats of `"key":[...]` parsed with strtof from the printed text (exact round trip).
std::vector<float> floats_of(const std::string& line, const std::string& key) {
  size_t at = line.find("\"" + key + "\":[");
  EXPECT_NE(at, std::string::npos) << line;
  std::vector<float> out;
  const char* p = line.c_str() + at + key.size() + 4;
  while (*p && *p != ']') {
    char* end;
    out.push_back(std::strtof(p, &end));
    p = *end == ',' ? end + 1 : end;
  }
  return out;
}

std::string request_line(const GenerationRequest& r, bool with_seed = true) {
  nlohmann::json j;
  j["input_ids"] = r.prompt;
  if (with_seed) j["seed"] = r.sampling.seed;
  j["max_new_tokens"] = r.max_new_tokens;
  j["temperature"] = r.sampling.temperature;
  j["top_p"] = r.sampling.top_p;
  j["top_k"] = r.sampling.top_k;
  return j.dump();
}

TEST(CliGenerate, BadLinesGetErrorsAndGoodLinesMatchTheEngineBitForBit) {
  auto good = mixed_requests();
  good.resize(4);
  for (Precision precision : {Precision::float32, Precision::bfloat16}) {
    const std::string dtype = precision_name(precision);
    std::vector<std::string> lines = {
        request_line(good[0]),
        "{\"input_ids\":[]}",
        request_line(good[1]),
        "",  // a 600-token prompt, filled in below
        "{\"input_ids\":[1,2,512]}",
        request_line(good[2]),
        "{\"input_ids\":[1,2,3],\"top_p\":0}",
        "{\"input_ids\":[1,2,3],\"temperature\":-1}",
        "{\"input_ids\":[1,2,3],\"top_k\":-1}",
        request_line(good[3]),
        "{\"input_ids\":[7,8,9]}",  // seed from --seed and the line number
    };
    std::string long_prompt = "{\"input_ids\":[1";
    for (int i = 1; i < 600; ++i) long_prompt += ",1";
    lines[3] = long_prompt + "]}";
    const std::string in = temp_path("in_" + dtype + ".jsonl"), out = temp_path("out_" + dtype + ".jsonl");
    write_file(in, lines);
    int rc = run("generate --model " + fixture_model_dir() + " --input " + in + " --output " + out +
                 " --max-new-tokens 6 --seed 77 --dtype " + dtype + " --max-batch-tokens 40 --prefill-chunk 16");
    EXPECT_EQ(rc, 1);
    auto got = read_lines(out);
    ASSERT_EQ(got.size(), lines.size());
    const std::vector<std::pair<int, std::string>> errors = {{2, "empty"},
                                                            {4, "max_position_embeddings"},
                                                            {5, "input_ids[2] = 512"},
                                                            {7, "top_p"},
                                                            {8, "temperature"},
                                                            {9, "top_k"}};
    for (const auto& [line, word] : errors) {
      auto j = nlohmann::json::parse(got[line - 1]);
      ASSERT_TRUE(j.contains("error")) << got[line - 1];
      std::string message = j["error"];
      EXPECT_NE(message.find(":" + std::to_string(line) + ":"), std::string::npos) << message;
      EXPECT_NE(message.find(word), std::string::npos) << message;
    }
    const std::vector<std::pair<int, GenerationRequest>> served = {
        {1, good[0]}, {3, good[1]}, {6, good[2]}, {10, good[3]},
        {11, make_request({7, 8, 9}, 1.0f, 0, 1.0f, mix_seed(77, 11), 6)}};
    for (const auto& [line, request] : served) {
      const std::string& text = got[line - 1];
      auto j = nlohmann::json::parse(text);
      auto want = run_alone(precision, request);
      EXPECT_EQ(j["output_ids"].get<std::vector<int32_t>>(), want.output_ids) << dtype << " line " << line;
      EXPECT_TRUE(same_bits(floats_of(text, "logprobs"), want.logprobs)) << dtype << " line " << line;
      EXPECT_EQ(j["weight_version"], 0);
      EXPECT_EQ(j["finish_reason"], rollout::finish_reason_name(want.finish_reason));
    }
  }
}

TEST(CliGenerate, AllGoodExitsZeroAndLogprobsEqualLockstepScore) {
  auto request = mixed_requests()[4];  // 130-token prompt, top-k + top-p at T = 1
  const std::string in = temp_path("score_gen_in.jsonl"), out = temp_path("score_gen_out.jsonl");
  write_file(in, {request_line(request)});
  ASSERT_EQ(run("generate --model " + fixture_model_dir() + " --input " + in + " --output " + out +
                " --max-new-tokens 8"),
            0);
  auto gen = read_lines(out);
  ASSERT_EQ(gen.size(), 1u);
  auto ids = nlohmann::json::parse(gen[0])["output_ids"].get<std::vector<int32_t>>();
  auto gen_logprobs = floats_of(gen[0], "logprobs");
  const std::string score_in = temp_path("score_in.jsonl"), score_out = temp_path("score_out.jsonl");
  write_file(score_in, {nlohmann::json{{"input_ids", concat(request.prompt, ids)}}.dump()});
  ASSERT_EQ(run("score --model " + fixture_model_dir() + " --input " + score_in + " --output " + score_out), 0);
  auto scored = floats_of(read_lines(score_out).at(0), "logprobs");
  ASSERT_EQ(scored.size(), request.prompt.size() + ids.size() - 1);
  std::vector<float> tail(scored.end() - ids.size(), scored.end());
  EXPECT_TRUE(same_bits(tail, gen_logprobs));
}

}  // namespace
}  // namespace lockstep::testing
