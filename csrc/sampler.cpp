#include "sampler.h"

#include <cmath>
#include <cstring>

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
        // Plain greedy needs no chain (sample() takes the argmax itself); it
        // is built anyway so the chain always describes the parameters.
        greedy_ = p.repeat_penalty == 1.0f;
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
    Context::Use use(ctx);
    llama_context* lctx = ctx.get();
    const float* logits = ctx.logits(idx);  // validates idx
    const int32_t n_vocab = ctx.model().n_vocab();
    if (greedy_) {
        // One pass finds the max and its first index (llama.cpp's greedy
        // sampler's choice) and a second the log-sum, instead of the chain
        // copying the vocabulary into a candidate array and this function
        // scanning it twice more: ~0.6 ms a token on a 262k vocabulary.
        const LogitStats st = logit_stats(logits, n_vocab);
        return {st.argmax, static_cast<float>(-st.log_sum)};
    }
    const llama_token token = llama_sampler_sample(chain_.get(), lctx, idx);
    return {token, token_logprob(logits, n_vocab, token)};
}

namespace {

// exp(x) for x <= 0 without libm calls or branches, so the loops below
// vectorize: 2^(x log2 e) split into an integer power (exponent bits) and
// Cephes' exp2f polynomial for 2^f, f in [-0.5, 0.5] (relative error ~2e-7).
inline float exp_nonpositive(float x) {
    const float t = x * 1.44269504088896341f;
    const float fi = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
    const float f = t - fi;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    int32_t e = static_cast<int32_t>(fi) + 127;
    e = e < 0 ? 0 : e;  // below 2^-126: exponent 0, so the result is (almost) 0
    const uint32_t bits = static_cast<uint32_t>(e) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

constexpr int32_t kLanes = 16;   // independent accumulators: vector lanes, no reassociation needed
constexpr int32_t kBlock = 512;  // float partial sums stay exact enough within a block

}  // namespace

// Runs once per sampled token over the whole vocabulary (~50k-262k floats),
// so it is written to vectorize; on x86-64 Linux the loader picks an AVX-512
// (x86-64-v4) or AVX2+FMA (v3) clone where the CPU has one (0.1 ms vs 0.16 ms
// for AVX2 alone on a 262k vocabulary, 2-core EPYC).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
LogitStats logit_stats(const float* logits, int32_t n_vocab) {
    // Max per block of kBlock logits, in vector lanes. The block where the
    // running max last grew holds the first index of the max (llama.cpp's
    // greedy choice among ties), so only that block is scanned for it. NaNs
    // never compare greater; a NaN at index 0 makes 0 the choice, as in
    // llama.cpp's greedy sampler.
    float max = -INFINITY;
    int32_t max_block = -1;
    for (int32_t i = 0; i < n_vocab; i += kBlock) {
        const int32_t n = n_vocab - i < kBlock ? n_vocab - i : kBlock;
        float lane_max[kLanes];
        for (int32_t k = 0; k < kLanes; ++k) lane_max[k] = -INFINITY;
        const int32_t n_main = n - n % kLanes;
        for (int32_t j = 0; j < n_main; j += kLanes) {
            for (int32_t k = 0; k < kLanes; ++k) {
                lane_max[k] = logits[i + j + k] > lane_max[k] ? logits[i + j + k] : lane_max[k];
            }
        }
        float block_max = -INFINITY;
        for (int32_t k = 0; k < kLanes; ++k) block_max = lane_max[k] > block_max ? lane_max[k] : block_max;
        for (int32_t j = n_main; j < n; ++j) block_max = logits[i + j] > block_max ? logits[i + j] : block_max;
        if (block_max > max) {
            max = block_max;
            max_block = i / kBlock;
        }
    }
    llama_token arg = 0;
    if (max_block >= 0 && !std::isnan(logits[0])) {
        arg = max_block * kBlock;
        while (logits[arg] != max) ++arg;
    }

    // exp per block into a buffer, lane sums in float within the block, block
    // sums in double: one running float sum would drop the many tiny terms.
    float buf[kBlock];
    double sum = 0.0;
    for (int32_t i = 0; i < n_vocab; i += kBlock) {
        const int32_t n = n_vocab - i < kBlock ? n_vocab - i : kBlock;
        for (int32_t j = 0; j < n; ++j) buf[j] = exp_nonpositive(logits[i + j] - max);
        for (int32_t j = n; j < kBlock; ++j) buf[j] = 0.0f;
        float lane[kLanes] = {};
        for (int32_t j = 0; j < kBlock; j += kLanes) {
            for (int32_t k = 0; k < kLanes; ++k) lane[k] += buf[j + k];
        }
        for (int32_t k = 0; k < kLanes; ++k) sum += static_cast<double>(lane[k]);
    }
    return {max, std::log(sum), arg};
}

float token_logprob(const float* logits, int32_t n_vocab, llama_token token) {
    const LogitStats st = logit_stats(logits, n_vocab);
    return static_cast<float>(static_cast<double>(logits[token] - st.max) - st.log_sum);
}

}  // namespace llama_steer
