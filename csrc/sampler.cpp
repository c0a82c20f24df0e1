#include "sampler.h"

#include <cmath>

#include "errors.h"

namespace llama_steer {

Sampler::Sampler(const SamplerParams& p, int32_t n_vocab) {
    if (!std::isfinite(p.temperature)) throw InvalidArgument("temperature must be finite");
    if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) throw InvalidArgument("top_p must be in (0, 1]");
    if (!(p.min_p >= 0.0f && p.min_p < 1.0f)) throw InvalidArgument("min_p must be in [0, 1)");
    if (!(p.repeat_penalty > 0.0f) || !std::isfinite(p.repeat_penalty)) {
        throw InvalidArgument("repeat_penalty must be positive");
    }
    llama_sampler_chain_params cp = llama_sampler_chain_default_params();
    cp.no_perf = true;
    chain_.reset(llama_sampler_chain_init(cp));
    llama_sampler* c = chain_.get();
    if (p.repeat_penalty != 1.0f) {
        llama_sampler_chain_add(c, llama_sampler_init_penalties(n_vocab, p.repeat_last_n, p.repeat_penalty, 0.0f, 0.0f));
    }
    if (p.temperature <= 0.0f) {
        llama_sampler_chain_add(c, llama_sampler_init_greedy());
        return;
    }
    if (p.top_k > 0) llama_sampler_chain_add(c, llama_sampler_init_top_k(p.top_k));
    if (p.top_p < 1.0f) llama_sampler_chain_add(c, llama_sampler_init_top_p(p.top_p, 1));
    if (p.min_p > 0.0f) llama_sampler_chain_add(c, llama_sampler_init_min_p(p.min_p, 1));
    llama_sampler_chain_add(c, llama_sampler_init_temp(p.temperature));
    llama_sampler_chain_add(c, llama_sampler_init_dist(p.seed));
}

Sample Sampler::sample(Context& ctx, int32_t idx) {
    llama_context* lctx = ctx.get();
    const float* logits = ctx.logits(idx);  // validates idx
    const llama_token token = llama_sampler_sample(chain_.get(), lctx, idx);
    return {token, token_logprob(logits, ctx.model().n_vocab(), token)};
}

float token_logprob(const float* logits, int32_t n_vocab, llama_token token) {
    float max = logits[0];
    for (int32_t i = 1; i < n_vocab; ++i) max = std::fmax(max, logits[i]);
    double sum = 0.0;
    for (int32_t i = 0; i < n_vocab; ++i) sum += std::exp(static_cast<double>(logits[i] - max));
    return static_cast<float>(static_cast<double>(logits[token] - max) - std::log(sum));
}

}  // namespace llama_steer
