// The steering buffer of a Context: C++ over the llama_steer_* C API that our
// llama.cpp patch adds (third_party/patches, include/llama-steer.h). Return
// codes become exceptions here and nowhere else.
#pragma once

#include <cstdint>
#include <string>

#include "context.h"
#include "llama-steer.h"

namespace llama_steer {

class Steering {
public:
    // Holds the context (Context::Use) for the object's lifetime.
    explicit Steering(Context& ctx) : ctx_(ctx), use_(ctx) {}

    void init(int32_t n_slots, int32_t n_dirs);
    int32_t n_slots() const;
    int32_t n_dirs() const;
    bool layer_hooked(int32_t il) const;
    // data: n_embd floats, or nullptr to clear the layer.
    void set_add(int32_t slot, int32_t il, const float* data, int32_t n_embd);
    // dirs: n_dirs x n_embd floats (row-major), or nullptr to clear.
    void set_ablate(int32_t slot, int32_t il, const float* dirs, int32_t n_dirs, int32_t n_embd, float coef);
    // data: n_rows x n_embd floats (row-major): row i is added at position
    // p0 + i of a bound sequence; nullptr clears the layer.
    void set_rows(int32_t slot, int32_t il, const float* data, int32_t n_rows, int32_t n_embd);
    int32_t n_rows(int32_t slot) const;
    void clear(int32_t slot);
    void bind(llama_seq_id seq, int32_t slot, float strength, llama_pos p0, llama_pos p1);
    int32_t unbind(llama_seq_id seq, int32_t slot);
    llama_steer_stats stats() const;
    // buffer type of layer il's steering tensors of a kind (0 vectors, 1 ablation, 2 rows); "" if none
    std::string layer_buffer(int32_t il, int32_t kind) const;

private:
    Context& ctx_;
    Context::Use use_;
};

// Throws the exception that matches a negative llama_steer status code.
void check_steer(int32_t code, const char* what);

}  // namespace llama_steer
