#include "rl/trainer.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>

#include "checkpoint/audit.h"
#include "core/device_memory.h"
#include "core/error.h"
#include "core/json_parse.h"
#include "core/philox.h"
#include "core/text_file.h"
#include "core/thread_pool.h"
#include "core/timer.h"
#include "model/qwen3_moe.h"
#include "model/runner.h"
#ifdef LOCKSTEP_CUDA
#include "model/cuda/cuda_trainer.h"
#endif
#include "model/weights_source.h"
#include "parallel/parallel_runner.h"
#include "parallel/weight_sync.h"
#include "rl/environment.h"
#include "rl/hf_snapshot.h"
#include "rl/plot.h"
#include "rl/policy.h"
#include "rl/prompt_source.h"
#include "rl/rollout_metrics.h"
#include "rl/step_rollout.h"
#include "rl/tasks.h"
#include "rl/tensorboard.h"
#include "rl/tiny_model.h"
#include "rl/train_checkpoint.h"
#include "rollout/engine.h"
#include "rollout/replica_split.h"
#include "train/advantages.h"
#include "train/grad_accumulate.h"
#include "train/losses.h"
#include "train/optimizer.h"

namespace lockstep::rl {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Key offsets that separate the random streams of the run's uses of the seed.
constexpr uint64_t kRolloutDataKey = 0x726f6c6c, kSftDataKey = 0x73667464, kSamplingKey = 0x73616d70;

// One trajectory: prompt, response and what the rollout reported about it. A multi-turn
// response holds the environment's tokens too; only the policy's (loss_mask 1) are trained, and
// rollout_logp, old_logp, ref_logp and advantages are over those.
struct Sample {
  TaskExample example;
  std::vector<int32_t> response;
  std::vector<uint8_t> loss_mask;  // per response token; empty: every token is trained
  std::vector<float> rollout_logp;
  std::vector<int64_t> versions;
  bool truncated = false;
  float reward = 0;
  std::vector<float> old_logp, ref_logp, advantages;
  std::vector<int32_t> sequence() const {
    std::vector<int32_t> s = example.prompt;
    s.insert(s.end(), response.begin(), response.end());
    return s;
  }
  // Where the trained tokens' values sit in the sequence's per-token values (n - 1 of them:
  // response token t is at prompt_len - 1 + t).
  std::vector<size_t> trained_positions() const {
    std::vector<size_t> out;
    for (size_t t = 0; t < response.size(); ++t)
      if (loss_mask.empty() || loss_mask[t]) out.push_back(example.prompt.size() - 1 + t);
    return out;
  }
  std::vector<float> trained_part(const std::vector<float>& per_token) const {
    std::vector<float> out;
    for (size_t p : trained_positions()) out.push_back(per_token[p]);
    return out;
  }
};

// What one optimizer step over a batch of samples produced.
struct BatchResult {
  LossMetrics metrics;
  OptimizerStepResult opt;
  std::vector<std::vector<float>> train_logp;  // per sample, response part, before the update
};

void fail_step(const std::string& phase, int64_t step, const std::string& what) {
  fail(phase, " step ", step, ": ", what, " (no checkpoint was written for this step)");
}

// One optimizer step over a batch of samples: forward, loss and backward of every canonical
// micro-batch, the pairwise gradient tree, the finiteness checks and one AdamW step. The
// per-sample losses are computed on the last stage and sent to every rank, summed in batch
// order. `inject_nan` poisons one gradient (test hook).
BatchResult train_batch(Policy& policy, const TrainConfig& cfg, const LossConfig& loss, std::vector<Sample*> batch,
                        const std::string& phase, int64_t step, bool inject_nan) {
  constexpr size_t kMetrics = 6;
  BatchResult out;
  LossNormalizer norm;
  norm.num_samples = int64_t(batch.size());
  for (Sample* s : batch) norm.num_tokens += int64_t(s->trained_positions().size());
  std::vector<std::vector<int32_t>> seqs;
  for (Sample* s : batch) seqs.push_back(s->sequence());
  auto record_size = [&](int64_t i) { return kMetrics + batch[size_t(i)]->trained_positions().size(); };
  auto sample_upstream = [&](int64_t i, const std::vector<float>& lp_full, const std::vector<float>& ent_full,
                             std::vector<double>& rec) {
    Sample& s = *batch[size_t(i)];
    const std::vector<size_t> at = s.trained_positions();
    std::vector<float> logp = s.trained_part(lp_full);
    std::vector<float> entropy = ent_full.empty() ? std::vector<float>{} : s.trained_part(ent_full);
    SampleLossInput in;
    in.logp = &logp;
    in.old_logp = &s.old_logp;
    in.ref_logp = s.ref_logp.empty() ? nullptr : &s.ref_logp;
    in.entropy = ent_full.empty() ? nullptr : &entropy;  // the SFT warm start computes none
    in.advantages = &s.advantages;
    SampleLossResult r = sample_loss(loss, norm, in);
    SequenceGradInput up;
    up.dlogp.assign(lp_full.size(), 0.0f);  // untrained tokens get no gradient
    for (size_t k = 0; k < at.size(); ++k) up.dlogp[at[k]] = r.dlogp[k];
    if (!r.dentropy.empty()) {
      up.dentropy.assign(lp_full.size(), 0.0f);
      for (size_t k = 0; k < at.size(); ++k) up.dentropy[at[k]] = r.dentropy[k];
    }
    const LossMetrics& m = r.metrics;
    rec = {m.loss, m.pg_loss, m.pg_clipfrac, m.ppo_kl, m.kl_loss, m.entropy_loss};
    rec.insert(rec.end(), logp.begin(), logp.end());  // floats are exact in double
    return up;
  };
  // The SFT records log no entropy: its vocabulary-wide pass is skipped unless a bonus needs it.
  const bool want_entropy = loss.type != LossType::sft_loss || loss.entropy_coef != 0.0;
  auto records = policy.compute_grads(seqs, cfg.num_microbatches, sample_upstream, record_size, want_entropy);
  for (const auto& rec : records) {
    LossMetrics m;
    m.loss = rec[0], m.pg_loss = rec[1], m.pg_clipfrac = rec[2], m.ppo_kl = rec[3], m.kl_loss = rec[4],
    m.entropy_loss = rec[5];
    out.metrics.add(m);
    out.train_logp.emplace_back(rec.begin() + kMetrics, rec.end());  // double -> float: exact
  }
  if (!std::isfinite(out.metrics.loss))
    fail_step(phase, step, "the loss is not finite (" + std::to_string(out.metrics.loss) + ")");
  try {
    out.opt = policy.apply(inject_nan);
  } catch (const Error& e) {
    fail_step(phase, step, e.what());
  }
  return out;
}

struct OnPolicyCheck {
  double abs_diff = 0, kl = 0;
  int64_t tokens = 0;
};

// Compares trainer and rollout log-probs of the sampled tokens; with `strict`, any bit
// difference is an error naming the first differing sample and token.
OnPolicyCheck compare_logprobs(const std::vector<Sample*>& samples, const std::vector<std::vector<float>>& train_logp,
                               bool strict, int64_t step, int64_t first_index, const PromptSource& source) {
  OnPolicyCheck c;
  for (size_t i = 0; i < samples.size(); ++i) {
    const auto& roll = samples[i]->rollout_logp;
    const auto& tr = train_logp[i];
    for (size_t t = 0; t < roll.size(); ++t) {
      if (strict && std::memcmp(&roll[t], &tr[t], sizeof(float)) != 0) {
        char buf[256];
        std::snprintf(buf, sizeof buf, "trainer log-prob %.9g vs rollout %.9g", double(tr[t]), double(roll[t]));
        fail("step ", step, ": --check-true-on-policy: sample ", first_index + int64_t(i), " (prompt '",
             source.text(samples[i]->example.prompt), "', response '", source.text(samples[i]->response),
             "') differs at trained token ", t, ": ", buf);
      }
      c.abs_diff += std::fabs(double(tr[t]) - double(roll[t]));
      c.kl += double(roll[t]) - double(tr[t]);
      ++c.tokens;
    }
  }
  return c;
}

// The run-defining options (where output goes, threads, and test hooks excluded), so that an
// interrupted-and-resumed run writes the same checkpoint files as an uninterrupted one.
std::string run_defining_toml(TrainConfig c) {
  c.output_dir = c.save = c.save_hf = c.tensorboard_dir = "";
  c.num_threads = 0;
  c.resume = c.overwrite_save = false;
  c.progress = true;
  c.audit_weight_sync = false;
  c.debug_inject_nan_step = c.debug_stop_after = -1;
  // The topology changes no number (D4): a checkpoint is the same whatever wrote it.
  const TrainConfig defaults;
  c.tensor_model_parallel_size = defaults.tensor_model_parallel_size;
  c.sequence_parallel = defaults.sequence_parallel;
  c.pipeline_model_parallel_size = defaults.pipeline_model_parallel_size;
  c.pipeline_layer_split = defaults.pipeline_layer_split;
  c.expert_model_parallel_size = defaults.expert_model_parallel_size;
  c.expert_tensor_parallel_size = defaults.expert_tensor_parallel_size;
  c.rollout_tensor_model_parallel_size = defaults.rollout_tensor_model_parallel_size;
  c.rollout_sequence_parallel = defaults.rollout_sequence_parallel;
  c.rollout_pipeline_model_parallel_size = defaults.rollout_pipeline_model_parallel_size;
  c.rollout_expert_model_parallel_size = defaults.rollout_expert_model_parallel_size;
  c.rollout_expert_tensor_parallel_size = defaults.rollout_expert_tensor_parallel_size;
  c.weight_sync_bucket_mb = defaults.weight_sync_bucket_mb;
  return to_toml(c);
}

class MetricsLog {
 public:
  MetricsLog(const std::string& path, int64_t keep_through_step) : path_(path) {
    // On resume keep the records up to the checkpoint's step (a crash may have logged more).
    std::vector<std::string> kept;
    if (keep_through_step >= 0 && fs::exists(path)) {
      std::ifstream in(path);
      std::string line;
      for (int64_t n = 1; std::getline(in, line); ++n) {
        if (line.empty()) continue;
        json j = parse_json(line, path + ":" + std::to_string(n));
        if (j.contains("step") && j["step"].get<int64_t>() > keep_through_step) continue;
        kept.push_back(line);
        remember(j);
      }
    }
    std::string text;  // replaced whole, so a failed rewrite loses no record
    for (const auto& l : kept) text += l + "\n";
    write_text_file(path, text);
  }
  void write(const json& j) {
    std::ofstream out(path_, std::ios::app);
    out << j.dump() << "\n";
    LS_CHECK(out.flush(), path_, ": write failed");
    remember(j);
    if (tensorboard_) {
      const int64_t step = j.contains("step") ? j["step"].get<int64_t>() : j.value("sft_step", int64_t(0));
      tensorboard_->write(step, j);
    }
  }
  void attach_tensorboard(const std::string& dir) { tensorboard_ = std::make_unique<TensorBoardWriter>(dir); }
  std::vector<PlotSeries> plot_series() const {
    std::vector<PlotSeries> out = {reward_, abs_diff_, grad_norm_};
    for (const auto& [key, series] : eval_) out.push_back(series);
    return out;
  }

 private:
  void remember(const json& j) {
    if (!j.contains("step")) return;
    double x = j["step"].get<double>();
    auto add = [&](PlotSeries& s, const char* key) {
      if (j.contains(key) && j[key].is_number()) s.x.push_back(x), s.y.push_back(j[key].get<double>());
    };
    add(reward_, "rollout/rewards");
    for (auto& [key, value] : j.items())  // eval/NAME (the mean reward of an eval set), one panel each
      if (key.rfind("eval/", 0) == 0 && key.find('/', 5) == std::string::npos) {
        if (!eval_.count(key)) eval_[key] = PlotSeries{key + " vs step", {}, {}};
        add(eval_[key], key.c_str());
      }
    add(abs_diff_, "train/train_rollout_logprob_abs_diff");
    add(grad_norm_, "train/grad_norm");
  }
  std::string path_;
  PlotSeries reward_{"rollout/rewards vs step", {}, {}};
  PlotSeries abs_diff_{"train/train_rollout_logprob_abs_diff vs step", {}, {}};
  PlotSeries grad_norm_{"train/grad_norm vs step", {}, {}};
  std::map<std::string, PlotSeries> eval_;
  std::unique_ptr<TensorBoardWriter> tensorboard_;
};

ModelWeights initial_weights(const TrainConfig& c, Precision precision) {
  if (!c.load.empty()) return ModelWeights::load(c.load, precision);
  const ModelConfig config = c.init_config.empty() ? tiny_task_model_config() : ModelConfig::load(c.init_config);
  return ModelWeights::random(config, uint64_t(c.model_seed), precision);
}

TopologyRequest trainer_topology_request(const TrainConfig& c) {
  TopologyRequest r;
  r.tp = int(c.tensor_model_parallel_size);
  r.sp = c.sequence_parallel;
  r.pp = int(c.pipeline_model_parallel_size);
  r.ep = int(c.expert_model_parallel_size);
  r.etp = int(c.expert_tensor_parallel_size);
  r.layer_split = c.pipeline_layer_split;
  return r;
}

TopologyRequest rollout_topology_request(const TrainConfig& c) {
  TopologyRequest r;
  r.tp = int(c.rollout_tensor_model_parallel_size);
  r.sp = c.rollout_sequence_parallel;
  r.pp = int(c.rollout_pipeline_model_parallel_size);
  r.ep = int(c.rollout_expert_model_parallel_size);
  r.etp = int(c.rollout_expert_tensor_parallel_size);
  r.flag_prefix = "rollout-";
  return r;
}

// The rollout engine's topology, validated like the trainer's; errors name the rollout keys.
ResolvedTopology resolve_rollout_topology(const TrainConfig& c, const ModelConfig& mc, int world_size) {
  try {
    return resolve_topology(rollout_topology_request(c), mc, world_size);
  } catch (const Error& e) {
    const std::string why = e.what();
    fail("the rollout engine's topology (--rollout-tensor-model-parallel-size ", c.rollout_tensor_model_parallel_size,
         (c.rollout_sequence_parallel ? " --rollout-sequence-parallel" : ""),
         " --rollout-pipeline-model-parallel-size ", c.rollout_pipeline_model_parallel_size,
         " --rollout-expert-model-parallel-size ", c.rollout_expert_model_parallel_size,
         " --rollout-expert-tensor-parallel-size ", c.rollout_expert_tensor_parallel_size, " on ", world_size,
         " ranks) cannot run: ", why);
  }
}

}  // namespace

TrainSummary run_training(const TrainConfig& cfg, dist::Communicator* world) {
  // ---- Everything that can be wrong with the input is checked before any work. ----
  validate(cfg);
  const TopologyRequest request = trainer_topology_request(cfg);
  LS_CHECK(world || !request.parallel(), "lockstep train: the topology flags need ranks (run under mpirun)");
  const bool rollout_parallel = rollout_topology_request(cfg).parallel();
  LS_CHECK(world || !rollout_parallel, "lockstep train: the --rollout-* topology flags need ranks (run under mpirun)");
  // One rank is a world of one: the same policy and the same lines as every topology.
  std::unique_ptr<dist::Communicator> own_world;
  if (!world) {
    own_world = std::make_unique<dist::SelfCommunicator>();
    world = own_world.get();
  }
  const ModelConfig mc = !cfg.load.empty()          ? ModelConfig::load(cfg.load + "/config.json")
                         : !cfg.init_config.empty() ? ModelConfig::load(cfg.init_config)
                                                    : tiny_task_model_config();
  ResolvedTopology rollout_topology;
  if (rollout_parallel) rollout_topology = resolve_rollout_topology(cfg, mc, world->size());
  const ResolvedTopology topology = resolve_topology(request, mc, world->size());
  LS_CHECK(cfg.num_microbatches % topology.topo.dp == 0, "--num-microbatches ", cfg.num_microbatches,
           " must be a multiple of the data-parallel size ", topology.topo.dp, " (world ", world->size(), " / (tp ",
           topology.topo.tp, " x pp ", topology.topo.pp, "))");
  const bool on_gpu = cfg.device == "cuda";
  LS_CHECK(!on_gpu || (world->size() == 1 && !request.parallel() && !rollout_parallel),
           "--device cuda: the engine and the trainer run on one GPU (the parallel forms run on --device cpu)");
  LS_CHECK(!on_gpu || cuda_available(), "--device cuda: no CUDA device is available");
  Timer total;
  if (cfg.num_threads > 0) set_num_threads(int(cfg.num_threads));
  const Precision precision = precision_from_name(cfg.dtype);
  auto source = make_prompt_source(cfg);             // the task, or the prompt data set read and checked
  source->set_world(world);                          // outside rewards: called on rank 0 only
  auto env = make_environment(cfg, *source, world);  // one turn, a tool or an environment server
  const LossType loss_type = loss_type_from_name(cfg.loss_type);
  const AdvantageEstimator estimator = advantage_estimator_from_name(cfg.advantage_estimator);
  // Before any work; every rank checks, rank 0 (the checkpoint writer) prepares the directory.
  const std::string resume_from = prepare_save_dir(cfg.save, cfg.resume, cfg.overwrite_save, world->rank() == 0);
  if (!resume_from.empty()) check_same_run(resume_from, run_defining_toml(cfg));
  ModelWeights weights = initial_weights(cfg, precision);
  source->check_model(weights.config, !cfg.load.empty()          ? cfg.load
                                      : !cfg.init_config.empty() ? cfg.init_config
                                                                 : "the embedded tiny model");
  const bool use_kl = cfg.kl_loss_coef != 0.0 && loss_type == LossType::policy_loss;
  std::unique_ptr<Qwen3Moe> ref;
  if (use_kl && !cfg.ref_load.empty()) {
    ModelWeights r = ModelWeights::load(cfg.ref_load, precision);
    LS_CHECK(r.config.to_json() == weights.config.to_json(), "--ref-load ", cfg.ref_load,
             ": the reference model's config differs from the policy's");
    ref = std::make_unique<Qwen3Moe>(std::move(r), precision);
  }
  const bool ref_in_checkpoint = use_kl && cfg.ref_load.empty();

  TrainerState state;
  state.seed = uint64_t(cfg.seed);
  OptimizerConfig oc;
  oc.lr = cfg.lr;
  oc.min_lr = cfg.min_lr;
  oc.schedule = lr_schedule_from_name(cfg.lr_decay_style);
  oc.warmup_steps = cfg.lr_warmup_iters;
  oc.decay_steps = cfg.lr_decay_iters;
  oc.beta1 = cfg.adam_beta1;
  oc.beta2 = cfg.adam_beta2;
  oc.eps = cfg.adam_eps;
  oc.weight_decay = cfg.weight_decay;
  oc.clip_grad = cfg.clip_grad;
  if (!resume_from.empty()) {
    state = load_trainer_state(resume_from);
    LS_CHECK(state.seed == uint64_t(cfg.seed), resume_from, ": the checkpoint's seed ", state.seed,
             " differs from --seed ", cfg.seed);
    load_checkpoint_weights((fs::path(resume_from) / "model.safetensors").string(), weights, precision);
    if (ref_in_checkpoint && state.sft_steps_done >= cfg.sft_warmup_steps) {
      ModelWeights r = weights.clone();
      load_checkpoint_weights((fs::path(resume_from) / "ref_model.safetensors").string(), r, precision);
      ref = std::make_unique<Qwen3Moe>(std::move(r), precision);
    }
  }
  // The policy takes the weights (a checkpoint's when resuming) rather than a copy: at 8 layers
  // of Qwen3-30B-A3B each fp32 copy is 22 GB of host memory.
  Policy policy(*world, topology, std::move(weights), precision, oc, on_gpu);
  if (!resume_from.empty()) policy.load_optimizer((fs::path(resume_from) / "optimizer.safetensors").string());
  const bool root = policy.root();  // writes metrics, plot and checkpoints
  if (root) {
    fs::create_directories(cfg.output_dir);
    if (!cfg.save.empty()) fs::create_directories(cfg.save);
  }
  const std::string config_toml = run_defining_toml(cfg);
  std::optional<MetricsLog> metrics;
  if (root)
    metrics.emplace((fs::path(cfg.output_dir) / "metrics.jsonl").string(), resume_from.empty() ? -1 : state.step);
  const std::string plot_path = (fs::path(cfg.output_dir) / "train.png").string();
  if (root && !cfg.tensorboard_dir.empty()) metrics->attach_tensorboard(cfg.tensorboard_dir);

  rollout::EngineOptions eo;
  const int64_t samples_per_step = cfg.rollout_batch_size * cfg.n_samples_per_prompt;
  const int64_t max_len = source->max_sequence_len();
  eo.page_size = 16;
  const int64_t requests_per_round =  // a dynamic-sampling round may draw more prompts than the batch
      std::max(cfg.rollout_batch_size, cfg.over_sampling_batch_size) * cfg.n_samples_per_prompt;
  eo.kv_pages = requests_per_round * ((max_len + eo.page_size - 1) / eo.page_size) + 16;
  eo.max_batch_tokens = std::max<int64_t>(2048, samples_per_step * max_len);
  eo.prefill_chunk = eo.max_batch_tokens;
  eo.initial_weight_version = state.weight_version;
  eo.detokenize = [&source](const std::vector<int32_t>& ids) { return source->text(ids); };  // stop strings
  // The engine: at its own topology over the same ranks (a ParallelRunner), else a
  // single-rank engine run identically on every rank. The sync streams the trainer's shards
  // into the engine's layout (parallel/weight_sync.h).
  std::unique_ptr<ModelRunner> runner;
  ShardLayout engine_layout;
  int engine_replicas = 1, engine_replica = 0;  // independent DP replicas split the rollouts
  rollout::ReplicaGather gather_replicas;
  if (rollout_parallel) {
    auto pr = make_parallel_runner(*world, rollout_topology, policy.full(), precision);
    engine_layout = pr->layout();
    engine_replicas = pr->replicas();
    engine_replica = pr->replica();
    gather_replicas = [p = pr.get()](const std::string& blob) { return p->gather_from_replicas(blob); };
    runner = std::move(pr);
  } else {
    runner = make_runner_from(on_gpu ? Device::cuda : Device::cpu, policy.full(), precision);
    engine_layout = whole_model_layout(mc, world->size(), world->rank());
  }
  rollout::Engine engine(std::move(runner), eo);
  // On the GPU the trainer runs on the engine's own runner: one copy of the weights. A
  // micro-batch that cannot fit is refused now, before the first step.
  if (on_gpu) {
    policy.use_device_runner(&engine.runner(), cfg.recompute_num_layers);
#ifdef LOCKSTEP_CUDA
    cuda_check_step_memory(engine.runner(),
                           std::max(cfg.global_batch_size, cfg.sft_global_batch_size) / cfg.num_microbatches * max_len,
                           cfg.num_microbatches, cfg.recompute_num_layers);
#endif
  }
  const bool tty = isatty(2);
  const bool progress = cfg.progress && root;
  WeightSyncOptions sync_options;
  sync_options.bucket_bytes = std::max<int64_t>(1, int64_t(cfg.weight_sync_bucket_mb * 1048576.0));
  sync_options.audit = cfg.audit_weight_sync;
  // Loads the trainer's weights into the engine; with --audit-weight-sync, then fingerprints both
  // sides by global name (lockstep audit) and stops at the first difference.
  auto sync_engine = [&](const char* when) {
    std::optional<std::string> diff;
    WeightSyncStats stats;
    if (policy.on_device()) {  // the trainer's steps wrote the engine's runner: a new version
      engine.begin_weight_update(rollout::UpdatePolicy::finish);
      engine.end_weight_update();
      if (cfg.audit_weight_sync)
        stats.audit = audit_checkpoint(WeightsSource(policy.gather_to_root(), "trainer")).tensors;
    } else {
      engine.begin_weight_update(rollout::UpdatePolicy::finish);
      stats = policy.stream_weights(
          engine_layout, [&](std::vector<WeightPiece>&& bucket) { engine.load_weight_bucket(bucket); }, sync_options);
      engine.end_weight_update();
    }
    if (!cfg.audit_weight_sync) return;
    // The trainer side was fingerprinted on rank 0 as its buckets passed; the engine's
    // weights are exported by global name (gathered when the engine is sharded).
    const ModelWeights engine_weights = engine.weights();
    std::string message;
    if (root) {
      CheckpointAudit trainer_audit;
      trainer_audit.source = "trainer weights (streamed)";
      trainer_audit.tensors = std::move(stats.audit);
      if (auto d = first_difference(trainer_audit, audit_checkpoint(WeightsSource(engine_weights, "engine weights"))))
        message = *d;
    }
    uint64_t size = message.size();
    world->broadcast_n(&size, 1, 0);
    message.resize(size);
    world->broadcast(message.data(), size, 0);
    if (!message.empty()) diff = message;
    LS_CHECK(!diff, "--audit-weight-sync: ", when, " (engine weight version ", engine.weight_version(),
             "): the engine's weights differ from the trainer's: ", *diff);
  };
  // The whole current model on every rank (the KL reference).
  auto current_weights = [&]() -> const ModelWeights& { return policy.sync_full(); };
  TrainSummary summary;

  // ---- SFT warm start: optimizer steps on task demonstrations. ----
  if (state.sft_steps_done < cfg.sft_warmup_steps) {
    LossConfig sft;
    sft.type = LossType::sft_loss;
    sft.agg = loss_agg_from_name(cfg.loss_agg);
    // Its own batch size: a tiny model learns more per second from many small SFT steps, while an
    // RL step wants every prompt group of its rollout in one optimizer step.
    const int64_t sft_batch = cfg.sft_global_batch_size > 0 ? cfg.sft_global_batch_size : cfg.global_batch_size;
    for (int64_t s = state.sft_steps_done; s < cfg.sft_warmup_steps; ++s) {
      Timer t;
      std::vector<Sample> demos(static_cast<size_t>(sft_batch));
      std::vector<Sample*> batch;
      for (int64_t i = 0; i < sft_batch; ++i) {
        demos[i].example = source->demonstration(state.seed ^ kSftDataKey, s * sft_batch + i);
        demos[i].response = demos[i].example.answer;
        batch.push_back(&demos[i]);
      }
      BatchResult r = train_batch(policy, cfg, sft, batch, "SFT warmup", s + 1, false);
      state.sft_steps_done = s + 1;
      if (root)
        metrics->write({{"sft_step", s + 1},
                        {"train/sft_loss", r.metrics.loss},
                        {"train/grad_norm", r.opt.grad_norm},
                        {"train/lr", r.opt.lr},
                        {"perf/step_time", t.seconds()}});
      if (progress)
        std::fprintf(stderr, "%ssft %lld/%lld | loss %.4f | grad_norm %.3f%s", tty ? "\r" : "",
                     static_cast<long long>(s + 1), static_cast<long long>(cfg.sft_warmup_steps), r.metrics.loss,
                     double(r.opt.grad_norm), tty ? "   " : "\n");
    }
    if (progress && tty) std::fprintf(stderr, "\n");
    sync_engine("after the SFT warm start");
    state.weight_version = engine.weight_version();
  }
  if (use_kl && !ref) ref = std::make_unique<Qwen3Moe>(current_weights().clone(), precision);

  LossConfig loss;
  loss.type = loss_type;
  loss.agg = loss_agg_from_name(cfg.loss_agg);
  loss.eps_clip = cfg.eps_clip;
  loss.eps_clip_high = cfg.eps_clip_high;
  loss.eps_clip_c = cfg.eps_clip_c;
  loss.sequence_ratio = estimator == AdvantageEstimator::gspo;
  loss.kl_coef = use_kl ? cfg.kl_loss_coef : 0.0;
  loss.kl_type = kl_type_from_name(cfg.kl_loss_type);
  loss.entropy_coef = cfg.entropy_coef;

  // Evaluation (prompt data with --eval-prompt-data): before the first RL step and after due ones.
  auto evaluate = [&](int64_t at_step) {
    auto generate = [&](const std::vector<std::optional<rollout::GenerationRequest>>& r) {
      return rollout::run_on_replicas(engine, r, engine_replicas, engine_replica, gather_replicas);
    };
    json e = source->evaluate(at_step, state.seed, generate);
    if (root) {
      metrics->write(e);
      write_plot_png(plot_path, metrics->plot_series());
    }
  };
  if (state.step == 0 && source->eval_due(0)) evaluate(0);

  // ---- RL steps. ----
  int64_t steps_this_run = 0;
  while (state.step < cfg.num_rollout) {
    if (cfg.debug_stop_after >= 0 && steps_this_run >= cfg.debug_stop_after) break;
    const int64_t step = state.step + 1;
    Timer step_timer;

    // Rollout.
    Timer t;
    auto generate = [&](const std::vector<std::optional<rollout::GenerationRequest>>& r) {
      // Every rank gets every sample; independent engine replicas each run their share.
      return rollout::run_on_replicas(engine, r, engine_replicas, engine_replica, gather_replicas);
    };
    StepRollout drawn =
        sample_step(cfg, *source, *env, state.seed ^ kRolloutDataKey,
                    mix_seed(state.seed ^ kSamplingKey, uint64_t(step)), state.data_position, step, generate);
    std::vector<Sample> samples(static_cast<size_t>(samples_per_step));
    int64_t truncated = 0, mixed = 0, response_tokens = 0, total_tokens = 0;
    double reward_sum = 0;
    std::vector<float> rewards;
    std::vector<int64_t> lengths, trained_lengths;
    for (size_t i = 0; i < samples.size(); ++i) {
      Episode& e = drawn.samples[i];
      Sample& s = samples[i];
      s.rollout_logp = e.policy_logprobs();
      s.example = std::move(e.example);
      s.response = std::move(e.response);
      s.loss_mask = std::move(e.loss_mask);
      s.versions = std::move(e.versions);
      s.truncated = e.truncated;
      s.reward = e.reward;
      truncated += s.truncated;
      if (!s.versions.empty() &&
          std::any_of(s.versions.begin(), s.versions.end(), [&](int64_t v) { return v != s.versions[0]; }))
        ++mixed;
      reward_sum += s.reward;
      rewards.push_back(s.reward);
      lengths.push_back(int64_t(s.response.size()));
      trained_lengths.push_back(int64_t(s.rollout_logp.size()));
      response_tokens += int64_t(s.response.size());
      total_tokens += int64_t(s.example.prompt.size() + s.response.size());
    }
    state.data_position += drawn.prompts_drawn;
    const double rollout_time = t.seconds();

    // Advantages.
    auto adv = compute_advantages(estimator, rewards, trained_lengths, cfg.n_samples_per_prompt);
    for (size_t i = 0; i < samples.size(); ++i) samples[i].advantages = std::move(adv[i]);

    // Log-probs: old (recomputed by the trainer unless --use-rollout-logprobs) and reference.
    t.reset();
    OnPolicyCheck check;
    std::vector<Sample*> all;
    for (auto& s : samples) all.push_back(&s);
    if (!cfg.use_rollout_logprobs) {
      std::vector<std::vector<int32_t>> seqs;
      for (auto& s : samples) seqs.push_back(s.sequence());
      const std::vector<std::vector<float>> scored = policy.score_all(seqs);
      std::vector<std::vector<float>> lp;
      for (size_t i = 0; i < samples.size(); ++i) {
        samples[i].old_logp = samples[i].trained_part(scored[i]);
        lp.push_back(samples[i].old_logp);
      }
      check = compare_logprobs(all, lp, cfg.check_true_on_policy, step, 0, *source);
    } else {
      for (auto& s : samples) s.old_logp = s.rollout_logp;
    }
    if (use_kl) {
      std::vector<std::vector<int32_t>> seqs;
      for (auto& s : samples) seqs.push_back(s.sequence());
      auto ref_lp = score_sequences(*ref, seqs);
      for (size_t i = 0; i < samples.size(); ++i) samples[i].ref_logp = samples[i].trained_part(ref_lp[i]);
    }
    const double log_probs_time = t.seconds();

    // Train: samples_per_step / global_batch_size optimizer steps.
    t.reset();
    LossMetrics lm;
    double grad_norm = 0, lr = 0;
    const int64_t opt_steps = samples_per_step / cfg.global_batch_size;
    for (int64_t g = 0; g < opt_steps; ++g) {
      std::vector<Sample*> batch(all.begin() + g * cfg.global_batch_size,
                                 all.begin() + (g + 1) * cfg.global_batch_size);
      const bool inject = g == 0 && step == cfg.debug_inject_nan_step;
      BatchResult r = train_batch(policy, cfg, loss, batch, "RL", step, inject);
      if (cfg.use_rollout_logprobs && g == 0) {
        // The first optimizer step's forward runs on the rollout's weights: check it.
        check = compare_logprobs(batch, r.train_logp, cfg.check_true_on_policy, step, 0, *source);
      }
      lm.add(r.metrics);
      grad_norm += r.opt.grad_norm;
      lr = r.opt.lr;
    }
    const double inv = 1.0 / double(opt_steps);
    const double train_time = t.seconds();

    // Weight sync.
    t.reset();
    const std::string when = "after RL step " + std::to_string(step);
    sync_engine(when.c_str());
    state.weight_version = engine.weight_version();
    const double update_time = t.seconds();
    state.step = step;
    ++steps_this_run;

    if (!cfg.save.empty() && ((cfg.save_interval > 0 && step % cfg.save_interval == 0) || step == cfg.num_rollout ||
                              (cfg.debug_stop_after >= 0 && steps_this_run == cfg.debug_stop_after))) {
      // Checkpoints speak global names: any topology can resume them.
      const ModelWeights& full_weights = policy.gather_to_root();
      const auto write_optimizer = policy.optimizer_writer();
      if (root)
        save_train_checkpoint(cfg.save, state, full_weights, precision, write_optimizer,
                              ref_in_checkpoint ? &ref->weights() : nullptr, config_toml);
    }

    if (!cfg.save_hf.empty() &&
        ((cfg.save_hf_interval > 0 && step % cfg.save_hf_interval == 0) || step == cfg.num_rollout)) {
      const ModelWeights& full_weights = policy.gather_to_root();
      const std::string tokenizer_dir = cfg.tokenizer.empty() ? cfg.load : cfg.tokenizer;
      if (root) save_hf_snapshot(cfg.save_hf, step, full_weights, precision, tokenizer_dir);
    }

    const double step_time = step_timer.seconds();
    const double mean_reward = reward_sum / double(samples.size());
    const double tokens = double(std::max<int64_t>(check.tokens, 1));
    json m = {{"step", step},
              {"train/loss", lm.loss * inv},
              {"train/pg_loss", lm.pg_loss * inv},
              {"train/pg_clipfrac", lm.pg_clipfrac * inv},
              {"train/ppo_kl", lm.ppo_kl * inv},
              {"train/entropy_loss", lm.entropy_loss * inv},
              {"train/kl_loss", lm.kl_loss * inv},
              {"train/grad_norm", grad_norm * inv},
              {"train/lr", lr},
              {"train/train_rollout_logprob_abs_diff", check.abs_diff / tokens},
              {"train/train_rollout_kl", check.kl / tokens},
              {"rollout/rewards", mean_reward},
              {"rollout/response_lengths", double(response_tokens) / double(samples.size())},
              {"rollout/truncated", double(truncated) / double(samples.size())},
              {"rollout/weight_version", state.weight_version},
              {"rollout/weight_version/mixed_version_ratio", double(mixed) / double(samples.size())},
              {"perf/rollout_time", rollout_time},
              {"perf/log_probs_time", log_probs_time},
              {"perf/actor_train_time", train_time},
              {"perf/update_weights_time", update_time},
              {"perf/step_time", step_time},
              {"perf/tokens_per_gpu_per_sec", double(total_tokens) / std::max(step_time, 1e-9)}};
    if (policy.on_device()) {  // what the GPU trainer's memory plan chose for the step
      const Policy::DeviceStepInfo info = policy.device_step_info();
      m["perf/recomputed_layers"] = info.recomputed_layers;
      m["perf/layer_major_microbatches"] = info.layer_major ? 1 : 0;
    }
    source->add_metrics(m);
    std::vector<bool> cut;
    for (const auto& s : samples) cut.push_back(s.truncated);
    add_rollout_metrics(m, rewards, lengths, cut, cfg.n_samples_per_prompt);  // the miles names
    drawn.add_metrics(m, cfg);
    if (root) {
      metrics->write(m);
      write_plot_png(plot_path, metrics->plot_series());
    }
    if (source->eval_due(step)) evaluate(step);
    if (steps_this_run == 1) summary.first_reward = mean_reward;
    summary.last_reward = mean_reward;
    summary.max_abs_diff = std::max(summary.max_abs_diff, check.abs_diff / tokens);
    if (progress)
      std::fprintf(stderr, "%sstep %lld/%lld | reward %.3f | abs_diff %g | grad_norm %.3f | len %.2f | %.2fs/step%s",
                   tty ? "\r" : "", static_cast<long long>(step), static_cast<long long>(cfg.num_rollout), mean_reward,
                   check.abs_diff / tokens, grad_norm * inv, double(response_tokens) / double(samples.size()),
                   step_time, tty ? "   " : "\n");
  }
  if (progress && tty) std::fprintf(stderr, "\n");
  summary.steps_run = steps_this_run;
  summary.seconds = total.seconds();
  return summary;
}

}  // namespace lockstep::rl
