// The GPU's fused parameter layout (model/device_layout.h) against the names table: every
// parameter in for_each_param order with its name and size, and each buffer tiled exactly by
// its parameters (no gap, no overlap), for MoE, dense and tied models.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <utility>

#include "model/device_layout.h"
#include "model/weights.h"
#include "test_helpers.h"

namespace lockstep {
namespace {

void expect_layout_matches(const ModelConfig& c) {
  const ModelWeights w = ModelWeights::random(c, 5, Precision::bfloat16);
  const std::vector<DeviceSegment> segments = device_segments(c);
  size_t k = 0;
  std::map<std::pair<int, int64_t>, std::vector<std::pair<int64_t, int64_t>>> tiles;  // (buffer, layer) -> ranges
  for_each_param(w, [&](const ParamSlot& slot, const Tensor& t) {
    ASSERT_LT(k, segments.size());
    const DeviceSegment& s = segments[k++];
    EXPECT_EQ(param_name(c, s.slot), param_name(c, slot));
    EXPECT_EQ(s.numel, t.numel()) << param_name(c, slot);
    EXPECT_EQ(s.is_norm, t.ndim() == 1) << param_name(c, slot);
    tiles[{int(s.buffer), s.slot.layer}].push_back({s.offset, s.offset + s.numel});
  });
  EXPECT_EQ(k, segments.size());
  for (auto& [key, ranges] : tiles) {
    std::sort(ranges.begin(), ranges.end());
    int64_t at = 0;
    for (auto [begin, end] : ranges) {
      EXPECT_EQ(begin, at) << "buffer " << key.first << " layer " << key.second;
      at = end;
    }
    EXPECT_EQ(at, device_buffer_floats(c, DeviceBuffer(key.first), key.second))
        << "buffer " << key.first << " layer " << key.second;
  }
}

TEST(DeviceLayout, EveryParameterInNameOrderTilingItsBuffer) {
  ModelConfig c = ModelWeights::load(testing::fixture_model_dir(), Precision::bfloat16).config;
  expect_layout_matches(c);
  c.tie_word_embeddings = true;  // the head is the embedding: not listed
  expect_layout_matches(c);
  c.tie_word_embeddings = false;
  c.mlp_only_layers = {1};  // a dense layer: no router, its MLP in the same blocks
  ASSERT_FALSE(c.is_moe_layer(1));
  expect_layout_matches(c);
  EXPECT_EQ(device_buffer_floats(c, DeviceBuffer::router, 1), 0);
}

}  // namespace
}  // namespace lockstep
