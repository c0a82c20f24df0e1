#include "model.h"

#include <cctype>
#include <fstream>

#include "errors.h"
#include "rpc.h"
#include "runtime.h"

namespace llama_steer {

Model::Model(const std::string& path, int32_t n_gpu_layers, bool writable, const std::vector<std::string>& rpc)
    : rpc_(rpc) {
    runtime_init();
    {
        // llama.cpp reports a bad file only through its log; check the magic
        // here so the exception itself says what is wrong.
        std::ifstream f(path, std::ios::binary);
        if (!f) throw ModelLoadError("cannot open model file: " + path);
        char magic[4] = {};
        f.read(magic, 4);
        if (f.gcount() != 4 || std::string(magic, 4) != "GGUF") {
            throw ModelLoadError("not a GGUF file (bad magic): " + path);
        }
    }
    llama_model_params params = llama_model_default_params();
    params.n_gpu_layers = n_gpu_layers;
    if (writable) params.load_mode = LLAMA_LOAD_MODE_NONE;  // read into our own buffers
    std::vector<ggml_backend_dev_t> devices;
    if (!rpc.empty()) {
        // The workers' devices first (as llama.cpp orders them: fewer
        // transfers), then this machine's GPUs; the CPU is always there.
        devices = rpc_devices(rpc);
        for (ggml_backend_dev_t dev : local_gpus()) devices.push_back(dev);
        devices.push_back(nullptr);
        params.devices = devices.data();
        for (const auto& ep : rpc) rpc_failures_at_load_.push_back(rpc_failures(ep));
    }
    model_.reset(llama_model_load_from_file(path.c_str(), params));
    if (!model_) {
        throw ModelLoadError("llama.cpp could not load the model (truncated, corrupt or unsupported): " + path);
    }
    vocab_ = llama_model_get_vocab(model_.get());
}

std::string Model::lost_worker() const {
    for (size_t i = 0; i < rpc_.size(); ++i) {
        if (rpc_failures(rpc_[i]) != rpc_failures_at_load_[i]) return rpc_[i];
    }
    return {};
}

std::string Model::meta(const std::string& key) const {
    int32_t n = llama_model_meta_val_str(model_.get(), key.c_str(), nullptr, 0);
    if (n < 0) return {};
    std::string out(static_cast<size_t>(n) + 1, '\0');
    llama_model_meta_val_str(model_.get(), key.c_str(), out.data(), out.size());
    out.resize(static_cast<size_t>(n));
    return out;
}

std::string Model::chat_template() const {
    const char* tmpl = llama_model_chat_template(model_.get(), nullptr);
    return tmpl ? std::string(tmpl) : std::string();
}

std::string Model::builtin_template_for_arch() const {
    // Some GGUFs (e.g. the bundled Gemma 3) ship without a template; llama.cpp
    // has built-in ones named after their family ("gemma" for "gemma3").
    std::vector<const char*> names(64);
    const int32_t n = llama_chat_builtin_templates(names.data(), names.size());
    std::string family = meta("general.architecture");
    while (!family.empty() && std::isdigit(static_cast<unsigned char>(family.back()))) family.pop_back();
    for (int32_t i = 0; i < n && i < static_cast<int32_t>(names.size()); ++i) {
        if (family == names[static_cast<size_t>(i)]) return family;
    }
    return {};
}

std::vector<llama_token> Model::tokenize(const std::string& text, bool add_special, bool parse_special) const {
    const int32_t len = static_cast<int32_t>(text.size());
    std::vector<llama_token> tokens(text.size() + 4);
    int32_t n = llama_tokenize(vocab_, text.data(), len, tokens.data(), static_cast<int32_t>(tokens.size()),
                               add_special, parse_special);
    if (n < 0) {
        tokens.resize(static_cast<size_t>(-n));
        n = llama_tokenize(vocab_, text.data(), len, tokens.data(), static_cast<int32_t>(tokens.size()), add_special,
                           parse_special);
        if (n < 0) throw Error("tokenization failed");
    }
    tokens.resize(static_cast<size_t>(n));
    return tokens;
}

void Model::check_token(llama_token token) const {
    if (token < 0 || token >= n_vocab()) {
        throw InvalidArgument("token id " + std::to_string(token) + " is out of range [0, " +
                              std::to_string(n_vocab()) + ")");
    }
}

std::string Model::token_to_piece(llama_token token, bool special) const {
    check_token(token);
    char buf[128];
    int32_t n = llama_token_to_piece(vocab_, token, buf, sizeof buf, 0, special);
    if (n >= 0) return std::string(buf, static_cast<size_t>(n));
    std::string out(static_cast<size_t>(-n), '\0');
    n = llama_token_to_piece(vocab_, token, out.data(), static_cast<int32_t>(out.size()), 0, special);
    if (n < 0) throw Error("token_to_piece failed");
    out.resize(static_cast<size_t>(n));
    return out;
}

std::string Model::detokenize(const std::vector<llama_token>& tokens, bool remove_special,
                              bool unparse_special) const {
    for (llama_token t : tokens) check_token(t);
    std::string out(tokens.size() * 8 + 16, '\0');
    const int32_t n_tokens = static_cast<int32_t>(tokens.size());
    int32_t n = llama_detokenize(vocab_, tokens.data(), n_tokens, out.data(), static_cast<int32_t>(out.size()),
                                 remove_special, unparse_special);
    if (n < 0) {
        out.resize(static_cast<size_t>(-n));
        n = llama_detokenize(vocab_, tokens.data(), n_tokens, out.data(), static_cast<int32_t>(out.size()),
                             remove_special, unparse_special);
        if (n < 0) throw Error("detokenize failed");
    }
    out.resize(static_cast<size_t>(n));
    return out;
}

std::string Model::apply_chat_template(const std::vector<std::pair<std::string, std::string>>& messages,
                                       bool add_generation_prompt) const {
    std::string tmpl = chat_template();
    if (tmpl.empty()) tmpl = builtin_template_for_arch();
    if (tmpl.empty()) throw Error("the model has no chat template and llama.cpp has none built in for its architecture");
    std::vector<llama_chat_message> chat;
    size_t total = 0;
    for (const auto& [role, content] : messages) {
        chat.push_back({role.c_str(), content.c_str()});
        total += role.size() + content.size();
    }
    std::string out(2 * total + 256, '\0');
    int32_t n = llama_chat_apply_template(tmpl.c_str(), chat.data(), chat.size(), add_generation_prompt,
                                          out.data(), static_cast<int32_t>(out.size()));
    if (n < 0) throw Error("llama.cpp does not support this model's chat template");
    if (static_cast<size_t>(n) > out.size()) {
        out.resize(static_cast<size_t>(n));
        n = llama_chat_apply_template(tmpl.c_str(), chat.data(), chat.size(), add_generation_prompt,
                                      out.data(), static_cast<int32_t>(out.size()));
        if (n < 0) throw Error("llama.cpp could not apply the chat template");
    }
    out.resize(static_cast<size_t>(n));
    return out;
}

}  // namespace llama_steer
