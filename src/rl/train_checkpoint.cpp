#include "rl/train_checkpoint.h"

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include <nlohmann/json.hpp>

#include "checkpoint/safetensors.h"
#include "core/error.h"
#include "core/json_parse.h"
#include "core/text_file.h"

namespace lockstep::rl {

namespace fs = std::filesystem;

std::string checkpoint_dir(const std::string& save_dir, int64_t step) {
  char name[32];
  std::snprintf(name, sizeof name, "iter_%07lld", static_cast<long long>(step));
  return (fs::path(save_dir) / name).string();
}

namespace {

void write_text(const fs::path& path, const std::string& text) { write_text_file(path.string(), text); }

// The model's tensors by global name, converted one at a time as they are written. The
// bfloat16 recipe's values are bf16 numbers: stored as BF16 (exact).
void write_weights(const fs::path& path, const ModelWeights& w, Precision precision) {
  std::map<std::string, Tensor> tensors;
  for (const auto& [name, t] : w.named()) tensors[name] = *t;  // views of the model's storage
  write_safetensors(path.string(), tensors, {{"format", "pt"}},
                    precision == Precision::bfloat16 ? DType::bf16 : DType::f32);
}

}  // namespace

void save_train_checkpoint(const std::string& save_dir, const TrainerState& state, const ModelWeights& model,
                           Precision precision, const std::function<void(const std::string& path)>& write_optimizer,
                           const ModelWeights* ref, const std::string& config_toml) {
  const fs::path final_dir = checkpoint_dir(save_dir, state.step);
  const fs::path tmp = final_dir.string() + ".tmp";
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  write_weights(tmp / "model.safetensors", model, precision);
  write_text(tmp / "config.json", model.config.to_json().dump(2) + "\n");
  write_optimizer((tmp / "optimizer.safetensors").string());
  if (ref) write_weights(tmp / "ref_model.safetensors", *ref, precision);
  nlohmann::json s = {{"step", state.step},
                      {"sft_steps_done", state.sft_steps_done},
                      {"data_position", state.data_position},
                      {"weight_version", state.weight_version},
                      {"seed", state.seed},
                      {"precision", precision_name(precision)}};
  write_text(tmp / "trainer_state.json", s.dump(2) + "\n");
  write_text(tmp / "train_config.toml", config_toml);
  fs::remove_all(final_dir);
  fs::rename(tmp, final_dir);
  const fs::path latest = fs::path(save_dir) / "latest_checkpointed_iteration.txt";
  write_text(latest.string() + ".tmp", std::to_string(state.step) + "\n");
  fs::rename(latest.string() + ".tmp", latest);
}

std::string latest_train_checkpoint(const std::string& save_dir) {
  const fs::path latest = fs::path(save_dir) / "latest_checkpointed_iteration.txt";
  if (!fs::exists(latest)) return "";
  std::ifstream f(latest);
  long long step = -1;
  f >> step;
  LS_CHECK(f && step >= 0, latest.string(), ": expected a step number");
  std::string dir = checkpoint_dir(save_dir, step);
  LS_CHECK(fs::is_directory(dir), latest.string(), " names step ", step, " but ", dir, " does not exist");
  return dir;
}

std::string prepare_save_dir(const std::string& save_dir, bool resume, bool overwrite, bool writer) {
  if (save_dir.empty()) return "";
  const fs::path dir(save_dir);
  if (resume) {
    const std::string from = latest_train_checkpoint(save_dir);
    LS_CHECK(!from.empty(), "--resume: no checkpoint in ", save_dir, " (expected latest_checkpointed_iteration.txt)");
    return from;
  }
  std::vector<fs::path> run_files;
  if (fs::is_directory(dir))
    for (const auto& e : fs::directory_iterator(dir)) {
      const std::string name = e.path().filename().string();
      if (name.rfind("iter_", 0) == 0 || name.rfind("latest_checkpointed_iteration.txt", 0) == 0)
        run_files.push_back(e.path());
    }
  LS_CHECK(run_files.empty() || overwrite, "--save ", save_dir, " already holds a run (",
           run_files.front().filename().string(),
           "): continue it with --resume, replace it with --overwrite-save, "
           "or choose another directory");
  if (!writer) return "";
  for (const auto& p : run_files) fs::remove_all(p);
  std::error_code ec;
  fs::create_directories(dir, ec);
  LS_CHECK(!ec, "--save ", save_dir, ": cannot create the directory (", ec.message(), ")");
  // Proven writable now rather than at the first checkpoint, after hours of training.
  const std::string probe = (dir / (".write_test." + std::to_string(::getpid()))).string();
  try {
    write_text_file(probe, "");
  } catch (const Error& e) {
    fail("--save ", save_dir, ": not writable (", e.what(), ")");
  }
  fs::remove(probe);
  return "";
}

namespace {

// "key = value" lines of a run config as to_toml writes it (one flat table).
std::map<std::string, std::string> config_values(const std::string& toml) {
  std::map<std::string, std::string> out;
  std::istringstream in(toml);
  for (std::string line; std::getline(in, line);) {
    const size_t eq = line.find(" = ");
    if (eq != std::string::npos) out[line.substr(0, eq)] = line.substr(eq + 3);
  }
  return out;
}

}  // namespace

void check_same_run(const std::string& checkpoint, const std::string& config_toml) {
  const fs::path path = fs::path(checkpoint) / "train_config.toml";
  std::ifstream in(path);
  LS_CHECK(in, path.string(), ": not found (the run-defining options of the checkpoint)");
  const auto saved = config_values(std::string(std::istreambuf_iterator<char>(in), {}));
  // Both sides are written by to_toml, so equal text is an equal value. Keys in name order;
  // a key the checkpoint lacks was added to lockstep after it was written and is not compared.
  for (const auto& [key, value] : config_values(config_toml)) {
    const auto it = saved.find(key);
    LS_CHECK(it == saved.end() || it->second == value, "--resume: --", key, " differs from the run being resumed (",
             path.string(), " has ", it->second, ", this run has ", value, "); a resumed run must be the same run");
  }
}

TrainerState load_trainer_state(const std::string& checkpoint) {
  const fs::path p = fs::path(checkpoint) / "trainer_state.json";
  LS_CHECK(fs::exists(p), p.string(), ": not found");
  const nlohmann::json j = read_json_file(p.string());
  try {
    TrainerState s;
    s.step = j.at("step").get<int64_t>();
    s.sft_steps_done = j.at("sft_steps_done").get<int64_t>();
    s.data_position = j.at("data_position").get<int64_t>();
    s.weight_version = j.at("weight_version").get<int64_t>();
    s.seed = j.at("seed").get<uint64_t>();
    return s;
  } catch (const nlohmann::json::exception& e) {
    fail(p.string(), ": bad trainer state: ", e.what());
  }
}

void load_checkpoint_weights(const std::string& file, ModelWeights& weights, Precision precision) {
  SafetensorsReader r = SafetensorsReader::open(file);
  for (auto& [name, t] : weights.named()) {
    Tensor loaded = r.get_f32(name, t->shape());
    std::memcpy(t->raw(), loaded.raw(), t->nbytes());
  }
}

}  // namespace lockstep::rl
