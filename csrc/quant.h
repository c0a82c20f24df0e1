// Conversion between ggml's storage types and float32, with ggml's own
// kernels (the same quantizer llama-quantize uses), for editing weights
// (bake.py) without PyTorch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace llama_steer {

// Bytes of one row of n_per_row values of `type`. InvalidArgument for an
// unknown or removed type, or a row length that is not a whole number of blocks.
size_t quant_row_size(int32_t type, int64_t n_per_row);

// ggml's name of the type ("q4_K", "f32", ...).
std::string quant_type_name(int32_t type);

// Whether ggml can both read `type` as float32 and write it from float32
// without an importance matrix.
bool quant_can_roundtrip(int32_t type);

// src: nrows rows of `type`, dst: nrows * n_per_row floats.
void dequantize_rows(int32_t type, const uint8_t* src, size_t src_bytes, float* dst, int64_t nrows, int64_t n_per_row);

// src: nrows * n_per_row floats, dst: nrows rows of `type`; rows are split
// over n_threads threads (ggml's quantizers are pure per-row functions).
void quantize_rows(int32_t type, const float* src, uint8_t* dst, size_t dst_bytes, int64_t nrows, int64_t n_per_row,
                   int32_t n_threads);

}  // namespace llama_steer
