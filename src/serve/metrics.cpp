#include "serve/metrics.h"

#include <cstdio>

namespace lockstep::serve {

namespace {

void family(std::string& out, const char* name, const char* type, const char* help) {
  out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
}

void sample(std::string& out, const std::string& name, double value) {
  char buf[64];
  std::snprintf(buf, sizeof buf, " %.17g\n", value);
  out += name + buf;
}

void metric(std::string& out, const char* name, const char* type, const char* help, double value) {
  family(out, name, type, help);
  sample(out, name, value);
}

}  // namespace

std::string prometheus_text(const SchedulerMetrics& m) {
  std::string out;
  metric(out, "lockstep_requests_total", "counter", "Requests accepted.", double(m.requests_accepted));
  metric(out, "lockstep_requests_rejected_total", "counter", "Requests refused because the server was full.",
         double(m.requests_rejected));
  metric(out, "lockstep_requests_cancelled_total", "counter", "Requests cancelled (the client disconnected).",
         double(m.requests_cancelled));
  family(out, "lockstep_sequences_finished_total", "counter", "Choices finished, by finish_reason.");
  sample(out, "lockstep_sequences_finished_total{finish_reason=\"stop\"}", double(m.finished_stop));
  sample(out, "lockstep_sequences_finished_total{finish_reason=\"length\"}", double(m.finished_length));
  sample(out, "lockstep_sequences_finished_total{finish_reason=\"abort\"}", double(m.finished_abort));
  metric(out, "lockstep_prompt_tokens_total", "counter", "Prompt tokens of accepted choices.", double(m.prompt_tokens));
  metric(out, "lockstep_generation_tokens_total", "counter", "Tokens sampled.", double(m.generation_tokens));
  metric(out, "lockstep_generation_tokens_per_second", "gauge", "Tokens sampled per second over the last ~10 s.",
         m.generation_tokens_per_s);
  metric(out, "lockstep_running_sequences", "gauge", "Choices in the engine.", double(m.running));
  metric(out, "lockstep_queue_depth", "gauge", "Choices waiting to enter the engine.", double(m.queued));
  metric(out, "lockstep_kv_pages_in_use", "gauge", "KV cache pages referenced by sequences.",
         double(m.kv_pages_in_use));
  metric(out, "lockstep_kv_pages_total", "gauge", "KV cache pages in the pool.", double(m.kv_pages_total));
  metric(out, "lockstep_engine_steps_total", "counter", "Engine steps (one forward each).", double(m.engine_steps));
  metric(out, "lockstep_prefix_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
         double(m.prefix_hit_tokens));
  metric(out, "lockstep_preemptions_total", "counter", "Sequences preempted for KV pages.", double(m.preemptions));
  metric(out, "lockstep_weight_version", "gauge", "The weight version new tokens are sampled with.",
         double(m.weight_version));
  metric(out, "lockstep_paused", "gauge", "1 while generation is paused.", m.paused ? 1.0 : 0.0);
  return out;
}

}  // namespace lockstep::serve
