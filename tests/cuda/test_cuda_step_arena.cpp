// The trainer's step arena (model/cuda/step_arena.h): a step's buffers come from one block
// kept between steps once a step has sized it, a larger step overflows and resizes it, and
// the block goes when the engine asks for memory between steps.
#include <cuda_runtime.h>

#include "cuda_test_util.h"
#include "model/cuda/step_arena.h"

namespace lockstep {
namespace {

using cuda_model::StepArena;

size_t free_device_bytes() {
  size_t free_bytes = 0, total = 0;
  EXPECT_EQ(cudaMemGetInfo(&free_bytes, &total), cudaSuccess);
  return free_bytes;
}

TEST(CudaStepArena, ASecondStepOfTheSameSizeReusesTheFirstStepsBlock) {
  LS_SKIP_WITHOUT_GPU();
  StepArena arena;
  const auto step = [&] {
    std::vector<char*> p;
    p.push_back(reinterpret_cast<char*>(arena.alloc<float>(1000)));
    p.push_back(reinterpret_cast<char*>(arena.alloc<int32_t>(3)));
    p.push_back(reinterpret_cast<char*>(arena.alloc<uint16_t>(1 << 20)));
    return p;
  };
  arena.reset();
  step();  // no block yet: each buffer its own allocation
  EXPECT_EQ(arena.held_bytes(), 0u);
  arena.reset();
  const auto second = step();
  // 4000 -> 4096, 12 -> 256, 2 MiB: one block, carved in order, each 256-byte aligned.
  EXPECT_EQ(second[1] - second[0], 4096);
  EXPECT_EQ(second[2] - second[1], 256);
  EXPECT_EQ(arena.held_bytes(), 0u);  // in use by the step
  arena.reset();
  EXPECT_EQ(arena.held_bytes(), size_t(4096 + 256 + (2 << 20)));
  const auto third = step();
  EXPECT_EQ(third, second);  // the same block, the same places
}

TEST(CudaStepArena, ALargerStepOverflowsAndTheNextResetSizesTheBlockForIt) {
  LS_SKIP_WITHOUT_GPU();
  StepArena arena;
  arena.alloc<float>(256);
  arena.reset();
  arena.alloc<float>(256);  // the block: 1 KiB
  arena.reset();
  EXPECT_EQ(arena.held_bytes(), 1024u);
  float* a = arena.alloc<float>(128);
  float* big = arena.alloc<float>(1 << 20);  // past the block: its own allocation
  float* b = arena.alloc<float>(64);         // still fits the block
  EXPECT_EQ(reinterpret_cast<char*>(b) - reinterpret_cast<char*>(a), 512);
  EXPECT_TRUE(big < a || big >= a + 256);
  EXPECT_EQ(cudaMemset(big, 0, 4 << 20), cudaSuccess);  // a usable device buffer
  arena.reset();
  EXPECT_EQ(arena.held_bytes(), 0u);  // the block went; the next step makes one of the largest step's size
  arena.alloc<float>(1);
  arena.reset();
  EXPECT_EQ(arena.held_bytes(), size_t(512 + (4 << 20) + 256));
}

TEST(CudaStepArena, ReleaseBetweenStepsFreesTheBlockButNotDuringOne) {
  LS_SKIP_WITHOUT_GPU();
  StepArena arena;
  const int64_t n = int64_t(64) << 20;  // 256 MiB of floats
  arena.alloc<float>(n);
  arena.reset();
  arena.alloc<float>(n);
  arena.release_if_idle();  // a step is under way: kept
  arena.reset();
  EXPECT_EQ(arena.held_bytes(), size_t(n) * 4);
  const size_t before = free_device_bytes();
  arena.release_if_idle();
  EXPECT_EQ(arena.held_bytes(), 0u);
  EXPECT_GE(free_device_bytes(), before + size_t(n) * 4 - (size_t(8) << 20));
}

}  // namespace
}  // namespace lockstep
