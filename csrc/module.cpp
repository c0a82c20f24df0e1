#include "bindings.h"
#include "llama.h"
#include "rpc.h"
#include "runtime.h"

PYBIND11_MODULE(_core, m) {
    m.doc() = "llama-steer's compiled core: thin classes over a patched llama.cpp (no policy here).";
    llama_steer::register_errors(m);
    llama_steer::register_model(m);
    llama_steer::register_context(m);
    llama_steer::register_steering(m);
    llama_steer::register_quant(m);
    llama_steer::register_tune(m);
    llama_steer::register_rpc(m);
    m.def("set_log_level", &llama_steer::set_log_level, "0 debug, 1 info, 2 warn, 3 error, 4 none");
    m.def("log_level", &llama_steer::log_level);
    // llama_supports_gpu_offload() is also true for an RPC build with no GPU at all:
    // this asks for a GPU on this machine.
    m.def(
        "supports_gpu_offload", [] { return !llama_steer::local_gpus().empty(); },
        "True on a CUDA or Metal build with a device on this machine");
#ifdef LLAMA_STEER_VERSION
    m.attr("__version__") = LLAMA_STEER_VERSION;
#endif
}
