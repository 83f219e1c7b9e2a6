// Helpers for the prompt-data tests: a tiny random Qwen3-MoE whose vocabulary covers the real
// Qwen3 tokenizer (the fixture's), saved as a Hugging Face directory with the tokenizer files.
#pragma once
#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "checkpoint/safetensors.h"
#include "model/weights.h"
#include "rl/tiny_model.h"
#include "tokenizer/tokenizer.h"

namespace lockstep::rl::testing {

inline std::string fixture_tokenizer_dir() { return std::string(LOCKSTEP_FIXTURES) + "/qwen3-tokenizer"; }

// Writes DIR/config.json, model.safetensors, tokenizer.json and tokenizer_config.json (once per
// directory: later calls reuse it).
inline std::string make_text_model_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  if (fs::exists(fs::path(dir) / "model.safetensors")) return dir;
  fs::create_directories(dir);
  const Tokenizer tok = Tokenizer::load(fixture_tokenizer_dir());
  ModelConfig c = tiny_task_model_config();
  c.vocab_size = tok.vocab_size();
  c.hidden_size = 16;  // the 151k-row embedding and lm_head dominate the time
  c.max_position_embeddings = 512;
  c.eos_token_ids = {*tok.token_id("<|im_end|>")};
  ModelWeights w = ModelWeights::random(c, 11, Precision::float32);
  std::map<std::string, Tensor> tensors;
  for (const auto& [name, t] : w.named()) tensors[name] = *t;
  write_safetensors((fs::path(dir) / "model.safetensors").string(), tensors, {{"format", "pt"}});
  std::ofstream(fs::path(dir) / "config.json") << c.to_json().dump(2) << "\n";
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
    fs::copy_file(fs::path(fixture_tokenizer_dir()) / f, fs::path(dir) / f, fs::copy_options::overwrite_existing);
  return dir;
}

}  // namespace lockstep::rl::testing
