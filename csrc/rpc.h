// Layers on other machines through ggml's RPC backend: the devices of the
// workers a Model loads onto, and the worker's own server loop.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ggml-backend.h"

namespace llama_steer {

// Whether this build has the RPC backend (CMake option LLAMA_STEER_RPC).
bool rpc_available();

// This machine's GPUs (CUDA, Metal, ...), RPC devices excluded; the workers'
// devices come first in a model's list, then these.
std::vector<ggml_backend_dev_t> local_gpus();

// The devices of each worker ("host:port", distinct: llama_steer.rpc's
// rpc_endpoints checks the list's form), in order. Each worker is first
// reached with a plain TCP connect bounded by timeout_ms, so a wrong address
// is a clear ModelLoadError instead of a stall inside ggml.
std::vector<ggml_backend_dev_t> rpc_devices(const std::vector<std::string>& endpoints, int32_t timeout_ms = 5000);

// How many times ggml lost (or could not make) its connection to endpoint.
uint64_t rpc_failures(const std::string& endpoint);

// Serve this machine's devices (its GPUs, else its CPU with n_threads) to
// RPC clients on endpoint. Blocks for the life of the process.
void rpc_serve(const std::string& endpoint, int32_t n_threads);

}  // namespace llama_steer
