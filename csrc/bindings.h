// Registration functions of the pybind11 module, one per area.
#pragma once

#include <pybind11/pybind11.h>

namespace llama_steer {
void register_errors(pybind11::module_& m);
void register_model(pybind11::module_& m);
void register_context(pybind11::module_& m);
void register_steering(pybind11::module_& m);
void register_quant(pybind11::module_& m);
void register_tune(pybind11::module_& m);
void register_rpc(pybind11::module_& m);
}  // namespace llama_steer
