// TMA tensor maps (Hopper): a 2-D bf16 matrix read in boxes with the 128-byte swizzle that
// wgmma.cuh's shared-memory layouts use. Host side; the device side is tma_load (mbarrier.cuh).
#pragma once
#include <cuda.h>

#include <cstdint>

namespace lockstep::cuda {

// A [rows, cols] bf16 matrix at `data` with row stride `ld` elements, read in boxes of 64
// columns (128 bytes) x box_rows rows; reads outside the matrix give zeros. `what` names the
// caller in the error when the driver refuses the map (alignment: data and ld * 2 bytes
// multiples of 16).
CUtensorMap bf16_tensor_map(const void* data, int64_t rows, int64_t cols, int64_t ld, int box_rows, const char* what);

}  // namespace lockstep::cuda
