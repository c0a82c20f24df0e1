#include <pybind11/stl.h>

#include "bindings.h"
#include "rpc.h"

namespace py = pybind11;

namespace llama_steer {

void register_rpc(py::module_& m) {
    m.def("rpc_available", &rpc_available, "Whether this build has ggml's RPC backend.");
    m.def("rpc_failures", &rpc_failures, py::arg("endpoint"),
          "How many times the connection to an RPC worker was lost (or could not be made).");
    // Never returns while the server runs: the GIL is released, and the
    // caller restores default signal handling so that Ctrl-C ends it.
    m.def("rpc_serve", &rpc_serve, py::arg("endpoint"), py::arg("n_threads"),
          py::call_guard<py::gil_scoped_release>());
}

}  // namespace llama_steer
