// The configuration of `lockstep train`: one struct, one table of options. Every option is a
// TOML key (`n-samples-per-prompt = 8`, underscores accepted) and a flag
// (`--n-samples-per-prompt 8`); flags override the file. Unknown keys, wrong types and
// inconsistent values are errors before any work starts.
#pragma once
#include <cstdint>
#include <string>
#include <variant>
#include <vector>

namespace lockstep::rl {

struct TrainConfig {
  // Run.
  int64_t seed = 1234;
  std::string dtype = "float32";
  std::string device = "cpu";  // cpu | cuda: where the engine and the trainer run (cuda: one GPU, bfloat16)
  int64_t num_threads = 0;     // 0: LOCKSTEP_NUM_THREADS or every core
  // Model: --load (a Hugging Face model directory) or the embedded tiny Qwen3-MoE.
  std::string load;
  std::string ref_load;  // the KL reference; default: the policy at the start of RL
  int64_t model_seed = 7;
  std::string init_config;  // random-init this config.json instead of the embedded tiny model
  // Task and data.
  std::string task = "reverse";
  int64_t task_digits = 3;
  // Prompt data (rl/prompt_source.h): a JSONL data set instead of the built-in task.
  std::string prompt_data;
  std::string input_key = "prompt";
  std::string label_key = "label";
  std::string metadata_key;
  bool apply_chat_template = false;
  bool enable_thinking = true;
  bool rollout_shuffle = false;
  int64_t num_epoch = 0;               // 0: as many passes as --num-rollout needs
  int64_t rollout_max_prompt_len = 0;  // 0: no limit
  std::string rollout_stop;            // a JSON array of strings, or one string
  std::string tokenizer;               // default: --load
  std::string rm_type = "math";
  std::string sft_data;       // demonstrations for the SFT warm start of a --prompt-data run
  std::string rm_url;         // an HTTP reward model instead of rm_type
  std::string custom_rm_cmd;  // a reward program instead of rm_type
  int64_t rm_concurrency = 16;
  double rm_timeout = 30;  // seconds per attempt
  int64_t rm_retries = 3;
  // Evaluation (rl/eval.h).
  std::string eval_prompt_data;  // "NAME FILE [NAME FILE ...]"
  int64_t eval_interval = 0;     // 0: before the first step and after the last only
  int64_t n_samples_per_eval_prompt = 1;
  double eval_temperature = 1.0;
  double eval_top_p = 1.0;
  int64_t eval_max_response_len = 0;  // 0: --rollout-max-response-len
  // Rollout.
  int64_t num_rollout = 200;  // RL steps (one rollout each)
  int64_t rollout_batch_size = 16;
  bool dynamic_sampling_filter = false;  // DAPO: drop prompt groups whose rewards are all equal
  int64_t over_sampling_batch_size = 0;  // prompts per dynamic-sampling round (0: rollout_batch_size)
  int64_t n_samples_per_prompt = 8;
  int64_t rollout_max_response_len = 8;
  double rollout_temperature = 1.0;
  int64_t rollout_top_k = 0;
  double rollout_top_p = 1.0;
  // Multi-turn rollouts (rl/environment.h, docs/rollout.md).
  std::string rollout_tool;     // "calculator": the built-in tool ("" = none)
  std::string rollout_env_url;  // an environment server
  int64_t rollout_max_turns = 4;
  int64_t rollout_max_turn_len = 0;  // 0: the rest of --rollout-max-response-len
  double rollout_env_timeout = 30;   // seconds per attempt
  int64_t rollout_env_retries = 3;
  // Training.
  int64_t global_batch_size = 128;
  int64_t num_microbatches = 4;
  int64_t recompute_num_layers = -1;  // --device cuda: layers recomputed in the backward (-1: as memory allows)
  std::string loss_type = "policy_loss";
  std::string advantage_estimator = "grpo";
  std::string loss_agg = "token_mean";
  double eps_clip = 0.2;
  double eps_clip_high = 0.28;
  double eps_clip_c = 0.0;
  double kl_loss_coef = 0.0;
  std::string kl_loss_type = "low_var_kl";
  double entropy_coef = 0.0;
  bool use_rollout_logprobs = false;
  bool check_true_on_policy = true;
  int64_t sft_warmup_steps = 40;
  int64_t sft_global_batch_size = 0;  // demonstrations per SFT warm-start step (0: global_batch_size)
  // Optimizer.
  double lr = 2e-3;
  double min_lr = 2e-4;
  // The default job's 240 optimizer steps (40 SFT, 200 GRPO) on a cosine: at a constant 2e-3
  // its reward dipped as low as 0.2 late in a run (notes/default-job.md).
  std::string lr_decay_style = "cosine";
  int64_t lr_warmup_iters = 0;
  int64_t lr_decay_iters = 240;
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.98;
  double adam_eps = 1e-8;
  double weight_decay = 0.0;
  double clip_grad = 1.0;
  // Output.
  std::string output_dir = "lockstep_train_out";  // metrics.jsonl and train.png
  std::string save;                               // checkpoint directory ("" = none)
  int64_t save_interval = 0;                      // 0: only at the end (when --save is set)
  bool resume = false;                            // continue from the latest checkpoint in --save
  bool overwrite_save = false;                    // a fresh run may replace the run in --save
  std::string save_hf;                            // Hugging Face snapshots of the policy ("" = none)
  std::string tensorboard_dir;                    // TensorBoard event files beside metrics.jsonl ("" = none)
  int64_t save_hf_interval = 0;                   // 0: only at the end
  bool progress = true;
  bool audit_weight_sync = false;  // after every sync, audit trainer vs engine weights by global name
  // Trainer topology under `mpirun -np N lockstep train` (docs/numerics.md, D4: no number depends on
  // it). Not run-defining.
  int64_t tensor_model_parallel_size = 1;
  bool sequence_parallel = false;
  int64_t pipeline_model_parallel_size = 1;
  std::string pipeline_layer_split;  // e.g. "1,3"; empty = even
  int64_t expert_model_parallel_size = 1;
  int64_t expert_tensor_parallel_size = 1;
  // The rollout engine's own topology over the same ranks (all 1: a single-rank engine on
  // every rank), and the weight sync's bucket size (parallel/weight_sync.h). Not run-defining.
  int64_t rollout_tensor_model_parallel_size = 1;
  bool rollout_sequence_parallel = false;
  int64_t rollout_pipeline_model_parallel_size = 1;
  int64_t rollout_expert_model_parallel_size = 1;
  int64_t rollout_expert_tensor_parallel_size = 1;
  double weight_sync_bucket_mb = 64;  // MiB of fp32 weights per bucket
  // Testing hooks (hidden from the help).
  int64_t debug_inject_nan_step = -1;
  int64_t debug_stop_after = -1;  // stop (as if killed) after this many RL steps of this process
};

using OptionField =
    std::variant<int64_t TrainConfig::*, double TrainConfig::*, bool TrainConfig::*, std::string TrainConfig::*>;

struct TrainOption {
  std::string name;  // the flag without "--", e.g. "n-samples-per-prompt"
  OptionField field;
  std::string help;  // empty for hidden options
};

const std::vector<TrainOption>& train_options();
const char* option_kind(const OptionField& f);  // "an integer", "a number", ...

// Applies every key of a TOML file; errors name the file, the key, expected and found.
void apply_toml_file(TrainConfig& c, const std::string& path);
// Applies one flag value given as text (from the command line).
void apply_flag(TrainConfig& c, const std::string& name, const std::string& value);
// Cross-field checks (batch divisibility, ranges, the reference model); throws Error.
void validate(const TrainConfig& c);
// The config as TOML text (checkpoints store it; --config accepts it).
std::string to_toml(const TrainConfig& c);

}  // namespace lockstep::rl
