#include "runtime.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "llama.h"

namespace llama_steer {
namespace {

std::atomic<int> g_level{2};
// llama.cpp sends continuation lines with GGML_LOG_LEVEL_CONT; they belong to
// the message before them, so they follow its verdict.
std::atomic<bool> g_last_shown{false};

int level_rank(ggml_log_level level) {
    switch (level) {
        case GGML_LOG_LEVEL_DEBUG: return 0;
        case GGML_LOG_LEVEL_INFO: return 1;
        case GGML_LOG_LEVEL_WARN: return 2;
        case GGML_LOG_LEVEL_ERROR: return 3;
        default: return 1;
    }
}

// Runs on whatever thread llama.cpp logs from; it only writes to stderr and
// never touches Python.
void log_callback(ggml_log_level level, const char* text, void*) {
    bool show;
    if (level == GGML_LOG_LEVEL_CONT) {
        show = g_last_shown.load();
    } else {
        show = level_rank(level) >= g_level.load();
        g_last_shown.store(show);
    }
    if (show) {
        std::fputs(text, stderr);
    }
}

int level_from_env() {
    const char* env = std::getenv("LLAMA_STEER_LOG");
    if (env == nullptr) return 2;
    if (!std::strcmp(env, "debug")) return 0;
    if (!std::strcmp(env, "info")) return 1;
    if (!std::strcmp(env, "warn")) return 2;
    if (!std::strcmp(env, "error")) return 3;
    if (!std::strcmp(env, "none")) return 4;
    return 2;
}

}  // namespace

void runtime_init() {
    static std::once_flag once;
    std::call_once(once, [] {
        g_level.store(level_from_env());
        llama_log_set(log_callback, nullptr);
        llama_backend_init();
    });
}

void set_log_level(int level) { g_level.store(level); }
int log_level() { return g_level.load(); }

}  // namespace llama_steer
