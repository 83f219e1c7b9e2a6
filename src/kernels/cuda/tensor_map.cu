// bf16_tensor_map: cuTensorMapEncodeTiled through the runtime's driver entry point (no link
// against libcuda).
#include <cudaTypedefs.h>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/tensor_map.h"

namespace lockstep::cuda {
namespace {

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    LS_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
    LS_CHECK(found == cudaDriverEntryPointSuccess && fn != nullptr,
             "tensor maps: the driver has no cuTensorMapEncodeTiled (TMA needs CUDA 12 or later)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

}  // namespace

CUtensorMap bf16_tensor_map(const void* data, int64_t rows, int64_t cols, int64_t ld, int box_rows, const char* what) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {cuuint64_t(cols), cuuint64_t(rows)};
  const cuuint64_t strides[1] = {cuuint64_t(ld) * 2};
  const cuuint32_t box[2] = {64, cuuint32_t(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r =
      tensor_map_encoder()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(data), dims, strides, box,
                           element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                           CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  LS_CHECK(r == CUDA_SUCCESS, what, ": cuTensorMapEncodeTiled failed (", int(r), ") for a ", rows, " x ", cols,
           " bf16 matrix with row stride ", ld, " at ", data);
  return map;
}

}  // namespace lockstep::cuda
