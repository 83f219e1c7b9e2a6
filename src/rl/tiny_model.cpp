#include "rl/tiny_model.h"

#include "rl/tasks.h"

namespace lockstep::rl {

ModelConfig tiny_task_model_config() {
  ModelConfig c;
  c.vocab_size = 32;
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.moe_intermediate_size = 64;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.num_experts = 8;
  c.num_experts_per_tok = 2;
  c.norm_topk_prob = true;
  c.tie_word_embeddings = false;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000.0;
  c.max_position_embeddings = 64;
  c.eos_token_ids = {vocab::kEos};
  return c;
}

}  // namespace lockstep::rl
