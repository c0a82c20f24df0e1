#include "tune.h"

#include <algorithm>
#include <cmath>
#include <thread>

#include "errors.h"
#include "ggml-backend.h"
#include "ggml-opt.h"
#include "llama-steer.h"
#include "runtime.h"
#include "steering.h"

namespace llama_steer {

Trainer::Trainer(std::shared_ptr<Model> model, const TrainerParams& params)
    : model_(std::move(model)), params_(params) {
    runtime_init();
    if (params_.n_ctx < 8) throw InvalidArgument("n_ctx must be at least 8");
    if (params_.batch_size < 1) throw InvalidArgument("batch_size must be at least 1");
    if (!(params_.lr >= 0.0f) || !std::isfinite(params_.lr)) throw InvalidArgument("lr must be finite and >= 0");
    if (!(params_.weight_decay >= 0.0f)) throw InvalidArgument("weight_decay must be >= 0");
    if (params_.trainable.empty()) throw InvalidArgument("no trainable tensors");
    if (params_.n_threads <= 0) {
        params_.n_threads = static_cast<int32_t>(std::max(1u, std::thread::hardware_concurrency()));
    }
    for (const auto& name : params_.trainable) {
        const ggml_tensor* t = llama_steer_model_tensor(model_->get(), name.c_str());
        if (t == nullptr) throw InvalidArgument("the model has no tensor " + name);
        // llama.cpp only trains F32 tensors (llama_set_param skips the rest silently)
        if (t->type != GGML_TYPE_F32) throw InvalidArgument(name + " is not F32 in the working copy");
        trainable_.insert(name);
    }

    llama_context_params cp = llama_context_default_params();
    // One sequence (datapoint) fills one ubatch: the training graph then
    // reads K and V of the ubatch itself, so the attention projections get
    // gradients too. The context (padded to 256 by llama.cpp) only sizes
    // the unused cache.
    cp.n_ctx = static_cast<uint32_t>(params_.n_ctx);
    cp.n_batch = cp.n_ctx;
    cp.n_ubatch = cp.n_ctx;
    cp.n_seq_max = 1;
    cp.n_threads = params_.n_threads;
    cp.n_threads_batch = params_.n_threads;
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;  // no backward pass
    ctx_.reset(llama_init_from_model(model_->get(), cp));
    if (!ctx_) throw DecodeError("llama.cpp could not create a training context");

    llama_opt_params op{};
    op.n_ctx_train = static_cast<uint32_t>(params_.n_ctx);  // the length of one datapoint
    op.param_filter = &Trainer::is_trainable;
    op.param_filter_ud = this;
    op.get_opt_pars = &Trainer::opt_pars;
    op.get_opt_pars_ud = this;
    op.optimizer_type = params_.adamw ? GGML_OPT_OPTIMIZER_TYPE_ADAMW : GGML_OPT_OPTIMIZER_TYPE_SGD;
    op.opt_period = params_.batch_size;
    llama_opt_init(ctx_.get(), model_->get(), op);

    dataset_ = ggml_opt_dataset_init(GGML_TYPE_I32, GGML_TYPE_I32, params_.n_ctx, params_.n_ctx, 1, 1);
    result_ = ggml_opt_result_init();
    if (!dataset_ || !result_) throw DecodeError("could not allocate the training dataset");
}

Trainer::~Trainer() {
    if (result_) ggml_opt_result_free(result_);
    if (dataset_) ggml_opt_dataset_free(dataset_);
}

bool Trainer::is_trainable(const ggml_tensor* tensor, void* userdata) {
    const auto* self = static_cast<const Trainer*>(userdata);
    return self->trainable_.count(ggml_get_name(tensor)) > 0;
}

ggml_opt_optimizer_params Trainer::opt_pars(void* userdata) {
    const auto* self = static_cast<const Trainer*>(userdata);
    ggml_opt_optimizer_params p = ggml_opt_get_default_optimizer_params(nullptr);
    p.adamw.alpha = self->params_.lr;
    p.adamw.wd = self->params_.weight_decay;
    p.sgd.alpha = self->params_.lr;
    p.sgd.wd = self->params_.weight_decay;
    return p;
}

void Trainer::set_objective(const std::vector<int32_t>& layers, const std::vector<float>& dirs, int32_t mode,
                            float weight, float token_weight) {
    const int32_t n_embd = model_->n_embd();
    if (dirs.size() != layers.size() * static_cast<size_t>(n_embd)) {
        throw InvalidArgument("dirs must hold one n_embd row per layer");
    }
    check_steer(llama_steer_objective_set(ctx_.get(), layers.data(), dirs.data(), static_cast<int32_t>(layers.size()),
                                          n_embd, static_cast<llama_steer_objective_mode>(mode), weight, token_weight),
                "objective");
}

void Trainer::clear_objective() { check_steer(llama_steer_objective_clear(ctx_.get()), "objective"); }

TrainStep Trainer::run(const std::vector<llama_token>& tokens, const std::vector<llama_token>& labels,
                       const std::vector<float>& pos_weight, bool train) {
    const size_t n = static_cast<size_t>(params_.n_ctx);
    if (tokens.size() != n || labels.size() != n || pos_weight.size() != n) {
        throw InvalidArgument("tokens, labels and pos_weight must hold n_ctx = " + std::to_string(n) + " values");
    }
    for (llama_token t : tokens) model_->check_token(t);
    for (llama_token t : labels) {
        if (t >= 0) model_->check_token(t);
    }
    check_steer(llama_steer_objective_positions(ctx_.get(), pos_weight.data(), params_.n_ctx), "objective positions");

    std::copy(tokens.begin(), tokens.end(), static_cast<llama_token*>(ggml_opt_dataset_data(dataset_)->data));
    std::copy(labels.begin(), labels.end(), static_cast<llama_token*>(ggml_opt_dataset_labels(dataset_)->data));
    ggml_opt_result_reset(result_);
    // idata_split 1: the one datapoint is trained on; 0: only evaluated
    llama_opt_epoch(ctx_.get(), dataset_, result_, result_, train ? 1 : 0, nullptr, nullptr);

    TrainStep out;
    double unc = 0.0;
    ggml_opt_result_loss(result_, &out.loss, &unc);
    out.objective.resize(static_cast<size_t>(model_->n_layer()));
    check_steer(llama_steer_objective_get(ctx_.get(), out.objective.data(), model_->n_layer()), "objective values");
    return out;
}

std::vector<int64_t> Trainer::tensor_shape(const std::string& name) const {
    const ggml_tensor* t = llama_steer_model_tensor(model_->get(), name.c_str());
    if (t == nullptr) throw InvalidArgument("the model has no tensor " + name);
    std::vector<int64_t> shape;
    for (int i = 0; i < ggml_n_dims(t); ++i) shape.push_back(t->ne[i]);
    return shape;
}

std::vector<float> Trainer::read_tensor(const std::string& name) const {
    const ggml_tensor* t = llama_steer_model_tensor(model_->get(), name.c_str());
    if (t == nullptr) throw InvalidArgument("the model has no tensor " + name);
    if (t->type != GGML_TYPE_F32) throw InvalidArgument(name + " is not F32");
    std::vector<float> out(static_cast<size_t>(ggml_nelements(t)));
    ggml_backend_tensor_get(t, out.data(), 0, ggml_nbytes(t));
    return out;
}

}  // namespace llama_steer
