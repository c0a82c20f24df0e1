// The C++ side of llama-steer's one exception hierarchy. Each class maps to
// the Python class of the same name in llama_steer.errors (bind_errors.cpp is
// the one place that does the mapping). Bad arguments are InvalidArgument,
// which Python sees as ValueError.
#pragma once

#include <stdexcept>
#include <string>

namespace llama_steer {

struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};
// The file is missing, truncated, not a GGUF or not a model llama.cpp knows.
struct ModelLoadError : Error {
    using Error::Error;
};
// A prompt (or a generation) does not fit into the context window.
struct ContextOverflowError : Error {
    using Error::Error;
};
// llama_decode (or context creation) failed.
struct DecodeError : Error {
    using Error::Error;
};
// An RPC worker holding some of the model's layers was lost: the model can
// no longer decode (load it again once the worker is back).
struct WorkerLostError : DecodeError {
    using DecodeError::DecodeError;
};
// The object was closed; using it again is an error, never a crash.
struct ClosedError : Error {
    using Error::Error;
};
// A second thread entered a context another thread is using.
struct ConcurrentUseError : Error {
    using Error::Error;
};
// Steering was refused: a bad slot, a model whose graph has no hook, ...
struct SteeringError : Error {
    using Error::Error;
};
struct InvalidArgument : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

}  // namespace llama_steer
