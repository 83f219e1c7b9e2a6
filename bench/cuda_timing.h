// The GPU benchmarks' timing of a launch sequence: one warm-up run, then CUDA events around
// each of 5 runs, the median in milliseconds. Host code, for .cpp and .cu benchmarks alike.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "core/error.h"

namespace lockstep::bench {

inline double cuda_median_ms(const std::function<void()>& launch) {
  const auto check = [](cudaError_t e, const char* what) {
    LS_CHECK(e == cudaSuccess, what, ": ", cudaGetErrorString(e));
  };
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  launch();
  std::vector<float> ms;
  for (int r = 0; r < 5; ++r) {
    check(cudaEventRecord(start), "cudaEventRecord");
    launch();
    check(cudaEventRecord(stop), "cudaEventRecord");
    check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float t = 0;
    check(cudaEventElapsedTime(&t, start, stop), "cudaEventElapsedTime");
    ms.push_back(t);
  }
  cudaEventDestroy(start), cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace lockstep::bench
