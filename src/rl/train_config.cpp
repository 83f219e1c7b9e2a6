#include "rl/train_config.h"

#include <toml++/toml.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <sstream>

#include "core/error.h"
#include "kernels/canonical.h"
#include "rl/environment.h"
#include "rl/prompt_source.h"
#include "rollout/request.h"
#include "train/advantages.h"
#include "train/losses.h"
#include "train/optimizer.h"
#include "train/train_memory.h"

namespace lockstep::rl {

#define LS_OPT(name, field, help) \
  TrainOption { name, &TrainConfig::field, help }

const std::vector<TrainOption>& train_options() {
  static const std::vector<TrainOption> options = {
      LS_OPT("seed", seed, "seed of data, sampling and everything random"),
      LS_OPT("dtype", dtype, "precision recipe: float32 | bfloat16"),
      LS_OPT("device", device, "cpu | cuda (the engine and the trainer on one GPU sharing the weights; bfloat16)"),
      LS_OPT("num-threads", num_threads, "CPU threads (0 = LOCKSTEP_NUM_THREADS or all cores)"),
      LS_OPT("load", load, "Hugging Face model directory (default: the embedded tiny Qwen3-MoE)"),
      LS_OPT("ref-load", ref_load, "KL reference model directory (default: the policy when RL starts)"),
      LS_OPT("model-seed", model_seed, "random init seed of the embedded tiny model"),
      LS_OPT("init-config", init_config, "random-init a Qwen3-MoE from this config.json (--model-seed) instead"),
      LS_OPT("task", task, "built-in task: reverse | sort | add"),
      LS_OPT("task-digits", task_digits, "digits per operand of the task"),
      LS_OPT("prompt-data", prompt_data, "JSONL (or .jsonl.gz) prompt data set instead of --task"),
      LS_OPT("input-key", input_key, "prompt key of --prompt-data (a string or a list of chat messages)"),
      LS_OPT("label-key", label_key, "answer key of --prompt-data (a string or a number)"),
      LS_OPT("metadata-key", metadata_key, "metadata key of --prompt-data, passed to reward models (optional)"),
      LS_OPT("apply-chat-template", apply_chat_template, "render prompts with the tokenizer's Qwen3 chat template"),
      LS_OPT("enable-thinking", enable_thinking, "chat template thinking mode (a line's enable_thinking overrides)"),
      LS_OPT("rollout-shuffle", rollout_shuffle, "shuffle --prompt-data each epoch (keyed by --seed)"),
      LS_OPT("num-epoch", num_epoch, "passes over --prompt-data the run may take (0 = as many as needed)"),
      LS_OPT("rollout-max-prompt-len", rollout_max_prompt_len, "skip longer prompts, in tokens (0 = no limit)"),
      LS_OPT("rollout-stop", rollout_stop, "stop strings: one string, or a JSON array of strings"),
      LS_OPT("tokenizer", tokenizer, "directory with tokenizer.json for --prompt-data (default: --load)"),
      LS_OPT("rm-type", rm_type, "reward of --prompt-data: math | dapo | exact"),
      LS_OPT("sft-data", sft_data, "SFT warm-start demonstrations for --prompt-data (JSONL: --input-key, response)"),
      LS_OPT("rm-url", rm_url, "reward model at http://HOST:PORT/PATH (a JSON POST per sample) instead of --rm-type"),
      LS_OPT("custom-rm-cmd", custom_rm_cmd, "reward program: JSON samples a line on stdin, rewards a line on stdout"),
      LS_OPT("rm-concurrency", rm_concurrency, "--rm-url requests in flight at once"),
      LS_OPT("rm-timeout", rm_timeout, "--rm-url seconds per attempt (connect, send, answer)"),
      LS_OPT("rm-retries", rm_retries, "--rm-url retries of a failed request, with doubling backoff"),
      LS_OPT("eval-prompt-data", eval_prompt_data, "eval sets NAME FILE [NAME FILE ...] (needs --prompt-data)"),
      LS_OPT("eval-interval", eval_interval, "evaluate every N RL steps (also before the first and after the last)"),
      LS_OPT("n-samples-per-eval-prompt", n_samples_per_eval_prompt, "answers per eval prompt (pass@N)"),
      LS_OPT("eval-temperature", eval_temperature, "eval sampling temperature"),
      LS_OPT("eval-top-p", eval_top_p, "eval top-p sampling (1 = off)"),
      LS_OPT("eval-max-response-len", eval_max_response_len,
             "most tokens per eval answer (0 = --rollout-max-response-len)"),
      LS_OPT("num-rollout", num_rollout, "RL steps (one rollout and its optimizer steps each)"),
      LS_OPT("rollout-batch-size", rollout_batch_size, "prompts per rollout"),
      LS_OPT("dynamic-sampling-filter", dynamic_sampling_filter,
             "DAPO dynamic sampling: drop prompt groups whose rewards are all equal, sample more to refill"),
      LS_OPT("over-sampling-batch-size", over_sampling_batch_size,
             "prompts per dynamic-sampling round (0 = --rollout-batch-size; else >= it)"),
      LS_OPT("n-samples-per-prompt", n_samples_per_prompt, "answers sampled per prompt (the group size)"),
      LS_OPT("rollout-max-response-len", rollout_max_response_len,
             "most tokens per answer (multi-turn: of all turns and observations together)"),
      LS_OPT("rollout-temperature", rollout_temperature, "sampling temperature"),
      LS_OPT("rollout-top-k", rollout_top_k, "top-k sampling (0 = off)"),
      LS_OPT("rollout-top-p", rollout_top_p, "top-p sampling (1 = off)"),
      LS_OPT("rollout-tool", rollout_tool, "multi-turn rollouts with a built-in tool: calculator"),
      LS_OPT("rollout-env-url", rollout_env_url,
             "multi-turn rollouts with an environment server at http://HOST:PORT/PATH (docs/rollout.md)"),
      LS_OPT("rollout-max-turns", rollout_max_turns, "most policy turns of a multi-turn rollout"),
      LS_OPT("rollout-max-turn-len", rollout_max_turn_len,
             "most tokens per policy turn of a multi-turn rollout (0 = the rest of --rollout-max-response-len)"),
      LS_OPT("rollout-env-timeout", rollout_env_timeout, "--rollout-env-url seconds per attempt"),
      LS_OPT("rollout-env-retries", rollout_env_retries, "--rollout-env-url retries of a failed request"),
      LS_OPT("global-batch-size", global_batch_size, "samples per optimizer step"),
      LS_OPT("num-microbatches", num_microbatches, "canonical micro-batches per optimizer step (power of two)"),
      LS_OPT("recompute-num-layers", recompute_num_layers,
             "--device cuda: the first N layers are recomputed in the backward, the rest keep their activations "
             "(-1 = as few as the free memory allows, chosen per step; the same bits either way)"),
      LS_OPT("loss-type", loss_type, "policy_loss | sft_loss"),
      LS_OPT("advantage-estimator", advantage_estimator, "grpo | dr_grpo | reinforce_plus_plus | gspo"),
      LS_OPT("loss-agg", loss_agg, "token_mean | seq_mean_token_mean | seq_mean_token_sum"),
      LS_OPT("eps-clip", eps_clip, "PPO ratio clip: lower bound 1 - eps-clip"),
      LS_OPT("eps-clip-high", eps_clip_high, "PPO ratio clip: upper bound 1 + eps-clip-high"),
      LS_OPT("eps-clip-c", eps_clip_c, "dual-clip constant (> 1 enables)"),
      LS_OPT("kl-loss-coef", kl_loss_coef, "weight of the KL to the reference model"),
      LS_OPT("kl-loss-type", kl_loss_type, "k1 | k2 | k3 | low_var_kl"),
      LS_OPT("entropy-coef", entropy_coef, "entropy bonus weight"),
      LS_OPT("use-rollout-logprobs", use_rollout_logprobs, "old log-probs := rollout log-probs (no recompute)"),
      LS_OPT("check-true-on-policy", check_true_on_policy, "any trainer/rollout log-prob difference is an error"),
      LS_OPT("sft-warmup-steps", sft_warmup_steps, "SFT optimizer steps on task demonstrations before RL"),
      LS_OPT("sft-global-batch-size", sft_global_batch_size,
             "demonstrations per SFT warm-start optimizer step (0 = --global-batch-size)"),
      LS_OPT("lr", lr, "peak learning rate"),
      LS_OPT("min-lr", min_lr, "final learning rate of the decay"),
      LS_OPT("lr-decay-style", lr_decay_style, "constant | linear | cosine"),
      LS_OPT("lr-warmup-iters", lr_warmup_iters, "linear warmup optimizer steps"),
      LS_OPT("lr-decay-iters", lr_decay_iters, "decay optimizer steps after warmup"),
      LS_OPT("adam-beta1", adam_beta1, "AdamW beta1"),
      LS_OPT("adam-beta2", adam_beta2, "AdamW beta2"),
      LS_OPT("adam-eps", adam_eps, "AdamW epsilon"),
      LS_OPT("weight-decay", weight_decay, "decoupled weight decay (matrices only)"),
      LS_OPT("clip-grad", clip_grad, "clip by global gradient norm (0 = off)"),
      LS_OPT("output-dir", output_dir, "where metrics.jsonl and train.png go"),
      LS_OPT("save", save, "checkpoint directory"),
      LS_OPT("save-interval", save_interval, "save every N RL steps (0 = only at the end)"),
      LS_OPT("resume", resume, "continue from the latest checkpoint in --save"),
      LS_OPT("overwrite-save", overwrite_save,
             "start afresh even though --save holds a run (its checkpoints are removed)"),
      LS_OPT("save-hf", save_hf, "write the policy as Hugging Face model directories DIR/iter_N (with tokenizer)"),
      LS_OPT("save-hf-interval", save_hf_interval, "--save-hf every N RL steps (0 = only at the end)"),
      LS_OPT("tensorboard-dir", tensorboard_dir, "also write the metrics as TensorBoard event files here"),
      LS_OPT("progress", progress, "one-line progress display on stderr"),
      LS_OPT("audit-weight-sync", audit_weight_sync,
             "after every weight sync, audit trainer vs engine weights by global name; stop at a difference"),
      LS_OPT("tensor-model-parallel-size", tensor_model_parallel_size, "trainer tensor parallel size (1, 2, 4, 8)"),
      LS_OPT("sequence-parallel", sequence_parallel, "trainer sequence parallel (split tokens across TP ranks)"),
      LS_OPT("pipeline-model-parallel-size", pipeline_model_parallel_size, "trainer pipeline stages"),
      LS_OPT("pipeline-layer-split", pipeline_layer_split, "layers per pipeline stage, e.g. 1,3 (default: even)"),
      LS_OPT("expert-model-parallel-size", expert_model_parallel_size, "trainer expert parallel size"),
      LS_OPT("expert-tensor-parallel-size", expert_tensor_parallel_size, "trainer expert tensor parallel size"),
      LS_OPT("rollout-tensor-model-parallel-size", rollout_tensor_model_parallel_size,
             "rollout engine tensor parallel size (1, 2, 4, 8); the engine's topology may differ from the trainer's"),
      LS_OPT("rollout-sequence-parallel", rollout_sequence_parallel, "rollout engine sequence parallel"),
      LS_OPT("rollout-pipeline-model-parallel-size", rollout_pipeline_model_parallel_size,
             "rollout engine pipeline stages"),
      LS_OPT("rollout-expert-model-parallel-size", rollout_expert_model_parallel_size,
             "rollout engine expert parallel size"),
      LS_OPT("rollout-expert-tensor-parallel-size", rollout_expert_tensor_parallel_size,
             "rollout engine expert tensor parallel size"),
      LS_OPT("weight-sync-bucket-mb", weight_sync_bucket_mb,
             "MiB of fp32 weights per bucket of the trainer -> engine weight sync"),
      LS_OPT("debug-inject-nan-step", debug_inject_nan_step, ""),
      LS_OPT("debug-stop-after", debug_stop_after, ""),
  };
  return options;
}

#undef LS_OPT

const char* option_kind(const OptionField& f) {
  switch (f.index()) {
    case 0: return "an integer";
    case 1: return "a number";
    case 2: return "a boolean (true/false)";
    default: return "a string";
  }
}

namespace {

const TrainOption* find_option(const std::string& raw) {
  std::string name = raw;
  std::replace(name.begin(), name.end(), '_', '-');
  for (const auto& o : train_options())
    if (o.name == name) return &o;
  return nullptr;
}

const char* toml_kind(const toml::node& n) {
  switch (n.type()) {
    case toml::node_type::string: return "a string";
    case toml::node_type::integer: return "an integer";
    case toml::node_type::floating_point: return "a floating-point number";
    case toml::node_type::boolean: return "a boolean";
    case toml::node_type::table: return "a table";
    case toml::node_type::array: return "an array";
    default: return "a date/time";
  }
}

}  // namespace

void apply_toml_file(TrainConfig& c, const std::string& path) {
  LS_CHECK(std::filesystem::is_regular_file(path), path, ": config file not found");
  toml::table table;
  try {
    table = toml::parse_file(path);
  } catch (const toml::parse_error& e) {
    const auto& where = e.source().begin;
    fail(path, ":", where.line, ":", where.column, ": TOML syntax error: ", e.description());
  }
  for (const auto& [key, node] : table) {
    const std::string k(key.str());
    const TrainOption* o = find_option(k);
    LS_CHECK(o, path, ": unknown key '", k, "' (see `lockstep train --help` for the keys)");
    const char* expected = option_kind(o->field);
    std::visit(
        [&](auto member) {
          using T = std::remove_reference_t<decltype(c.*member)>;
          bool ok = false;
          if constexpr (std::is_same_v<T, int64_t>) {
            if (auto v = node.value_exact<int64_t>()) c.*member = *v, ok = true;
          } else if constexpr (std::is_same_v<T, double>) {
            if (node.is_integer() || node.is_floating_point()) c.*member = *node.value<double>(), ok = true;
          } else if constexpr (std::is_same_v<T, bool>) {
            if (auto v = node.value_exact<bool>()) c.*member = *v, ok = true;
          } else {
            if (auto v = node.value_exact<std::string>()) c.*member = *v, ok = true;
          }
          LS_CHECK(ok, path, ": key '", k, "': expected ", expected, ", found ", toml_kind(node));
        },
        o->field);
  }
}

void apply_flag(TrainConfig& c, const std::string& name, const std::string& value) {
  const TrainOption* o = find_option(name);
  LS_CHECK(o, "unknown option --", name);
  const std::string where = "--" + o->name;
  std::visit(
      [&](auto member) {
        using T = std::remove_reference_t<decltype(c.*member)>;
        if constexpr (std::is_same_v<T, int64_t>) {
          size_t used = 0;
          int64_t v = 0;
          try {
            v = std::stoll(value, &used);
          } catch (const std::exception&) {
            used = 0;
          }
          LS_CHECK(used == value.size() && !value.empty(), where, ": expected an integer, got '", value, "'");
          c.*member = v;
        } else if constexpr (std::is_same_v<T, double>) {
          size_t used = 0;
          double v = 0;
          try {
            v = std::stod(value, &used);
          } catch (const std::exception&) {
            used = 0;
          }
          LS_CHECK(used == value.size() && !value.empty(), where, ": expected a number, got '", value, "'");
          c.*member = v;
        } else if constexpr (std::is_same_v<T, bool>) {
          LS_CHECK(value == "true" || value == "false" || value == "1" || value == "0", where,
                   ": expected true or false, got '", value, "'");
          c.*member = value == "true" || value == "1";
        } else {
          c.*member = value;
        }
      },
      o->field);
}

void validate(const TrainConfig& c) {
  // Every number option first, in one place: integers within +-2^31 (counts, sizes and steps;
  // seeds take any value) and finite reals, before any option-specific check uses them.
  for (const auto& o : train_options()) {
    if (auto* member = std::get_if<int64_t TrainConfig::*>(&o.field)) {
      const int64_t v = c.**member;
      LS_CHECK(o.name == "seed" || o.name == "model-seed" || (v >= -(int64_t(1) << 31) && v <= (int64_t(1) << 31)),
               "--", o.name, ": ", v, " is absurdly large (expected at most 2^31 in magnitude)");
    } else if (auto* real = std::get_if<double TrainConfig::*>(&o.field)) {
      LS_CHECK(std::isfinite(c.**real), "--", o.name, ": expected a finite number, got ", c.**real);
    }
  }
  LS_CHECK(c.dtype == "float32" || c.dtype == "bfloat16", "--dtype: expected 'float32' or 'bfloat16', got '", c.dtype,
           "'");
  LS_CHECK(c.device == "cpu" || c.device == "cuda", "--device: expected 'cpu' or 'cuda', got '", c.device, "'");
  LS_CHECK(c.device == "cpu" || c.dtype == "bfloat16",
           "--device cuda runs the bfloat16 recipe only (add --dtype bfloat16)");
  loss_type_from_name(c.loss_type);
  advantage_estimator_from_name(c.advantage_estimator);
  loss_agg_from_name(c.loss_agg);
  kl_type_from_name(c.kl_loss_type);
  lr_schedule_from_name(c.lr_decay_style);
  LS_CHECK(c.num_threads >= 0, "--num-threads: expected >= 0, got ", c.num_threads);
  LS_CHECK(c.num_rollout >= 0, "--num-rollout: expected >= 0, got ", c.num_rollout);
  LS_CHECK(c.rollout_batch_size > 0, "--rollout-batch-size: expected > 0, got ", c.rollout_batch_size);
  LS_CHECK(c.n_samples_per_prompt > 0, "--n-samples-per-prompt: expected > 0, got ", c.n_samples_per_prompt);
  LS_CHECK(c.over_sampling_batch_size == 0 || c.over_sampling_batch_size >= c.rollout_batch_size,
           "--over-sampling-batch-size: expected 0 or >= --rollout-batch-size ", c.rollout_batch_size, ", got ",
           c.over_sampling_batch_size);
  LS_CHECK(c.rollout_max_response_len > 0, "--rollout-max-response-len: expected > 0, got ",
           c.rollout_max_response_len);
  LS_CHECK(c.global_batch_size > 0, "--global-batch-size: expected > 0, got ", c.global_batch_size);
  const int64_t samples = c.rollout_batch_size * c.n_samples_per_prompt;
  LS_CHECK(samples % c.global_batch_size == 0, "batch does not divide: --rollout-batch-size ", c.rollout_batch_size,
           " x --n-samples-per-prompt ", c.n_samples_per_prompt, " = ", samples,
           " samples per rollout is not a multiple of --global-batch-size ", c.global_batch_size);
  check_recompute_num_layers(c.recompute_num_layers, c.device == "cuda");
  LS_CHECK(is_power_of_two(c.num_microbatches), "--num-microbatches: expected a power of two, got ",
           c.num_microbatches);
  LS_CHECK(c.global_batch_size % c.num_microbatches == 0, "batch does not divide: --global-batch-size ",
           c.global_batch_size, " is not a multiple of --num-microbatches ", c.num_microbatches);
  LS_CHECK(rollout::valid_temperature(c.rollout_temperature),
           "--rollout-temperature: expected 0 (greedy) or a finite value >= ", rollout::kMinTemperature, ", got ",
           c.rollout_temperature);
  LS_CHECK(c.rollout_top_p > 0 && c.rollout_top_p <= 1, "--rollout-top-p: expected (0, 1], got ", c.rollout_top_p);
  LS_CHECK(c.rollout_top_k >= 0, "--rollout-top-k: expected >= 0, got ", c.rollout_top_k);
  LS_CHECK(
      !c.check_true_on_policy || c.rollout_temperature == 1.0,
      "--check-true-on-policy needs --rollout-temperature 1 (the rollout log-probs are of softmax(logits / T)); got ",
      c.rollout_temperature);
  LS_CHECK(!c.use_rollout_logprobs || c.rollout_temperature == 1.0,
           "--use-rollout-logprobs needs --rollout-temperature 1; got ", c.rollout_temperature);
  LS_CHECK(c.eps_clip >= 0 && c.eps_clip < 1, "--eps-clip: expected [0, 1), got ", c.eps_clip);
  LS_CHECK(c.eps_clip_high >= 0, "--eps-clip-high: expected >= 0, got ", c.eps_clip_high);
  LS_CHECK(c.eps_clip_c == 0 || c.eps_clip_c > 1, "--eps-clip-c: expected 0 (off) or > 1, got ", c.eps_clip_c);
  LS_CHECK(c.sft_warmup_steps >= 0, "--sft-warmup-steps: expected >= 0, got ", c.sft_warmup_steps);
  LS_CHECK(c.sft_global_batch_size >= 0, "--sft-global-batch-size: expected >= 0 (0: --global-batch-size), got ",
           c.sft_global_batch_size);
  LS_CHECK(c.sft_global_batch_size % c.num_microbatches == 0, "batch does not divide: --sft-global-batch-size ",
           c.sft_global_batch_size, " is not a multiple of --num-microbatches ", c.num_microbatches);
  LS_CHECK(c.lr >= 0 && std::isfinite(c.lr), "--lr: expected a finite value >= 0, got ", c.lr);
  LS_CHECK(c.adam_beta1 >= 0 && c.adam_beta1 < 1, "--adam-beta1: expected [0, 1), got ", c.adam_beta1);
  LS_CHECK(c.adam_beta2 >= 0 && c.adam_beta2 < 1, "--adam-beta2: expected [0, 1), got ", c.adam_beta2);
  LS_CHECK(c.adam_eps > 0, "--adam-eps: expected > 0, got ", c.adam_eps);
  for (auto [flag, v] : {std::pair{"--tensor-model-parallel-size", c.tensor_model_parallel_size},
                         {"--pipeline-model-parallel-size", c.pipeline_model_parallel_size},
                         {"--expert-model-parallel-size", c.expert_model_parallel_size},
                         {"--expert-tensor-parallel-size", c.expert_tensor_parallel_size},
                         {"--rollout-tensor-model-parallel-size", c.rollout_tensor_model_parallel_size},
                         {"--rollout-pipeline-model-parallel-size", c.rollout_pipeline_model_parallel_size},
                         {"--rollout-expert-model-parallel-size", c.rollout_expert_model_parallel_size},
                         {"--rollout-expert-tensor-parallel-size", c.rollout_expert_tensor_parallel_size}})
    LS_CHECK(v >= 1, flag, ": expected >= 1, got ", v);
  LS_CHECK(c.weight_sync_bucket_mb > 0 && std::isfinite(c.weight_sync_bucket_mb) &&
               c.weight_sync_bucket_mb * 1048576.0 >= 1.0 && c.weight_sync_bucket_mb <= 1048576.0,
           "--weight-sync-bucket-mb: expected a size in MiB in (0, 1048576], got ", c.weight_sync_bucket_mb);
  LS_CHECK(c.save_interval >= 0, "--save-interval: expected >= 0, got ", c.save_interval);
  LS_CHECK(c.save_hf_interval >= 0, "--save-hf-interval: expected >= 0, got ", c.save_hf_interval);
  LS_CHECK(!c.resume || !c.save.empty(), "--resume needs --save DIR (the checkpoints to continue from)");
  LS_CHECK(!c.resume || !c.overwrite_save, "--resume and --overwrite-save: continue the run or replace it, not both");
  LS_CHECK(c.ref_load.empty() || std::filesystem::is_regular_file(std::filesystem::path(c.ref_load) / "config.json"),
           "--ref-load ", c.ref_load, ": reference model not found (expected a model directory with config.json)");
  LS_CHECK(c.load.empty() || std::filesystem::is_regular_file(std::filesystem::path(c.load) / "config.json"), "--load ",
           c.load, ": model not found (expected a model directory with config.json)");
  LS_CHECK(c.init_config.empty() || c.load.empty(), "--init-config and --load: give one model, not both");
  LS_CHECK(c.init_config.empty() || std::filesystem::is_regular_file(c.init_config), "--init-config ", c.init_config,
           ": file not found");
  validate_prompt_source_options(c);
  validate_environment_options(c);
}

std::string to_toml(const TrainConfig& c) {
  toml::table t;
  for (const auto& o : train_options()) {
    std::visit([&](auto member) { t.insert(o.name, c.*member); }, o.field);
  }
  std::ostringstream os;
  os << t << "\n";
  return os.str();
}

}  // namespace lockstep::rl
