// A llama.cpp context over a shared Model: the KV cache, decode, logits and
// sampling. One Context serves many sequences (seq ids 0..n_seq_max-1).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "llama-cpp.h"
#include "model.h"

namespace llama_steer {

struct ContextParams {
    int32_t n_ctx = 4096;
    int32_t n_batch = 512;
    int32_t n_ubatch = 512;
    int32_t n_seq_max = 16;
    int32_t n_threads = 0;  // 0: all cores
    bool embeddings = false;
    bool kv_f32 = false;  // F32 K/V cache and attention, no F16 anywhere (exactness tests)
};

// Tokens of a batch: which sequence, where, and whether outputs are kept.
// A token may belong to several sequences (a shared prefix decoded once):
// then seq_offsets (size n+1) delimits its ids in seq, else seq holds one id
// per token.
struct BatchTokens {
    std::vector<llama_token> tokens;
    std::vector<llama_pos> pos;
    std::vector<llama_seq_id> seq;
    std::vector<int8_t> output;
    std::vector<int32_t> seq_offsets;
};

class Context {
public:
    // Held by every operation on the llama.cpp context: a second thread
    // entering while one is inside gets ConcurrentUseError instead of a
    // crash inside llama.cpp. Re-entrant within one thread. (Model
    // serializes its calls with a lock; this catches code that bypasses it.)
    class Use {
    public:
        explicit Use(Context& ctx);
        ~Use();
        Use(const Use&) = delete;
        Use& operator=(const Use&) = delete;

    private:
        Context& ctx_;
    };

    Context(std::shared_ptr<Model> model, const ContextParams& params);
    ~Context() = default;
    Context(const Context&) = delete;
    Context& operator=(const Context&) = delete;

    // Frees the context; idempotent. Every later call raises ClosedError.
    void close();
    bool closed() const { return !ctx_; }

    const Model& model() const { return *model_; }
    llama_context* get();  // raises ClosedError when closed
    int32_t n_ctx() const { return n_ctx_; }
    int32_t n_seq_max() const { return params_.n_seq_max; }
    int32_t n_batch() const { return params_.n_batch; }
    int32_t n_threads() const { return params_.n_threads; }

    // KV cache management.
    void clear();
    void seq_rm(llama_seq_id seq, llama_pos p0, llama_pos p1);
    void seq_cp(llama_seq_id src, llama_seq_id dst, llama_pos p0, llama_pos p1);

    // Decodes the batch in chunks of n_batch. After it, logits(i) holds the
    // row of each token i whose output flag was set (of the last chunk only,
    // so callers put outputs in the final chunk or decode in one go).
    void decode(const BatchTokens& batch);
    // Captures the output of these blocks (after steering) for the output
    // rows of later decodes; empty disables capture.
    void set_capture_layers(const std::vector<int32_t>& layers);
    const std::vector<int32_t>& capture_layers() const { return capture_layers_; }
    // decode(), returning the captured rows of every output token, in batch
    // order, as [n_outputs][n_capture_layers][n_embd]. Chunks hold at most
    // max_outputs outputs (bounding llama.cpp's logits buffer); pass n_batch
    // to split the batch exactly as decode() does.
    // With logits=false the decode is capture-only (llama_steer_capture_only):
    // no LM head, no logits, chunks of n_batch, and the blocks after the
    // deepest captured layer do not run, so the KV cache of these tokens is
    // incomplete: clear it before decoding the sequences for logits.
    std::vector<float> decode_capture(const BatchTokens& batch, int32_t max_outputs = 64, bool logits = true);
    // Decodes one token per listed sequence, each with its logits kept.
    void decode_step(const std::vector<llama_token>& tokens, const std::vector<llama_pos>& pos,
                     const std::vector<llama_seq_id>& seq);
    // Logits of batch row i (negative: from the end) of the last decode.
    const float* logits(int32_t i);
    // log softmax(logits(rows[k]))[tokens[k]] for every k: how likely the
    // model found each token it was given (scoring a continuation).
    std::vector<float> token_logprobs(const std::vector<int32_t>& rows, const std::vector<llama_token>& tokens);
    // llama.cpp's own single control vector (llama_set_adapter_cvec), kept
    // as the reference the steering buffer is tested against. data holds
    // layers 1..n_layer-1 back to back; empty data disables it.
    void set_upstream_cvec(const std::vector<float>& data, int32_t il_start, int32_t il_end);

private:
    void check_seq(llama_seq_id seq) const;
    void run(int32_t n);
    void decode_chunks(const BatchTokens& batch, std::vector<float>* captured, int32_t max_outputs);

    std::atomic<std::thread::id> owner_{};
    int32_t depth_ = 0;  // nested Uses of the owning thread
    std::shared_ptr<Model> model_;
    ContextParams params_;
    llama_context_ptr ctx_;
    int32_t n_ctx_ = 0;
    std::vector<int32_t> capture_layers_;
    llama_batch batch_{};
    std::unique_ptr<llama_batch, void (*)(llama_batch*)> batch_guard_{nullptr, nullptr};
};

}  // namespace llama_steer
