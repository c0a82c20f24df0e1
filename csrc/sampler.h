// llama.cpp's sampler chain, built from plain parameters.
#pragma once

#include <cstdint>

#include "context.h"
#include "llama-cpp.h"

namespace llama_steer {

struct SamplerParams {
    float temperature = 0.8f;  // <= 0: greedy
    int32_t top_k = 40;        // <= 0: off
    float top_p = 0.95f;       // >= 1: off
    float min_p = 0.05f;       // <= 0: off
    float repeat_penalty = 1.0f;
    int32_t repeat_last_n = 64;
    uint32_t seed = 0xFFFFFFFF;  // LLAMA_DEFAULT_SEED: random
};

struct Sample {
    llama_token token;
    float logprob;  // log-probability under the model's raw distribution
};

class Sampler {
public:
    Sampler(const SamplerParams& params, int32_t n_vocab);
    // Samples from the logits of batch row idx and accepts the token.
    Sample sample(Context& ctx, int32_t idx);

private:
    llama_sampler_ptr chain_;
    bool greedy_ = false;  // plain argmax: sample() bypasses the chain
};

// What a log softmax over a vocabulary needs: the max logit, the first index
// holding it, and log(sum(exp(logit - max))).
struct LogitStats {
    float max;
    double log_sum;
    llama_token argmax;
};

LogitStats logit_stats(const float* logits, int32_t n_vocab);

// log softmax of logits[token] over n_vocab entries.
float token_logprob(const float* logits, int32_t n_vocab, llama_token token);

}  // namespace llama_steer
