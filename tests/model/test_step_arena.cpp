// The GPU trainer's step arena (model/cuda/step_arena.h), its bookkeeping on host memory: a
// step's buffers come from one block kept between steps once a step has sized it, a larger
// step overflows and resizes it, a larger plan drops it before the step, and the block goes
// when the engine asks for memory between steps. (The trainer's GPU tests run it on the device.)
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "model/cuda/step_arena.h"

namespace lockstep {
namespace {

using cuda_model::StepArena;

std::vector<char*> three_buffers(StepArena& arena) {
  std::vector<char*> p;
  p.push_back(reinterpret_cast<char*>(arena.alloc<float>(1000)));
  p.push_back(reinterpret_cast<char*>(arena.alloc<int32_t>(3)));
  p.push_back(reinterpret_cast<char*>(arena.alloc<uint16_t>(1 << 20)));
  return p;
}

TEST(StepArena, ASecondStepOfTheSameSizeReusesTheFirstStepsBlock) {
  StepArena arena(Device::cpu);
  arena.reset();
  three_buffers(arena);  // no block yet: each buffer its own allocation
  EXPECT_EQ(arena.held_bytes(), 0u);
  arena.reset();
  const auto second = three_buffers(arena);
  // 4000 -> 4096, 12 -> 256, 2 MiB: one block, carved in order, each 256-byte aligned.
  EXPECT_EQ(second[1] - second[0], 4096);
  EXPECT_EQ(second[2] - second[1], 256);
  std::memset(second[2], 1, 2 << 20);  // the block holds the whole step
  EXPECT_EQ(arena.held_bytes(), 0u);   // in use by the step
  arena.reset();
  EXPECT_EQ(arena.held_bytes(), size_t(4096 + 256 + (2 << 20)));
  EXPECT_EQ(three_buffers(arena), second);  // the same block, the same places
}

TEST(StepArena, ALargerStepOverflowsAndTheNextResetSizesTheBlockForIt) {
  StepArena arena(Device::cpu);
  arena.alloc<float>(256);
  arena.reset();
  arena.alloc<float>(256);  // the block: 1 KiB
  arena.reset();
  EXPECT_EQ(arena.held_bytes(), 1024u);
  float* a = arena.alloc<float>(128);
  float* big = arena.alloc<float>(1 << 20);  // past the block: its own allocation
  float* b = arena.alloc<float>(64);         // still fits the block
  EXPECT_EQ(reinterpret_cast<char*>(b) - reinterpret_cast<char*>(a), 512);
  std::memset(big, 0, 4 << 20);
  arena.reset();
  EXPECT_EQ(arena.held_bytes(), 0u);  // the block went; the next step makes one of the largest step's size
  arena.alloc<float>(1);
  arena.reset();
  EXPECT_EQ(arena.held_bytes(), size_t(512 + (4 << 20) + 256));
}

TEST(StepArena, ALargerPlanDropsTheBlockSoTheStepAllocatesAfresh) {
  StepArena arena(Device::cpu);
  arena.prepare(1000);
  arena.alloc<float>(256);
  arena.reset();
  arena.prepare(1000);
  float* first = arena.alloc<float>(256);  // the block
  arena.reset();
  EXPECT_EQ(arena.held_bytes(), 1024u);
  arena.prepare(1000);  // the same plan: the block stays
  EXPECT_EQ(arena.alloc<float>(256), first);
  arena.reset();
  arena.prepare(5000);  // a larger plan: no block this step, none made from the old size
  EXPECT_EQ(arena.held_bytes(), 0u);
  arena.alloc<float>(1024);
  arena.alloc<float>(64);
  arena.reset();
  EXPECT_EQ(arena.held_bytes(), 0u);
  arena.prepare(5000);
  arena.alloc<float>(1);  // the block of the larger step: 4096 + 256
  arena.reset();
  EXPECT_EQ(arena.held_bytes(), size_t(4096 + 256));
  arena.alloc<float>(1);
  arena.prepare(1e9);  // during a step: nothing changes
  float* x = arena.alloc<float>(64);
  float* y = arena.alloc<float>(0);
  EXPECT_EQ(y - x, 64);  // still carved from the block
}

TEST(StepArena, ReleaseBetweenStepsFreesTheBlockButNotDuringOne) {
  StepArena arena(Device::cpu);
  arena.alloc<float>(1024);
  arena.reset();
  arena.alloc<float>(1024);
  arena.release_if_idle();  // a step is under way: kept
  arena.reset();
  EXPECT_EQ(arena.held_bytes(), 4096u);
  arena.release_if_idle();
  EXPECT_EQ(arena.held_bytes(), 0u);
  arena.alloc<float>(1);  // the next step makes the block again, of the largest step's size
  arena.reset();
  EXPECT_EQ(arena.held_bytes(), 4096u);
}

}  // namespace
}  // namespace lockstep
