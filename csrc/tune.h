// Representation tuning on llama.cpp's own trainer (llama_opt_*): a private
// model whose trainable tensors are F32 and whose weights live in memory the
// optimizer may write (no mmap), a context shaped for training (one sequence
// of n_ctx tokens per ubatch, so gradients reach K and V), and the steering
// buffer's objective (patch 0005) adding the cosine term to the token loss.
#pragma once

#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "llama-cpp.h"
#include "model.h"

namespace llama_steer {

struct TrainerParams {
    int32_t n_ctx = 64;       // tokens per sequence (callers pad)
    int32_t n_threads = 0;    // 0: all cores
    int32_t batch_size = 1;   // sequences per optimizer step (gradient accumulation)
    float lr = 1e-4f;
    float weight_decay = 0.0f;
    bool adamw = true;        // else SGD
    std::vector<std::string> trainable;  // tensor names; each must exist and be F32
};

// Result of one sequence: the total loss (token term + objective term, as
// the optimizer saw it) and the objective's per-layer mean cosine (in) or
// mean |cos| (out), NaN for layers without a term.
struct TrainStep {
    double loss = 0.0;
    std::vector<float> objective;
};

class Trainer {
public:
    // model: loaded writable (Model(path, 0, true)); the trainer changes its weights.
    Trainer(std::shared_ptr<Model> model, const TrainerParams& params);
    ~Trainer();
    Trainer(const Trainer&) = delete;
    Trainer& operator=(const Trainer&) = delete;

    int32_t n_ctx() const { return params_.n_ctx; }
    const Model& model() const { return *model_; }
    void set_lr(float lr) { params_.lr = lr; }
    float lr() const { return params_.lr; }

    // dirs: [layers.size()][n_embd]; mode 0 in, 1 out. weight: objective,
    // token_weight: token cross-entropy.
    void set_objective(const std::vector<int32_t>& layers, const std::vector<float>& dirs, int32_t mode,
                       float weight, float token_weight);
    void clear_objective();

    // One sequence of exactly n_ctx tokens: labels[i] is the token expected
    // after position i (< 0: no token loss there), pos_weight[i] the weight
    // of position i in the objective's mean (normalized). train=false only
    // evaluates. Every batch_size train calls make one optimizer step.
    TrainStep run(const std::vector<llama_token>& tokens, const std::vector<llama_token>& labels,
                  const std::vector<float>& pos_weight, bool train);

    // The current values of a model tensor as float32 (F32 tensors only).
    std::vector<float> read_tensor(const std::string& name) const;
    std::vector<int64_t> tensor_shape(const std::string& name) const;

private:
    static ggml_opt_optimizer_params opt_pars(void* userdata);
    static bool is_trainable(const ggml_tensor* tensor, void* userdata);

    std::shared_ptr<Model> model_;
    TrainerParams params_;
    std::set<std::string> trainable_;
    llama_context_ptr ctx_;
    ggml_opt_dataset_t dataset_ = nullptr;
    ggml_opt_result_t result_ = nullptr;
};

}  // namespace llama_steer
