// A loaded GGUF model: weights, vocabulary and metadata. Immutable once
// loaded, so contexts share it through std::shared_ptr and it outlives each
// of them.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "llama-cpp.h"

namespace llama_steer {

class Model {
public:
    // writable: weights read into memory of our own (no mmap), which a
    // trainer may change; otherwise they stay a read-only map of the file.
    // rpc: "host:port" of ggml RPC workers; n_gpu_layers of the model's
    // layers go to their devices (and this machine's GPUs), as in llama.cpp.
    Model(const std::string& path, int32_t n_gpu_layers, bool writable = false,
          const std::vector<std::string>& rpc = {});

    const llama_model* get() const { return model_.get(); }
    llama_model* get() { return model_.get(); }
    const llama_vocab* vocab() const { return vocab_; }

    int32_t n_layer() const { return llama_model_n_layer(model_.get()); }
    int32_t n_embd() const { return llama_model_n_embd(model_.get()); }
    int32_t n_vocab() const { return llama_vocab_n_tokens(vocab_); }
    int32_t n_ctx_train() const { return llama_model_n_ctx_train(model_.get()); }
    uint64_t size() const { return llama_model_size(model_.get()); }
    uint64_t n_params() const { return llama_model_n_params(model_.get()); }
    std::string meta(const std::string& key) const;  // "" if absent
    std::string chat_template() const;               // "" if none
    std::string builtin_template_for_arch() const;   // "" if llama.cpp has none

    std::vector<llama_token> tokenize(const std::string& text, bool add_special, bool parse_special) const;
    // Raw bytes of one token (may be part of a multi-byte UTF-8 character).
    std::string token_to_piece(llama_token token, bool special) const;
    std::string detokenize(const std::vector<llama_token>& tokens, bool remove_special, bool unparse_special) const;
    // messages: (role, content) pairs; uses the model's own template.
    std::string apply_chat_template(const std::vector<std::pair<std::string, std::string>>& messages,
                                    bool add_generation_prompt) const;
    bool is_eog(llama_token token) const { return llama_vocab_is_eog(vocab_, token); }
    void check_token(llama_token token) const;

    const std::vector<std::string>& rpc() const { return rpc_; }
    // The first RPC worker whose connection was lost since the model loaded
    // ("" if none): its layers are gone, so the model cannot decode again.
    std::string lost_worker() const;

private:
    llama_model_ptr model_;
    const llama_vocab* vocab_ = nullptr;
    std::vector<std::string> rpc_;
    std::vector<uint64_t> rpc_failures_at_load_;
};

}  // namespace llama_steer
