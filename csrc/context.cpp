#include "context.h"

#include <algorithm>
#include <string>
#include <thread>

#include "errors.h"
#include "llama-steer.h"
#include "runtime.h"
#include "sampler.h"
#include "steering.h"

namespace llama_steer {

namespace {
void free_batch(llama_batch* b) { llama_batch_free(*b); }
}  // namespace

Context::Context(std::shared_ptr<Model> model, const ContextParams& params) : model_(std::move(model)), params_(params) {
    runtime_init();
    if (params_.n_ctx < 8) throw InvalidArgument("n_ctx must be at least 8");
    if (params_.n_batch < 1 || params_.n_ubatch < 1) throw InvalidArgument("n_batch and n_ubatch must be positive");
    if (params_.n_seq_max < 1) throw InvalidArgument("n_seq_max must be positive");
    if (params_.n_threads <= 0) {
        params_.n_threads = static_cast<int32_t>(std::max(1u, std::thread::hardware_concurrency()));
    }
    params_.n_ubatch = std::min(params_.n_ubatch, params_.n_batch);

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = static_cast<uint32_t>(params_.n_ctx);
    cp.n_batch = static_cast<uint32_t>(params_.n_batch);
    cp.n_ubatch = static_cast<uint32_t>(params_.n_ubatch);
    cp.n_seq_max = static_cast<uint32_t>(params_.n_seq_max);
    // llama.cpp reserves an output row per sequence up front and aborts if
    // that exceeds n_outputs_max (by default n_batch, itself capped by n_ctx).
    cp.n_outputs_max = static_cast<uint32_t>(std::max(std::min(params_.n_ctx, params_.n_batch), params_.n_seq_max));
    cp.n_threads = params_.n_threads;
    cp.n_threads_batch = params_.n_threads;
    cp.embeddings = params_.embeddings;
    if (params_.kv_f32) {
        cp.type_k = GGML_TYPE_F32;
        cp.type_v = GGML_TYPE_F32;
        // llama.cpp's flash attention casts K and V to F16: attend without it.
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    cp.no_perf = false;
    // One cache shared by all sequences: its size is n_ctx whatever
    // n_seq_max is, and sequences can share a prefix through seq_cp.
    cp.kv_unified = true;
    ctx_.reset(llama_init_from_model(model_->get(), cp));
    if (!ctx_) throw DecodeError("llama.cpp could not create a context (n_ctx too large for memory?)");
    // llama.cpp pads n_ctx and caps n_batch by it: keep what it chose.
    n_ctx_ = static_cast<int32_t>(llama_n_ctx(ctx_.get()));
    params_.n_ctx = n_ctx_;
    params_.n_batch = static_cast<int32_t>(llama_n_batch(ctx_.get()));
    params_.n_ubatch = static_cast<int32_t>(llama_n_ubatch(ctx_.get()));
    batch_ = llama_batch_init(params_.n_batch, 0, params_.n_seq_max);
    batch_guard_ = {&batch_, free_batch};
}

Context::Use::Use(Context& ctx) : ctx_(ctx) {
    const std::thread::id me = std::this_thread::get_id();
    std::thread::id none{};
    if (ctx_.owner_.load() == me) {
        ++ctx_.depth_;
        return;
    }
    if (!ctx_.owner_.compare_exchange_strong(none, me)) {
        throw ConcurrentUseError(
            "another thread is using this model's context; one call at a time (llama_steer.Model serializes its "
            "calls, code on the core must too)");
    }
    ctx_.depth_ = 1;
}

Context::Use::~Use() {
    if (--ctx_.depth_ == 0) ctx_.owner_.store(std::thread::id{});
}

void Context::close() {
    Use use(*this);
    ctx_.reset();
    batch_guard_.reset();
    batch_ = llama_batch{};
}

llama_context* Context::get() {
    if (!ctx_) throw ClosedError("the model is closed");
    return ctx_.get();
}

void Context::check_seq(llama_seq_id seq) const {
    if (seq < 0 || seq >= params_.n_seq_max) {
        throw InvalidArgument("sequence id " + std::to_string(seq) + " is out of range [0, " +
                              std::to_string(params_.n_seq_max) + ")");
    }
}

void Context::clear() {
    Use use(*this);
    llama_memory_clear(llama_get_memory(get()), true);
}

void Context::seq_rm(llama_seq_id seq, llama_pos p0, llama_pos p1) {
    Use use(*this);
    if (seq != -1) check_seq(seq);
    if (!llama_memory_seq_rm(llama_get_memory(get()), seq, p0, p1)) {
        throw Error("could not remove positions from sequence " + std::to_string(seq));
    }
}

void Context::seq_cp(llama_seq_id src, llama_seq_id dst, llama_pos p0, llama_pos p1) {
    Use use(*this);
    check_seq(src);
    check_seq(dst);
    llama_memory_seq_cp(llama_get_memory(get()), src, dst, p0, p1);
}

void Context::run(int32_t n) {
    batch_.n_tokens = n;
    const int32_t rc = llama_decode(ctx_.get(), batch_);
    if (!model_->rpc().empty()) {
        // A lost worker shows as a failed compute or as zeroed outputs: wait
        // for the remote work, then ask ggml whether a connection dropped.
        llama_synchronize(ctx_.get());
        const std::string lost = model_->lost_worker();
        if (!lost.empty()) {
            throw WorkerLostError("lost the connection to the RPC worker at " + lost +
                                  ", which holds some of the model's layers; load the model again");
        }
    }
    if (rc == 1) throw ContextOverflowError("no room left in the KV cache (n_ctx " + std::to_string(n_ctx_) + ")");
    if (rc == -1) throw InvalidArgument("llama.cpp rejected the batch as invalid");
    if (rc != 0) throw DecodeError("llama_decode failed with code " + std::to_string(rc));
}

void Context::decode(const BatchTokens& b) { decode_chunks(b, nullptr, params_.n_batch); }

std::vector<float> Context::decode_capture(const BatchTokens& b, int32_t max_outputs, bool logits) {
    if (capture_layers_.empty()) throw InvalidArgument("no capture layers are set");
    if (max_outputs < 1) throw InvalidArgument("max_outputs must be positive");
    std::vector<float> out;
    if (logits) {
        decode_chunks(b, &out, max_outputs);
        return out;
    }
    // Without logits llama.cpp keeps no per-output buffer of n_vocab floats,
    // so the chunks need not be bounded by their outputs.
    Use use(*this);
    check_steer(llama_steer_capture_only(get(), true), "capture");
    struct Off {
        Context* self;
        ~Off() {
            if (!self->closed()) llama_steer_capture_only(self->ctx_.get(), false);  // cannot fail on a live context
        }
    } off{this};
    decode_chunks(b, &out, params_.n_batch);
    return out;
}

void Context::set_capture_layers(const std::vector<int32_t>& layers) {
    Use use(*this);
    for (int32_t il : layers) {
        if (il < 0 || il >= model_->n_layer()) {
            throw InvalidArgument("capture layer " + std::to_string(il) + " is out of range [0, " +
                                  std::to_string(model_->n_layer()) + ")");
        }
    }
    const int32_t rc =
        llama_steer_capture_layers(get(), layers.empty() ? nullptr : layers.data(), static_cast<int32_t>(layers.size()));
    check_steer(rc, "capture");
    capture_layers_ = layers;
}

void Context::decode_chunks(const BatchTokens& b, std::vector<float>* captured, int32_t max_chunk_outputs) {
    Use use(*this);
    get();
    const size_t n = b.tokens.size();
    if (n == 0) throw InvalidArgument("cannot decode an empty batch");
    const bool multi = !b.seq_offsets.empty();
    if (b.pos.size() != n || b.output.size() != n || (multi ? b.seq_offsets.size() != n + 1 : b.seq.size() != n)) {
        throw InvalidArgument("tokens, pos, seq and output must have the same length");
    }
    for (size_t i = 0; i < n; ++i) {
        model_->check_token(b.tokens[i]);
        if (b.pos[i] < 0) throw InvalidArgument("positions must be non-negative");
        if (b.pos[i] >= n_ctx_) {
            throw ContextOverflowError("position " + std::to_string(b.pos[i]) + " does not fit the context of " +
                                       std::to_string(n_ctx_) + " tokens");
        }
        if (multi) {
            const int32_t lo = b.seq_offsets[i], hi = b.seq_offsets[i + 1];
            if (lo < 0 || hi <= lo || hi - lo > params_.n_seq_max || static_cast<size_t>(hi) > b.seq.size()) {
                throw InvalidArgument("bad seq_offsets at token " + std::to_string(i));
            }
            for (int32_t k = lo; k < hi; ++k) check_seq(b.seq[static_cast<size_t>(k)]);
        } else {
            check_seq(b.seq[i]);
        }
    }
    const int32_t n_embd = model_->n_embd();
    const size_t n_cap = capture_layers_.size();
    std::vector<float> rows;
    // Chunks of at most n_batch tokens. When capturing, also at most
    // max_chunk_outputs outputs: llama.cpp grows its logits buffer to the
    // outputs of one call (n_vocab floats each), which would dominate memory
    // when many rows are captured; captured rows are gathered per chunk.
    const int32_t max_outputs = captured != nullptr ? max_chunk_outputs : params_.n_batch;
    if (captured == nullptr) {
        // Only the last chunk's logits survive: every output must be in it.
        const size_t last_start = n - ((n - 1) % static_cast<size_t>(params_.n_batch) + 1);
        for (size_t i = 0; i < last_start; ++i) {
            if (b.output[i]) {
                throw InvalidArgument("a batch of " + std::to_string(n) + " tokens has outputs before its last " +
                                      std::to_string(params_.n_batch) + " tokens (n_batch): they would be lost");
            }
        }
    }
    for (size_t start = 0, end = 0; start < n; start = end) {
        int32_t outs = 0;
        end = start;
        while (end < n && end - start < static_cast<size_t>(params_.n_batch)) {
            if (b.output[end] && outs == max_outputs) break;
            outs += b.output[end] ? 1 : 0;
            ++end;
        }
        int32_t n_out = 0;
        for (size_t i = start; i < end; ++i) {
            const size_t j = i - start;
            batch_.token[j] = b.tokens[i];
            batch_.pos[j] = b.pos[i];
            if (multi) {
                const int32_t lo = b.seq_offsets[i], hi = b.seq_offsets[i + 1];
                batch_.n_seq_id[j] = hi - lo;
                for (int32_t k = lo; k < hi; ++k) batch_.seq_id[j][k - lo] = b.seq[static_cast<size_t>(k)];
            } else {
                batch_.n_seq_id[j] = 1;
                batch_.seq_id[j][0] = b.seq[i];
            }
            batch_.logits[j] = b.output[i];
            n_out += b.output[i] ? 1 : 0;
        }
        run(static_cast<int32_t>(end - start));
        if (captured == nullptr || n_out == 0) continue;
        // Outputs of this chunk are gone after the next decode: gather them
        // now, [row][layer][n_embd].
        const size_t base = captured->size();
        captured->resize(base + static_cast<size_t>(n_out) * n_cap * static_cast<size_t>(n_embd));
        rows.resize(static_cast<size_t>(n_out) * static_cast<size_t>(n_embd));
        for (size_t l = 0; l < n_cap; ++l) {
            const int32_t got = llama_steer_capture_get(ctx_.get(), capture_layers_[l], rows.data(), n_out);
            check_steer(got, "capture");
            if (got != n_out) throw SteeringError("capture returned " + std::to_string(got) + " rows, expected " +
                                                  std::to_string(n_out));
            for (int32_t r = 0; r < n_out; ++r) {
                std::copy_n(rows.data() + static_cast<size_t>(r) * n_embd, n_embd,
                            captured->data() + base + (static_cast<size_t>(r) * n_cap + l) * n_embd);
            }
        }
    }
}

void Context::decode_step(const std::vector<llama_token>& tokens, const std::vector<llama_pos>& pos,
                          const std::vector<llama_seq_id>& seq) {
    BatchTokens b{tokens, pos, seq, std::vector<int8_t>(tokens.size(), 1), {}};
    decode(b);
}

void Context::set_upstream_cvec(const std::vector<float>& data, int32_t il_start, int32_t il_end) {
    Use use(*this);
    const int32_t rc = llama_set_adapter_cvec(get(), data.empty() ? nullptr : data.data(), data.size(),
                                              model_->n_embd(), il_start, il_end);
    if (rc != 0) throw InvalidArgument("llama_set_adapter_cvec rejected the vector");
}

const float* Context::logits(int32_t i) {
    Use use(*this);
    const float* out = llama_get_logits_ith(get(), i);
    if (out == nullptr) throw InvalidArgument("no logits for batch row " + std::to_string(i));
    return out;
}

std::vector<float> Context::token_logprobs(const std::vector<int32_t>& rows, const std::vector<llama_token>& tokens) {
    Use use(*this);
    if (rows.size() != tokens.size()) throw InvalidArgument("rows and tokens must have the same length");
    const int32_t n_vocab = model_->n_vocab();
    std::vector<float> out(rows.size());
    for (size_t k = 0; k < rows.size(); ++k) {
        model_->check_token(tokens[k]);
        out[k] = token_logprob(logits(rows[k]), n_vocab, tokens[k]);
    }
    return out;
}

}  // namespace llama_steer
