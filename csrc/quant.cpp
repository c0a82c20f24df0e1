#include "quant.h"

#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

#include "errors.h"
#include "ggml.h"

namespace llama_steer {

namespace {

const ggml_type_traits* traits_of(int32_t type) {
    if (type < 0 || type >= GGML_TYPE_COUNT) {
        throw InvalidArgument("unknown ggml type " + std::to_string(type));
    }
    const auto* tr = ggml_get_type_traits(static_cast<ggml_type>(type));
    if (tr->blck_size <= 0 || tr->type_size == 0) {  // a removed type (Q4_2, ...)
        throw InvalidArgument("ggml type " + std::to_string(type) + " no longer exists");
    }
    return tr;
}

// The types ggml_quantize_chunk writes (its switch); anything else aborts there.
bool quantizer_exists(ggml_type t) {
    switch (t) {
        case GGML_TYPE_Q1_0: case GGML_TYPE_Q2_0: case GGML_TYPE_Q4_0: case GGML_TYPE_Q4_1:
        case GGML_TYPE_Q5_0: case GGML_TYPE_Q5_1: case GGML_TYPE_Q8_0: case GGML_TYPE_MXFP4:
        case GGML_TYPE_NVFP4: case GGML_TYPE_Q2_K: case GGML_TYPE_Q3_K: case GGML_TYPE_Q4_K:
        case GGML_TYPE_Q5_K: case GGML_TYPE_Q6_K: case GGML_TYPE_TQ1_0: case GGML_TYPE_TQ2_0:
        case GGML_TYPE_IQ2_XXS: case GGML_TYPE_IQ2_XS: case GGML_TYPE_IQ3_XXS: case GGML_TYPE_IQ3_S:
        case GGML_TYPE_IQ2_S: case GGML_TYPE_IQ1_S: case GGML_TYPE_IQ1_M: case GGML_TYPE_IQ4_NL:
        case GGML_TYPE_IQ4_XS: case GGML_TYPE_F16: case GGML_TYPE_BF16: case GGML_TYPE_F32:
            return true;
        default:
            return false;
    }
}

void check_shape(int32_t type, int64_t nrows, int64_t n_per_row, size_t bytes, const char* what) {
    if (nrows < 0 || n_per_row <= 0) {
        throw InvalidArgument("bad shape: " + std::to_string(nrows) + " rows of " + std::to_string(n_per_row));
    }
    const size_t want = quant_row_size(type, n_per_row) * static_cast<size_t>(nrows);
    if (bytes != want) {
        throw InvalidArgument(std::string(what) + " holds " + std::to_string(bytes) + " bytes, " +
                              std::to_string(nrows) + " rows of " + quant_type_name(type) + " need " +
                              std::to_string(want));
    }
}

}  // namespace

size_t quant_row_size(int32_t type, int64_t n_per_row) {
    const auto* tr = traits_of(type);
    if (n_per_row <= 0 || n_per_row % tr->blck_size != 0) {
        throw InvalidArgument("a row of " + std::to_string(n_per_row) + " values is not a whole number of " +
                              tr->type_name + " blocks (" + std::to_string(tr->blck_size) + ")");
    }
    return ggml_row_size(static_cast<ggml_type>(type), n_per_row);
}

std::string quant_type_name(int32_t type) { return traits_of(type)->type_name; }

bool quant_can_roundtrip(int32_t type) {
    const auto* tr = traits_of(type);
    const auto t = static_cast<ggml_type>(type);
    const bool readable = tr->to_float != nullptr || t == GGML_TYPE_F32;  // f32 has no converter: it is float
    return readable && quantizer_exists(t) && !ggml_quantize_requires_imatrix(t);
}

void dequantize_rows(int32_t type, const uint8_t* src, size_t src_bytes, float* dst, int64_t nrows,
                     int64_t n_per_row) {
    check_shape(type, nrows, n_per_row, src_bytes, "the source");
    if (type == GGML_TYPE_F32) {
        std::memcpy(dst, src, src_bytes);
        return;
    }
    const auto* tr = traits_of(type);
    if (tr->to_float == nullptr) {
        throw InvalidArgument(std::string("ggml cannot read ") + tr->type_name + " as float32");
    }
    const size_t row = quant_row_size(type, n_per_row);
    for (int64_t r = 0; r < nrows; ++r) {
        tr->to_float(src + r * row, dst + r * n_per_row, n_per_row);
    }
}

void quantize_rows(int32_t type, const float* src, uint8_t* dst, size_t dst_bytes, int64_t nrows, int64_t n_per_row,
                   int32_t n_threads) {
    check_shape(type, nrows, n_per_row, dst_bytes, "the destination");
    if (!quant_can_roundtrip(type)) {
        throw InvalidArgument("ggml cannot write " + quant_type_name(type) +
                              " from float32 without an importance matrix");
    }
    const auto t = static_cast<ggml_type>(type);
    ggml_quantize_init(t);  // builds the IQ grids once, before the threads share them
    const int64_t n = std::max<int64_t>(1, std::min<int64_t>(n_threads, nrows));
    const int64_t per = (nrows + n - 1) / n;
    std::vector<std::thread> workers;
    std::vector<size_t> written(n, 0);
    for (int64_t i = 0; i < n; ++i) {
        const int64_t r0 = i * per;
        const int64_t r1 = std::min(nrows, r0 + per);
        if (r0 >= r1) break;
        workers.emplace_back([=, &written] {
            written[i] = ggml_quantize_chunk(t, src, dst, r0 * n_per_row, r1 - r0, n_per_row, nullptr);
        });
    }
    for (auto& w : workers) w.join();
    size_t total = 0;
    for (size_t w : written) total += w;
    if (total != dst_bytes) {
        throw Error("ggml wrote " + std::to_string(total) + " bytes of " + quant_type_name(type) + ", expected " +
                    std::to_string(dst_bytes));
    }
}

}  // namespace llama_steer
