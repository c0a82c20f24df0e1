#include "steering.h"

#include <string>

#include "errors.h"

namespace llama_steer {

void check_steer(int32_t code, const char* what) {
    if (code >= 0) return;
    const std::string msg = std::string(what) + ": " + llama_steer_strerror(code);
    switch (code) {
        case LLAMA_STEER_ERR_UNSUPPORTED:
        case LLAMA_STEER_ERR_ALLOC:
            throw SteeringError(msg);
        default:
            throw InvalidArgument(msg);
    }
}

void Steering::init(int32_t n_slots, int32_t n_dirs) {
    check_steer(llama_steer_init(ctx_.get(), n_slots, n_dirs), "steering init");
}

int32_t Steering::n_slots() const {
    const int32_t n = llama_steer_n_slots(ctx_.get());
    check_steer(n, "steering n_slots");
    return n;
}

int32_t Steering::n_dirs() const {
    const int32_t n = llama_steer_n_dirs(ctx_.get());
    check_steer(n, "steering n_dirs");
    return n;
}

bool Steering::layer_hooked(int32_t il) const {
    const int32_t r = llama_steer_layer_hooked(ctx_.get(), il);
    check_steer(r, "layer_hooked");
    return r == 1;
}

void Steering::set_add(int32_t slot, int32_t il, const float* data, int32_t n_embd) {
    check_steer(llama_steer_slot_set_add(ctx_.get(), slot, il, data, n_embd),
                ("steering vector for layer " + std::to_string(il)).c_str());
}

void Steering::set_ablate(int32_t slot, int32_t il, const float* dirs, int32_t n_dirs, int32_t n_embd, float coef) {
    check_steer(llama_steer_slot_set_ablate(ctx_.get(), slot, il, dirs, n_dirs, n_embd, coef),
                ("ablation directions for layer " + std::to_string(il)).c_str());
}

void Steering::set_rows(int32_t slot, int32_t il, const float* data, int32_t n_rows, int32_t n_embd) {
    check_steer(llama_steer_slot_set_rows(ctx_.get(), slot, il, data, n_rows, n_embd),
                ("steering rows for layer " + std::to_string(il)).c_str());
}

int32_t Steering::n_rows(int32_t slot) const {
    const int32_t n = llama_steer_slot_n_rows(ctx_.get(), slot);
    check_steer(n, "steering n_rows");
    return n;
}

void Steering::clear(int32_t slot) { check_steer(llama_steer_slot_clear(ctx_.get(), slot), "steering clear"); }

void Steering::bind(llama_seq_id seq, int32_t slot, float strength, llama_pos p0, llama_pos p1) {
    check_steer(llama_steer_bind(ctx_.get(), seq, slot, strength, p0, p1), "steering bind");
}

int32_t Steering::unbind(llama_seq_id seq, int32_t slot) {
    const int32_t n = llama_steer_unbind(ctx_.get(), seq, slot);
    check_steer(n, "steering unbind");
    return n;
}

llama_steer_stats Steering::stats() const { return llama_steer_get_stats(ctx_.get()); }

std::string Steering::layer_buffer(int32_t il, int32_t kind) const {
    const char* name = llama_steer_layer_buffer(ctx_.get(), il, kind);
    return name ? std::string(name) : std::string();
}

}  // namespace llama_steer
