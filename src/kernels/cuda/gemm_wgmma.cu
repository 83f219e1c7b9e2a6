// Hopper warpgroup-MMA (wgmma) kernels of the batch-invariant GEMM (gemm.h): none yet.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/gemm.h"

namespace lockstep::cuda {

void gemm_wgmma_with_config(const GemmArgs&, int config, cudaStream_t) {
  LS_CHECK(false, "gemm: no wgmma configuration ", config);
}

}  // namespace lockstep::cuda
