#include <algorithm>

#include "core/error.h"
#include "core/philox.h"
#include "kernels/cpu/sampling.h"
#include "model/runner.h"

namespace lockstep {

void check_top_logprobs_count(int32_t n) {
  LS_CHECK(n >= 0 && n <= kMaxTopLogprobs, "top_logprobs = ", n, " is outside [0, ", kMaxTopLogprobs, "]");
}

SampleResult sample_logits_row(const float* logits, int64_t V, const SampleRequest& r) {
  check_top_logprobs_count(r.top_logprobs);
  const float u = philox_uniform(r.seed, r.stream, r.position);
  const cpu::SampleChoice c = cpu::sample_row(logits, V, r.temperature, r.top_k, r.top_p, u);
  SampleResult out;
  out.token = c.token;
  out.logprob = c.logprob;
  if (r.top_logprobs > 0) {
    int32_t tokens[kMaxTopLogprobs];
    float values[kMaxTopLogprobs];
    out.num_top = int32_t(std::min<int64_t>(r.top_logprobs, V));
    cpu::top_logprobs_row(logits, V, r.temperature, out.num_top, tokens, values);
    for (int32_t i = 0; i < out.num_top; ++i) out.top[i] = {tokens[i], values[i]};
  }
  return out;
}

}  // namespace lockstep
